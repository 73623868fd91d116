//! Federated averaging with server momentum (FedAvgM, Hsu et al. 2019): the mean update
//! drives a heavy-ball velocity, v = momentum · v + Δ, and the model moves by
//! `server_lr · v`. The velocity is the server state.

use super::{apply, state, AggregateError, Strategy, WeightedSum};
use crate::wire::params::{Layout, Parameters};

/// FedAvg with server momentum: v = momentum · v + Δ; x = x + server_lr · v (v starts at 0).
#[derive(Debug, Clone)]
pub struct FedAvgM {
    server_lr: f64,
    momentum: f64,
    velocity: Vec<f64>,
}

impl FedAvgM {
    /// A fresh optimiser (v = 0) for a model of `layout`.
    pub fn new(layout: &Layout, server_lr: f64, momentum: f64) -> Self {
        Self {
            server_lr,
            momentum,
            velocity: vec![0.0; layout.numel()],
        }
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }
    fn next_params(
        &mut self,
        base: &Parameters,
        aggregate: &WeightedSum,
    ) -> Result<Parameters, AggregateError> {
        let delta = aggregate.mean()?;
        if delta.len() != self.velocity.len() {
            return Err(AggregateError::LayoutMismatch);
        }
        let velocity: Vec<f64> = self
            .velocity
            .iter()
            .zip(&delta)
            .map(|(v, d)| self.momentum * v + d)
            .collect();
        let lr = self.server_lr;
        let next = apply(base, aggregate.layout(), velocity.iter().map(|v| lr * v))?;
        self.velocity = velocity;
        Ok(next)
    }
    fn state(&self) -> Vec<u8> {
        state::encode(self.name(), &[&self.velocity])
    }
    /// Resumes from a stored velocity; an empty state (a version stored before any step)
    /// starts afresh.
    fn restore(&mut self, saved: &[u8]) -> Result<(), AggregateError> {
        let numel = self.velocity.len();
        if saved.is_empty() {
            self.velocity = vec![0.0; numel];
            return Ok(());
        }
        let mut vectors = state::decode(self.name(), 1, numel, saved)?;
        self.velocity = vectors.pop().expect("one vector");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        aggregate, check_restore_refusals, check_state_round_trip, layout, params, values, ROUNDS,
    };
    use super::*;

    /// Three rounds by hand, lr 1 and momentum 0.9 from x = (1, 2, 3), with the mean
    /// updates Δ1 = (2.5, 1, 0.5), Δ2 = (0, 0.5, 2), Δ3 = (0.125, 0.5, -0.75):
    /// v1 = Δ1 = (2.5, 1, 0.5), x1 = (3.5, 3, 3.5);
    /// v2 = 0.9 v1 + Δ2 = (2.25, 1.4, 2.45), x2 = (5.75, 4.4, 5.95);
    /// v3 = 0.9 v2 + Δ3 = (2.15, 1.76, 1.455), x3 = (7.9, 6.16, 7.405).
    /// With lr 0.5 the same velocities move half as far.
    #[test]
    fn the_update_rule_matches_a_step_by_hand() {
        let by_hand = [[3.5, 3.0, 3.5], [5.75, 4.4, 5.95], [7.9, 6.16, 7.405]];
        let mut s = FedAvgM::new(&layout(), 1.0, 0.9);
        let mut x = params(&[1.0, 2.0, 3.0]);
        for (round, want) in ROUNDS.iter().zip(by_hand) {
            x = s.next_params(&x, &aggregate(round)).unwrap();
            for (got, want) in values(&x).iter().zip(want) {
                assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
            }
        }
        let mut half = FedAvgM::new(&layout(), 0.5, 0.9);
        let mut x = params(&[1.0, 2.0, 3.0]);
        for round in ROUNDS {
            x = half.next_params(&x, &aggregate(round)).unwrap();
        }
        // x3 = x0 + 0.5 (v1 + v2 + v3) = (1, 2, 3) + 0.5 (6.9, 4.16, 4.405).
        for (got, want) in values(&x).iter().zip([4.45, 4.08, 5.2025]) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Momentum 0 is FedAvg with the same learning rate.
        let mut plain = FedAvgM::new(&layout(), 1.0, 0.0);
        let x = plain
            .next_params(&params(&[1.0, 2.0, 3.0]), &aggregate(ROUNDS[1]))
            .unwrap();
        assert_eq!(values(&x), [1.0, 2.5, 5.0]);
    }

    #[test]
    fn the_state_survives_a_round_trip() {
        check_state_round_trip(&|| Box::new(FedAvgM::new(&layout(), 0.7, 0.9)));
        check_restore_refusals(&|l| Box::new(FedAvgM::new(l, 1.0, 0.9)), "fedavgm");
    }
}
