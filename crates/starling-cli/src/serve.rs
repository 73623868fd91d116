//! `starling serve`: settings from a file, the environment and flags; HTTPS with
//! `--tls-cert` and `--tls-key`; TensorBoard event files with `--tensorboard`; graceful
//! shutdown on SIGINT and SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use starling_server::{Server, Settings};

/// Arguments of `starling serve`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Settings file (TOML); see starling.example.toml.
    #[arg(long, short, env = "STARLING_CONFIG")]
    config: Option<PathBuf>,
    /// Address to bind (overrides the file and STARLING_HOST).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind (overrides the file, PORT and STARLING_PORT; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Directory for the database (overrides the file and STARLING_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// SQLite file (default: DATA_DIR/starling.db).
    #[arg(long)]
    database: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (the server's certificate first), with
    /// --tls-key (overrides the file and STARLING_TLS_CERT). Without it: plain HTTP, as
    /// behind a proxy that terminates TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (overrides the file and STARLING_TLS_KEY).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Write TensorBoard event files of every task's round history into DIR/TASK/, each
    /// round as it closes (overrides the file and STARLING_TENSORBOARD_DIR); view them with
    /// `tensorboard --logdir DIR`.
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutdown requested; finishing in-flight requests");
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(args.config.as_deref())?;
    if let Some(h) = args.host {
        settings.server.host = h;
    }
    if let Some(p) = args.port {
        settings.server.port = p;
    }
    if let Some(d) = args.data_dir {
        settings.server.data_dir = d;
    }
    if let Some(d) = args.database {
        settings.server.database = Some(d);
    }
    if let Some(c) = args.tls_cert {
        settings.server.tls_cert = Some(c);
    }
    if let Some(k) = args.tls_key {
        settings.server.tls_key = Some(k);
    }
    if let Some(d) = args.tensorboard {
        settings.server.tensorboard_dir = Some(d);
    }
    runtime_main(settings)
}

fn runtime_main(settings: Settings) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(async move {
        let db = settings.server.database_path();
        let server = Server::start(settings).await?;
        let listener = server
            .bind()
            .await
            .context("cannot bind the listening socket")?;
        let addr = listener.local_addr()?;
        for t in server.tasks() {
            let st = t.status();
            tracing::info!(
                task = t.name(), model = %t.spec().name, version = st.model.version,
                round = st.round.round, goal = st.round.goal, "serving task"
            );
        }
        let scheme = server.scheme();
        tracing::info!(database = %db.display(), "listening on {scheme}://{addr}");
        server.serve(listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}
