//! `starling bench …`: runs the benchmarks of `starling-bench` (aggregate, ingest, checkin,
//! soak, secagg) and the training speed of the built-in MNIST models (train), and prints
//! their figures as a table with the machine they ran on, or as JSON (`--json`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use starling_bench::soak::{self, PhaseReport, SoakOptions, SoakReport};
use starling_bench::{aggregate, checkin, ingest, machine};

/// The benchmarks.
#[derive(clap::Subcommand)]
pub(crate) enum Command {
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
        /// Also measure over HTTPS: for each N, a plain-HTTP run and then one against a server
        /// with its own TLS (a self-signed certificate made for the run), and their ratio.
        #[arg(long, conflicts_with = "server")]
        tls: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Whole secure-aggregation (SecAgg+) rounds in process: the bytes a device sends over
    /// its plain f32 update, and device and server CPU time.
    Secagg {
        /// Devices per round; several values run one after the other.
        #[arg(long, value_delimiter = ',', value_parser = count, default_value = "100,500,1000")]
        devices: Vec<usize>,
        /// Parameters per update; several values run one after the other.
        #[arg(long, value_delimiter = ',', value_parser = count, default_value = "1e4")]
        params: Vec<usize>,
        /// Share of devices that drop out (a third after each of the first three steps).
        #[arg(long, default_value_t = 0.1)]
        dropout: f64,
        /// Bits of one input value in the ring.
        #[arg(long, default_value_t = 16)]
        input_bits: u32,
        /// Seed of the devices' inputs and secrets.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Training speed of a built-in model of the FedAvg paper (the 2NN `mlp`, the CNN `cnn`,
    /// the character `lstm`): examples per second of the bare step loop (gather a batch,
    /// forward, backward, SGD step) on random MNIST-shaped data, or random 80-character
    /// sequences for the LSTM (an example predicts 80 characters). With --threads T, T
    /// independent trainers run at
    /// once, one per thread (how Starling uses T cores: one device per core), and the
    /// figure is their total.
    Train {
        /// Model: `mlp` (2NN), `cnn` or `lstm` (the Shakespeare character model, 80 steps).
        #[arg(long, default_value = "cnn")]
        model: String,
        /// Batch size.
        #[arg(long, default_value_t = 10)]
        batch: usize,
        /// Independent trainers at once, one per thread.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Seconds of measurement (after a warm-up of a few steps).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// SGD learning rate (the built-in plan's 0.05 for mlp and cnn).
        #[arg(long, default_value_t = 0.05)]
        lr: f64,
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
    /// Honest devices, aborted and malformed uploads and slow clients at once against a
    /// `starling serve`: rounds committed and stuck, refusals by reason, server RSS over time.
    Soak(SoakArgs),
}

/// `starling bench soak`'s flags (defaults as in `SoakOptions::new`).
#[derive(clap::Args)]
pub(crate) struct SoakArgs {
    /// Seconds of traffic (the quiet baseline runs as long again).
    #[arg(long, default_value_t = 120.0)]
    secs: f64,
    /// Parameters per update (a logistic model of P/10 inputs and 10 classes).
    #[arg(long, value_parser = count, default_value = "1e5")]
    params: usize,
    /// Device loops (check in, download, train, upload; honest or faulty per upload).
    #[arg(long, default_value_t = 32)]
    devices: usize,
    /// Share of uploads that hang up after all or part of the body (half FIN, half RST).
    #[arg(long, default_value_t = 0.2)]
    abort_fraction: f64,
    /// Share of uploads with a bad body or token (each must get a 4xx).
    #[arg(long, default_value_t = 0.1)]
    malformed_fraction: f64,
    /// Connections trickling headers or a body a few bytes at a time.
    #[arg(long, default_value_t = 50)]
    slow_clients: usize,
    /// First run the honest load alone on a fresh server and compare peak RSS.
    #[arg(long)]
    quiet_baseline: bool,
    /// Round goal.
    #[arg(long, default_value_t = 20)]
    goal: u32,
    /// The fewest updates a round commits with at its deadline.
    #[arg(long, default_value_t = 10)]
    min: u32,
    /// Round deadline in seconds (a round open 3x as long is stuck).
    #[arg(long, default_value_t = 10.0)]
    deadline_secs: f64,
    /// Assignments per round as a multiple of the goal.
    #[arg(long, default_value_t = 2.0)]
    overcommit: f64,
    /// The server's header timeout, seconds.
    #[arg(long, default_value_t = 5.0)]
    header_timeout_secs: f64,
    /// The server's body timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    body_timeout_secs: f64,
    /// Seed of the load generator's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl SoakArgs {
    fn options(&self, exe: std::path::PathBuf) -> SoakOptions {
        SoakOptions {
            exe,
            secs: self.secs,
            params: self.params,
            devices: self.devices,
            abort_fraction: self.abort_fraction,
            malformed_fraction: self.malformed_fraction,
            slow_clients: self.slow_clients,
            quiet_baseline: self.quiet_baseline,
            goal: self.goal,
            min: self.min,
            deadline_secs: self.deadline_secs,
            overcommit: self.overcommit,
            header_timeout_secs: self.header_timeout_secs,
            body_timeout_secs: self.body_timeout_secs,
            seed: self.seed,
        }
    }
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

fn scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

pub(crate) fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let m = machine::machine();
    match cmd {
        Command::Train {
            model,
            batch,
            threads,
            seconds,
            lr,
            json,
        } => {
            let r = train_speed(&model, batch, threads, seconds, lr)?;
            if json {
                println!("{}", json!({"machine": m, "train": r}));
            } else {
                println!(
                    "training speed: `{}` ({} parameters), batch {batch}, SGD lr {lr}, \
                     random MNIST-shaped data, {threads} independent trainer(s), one per thread",
                    r.model, r.parameters
                );
                println!("machine: {m}");
                println!(
                    "{:>10.0} examples/s in total ({:.0} per thread; {} steps in {:.2} s)",
                    r.examples_per_sec,
                    r.examples_per_sec / threads as f64,
                    r.steps,
                    r.secs
                );
            }
        }
        Command::Secagg {
            devices,
            params,
            dropout,
            input_bits,
            seed,
            json,
        } => {
            let mut rows = Vec::new();
            if !json {
                println!(
                    "SecAgg+ rounds in process ({input_bits}-bit inputs, {:.0}% dropping out)",
                    dropout * 100.0
                );
                println!("machine: {m}");
                println!(
                    "{:>7} {:>9} {:>7} {:>6} {:>10} {:>10} {:>10} {:>12} {:>12}",
                    "devices",
                    "params",
                    "degree",
                    "ring",
                    "survivors",
                    "sent KB",
                    "expansion",
                    "device ms",
                    "server ms"
                );
            }
            for &p in &params {
                for &n in &devices {
                    let r = starling_bench::secagg::run(n, p, dropout, input_bits, seed)?;
                    if !json {
                        println!(
                            "{:>7} {:>9} {:>7} {:>6} {:>10} {:>10.1} {:>10.3} {:>12.1} {:>12.1}",
                            r.devices,
                            r.params,
                            r.degree,
                            r.ring_bits,
                            r.survivors,
                            r.device_bytes / 1e3,
                            r.expansion,
                            r.device_cpu_ms,
                            r.server_cpu_ms
                        );
                    }
                    rows.push(r);
                }
            }
            if json {
                println!("{}", json!({"machine": m, "secagg": rows}));
            }
        }
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
            tls,
            json,
        } => {
            let exe = std::env::current_exe().context("cannot find the starling binary")?;
            let rt = crate::runtime()?;
            let mut rows = Vec::new();
            let schemes: &[bool] = if tls { &[false, true] } else { &[false] };
            for n in devices {
                for &tls in schemes {
                    let o = ingest::IngestOptions {
                        params,
                        devices: n,
                        concurrency,
                        server: server.clone(),
                        task: task.clone(),
                        exe: exe.clone(),
                        tls,
                    };
                    if !json {
                        eprintln!(
                            "running: {n} devices, {params} parameters, concurrency {concurrency}, {} ...",
                            scheme(tls)
                        );
                    }
                    rows.push(rt.block_on(ingest::run(&o))?);
                }
            }
            // HTTPS against plain HTTP, run after run: (devices, https / http updates/s).
            let ratios: Vec<(usize, f64)> = rows
                .windows(2)
                .filter(|w| !w[0].tls && w[1].tls && w[0].devices == w[1].devices)
                .map(|w| (w[0].devices, w[1].updates_per_sec / w[0].updates_per_sec))
                .collect();
            if json {
                let ratios: Vec<_> = ratios
                    .iter()
                    .map(|(n, r)| json!({"devices": n, "https_over_http": r}))
                    .collect();
                println!(
                    "{}",
                    json!({"machine": m, "ingest": rows, "tls_ratio": ratios})
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!("HTTP ingest on 127.0.0.1: one round of N updates (goal N)");
            println!("machine: {m}");
            println!(
                "{:>6} {:>9} {:>8} {:>5} {:>9} {:>10} {:>9} {:>9} {:>9} {:>12} {:>10} {:>12} {:>6}",
                "scheme",
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
                    "{:>6} {:>9} {:>8} {:>5} {:>9.2} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>10} MiB {:>10} {:>12.1} {:>6}",
                    scheme(r.tls), r.params, r.devices, r.concurrency, r.update_mb, r.updates_per_sec, r.mb_per_sec,
                    r.p50_ms, r.p99_ms, opt(r.server_peak_rss_mib, 1), opt(r.commit_ms, 2),
                    r.time_to_new_version_ms, r.errors
                );
            }
            for (n, ratio) in &ratios {
                println!("HTTPS / HTTP throughput at N = {n}: {ratio:.2}");
            }
            let plain: Vec<_> = rows.iter().filter(|r| !r.tls).collect();
            if let (Some(first), Some(last)) = (plain.first(), plain.last()) {
                if let (Some(a), Some(b)) = (first.server_peak_rss_mib, last.server_peak_rss_mib) {
                    if plain.len() > 1 {
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
        Command::Soak(a) => {
            let exe = std::env::current_exe().context("cannot find the starling binary")?;
            let o = a.options(exe);
            let bar = if a.json {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(o.secs.ceil() as u64).with_style(
                    ProgressStyle::with_template("{prefix:>5} {bar:30} {pos}/{len} s  {msg}")
                        .expect("static template"),
                )
            };
            if !a.json {
                eprintln!(
                    "soak: {} s{} ...",
                    o.secs,
                    if o.quiet_baseline {
                        ", after a quiet baseline as long"
                    } else {
                        ""
                    }
                );
            }
            let report = crate::runtime()?.block_on(soak::run(&o, |p| {
                if bar.prefix() != p.phase {
                    bar.set_prefix(p.phase);
                    bar.set_length(p.total_secs.ceil() as u64);
                }
                bar.set_position(p.elapsed_secs as u64);
                bar.set_message(format!(
                    "round {}  version {}  accepted {}  stuck {}  RSS {} MiB",
                    p.round,
                    p.version,
                    p.accepted,
                    p.stuck,
                    opt(p.rss_mib, 1)
                ));
            }))?;
            bar.finish_and_clear();
            if a.json {
                println!("{}", json!({"machine": m, "soak": report}));
            } else {
                print_soak(&report, &m);
            }
            if !report.verdict.pass {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `starling bench train`'s result.
#[derive(Debug, serde::Serialize)]
struct TrainSpeed {
    model: String,
    parameters: usize,
    batch: usize,
    threads: usize,
    learning_rate: f64,
    /// Optimiser steps, all trainers together.
    steps: u64,
    /// Wall seconds from the common start to the last trainer's end.
    secs: f64,
    /// Examples per second, all trainers together.
    examples_per_sec: f64,
    /// Each trainer's own examples per second.
    per_thread: Vec<f64>,
}

/// Runs `threads` independent trainers of the built-in `model` for about `seconds` each.
fn train_speed(
    model: &str,
    batch: usize,
    threads: usize,
    seconds: f64,
    lr: f64,
) -> anyhow::Result<TrainSpeed> {
    use rand::{Rng, SeedableRng};
    use starling_core::data::datasets::shakespeare;
    use starling_core::trainer::{builtin, optim::Sgd};
    use starling_core::{Dataset, Model, Parameters};
    use std::time::Instant;

    let spec = match model {
        "mlp" => builtin::mlp(784, 10),
        "cnn" => builtin::cnn(builtin::MNIST_SHAPE, 10),
        "lstm" => builtin::lstm(shakespeare::VOCAB_SIZE, shakespeare::SEQ_LEN),
        other => anyhow::bail!("unknown model `{other}` (mlp, cnn, lstm)"),
    };
    // Token ids for the LSTM's embedding, pixels in [0, 1) for the MNIST models.
    let tokens = model == "lstm";
    anyhow::ensure!(batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(
        seconds.is_finite() && seconds > 0.0,
        "--seconds must be positive"
    );
    let budget = Duration::from_secs_f64(seconds);
    // 1,000 random examples (pixels uniform in [0, 1), or for the LSTM sequences of 80
    // characters uniform over the vocabulary, each predicting at every step; labels uniform
    // over the classes), shared by the trainers; each walks it in consecutive batches.
    let examples = 1000.max(batch);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let x = (0..examples * spec.inputs)
        .map(|_| {
            if tokens {
                rng.random_range(0..shakespeare::VOCAB_SIZE) as f32
            } else {
                rng.random::<f32>()
            }
        })
        .collect();
    // One label per prediction: per example, or for the LSTM per step.
    let y = (0..examples * spec.target_width())
        .map(|_| rng.random_range(0..spec.outputs()) as f32)
        .collect();
    let data = Dataset::new(x, y, spec.inputs, spec.target_width()).context("random data")?;
    let net = Model::new(spec.clone()).context("built-in specs are valid")?;
    let batches: Vec<Vec<usize>> = (0..examples)
        .collect::<Vec<_>>()
        .chunks_exact(batch)
        .map(<[usize]>::to_vec)
        .collect();
    let barrier = std::sync::Barrier::new(threads);
    let start = std::sync::OnceLock::new();
    let runs: Vec<(u64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (net, spec, data, batches, barrier, start) =
                    (&net, &spec, &data, &batches, &barrier, &start);
                s.spawn(move || {
                    let mut params = spec.init_params(t as u64);
                    let mut grads = Parameters::zeros(net.layout());
                    let mut opt = Sgd::new(lr as f32, 0.0);
                    let (mut x, mut y) = (Vec::new(), Vec::new());
                    let mut step = |b: &[usize]| {
                        data.gather(b, &mut x, &mut y);
                        net.train_step(&mut params, &x, &y, b.len(), &mut grads, &mut opt);
                    };
                    // Warm-up: grow the buffers and the workspace.
                    for b in batches.iter().take(5) {
                        step(b);
                    }
                    barrier.wait();
                    let began = *start.get_or_init(Instant::now);
                    let mut steps = 0u64;
                    while began.elapsed() < budget {
                        for _ in 0..10 {
                            step(&batches[steps as usize % batches.len()]);
                            steps += 1;
                        }
                    }
                    (steps, began.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a trainer thread panicked"))
            .collect()
    });
    let steps: u64 = runs.iter().map(|r| r.0).sum();
    let secs = runs.iter().map(|r| r.1).fold(0.0, f64::max);
    Ok(TrainSpeed {
        model: spec.name.clone(),
        parameters: net.layout().numel(),
        batch,
        threads,
        learning_rate: lr,
        steps,
        secs,
        examples_per_sec: (steps as usize * batch) as f64 / secs,
        per_thread: runs
            .iter()
            .map(|&(n, t)| (n as usize * batch) as f64 / t)
            .collect(),
    })
}

/// `k v, k v, ...` of a map, or `none`.
fn counts<'a>(map: impl IntoIterator<Item = (&'a String, &'a u64)>) -> String {
    let s: Vec<String> = map.into_iter().map(|(k, v)| format!("{k} {v}")).collect();
    if s.is_empty() {
        "none".into()
    } else {
        s.join(", ")
    }
}

fn print_soak(r: &SoakReport, m: &machine::Machine) {
    let s = &r.soak;
    println!(
        "soak: {:.0} s against `starling serve` on 127.0.0.1: {} devices ({:.0}% of uploads aborted, {:.0}% malformed), {} slow clients",
        r.secs,
        r.devices,
        r.abort_fraction * 100.0,
        r.malformed_fraction * 100.0,
        r.slow_clients
    );
    println!(
        "task: logistic, {} parameters ({:.1} kB updates); rounds of goal {}, min {}, deadline {} s; server timeouts: headers {} s, body {} s",
        s.parameter_count,
        s.update_bytes as f64 / 1e3,
        r.goal,
        r.min,
        r.deadline_secs,
        r.header_timeout_secs,
        r.body_timeout_secs
    );
    println!("machine: {m}");
    println!();
    let runs: Vec<&PhaseReport> = r.quiet.iter().chain(std::iter::once(s)).collect();
    let num = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    type Row = (&'static str, fn(&PhaseReport) -> String);
    let rows: [Row; 11] = [
        ("rounds committed", |p| {
            p.at_stop
                .rounds_committed
                .map_or("-".into(), |v| v.to_string())
        }),
        ("rounds abandoned", |p| {
            p.at_stop
                .rounds_abandoned
                .map_or("-".into(), |v| v.to_string())
        }),
        ("rounds stuck (open > 3x deadline)", |p| {
            p.rounds_stuck.to_string()
        }),
        ("longest round, s", |p| {
            format!("{:.1}", p.longest_round_secs)
        }),
        ("honest uploads sent", |p| p.tally.honest_sent.to_string()),
        ("honest uploads accepted", |p| {
            p.tally.honest_accepted.to_string()
        }),
        ("honest uploads refused", |p| {
            p.tally.honest_refused.values().sum::<u64>().to_string()
        }),
        ("check-ins failed", |p| p.tally.checkin_errors.to_string()),
        ("status polls failed", |p| p.poll_errors.to_string()),
        ("server RSS at the end, MiB", |p| {
            opt(p.rss.last().map(|x| x.rss_mib), 1)
        }),
        ("server peak RSS, MiB", |p| opt(p.peak_rss_mib, 1)),
    ];
    print!("{:<36}", "");
    for p in &runs {
        print!(" {:>10}", p.phase);
    }
    println!();
    for (label, f) in rows {
        print!("{label:<36}");
        for p in &runs {
            print!(" {:>10}", f(p));
        }
        println!();
    }
    println!();
    let t = &s.tally;
    println!(
        "check-ins: assigned {}, told to come back {}, failed {}; model downloads {} (failed {})",
        t.checkins_assigned, t.checkins_retry, t.checkin_errors, t.model_downloads, t.model_errors
    );
    println!(
        "honest uploads refused, by reason: {}; transport errors {}",
        counts(&t.honest_refused),
        t.honest_transport_errors
    );
    println!(
        "aborted uploads: {}; could not be written {}",
        counts(&t.aborted),
        t.abort_errors
    );
    println!("malformed uploads, by kind: answers");
    for (kind, answers) in &t.malformed {
        println!("  {kind:<16} {}", counts(answers));
    }
    println!("slow connections, by kind: how they ended");
    for k in &s.slow {
        println!(
            "  {:<22} {}; cut after p50 {:.1} s, max {:.1} s",
            k.kind,
            counts(&k.ended),
            k.p50_cut_secs,
            k.max_cut_secs
        );
    }
    if t.slow_uncut > 0 {
        println!(
            "  {} connection(s) still open well past their timeout",
            t.slow_uncut
        );
    }
    println!(
        "server updates by outcome (when the traffic stopped): {}",
        counts(&s.at_stop.updates)
    );
    println!(
        "server connections refused (per-address limit): {}",
        num(s.at_stop.connections_refused)
    );
    let step = s.rss.len().div_ceil(12).max(1);
    let series: Vec<String> = s
        .rss
        .iter()
        .step_by(step)
        .chain(
            s.rss
                .last()
                .filter(|_| !(s.rss.len() - 1).is_multiple_of(step)),
        )
        .map(|x| format!("{:.0}s {:.1}", x.t_secs, x.rss_mib))
        .collect();
    println!("server RSS over time, MiB: {}", series.join(", "));
    let d = &s.drain;
    println!(
        "after the traffic stopped: open round {} -> {}, version {} -> {} in {:.1} s ({}); uploads in flight at the end: {}",
        d.from_round,
        d.to_round,
        d.from_version,
        d.to_version,
        d.secs,
        if d.ok {
            "the open round closed and the next committed"
        } else {
            "NOT drained"
        },
        match s.at_end.in_flight {
            Some(n) => format!("{n} ({})", s.at_end.in_flight_metrics.join(", ")),
            None => "not exposed by /metrics".into(),
        }
    );
    if !d.ok {
        println!(
            "  the drain's devices: assigned {}, told to come back {}, accepted {}, refused {}; the open round at the end: {}",
            d.checkins.0,
            d.checkins.1,
            d.accepted,
            counts(&d.refused),
            d.final_round
        );
    }
    if let (Some(ratio), Some(q)) = (r.verdict.rss_ratio, &r.quiet) {
        println!(
            "peak server RSS: soak {} MiB = {ratio:.2}x quiet {} MiB (limit 2x)",
            opt(s.peak_rss_mib, 1),
            opt(q.peak_rss_mib, 1)
        );
    }
    if !t.errors.is_empty() {
        println!("first errors seen by the load generator:");
        for e in &t.errors {
            println!("  {e}");
        }
    }
    if r.verdict.pass {
        println!("verdict: PASS");
    } else {
        println!("verdict: FAIL");
        for p in &r.verdict.problems {
            println!("  - {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[test]
    fn soak_flags_default_to_the_library_defaults() {
        let Cli {
            command: Command::Soak(a),
        } = Cli::try_parse_from(["bench", "soak"]).unwrap()
        else {
            panic!("not soak");
        };
        let exe = std::path::PathBuf::from("starling");
        let from_flags = format!("{:?}", a.options(exe.clone()));
        assert_eq!(from_flags, format!("{:?}", SoakOptions::new(exe)));
        let Cli {
            command: Command::Soak(a),
        } = Cli::try_parse_from([
            "bench",
            "soak",
            "--secs",
            "20",
            "--quiet-baseline",
            "--json",
        ])
        .unwrap()
        else {
            panic!("not soak");
        };
        assert!(a.quiet_baseline && a.json && a.secs == 20.0);
    }
}
