//! FedAdam (Reddi et al. 2021, Algorithm 2): the adaptive server step shared in
//! `adaptive.rs`, with the second moment v = β2 v + (1 − β2) Δ².

use super::adaptive::{adaptive_strategy, Rule};

adaptive_strategy!(
    /// FedAdam: m = β1 m + (1 − β1) Δ;
    /// the second moment v = β2 v + (1 − β2) Δ²;
    /// x = x + η m / (√v + τ). m and v are its server state.
    FedAdam,
    "fedadam",
    Rule::Adam
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
                    v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * d[i] * d[i];
                    x[i] = (f64::from(x[i]) + p.server_lr * m[i] / (v[i].sqrt() + p.tau)) as f32;
                }
                x
            })
            .collect()
    }

    /// The first step by hand, from x = 0 with Δ1 = (2.5, 1, 0.5) and the defaults (η 0.01,
    /// β1 0.9, β2 0.99, τ 0.001): m = 0.1 Δ1 = (0.25, 0.1, 0.05); v = 0.99 τ² + 0.01 Δ1² =
    /// (0.06250099, 0.01000099, 0.00250099); step = η m / (√v + τ), e.g.
    /// 0.0025 / (0.25000198 + 0.001) = 9.96008e-3.
    /// Then three rounds against [`by_hand`], with the defaults and with other values.
    #[test]
    fn the_update_rule_matches_a_step_by_hand_and_its_state_survives() {
        check_adaptive(
            FedAdam::new,
            FedAdam::params,
            "fedadam",
            [9.960080793299e-03, 9.900504888254e-03, 9.802019012095e-03],
            by_hand,
        );
    }
}
