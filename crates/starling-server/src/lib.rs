//! The Starling coordinator as a library: settings, storage, the round engine and the HTTP
//! API. `starling serve` is a thin wrapper around [`Server`].
//!
//! - [`settings`]: typed settings from TOML and the environment.
//! - [`store`]: the SQLite store of tasks, checkpoints and round records.
//! - [`engine`]: the round engine (one task owns each task's round state).
//! - [`api`]: the HTTP API (axum) for devices and readers; `admin`: the admin API.
//! - `secure_api`: the HTTP calls of secure aggregation's steps.
//! - [`registry`]: the hosted tasks, which the admin API creates, changes and deletes.
//! - [`ratelimit`]: rate limits per client address and per device credential.
//! - [`credentials`]: device credentials of enrolled tasks (enrollment, digests, revocation).
//! - `net`: the serving loop: accepting connections within the connection limits, the TLS
//!   handshake when the server serves HTTPS, hyper's HTTP/1.1 with header and idle timeouts,
//!   graceful shutdown.
//! - `tls`: the certificate and key of HTTPS served by the server itself (rustls).
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`tensorboard`]: TensorBoard event files of the round history (`server.tensorboard_dir`).
//! - [`web`]: the device app (the browser client), embedded and served at `/` and `/app/`.
//! - [`dashboard`]: the operator dashboard, embedded and served at `/dashboard`.

mod admin;
pub mod api;
pub mod credentials;
pub mod dashboard;
pub mod engine;
pub mod metrics;
mod net;
pub mod ratelimit;
pub mod registry;
mod secure_api;
pub mod settings;
pub mod store;
pub mod tensorboard;
mod tls;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use engine::TaskHandle;
pub use settings::Settings;

/// Errors starting or running a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad settings.
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    /// Storage failed to open.
    #[error("cannot open the database {path}: {source}")]
    Store {
        /// The database file.
        path: std::path::PathBuf,
        /// Why.
        source: store::StoreError,
    },
    /// A task failed to start.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// The listener failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS certificate or key (`server.tls_cert`, `server.tls_key`) cannot be served.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A started server: storage open, every task's engine running, not yet listening.
#[derive(Debug)]
pub struct Server {
    state: api::AppState,
    settings: Settings,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Server {
    /// Loads the TLS certificate and key if the settings name them, opens the store and
    /// starts the tasks' engines.
    pub async fn start(settings: Settings) -> Result<Self, ServerError> {
        let defs = settings.task_definitions()?;
        let tls = match (&settings.server.tls_cert, &settings.server.tls_key) {
            (Some(cert), Some(key)) => {
                Some(tls::server_config(cert, key).map_err(ServerError::Tls)?)
            }
            _ => None,
        };
        let path = settings.server.database_path();
        std::fs::create_dir_all(&settings.server.data_dir)?;
        let store = store::Store::open(&path)
            .await
            .map_err(|source| ServerError::Store {
                path: path.clone(),
                source,
            })?;
        let metrics = Arc::new(metrics::Metrics::default());
        let tasks = registry::Tasks::start(
            defs,
            store.clone(),
            metrics.clone(),
            engine::SystemClock::new(),
            settings.server.tensorboard_dir.as_deref(),
        )
        .await?;
        let credentials = credentials::Credentials::load(store.clone())
            .await
            .map_err(engine::EngineError::from)?;
        let sv = &settings.server;
        let state = api::AppState {
            tasks: Arc::new(tasks),
            credentials: Arc::new(credentials),
            metrics,
            store,
            limits: api::BodyLimits {
                max_body_bytes: sv.max_body_bytes,
                body_timeout: net::secs(sv.body_timeout_secs),
            },
            uploads: Arc::new(tokio::sync::Semaphore::new(sv.max_uploads_in_flight)),
            admin_token: sv.admin_token.clone(),
            rate_limits: Arc::new(ratelimit::RateLimits::new(
                sv.rate_limit_per_address,
                sv.rate_limit_per_credential,
                sv.enrollment_failures_per_address,
            )),
            client_address_header: sv
                .client_address_header
                .as_deref()
                .and_then(|h| axum::http::HeaderName::from_bytes(h.as_bytes()).ok()),
        };
        Ok(Self {
            state,
            settings,
            tls,
        })
    }

    /// `https` when the server serves TLS itself (`server.tls_cert`), else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The tasks' engines (those running now: the admin API adds and removes tasks).
    pub fn tasks(&self) -> Vec<TaskHandle> {
        self.state.tasks.all()
    }

    /// The HTTP router. The serving loop ([`Server::serve`]) adds, before routing, the
    /// client's address (`ConnectInfo<SocketAddr>`) and the refusal of URIs over
    /// [`api::MAX_URI_BYTES`].
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Serves HTTP (HTTPS with `server.tls_cert`) on an already-bound listener until
    /// `shutdown` resolves, then stops accepting, lets in-flight requests finish (up to
    /// `shutdown_timeout_secs`) and closes the store. Connections are limited and timed as the
    /// `[server]` settings say (see `net.rs`); this raises the process's open-files limit to
    /// serve `max_connections`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let limits = net::Limits::from_settings(&self.settings.server);
        net::serve(
            listener,
            self.router(),
            self.state.metrics.clone(),
            limits,
            self.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            shutdown,
        )
        .await;
        self.state.tasks.stop_writers().await;
        self.state.store.close().await;
        tracing::info!("server stopped");
        Ok(())
    }

    /// Binds `host:port` from the settings.
    pub async fn bind(&self) -> Result<TcpListener, ServerError> {
        let s = &self.settings.server;
        Ok(TcpListener::bind((s.host.as_str(), s.port)).await?)
    }
}

/// A server running in the background of this process (tests, the demo).
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// `https` or `http` ([`Server::scheme`]).
    pub scheme: &'static str,
    /// The tasks' engines when it started.
    pub tasks: Vec<TaskHandle>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// The base URL, `http://addr` (or `https://addr`).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.join).await.unwrap_or(Ok(()))
    }
}

/// Starts a server with these settings on `listener` in the background.
pub async fn spawn(settings: Settings, listener: TcpListener) -> Result<Running, ServerError> {
    let server = Server::start(settings).await?;
    let addr = listener.local_addr()?;
    let tasks = server.tasks();
    let scheme = server.scheme();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        scheme,
        tasks,
        stop: Some(tx),
        join,
    })
}
