//! FedAdagrad (Reddi et al. 2021, Algorithm 2): the adaptive server step shared in
//! `adaptive.rs`, with the second moment v = v + Δ² (β2 is not used).

use super::adaptive::{adaptive_strategy, Rule};

adaptive_strategy!(
    /// FedAdagrad: m = β1 m + (1 − β1) Δ;
    /// the second moment v = v + Δ² (β2 is not used);
    /// x = x + η m / (√v + τ). m and v are its server state.
    FedAdagrad,
    "fedadagrad",
    Rule::Adagrad
);

#[cfg(test)]
mod tests {
    use super::super::adaptive::check_adaptive;
    use super::super::adaptive::AdaptiveParams;
    use super::super::test_support::MEANS;
    use super::*;

    /// Algorithm 2 written out per coordinate with plain scalars, from x = 0: the
    /// parameters after each of the three rounds.
    fn by_hand(p: AdaptiveParams) -> Vec<[f32; 3]> {
        let (mut m, mut v, mut x) = ([0.0f64; 3], [p.tau * p.tau; 3], [0.0f32; 3]);
        MEANS
            .iter()
            .map(|d| {
                for i in 0..3 {
                    m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * d[i];
                    v[i] += d[i] * d[i];
                    x[i] = (f64::from(x[i]) + p.server_lr * m[i] / (v[i].sqrt() + p.tau)) as f32;
                }
                x
            })
            .collect()
    }

    /// The first step by hand, from x = 0 with Δ1 = (2.5, 1, 0.5) and the defaults (η 0.01,
    /// β1 0.9, τ 0.001): m = 0.1 Δ1 = (0.25, 0.1, 0.05); v = τ² + Δ1² = (6.250001, 1.000001,
    /// 0.250001); step = η m / (√v + τ), e.g. 0.0025 / (2.5000002 + 0.001) = 9.996e-4.
    /// Then three rounds against [`by_hand`], with the defaults and with other values.
    #[test]
    fn the_update_rule_matches_a_step_by_hand_and_its_state_survives() {
        check_adaptive(
            FedAdagrad::new,
            FedAdagrad::params,
            "fedadagrad",
            [9.996000800000e-04, 9.990004999999e-04, 9.980019999980e-04],
            by_hand,
        );
    }
}
