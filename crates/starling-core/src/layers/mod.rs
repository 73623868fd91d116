//! Layers of the built-in trainer, each with a forward and a backward pass over a batch stored
//! row-major (`n` rows of `width` values).
//!
//! - [`dense`]: fully connected `y = x W + b` on a GEMM kernel ([`gemm`]).
//! - [`activation`]: element-wise ReLU, sigmoid and tanh.

pub mod activation;
pub mod dense;
pub mod gemm;
