//! Starling's core: everything a server, a device and a simulation share, with no I/O beyond
//! byte slices and no async runtime (it builds for `wasm32-unknown-unknown`).
//!
//! The crate is six rooms and the tensor they share:
//! - [`trainer`]: the lean built-in trainer: model specs and the built-in models, layers with
//!   forward and backward passes, losses, SGD, and the local training loop (`local_update`).
//! - [`wire`]: what crosses the network: the HTTP protocol's types and error codes, the
//!   safetensors codec of named tensors, the update format and its validation into a
//!   `CheckedUpdate`, and the served checkpoint.
//! - [`aggregate`]: the streaming weighted sum, its vectorised kernel, and the strategies
//!   (one a file) that turn a sum into the next model.
//! - [`privacy`]: differential privacy's Rényi-DP accountant for the subsampled Gaussian
//!   mechanism (the ε a task spends), checked against Google's `dp-accounting`.
//! - [`secagg`]: secure aggregation (SecAgg+): the device's and the server's state machines,
//!   fixed-point inputs in a ring, Shamir shares, the sparse neighbourhood graph.
//! - [`data`]: in-memory data sets and CSV parsing, the MNIST / Fashion-MNIST and
//!   Shakespeare loaders, and the partitions of a data set over simulated devices.
//! - [`tensor`]: a dense row-major f32 tensor.

pub mod aggregate;
pub mod data;
pub mod privacy;
pub mod secagg;
pub mod tensor;
pub mod trainer;
pub mod wire;

pub use aggregate::{FedAvg, Strategy, WeightedSum};
pub use data::Dataset;
pub use tensor::Tensor;
pub use trainer::model::Model;
pub use trainer::spec::ModelSpec;
pub use trainer::train::{Conditions, Plan, Requirements, TrainReport};
pub use wire::params::{Layout, Parameters};
pub use wire::update::{CheckedUpdate, UpdateMeta, UpdateView};
