//! Starling's core: everything a server, a device and a simulation share, with no I/O beyond
//! byte slices and no async runtime (it builds for `wasm32-unknown-unknown`).
//!
//! Map of the crate:
//! - [`tensor`] and [`params`]: named f32 tensors and their safetensors codec.
//! - [`spec`]: the JSON model spec that travels with the weights; [`builtin`] has the
//!   built-in models (`linear`, the original demo's model, `logistic`, and the FedAvg
//!   paper's `mlp` and `cnn`).
//! - [`model`], [`layers`], [`loss`], [`optim`]: the lean built-in trainer.
//! - [`data`]: in-memory data sets and CSV parsing; [`train`]: the local training loop
//!   driven by a [`train::Plan`].
//! - [`datasets`]: loaders of MNIST / Fashion-MNIST (IDX) and Shakespeare by role, from
//!   bytes, gzip or raw; [`partition`]: splitting a data set over simulated devices (IID,
//!   label shards, Dirichlet label skew).
//! - [`checkpoint`]: the served form of a model version (spec and version in the metadata).
//! - [`update`]: the update wire format and its validation (DESIGN.md invariant 3).
//! - [`kernels`]: the vectorised aggregation kernel, dispatched on the CPU's features.
//! - [`aggregate`]: the streaming weighted sum ([`WeightedSum`]) and the [`Strategy`] hook
//!   with [`FedAvg`].
//! - [`protocol`]: the HTTP API's typed requests, answers, headers and error codes.

pub mod aggregate;
pub mod builtin;
pub mod checkpoint;
pub mod data;
pub mod datasets;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod model;
pub mod optim;
pub mod params;
pub mod partition;
pub mod protocol;
pub mod spec;
pub mod tensor;
pub mod train;
pub mod update;

pub use aggregate::{FedAvg, Strategy, WeightedSum};
pub use data::Dataset;
pub use model::Model;
pub use params::{Layout, Parameters};
pub use spec::ModelSpec;
pub use tensor::Tensor;
pub use train::{Plan, TrainReport};
pub use update::{CheckedUpdate, UpdateMeta, UpdateView};
