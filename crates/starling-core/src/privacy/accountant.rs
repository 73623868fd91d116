//! The Rényi-DP accountant of the Poisson-subsampled Gaussian mechanism.
//!
//! One step of the mechanism samples each record (a device) with probability q and adds
//! Gaussian noise of standard deviation z times the sensitivity (the clipping bound) to the
//! sum of what the sampled records contributed. Its Rényi differential privacy at order α is
//! computed as in Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled
//! Gaussian Mechanism" (arXiv:1908.10530): for integer α the finite binomial sum of their
//! Section 3.2, for fractional α the two-sided series of Section 3.3, both in log space; q = 1
//! is the plain Gaussian mechanism, α / (2 z²). RDP adds up over steps (Mironov 2017,
//! Proposition 1), and the total converts to (ε, δ) with the bound of Balle et al. 2020
//! ("Hypothesis Testing Interpretations and Renyi Differential Privacy", Proposition 12; also
//! Canonne, Kamath and Steinke 2020, equation 20), minimised over the orders.
//!
//! Every step follows Google's `dp-accounting` 0.6.0, `dp_accounting/rdp/rdp_privacy_accountant.py`
//! (`_compute_log_a_int`, `_compute_log_a_frac`, `_compute_rdp_poisson_subsampled_gaussian`,
//! `compute_epsilon`, `DEFAULT_RDP_ORDERS`), including its quirks, so that the numbers are the
//! same: the fractional series stops after 1000 terms, and an order whose series has not
//! converged by then counts as infinite (it is left out of the minimum); ε is 0 at an order
//! whose RDP is below the KL-divergence bound δ ≤ √(1 − e^(−RDP)). Two deliberate
//! differences, both on the conservative side and unreachable with sane inputs: a step's RDP
//! that rounding made negative counts as 0 (which gives the same ε), and one that came out
//! NaN counts as infinite.

use serde::{Deserialize, Serialize};

/// The largest order a (saved) accountant may carry: an integer order α costs α + 1 terms.
const MAX_ORDER: f64 = 10_000.0;

/// Terms of the fractional-order series before an order is given up on (dp-accounting's
/// `_MAX_STEPS_LOG_A_FRAC`).
const MAX_STEPS_LOG_A_FRAC: u32 = 1000;

/// How close [`noise_multiplier_for`] comes to the smallest noise multiplier that meets the
/// budget: the bisection stops once its bracket is at most this wide (absolute, in units of
/// the noise multiplier; dp-accounting's `calibrate_dp_mechanism` default).
pub const NOISE_MULTIPLIER_TOLERANCE: f64 = 1e-6;

/// The largest noise multiplier [`noise_multiplier_for`] tries: 2^30, the range
/// dp-accounting's bracket search gives up beyond.
const MAX_NOISE_MULTIPLIER: f64 = (1u64 << 30) as f64;

/// Invalid input to the accountant.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// The sampling rate is not in [0, 1].
    #[error("the sampling rate must be in [0, 1], got {0}")]
    SamplingRate(f64),
    /// The noise multiplier is not positive and finite.
    #[error("the noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    /// δ is not in (0, 1).
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    /// A clip bound that is not positive and finite.
    #[error("the clip bound must be positive and finite, got {0}")]
    Clip(f64),
    /// A target ε that is not positive and finite.
    #[error("the target epsilon must be positive and finite, got {0}")]
    Epsilon(f64),
    /// Planning noise for a run that releases nothing (sampling rate 0 or no steps).
    #[error("with a sampling rate of 0 or no steps nothing is released: any noise multiplier meets the budget")]
    NothingReleased,
    /// No noise multiplier up to the search's limit reaches the target ε.
    #[error("no noise multiplier up to {max} brings epsilon down to {epsilon}")]
    Unreachable {
        /// The target ε.
        epsilon: f64,
        /// The largest noise multiplier tried.
        max: f64,
    },
    /// Orders and RDP values of different lengths, or unusable orders or values.
    #[error("unusable accountant state: {0}")]
    State(String),
}

/// dp-accounting's default orders (`DEFAULT_RDP_ORDERS`): 1.1 to 10.9 by tenths, the integers
/// 11 to 63, then 128, 256, 512 and 1024; 156 orders.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// A Rényi-DP accountant: the RDP spent so far at each of a fixed set of orders.
///
/// It starts at zero ([`RdpAccountant::new`]), grows with every composed mechanism
/// ([`RdpAccountant::compose_subsampled_gaussian`]) and converts to ε at a δ
/// ([`RdpAccountant::epsilon`]). It serialises (serde) as `{"orders": [...], "rdp": [...]}`,
/// an infinite RDP as the string `"inf"`; deserialising checks the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SavedAccountant", into = "SavedAccountant")]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An accountant over [`default_orders`] that has spent nothing.
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Adds `steps` steps of the Poisson-subsampled Gaussian mechanism with sampling rate
    /// `sampling_rate` (q, in [0, 1]) and noise multiplier `noise_multiplier` (z, the noise's
    /// standard deviation over the sensitivity; positive and finite). On an error nothing is
    /// added.
    pub fn compose_subsampled_gaussian(
        &mut self,
        sampling_rate: f64,
        noise_multiplier: f64,
        steps: u64,
    ) -> Result<(), PrivacyError> {
        let step = subsampled_gaussian_rdp(sampling_rate, noise_multiplier, &self.orders)?;
        let steps = steps as f64;
        for (total, one) in self.rdp.iter_mut().zip(step) {
            *total += steps * one;
        }
        Ok(())
    }

    /// Adds one step of any mechanism whose RDP at [`RdpAccountant::orders`] is `step` (e.g.
    /// [`DistributedSkellam::rdp`](super::DistributedSkellam::rdp)). On an error nothing is
    /// added.
    pub fn compose_rdp(&mut self, step: &[f64]) -> Result<(), PrivacyError> {
        if step.len() != self.rdp.len() {
            return Err(PrivacyError::State(format!(
                "{} RDP values for {} orders",
                step.len(),
                self.rdp.len()
            )));
        }
        if let Some(r) = step.iter().find(|r| r.is_nan() || **r < 0.0) {
            return Err(PrivacyError::State(format!(
                "RDP value {r} is negative or not a number"
            )));
        }
        for (total, one) in self.rdp.iter_mut().zip(step) {
            *total += one;
        }
        Ok(())
    }

    /// The ε spent so far at `delta` (in (0, 1)): the smallest over the orders.
    pub fn epsilon(&self, delta: f64) -> Result<f64, PrivacyError> {
        Ok(self.epsilon_and_order(delta)?.0)
    }

    /// The ε spent so far at `delta`, and the order that gives it.
    pub fn epsilon_and_order(&self, delta: f64) -> Result<(f64, f64), PrivacyError> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// The RDP spent so far at each order (as [`RdpAccountant::orders`]).
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// The orders α the accountant tracks.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }
}

/// The serialised form of an [`RdpAccountant`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedAccountant {
    orders: Vec<f64>,
    rdp: Vec<SavedRdp>,
}

/// One RDP value: a number, or the string `"inf"` (JSON has no infinity).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SavedRdp {
    Finite(f64),
    Infinite(Infinity),
}

/// Serialises as the string `"inf"`.
#[derive(Serialize, Deserialize)]
enum Infinity {
    #[serde(rename = "inf")]
    Inf,
}

impl From<RdpAccountant> for SavedAccountant {
    fn from(a: RdpAccountant) -> Self {
        let rdp = a
            .rdp
            .into_iter()
            .map(|r| {
                if r.is_finite() {
                    SavedRdp::Finite(r)
                } else {
                    SavedRdp::Infinite(Infinity::Inf)
                }
            })
            .collect();
        Self {
            orders: a.orders,
            rdp,
        }
    }
}

impl TryFrom<SavedAccountant> for RdpAccountant {
    type Error = PrivacyError;

    fn try_from(saved: SavedAccountant) -> Result<Self, PrivacyError> {
        if saved.orders.len() != saved.rdp.len() {
            return Err(PrivacyError::State(format!(
                "{} orders but {} RDP values",
                saved.orders.len(),
                saved.rdp.len()
            )));
        }
        if let Some(a) = saved.orders.iter().find(|&&a| !(a > 1.0 && a <= MAX_ORDER)) {
            return Err(PrivacyError::State(format!(
                "order {a} is not in (1, {MAX_ORDER}]"
            )));
        }
        let rdp: Vec<f64> = saved
            .rdp
            .into_iter()
            .map(|r| match r {
                SavedRdp::Finite(r) => r,
                SavedRdp::Infinite(Infinity::Inf) => f64::INFINITY,
            })
            .collect();
        if let Some(r) = rdp.iter().find(|&&r| r.is_nan() || r < 0.0) {
            return Err(PrivacyError::State(format!(
                "RDP value {r} is negative or not a number"
            )));
        }
        Ok(Self {
            orders: saved.orders,
            rdp,
        })
    }
}

/// ε after `steps` steps of the Poisson-subsampled Gaussian mechanism (sampling rate q,
/// noise multiplier z) at `delta`, over the default orders: dp-accounting's
/// `RdpAccountant().compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)
/// .get_epsilon(delta)`.
pub fn epsilon(
    sampling_rate: f64,
    noise_multiplier: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, PrivacyError> {
    check_delta(delta)?;
    let mut accountant = RdpAccountant::new();
    accountant.compose_subsampled_gaussian(sampling_rate, noise_multiplier, steps)?;
    accountant.epsilon(delta)
}

/// The smallest noise multiplier z (to within [`NOISE_MULTIPLIER_TOLERANCE`]) with which
/// `steps` steps at sampling rate `sampling_rate` spend at most `epsilon` at `delta`, over the
/// default orders.
///
/// As dp-accounting's `calibrate_dp_mechanism` (and TF-Privacy's `compute_noise`) do, it
/// brackets the answer by doubling (z = 1, 2, 4, … up to 2^30) and then bisects until the
/// bracket is at most [`NOISE_MULTIPLIER_TOLERANCE`] wide. It answers the bracket's upper
/// end, so [`epsilon`] of the answer is at most `epsilon` (the budget holds), while some noise
/// multiplier less than the tolerance below it spends more.
pub fn noise_multiplier_for(
    epsilon: f64,
    delta: f64,
    sampling_rate: f64,
    steps: u64,
) -> Result<f64, PrivacyError> {
    if !(epsilon > 0.0 && epsilon.is_finite()) {
        return Err(PrivacyError::Epsilon(epsilon));
    }
    check_delta(delta)?;
    check_sampling_rate(sampling_rate)?;
    if sampling_rate == 0.0 || steps == 0 {
        return Err(PrivacyError::NothingReleased);
    }
    let spends_too_much = |z: f64| -> Result<bool, PrivacyError> {
        Ok(self::epsilon(sampling_rate, z, steps, delta)? > epsilon)
    };
    // Invariant: `lo` spends more than the budget (z = 0 spends everything), `hi` does not.
    let (mut lo, mut hi) = (0.0, 1.0);
    while spends_too_much(hi)? {
        if hi >= MAX_NOISE_MULTIPLIER {
            return Err(PrivacyError::Unreachable {
                epsilon,
                max: MAX_NOISE_MULTIPLIER,
            });
        }
        lo = hi;
        hi *= 2.0;
    }
    while hi - lo > NOISE_MULTIPLIER_TOLERANCE {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if spends_too_much(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

/// The RDP of one step of the Poisson-subsampled Gaussian mechanism at each of `orders`
/// (dp-accounting's `_compute_rdp_poisson_subsampled_gaussian`). An order whose
/// fractional-order series does not converge gets an infinite RDP, as in dp-accounting.
pub fn subsampled_gaussian_rdp(
    sampling_rate: f64,
    noise_multiplier: f64,
    orders: &[f64],
) -> Result<Vec<f64>, PrivacyError> {
    check_sampling_rate(sampling_rate)?;
    if !(noise_multiplier > 0.0 && noise_multiplier.is_finite()) {
        return Err(PrivacyError::NoiseMultiplier(noise_multiplier));
    }
    if let Some(a) = orders.iter().find(|&&a| !(a > 1.0 && a <= MAX_ORDER)) {
        return Err(PrivacyError::State(format!(
            "order {a} is not in (1, {MAX_ORDER}]"
        )));
    }
    Ok(orders
        .iter()
        .map(|&alpha| {
            let r = rdp_one_order(sampling_rate, noise_multiplier, alpha);
            if r.is_nan() {
                f64::INFINITY
            } else {
                r.max(0.0)
            }
        })
        .collect())
}

/// The smallest ε over the orders for RDP values `rdp` at `orders`, at `delta`, and the order
/// that gives it (dp-accounting's `compute_epsilon`: Balle et al. 2020, Proposition 12, for
/// orders above 1.01, and ε = 0 where the RDP is below the KL-divergence bound).
pub fn epsilon_from_rdp(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<(f64, f64), PrivacyError> {
    check_delta(delta)?;
    if orders.len() != rdp.len() || orders.is_empty() {
        return Err(PrivacyError::State(format!(
            "{} orders and {} RDP values",
            orders.len(),
            rdp.len()
        )));
    }
    let mut best = (f64::INFINITY, orders[0]);
    for (i, (&a, &r)) in orders.iter().zip(rdp).enumerate() {
        if a.is_nan() || a < 1.0 {
            return Err(PrivacyError::State(format!("order {a} is below 1")));
        }
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        // The first smallest, as numpy's argmin.
        if i == 0 || eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

fn check_sampling_rate(q: f64) -> Result<(), PrivacyError> {
    if (0.0..=1.0).contains(&q) {
        Ok(())
    } else {
        Err(PrivacyError::SamplingRate(q))
    }
}

fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::Delta(delta))
    }
}

/// One step's RDP at one order (`compute_one_order`); q in [0, 1], z > 0, α > 1.
fn rdp_one_order(q: f64, z: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * (z * z));
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, z, alpha as u64)
    } else {
        log_a_frac(q, z, alpha)
    };
    log_a / (alpha - 1.0)
}

/// log(exp(x) + exp(y)) (`_log_add`).
pub(super) fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// The log of the (generalised) binomial coefficient's absolute value (`_log_comb`, with
/// log|Γ| as scipy's `gammaln`).
pub(super) fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log A_α for integer α, 0 < q < 1 (`_compute_log_a_int`; Mironov et al. 2019, Section 3.2).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let log_q = q.ln();
    let two_var = 2.0 * (sigma * sigma);
    let a = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let log_coef_i = log_comb(a, i) + i * log_q + (a - i) * log1mq;
        let s = log_coef_i + (i * i - i) / two_var;
        log_a = log_add(log_a, s);
    }
    log_a
}

/// log A_α for fractional α, 0 < q < 1 (`_compute_log_a_frac`; Mironov et al. 2019, Section
/// 3.3): the two halves of the integral, split at z0, as series summed until both terms fall
/// and are 30 nats below the total; infinite when that has not happened in 1000 terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let var = sigma * sigma;
    let z0 = var * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let log_q = q.ln();
    let log_half = 0.5f64.ln();
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = f64::from(i);
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;

        let log_t0 = log_coef + i * log_q + j * log1mq;
        let log_t1 = log_coef + j * log_q + i * log1mq;

        let log_e0 = log_half + log_erfc((i - z0) / sqrt2_sigma);
        let log_e1 = log_half + log_erfc((z0 - j) / sqrt2_sigma);

        let log_s0 = log_t0 + (i * i - i) / (2.0 * var) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * var) + log_e1;

        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);

        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// log(erfc(x)), accurate far into the tail (`_log_erfc`: ln 2 + scipy's `log_ndtr(−x√2)`).
/// Up to x = 20/√2 (erfc ≈ 1e−88) the logarithm of musl's `erfc`; beyond, the asymptotic
/// series that Cephes' `log_ndtr` uses below −20:
/// erfc(x) ≈ e^(−x²) / (x√π) · Σ (−1)^k (2k − 1)!! / (2x²)^k.
fn log_erfc(x: f64) -> f64 {
    let a = -x * std::f64::consts::SQRT_2;
    if a > -20.0 {
        return libm::erfc(x).ln();
    }
    let log_lhs = -0.5 * a * a - (-a).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln();
    let denom_cons = 1.0 / (a * a);
    let (mut rhs, mut last, mut numerator, mut denom_factor, mut sign) =
        (1.0f64, 0.0f64, 1.0f64, 1.0f64, 1.0f64);
    let mut i = 0.0;
    while (last - rhs).abs() > f64::EPSILON && i < 100.0 {
        i += 1.0;
        last = rhs;
        sign = -sign;
        denom_factor *= denom_cons;
        numerator *= 2.0 * i - 1.0;
        rhs += sign * numerator * denom_factor;
    }
    std::f64::consts::LN_2 + log_lhs + rhs.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_erfc_is_continuous_where_it_switches_to_the_series() {
        let x = 20.0 / std::f64::consts::SQRT_2;
        let below = libm::erfc(x - 1e-9).ln();
        let above = log_erfc(x + 1e-9);
        assert!(
            (below - above).abs() < 1e-9 * below.abs(),
            "{below} {above}"
        );
        // Far in the tail, where erfc itself underflows: −x² − ln x − ln √π, nearly.
        let x = 40.0f64;
        let leading = -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln();
        assert!((log_erfc(x) - leading).abs() < 1e-3, "{}", log_erfc(x));
        assert!(log_erfc(-40.0) == std::f64::consts::LN_2);
    }

    #[test]
    fn log_add_adds_in_log_space() {
        assert_eq!(log_add(f64::NEG_INFINITY, 1.5), 1.5);
        assert!((log_add(2f64.ln(), 3f64.ln()) - 5f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn the_binomial_sum_at_order_two_has_a_closed_form() {
        // A_2 = (1 − q)² + 2q(1 − q) + q² e^(1/σ²) = 1 + q² (e^(1/σ²) − 1).
        let (q, sigma) = (0.01f64, 1.3f64);
        let exact = (q * q * (1.0 / (sigma * sigma)).exp_m1()).ln_1p();
        assert!((log_a_int(q, sigma, 2) - exact).abs() < 1e-12 * exact);
    }

    #[test]
    fn the_fractional_series_lies_between_its_integer_neighbours() {
        // log A_α / (α − 1) grows with α.
        let (q, sigma) = (0.01, 1.0);
        let r = |a: f64| rdp_one_order(q, sigma, a);
        assert!(
            r(2.0) < r(2.5) && r(2.5) < r(3.0),
            "{} {} {}",
            r(2.0),
            r(2.5),
            r(3.0)
        );
    }

    #[test]
    fn default_orders_are_dp_accountings() {
        let orders = default_orders();
        assert_eq!(orders.len(), 156);
        assert_eq!(orders[0], 1.1);
        assert_eq!(orders[9], 2.0);
        assert_eq!(orders[98], 10.9);
        assert_eq!(orders[99], 11.0);
        assert_eq!(orders[155], 1024.0);
    }
}
