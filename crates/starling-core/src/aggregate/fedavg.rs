//! Federated averaging (McMahan et al. 2017), the default [`Strategy`], with a server
//! learning rate: the next model is the base plus `server_lr` times the weighted mean update.
//! With `server_lr` 1 (the default) that is the weighted mean of the devices' models. No
//! server state.

use super::{apply, AggregateError, Strategy, WeightedSum};
use crate::wire::params::Parameters;

/// Federated averaging with a server learning rate: `x + server_lr * Δ`, with Δ the weighted
/// mean update. `FedAvg::default()` has `server_lr` 1: plain FedAvg.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvg {
    /// The server learning rate (1: plain FedAvg).
    pub server_lr: f64,
}

impl Default for FedAvg {
    fn default() -> Self {
        Self { server_lr: 1.0 }
    }
}

impl FedAvg {
    /// Federated averaging with server learning rate `server_lr`.
    pub fn new(server_lr: f64) -> Self {
        Self { server_lr }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }
    fn next_params(
        &mut self,
        base: &Parameters,
        aggregate: &WeightedSum,
    ) -> Result<Parameters, AggregateError> {
        let lr = self.server_lr;
        let mean = aggregate.mean()?;
        apply(base, aggregate.layout(), mean.into_iter().map(|d| lr * d))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{aggregate, params, values};
    use super::*;

    /// `x + lr * Δ` per round, with Δ the example-weighted mean of the round's updates, over
    /// three rounds; with lr 1 the step is the plain mean (today's FedAvg).
    #[test]
    fn the_step_is_the_learning_rate_times_the_weighted_mean() {
        let rounds: [&[(&[f32], u64)]; 3] = [
            &[(&[1.0, -2.0, 0.5], 1), (&[3.0, 2.0, 0.5], 3)],
            &[(&[-1.0, 0.0, 4.0], 2), (&[1.0, 1.0, 0.0], 2)],
            &[(&[0.25, 0.5, -0.75], 5)],
        ];
        // Weighted means by hand: (1*1 + 3*3)/4 = 2.5, (-2 + 6)/4 = 1, 0.5; then 0, 0.5, 2;
        // then 0.25, 0.5, -0.75.
        let means = [[2.5, 1.0, 0.5], [0.0, 0.5, 2.0], [0.25, 0.5, -0.75]];
        for lr in [1.0, 0.5] {
            let mut s = FedAvg::new(lr);
            let mut x = params(&[1.0, 2.0, 3.0]);
            let mut want = [1.0f64, 2.0, 3.0];
            for (round, mean) in rounds.iter().zip(means) {
                x = s.next_params(&x, &aggregate(round)).unwrap();
                for i in 0..3 {
                    want[i] = f64::from((want[i] + lr * mean[i]) as f32);
                }
                assert_eq!(values(&x), want.map(|w| w as f32), "lr {lr}");
            }
        }
        assert_eq!(FedAvg::default(), FedAvg::new(1.0));
    }

    #[test]
    fn fedavg_keeps_no_state() {
        let mut s = FedAvg::default();
        assert!(s.state().is_empty());
        s.restore(&[]).unwrap();
        assert!(matches!(s.restore(&[1]), Err(AggregateError::State(_))));
    }
}
