//! `starling bench …`: runs the benchmarks of `starling-bench` and prints their figures as a
//! table with the machine they ran on, or as JSON (`--json`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use starling_bench::{aggregate, checkin, ingest, machine};

/// The benchmarks.
#[derive(clap::Subcommand)]
pub enum Command {
    /// The aggregator alone: folding one update into the sums, against memcpy of its bytes.
    Aggregate {
        /// Parameter counts (e.g. 1e4,1e6,1e7).
        #[arg(long, value_delimiter = ',', value_parser = count, default_value = "1e4,1e6,1e7")]
        params: Vec<usize>,
        /// Seconds of measurement per parameter count.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// N devices upload updates of P parameters over HTTP, C at a time.
    Ingest {
        /// Parameters per update.
        #[arg(long, value_parser = count, default_value = "1e6")]
        params: usize,
        /// Devices (one update each); several values run one after the other.
        #[arg(long, value_delimiter = ',', value_parser = count, default_value = "1000")]
        devices: Vec<usize>,
        /// Uploads in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Target a running server instead of starting one (its task must have P parameters).
        #[arg(long)]
        server: Option<String>,
        /// The task to target with --server.
        #[arg(long, default_value = "bench")]
        task: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Thousands of devices check in at once against a small goal.
    Checkin {
        /// Devices checking in at once.
        #[arg(long, default_value_t = 2000)]
        devices: usize,
        /// The round's goal.
        #[arg(long, default_value_t = 100)]
        goal: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses counts written as integers or in scientific notation (`1e6`).
fn count(s: &str) -> Result<usize, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v >= 1.0 && v.fract() == 0.0 && v <= 1e12 {
        Ok(v as usize)
    } else {
        Err(format!("`{s}` is not a positive whole number"))
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let m = machine::machine();
    match cmd {
        Command::Aggregate {
            params,
            seconds,
            json,
        } => {
            let rows = aggregate::run(&params, Duration::from_secs_f64(seconds));
            if json {
                println!("{}", json!({"machine": m, "aggregate": rows}));
                return Ok(ExitCode::SUCCESS);
            }
            println!("aggregator alone (fold one update into f64 sums) vs memcpy of its bytes");
            println!("machine: {m}");
            println!(
                "{:>12} {:>12} {:>14} {:>14} {:>8}",
                "params", "updates/s", "accum GB/s", "memcpy GB/s", "ratio"
            );
            for r in rows {
                println!(
                    "{:>12} {:>12.1} {:>14.2} {:>14.2} {:>8.2}",
                    r.params,
                    r.updates_per_sec,
                    r.accumulate_gb_per_sec,
                    r.memcpy_gb_per_sec,
                    r.ratio
                );
            }
        }
        Command::Ingest {
            params,
            devices,
            concurrency,
            server,
            task,
            json,
        } => {
            let exe = std::env::current_exe().context("cannot find the starling binary")?;
            let rt = crate::runtime()?;
            let mut rows = Vec::new();
            for n in devices {
                let o = ingest::IngestOptions {
                    params,
                    devices: n,
                    concurrency,
                    server: server.clone(),
                    task: task.clone(),
                    exe: exe.clone(),
                };
                if !json {
                    eprintln!(
                        "running: {n} devices, {params} parameters, concurrency {concurrency} ..."
                    );
                }
                rows.push(rt.block_on(ingest::run(&o))?);
            }
            if json {
                println!("{}", json!({"machine": m, "ingest": rows}));
                return Ok(ExitCode::SUCCESS);
            }
            println!("HTTP ingest on 127.0.0.1: one round of N updates (goal N)");
            println!("machine: {m}");
            println!(
                "{:>9} {:>8} {:>5} {:>9} {:>10} {:>9} {:>9} {:>9} {:>12} {:>10} {:>12} {:>6}",
                "params",
                "devices",
                "conc",
                "update MB",
                "updates/s",
                "MB/s",
                "p50 ms",
                "p99 ms",
                "server RSS",
                "commit ms",
                "new ver. ms",
                "errors"
            );
            for r in &rows {
                println!(
                    "{:>9} {:>8} {:>5} {:>9.2} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>10} MiB {:>10} {:>12.1} {:>6}",
                    r.params, r.devices, r.concurrency, r.update_mb, r.updates_per_sec, r.mb_per_sec,
                    r.p50_ms, r.p99_ms, opt(r.server_peak_rss_mib, 1), opt(r.commit_ms, 2),
                    r.time_to_new_version_ms, r.errors
                );
            }
            if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
                if let (Some(a), Some(b)) = (first.server_peak_rss_mib, last.server_peak_rss_mib) {
                    if rows.len() > 1 {
                        println!(
                            "server peak RSS at N = {} is {:.2}x its peak at N = {}",
                            last.devices,
                            b / a,
                            first.devices
                        );
                    }
                }
            }
            if rows.iter().any(|r| r.errors > 0) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Checkin {
            devices,
            goal,
            json,
        } => {
            let exe = std::env::current_exe().context("cannot find the starling binary")?;
            let r = crate::runtime()?.block_on(checkin::run(&exe, devices, goal))?;
            if json {
                println!("{}", json!({"machine": m, "checkin": r}));
            } else {
                println!(
                    "check-in storm: {} devices at once, goal {}",
                    r.devices, r.goal
                );
                println!("machine: {m}");
                println!(
                    "assigned {}, told to come back {} (after {:.2}-{:.2} s), errors {}; latency p50 {:.1} ms, p99 {:.1} ms; wall {:.0} ms",
                    r.assigned, r.retry, r.retry_secs_range.0, r.retry_secs_range.1, r.errors,
                    r.p50_ms, r.p99_ms, r.wall_ms
                );
            }
            if r.errors > 0 || r.assigned + r.retry != r.devices {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
