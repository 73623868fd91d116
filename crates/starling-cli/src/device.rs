//! `starling device`: one device training on a local CSV file, over HTTP or HTTPS (`--ca-cert`
//! for a server whose certificate a private CA signed).

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
    let data = load_csv(&args.data, &target_column(args.target_column.as_deref()))?;
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
    tracing::info!(server = %args.server, examples = data.len(), "device starting");
    let mut device = Device::new(transport, data, options);
    let report = crate::runtime()?.block_on(async move {
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
