//! Streaming aggregation. [`WeightedSum`] folds checked updates in one at a time — each
//! with the weight validation gave it, accumulated in f64 — and keeps nothing but the running
//! sums (DESIGN.md invariants 1, 6 and 7). A [`Strategy`] turns the finished sum into the
//! next parameters: [`FedAvg`] (federated averaging with a server learning rate), [`FedAvgM`]
//! (server momentum), and the adaptive [`FedAdagrad`], [`FedAdam`] and [`FedYogi`] of Reddi
//! et al. 2021; a task picks one with a [`StrategyConfig`].

mod adaptive;
mod fedadagrad;
mod fedadam;
mod fedavg;
mod fedavgm;
mod fedyogi;
pub mod kernels;
mod state;

pub use adaptive::AdaptiveParams;
pub use fedadagrad::FedAdagrad;
pub use fedadam::FedAdam;
pub use fedavg::FedAvg;
pub use fedavgm::FedAvgM;
pub use fedyogi::FedYogi;

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

/// The totals of an aggregate besides its weighted sums ([`WeightedSum::from_totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    /// Total weight.
    pub weight: f64,
    /// Updates summed.
    pub updates: u64,
    /// Examples they claim.
    pub examples: u64,
    /// Weighted sum of local losses.
    pub loss_sum: f64,
    /// Weight of the losses.
    pub loss_weight: f64,
    /// Weighted sum of local accuracies.
    pub accuracy_sum: f64,
    /// Weight of the accuracies.
    pub accuracy_weight: f64,
}

/// The running, weighted sum of the updates of one round (or one buffer).
#[derive(Debug, Clone)]
pub struct WeightedSum {
    layout: Layout,
    sums: Vec<f64>,
    weight: f64,
    updates: u64,
    clipped: u64,
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
            clipped: 0,
            examples: 0,
            loss_sum: 0.0,
            loss_weight: 0.0,
            accuracy_sum: 0.0,
            accuracy_weight: 0.0,
        }
    }

    /// An aggregate from totals computed elsewhere: secure aggregation's decoded sum
    /// ([`crate::secagg::input::InputSpec::decode_sum`]), whose parts the server never saw
    /// one by one. `sums` must have the layout's length.
    pub fn from_totals(layout: &Layout, sums: Vec<f64>, totals: Totals) -> Self {
        assert_eq!(sums.len(), layout.numel(), "sums of the layout's length");
        Self {
            layout: layout.clone(),
            sums,
            weight: totals.weight,
            updates: totals.updates,
            clipped: 0,
            examples: totals.examples,
            loss_sum: totals.loss_sum,
            loss_weight: totals.loss_weight,
            accuracy_sum: totals.accuracy_sum,
            accuracy_weight: totals.accuracy_weight,
        }
    }

    /// Folds one checked update in, with the weight its check gave it.
    pub fn accept(&mut self, update: &CheckedUpdate) {
        self.accept_discounted(update, 1.0);
    }

    /// Folds one checked update in with its values scaled by `discount` (FedBuff's staleness
    /// factor) but its full weight counted in the total, so that the mean is
    /// `Σ wᵢ·discountᵢ·Δᵢ / Σ wᵢ`: a stale update moves the model less instead of merely
    /// counting less against the others (Nguyen et al. 2022, Algorithm 1, with example
    /// weights; with equal weights it is the paper's `Σ s(τᵢ)Δᵢ / K`).
    pub fn accept_discounted(&mut self, update: &CheckedUpdate, discount: f64) {
        let w = update.weight();
        let mut offset = 0;
        let factor = w * discount * update.scale();
        for data in update.tensors() {
            let n = data.len() / 4;
            fold(&mut self.sums[offset..offset + n], data, factor);
            offset += n;
        }
        let meta = update.meta();
        self.weight += w;
        self.updates += 1;
        self.clipped += u64::from(update.was_clipped());
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

    /// DP-FedAvg's release (McMahan et al. 2018, with a fixed denominator): adds independent
    /// Gaussian noise of standard deviation `noise_std` to every coordinate of the sum, drawn
    /// from the cryptographically secure `rng`, and makes the mean divide by `denominator`
    /// (the round's expected cohort) instead of the weight folded in, so that one device's
    /// clipped update moves the mean by at most `clip / denominator` whatever the others do.
    pub fn privatize<R: rand::Rng + rand::CryptoRng + ?Sized>(
        &mut self,
        noise_std: f64,
        denominator: f64,
        rng: &mut R,
    ) {
        use rand_distr::{Distribution, StandardNormal};
        for s in &mut self.sums {
            let z: f64 = StandardNormal.sample(rng);
            *s += noise_std * z;
        }
        self.weight = denominator;
    }

    /// Fixes the denominator of the mean at `denominator` (differential privacy's fixed
    /// denominator, when the noise is already in the sums).
    pub fn set_denominator(&mut self, denominator: f64) {
        self.weight = denominator;
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
        self.clipped += other.clipped;
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

    /// Updates the clip bound scaled down (differential privacy's adaptive clipping counts
    /// them, with noise, to move the bound).
    pub fn clipped(&self) -> u64 {
        self.clipped
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

/// A task's choice of [`Strategy`] and its hyperparameters, as `[tasks.strategy]` in the
/// server's settings (`name = "fedadam"`, then the strategy's keys; keys left out take the
/// defaults below). The default is FedAvg with `server_lr` 1: plain federated averaging.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum StrategyConfig {
    /// [`FedAvg`]: x + server_lr · Δ.
    #[serde(rename = "fedavg")]
    FedAvg {
        /// Server learning rate (default 1).
        #[serde(default = "defaults::one")]
        server_lr: f64,
    },
    /// [`FedAvgM`]: v = momentum · v + Δ; x + server_lr · v.
    #[serde(rename = "fedavgm")]
    FedAvgM {
        /// Server learning rate (default 1).
        #[serde(default = "defaults::one")]
        server_lr: f64,
        /// Server momentum (default 0.9).
        #[serde(default = "defaults::momentum")]
        momentum: f64,
    },
    /// [`FedAdagrad`]: v = v + Δ².
    #[serde(rename = "fedadagrad")]
    FedAdagrad {
        /// Server learning rate η (default 0.01).
        #[serde(default = "defaults::adaptive_lr")]
        server_lr: f64,
        /// First moment decay β1 (default 0.9).
        #[serde(default = "defaults::beta1")]
        beta1: f64,
        /// Adaptivity τ (default 0.001).
        #[serde(default = "defaults::tau")]
        tau: f64,
    },
    /// [`FedAdam`]: v = β2 v + (1 − β2) Δ².
    #[serde(rename = "fedadam")]
    FedAdam {
        /// Server learning rate η (default 0.01).
        #[serde(default = "defaults::adaptive_lr")]
        server_lr: f64,
        /// First moment decay β1 (default 0.9).
        #[serde(default = "defaults::beta1")]
        beta1: f64,
        /// Second moment decay β2 (default 0.99).
        #[serde(default = "defaults::beta2")]
        beta2: f64,
        /// Adaptivity τ (default 0.001).
        #[serde(default = "defaults::tau")]
        tau: f64,
    },
    /// [`FedYogi`]: v = v − (1 − β2) Δ² sign(v − Δ²).
    #[serde(rename = "fedyogi")]
    FedYogi {
        /// Server learning rate η (default 0.01).
        #[serde(default = "defaults::adaptive_lr")]
        server_lr: f64,
        /// First moment decay β1 (default 0.9).
        #[serde(default = "defaults::beta1")]
        beta1: f64,
        /// Second moment decay β2 (default 0.99).
        #[serde(default = "defaults::beta2")]
        beta2: f64,
        /// Adaptivity τ (default 0.001).
        #[serde(default = "defaults::tau")]
        tau: f64,
    },
}

/// The defaults of [`StrategyConfig`]'s keys: the paper's (Reddi et al. 2021) for the
/// adaptive optimisers.
mod defaults {
    pub(super) fn one() -> f64 {
        1.0
    }
    pub(super) fn momentum() -> f64 {
        0.9
    }
    pub(super) fn adaptive_lr() -> f64 {
        super::AdaptiveParams::default().server_lr
    }
    pub(super) fn beta1() -> f64 {
        super::AdaptiveParams::default().beta1
    }
    pub(super) fn beta2() -> f64 {
        super::AdaptiveParams::default().beta2
    }
    pub(super) fn tau() -> f64 {
        super::AdaptiveParams::default().tau
    }
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self::FedAvg { server_lr: 1.0 }
    }
}

impl StrategyConfig {
    /// The strategy's name, as in the settings and in its saved state.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FedAvg { .. } => "fedavg",
            Self::FedAvgM { .. } => "fedavgm",
            Self::FedAdagrad { .. } => "fedadagrad",
            Self::FedAdam { .. } => "fedadam",
            Self::FedYogi { .. } => "fedyogi",
        }
    }

    /// Checks the hyperparameters: learning rate and τ positive and finite, momentum and
    /// betas in [0, 1).
    pub fn validate(&self) -> Result<(), String> {
        let positive = |key: &str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "strategy {}: {key} must be positive and finite, not {x}",
                    self.name()
                ))
            }
        };
        let unit = |key: &str, x: f64| {
            if (0.0..1.0).contains(&x) {
                Ok(())
            } else {
                Err(format!(
                    "strategy {}: {key} must be in [0, 1), not {x}",
                    self.name()
                ))
            }
        };
        match *self {
            Self::FedAvg { server_lr } => positive("server_lr", server_lr),
            Self::FedAvgM {
                server_lr,
                momentum,
            } => positive("server_lr", server_lr).and(unit("momentum", momentum)),
            Self::FedAdagrad {
                server_lr,
                beta1,
                tau,
            } => positive("server_lr", server_lr)
                .and(unit("beta1", beta1))
                .and(positive("tau", tau)),
            Self::FedAdam {
                server_lr,
                beta1,
                beta2,
                tau,
            }
            | Self::FedYogi {
                server_lr,
                beta1,
                beta2,
                tau,
            } => positive("server_lr", server_lr)
                .and(unit("beta1", beta1))
                .and(unit("beta2", beta2))
                .and(positive("tau", tau)),
        }
    }

    /// A fresh strategy (no server state yet) for a model of `layout`; resume a stored one
    /// with [`Strategy::restore`]. Call [`StrategyConfig::validate`] first.
    pub fn build(&self, layout: &Layout) -> Box<dyn Strategy> {
        match *self {
            Self::FedAvg { server_lr } => Box::new(FedAvg::new(server_lr)),
            Self::FedAvgM {
                server_lr,
                momentum,
            } => Box::new(FedAvgM::new(layout, server_lr, momentum)),
            Self::FedAdagrad {
                server_lr,
                beta1,
                tau,
            } => Box::new(FedAdagrad::new(
                layout,
                AdaptiveParams {
                    server_lr,
                    beta1,
                    tau,
                    ..AdaptiveParams::default()
                },
            )),
            Self::FedAdam {
                server_lr,
                beta1,
                beta2,
                tau,
            } => Box::new(FedAdam::new(
                layout,
                AdaptiveParams {
                    server_lr,
                    beta1,
                    beta2,
                    tau,
                },
            )),
            Self::FedYogi {
                server_lr,
                beta1,
                beta2,
                tau,
            } => Box::new(FedYogi::new(
                layout,
                AdaptiveParams {
                    server_lr,
                    beta1,
                    beta2,
                    tau,
                },
            )),
        }
    }
}

/// Shared fixtures of the strategies' tests: a three-parameter model (`w` of 2, `b` of 1),
/// three rounds of updates, and the state checks every stateful strategy must pass.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::wire::update::{check, encode, Rules, UpdateMeta};

    /// Three rounds of `(update, examples)`. Their example-weighted means, by hand:
    /// round 1 ((1, -2, 0.5)·1 + (3, 2, 0.5)·3) / 4 = (2.5, 1, 0.5); round 2
    /// ((-1, 0, 4)·2 + (1, 1, 0)·2) / 4 = (0, 0.5, 2); round 3 (0.125, 0.5, -0.75).
    pub(crate) const ROUNDS: [&[(&[f32], u64)]; 3] = [
        &[(&[1.0, -2.0, 0.5], 1), (&[3.0, 2.0, 0.5], 3)],
        &[(&[-1.0, 0.0, 4.0], 2), (&[1.0, 1.0, 0.0], 2)],
        &[(&[0.125, 0.5, -0.75], 5)],
    ];
    /// The rounds' weighted mean updates (see [`ROUNDS`]).
    pub(crate) const MEANS: [[f64; 3]; 3] = [[2.5, 1.0, 0.5], [0.0, 0.5, 2.0], [0.125, 0.5, -0.75]];

    pub(crate) fn layout() -> Layout {
        Layout::new(vec![("w".into(), vec![2]), ("b".into(), vec![1])])
    }

    pub(crate) fn params(v: &[f32; 3]) -> Parameters {
        Parameters::new(vec![
            ("w".into(), Tensor::new(vec![2], v[..2].to_vec()).unwrap()),
            ("b".into(), Tensor::new(vec![1], v[2..].to_vec()).unwrap()),
        ])
        .unwrap()
    }

    pub(crate) fn values(p: &Parameters) -> [f32; 3] {
        let flat: Vec<f32> = p.iter().flat_map(|(_, t)| t.data().to_vec()).collect();
        flat.try_into().unwrap()
    }

    /// One round's aggregate of these `(update, examples)`, weighted by examples.
    pub(crate) fn aggregate(updates: &[(&[f32], u64)]) -> WeightedSum {
        let rules = Rules::lenient(&layout());
        let mut sum = WeightedSum::new(&layout());
        for (u, examples) in updates {
            let body = encode(
                &params(&(*u).try_into().unwrap()),
                &UpdateMeta {
                    base_version: 0,
                    examples: *examples,
                    loss: None,
                    accuracy: None,
                    token: "t".into(),
                },
            );
            sum.accept(&check(body, &rules).unwrap());
        }
        sum
    }

    /// Two rounds, then the state into a fresh instance: its third step is bit-identical
    /// to the original's, and so are the states after it. An empty state (version 0's)
    /// starts afresh.
    pub(crate) fn check_state_round_trip(make: &dyn Fn() -> Box<dyn Strategy>) {
        let start = params(&[0.5, -1.0, 2.0]);
        let mut a = make();
        let mut x = start.clone();
        for round in &ROUNDS[..2] {
            x = a.next_params(&x, &aggregate(round)).unwrap();
        }
        let saved = a.state();
        assert!(!saved.is_empty(), "{} saves its state", a.name());
        let mut b = make();
        b.restore(&saved).unwrap();
        assert_eq!(b.state(), saved);
        let third = aggregate(ROUNDS[2]);
        let xa = a.next_params(&x, &third).unwrap();
        let xb = b.next_params(&x, &third).unwrap();
        assert_eq!(values(&xa).map(f32::to_bits), values(&xb).map(f32::to_bits));
        assert_eq!(a.state(), b.state());
        // Back to an empty state: the step of a fresh instance.
        b.restore(&[]).unwrap();
        let first = aggregate(ROUNDS[0]);
        let fresh = make().next_params(&start, &first).unwrap();
        let reset = b.next_params(&start, &first).unwrap();
        assert_eq!(
            values(&fresh).map(f32::to_bits),
            values(&reset).map(f32::to_bits)
        );
    }

    /// Every stateful strategy's state after one step, by name.
    fn foreign_states() -> Vec<(&'static str, Vec<u8>)> {
        let l = layout();
        let mut all: Vec<Box<dyn Strategy>> = vec![
            Box::new(FedAvgM::new(&l, 1.0, 0.9)),
            Box::new(FedAdagrad::new(&l, AdaptiveParams::default())),
            Box::new(FedAdam::new(&l, AdaptiveParams::default())),
            Box::new(FedYogi::new(&l, AdaptiveParams::default())),
        ];
        all.iter_mut()
            .map(|s| {
                s.next_params(&params(&[0.0; 3]), &aggregate(ROUNDS[0]))
                    .unwrap();
                (s.name(), s.state())
            })
            .collect()
    }

    /// `restore` refuses another strategy's state, a state of another model size, and a
    /// damaged one, with [`AggregateError::State`], and so does FedAvg, which keeps none.
    pub(crate) fn check_restore_refusals(make: &dyn Fn(&Layout) -> Box<dyn Strategy>, name: &str) {
        let refused = |r: Result<(), AggregateError>| matches!(r, Err(AggregateError::State(_)));
        let mut s = make(&layout());
        assert_eq!(s.name(), name);
        let mut own = None;
        for (other, state) in foreign_states() {
            if other == name {
                own = Some(state);
            } else {
                assert!(refused(s.restore(&state)), "{name} took {other}'s state");
            }
        }
        let own = own.expect("the strategy is among the stateful ones");
        assert!(refused(FedAvg::default().restore(&own)));
        // A state of a four-parameter model.
        let bigger = Layout::new(vec![("w".into(), vec![4])]);
        let mut big = make(&bigger);
        let p = Parameters::new(vec![(
            "w".into(),
            Tensor::new(vec![4], vec![0.0; 4]).unwrap(),
        )])
        .unwrap();
        let mut sum = WeightedSum::new(&bigger);
        sum.accept(
            &check(
                encode(
                    &Parameters::new(vec![(
                        "w".into(),
                        Tensor::new(vec![4], vec![1.0; 4]).unwrap(),
                    )])
                    .unwrap(),
                    &UpdateMeta {
                        base_version: 0,
                        examples: 1,
                        loss: None,
                        accuracy: None,
                        token: "t".into(),
                    },
                ),
                &Rules::lenient(&bigger),
            )
            .unwrap(),
        );
        big.next_params(&p, &sum).unwrap();
        assert!(refused(s.restore(&big.state())), "a state of 4 values");
        // Truncated, lengthened, or of an unknown format.
        assert!(refused(s.restore(&own[..own.len() - 1])));
        let mut longer = own.clone();
        longer.push(0);
        assert!(refused(s.restore(&longer)));
        let mut format = own.clone();
        format[0] = 9;
        assert!(refused(s.restore(&format)));
        assert!(refused(s.restore(&own[..3])));
        // And its own state still restores.
        s.restore(&own).unwrap();
        assert_eq!(s.state(), own);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::update::{check, encode, Rules, UpdateMeta, Weighting};
    use rand::{Rng, SeedableRng};

    fn update_body(values: [f32; 3], examples: u64) -> Vec<u8> {
        encode(
            &test_support::params(&values),
            &UpdateMeta {
                base_version: 0,
                examples,
                loss: None,
                accuracy: None,
                token: "t".into(),
            },
        )
    }

    /// DP clipping scales, never refuses: an update longer than the bound folds in at the
    /// bound's length in its own direction; a shorter one folds in unchanged; with uniform
    /// weights a claimed example count changes nothing.
    #[test]
    fn clipping_scales_long_updates_to_the_bound_in_their_direction() {
        let layout = test_support::layout();
        let rules = Rules {
            clip: Some(1.0),
            weighting: Weighting::Uniform,
            ..Rules::lenient(&layout)
        };
        // Norm 5: (3, 4, 0) -> (0.6, 0.8, 0); norm 0.5: unchanged.
        let long = check(update_body([3.0, 4.0, 0.0], 1_000_000), &rules).unwrap();
        let short = check(update_body([0.3, 0.0, 0.4], 1), &rules).unwrap();
        assert!(long.was_clipped() && !short.was_clipped());
        let mut counted = WeightedSum::new(&layout);
        counted.accept(&long);
        counted.accept(&short);
        counted.accept(&long);
        assert_eq!((counted.updates(), counted.clipped()), (3, 2));
        assert!((long.scale() - 0.2).abs() < 1e-12);
        let mut sum = WeightedSum::new(&layout);
        sum.accept(&long);
        let m = sum.mean().unwrap();
        assert!((m[0] - 0.6).abs() < 1e-9 && (m[1] - 0.8).abs() < 1e-9 && m[2] == 0.0);
        let norm = m.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-9, "clipped norm {norm}");
        sum.accept(&short);
        assert_eq!(sum.weight(), 2.0, "a million claimed examples weigh one");
        let m = sum.mean().unwrap();
        assert!(
            (m[0] - 0.45).abs() < 1e-6 && (m[2] - 0.2).abs() < 1e-6,
            "{m:?}"
        );
        // Random updates of every length: no folded contribution is longer than the bound.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..200 {
            let scale: f32 = rng.random_range(0.01..100.0);
            let v = [0, 1, 2].map(|_| rng.random_range(-scale..scale));
            let u = check(update_body(v, 1), &rules).unwrap();
            let mut one = WeightedSum::new(&layout);
            one.accept(&u);
            let n = one
                .mean()
                .unwrap()
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt();
            assert!(n <= 1.0 + 1e-6, "{n}");
        }
    }

    /// The release's noise, statistically: over many coordinates its mean is 0 and its
    /// standard deviation the one asked for (within 1%, far beyond chance at this size), the
    /// mean divides by the fixed denominator, and two releases differ.
    #[test]
    fn privatize_adds_gaussian_noise_of_the_asked_deviation_and_fixes_the_denominator() {
        let n = 200_000;
        let layout = Layout::new(vec![("w".into(), vec![n])]);
        let zeros = Parameters::new(vec![("w".into(), Tensor::full(vec![n], 0.0))]).unwrap();
        let body = encode(
            &zeros,
            &UpdateMeta {
                base_version: 0,
                examples: 1,
                loss: None,
                accuracy: None,
                token: "t".into(),
            },
        );
        let update = check(body, &Rules::lenient(&layout)).unwrap();
        let mut a = WeightedSum::new(&layout);
        a.accept(&update);
        let mut b = a.clone();
        let std = 2.5;
        a.privatize(std, 10.0, &mut rand::rngs::StdRng::seed_from_u64(1));
        b.privatize(std, 10.0, &mut rand::rngs::StdRng::seed_from_u64(2));
        assert_eq!(a.weight(), 10.0);
        // The mean divides the noised sum by 10.
        let sums: Vec<f64> = a.mean().unwrap().iter().map(|m| m * 10.0).collect();
        let mean = sums.iter().sum::<f64>() / n as f64;
        let sd = (sums.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        // The standard error of the mean is 2.5 / sqrt(2e5) = 0.0056; of the deviation 0.004.
        assert!(mean.abs() < 0.03, "noise mean {mean}");
        assert!(
            (sd / std - 1.0).abs() < 0.01,
            "noise deviation {sd}, wanted {std}"
        );
        // Normal tails: about 4.55% beyond two deviations.
        let beyond = sums.iter().filter(|x| x.abs() > 2.0 * std).count() as f64 / n as f64;
        assert!((beyond - 0.0455).abs() < 0.003, "{beyond}");
        assert_ne!(a.mean().unwrap()[..10], b.mean().unwrap()[..10]);
    }

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
        let next = FedAvg::default().next_params(&base, &agg).unwrap();

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

#[cfg(test)]
mod config_tests {
    use super::*;

    fn parse(toml_like: &str) -> Result<StrategyConfig, serde_json::Error> {
        serde_json::from_str(toml_like)
    }

    /// Each name with no keys takes the documented defaults; keys override them; unknown
    /// keys and names are refused; validation bounds the hyperparameters.
    #[test]
    fn configs_parse_with_defaults_and_are_validated() {
        assert_eq!(
            StrategyConfig::default(),
            StrategyConfig::FedAvg { server_lr: 1.0 }
        );
        assert_eq!(
            parse(r#"{"name":"fedavg"}"#).unwrap(),
            StrategyConfig::default()
        );
        assert_eq!(
            parse(r#"{"name":"fedavgm"}"#).unwrap(),
            StrategyConfig::FedAvgM {
                server_lr: 1.0,
                momentum: 0.9
            }
        );
        assert_eq!(
            parse(r#"{"name":"fedadagrad"}"#).unwrap(),
            StrategyConfig::FedAdagrad {
                server_lr: 0.01,
                beta1: 0.9,
                tau: 1e-3
            }
        );
        let adaptive = |n: &str| parse(&format!(r#"{{"name":"{n}"}}"#)).unwrap();
        assert_eq!(
            adaptive("fedadam"),
            StrategyConfig::FedAdam {
                server_lr: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3
            }
        );
        assert_eq!(
            adaptive("fedyogi"),
            StrategyConfig::FedYogi {
                server_lr: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3
            }
        );
        assert_eq!(
            parse(r#"{"name":"fedadam","server_lr":0.1,"tau":0.01}"#).unwrap(),
            StrategyConfig::FedAdam {
                server_lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 0.01
            }
        );
        for bad in [
            r#"{"name":"fedavg","momentum":0.9}"#,
            r#"{"name":"fedadagrad","beta2":0.99}"#,
            r#"{"name":"fedsgd"}"#,
            r#"{"server_lr":1.0}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        for (config, key) in [
            (StrategyConfig::FedAvg { server_lr: 0.0 }, "server_lr"),
            (
                StrategyConfig::FedAvg {
                    server_lr: f64::INFINITY,
                },
                "server_lr",
            ),
            (
                StrategyConfig::FedAvgM {
                    server_lr: 1.0,
                    momentum: 1.0,
                },
                "momentum",
            ),
            (
                StrategyConfig::FedAdagrad {
                    server_lr: 0.1,
                    beta1: -0.1,
                    tau: 1e-3,
                },
                "beta1",
            ),
            (
                StrategyConfig::FedAdam {
                    server_lr: 0.1,
                    beta1: 0.9,
                    beta2: 0.99,
                    tau: 0.0,
                },
                "tau",
            ),
            (
                StrategyConfig::FedYogi {
                    server_lr: 0.1,
                    beta1: 0.9,
                    beta2: f64::NAN,
                    tau: 1e-3,
                },
                "beta2",
            ),
        ] {
            let err = config.validate().unwrap_err();
            assert!(err.contains(key), "{err}");
        }
        let layout = Layout::new(vec![("w".into(), vec![3])]);
        for name in ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] {
            let config = adaptive(name);
            config.validate().unwrap();
            assert_eq!(config.name(), name);
            assert_eq!(config.build(&layout).name(), name);
        }
    }
}
