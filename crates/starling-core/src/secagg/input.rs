//! A device's contribution to a secure round as one vector of the ring, and the server's
//! decoding of the sum back into a [`WeightedSum`]. Only the sum of many devices' vectors is
//! ever decoded, so no per-device number (weight, loss, accuracy) travels in the clear:
//!
//! - coordinates `0..numel`: the update's values, clipped to L2 norm `clip`, multiplied by
//!   the device's weight and divided by `clip` (so each lies in [-1, 1]);
//! - `numel`: the weight w in (0, 1]: the example count capped at `weight_cap`, over the cap
//!   (1 for every device with uniform weighting);
//! - `numel + 1`: w times the local loss (clamped to [0, `loss_bound`]) over `loss_bound`;
//! - `numel + 2`: w times the local accuracy (0 without one);
//! - `numel + 3`: w again when the device reports an accuracy (0 otherwise).
//!
//! The decoded mean update is then `Σ wᵢ·δᵢ / Σ wᵢ`, plain FedAvg's weighted mean with the
//! same capped weights, within the quantisation error of [`FixedPoint`]. A coarse ring
//! (few `input_bits`) or a cap far above the devices' example counts (small weights) makes
//! that error larger: choose the cap near the counts devices really have.

use rand::Rng;

use super::encode::FixedPoint;
use super::protocol::Params;
use crate::aggregate::{AggregateError, WeightedSum};
use crate::wire::params::{f32s_from_le, Layout};
use crate::wire::protocol::{from_hex, SecureAssignment};
use crate::wire::update::UpdateView;

/// Extra coordinates after the update's values: weight, loss, accuracy, accuracy weight.
pub const EXTRA: usize = 4;

/// The values in one device's input for a model of `numel` parameters.
pub fn input_len(numel: usize) -> usize {
    numel + EXTRA
}

/// The round's public parameters and the input encoding, built by the device itself from
/// its assignment (so the server chooses neither the neighbourhood degree nor the
/// threshold), for a model of `numel` parameters. Every device (native, browser, simulated)
/// builds its round here. `Err` says what in the assignment is unusable.
pub fn round_params(
    round: u64,
    a: &SecureAssignment,
    numel: usize,
) -> Result<(Params, InputSpec), String> {
    let devices = usize::try_from(a.devices).map_err(|e| e.to_string())?;
    let len = input_len(numel);
    if a.input_len != len as u64 {
        return Err(format!(
            "the round's input has {} values; this model needs {len}",
            a.input_len
        ));
    }
    if a.index >= a.devices || a.min_survivors < 2 {
        return Err("the assignment's place or minimum is unusable".into());
    }
    let mut fixed_point = FixedPoint::new(a.input_bits, devices).map_err(|e| e.to_string())?;
    if let Some(mu) = a.skellam_mu {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(format!("the round's noise μ ({mu}) is unusable"));
        }
        fixed_point = fixed_point
            .with_noise(devices, mu)
            .map_err(|e| e.to_string())?;
    }
    let seed = from_hex(&a.graph_seed)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or("graph_seed is not 64 hex digits")?;
    let params = Params::new(
        round,
        devices,
        usize::try_from(a.min_survivors).map_err(|e| e.to_string())?,
        fixed_point,
        len,
        seed,
    );
    if !(a.clip.is_finite() && a.clip > 0.0 && a.loss_bound.is_finite() && a.loss_bound > 0.0) {
        return Err("the round's clip or loss bound is unusable".into());
    }
    Ok((
        params,
        InputSpec {
            clip: a.clip,
            loss_bound: a.loss_bound,
            weight_cap: a.weight_cap,
            noise_mu: a.skellam_mu,
        },
    ))
}

/// How a task scales its devices' inputs into [-1, 1]; the server and every device use the
/// same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputSpec {
    /// An update's L2 norm is clipped to this on the device.
    pub clip: f64,
    /// Local losses are clamped to [0, loss_bound].
    pub loss_bound: f64,
    /// The example count that weighs 1 (counts above it weigh 1 too); `None`: every device
    /// weighs 1 (uniform weighting).
    pub weight_cap: Option<u64>,
    /// Distributed differential privacy: each device adds Skellam noise Sk(μ) (variance 2μ,
    /// in the ring's integer units) to every update value, so the server only ever sees a
    /// noised sum (`privacy::skellam`). With it a device reports no loss or accuracy: they
    /// would travel un-noised.
    pub noise_mu: Option<f64>,
}

impl InputSpec {
    /// A device's weight in (0, 1].
    pub fn weight(&self, examples: u64) -> f64 {
        match self.weight_cap {
            Some(cap) if cap > 0 => examples.clamp(1, cap) as f64 / cap as f64,
            _ => 1.0,
        }
    }

    /// The input's values scaled into [-1, 1], before encoding (see the module docs).
    pub fn scaled(
        &self,
        delta: &[f32],
        examples: u64,
        loss: Option<f32>,
        accuracy: Option<f32>,
    ) -> Vec<f64> {
        let norm = delta
            .iter()
            .map(|&d| f64::from(d) * f64::from(d))
            .sum::<f64>()
            .sqrt();
        let clip_factor = if norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        let w = self.weight(examples);
        let factor = w * clip_factor / self.clip;
        let mut out = Vec::with_capacity(input_len(delta.len()));
        out.extend(delta.iter().map(|&d| f64::from(d) * factor));
        out.push(w);
        let loss = loss.map_or(0.0, |l| {
            if l.is_finite() {
                f64::from(l).clamp(0.0, self.loss_bound)
            } else {
                self.loss_bound
            }
        });
        out.push(w * loss / self.loss_bound);
        match accuracy {
            Some(a) if a.is_finite() => {
                out.push(w * f64::from(a).clamp(0.0, 1.0));
                out.push(w);
            }
            _ => {
                out.push(0.0);
                out.push(0.0);
            }
        }
        out
    }

    /// A decoded update (the device's own, from `train::local_update`) as its input in the
    /// ring, with stochastic rounding from `rng`.
    pub fn encode_update(
        &self,
        fixed_point: &FixedPoint,
        update: &UpdateView<'_>,
        rng: &mut impl Rng,
    ) -> Vec<u32> {
        let delta: Vec<f32> = update
            .tensors
            .iter()
            .flat_map(|t| f32s_from_le(t))
            .collect();
        let meta = &update.meta;
        self.encode(
            fixed_point,
            &delta,
            meta.examples,
            meta.loss,
            meta.accuracy,
            rng,
        )
    }

    /// A device's input: its update's values, weight, loss and accuracy scaled
    /// ([`InputSpec::scaled`]) and encoded in the ring, with the distributed-DP noise added
    /// to every update value when the round has it (and then no loss or accuracy).
    pub fn encode(
        &self,
        fixed_point: &FixedPoint,
        delta: &[f32],
        examples: u64,
        loss: Option<f32>,
        accuracy: Option<f32>,
        rng: &mut (impl Rng + ?Sized),
    ) -> Vec<u32> {
        let Some(mu) = self.noise_mu else {
            let scaled = self.scaled(delta, examples, loss, accuracy);
            return fixed_point.encode(&scaled, rng);
        };
        let scaled = self.scaled(delta, examples, None, None);
        let mut x = fixed_point.encode(&scaled, rng);
        let mask = fixed_point.ring_mask();
        for v in &mut x[..delta.len()] {
            let noise = crate::privacy::skellam::sample(mu, rng);
            *v = ((i64::from(*v) + noise) as u32) & mask;
        }
        x
    }

    /// The server's side: the ring sum of `survivors` inputs as the round's [`WeightedSum`]
    /// (weighted sums of the values, total weight, weighted loss and accuracy sums; the
    /// example count is the total weight times the cap, rounded). Refuses a sum of the wrong
    /// length or with no weight.
    pub fn decode_sum(
        &self,
        fixed_point: &FixedPoint,
        sum: &[u32],
        layout: &Layout,
        survivors: usize,
    ) -> Result<WeightedSum, AggregateError> {
        let n = layout.numel();
        if sum.len() != input_len(n) {
            return Err(AggregateError::LayoutMismatch);
        }
        let values = fixed_point.decode(sum);
        let weight = values[n];
        if weight.is_nan() || weight <= 0.0 {
            return Err(AggregateError::Empty);
        }
        let sums: Vec<f64> = values[..n].iter().map(|v| v * self.clip).collect();
        let examples = match self.weight_cap {
            Some(cap) => (weight * cap as f64).round().max(0.0) as u64,
            None => survivors as u64,
        };
        Ok(WeightedSum::from_totals(
            layout,
            sums,
            crate::aggregate::Totals {
                weight,
                updates: survivors as u64,
                examples,
                loss_sum: values[n + 1] * self.loss_bound,
                loss_weight: weight,
                accuracy_sum: values[n + 2],
                accuracy_weight: values[n + 3].max(0.0),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::encode::add_into;
    use rand::SeedableRng;

    #[test]
    fn the_decoded_sum_is_the_weighted_mean_within_a_level() {
        let layout = Layout::new(vec![("w".into(), vec![3])]);
        let spec = InputSpec {
            clip: 2.0,
            loss_bound: 10.0,
            weight_cap: Some(100),
            noise_mu: None,
        };
        let fp = FixedPoint::new(20, 3).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let devices: [(&[f32], u64, f32, f32); 3] = [
            (&[0.5, -0.25, 1.0], 50, 1.0, 0.5),
            (&[0.1, 0.2, -0.3], 100, 2.0, 0.75),
            (&[-1.0, 0.0, 0.5], 500, 3.0, 1.0),
        ];
        let mut sum = vec![0u32; input_len(3)];
        for (d, e, l, a) in devices {
            let y = fp.encode(&spec.scaled(d, e, Some(l), Some(a)), &mut rng);
            add_into(&mut sum, &y, fp.ring_mask());
        }
        let ws = spec.decode_sum(&fp, &sum, &layout, 3).unwrap();
        // Weights 0.5, 1, 1 (500 capped at 100).
        let w = [0.5, 1.0, 1.0];
        let tw: f64 = w.iter().sum();
        let mean = ws.mean().unwrap();
        for (k, m) in mean.iter().enumerate() {
            let want: f64 = devices
                .iter()
                .zip(w)
                .map(|((d, ..), w)| w * f64::from(d[k]))
                .sum::<f64>()
                / tw;
            assert!((m - want).abs() < 1e-4, "{k}: {m} vs {want}");
        }
        assert!((ws.weight() - tw).abs() < 1e-4);
        assert!((ws.mean_loss().unwrap() - (0.5 + 2.0 + 3.0) / 2.5).abs() < 1e-3);
        assert!((ws.mean_accuracy().unwrap() - (0.25 + 0.75 + 1.0) / 2.5).abs() < 1e-4);
        assert_eq!(ws.examples(), 250);
        assert_eq!(ws.updates(), 3);
    }

    /// Distributed DP: the sum of n devices' noised inputs carries Sk(nμ) on every update
    /// value (mean 0, variance 2nμ, symmetric, about 68.3% within one deviation as the
    /// Skellam's near-normal shape gives at this μ), and the weight and metadata coordinates
    /// carry none: no loss or accuracy travels.
    #[test]
    fn the_summed_noise_of_n_devices_is_skellam_of_n_mu() {
        let numel = 20_000;
        let (n, mu) = (10usize, 50.0);
        let spec = InputSpec {
            clip: 1.0,
            loss_bound: 10.0,
            weight_cap: None,
            noise_mu: Some(mu),
        };
        let fp = FixedPoint::new(16, n).unwrap().with_noise(n, mu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let zeros = vec![0.0f32; numel];
        let mut sum = vec![0u32; input_len(numel)];
        for _ in 0..n {
            let x = spec.encode(&fp, &zeros, 10, Some(2.0), Some(0.5), &mut rng);
            add_into(&mut sum, &x, fp.ring_mask());
        }
        let values: Vec<f64> = fp.decode(&sum).iter().map(|v| v * fp.levels()).collect();
        let noise = &values[..numel];
        let var_want = 2.0 * n as f64 * mu;
        let mean = noise.iter().sum::<f64>() / numel as f64;
        let var = noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (numel - 1) as f64;
        let skew =
            noise.iter().map(|v| (v - mean).powi(3)).sum::<f64>() / numel as f64 / var.powf(1.5);
        let within =
            noise.iter().filter(|v| v.abs() <= var_want.sqrt()).count() as f64 / numel as f64;
        assert!(noise.iter().all(|v| v.fract() == 0.0), "integer noise");
        assert!(
            mean.abs() < 4.0 * (var_want / numel as f64).sqrt(),
            "mean {mean}"
        );
        assert!(
            (var / var_want - 1.0).abs() < 0.04,
            "variance {var} vs {var_want}"
        );
        assert!(skew.abs() < 0.05, "skewness {skew}");
        // P(|Sk(500, 500)| <= 31.6) = P(|k| <= 31) = 0.6809 (scipy, from the pmf
        // e^(-1000) I_|k|(1000)); the standard error at 20,000 draws is 0.0033.
        assert!((within - 0.6809).abs() < 0.015, "{within}");
        // Weight n, and no loss, accuracy or accuracy weight.
        assert_eq!(values[numel], n as f64 * fp.levels());
        assert_eq!(&values[numel + 1..], &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn updates_beyond_the_clip_are_scaled_down() {
        let spec = InputSpec {
            clip: 1.0,
            loss_bound: 1.0,
            weight_cap: None,
            noise_mu: None,
        };
        let s = spec.scaled(&[3.0, 4.0], 7, None, None);
        assert!((s[0] - 0.6).abs() < 1e-12 && (s[1] - 0.8).abs() < 1e-12);
        assert_eq!(&s[2..], &[1.0, 0.0, 0.0, 0.0]);
    }
}
