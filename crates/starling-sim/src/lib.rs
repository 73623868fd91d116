//! Simulation: N virtual devices, each with its own partition of a data set, driving the real
//! round engine of `starling-server` in one process (DESIGN.md invariant 5: only the transport
//! and the clock differ).
//!
//! - [`data`]: loading MNIST-style IDX folders, CSV files and Shakespeare-by-role JSON from
//!   any path, and partitioning (IID, label shards, Dirichlet; natural for Shakespeare).
//! - [`federation`]: the devices' data (partitions of a training set) and the held-out test set.
//! - [`sim`]: the simulation loop (any server strategy, FedProx's `mu` in the plan): sampling, local training on every core, drop-outs and
//!   stragglers on a virtual clock, uploads through the engine, evaluation.
//! - [`buffered`]: buffered asynchronous mode (FedBuff): C devices always training, events in
//!   virtual-time order, a server step every K updates.
//! - [`secagg`]: `--secagg`: secure rounds through the engine's four steps, every device
//!   running the core's SecAgg+ client, with drop-outs after each step.
//! - [`latency`]: training-time distributions on the virtual clock (`--latency`).
//! - [`report`]: per-round metrics and the results files (JSON, CSV, SVG plot).
//! - [`cpu`]: the process's CPU time, for the cores a run keeps busy.

pub mod buffered;
pub mod cpu;
pub mod data;
pub mod federation;
pub mod latency;
pub mod report;
pub mod secagg;
pub mod sim;

pub use federation::Federation;
pub use latency::Latency;
pub use report::{RoundMetrics, SimReport};
pub use sim::{
    run, strategy, Buffered, Sample, SimConfig, SimPrivacy, LATENCY_DEADLINE_SECS, STRATEGIES,
};

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration is unusable.
    #[error("invalid simulation: {0}")]
    Config(String),
    /// The round engine refused something it should not have.
    #[error("round engine: {0}")]
    Engine(#[from] starling_server::engine::EngineError),
    /// Storage failed.
    #[error("store: {0}")]
    Store(#[from] starling_server::store::StoreError),
    /// Local training failed.
    #[error("training: {0}")]
    Train(#[from] starling_core::trainer::train::TrainError),
    /// Writing results failed.
    #[error("writing results: {0}")]
    Io(#[from] std::io::Error),
    /// A data file is missing or unusable.
    #[error("{0}")]
    Data(String),
    /// Drawing the plot failed.
    #[error("plot: {0}")]
    Plot(String),
}
