//! An NBD server (fixed newstyle, structured replies, `base:allocation`, TLS) over tokio.
//!
//! This is how a hypervisor reaches a Slate volume: QEMU, `qemu-nbd`-style
//! tools, libnbd clients and the kernel's nbd driver connect over a unix socket
//! or TCP, pick an export by name, and issue block requests that end up on a
//! [`BlockDevice`](crate::blockdev::BlockDevice). Layout:
//!
//! - [`proto`]: wire constants and reply encoders;
//! - [`handshake`]: option haggling (`GO`, `INFO`, `LIST`, `ABORT`,
//!   `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST/SET_META_CONTEXT`, `STARTTLS`);
//! - [`transmission`]: pipelined requests with one reply writer per connection;
//! - [`order`]: arrival-order dependencies between overlapping writes of an export;
//! - [`export`]: the registry of exports;
//! - [`tls`]: building a rustls server configuration from PEM.
//!
//! One [`NbdServer`] can listen on any number of sockets at once; each
//! connection is its own task, so a client that misbehaves (garbage, a stalled
//! handshake, a malformed request) loses only its own connection.
//! [`NbdServer::shutdown`] stops accepting, lets in-flight requests finish
//! (bounded by a grace period), then flushes every export.

pub mod export;
mod handshake;
mod order;
mod proto;
pub mod tls;
mod transmission;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use export::{Export, ExportConfig, ExportError, ExportRegistry};

/// A byte stream a connection can run over (TCP, unix socket, TLS, in-memory duplex).
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> NbdStream for T {}

pub(crate) type BoxStream = Box<dyn NbdStream>;

/// Tunables of an NBD server. `Default` gives production values.
#[derive(Clone)]
pub struct ServerConfig {
    /// Largest read or write one request may carry (advertised as the maximum block size).
    pub max_request_bytes: u32,
    /// Bytes of requests and replies one connection may have in flight.
    pub max_inflight_bytes: u32,
    /// How long the handshake may wait on the client at any one step.
    pub handshake_timeout: Duration,
    /// How long [`NbdServer::shutdown`] waits for in-flight requests before closing connections.
    pub shutdown_grace: Duration,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// When set, the server requires TLS (`NBD_OPT_STARTTLS`) before anything else.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where clients refused by mutual TLS are reported (slate-meta's security events).
    pub security: slate_dataplane::security::Reporter,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 32 << 20,
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 1024,
            tls: None,
            security: slate_dataplane::security::Reporter::none(),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_connections", &self.max_connections)
            .field("tls", &self.tls.is_some())
            .field("security", &self.security)
            .finish()
    }
}

/// Why a server could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A configuration value is out of range.
    #[error("invalid NBD server configuration: {0}")]
    Config(String),
    /// The TLS certificate or key could not be used.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// An I/O error (binding a socket, reading a PEM file).
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub(crate) struct ServerCtx {
    pub exports: Arc<ExportRegistry>,
    pub config: ServerConfig,
    pub tls: Option<TlsAcceptor>,
    /// Stop accepting and stop reading new requests.
    pub shutdown: CancellationToken,
    /// Grace period over: drop connections even with requests in flight.
    pub force_close: CancellationToken,
    pub tracker: TaskTracker,
}

/// An NBD server offering the exports of a registry. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct NbdServer {
    ctx: Arc<ServerCtx>,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("config", &self.ctx.config)
            .field("connections", &self.ctx.tracker.len())
            .field("shutting_down", &self.ctx.shutdown.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// A server for `exports`; validates `config`.
    pub fn new(exports: Arc<ExportRegistry>, config: ServerConfig) -> Result<Self, NbdError> {
        if !(4096..=(64 << 20)).contains(&config.max_request_bytes) {
            return Err(NbdError::Config("max_request_bytes must be within 4 KiB..=64 MiB".into()));
        }
        if config.max_connections == 0 {
            return Err(NbdError::Config("max_connections must be at least 1".into()));
        }
        if config.max_inflight_bytes < config.max_request_bytes {
            return Err(NbdError::Config("max_inflight_bytes must be at least max_request_bytes".into()));
        }
        let tls = config.tls.clone().map(TlsAcceptor::from);
        Ok(Self {
            ctx: Arc::new(ServerCtx {
                exports,
                config,
                tls,
                shutdown: CancellationToken::new(),
                force_close: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        })
    }

    /// The registry this server offers.
    pub fn exports(&self) -> &Arc<ExportRegistry> {
        &self.ctx.exports
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.ctx.tracker.len()
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.ctx.shutdown.is_cancelled()
    }

    /// Accept TCP connections until shutdown.
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        loop {
            let accepted = tokio::select! {
                () = self.ctx.shutdown.cancelled() => return Ok(()),
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    self.serve_stream(stream, peer.to_string());
                }
                Err(e) => accept_failed(&e).await,
            }
        }
    }

    /// Accept unix socket connections until shutdown.
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        let mut n: u64 = 0;
        loop {
            let accepted = tokio::select! {
                () = self.ctx.shutdown.cancelled() => return Ok(()),
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    n += 1;
                    self.serve_stream(stream, format!("unix#{n}"));
                }
                Err(e) => accept_failed(&e).await,
            }
        }
    }

    /// Serve one already-connected stream (in its own task).
    pub fn serve_stream<S: NbdStream + 'static>(&self, stream: S, peer: String) {
        if self.ctx.tracker.len() >= self.ctx.config.max_connections {
            warn!(peer, limit = self.ctx.config.max_connections, "too many NBD connections; refusing one");
            return;
        }
        let ctx = Arc::clone(&self.ctx);
        self.ctx.tracker.spawn(async move {
            debug!(peer, "NBD connection opened");
            let negotiated = tokio::select! {
                r = handshake::negotiate(Box::new(stream), &ctx) => r,
                () = ctx.force_close.cancelled() => Ok(None),
            };
            match negotiated {
                Ok(Some(neg)) => transmission::serve(neg, Arc::clone(&ctx), &peer).await,
                Ok(None) => debug!(peer, "NBD client left during the handshake"),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    warn!(peer, error = %e, "NBD client refused by mutual TLS");
                    if let Ok(addr) = peer.parse() {
                        let kind = slate_protocol::ops::security_kind::NBD_CERTIFICATE_REFUSED;
                        ctx.config.security.report(kind, addr, &e.to_string());
                    }
                }
                Err(e) => debug!(peer, error = %e, "NBD handshake failed"),
            }
        });
    }

    /// Stop accepting, let in-flight requests finish (at most the grace period),
    /// close every connection, then flush every export. Idempotent.
    pub async fn shutdown(&self) {
        self.ctx.shutdown.cancel();
        self.ctx.tracker.close();
        if tokio::time::timeout(self.ctx.config.shutdown_grace, self.ctx.tracker.wait()).await.is_err() {
            warn!("NBD connections still busy after the grace period; closing them");
            self.ctx.force_close.cancel();
            self.ctx.tracker.wait().await;
        }
        for export in self.ctx.exports.list() {
            if let Err(e) = export.device.flush().await {
                warn!(export = %export.config.name, error = %e, "flush at shutdown failed");
            }
        }
        info!("NBD server stopped");
    }
}

async fn accept_failed(e: &io::Error) {
    // Out of file descriptors and the like: back off instead of spinning.
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
