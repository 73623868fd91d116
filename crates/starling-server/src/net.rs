//! The serving loop: accepts TCP connections and serves HTTP/1.1 on each with hyper (over
//! TLS when the server has a certificate: `tls.rs`), within limits that keep a flood of
//! clients, or a few slow ones, from taking the server down.
//!
//! - **Connections at once** (`max_connections`): a semaphore permit is taken *before*
//!   `accept`, so further clients wait in the kernel's listen queue. At start the soft
//!   `RLIMIT_NOFILE` is raised to the hard limit, and `max_connections` is clamped under it
//!   with room for the database, the listener and the runtime ([`fd_budget`]).
//! - **Connections per client address** (`max_connections_per_address`): a connection beyond
//!   its address's share is closed at once, so one address cannot use up the total.
//! - **Header and idle timeouts**, kept by a watchdog in each connection's task. A connection
//!   is in one of three phases: *head* (open, or a byte of a new request has arrived, and the
//!   request is not yet handed to the router): closed `header_timeout_secs` after the phase
//!   began; *busy* (a request is being handled or its response written): no timeout here
//!   (the upload handler bounds its body with `body_timeout_secs`); *idle* (kept alive after a
//!   response, no byte of a new request yet): closed `idle_timeout_secs` after the response.
//!   Hyper's own `header_read_timeout` is not used: it starts as soon as a kept-alive
//!   connection goes idle, so it would be an idle timeout of `header_timeout_secs` too.
//! - **TLS handshake** (with a certificate): part of the first request's head. It runs in the
//!   connection's task, holding the connection's permit and address slot, and the handshake
//!   and the first request's head together must arrive within `header_timeout_secs` of the
//!   connection opening; a client that stalls, or speaks plain HTTP to the TLS port, is
//!   dropped, and its slot freed, without touching the accept loop or other connections.
//! - **Read buffer**: hyper buffers at most [`MAX_READ_BUFFER`] per connection, which
//!   bounds a request's head (larger heads get hyper's 431).
//! - **Before routing**, each request gets its peer address (as axum's
//!   `ConnectInfo<SocketAddr>`) and a URI over [`api::MAX_URI_BYTES`] is answered 414.
//! - **Graceful shutdown**: when the shutdown future resolves the listener is closed, every
//!   connection is told to finish its request in progress and close (idle ones close at
//!   once), and whatever is still open after `shutdown_timeout_secs` is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::api;
use crate::metrics::{GaugeGuard, Metrics};
use crate::settings::ServerSettings;

/// File descriptors kept free of connections: the database and its journal, the listener,
/// standard streams, the runtime's own descriptors, and spare.
const FD_HEADROOM: u64 = 64;

/// The most a connection buffers of what it reads: bounds a request's head, and the memory
/// of a flood of connections that send endless headers.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// The serving loop's limits, from the `[server]` settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub shutdown_timeout: Duration,
}

/// Seconds from settings as a duration (validated positive; anything else counts as zero).
pub(crate) fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

impl Limits {
    pub(crate) fn from_settings(s: &ServerSettings) -> Self {
        Self {
            header_timeout: secs(s.header_timeout_secs),
            idle_timeout: secs(s.idle_timeout_secs),
            max_connections: fd_budget(s.max_connections),
            max_connections_per_address: s.max_connections_per_address,
            shutdown_timeout: secs(s.shutdown_timeout_secs),
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns `wanted` clamped under it,
/// with [`FD_HEADROOM`] to spare, warning when it clamps.
fn fd_budget(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        // Asking for the hard limit fails where it exceeds the kernel's per-process cap
        // (an unlimited hard limit): then ask for just what is needed.
        let soft = rlimit::increase_nofile_limit(u64::MAX).or_else(|_| {
            rlimit::increase_nofile_limit((wanted as u64).saturating_add(FD_HEADROOM))
        });
        match soft {
            Ok(soft) => {
                let room = usize::try_from(soft.saturating_sub(FD_HEADROOM))
                    .unwrap_or(usize::MAX)
                    .max(1);
                if wanted > room {
                    tracing::warn!(
                        max_connections = wanted,
                        open_files_limit = soft,
                        "max_connections exceeds what the open-files limit allows; serving at \
                         most {room} connections at once (raise `ulimit -n`)"
                    );
                    return room;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
        }
    }
    wanted
}

/// Serves `router` on `listener`, over TLS with `tls`, until `shutdown` resolves, then
/// drains (see the module docs).
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    metrics: Arc<Metrics>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress {
        max: limits.max_connections_per_address,
        open: Mutex::new(HashMap::new()),
    });
    let mut http = http1::Builder::new();
    // The watchdog times headers (see the module docs); without a timer hyper would warn
    // about its default header timeout on every connection.
    http.header_read_timeout(None::<Duration>)
        .keep_alive(true)
        // Hyper's read buffer, and so a request's head, is at most this per connection (its
        // default is about 400 KiB): heads beyond it get hyper's bodiless 431.
        .max_buf_size(MAX_READ_BUFFER);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    'accept: loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break 'accept,
            permit = connections.clone().acquire_owned() => {
                permit.expect("the connection semaphore is never closed")
            }
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break 'accept,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors or memory: wait for some to be freed.
                    tracing::error!(error = %e, "accept failed");
                    tokio::select! {
                        () = &mut shutdown => break 'accept,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let Some(slot) = per_address.take(peer.ip()) else {
            metrics.count_connection_refused();
            tracing::debug!(%peer, "closing a connection beyond max_connections_per_address");
            continue; // drops the stream: closed
        };
        let connection = Connection {
            peer,
            router: router.clone(),
            limits,
            _open: metrics.track_connection(),
            _permit: permit,
            _slot: slot,
        };
        tasks.spawn(connection.run(stream, tls.clone(), http.clone(), closing_rx.clone()));
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "in-flight requests did not finish within {:?}; stopping anyway",
            limits.shutdown_timeout
        );
        tasks.shutdown().await;
    }
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Open connections per client address.
struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// A slot for one more connection from `ip`, if it has fewer than `max` open.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

/// One connection's place in its address's share, given back when dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// One accepted connection and what it holds until it closes.
struct Connection {
    peer: SocketAddr,
    router: axum::Router,
    limits: Limits,
    _open: GaugeGuard,
    _permit: OwnedSemaphorePermit,
    _slot: AddressSlot,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        http: http1::Builder,
        mut closing: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        // The connection is in its head phase from now: the handshake counts against it.
        let phase = Arc::new(PhaseClock::new());
        let Some(acceptor) = tls else {
            return self.serve(stream, phase, http, closing).await;
        };
        let deadline = phase.started() + self.limits.header_timeout;
        let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
        let stream = tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "closing a connection whose TLS handshake took longer than the header timeout");
                    return;
                }
            },
            // Shutting down: a connection without a request yet is closed at once.
            _ = closing.changed() => return,
        };
        self.serve(stream, phase, http, closing).await
    }

    /// Serves HTTP/1.1 on `stream` (TCP, or TLS after the handshake) until the connection
    /// closes, times out or drains.
    async fn serve<S>(
        self,
        stream: S,
        phase: Arc<PhaseClock>,
        http: http1::Builder,
        mut closing: watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(WatchedIo {
            stream,
            phase: phase.clone(),
        });
        let (peer, router) = (self.peer, self.router.clone());
        let service_phase = phase.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let busy = RequestGuard::start(service_phase.clone());
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut router = router.clone();
            async move {
                let response = match api::check_uri(request.uri()) {
                    Err(e) => e.into_response(),
                    Ok(()) => match router.call(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    },
                };
                Ok::<_, Infallible>(response.map(|body| TrackedBody { body, _busy: busy }))
            }
        });
        let connection = http.serve_connection(io, service);
        tokio::pin!(connection);
        let mut draining = false;
        loop {
            let deadline = phase.deadline(&self.limits);
            let expiry = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(peer = %self.peer, error = %e, "connection failed");
                    }
                    return;
                }
                () = phase.changed.notified() => {}
                () = expiry => {
                    if phase.expired(&self.limits) {
                        tracing::debug!(peer = %self.peer, "closing a connection past its header or idle timeout");
                        return; // drops the connection: closed
                    }
                }
                _ = closing.changed(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Where a connection is between requests; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Busy,
    Idle,
}

/// A connection's phase, when it began, and the requests in progress.
struct PhaseClock {
    state: Mutex<(Phase, Instant, usize)>,
    changed: Notify,
}

impl PhaseClock {
    fn new() -> Self {
        Self {
            state: Mutex::new((Phase::Head, Instant::now(), 0)),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Phase, Instant, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the current phase began.
    fn started(&self) -> Instant {
        self.lock().1
    }

    /// Bytes arrived: on an idle connection, a new request has begun.
    fn bytes_read(&self) {
        let mut s = self.lock();
        if s.0 == Phase::Idle {
            *s = (Phase::Head, Instant::now(), s.2);
            drop(s);
            self.changed.notify_one();
        }
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let s = self.lock();
        match s.0 {
            Phase::Head => Some(s.1 + limits.header_timeout),
            Phase::Idle => Some(s.1 + limits.idle_timeout),
            Phase::Busy => None,
        }
    }

    fn expired(&self, limits: &Limits) -> bool {
        self.deadline(limits).is_some_and(|at| Instant::now() >= at)
    }
}

/// A request in progress, from the router's call until its response body is written (or
/// dropped); then the connection is idle.
struct RequestGuard(Arc<PhaseClock>);

impl RequestGuard {
    fn start(clock: Arc<PhaseClock>) -> Self {
        {
            let mut s = clock.lock();
            *s = (Phase::Busy, Instant::now(), s.2 + 1);
        }
        Self(clock)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        let open = s.2.saturating_sub(1);
        *s = if open == 0 {
            (Phase::Idle, Instant::now(), 0)
        } else {
            (s.0, s.1, open)
        };
        drop(s);
        self.0.changed.notify_one();
    }
}

/// A response body that holds its request's [`RequestGuard`] until hyper is done with it.
struct TrackedBody {
    body: Body,
    _busy: RequestGuard,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's stream (TCP, or TLS over it), telling the connection's [`PhaseClock`]
/// when bytes of a request arrive (with TLS: decrypted bytes, after the handshake).
struct WatchedIo<S> {
    stream: S,
    phase: Arc<PhaseClock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.phase.bytes_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
