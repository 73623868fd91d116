//! FedYogi (Reddi et al. 2021, Algorithm 2): the adaptive server step shared in
//! `adaptive.rs`, with the second moment v = v − (1 − β2) Δ² sign(v − Δ²).

use super::adaptive::{adaptive_strategy, Rule};

adaptive_strategy!(
    /// FedYogi: m = β1 m + (1 − β1) Δ;
    /// the second moment v = v − (1 − β2) Δ² sign(v − Δ²);
    /// x = x + η m / (√v + τ). m and v are its server state.
    FedYogi,
    "fedyogi",
    Rule::Yogi
);

#[cfg(test)]
mod tests {
    use super::super::adaptive::check_adaptive;
    use super::super::adaptive::AdaptiveParams;
    use super::super::test_support::{aggregate, layout, params, values, MEANS, ROUNDS};
    use super::super::Strategy;
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
                    let d2 = d[i] * d[i];
                    if v[i] > d2 {
                        v[i] -= (1.0 - p.beta2) * d2;
                    } else if v[i] < d2 {
                        v[i] += (1.0 - p.beta2) * d2;
                    }
                    x[i] = (f64::from(x[i]) + p.server_lr * m[i] / (v[i].sqrt() + p.tau)) as f32;
                }
                x
            })
            .collect()
    }

    /// The first step by hand, from x = 0 with Δ1 = (2.5, 1, 0.5) and the defaults (η 0.01,
    /// β1 0.9, β2 0.99, τ 0.001): m = 0.1 Δ1 = (0.25, 0.1, 0.05); v = τ² < Δ1², so
    /// v = τ² + 0.01 Δ1² = (0.062501, 0.010001, 0.002501) (Adam's would be 0.99 τ² + ...);
    /// step = η m / (√v + τ), e.g. 0.0025 / (0.250002 + 0.001) = 9.96008e-3.
    /// Then three rounds against [`by_hand`], with the defaults and with other values.
    #[test]
    fn the_update_rule_matches_a_step_by_hand_and_its_state_survives() {
        check_adaptive(
            FedYogi::new,
            FedYogi::params,
            "fedyogi",
            [9.960079999680e-03, 9.900499987501e-03, 9.801999800040e-03],
            by_hand,
        );
    }

    /// Yogi's v shrinks when Δ² < v (round 3's first coordinate: Δ² = 0.015625 against
    /// v ≈ 0.0625), unlike Adam's, and never moves when v = Δ² exactly.
    #[test]
    fn the_second_moment_follows_the_sign_of_v_minus_delta_squared() {
        let p = AdaptiveParams::default();
        let mut yogi = FedYogi::new(&layout(), p);
        let mut adam = super::super::FedAdam::new(&layout(), p);
        let mut x = params(&[0.0; 3]);
        let mut y = x.clone();
        for round in ROUNDS {
            x = yogi.next_params(&x, &aggregate(round)).unwrap();
            y = adam.next_params(&y, &aggregate(round)).unwrap();
        }
        assert_ne!(values(&x), values(&y));
        // v = Δ² exactly: sign 0, v stays, so with β1 0 the step is η Δ / (|Δ| + τ).
        let exact = AdaptiveParams {
            beta1: 0.0,
            tau: 0.5,
            ..p
        };
        let mut s = FedYogi::new(&layout(), exact);
        // v starts at τ² = 0.25 = Δ² for Δ = 0.5 (the third coordinate of round 1).
        let x = s
            .next_params(&params(&[0.0; 3]), &aggregate(ROUNDS[0]))
            .unwrap();
        assert_eq!(values(&x)[2], (0.01 * 0.5 / (0.5 + 0.5)) as f32);
    }
}
