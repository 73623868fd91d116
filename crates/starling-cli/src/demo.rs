//! `starling demo`: the original demo, federated. A server on a free local port with its
//! SQLite file in a temporary directory, and 20 devices in this process, each with private
//! points of `y = 2x + 1 + noise` from its own slice of the x axis, train the `linear` model
//! (W = 5, b = 3 at the start) until W and b are within the tolerance of 2 and 1.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use starling_client::{Device, DeviceOptions, HttpTransport};
use starling_core::data::synthetic_line;
use starling_core::Plan;
use starling_server::settings::{plan_table, RoundPolicy, TaskSettings};
use starling_server::Settings;

/// Arguments of `starling demo`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Devices, each with its own slice of the x axis.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Updates that commit a round.
    #[arg(long, default_value_t = 15)]
    goal: u32,
    /// Stop after this many rounds if not converged.
    #[arg(long, default_value_t = 100)]
    max_rounds: u64,
    /// How close W and b must come to 2 and 1.
    #[arg(long, default_value_t = 0.05)]
    tolerance: f32,
    /// Points per device.
    #[arg(long, default_value_t = 50)]
    points: usize,
    /// Seed of the devices' data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The demo's true line.
const TRUE_W: f32 = 2.0;
const TRUE_B: f32 = 1.0;

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.devices >= 1, "the demo needs at least one device");
    let goal = args.goal.clamp(1, args.devices as u32);
    crate::runtime()?.block_on(demo(args, goal))
}

async fn demo(args: Args, goal: u32) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.data_dir = dir.path().to_path_buf();
    settings.tasks = vec![TaskSettings {
        plan: Some(plan_table(&Plan {
            epochs: 5,
            batch_size: 10,
            learning_rate: 0.01,
            ..Plan::default()
        })),
        rounds: RoundPolicy {
            goal,
            min: goal.div_ceil(2),
            deadline_secs: 20.0,
            overcommit: 1.0,
            retry_secs: 0.1,
        },
        // A demo of a few devices in one process: it lowers the minimum cohort (the server
        // warns that such rounds reveal much about each device), and all its devices share
        // 127.0.0.1.
        min_cohort: goal.div_ceil(2),
        max_assignments_per_address: u32::try_from(args.devices).unwrap_or(u32::MAX),
        ..TaskSettings::default()
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = starling_server::spawn(settings, listener).await?;
    let task = server.tasks[0].clone();
    println!("Starling demo: {} devices train y = W*x + b (W = 5, b = 3 at the start) on private points of y = 2x + 1 + noise", args.devices);
    println!(
        "server: {}   (try: curl {}/v1/tasks/linear)",
        server.url(),
        server.url()
    );
    println!("database: {}", dir.path().join("starling.db").display());

    // Device i sees only x in [-2 + 4i/n, -2 + 4(i+1)/n): no device sees the whole line.
    let width = 4.0 / args.devices as f32;
    let mut devices = tokio::task::JoinSet::new();
    for i in 0..args.devices {
        let lo = -2.0 + width * i as f32;
        let data = synthetic_line(
            TRUE_W,
            TRUE_B,
            (lo, lo + width),
            args.points,
            0.1,
            args.seed * 1000 + i as u64,
        );
        let options = DeviceOptions {
            rounds: None,
            max_wait: Duration::from_secs(2),
            ..DeviceOptions::default()
        };
        let mut device = Device::new(HttpTransport::new(&server.url()), data, options);
        devices.spawn(async move { device.run(|_| {}).await });
    }

    let bar = ProgressBar::new(args.max_rounds).with_style(
        ProgressStyle::with_template("{bar:30} round {pos}/{len}  {msg}").expect("static template"),
    );
    let started = Instant::now();
    let mut status = task.subscribe();
    let mut seen_version = task.status().model.version;
    let (mut w, mut b) = (5.0f32, 3.0f32);
    let mut converged = false;
    let mut rounds = 0;
    println!(
        "{:>5} {:>7} {:>12} {:>14} {:>9} {:>9}",
        "round", "version", "participants", "mean loss", "W", "b"
    );
    while bar.position() < args.max_rounds {
        tokio::select! {
            changed = status.changed() => changed.context("the server stopped")?,
            Some(joined) = devices.join_next() => {
                joined?.context("a device failed")?;
                continue;
            }
        }
        let st = status.borrow_and_update().clone();
        let Some(rec) = st.last_round.filter(|r| r.round > bar.position()) else {
            continue;
        };
        bar.set_position(rec.round);
        rounds = rec.round;
        if st.model.version != seen_version {
            seen_version = st.model.version;
            w = st.model.params.get("W").map_or(w, |t| t.data()[0]);
            b = st.model.params.get("b").map_or(b, |t| t.data()[0]);
        }
        let line = format!(
            "{:>5} {:>7} {:>12} {:>14} {:>9.4} {:>9.4}",
            rec.round,
            st.model.version,
            rec.participants,
            rec.mean_loss.map_or("-".into(), |l| format!("{l:.6}")),
            w,
            b
        );
        // indicatif drops println on a hidden bar (no terminal): print directly then.
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
        bar.set_message(format!("W {w:.4}  b {b:.4}"));
        if (w - TRUE_W).abs() < args.tolerance && (b - TRUE_B).abs() < args.tolerance {
            converged = true;
            break;
        }
    }
    bar.finish_and_clear();
    devices.abort_all();
    server.stop().await?;
    println!(
        "final: W = {w:.4}, b = {b:.4} after {} rounds in {:.1}s ({})",
        rounds,
        started.elapsed().as_secs_f64(),
        if converged {
            "converged"
        } else {
            "did not converge"
        }
    );
    Ok(if converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
