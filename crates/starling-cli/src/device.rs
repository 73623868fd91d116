//! `starling device`: one device training on a local CSV file, over HTTP or HTTPS (`--ca-cert`
//! for a server whose certificate a private CA signed). For an enrolled task the device
//! enrolls once with the task's enrollment secret (`STARLING_ENROLLMENT_SECRET`) and keeps the
//! credential it receives in `--credential-file`, which later runs reuse.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use starling_client::data::load_csv;
use starling_client::device::DeviceEvent;
use starling_client::{Device, DeviceOptions, HttpTransport};
use starling_core::data::TargetColumn;
use starling_core::privacy::LocalDp;

/// Arguments of `starling device`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The server's base URL (http:// or https://).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "STARLING_SERVER")]
    server: String,
    /// Also trust the CA certificate(s) in this PEM file for an https:// server (a private
    /// CA's), beside the built-in (webpki) and the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// The task to contribute to.
    #[arg(long, default_value = "linear")]
    task: String,
    /// Where this device keeps its credential for an enrolled task: read when the file
    /// exists; otherwise the device enrolls (with STARLING_ENROLLMENT_SECRET) and writes the
    /// credential there, readable by its owner only.
    #[arg(long, value_name = "FILE")]
    credential_file: Option<PathBuf>,
    /// A label for the operator's device list when the device enrolls.
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    /// Keep the device's state in this folder between steps (check in, download, train,
    /// upload), so that a stopped device resumes where it stopped, in another process.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// With --state-dir: keep the device's examples in the folder under this many bytes of
    /// storage. A --data file's examples join them as the newest, once (the same file given
    /// again, as every --step process does, is not added twice); the oldest beyond the
    /// budget are dropped; training uses what is kept.
    #[arg(long, value_name = "BYTES", requires = "state_dir")]
    storage_budget: Option<u64>,
    /// With --state-dir: run exactly one step, print its outcome as JSON, and exit.
    #[arg(long, requires = "state_dir")]
    step: bool,
    /// The device's conditions, for a task whose plan requires some (with --state-dir):
    /// charging or not.
    #[arg(long, value_name = "BOOL")]
    charging: Option<bool>,
    /// Idle (not in use) or not.
    #[arg(long, value_name = "BOOL")]
    idle: Option<bool>,
    /// On an unmetered network or not.
    #[arg(long, value_name = "BOOL")]
    unmetered: Option<bool>,
    /// Battery level, 0 to 1.
    #[arg(long, value_name = "LEVEL")]
    battery: Option<f32>,
    /// Local data: a CSV file of numbers (a header row is allowed).
    #[arg(long)]
    data: PathBuf,
    /// Target column: a 0-based index or a header name (default: the last column).
    #[arg(long)]
    target_column: Option<String>,
    /// Updates to contribute before exiting (0: run until stopped).
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// Give up after the server has been unreachable or failing this many seconds (0: never).
    #[arg(long, default_value_t = 300)]
    give_up_after: u64,
    /// Seconds one request may take, from connecting until the answer is read; a server that
    /// does not answer in time counts as unreachable.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = positive_secs)]
    request_timeout: f64,
    /// Local differential privacy, for a device that trusts no server: clip every update to
    /// this L2 norm and add Gaussian noise before it leaves (needs --local-dp-noise); the
    /// update then carries no loss, accuracy or example count.
    #[arg(long, value_name = "S", requires = "local_dp_noise")]
    local_dp_clip: Option<f64>,
    /// With --local-dp-clip: the noise multiplier z (noise deviation z·S per coordinate).
    #[arg(long, value_name = "Z", requires = "local_dp_clip")]
    local_dp_noise: Option<f64>,
    /// With --local-dp-clip: the δ at which the device reports the ε it spent.
    #[arg(long, value_name = "D", default_value_t = 1e-5)]
    local_dp_delta: f64,
}

/// Parses a positive, finite number of seconds.
fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Parses a `--target-column` value.
pub(crate) fn target_column(arg: Option<&str>) -> TargetColumn {
    match arg {
        None => TargetColumn::Last,
        Some(s) => s
            .parse()
            .map_or_else(|_| TargetColumn::Name(s.into()), TargetColumn::Index),
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut data = load_csv(&args.data, &target_column(args.target_column.as_deref()))?;
    if let (Some(budget), Some(dir)) = (args.storage_budget, &args.state_dir) {
        let mut store = starling_client::examples::ExampleStore::open(dir, budget)?;
        // The digest of the file last added, so a file is added once.
        let marker = dir.join("examples.added");
        let digest = {
            use sha2::Digest;
            let bytes = std::fs::read(&args.data)
                .with_context(|| format!("cannot read {}", args.data.display()))?;
            format!("{:x}", sha2::Sha256::digest(bytes))
        };
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(digest.as_str()) {
            let added = store.add(&data)?;
            std::fs::write(&marker, &digest)
                .with_context(|| format!("cannot write {}", marker.display()))?;
            tracing::info!(
                kept = added.kept,
                dropped = added.dropped,
                stored = added.stored,
                bytes = store.bytes(),
                budget,
                "local examples stored within the storage budget"
            );
        }
        if let Some(kept) = store.dataset() {
            data = kept.clone();
        }
    }
    let local_dp = match (args.local_dp_clip, args.local_dp_noise) {
        (Some(clip), Some(noise_multiplier)) => {
            let ldp = LocalDp {
                clip,
                noise_multiplier,
            };
            ldp.validate()
                .context("--local-dp-clip / --local-dp-noise")?;
            if !(args.local_dp_delta > 0.0 && args.local_dp_delta < 1.0) {
                anyhow::bail!(
                    "--local-dp-delta must be in (0, 1), not {}",
                    args.local_dp_delta
                );
            }
            Some(ldp)
        }
        _ => None,
    };
    let options = DeviceOptions {
        local_dp,
        local_dp_delta: args.local_dp_delta,
        task: args.task,
        rounds: (args.rounds > 0).then_some(args.rounds),
        give_up_after: (args.give_up_after > 0).then(|| Duration::from_secs(args.give_up_after)),
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        ..DeviceOptions::default()
    };
    let transport = match &args.ca_cert {
        None => HttpTransport::new(&args.server),
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
            HttpTransport::with_ca_certificates(&args.server, &pem)
                .with_context(|| format!("--ca-cert {}", path.display()))?
        }
    };
    let rt = crate::runtime()?;
    // An enrolled task's secret comes only from the environment, so it stays out of shell
    // history and process lists; it is used once, when --credential-file holds no credential.
    let secret = std::env::var("STARLING_ENROLLMENT_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    let transport = rt.block_on(with_credential(
        transport,
        &options.task,
        args.credential_file.as_deref(),
        secret.as_deref(),
        args.label.as_deref(),
    ))?;
    if let Some(dir) = &args.state_dir {
        let conditions = starling_core::Conditions {
            charging: args.charging,
            idle: args.idle,
            unmetered: args.unmetered,
            battery: args.battery,
        };
        return rt.block_on(run_session(
            transport,
            &options.task,
            dir,
            &data,
            &conditions,
            args.step,
            options.rounds,
        ));
    }
    tracing::info!(server = %args.server, examples = data.len(), "device starting");
    let mut device = Device::new(transport, data, options);
    let report = rt.block_on(async move {
        tokio::select! {
            r = device.run(log_event) => r.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    })?;
    match report {
        Some(r) => {
            tracing::info!(
                contributions = r.contributions,
                skipped = r.skipped,
                version = r.last_version,
                "device done"
            );
            if let Some(e) = r.local_epsilon {
                tracing::info!(
                    epsilon = e,
                    delta = args.local_dp_delta,
                    "local differential privacy: ε spent by this run's updates"
                );
            }
        }
        None => tracing::info!("device stopped"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The transport with the device's credential: read from `file` when it exists, else
/// obtained by enrolling with `secret` (and written to `file`, owner-only); unchanged when the
/// device has neither (an open task).
async fn with_credential(
    transport: HttpTransport,
    task: &str,
    file: Option<&std::path::Path>,
    secret: Option<&str>,
    label: Option<&str>,
) -> anyhow::Result<HttpTransport> {
    if let Some(path) = file.filter(|p| p.exists()) {
        let credential = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --credential-file {}", path.display()))?;
        let credential = credential.trim();
        anyhow::ensure!(
            !credential.is_empty(),
            "--credential-file {} is empty; delete it to enroll again",
            path.display()
        );
        return Ok(transport.with_credential(credential));
    }
    let Some(secret) = secret else {
        return Ok(transport);
    };
    let answer = transport
        .enroll(task, secret, label)
        .await
        .with_context(|| format!("enrolling in task `{task}`"))?;
    tracing::info!(task, device = %answer.device, "enrolled");
    if let Some(path) = file {
        write_private(path, &answer.credential)
            .with_context(|| format!("cannot write --credential-file {}", path.display()))?;
    }
    Ok(transport.with_credential(&answer.credential))
}

/// The outcome of a session step, as printed by `--step`.
fn outcome_json(o: &starling_client::Outcome) -> serde_json::Value {
    use serde_json::json;
    use starling_client::Outcome as O;
    match o {
        O::NotEligible { reason } => json!({"outcome": "not_eligible", "reason": reason}),
        O::Wait { secs, reason } => json!({"outcome": "wait", "secs": secs, "reason": reason}),
        O::Assigned { round, kind } => {
            json!({"outcome": "assigned", "round": round, "kind": kind.as_str()})
        }
        O::Downloaded { version } => json!({"outcome": "downloaded", "version": version}),
        O::Trained { examples, loss } => {
            json!({"outcome": "trained", "examples": examples, "loss": loss})
        }
        O::Scored { report } => json!({"outcome": "scored", "report": report}),
        O::Delivered {
            round,
            updates_in_round,
        } => json!({"outcome": "delivered", "round": round, "updates_in_round": updates_in_round}),
        O::Dropped { reason } => json!({"outcome": "dropped", "reason": reason}),
    }
}

/// `--state-dir`: the device as a resumable session. With `step`, one step; otherwise steps
/// until `rounds` contributions were delivered (waiting as the server or the device's
/// conditions say).
async fn run_session(
    transport: HttpTransport,
    task: &str,
    dir: &std::path::Path,
    data: &starling_core::Dataset,
    conditions: &starling_core::Conditions,
    step: bool,
    rounds: Option<u64>,
) -> anyhow::Result<ExitCode> {
    use starling_client::Outcome;
    let mut session = starling_client::Session::open(transport, task, dir)
        .with_context(|| format!("--state-dir {}", dir.display()))?;
    if step {
        let outcome = session.advance(data, conditions).await?;
        println!("{}", outcome_json(&outcome));
        return Ok(ExitCode::SUCCESS);
    }
    let mut delivered = 0u64;
    while rounds.is_none_or(|r| delivered < r) {
        let outcome = match session.advance(data, conditions).await {
            Ok(o) => o,
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "step failed; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(step = session.step().name(), "{}", outcome_json(&outcome));
        match outcome {
            Outcome::Delivered { .. } => delivered += 1,
            Outcome::Wait { secs, .. } => {
                tokio::time::sleep(Duration::from_secs_f64(secs.clamp(0.0, 60.0))).await;
            }
            Outcome::NotEligible { .. } => tokio::time::sleep(Duration::from_secs(30)).await,
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a secret to a new file only its owner can read (mode 0600 on Unix).
fn write_private(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn log_event(e: &DeviceEvent) {
    match e {
        DeviceEvent::Waiting { secs, reason } => {
            tracing::info!("{reason}; coming back in {secs:.1}s")
        }
        DeviceEvent::Training { round, version } => tracing::info!(round, version, "training"),
        DeviceEvent::Contributed {
            round,
            examples,
            loss_before,
            loss_after,
            ..
        } => tracing::info!(round, examples, loss_before, loss_after, "update accepted"),
        DeviceEvent::Evaluated {
            round,
            examples,
            loss,
            accuracy,
        } => tracing::info!(
            round,
            examples,
            loss,
            accuracy = accuracy.unwrap_or(f32::NAN),
            "evaluation reported"
        ),
        DeviceEvent::Skipped { round, reason } => {
            tracing::warn!(round, "update not used: {reason}")
        }
        DeviceEvent::Retrying { error, retry_in } => {
            tracing::warn!("{error}; retrying in {retry_in:.1?}");
        }
    }
}
