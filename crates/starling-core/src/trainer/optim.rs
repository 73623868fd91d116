//! Optimisers. Plain SGD (the original demo's `GradientDescentOptimizer`), with optional
//! momentum.

use crate::wire::params::Parameters;

/// Stochastic gradient descent: `v = momentum v + g; p -= lr v` (plain `p -= lr g` when
/// momentum is 0).
#[derive(Debug, Clone)]
pub struct Sgd {
    learning_rate: f32,
    momentum: f32,
    velocity: Option<Parameters>,
}

impl Sgd {
    /// A new optimiser.
    pub fn new(learning_rate: f32, momentum: f32) -> Self {
        Self {
            learning_rate,
            momentum,
            velocity: None,
        }
    }

    /// One step of `params` along `grads` (same layout).
    pub fn step(&mut self, params: &mut Parameters, grads: &Parameters) {
        let lr = self.learning_rate;
        if self.momentum == 0.0 {
            for (p, (_, g)) in params.tensors_mut().zip(grads.iter()) {
                for (pv, gv) in p.data_mut().iter_mut().zip(g.data()) {
                    *pv -= lr * gv;
                }
            }
            return;
        }
        let momentum = self.momentum;
        let velocity = self
            .velocity
            .get_or_insert_with(|| Parameters::zeros(&grads.layout()));
        for ((p, v), (_, g)) in params
            .tensors_mut()
            .zip(velocity.tensors_mut())
            .zip(grads.iter())
        {
            for ((pv, vv), gv) in p.data_mut().iter_mut().zip(v.data_mut()).zip(g.data()) {
                *vv = momentum * *vv + gv;
                *pv -= lr * *vv;
            }
        }
    }
}
