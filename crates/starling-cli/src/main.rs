//! `starling`: the single binary. It parses arguments, sets up logging and calls the
//! libraries; each subcommand lives in its own module.
//!
//! - [`serve`]: run a server.
//! - [`device`]: run a device against a server.
//! - [`train`]: train a built-in model on a CSV file, no server.
//! - [`demo`]: a server and 20 devices in one process on the original demo's model.
//! - [`simulate`]: many virtual devices on the real round engine, in one process.
//! - [`bench`](mod@bench): benchmarks (aggregator, HTTP ingest, check-in storms, soak,
//!   SecAgg, training speed).
//! - [`admin`]: operate a running server through its admin API (rollback).
//! - [`privacy`]: differential-privacy accounting (ε of a run, noise for a budget).
//! - [`data`]: download the experiments' data sets, checked against their known sums.

mod admin;
mod bench;
mod data;
mod demo;
mod device;
mod privacy;
mod serve;
mod simulate;
mod train;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Every freed heap block is zeroed: request buffers that held an individual update (the
/// HTTP library's read buffers among them) leave nothing behind when they are freed.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

/// Starling: federated learning in Rust.
#[derive(Parser)]
#[command(name = "starling", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a federated learning server.
    Serve(serve::Args),
    /// Run a device: train on a local CSV file and contribute updates to a server.
    Device(device::Args),
    /// Train a built-in model on a CSV file locally, without a server.
    Train(train::Args),
    /// Start a server and 20 devices in this process and train the demo's linear model.
    Demo(demo::Args),
    /// Simulate many devices on the real round engine in this process.
    Simulate(Box<simulate::Args>),
    /// Benchmarks: the aggregator alone, HTTP ingest, check-in storms, training speed.
    #[command(subcommand)]
    Bench(bench::Command),
    /// Operate a running server through its admin API (token in STARLING_ADMIN_TOKEN).
    #[command(subcommand)]
    Admin(admin::Command),
    /// Differential-privacy accounting: the ε of noised, subsampled rounds, or the noise for
    /// a budget.
    #[command(subcommand)]
    Privacy(privacy::Command),
    /// Data sets for the simulator: download them into a cache folder, checked.
    #[command(subcommand)]
    Data(data::Command),
}

fn init_tracing(default: &str) {
    let filter =
        EnvFilter::try_from_env("STARLING_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => {
            init_tracing("info");
            serve::run(a)
        }
        Command::Device(a) => {
            init_tracing("info");
            device::run(a)
        }
        Command::Train(a) => {
            init_tracing("warn");
            train::run(a)
        }
        Command::Demo(a) => {
            init_tracing("warn");
            demo::run(a)
        }
        Command::Simulate(a) => {
            init_tracing("warn");
            simulate::run(*a)
        }
        Command::Bench(c) => {
            init_tracing("warn");
            bench::run(c)
        }
        Command::Admin(c) => {
            init_tracing("warn");
            admin::run(c)
        }
        Command::Privacy(c) => {
            init_tracing("warn");
            privacy::run(c)
        }
        Command::Data(c) => {
            init_tracing("warn");
            data::run(c)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// A multi-threaded tokio runtime for the async subcommands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
