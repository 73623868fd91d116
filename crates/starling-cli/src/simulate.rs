//! `starling simulate`: loads a data set, partitions it over virtual devices and runs the
//! simulation (synchronous rounds, or buffered asynchronous training with `--buffer`) with a
//! progress bar; writes results (JSON, CSV, SVG plot) and, with `--tensorboard`, TensorBoard
//! event files of the rounds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use starling_core::{trainer::builtin, Dataset, Plan};
use starling_sim::data::{self, Partition};
use starling_sim::{Buffered, Federation, Latency, Sample, SimConfig, SimPrivacy};

/// Arguments of `starling simulate`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Data set: `mnist` or `fashion-mnist` (a folder of IDX files, --data), `csv` (--train and
    /// --test files, last column the label), or `shakespeare` (roles JSON, --data).
    #[arg(long)]
    dataset: String,
    /// The IDX folder or the Shakespeare JSON file.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training CSV (with --dataset csv).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Test CSV (with --dataset csv).
    #[arg(long)]
    test: Option<PathBuf>,
    /// Model: `logistic`, `mlp` (the FedAvg paper's 2NN), `cnn` (the paper's CNN), `lstm`
    /// (the paper's character LSTM, with --dataset shakespeare).
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Virtual devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Fraction of the devices sampled per round.
    #[arg(long, default_value_t = 0.1, conflicts_with = "per_round")]
    fraction: f64,
    /// Devices sampled per round (instead of --fraction).
    #[arg(long, conflicts_with = "buffer")]
    per_round: Option<usize>,
    /// Rounds (with --buffer: server steps).
    #[arg(long, default_value_t = 100)]
    rounds: u32,
    /// Local epochs.
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    /// Local batch size.
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// FedProx's proximal weight mu (0: plain local SGD, i.e. FedAvg).
    #[arg(long, default_value_t = 0.0)]
    mu: f32,
    /// Server strategy: fedavg, fedavgm, fedadagrad, fedadam or fedyogi (their other
    /// hyperparameters take the defaults of `[tasks.strategy]`).
    #[arg(long, default_value = "fedavg")]
    strategy: String,
    /// Server learning rate (default: the strategy's, 1 for fedavg and fedavgm, 0.01 for the
    /// adaptive ones).
    #[arg(long)]
    server_lr: Option<f64>,
    /// Partition: `iid`, `shards` (label shards, --shards-per-device each) or `dirichlet`
    /// (--alpha). Shakespeare is always split naturally, one device per role.
    #[arg(long, default_value = "iid")]
    partition: String,
    /// Shards per device with --partition shards.
    #[arg(long, default_value_t = 2)]
    shards_per_device: usize,
    /// Dirichlet concentration with --partition dirichlet.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Probability that a sampled device drops out.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Probability that a sampled device is a straggler (10x slower; misses the deadline).
    #[arg(long, default_value_t = 0.0)]
    stragglers: f64,
    /// FedProx's partial work: a straggler that cannot finish by the deadline trains on the
    /// share of its data it has time for, instead of missing the round.
    #[arg(long, conflicts_with = "buffer")]
    partial_work: bool,
    /// Device training times on the virtual clock, drawn per assignment: `constant:SECS`,
    /// `uniform:LO:HI`, `exponential:MEAN`, `lognormal:SIGMA` (median 1 s) or
    /// `lognormal:SIGMA:MEDIAN` (default: examples x epochs x 1 ms).
    #[arg(long)]
    latency: Option<String>,
    /// Round deadline (with --buffer: assignment lifetime) in virtual seconds (default: 3x
    /// an average device's time; with --latency, 600).
    #[arg(long)]
    deadline_secs: Option<f64>,
    /// Buffered asynchronous training (FedBuff): the server steps the model after every K
    /// updates, while --concurrency devices train at all times.
    #[arg(long, value_name = "K")]
    buffer: Option<u32>,
    /// With --buffer: devices training at once (C) [default: 100].
    #[arg(long, requires = "buffer", value_name = "C")]
    concurrency: Option<u32>,
    /// With --buffer: updates more than this many versions old are refused [default: 50].
    #[arg(long, requires = "buffer")]
    max_staleness: Option<u64>,
    /// With --buffer: an update s versions old weighs (1 + s)^-A [default: 0.5].
    #[arg(long, requires = "buffer", value_name = "A")]
    staleness_exponent: Option<f64>,
    /// Differential privacy (DP-FedAvg): clip every update to this L2 norm; needs
    /// --noise-multiplier and --epsilon. The population is the simulated devices.
    #[arg(long, value_name = "S", requires_all = ["noise_multiplier", "epsilon"])]
    dp_clip: Option<f64>,
    /// With --dp-clip: Gaussian noise of standard deviation Z·S on each round's sum.
    #[arg(long, value_name = "Z", requires = "dp_clip")]
    noise_multiplier: Option<f64>,
    /// With --dp-clip: the privacy budget's ε; training stops before a round would pass it.
    #[arg(long, value_name = "E", requires = "dp_clip")]
    epsilon: Option<f64>,
    /// With --dp-clip: adapt the clip bound toward this quantile of the update norms (Andrew
    /// et al. 2021), starting from --dp-clip.
    #[arg(long, value_name = "Q", requires = "dp_clip")]
    target_quantile: Option<f64>,
    /// With --dp-clip: the privacy budget's δ (at most 1 / devices).
    #[arg(long, value_name = "D", default_value_t = 1e-5)]
    delta: f64,
    /// Secure aggregation (SecAgg+): every round goes through the engine's four steps and the
    /// server sees only masked inputs; drop-outs leave after advertising keys, after sharing,
    /// or after sending their masked inputs. With --dp-clip the privacy is distributed: the
    /// devices clip to --dp-clip and add Skellam noise in the ring. Not with --buffer.
    #[arg(long, conflicts_with = "buffer")]
    secagg: bool,
    /// With --secagg: bits per value of one device's input.
    #[arg(long, requires = "secagg", default_value_t = 20, value_name = "BITS")]
    secagg_bits: u32,
    /// With --secagg: the L2 bound devices clip their updates to.
    #[arg(long, requires = "secagg", default_value_t = 10.0, value_name = "S")]
    secagg_clip: f64,
    /// Evaluate the test set every N rounds (with --buffer: steps) and after the last.
    #[arg(long, default_value_t = 1, value_name = "N")]
    eval_every: u32,
    /// Use only the first N training examples.
    #[arg(long)]
    train_subset: Option<usize>,
    /// Use only the first N test examples.
    #[arg(long)]
    test_subset: Option<usize>,
    /// Stop once the test accuracy reaches this (and report the round).
    #[arg(long)]
    target_accuracy: Option<f32>,
    /// Seed of everything.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder for results.json, results.csv and plot.svg.
    #[arg(long, default_value = "target/simulation")]
    out: PathBuf,
    /// Also write the rounds as a TensorBoard event file in DIR, each as it ends (the tags of
    /// `starling serve --tensorboard`). DIR is one run: give each simulation its own folder
    /// and compare them with `tensorboard --logdir` on their parent.
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
    /// Print a JSON summary (last line of stdout) instead of a table.
    #[arg(long)]
    json: bool,
}

fn head(d: Dataset, n: Option<usize>) -> Dataset {
    match n {
        Some(n) if n < d.len() => d.subset(&(0..n).collect::<Vec<_>>()),
        _ => d,
    }
}

fn need(p: &Option<PathBuf>, flag: &str, dataset: &str) -> anyhow::Result<PathBuf> {
    p.clone()
        .with_context(|| format!("--dataset {dataset} needs {flag}"))
}

pub(crate) fn run(a: Args) -> anyhow::Result<ExitCode> {
    // Flags first: a typo should not wait for the data set to load.
    let strategy = starling_sim::strategy(&a.strategy, a.server_lr)?;
    let plan = Plan {
        epochs: a.epochs,
        batch_size: a.batch_size,
        learning_rate: a.lr,
        shuffle: true,
        seed: a.seed,
        mu: a.mu,
        ..Plan::default()
    };
    plan.validate()?;
    let latency = a
        .latency
        .as_deref()
        .map(str::parse::<Latency>)
        .transpose()?;
    let buffered = a.buffer.map(|k| {
        let mut b = Buffered::new(k, a.concurrency.unwrap_or(100));
        if let Some(s) = a.max_staleness {
            b.max_staleness = s;
        }
        if let Some(x) = a.staleness_exponent {
            b.staleness_exponent = x;
        }
        b
    });
    let (federation, inputs, classes) = load(&a)?;
    let spec = match a.model.as_str() {
        "cnn" => builtin::cnn(builtin::MNIST_SHAPE, classes),
        "mlp" => builtin::mlp(inputs, classes),
        "logistic" => builtin::logistic(inputs, classes),
        "lstm" if a.dataset == "shakespeare" => builtin::lstm(classes, inputs),
        "lstm" => bail!("the model `lstm` reads characters: use it with --dataset shakespeare"),
        other => bail!("unknown model `{other}` for simulation (logistic, mlp, cnn, lstm)"),
    };
    if spec.inputs != inputs {
        bail!(
            "the model `{}` takes {} inputs, the data has {inputs}",
            spec.name,
            spec.inputs
        );
    }
    let sample = match a.per_round {
        Some(k) => Sample::Count(k),
        None => Sample::Fraction(a.fraction),
    };
    let mut config = SimConfig::new(spec, plan, sample, a.rounds, a.seed);
    config.strategy = strategy;
    config.dropout = a.dropout;
    config.stragglers = a.stragglers;
    config.partial_work = a.partial_work;
    config.stop_at_accuracy = a.target_accuracy;
    config.latency = latency;
    config.deadline_secs = a.deadline_secs;
    config.buffered = buffered;
    config.eval_every = a.eval_every;
    config.secagg = a.secagg.then_some(starling_sim::secagg::SimSecAgg {
        input_bits: a.secagg_bits,
        clip: a.secagg_clip,
    });
    config.privacy = match (a.dp_clip, a.noise_multiplier, a.epsilon) {
        (Some(clip), Some(noise_multiplier), Some(epsilon)) => Some(SimPrivacy {
            clip,
            noise_multiplier,
            epsilon,
            delta: a.delta,
            target_quantile: a.target_quantile,
        }),
        _ => None,
    };

    let (lo, mean, hi) = federation.sizes();
    let unit = if buffered.is_some() { "step" } else { "round" };
    if !a.json {
        let mode = match &buffered {
            Some(b) => format!(
                ", buffered (K {}, concurrency {}, max staleness {}, exponent {})",
                b.buffer, b.concurrency, b.max_staleness, b.staleness_exponent
            ),
            None => String::new(),
        };
        let mode = match &config.privacy {
            Some(p) => format!(
                "{mode}, {}DP (clip {}, noise multiplier {}, budget ε {} at δ {})",
                if config.secagg.is_some() {
                    "distributed (Skellam) "
                } else {
                    ""
                },
                p.clip,
                p.noise_multiplier,
                p.epsilon,
                p.delta
            ),
            None => mode,
        };
        let mode = match &config.secagg {
            Some(s) => format!(
                "{mode}, secure aggregation (SecAgg+, {}-bit inputs, clip {})",
                s.input_bits,
                config.privacy.map_or(s.clip, |p| p.clip)
            ),
            None => mode,
        };
        println!(
            "simulating `{}` on {} devices ({lo}..{hi} examples, mean {mean:.0}), {} test examples, {} {unit}s, strategy {}, mu {}{mode}{}",
            a.model,
            federation.devices.len(),
            federation.test.len(),
            a.rounds,
            config.strategy.name(),
            config.plan.mu,
            latency.map_or(String::new(), |l| format!(", latency {l}"))
        );
    }
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(u64::from(a.rounds)).with_style(
            ProgressStyle::with_template(&format!(
                "{{bar:30}} {unit} {{pos}}/{{len}} {{elapsed_precise}} {{msg}}"
            ))
            .expect("static template"),
        )
    };
    let mut tensorboard = a
        .tensorboard
        .as_deref()
        .map(|dir| {
            starling_server::tensorboard::Writer::create(dir).with_context(|| {
                format!(
                    "cannot create a TensorBoard event file in {}",
                    dir.display()
                )
            })
        })
        .transpose()?;
    // The first failure to write the event file; the simulation goes on, and fails at the end.
    let mut tensorboard_error = None;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let report = crate::runtime()?.block_on(starling_sim::run(&config, &federation, |m| {
        if let (Some(w), None) = (tensorboard.as_mut(), &tensorboard_error) {
            let wall_time = started + m.wall_secs;
            if let Err(e) = w
                .write_scalars(m.round, wall_time, &m.tensorboard_scalars())
                .and_then(|()| w.flush())
            {
                tensorboard_error = Some(e);
            }
        }
        bar.set_position(m.round);
        if let Some(loss) = m.test_loss {
            bar.set_message(format!(
                "accuracy {}  loss {loss:.4}  virtual {:.0} s{}",
                m.test_accuracy.map_or("-".into(), |x| format!("{x:.4}")),
                m.virtual_secs,
                m.epsilon.map_or(String::new(), |e| format!("  ε {e:.3}"))
            ));
        }
    }))?;
    bar.finish_and_clear();
    let mut files = report.write(&a.out)?;
    if let Some(w) = &tensorboard {
        if let Some(e) = tensorboard_error {
            bail!(
                "cannot write the TensorBoard event file {}: {e}",
                w.path().display()
            );
        }
        files.push(w.path().to_path_buf());
    }
    let peak = starling_bench::machine::peak_rss_mib(std::process::id());
    let to_target = a.target_accuracy.and_then(|t| report.rounds_to_accuracy(t));
    let secs_to_target = a
        .target_accuracy
        .and_then(|t| report.virtual_secs_to_accuracy(t));
    let refused_stale: usize = report.rounds.iter().map(|r| r.refused_stale).sum();
    if a.json {
        println!(
            "{}",
            json!({
                "rounds": report.rounds.len(),
                "wall_secs": report.wall_secs,
                "rounds_per_sec": report.rounds_per_sec,
                "final_accuracy": report.final_accuracy,
                "final_loss": report.final_loss,
                "rounds_to_target": to_target,
                "virtual_secs_to_target": secs_to_target,
                "virtual_secs": report.rounds.last().map(|r| r.virtual_secs),
                "mode": if buffered.is_some() { "buffered" } else { "rounds" },
                "buffered": config.buffered,
                "latency": config.latency,
                "refused_stale": refused_stale,
                "strategy": config.strategy,
                "mu": config.plan.mu,
                "privacy": config.privacy,
                "secure_aggregation": config.secagg,
                "epsilon": report.rounds.last().and_then(|r| r.epsilon),
                "stopped": report.stopped,
                "peak_rss_mib": peak,
                "cpu_secs": report.cpu_secs,
                "cores_busy": report.cores_busy,
                "machine": starling_bench::machine::machine(),
            })
        );
    } else {
        println!(
            "{} {unit}s in {:.1} s ({:.2} {unit}s/s, {:.1} virtual s); final test accuracy {}, loss {:.4}; peak memory {} MiB",
            report.rounds.len(),
            report.wall_secs,
            report.rounds_per_sec,
            report.rounds.last().map_or(0.0, |r| r.virtual_secs),
            report.final_accuracy.map_or("-".into(), |x| format!("{x:.4}")),
            report.final_loss.unwrap_or(f32::NAN),
            peak.map_or("-".into(), |m| format!("{m:.0}"))
        );
        if let Some(busy) = report.cores_busy {
            println!(
                "cores busy: {busy:.2} of {} ({:.1} CPU s over {:.1} wall s)",
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                report.cpu_secs.unwrap_or_default(),
                report.wall_secs
            );
        }
        if let Some(e) = report.rounds.last().and_then(|r| r.epsilon) {
            println!("privacy: ε = {e:.4} spent at δ = {}", a.delta);
        }
        if config.secagg.is_some() {
            let committed = report.rounds.iter().filter(|r| r.committed).count();
            println!(
                "secure aggregation: every round was secure (the server saw only masked \
                 inputs); {committed} of {} rounds committed",
                report.rounds.len()
            );
        }
        if let Some(reason) = &report.stopped {
            println!("training stopped: {reason}");
        }
        if let Some(t) = a.target_accuracy {
            match (to_target, secs_to_target) {
                (Some(r), Some(secs)) => {
                    println!("reached {t} test accuracy at {unit} {r}, {secs:.1} virtual s")
                }
                _ => println!("did not reach {t} test accuracy"),
            }
        }
        if buffered.is_some() {
            println!("{refused_stale} updates refused as too stale");
        }
        println!("machine: {}", starling_bench::machine::machine());
        for f in files {
            println!("wrote {}", f.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The federation, the input width and the number of classes.
fn load(a: &Args) -> anyhow::Result<(Federation, usize, usize)> {
    let how = match a.partition.as_str() {
        "iid" => Partition::Iid,
        "shards" => Partition::Shards {
            shards_per_device: a.shards_per_device,
        },
        "dirichlet" => Partition::Dirichlet { alpha: a.alpha },
        other => bail!("unknown partition `{other}` (iid, shards, dirichlet)"),
    };
    let (train, test) = match a.dataset.as_str() {
        "mnist" | "fashion-mnist" => {
            data::load_idx_dir(&need(&a.data, "--data FOLDER", &a.dataset)?)?
        }
        "csv" => (
            data::load_csv(&need(&a.train, "--train FILE", "csv")?)?,
            data::load_csv(&need(&a.test, "--test FILE", "csv")?)?,
        ),
        "shakespeare" => {
            let path = need(&a.data, "--data roles.json.gz", "shakespeare")?;
            let (devices, test) = data::load_shakespeare(&path, a.devices, 64, 0.2)?;
            let test = head(test, a.test_subset);
            let classes = starling_core::data::datasets::shakespeare::VOCAB_SIZE;
            let inputs = test.feature_dim();
            return Ok((Federation::new(devices, test), inputs, classes));
        }
        other => bail!("unknown data set `{other}` (mnist, fashion-mnist, csv, shakespeare)"),
    };
    let (train, test) = (head(train, a.train_subset), head(test, a.test_subset));
    let classes = train
        .targets()
        .iter()
        .chain(test.targets())
        .fold(0.0f32, |m, &t| m.max(t)) as usize
        + 1;
    let partition = data::partition_dataset(&train, how, a.devices, classes, a.seed)?;
    let inputs = train.feature_dim();
    Ok((
        Federation::from_partition(&train, &partition, test)?,
        inputs,
        classes,
    ))
}
