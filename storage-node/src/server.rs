//! The data-plane server: TLS, sessions, pipelining, backpressure, dispatch to the engine.
//!
//! A connection starts with a TLS handshake in which the client proves it holds
//! its certificate; the hello's capability must be bound to that certificate
//! (see [`slate_dataplane::tls`] and [`session::open`]).
//!
//! Each connection has three parts:
//!
//! - a **reader loop** that cuts the byte stream into frames, decodes and
//!   authorizes each request in arrival order, registers it with the
//!   connection's [`OrderTracker`] (so overlapping mutations reach the engine in
//!   that order) and spawns one task per request;
//! - **request tasks** that wait for their dependencies, call the engine and
//!   hand the encoded reply to the writer;
//! - a **writer task** that owns the socket's write half and sends replies as
//!   they complete, out of order, matched by id.
//!
//! Memory is bounded per connection by a semaphore counted in bytes: a request
//! takes permits for its frame and its expected reply before it is dispatched,
//! and gives them back when its reply has been written. When the budget is
//! used up the reader stops reading, and TCP pushes back on the client.
//!
//! Failures stay as small as possible: a request that fails to decode or is
//! refused gets a typed error reply and the session goes on; only a frame that
//! cannot be trusted (bad checksum, oversized, empty) or a failed hello closes
//! the connection. Shutdown stops reading, lets in-flight requests finish and
//! flushes their replies.

use crate::engine::{EngineError, EngineHandle, ReadResult};
use crate::metrics::{Metrics, Op};
use crate::session::{self, GenerationTable, OrderTracker, Session};
use bytes::{Bytes, BytesMut};
use ed25519_dalek::VerifyingKey;
use slate_protocol::stages::Stage;
use slate_protocol::{
    decode_frame, encode_reply, now_unix_secs, ErrorKind, FrameError, Holder, NodeId, Reply, Request, WireError,
    BLOCK_SIZE_BYTES, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

/// How long a new connection may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping server waits for connections to finish their in-flight
/// requests (a client that stops reading its replies cannot hold the node up longer).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Bytes charged to every request on top of its frame and reply, so that the
/// number of requests in flight is bounded too.
const REQUEST_OVERHEAD_BYTES: usize = 4096;

/// What the server needs to know, beyond the engine.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub node_id: NodeId,
    pub verifying_key: VerifyingKey,
    pub max_inflight_bytes_per_connection: usize,
    /// TLS with a client certificate required ([`slate_dataplane::tls::server_config`]);
    /// `None` serves plain TCP and skips the holder check (tests only).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where refused hellos and TLS handshakes are reported (slate-meta).
    pub security: slate_dataplane::security::Reporter,
}

struct Ctx {
    opts: ServerOptions,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    gens: Arc<GenerationTable>,
}

/// A bound data-plane listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the data-plane listener.
    pub async fn bind(
        addr: SocketAddr,
        opts: ServerOptions,
        engine: EngineHandle,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        assert!(
            opts.max_inflight_bytes_per_connection >= 2 * slate_protocol::MAX_FRAME_PAYLOAD + REQUEST_OVERHEAD_BYTES,
            "in-flight budget must hold one largest request and its reply"
        );
        let listener = TcpListener::bind(addr).await?;
        let gens = Arc::new(GenerationTable::default());
        Ok(Self { listener, ctx: Arc::new(Ctx { opts, engine, metrics, gens }) })
    }

    /// The node's generation table, shared with the heartbeat's fence applier (`fence.rs`).
    pub fn generations(&self) -> Arc<GenerationTable> {
        Arc::clone(&self.ctx.gens)
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts and serves connections until `shutdown` becomes true, then waits
    /// for every connection to finish its in-flight requests.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        let for_conns = shutdown.clone();
        let mut next_conn: u64 = 0;
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        next_conn += 1;
                        let span = tracing::info_span!("conn", id = next_conn, %peer);
                        conns.spawn(serve_connection(stream, self.ctx.clone(), for_conns.clone()).instrument(span));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving the others.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                () = stopping(&mut shutdown) => break,
            }
        }
        drop(self.listener);
        info!(connections = conns.len(), "data plane stopping: finishing in-flight requests");
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(connections = conns.len(), "connections still busy after the grace period; closing them");
            conns.abort_all();
        }
        info!("data plane stopped");
    }
}

/// Resolves once `rx` says the node is stopping (or its sender is gone).
pub async fn stopping(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, never held across an await.
    let _ = rx.wait_for(|s| *s).await;
}

/// A reply on its way to the socket, with the budget it returns once written.
struct Outgoing {
    frame: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
    /// When the request arrived and when its reply was queued (stage timings).
    times: Option<(Instant, Instant)>,
}

type ReplyTx = mpsc::UnboundedSender<Outgoing>;

fn send(tx: &ReplyTx, id: u64, reply: &Reply, permit: Option<OwnedSemaphorePermit>) {
    // A send error means the writer is gone (connection dead): nothing to tell.
    let _ = tx.send(Outgoing { frame: encode_reply(id, reply), _permit: permit, times: None });
}

/// The id of a payload that failed to decode, if its header survived (kind: u8, id: u64 LE).
fn salvage_id(payload: &[u8]) -> Option<u64> {
    payload.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).filter(|id| *id != 0)
}

/// Bytes charged to a request: its frame, its reply, and a fixed overhead.
fn cost_of(req: Option<&Request>, payload_len: usize) -> usize {
    let reply = match req {
        Some(Request::Read { count, .. } | Request::ReadAt { count, .. }) => *count as usize * (BLOCK_SIZE_BYTES + 5),
        _ => 0,
    };
    payload_len + reply + REQUEST_OVERHEAD_BYTES
}

async fn serve_connection(stream: TcpStream, ctx: Arc<Ctx>, shutdown: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let remote = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let Some(cfg) = &ctx.opts.tls else {
        let (rd, wr) = stream.into_split();
        return serve_session(rd, wr, None, remote, ctx, shutdown).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
    let why = match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(slate_dataplane::tls::buffered(stream))).await {
        Ok(Ok(tls)) => {
            let peer = slate_dataplane::tls::peer_holder(tls.get_ref().1);
            let (rd, wr) = tokio::io::split(tls);
            return serve_session(rd, wr, peer, remote, ctx, shutdown).await;
        }
        // A peer that closes before sending anything is a port probe or a health check
        // (`slate up` waits for the port this way): counted, not reported as an attack.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ctx.metrics.sessions_refused.get_or_create(&crate::metrics::KindLabels { kind: "TlsEof".into() }).inc();
            debug!(error = %e, "connection closed before the TLS handshake");
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no TLS handshake in time".to_owned(),
    };
    ctx.metrics.sessions_refused.get_or_create(&crate::metrics::KindLabels { kind: "TlsHandshake".into() }).inc();
    info!(reason = %why, "TLS handshake refused");
    ctx.opts.security.report(slate_protocol::ops::security_kind::DATA_PLANE_TLS_REFUSED, remote, &why);
}

/// Serves one connection's requests: `peer` is the certificate hash its TLS
/// client proved it holds (`None` on a plaintext test listener).
async fn serve_session<R, W>(
    mut rd: R,
    wr: W,
    peer: Option<Holder>,
    remote: SocketAddr,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    ctx.metrics.connections_active.inc();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(wr, rx));
    let budget = Arc::new(Semaphore::new(ctx.opts.max_inflight_bytes_per_connection));
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut session: Option<Session> = None;
    let mut order = OrderTracker::default();
    let opened_at = Instant::now();

    let why = loop {
        if *shutdown.borrow() {
            break "node shutting down".to_owned();
        }
        // Cut one frame off the buffer, reading more as needed.
        let payload = match decode_frame(&mut buf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                let read = async {
                    if session.is_none() {
                        let left = HELLO_TIMEOUT.saturating_sub(opened_at.elapsed());
                        tokio::time::timeout(left, rd.read_buf(&mut buf)).await.unwrap_or_else(|_| {
                            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello in time"))
                        })
                    } else {
                        rd.read_buf(&mut buf).await
                    }
                };
                tokio::select! {
                    r = read => match r {
                        Ok(0) => break "closed by peer".to_owned(),
                        Ok(_) => continue,
                        Err(e) => break format!("read: {e}"),
                    },
                    () = stopping(&mut shutdown) => break "node shutting down".to_owned(),
                }
            }
            Err(e) => {
                ctx.metrics.malformed_frames.inc();
                let kind =
                    if matches!(e, FrameError::TooLarge(_)) { ErrorKind::TooLarge } else { ErrorKind::Malformed };
                ctx.metrics.error(kind);
                send(&tx, 0, &Reply::Error(WireError::new(kind, e.to_string())), None);
                break format!("malformed frame: {e}");
            }
        };

        let decoded = Request::decode(&payload);
        let cost = cost_of(decoded.as_ref().ok().map(|(_, r)| r), payload.len());
        // Backpressure: wait for budget before doing anything else with this request.
        let permit = match u32::try_from(cost) {
            Ok(n) => match budget.clone().acquire_many_owned(n).await {
                Ok(p) => p,
                Err(_) => break "budget closed".to_owned(),
            },
            Err(_) => break "request too large".to_owned(),
        };
        let (id, req) = match decoded {
            Ok(x) => x,
            Err(e) => {
                ctx.metrics.error(ErrorKind::Malformed);
                let err = WireError::new(ErrorKind::Malformed, e.to_string());
                if let Some(id) = salvage_id(&payload) {
                    debug!(id, error = %e, "undecodable request");
                    send(&tx, id, &Reply::Error(err), Some(permit));
                    continue;
                }
                send(&tx, 0, &Reply::Error(err), Some(permit));
                break format!("undecodable request without an id: {e}");
            }
        };

        let Some(sess) = &session else {
            // The first request must be a hello; a failed hello closes the connection.
            match hello(&ctx, &req, peer).await {
                Ok((s, reply)) => {
                    send(&tx, id, &reply, Some(permit));
                    session = Some(s);
                    continue;
                }
                Err(err) => {
                    ctx.metrics
                        .sessions_refused
                        .get_or_create(&crate::metrics::KindLabels { kind: format!("{:?}", err.kind) })
                        .inc();
                    ctx.metrics.error(err.kind);
                    info!(kind = ?err.kind, detail = %err.detail, "session refused");
                    if let Some(kind) = crate::session::kind_of_refusal(err.kind) {
                        ctx.opts.security.report(kind, remote, &err.detail);
                    }
                    send(&tx, id, &Reply::Error(err), Some(permit));
                    break "session refused".to_owned();
                }
            }
        };

        let op = Op::of(&req);
        if let Err(err) = sess.authorize(&req, now_unix_secs(), &ctx.gens) {
            debug!(id, ?op, kind = ?err.kind, detail = %err.detail, "request refused");
            ctx.metrics.observe(op, Duration::ZERO, 0, Some(err.kind));
            send(&tx, id, &Reply::Error(err), Some(permit));
            continue;
        }

        // Register in arrival order, then run concurrently.
        let (deps, done) = order.arrive(session::ordering_of(&req));
        let arrived = Instant::now();
        // A write with nothing to wait for goes to the engine from here, and the engine
        // thread queues its reply: no task per write.
        let Some((req, done, permit)) = write_now(&ctx, &tx, id, req, &deps, done, permit, arrived) else {
            continue;
        };
        let ctx = ctx.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            deps.wait().await;
            // Re-check the generation under the volume's fence: a takeover that
            // happened while this request waited must refuse it (see GenerationTable).
            let (reply, block_bytes) = match req.target() {
                Some(t) => {
                    let fence = ctx.gens.fence(t.volume);
                    let _shared = fence.read().await;
                    match ctx.gens.check(t.volume, t.generation) {
                        Ok(()) => timed_execute(&ctx.engine, req, arrived).await,
                        Err(e) => (Reply::Error(e), 0),
                    }
                }
                None => timed_execute(&ctx.engine, req, arrived).await,
            };
            drop(done);
            let error = match &reply {
                Reply::Error(e) => Some(e.kind),
                _ => None,
            };
            if let Some(kind) = error {
                debug!(id, ?op, ?kind, "request failed");
            }
            ctx.metrics.observe(op, arrived.elapsed(), block_bytes, error);
            let frame = encode_reply(id, &reply);
            let _ = tx.send(Outgoing { frame, _permit: Some(permit), times: Some((arrived, Instant::now())) });
        });
    };

    debug!(reason = %why, inflight_mutations = order.len(), "connection reader done");
    if session.is_some() {
        ctx.metrics.sessions_active.dec();
    }
    // The writer ends when the last request task drops its sender: in-flight requests finish first.
    drop(tx);
    let _ = writer.await;
    ctx.metrics.connections_active.dec();
}

/// Opens a session: capability checks, then the durable generation check in the engine.
async fn hello(ctx: &Ctx, req: &Request, peer: Option<Holder>) -> Result<(Session, Reply), WireError> {
    let Request::Hello { version, capability } = req else {
        return Err(WireError::new(ErrorKind::NoSession, "the first request of a connection must be a hello"));
    };
    let s = session::open(*version, capability, &ctx.opts.verifying_key, ctx.opts.node_id, now_unix_secs(), peer)?;
    let (volume, generation) = (s.claims.volume, s.claims.generation);
    {
        // Exclusive: waits for admitted requests of older generations to land.
        let fence = ctx.gens.fence(volume);
        let _exclusive = fence.write().await;
        ctx.engine.check_generation(volume, generation).await.map_err(|e| e.to_wire())?;
        ctx.gens.raise(volume, generation);
    }
    ctx.metrics.sessions_opened.inc();
    ctx.metrics.sessions_active.inc();
    info!(%volume, %generation, rights = ?s.claims.rights, expires = s.claims.expires_unix_secs, "session opened");
    Ok((s, Reply::HelloOk { version: PROTOCOL_VERSION, node: ctx.opts.node_id }))
}

fn done(r: Result<(), EngineError>) -> Reply {
    match r {
        Ok(()) => Reply::Done,
        Err(e) => Reply::Error(e.to_wire()),
    }
}

/// A read's reply and the block bytes it moved.
fn data(r: Result<ReadResult, EngineError>) -> (Reply, u64) {
    match r {
        Ok(r) => {
            let n = r.data.len() as u64;
            (Reply::Data { written: r.written, crcs: r.crcs, data: r.data }, n)
        }
        Err(e) => (Reply::Error(e.to_wire()), 0),
    }
}

/// Reads up to this many blocks may take the direct path (their crc check runs on the engine thread).
const DIRECT_READ_BLOCKS: u32 = 16;

/// Sends a write, or a small read of the head, to the engine at once when nothing delays
/// it (no earlier overlapping mutation in flight, the volume's fence free, the generation
/// current); the engine thread then queues the reply. Hands everything back otherwise.
#[allow(clippy::too_many_arguments)]
fn write_now(
    ctx: &Arc<Ctx>,
    tx: &ReplyTx,
    id: u64,
    req: Request,
    deps: &session::Dependencies,
    done: session::Completion,
    permit: OwnedSemaphorePermit,
    arrived: Instant,
) -> Option<(Request, session::Completion, OwnedSemaphorePermit)> {
    let target = match &req {
        Request::Write { target, .. } => *target,
        Request::Read { target, count, .. } if *count <= DIRECT_READ_BLOCKS => *target,
        _ => return Some((req, done, permit)),
    };
    if !deps.is_ready() {
        return Some((req, done, permit));
    }
    // Held until the request is answered, as on the task path (a takeover waits for it);
    // the generation is checked under it, so a takeover cannot slip in between.
    let Ok(fence) = ctx.gens.fence(target.volume).try_read_owned() else { return Some((req, done, permit)) };
    if ctx.gens.check(target.volume, target.generation).is_err() {
        return Some((req, done, permit));
    }
    let t = Instant::now();
    Stage::NodeQueue.record(t - arrived);
    let ctx2 = Arc::clone(ctx);
    let tx = tx.clone();
    // Runs on the engine thread: account, then queue the reply for the connection's writer.
    let answer = move |op: Op, reply: Reply, moved: u64| {
        Stage::Engine.since(t);
        drop(fence);
        drop(done);
        let error = match &reply {
            Reply::Error(e) => Some(e.kind),
            _ => None,
        };
        ctx2.metrics.observe(op, arrived.elapsed(), if error.is_none() { moved } else { 0 }, error);
        let frame = encode_reply(id, &reply);
        let _ = tx.send(Outgoing { frame, _permit: Some(permit), times: Some((arrived, Instant::now())) });
    };
    match req {
        Request::Write { target, start, crcs, data, .. } => {
            let n = data.len() as u64;
            let on_done = move |r: Result<(), EngineError>| answer(Op::Write, self::done(r), n);
            ctx.engine.write_with(target.volume, start, crcs, data, Box::new(on_done));
        }
        Request::Read { target, start, count, .. } => {
            let on_done = move |r: Result<ReadResult, EngineError>| {
                let (reply, n) = self::data(r);
                answer(Op::Read, reply, n);
            };
            ctx.engine.read_with(target.volume, start, count, Box::new(on_done));
        }
        _ => unreachable!("only writes and reads get here"),
    }
    None
}

/// [`execute`], recording the `node_queue` and `engine` stages.
async fn timed_execute(engine: &EngineHandle, req: Request, arrived: Instant) -> (Reply, u64) {
    let t = Instant::now();
    Stage::NodeQueue.record(t - arrived);
    let r = execute(engine, req).await;
    Stage::Engine.since(t);
    r
}

/// Runs one authorized request against the engine. Returns the reply and the block bytes moved.
async fn execute(engine: &EngineHandle, req: Request) -> (Reply, u64) {
    let Some(target) = req.target() else {
        return (Reply::Error(WireError::new(ErrorKind::NoSession, "hello sent twice")), 0);
    };
    let volume = target.volume;
    match req {
        Request::Hello { .. } => (Reply::Error(WireError::new(ErrorKind::NoSession, "hello sent twice")), 0),
        Request::Write { start, crcs, data, .. } => {
            let n = data.len() as u64;
            let r = done(engine.write(volume, start, crcs, data).await);
            let moved = if matches!(r, Reply::Done) { n } else { 0 };
            (r, moved)
        }
        Request::Read { start, count, .. } => data(engine.read(volume, start, count).await),
        Request::ReadAt { epoch, start, count, .. } => data(engine.read_at(volume, epoch, start, count).await),
        Request::Flush { .. } => (done(engine.flush(volume).await), 0),
        Request::Trim { range, .. } => (done(engine.trim(volume, range).await), 0),
        Request::WriteZeroes { range, .. } => (done(engine.write_zeroes(volume, range).await), 0),
        Request::Snapshot { epoch, .. } => (done(engine.snapshot(volume, epoch).await), 0),
        Request::ChangedBlocks { segment, from, to, .. } => {
            match engine.changed_blocks(volume, segment, from, to).await {
                Ok(ranges) => (Reply::Ranges(ranges), 0),
                Err(e) => (Reply::Error(e.to_wire()), 0),
            }
        }
        Request::DeleteLayer { segment, epoch, .. } => {
            (done(engine.delete_layer(volume, segment, epoch).await.map(drop)), 0)
        }
        Request::WriteIntents { .. } => match engine.write_intents(volume).await {
            Ok(ranges) => (Reply::Ranges(ranges), 0),
            Err(e) => (Reply::Error(e.to_wire()), 0),
        },
        Request::ClearIntents { ranges, .. } => (done(engine.clear_intents(volume, ranges).await), 0),
        Request::AssignSegment { segment, segment_blocks, .. } => {
            (done(engine.assign_segment(volume, segment, segment_blocks).await), 0)
        }
        Request::ReleaseSegment { segment, .. } => (done(engine.release_segment(volume, segment).await.map(drop)), 0),
        Request::Allocated { range, .. } => match engine.allocated(volume, range).await {
            Ok(bits) => (Reply::Bitmap(bits), 0),
            Err(e) => (Reply::Error(e.to_wire()), 0),
        },
    }
}

/// Records the `node_reply` and `node_total` stages of a reply handed to the socket's buffer.
fn written(out: &Outgoing) {
    if let Some((arrived, queued)) = out.times {
        Stage::NodeReply.since(queued);
        Stage::NodeTotal.since(arrived);
    }
}

/// Sends replies as they complete, batching whatever is ready into one flush.
async fn write_loop<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let mut healthy = true;
    while let Some(out) = rx.recv().await {
        if !healthy {
            continue; // keep draining so that budgets return and tasks finish
        }
        let mut r = wr.write_all(&out.frame).await;
        written(&out);
        drop(out);
        while r.is_ok() {
            match rx.try_recv() {
                Ok(next) => {
                    r = wr.write_all(&next.frame).await;
                    written(&next);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = r.and(wr.flush().await) {
            debug!(error = %e, "reply write failed; dropping the rest");
            healthy = false;
        }
    }
    let _ = wr.shutdown().await;
}
