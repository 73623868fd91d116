//! Streaming aggregation. [`WeightedSum`] folds checked updates in one at a time — each
//! with the weight validation gave it, accumulated in f64 — and keeps nothing but the running
//! sums (DESIGN.md invariants 1, 6 and 7). A [`Strategy`] turns the finished sum into the
//! next parameters; [`FedAvg`] is plain federated averaging.

mod fedavg;
pub mod kernels;

pub use fedavg::FedAvg;

use crate::tensor::Tensor;
use crate::wire::params::{f32s_from_le, Layout, Parameters};
use crate::wire::update::CheckedUpdate;

/// Errors combining aggregates.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// Two aggregates (or an aggregate and a model) have different layouts.
    #[error("aggregates of different model layouts cannot be combined")]
    LayoutMismatch,
    /// Nothing was aggregated.
    #[error("the aggregate is empty")]
    Empty,
    /// A strategy's saved state does not fit it.
    #[error("saved strategy state is unusable: {0}")]
    State(String),
}

/// The running, weighted sum of the updates of one round (or one buffer).
#[derive(Debug, Clone)]
pub struct WeightedSum {
    layout: Layout,
    sums: Vec<f64>,
    weight: f64,
    updates: u64,
    examples: u64,
    loss_sum: f64,
    loss_weight: f64,
    accuracy_sum: f64,
    accuracy_weight: f64,
}

impl WeightedSum {
    /// An empty aggregate for a model layout.
    pub fn new(layout: &Layout) -> Self {
        Self {
            layout: layout.clone(),
            sums: vec![0.0; layout.numel()],
            weight: 0.0,
            updates: 0,
            examples: 0,
            loss_sum: 0.0,
            loss_weight: 0.0,
            accuracy_sum: 0.0,
            accuracy_weight: 0.0,
        }
    }

    /// Folds one checked update in, with the weight its check gave it.
    pub fn accept(&mut self, update: &CheckedUpdate) {
        let w = update.weight();
        let mut offset = 0;
        for data in update.tensors() {
            let n = data.len() / 4;
            fold(&mut self.sums[offset..offset + n], data, w);
            offset += n;
        }
        let meta = update.meta();
        self.weight += w;
        self.updates += 1;
        self.examples += meta.examples;
        if let Some(l) = meta.loss {
            self.loss_sum += w * f64::from(l);
            self.loss_weight += w;
        }
        if let Some(a) = meta.accuracy {
            self.accuracy_sum += w * f64::from(a);
            self.accuracy_weight += w;
        }
    }

    /// Merges another partial aggregate of the same round into this one.
    pub fn merge(&mut self, other: &WeightedSum) -> Result<(), AggregateError> {
        if self.layout != other.layout {
            return Err(AggregateError::LayoutMismatch);
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        self.weight += other.weight;
        self.updates += other.updates;
        self.examples += other.examples;
        self.loss_sum += other.loss_sum;
        self.loss_weight += other.loss_weight;
        self.accuracy_sum += other.accuracy_sum;
        self.accuracy_weight += other.accuracy_weight;
        Ok(())
    }

    /// Updates folded in.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Examples the folded updates claim.
    pub fn examples(&self) -> u64 {
        self.examples
    }

    /// The total weight folded in.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Weighted mean of the reported local losses.
    pub fn mean_loss(&self) -> Option<f64> {
        (self.loss_weight > 0.0).then(|| self.loss_sum / self.loss_weight)
    }

    /// Weighted mean of the reported local accuracies.
    pub fn mean_accuracy(&self) -> Option<f64> {
        (self.accuracy_weight > 0.0).then(|| self.accuracy_sum / self.accuracy_weight)
    }

    /// The layout aggregated.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The weighted mean update, in f64, flat in layout order.
    pub fn mean(&self) -> Result<Vec<f64>, AggregateError> {
        if self.weight <= 0.0 {
            return Err(AggregateError::Empty);
        }
        Ok(self.sums.iter().map(|s| s / self.weight).collect())
    }

    /// `base + mean update`: plain FedAvg's next parameters.
    pub fn finish(&self, base: &Parameters) -> Result<Parameters, AggregateError> {
        let mean = self.mean()?;
        apply(base, &self.layout, mean.iter().copied())
    }
}

/// `sums += w * values`, with the values as little-endian f32 bytes: the server's hot path.
/// An aligned body on a little-endian machine is read in place as `&[f32]` by the vectorised
/// kernel; anything else takes the byte-by-byte path.
fn fold(sums: &mut [f64], data: &[u8], w: f64) {
    #[cfg(target_endian = "little")]
    if let Ok(values) = bytemuck::try_cast_slice::<u8, f32>(data) {
        return crate::aggregate::kernels::axpy_f32_into_f64(sums, values, w);
    }
    for (acc, x) in sums.iter_mut().zip(f32s_from_le(data)) {
        *acc += w * f64::from(x);
    }
}

/// `base + step`, with `step` flat in layout order (added in f64, rounded once to f32).
pub fn apply(
    base: &Parameters,
    layout: &Layout,
    step: impl Iterator<Item = f64>,
) -> Result<Parameters, AggregateError> {
    if &base.layout() != layout {
        return Err(AggregateError::LayoutMismatch);
    }
    let mut step = step;
    let tensors = base
        .iter()
        .map(|(name, t)| {
            let data = t
                .data()
                .iter()
                .map(|&p| (f64::from(p) + step.next().unwrap_or(0.0)) as f32)
                .collect();
            (
                name.to_string(),
                Tensor::new(t.shape().to_vec(), data).unwrap(),
            )
        })
        .collect();
    Ok(Parameters::new(tensors).expect("names come from a valid parameter set"))
}

/// How the server turns a round's aggregate into the next model (Flower's `aggregate_fit`).
/// Strategies with server state (momentum, FedAdam's moments) keep it in `self`, and save it
/// with every committed version ([`Strategy::state`]) so that a restart resumes it exactly.
pub trait Strategy: Send + Sync + std::fmt::Debug {
    /// The strategy's name.
    fn name(&self) -> &'static str;
    /// The next parameters from the current ones and the round's aggregate.
    fn next_params(
        &mut self,
        base: &Parameters,
        aggregate: &WeightedSum,
    ) -> Result<Parameters, AggregateError>;
    /// The server state to store with the version [`Strategy::next_params`] produced
    /// (empty for a stateless strategy).
    fn state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Resumes from a stored state.
    fn restore(&mut self, state: &[u8]) -> Result<(), AggregateError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(AggregateError::State(format!(
                "{} keeps no state, but {} bytes were stored",
                self.name(),
                state.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::update::{check, encode, Rules, UpdateMeta};
    use rand::{Rng, SeedableRng};

    fn random_params(rng: &mut impl Rng, scale: f32) -> Parameters {
        Parameters::new(vec![
            (
                "w".into(),
                Tensor::new(
                    vec![3, 4],
                    (0..12).map(|_| rng.random_range(-scale..scale)).collect(),
                )
                .unwrap(),
            ),
            (
                "b".into(),
                Tensor::new(
                    vec![4],
                    (0..4).map(|_| rng.random_range(-scale..scale)).collect(),
                )
                .unwrap(),
            ),
        ])
        .unwrap()
    }

    fn upload(delta: &Parameters, examples: u64) -> Vec<u8> {
        encode(
            delta,
            &UpdateMeta {
                base_version: 0,
                examples,
                loss: Some(1.0),
                accuracy: None,
                token: "t".into(),
            },
        )
    }

    /// The streaming, weighted aggregate equals the naive weighted average of the devices'
    /// final models, and merging partial aggregates in any split gives the same result.
    #[test]
    fn streaming_fedavg_matches_naive_weighted_average() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = random_params(&mut rng, 1.0);
        let layout = base.layout();
        let devices: Vec<(Parameters, u64)> = (0..25)
            .map(|_| (random_params(&mut rng, 0.5), rng.random_range(1..200)))
            .collect();
        let bodies: Vec<Vec<u8>> = devices.iter().map(|(d, n)| upload(d, *n)).collect();

        let rules = Rules::lenient(&layout);
        let mut agg = WeightedSum::new(&layout);
        for b in &bodies {
            agg.accept(&check(b.clone(), &rules).unwrap());
        }
        let next = FedAvg.next_params(&base, &agg).unwrap();

        // Naive: average the devices' final models (base + delta), weighted by examples.
        let total: f64 = devices.iter().map(|(_, n)| *n as f64).sum();
        for (name, t) in next.iter() {
            for (i, &got) in t.data().iter().enumerate() {
                let want: f64 = devices
                    .iter()
                    .map(|(d, n)| {
                        *n as f64
                            * (f64::from(base.get(name).unwrap().data()[i])
                                + f64::from(d.get(name).unwrap().data()[i]))
                    })
                    .sum::<f64>()
                    / total;
                assert!(
                    (f64::from(got) - want).abs() < 1e-6,
                    "{name}[{i}]: {got} vs {want}"
                );
            }
        }
        assert_eq!(agg.updates(), 25);

        // Order independence and merging: two partial sums over a different order.
        let mut left = WeightedSum::new(&layout);
        let mut right = WeightedSum::new(&layout);
        for (i, b) in bodies.iter().enumerate().rev() {
            let part = if i % 3 == 0 { &mut left } else { &mut right };
            part.accept(&check(b.clone(), &rules).unwrap());
        }
        left.merge(&right).unwrap();
        let merged = left.finish(&base).unwrap();
        for ((_, a), (_, b)) in merged.iter().zip(next.iter()) {
            for (x, y) in a.data().iter().zip(b.data()) {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0));
            }
        }
        assert_eq!(left.examples(), agg.examples());
    }

    #[test]
    fn empty_aggregate_has_no_mean() {
        let layout = Layout::new(vec![("w".into(), vec![2])]);
        assert_eq!(
            WeightedSum::new(&layout).mean().unwrap_err(),
            AggregateError::Empty
        );
        let other = WeightedSum::new(&Layout::new(vec![("v".into(), vec![2])]));
        assert_eq!(
            WeightedSum::new(&layout).merge(&other).unwrap_err(),
            AggregateError::LayoutMismatch
        );
    }
}
