//! Starling's benchmarks, run by `starling bench …`. Figures are printed with the machine they
//! ran on; comparisons are ratios measured side by side in one run, because the machines are
//! shared and noisy.
//!
//! - [`machine`]: what machine this is, and a process's peak memory.
//! - [`aggregate`]: the streaming aggregator against `memcpy` of the same bytes.
//! - [`server`]: a `starling serve` child process to measure from outside.
//! - [`ingest`]: N devices uploading valid updates over HTTP; throughput, latency, memory.
//! - [`checkin`]: thousands of concurrent check-ins against a small goal.
//! - [`secagg`]: whole SecAgg+ rounds in process: communication expansion, device and server
//!   CPU time.
//! - [`soak`]: honest devices, aborted and malformed uploads and slow clients at once for a
//!   fixed time; rounds committed and stuck, refusals by reason, server memory over time.

pub mod aggregate;
pub mod checkin;
pub mod ingest;
pub mod machine;
pub mod secagg;
pub mod server;
pub mod soak;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Local I/O failed (temporary files, the server process).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An HTTP request failed.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered something unexpected.
    #[error("server: {0}")]
    Server(String),
    /// The arguments do not make a run.
    #[error("{0}")]
    Usage(String),
}

/// The `q`-quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
