//! The adaptive server optimisers of Reddi et al. 2021, "Adaptive Federated Optimization",
//! Algorithm 2, shared by [`super::FedAdagrad`], [`super::FedAdam`] and [`super::FedYogi`]:
//! with Δ the round's weighted mean update,
//!
//! - m = β1 m + (1 − β1) Δ
//! - v = v + Δ² (Adagrad), β2 v + (1 − β2) Δ² (Adam), v − (1 − β2) Δ² sign(v − Δ²) (Yogi)
//! - x = x + η m / (√v + τ)
//!
//! per coordinate, in f64. m starts at 0 and v at τ² (the paper's `v₋₁ ≥ τ²`, at its bound);
//! there is no bias correction, as in the paper.

use super::{apply, state, AggregateError, WeightedSum};
use crate::wire::params::Parameters;

/// The hyperparameters of the adaptive optimisers. `Default` gives the paper's: η 1e-2,
/// β1 0.9, β2 0.99, τ 1e-3.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveParams {
    /// The server learning rate η.
    pub server_lr: f64,
    /// The first moment's decay β1.
    pub beta1: f64,
    /// The second moment's decay β2 (FedAdam, FedYogi; FedAdagrad has none).
    pub beta2: f64,
    /// The adaptivity τ: added to √v, and v starts at τ².
    pub tau: f64,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        Self {
            server_lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

/// How the second moment v follows Δ².
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rule {
    Adagrad,
    Adam,
    Yogi,
}

/// The state and step of one adaptive optimiser.
#[derive(Debug, Clone)]
pub(super) struct Adaptive {
    name: &'static str,
    rule: Rule,
    p: AdaptiveParams,
    m: Vec<f64>,
    v: Vec<f64>,
}

/// sign(x), with sign(0) = 0.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Adaptive {
    /// A fresh optimiser for a model of `numel` parameters.
    pub(super) fn new(name: &'static str, rule: Rule, p: AdaptiveParams, numel: usize) -> Self {
        let mut a = Self {
            name,
            rule,
            p,
            m: Vec::new(),
            v: Vec::new(),
        };
        a.reset(numel);
        a
    }

    fn reset(&mut self, numel: usize) {
        self.m = vec![0.0; numel];
        self.v = vec![self.p.tau * self.p.tau; numel];
    }

    pub(super) fn name(&self) -> &'static str {
        self.name
    }

    pub(super) fn params(&self) -> AdaptiveParams {
        self.p
    }

    pub(super) fn next_params(
        &mut self,
        base: &Parameters,
        aggregate: &WeightedSum,
    ) -> Result<Parameters, AggregateError> {
        let delta = aggregate.mean()?;
        if delta.len() != self.m.len() || base.layout() != *aggregate.layout() {
            return Err(AggregateError::LayoutMismatch);
        }
        let AdaptiveParams {
            server_lr,
            beta1,
            beta2,
            tau,
        } = self.p;
        // The new moments are computed aside and adopted only once the step is applied, so
        // that a failed step leaves the state as it was.
        let mut m = self.m.clone();
        let mut v = self.v.clone();
        let mut step = Vec::with_capacity(delta.len());
        for ((d, m), v) in delta.iter().zip(&mut m).zip(&mut v) {
            let d2 = d * d;
            *m = beta1 * *m + (1.0 - beta1) * d;
            *v = match self.rule {
                Rule::Adagrad => *v + d2,
                Rule::Adam => beta2 * *v + (1.0 - beta2) * d2,
                Rule::Yogi => *v - (1.0 - beta2) * d2 * sign(*v - d2),
            };
            step.push(server_lr * *m / (v.sqrt() + tau));
        }
        let next = apply(base, aggregate.layout(), step.into_iter())?;
        self.m = m;
        self.v = v;
        Ok(next)
    }

    pub(super) fn state(&self) -> Vec<u8> {
        state::encode(self.name, &[&self.m, &self.v])
    }

    /// Resumes from a stored state; an empty one (a version stored before any step) starts
    /// afresh.
    pub(super) fn restore(&mut self, saved: &[u8]) -> Result<(), AggregateError> {
        let numel = self.m.len();
        if saved.is_empty() {
            self.reset(numel);
            return Ok(());
        }
        let mut vectors = state::decode(self.name, 2, numel, saved)?;
        self.v = vectors.pop().expect("two vectors");
        self.m = vectors.pop().expect("two vectors");
        Ok(())
    }
}

/// Declares one strategy of the Adam family: a newtype over [`Adaptive`] with its name and
/// second-moment rule, its constructor, and the [`Strategy`](super::Strategy) it forwards to
/// the shared code. Each strategy's file holds one call and its tests.
macro_rules! adaptive_strategy {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $ty(super::adaptive::Adaptive);

        impl $ty {
            /// A fresh optimiser (m = 0, v = τ²) for a model of `layout`.
            pub fn new(
                layout: &crate::wire::params::Layout,
                params: super::adaptive::AdaptiveParams,
            ) -> Self {
                Self(super::adaptive::Adaptive::new(
                    $name,
                    $rule,
                    params,
                    layout.numel(),
                ))
            }

            /// Its hyperparameters.
            pub fn params(&self) -> super::adaptive::AdaptiveParams {
                self.0.params()
            }
        }

        impl super::Strategy for $ty {
            fn name(&self) -> &'static str {
                self.0.name()
            }
            fn next_params(
                &mut self,
                base: &crate::wire::params::Parameters,
                aggregate: &super::WeightedSum,
            ) -> Result<crate::wire::params::Parameters, super::AggregateError> {
                self.0.next_params(base, aggregate)
            }
            fn state(&self) -> Vec<u8> {
                self.0.state()
            }
            fn restore(&mut self, state: &[u8]) -> Result<(), super::AggregateError> {
                self.0.restore(state)
            }
        }
    };
}
pub(super) use adaptive_strategy;

/// What every Adam-family strategy's tests check, given its constructor and its rule written
/// out by hand: the first step from x = 0 against numbers worked out on paper, three rounds
/// against the hand-written rule (bit for bit, with the defaults and with other values), and
/// the state's round trip and refusals.
#[cfg(test)]
pub(super) fn check_adaptive<S: super::Strategy + 'static>(
    new: fn(&crate::wire::params::Layout, AdaptiveParams) -> S,
    params_of: fn(&S) -> AdaptiveParams,
    name: &str,
    first_step: [f64; 3],
    by_hand: fn(AdaptiveParams) -> Vec<[f32; 3]>,
) {
    use super::test_support::{
        aggregate, check_restore_refusals, check_state_round_trip, layout, params, values, ROUNDS,
    };
    let mut s = new(&layout(), AdaptiveParams::default());
    let x = s
        .next_params(&params(&[0.0; 3]), &aggregate(ROUNDS[0]))
        .unwrap();
    for (got, want) in values(&x).iter().zip(first_step) {
        assert!((f64::from(*got) - want).abs() < 6e-10, "{got} vs {want}");
    }
    for p in [
        AdaptiveParams::default(),
        AdaptiveParams {
            server_lr: 0.1,
            beta1: 0.5,
            beta2: 0.9,
            tau: 0.01,
        },
    ] {
        let mut s = new(&layout(), p);
        assert_eq!(params_of(&s), p);
        let mut x = params(&[0.0; 3]);
        for (round, want) in ROUNDS.iter().zip(by_hand(p)) {
            x = s.next_params(&x, &aggregate(round)).unwrap();
            assert_eq!(values(&x), want, "{p:?}");
        }
    }
    let p = AdaptiveParams {
        server_lr: 0.1,
        ..AdaptiveParams::default()
    };
    check_state_round_trip(&|| Box::new(new(&layout(), p)));
    check_restore_refusals(&|l| Box::new(new(l, p)), name);
}
