//! Optimisers. Plain SGD (the original demo's `GradientDescentOptimizer`), with optional
//! momentum and an optional FedProx proximal term.

use crate::wire::params::Parameters;

/// Stochastic gradient descent: `v = momentum v + g; p -= lr v` (plain `p -= lr g` when
/// momentum is 0).
///
/// With a proximal term ([`Sgd::with_proximal`], FedProx, Li et al. 2020) the loss gains
/// `(mu / 2) ||p - anchor||²`, so every step's gradient is `g + mu (p - anchor)`. With `mu`
/// 0 there is no proximal term and the steps are exactly plain SGD's.
#[derive(Debug, Clone)]
pub struct Sgd {
    learning_rate: f32,
    momentum: f32,
    velocity: Option<Parameters>,
    proximal: Option<(f32, Parameters)>,
}

impl Sgd {
    /// A new optimiser.
    pub fn new(learning_rate: f32, momentum: f32) -> Self {
        Self {
            learning_rate,
            momentum,
            velocity: None,
            proximal: None,
        }
    }

    /// Adds the proximal term `(mu / 2) ||p - anchor||²` to the loss (`anchor`: the
    /// parameters local training started from, in the layout of the stepped parameters).
    /// `mu` 0 adds nothing.
    pub fn with_proximal(mut self, mu: f32, anchor: Parameters) -> Self {
        self.proximal = (mu != 0.0).then_some((mu, anchor));
        self
    }

    /// The learning rate when the steps are plain `p -= lr g` (no momentum, no proximal
    /// term), which [`crate::Model::train_step`] can then fuse with the backward pass.
    pub fn plain_learning_rate(&self) -> Option<f32> {
        (self.momentum == 0.0 && self.proximal.is_none()).then_some(self.learning_rate)
    }

    /// One step of `params` along `grads` (same layout), plus the proximal term if any.
    pub fn step(&mut self, params: &mut Parameters, grads: &Parameters) {
        let Some((mu, anchor)) = &self.proximal else {
            return self.descend(params, grads);
        };
        let (lr, momentum, mu) = (self.learning_rate, self.momentum, *mu);
        if momentum == 0.0 {
            for ((p, (_, g)), (_, a)) in params.tensors_mut().zip(grads.iter()).zip(anchor.iter()) {
                for ((pv, gv), av) in p.data_mut().iter_mut().zip(g.data()).zip(a.data()) {
                    let total = gv + mu * (*pv - av);
                    *pv -= lr * total;
                }
            }
            return;
        }
        let velocity = self
            .velocity
            .get_or_insert_with(|| Parameters::zeros(&grads.layout()));
        for (((p, v), (_, g)), (_, a)) in params
            .tensors_mut()
            .zip(velocity.tensors_mut())
            .zip(grads.iter())
            .zip(anchor.iter())
        {
            for (((pv, vv), gv), av) in p
                .data_mut()
                .iter_mut()
                .zip(v.data_mut())
                .zip(g.data())
                .zip(a.data())
            {
                let total = gv + mu * (*pv - av);
                *vv = momentum * *vv + total;
                *pv -= lr * *vv;
            }
        }
    }

    /// Plain SGD (with momentum if any): `params` down `grads`.
    fn descend(&mut self, params: &mut Parameters, grads: &Parameters) {
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
