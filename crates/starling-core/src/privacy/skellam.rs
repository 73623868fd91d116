//! Distributed differential privacy under secure aggregation: the Skellam mechanism (Agarwal,
//! Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
//! Learning", NeurIPS).
//!
//! Each device adds integer noise Sk(μ) = Poisson(μ) − Poisson(μ) (variance 2μ) to every
//! coordinate of its fixed-point input before masking it; the masks cancel in the sum and the
//! noises add up to Sk(nμ) for n devices, so the server only ever sees a noised sum.
//!
//! The accounting follows the paper's reference code (Google's `distributed_dp/
//! accounting_utils.py`, `skellam_epsilon` with `beta = 0`):
//!
//! - **Sensitivity** in the ring's integer units: an update clipped to norm `levels` (the
//!   clip bound maps to the fixed-point levels L) and stochastically rounded moves each
//!   coordinate by less than 1, so Δ₂ = L + √d; its integer coordinates give
//!   Δ₁ = Δ₂ · min(√d, Δ₂).
//! - **RDP of the sum** with total noise variance V at order α (Agarwal et al. 2021,
//!   Theorem 3.5 in variance form): α Δ₂² / (2V) + min(((2α − 1) Δ₂² + 6 Δ₁) / (4V²),
//!   3 Δ₁ / (2V)).
//! - **Poisson subsampling** at rate q < 1: the general upper bound of Zhu and Wang 2019
//!   ("Poisson Subsampled Rényi Differential Privacy", ICML, Theorem 5), which holds for any
//!   mechanism at integer orders, and never more than the unsampled RDP. Fractional orders
//!   count as infinite (left out of the minimum), as the reference code uses integer orders
//!   only.

use rand::Rng;

use super::accountant::{log_add, log_comb, PrivacyError};

/// The L2 and L1 sensitivity, in the ring's integer units, of one device's update clipped to
/// `levels` (the fixed-point image of the clip bound) and stochastically rounded, over `dim`
/// coordinates.
pub fn sensitivity(levels: f64, dim: usize) -> (f64, f64) {
    let root = (dim as f64).sqrt();
    let l2 = levels + root;
    (l2, l2 * root.min(l2))
}

/// The Skellam mechanism's RDP at order `order` (> 1) for a sum of sensitivity `l2`, `l1`
/// and total noise variance `variance` (all in integer units).
pub fn skellam_rdp(order: f64, l1: f64, l2: f64, variance: f64) -> f64 {
    let a = order;
    a * l2 * l2 / (2.0 * variance)
        + (((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * variance * variance))
            .min(3.0 * l1 / (2.0 * variance))
}

/// The RDP at integer order `order` (≥ 2) of a mechanism with RDP curve `base` run on a
/// Poisson subsample of rate `q` in (0, 1): Zhu and Wang 2019, Theorem 5 (`tight = false`,
/// any mechanism), or with every term's factor 3 replaced by 1 (`tight = true`: their
/// Theorem 6, exact for the Gaussian mechanism, kept to check the sum against a reference).
pub fn poisson_subsampled_rdp(q: f64, order: u64, base: impl Fn(f64) -> f64, tight: bool) -> f64 {
    let a = order as f64;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    // (1 − q)^(α−1) (αq − q + 1)
    let mut log_sum = (a - 1.0) * l1q + (a * q - q + 1.0).ln();
    // C(α, 2) q² (1 − q)^(α−2) e^{ε(2)}
    log_sum = log_add(
        log_sum,
        log_comb(a, 2.0) + 2.0 * lq + (a - 2.0) * l1q + base(2.0),
    );
    let three = if tight { 0.0 } else { 3f64.ln() };
    for l in 3..=order {
        let l = l as f64;
        log_sum = log_add(
            log_sum,
            three + log_comb(a, l) + (a - l) * l1q + l * lq + (l - 1.0) * base(l),
        );
    }
    log_sum / (a - 1.0)
}

/// One round of the distributed Skellam mechanism at each of `orders`: the RDP of a sum of
/// sensitivity `l2`, `l1` with total noise variance `variance`, on a Poisson subsample of
/// rate `sampling_rate`.
pub fn subsampled_skellam_rdp(
    sampling_rate: f64,
    l1: f64,
    l2: f64,
    variance: f64,
    orders: &[f64],
) -> Result<Vec<f64>, PrivacyError> {
    if !(0.0..=1.0).contains(&sampling_rate) {
        return Err(PrivacyError::SamplingRate(sampling_rate));
    }
    if !(variance.is_finite() && variance > 0.0) {
        return Err(PrivacyError::NoiseMultiplier(variance));
    }
    if !(l2.is_finite() && l2 > 0.0 && l1.is_finite() && l1 > 0.0) {
        return Err(PrivacyError::Clip(l2));
    }
    let base = |a: f64| skellam_rdp(a, l1, l2, variance);
    Ok(orders
        .iter()
        .map(|&alpha| {
            if alpha.fract() != 0.0 || alpha < 2.0 {
                return f64::INFINITY;
            }
            let r = if sampling_rate == 0.0 {
                0.0
            } else if sampling_rate == 1.0 {
                base(alpha)
            } else {
                poisson_subsampled_rdp(sampling_rate, alpha as u64, base, false).min(base(alpha))
            };
            if r.is_nan() {
                f64::INFINITY
            } else {
                r.max(0.0)
            }
        })
        .collect())
}

/// The noise a task's devices add: each adds Sk(μ) per coordinate, so that any `min_devices`
/// of them together reach the central noise of multiplier `noise_multiplier` (variance
/// (z Δ₂)²) for updates clipped to `levels` over `dim` coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedSkellam {
    /// Δ₂ in integer units.
    pub l2: f64,
    /// Δ₁ in integer units.
    pub l1: f64,
    /// μ of each device's Sk(μ) (its variance is 2μ).
    pub mu: f64,
}

impl DistributedSkellam {
    /// The noise for rounds that commit with at least `min_devices` devices.
    pub fn new(levels: f64, dim: usize, noise_multiplier: f64, min_devices: usize) -> Self {
        let (l2, l1) = sensitivity(levels, dim);
        let central = (noise_multiplier * l2).powi(2);
        Self {
            l2,
            l1,
            mu: central / (2.0 * min_devices.max(1) as f64),
        }
    }

    /// The total noise variance of a sum over `devices` devices' inputs.
    pub fn variance(&self, devices: u64) -> f64 {
        2.0 * self.mu * devices as f64
    }

    /// The effective noise multiplier of a sum over `devices` devices: its noise's standard
    /// deviation over Δ₂.
    pub fn noise_multiplier(&self, devices: u64) -> f64 {
        self.variance(devices).sqrt() / self.l2
    }

    /// One round's RDP at `orders` when `devices` devices' noise is in the sum.
    pub fn rdp(
        &self,
        sampling_rate: f64,
        devices: u64,
        orders: &[f64],
    ) -> Result<Vec<f64>, PrivacyError> {
        subsampled_skellam_rdp(
            sampling_rate,
            self.l1,
            self.l2,
            self.variance(devices),
            orders,
        )
    }
}

/// One draw of Sk(μ) = Poisson(μ) − Poisson(μ) (0 for μ = 0). The caller's generator must be
/// cryptographically secure for the noise to protect anything.
pub fn sample(mu: f64, rng: &mut (impl Rng + ?Sized)) -> i64 {
    use rand_distr::{Distribution, Poisson};
    if mu <= 0.0 {
        return 0;
    }
    let poisson = Poisson::new(mu).expect("μ is positive and finite");
    let a: f64 = poisson.sample(rng);
    let b: f64 = poisson.sample(rng);
    a as i64 - b as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn skellam_samples_have_the_skellam_mean_and_variance() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for mu in [0.3, 5.0, 400.0, 1e6] {
            let n = 100_000;
            let draws: Vec<f64> = (0..n).map(|_| sample(mu, &mut rng) as f64).collect();
            let mean = draws.iter().sum::<f64>() / n as f64;
            let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let sd = (2.0 * mu).sqrt();
            // The mean's standard error is sd / √n; the variance's about √(2/n) of it.
            assert!(
                mean.abs() < 5.0 * sd / (n as f64).sqrt(),
                "μ {mu}: mean {mean}"
            );
            assert!(
                (var / (2.0 * mu) - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt() + 0.01,
                "μ {mu}: variance {var}, want {}",
                2.0 * mu
            );
        }
        assert_eq!(sample(0.0, &mut rng), 0);
    }

    #[test]
    fn the_rdp_approaches_the_gaussians_as_the_noise_grows() {
        let (l2, l1) = sensitivity(1000.0, 10_000);
        for z in [0.5, 1.0, 4.0] {
            let variance = (z * l2).powi(2);
            for alpha in [2.0, 8.0, 32.0] {
                let gaussian = alpha / (2.0 * z * z);
                let r = skellam_rdp(alpha, l1, l2, variance);
                assert!(r >= gaussian && r < gaussian * 1.01, "z {z} α {alpha}: {r}");
            }
        }
    }

    #[test]
    fn subsampling_lowers_the_rdp_and_never_raises_it() {
        let (l2, l1) = sensitivity(32767.0, 100_000);
        let v = (l2 * 1.0f64).powi(2);
        let orders: Vec<f64> = vec![1.5, 2.0, 3.0, 10.0, 64.0];
        let full = subsampled_skellam_rdp(1.0, l1, l2, v, &orders).unwrap();
        let sampled = subsampled_skellam_rdp(0.01, l1, l2, v, &orders).unwrap();
        assert!(full[0].is_infinite() && sampled[0].is_infinite());
        for (f, s) in full.iter().zip(&sampled).skip(1) {
            assert!(s <= f && *s > 0.0, "{s} vs {f}");
        }
        assert!(sampled[1] < full[1] / 100.0);
        assert!(subsampled_skellam_rdp(1.5, l1, l2, v, &orders).is_err());
        assert!(subsampled_skellam_rdp(0.5, l1, l2, 0.0, &orders).is_err());
    }

    #[test]
    fn devices_share_the_central_noise() {
        let d = DistributedSkellam::new(32767.0, 10_000, 1.2, 8);
        assert!((d.noise_multiplier(8) - 1.2).abs() < 1e-12);
        assert!(d.noise_multiplier(16) > 1.2);
        assert!((d.variance(8) - (1.2 * d.l2).powi(2)).abs() / d.variance(8) < 1e-12);
    }
}
