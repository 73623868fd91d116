//! `starling admin`: operate a running server through its admin API, authenticated with the
//! admin token (`STARLING_ADMIN_TOKEN`, never a flag, so it stays out of shell history and
//! process lists).

use std::process::ExitCode;

use anyhow::{bail, Context};
use starling_core::wire::protocol::{
    ErrorBody, RollbackAnswer, RollbackRequest, ADMIN_TOKEN_HEADER,
};

/// `starling admin` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum Command {
    /// Roll a task back to an earlier committed version: the open round is abandoned and the
    /// old parameters become a new version.
    Rollback(RollbackArgs),
}

/// Arguments of `starling admin rollback`.
#[derive(clap::Args)]
pub(crate) struct RollbackArgs {
    /// The server's base URL (http:// or https://).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "STARLING_SERVER")]
    server: String,
    /// Also trust the CA certificate(s) in this PEM file for an https:// server (a private
    /// CA's), beside the built-in (webpki) and the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<std::path::PathBuf>,
    /// The task.
    #[arg(long)]
    task: String,
    /// The stored version to go back to.
    #[arg(long)]
    version: u64,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(command: Command) -> anyhow::Result<ExitCode> {
    let token = std::env::var("STARLING_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .context("set STARLING_ADMIN_TOKEN to the server's admin token")?;
    match command {
        Command::Rollback(a) => crate::runtime()?.block_on(rollback(a, &token)),
    }
}

async fn rollback(a: RollbackArgs, token: &str) -> anyhow::Result<ExitCode> {
    let url = format!(
        "{}/v1/admin/tasks/{}/rollback",
        a.server.trim_end_matches('/'),
        a.task
    );
    let pem = match &a.ca_cert {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read --ca-cert {}", path.display()))?,
        ),
        None => None,
    };
    let http = starling_client::transport::http_client(pem.as_deref())
        .with_context(|| "--ca-cert".to_string())?;
    let resp = http
        .post(&url)
        .header(ADMIN_TOKEN_HEADER, token)
        .json(&RollbackRequest { version: a.version })
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body = resp.bytes().await.context("reading the answer")?;
    if !status.is_success() {
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => bail!(
                "{} ({}): {}",
                e.error.code,
                status.as_u16(),
                e.error.message
            ),
            Err(_) => bail!("the server answered {status}"),
        }
    }
    let answer: RollbackAnswer =
        serde_json::from_slice(&body).context("the server's answer is not a rollback answer")?;
    if a.json {
        println!("{}", serde_json::to_string(&answer)?);
    } else {
        println!(
            "task `{}` rolled back to version {}: it is now version {}",
            answer.task, answer.restored, answer.version
        );
    }
    Ok(ExitCode::SUCCESS)
}
