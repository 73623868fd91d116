//! Element-wise activations. Backward passes take the forward *output*, which is all each
//! derivative needs.

/// An element-wise activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    /// Applies the activation in place.
    pub fn forward(self, x: &mut [f32]) {
        match self {
            Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Sigmoid => x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
            Activation::Tanh => x.iter_mut().for_each(|v| *v = v.tanh()),
        }
    }

    /// Turns `dy` into `dx` in place, given the forward output `y`.
    pub fn backward(self, y: &[f32], dy: &mut [f32]) {
        for (g, &out) in dy.iter_mut().zip(y) {
            *g *= match self {
                Activation::Relu => {
                    if out > 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                }
                Activation::Sigmoid => out * (1.0 - out),
                Activation::Tanh => 1.0 - out * out,
            };
        }
    }
}
