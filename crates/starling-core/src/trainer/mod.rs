//! The lean built-in trainer: everything a device needs to train a small model on its own
//! data (DESIGN.md keeps it to the layers such models need; it is not a general framework).
//!
//! - [`spec`]: the JSON model spec that travels with the weights; [`builtin`] has the built-in
//!   models (`linear`, the original demo's model, `logistic`, and the FedAvg paper's `mlp`
//!   and `cnn`) and their default plans.
//! - [`model`]: a spec compiled into operations with forward and backward passes;
//!   [`layers`] holds them (dense, conv2d, max-pool, activations, the GEMM wrapper).
//! - [`loss`] and [`optim`]: the losses and SGD (with momentum and FedProx's proximal term).
//! - [`train`]: the local training loop driven by a [`train::Plan`] (which the caller may
//!   stop between steps: FedProx's partial work), and `local_update`, the one function every
//!   kind of device calls.

pub mod builtin;
pub mod layers;
pub mod loss;
pub mod model;
pub mod optim;
pub mod spec;
pub mod train;
