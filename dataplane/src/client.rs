//! An async data-plane client for one storage node.
//!
//! One TLS connection (see [`crate::tls`]), one session (opened by a hello carrying a signed
//! capability), many requests in flight. [`NodeClient`] is a cheap, cloneable
//! handle: a writer task owns the socket's write half and sends frames in the
//! order [`NodeClient::start`] was called; a reader task owns the read half and
//! completes each pending request by its id, so replies may come back in any
//! order. Because `start` enqueues synchronously, a caller that issues
//! overlapping writes one after another knows they reach the node in that order
//! (the node then applies them in that order): the volume client relies on it
//! to keep replicas identical.
//!
//! Errors are typed: a node's error reply becomes [`ClientError::Remote`] with
//! the wire error kind; a lost connection fails every pending request with
//! [`ClientError::Closed`].

use crate::tls::{Connector, Stream};
use bytes::{Bytes, BytesMut};
use slate_protocol::message::BlockRange;
use slate_protocol::{
    decode_frame, encode_request_parts, BlockIndex, Epoch, NodeId, Reply, Request, SignedCapability, Target, WireError,
    BLOCK_SIZE_BYTES, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use slate_protocol::stages::Stage;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};

/// Why a request did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error.
    #[error("node refused: {0}")]
    Remote(WireError),
    /// The connection is gone (closed by the node, reset, or the client was dropped).
    #[error("connection closed: {0}")]
    Closed(String),
    /// Connecting failed.
    #[error("connect to {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    /// The node sent something this client does not understand.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No reply within the timeout the request was started with.
    #[error("no reply in time")]
    Timeout,
}

impl ClientError {
    /// The wire error kind, when the node refused the request.
    pub fn kind(&self) -> Option<slate_protocol::ErrorKind> {
        match self {
            Self::Remote(e) => Some(e.kind),
            _ => None,
        }
    }
}

type Pending = Arc<Mutex<PendingMap>>;

/// Called with a request's outcome, on the connection's reader task: it must not block.
pub type OnReply = Box<dyn FnOnce(Result<Reply, ClientError>) + Send>;

/// Where a request's outcome goes.
enum Waiter {
    Slot(oneshot::Sender<Result<Reply, ClientError>>),
    Call(OnReply),
}

impl Waiter {
    fn finish(self, r: Result<Reply, ClientError>) {
        match self {
            Waiter::Slot(tx) => drop(tx.send(r)),
            Waiter::Call(f) => f(r),
        }
    }
}

/// A request waiting for its reply.
struct Waiting {
    waiter: Waiter,
    /// When its frame was queued (the `replica` stage).
    queued: Instant,
    /// When it times out (requests started with [`NodeClient::start_with`]).
    deadline: Option<Instant>,
}

#[derive(Default)]
struct PendingMap {
    waiting: HashMap<u64, Waiting>,
    /// Requests failed by their deadline whose reply may still come (and is then dropped).
    timed_out: std::collections::HashSet<u64>,
    /// Set once the connection is gone; later requests fail at once with it.
    closed: Option<ClientError>,
}

impl std::fmt::Debug for PendingMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingMap")
            .field("waiting", &self.waiting.len())
            .field("timed_out", &self.timed_out.len())
            .field("closed", &self.closed)
            .finish()
    }
}

/// How often the reader looks for requests past their deadline.
const TIMEOUT_SWEEP: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug)]
struct Inner {
    /// Frames in two parts (see `encode_request_parts`): a write's data is not copied.
    frames: mpsc::UnboundedSender<(Bytes, Bytes)>,
    pending: Pending,
    next_id: AtomicU64,
    node: NodeId,
    peer: SocketAddr,
    capability: SignedCapability,
}

/// A session with one storage node. Clone it freely; all clones share the connection.
#[derive(Clone, Debug)]
pub struct NodeClient {
    inner: Arc<Inner>,
}

/// The reply to one request, resolved when it arrives.
#[derive(Debug)]
pub struct ReplyFuture {
    state: ReplyState,
}

#[derive(Debug)]
enum ReplyState {
    Waiting(oneshot::Receiver<Result<Reply, ClientError>>),
    Failed(Option<ClientError>),
}

impl Future for ReplyFuture {
    type Output = Result<Reply, ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            ReplyState::Failed(e) => {
                Poll::Ready(Err(e.take().unwrap_or_else(|| ClientError::Closed("polled twice".into()))))
            }
            ReplyState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(r)) => Poll::Ready(r),
                Poll::Ready(Err(_)) => Poll::Ready(Err(ClientError::Closed("connection task ended".into()))),
            },
        }
    }
}

fn fail_all(pending: &Pending, err: &ClientError) {
    let waiting = {
        let mut p = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.closed.is_none() {
            p.closed = Some(err.clone());
        }
        std::mem::take(&mut p.waiting)
    };
    for (_, w) in waiting {
        w.waiter.finish(Err(err.clone()));
    }
}

impl NodeClient {
    /// Connects over plain TCP (a node started without TLS: in-process tests only),
    /// sends the hello with `capability` and waits for the node to accept it.
    pub async fn connect(addr: SocketAddr, capability: SignedCapability) -> Result<Self, ClientError> {
        Self::connect_with(&Connector::plaintext(), addr, capability).await
    }

    /// Connects through `connector` (TLS with the client's certificate, which
    /// `capability` must be bound to), sends the hello and waits for the node to accept it.
    pub async fn connect_with(
        connector: &Connector,
        addr: SocketAddr,
        capability: SignedCapability,
    ) -> Result<Self, ClientError> {
        let stream = connector.connect(addr).await.map_err(|e| ClientError::Connect { addr, detail: e.to_string() })?;
        let pending: Pending = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        match stream {
            Stream::Plain(tcp) => {
                let (rd, wr) = tcp.into_split();
                tokio::spawn(write_loop(wr, rx, pending.clone()));
                tokio::spawn(read_loop(rd, pending.clone()));
            }
            Stream::Tls(tls) => {
                let (rd, wr) = tokio::io::split(*tls);
                tokio::spawn(write_loop(wr, rx, pending.clone()));
                tokio::spawn(read_loop(rd, pending.clone()));
            }
        }

        // The hello is request id 0's successor: ids start at 1 so that 0 means "connection-level".
        let (hello_tx, hello_rx) = oneshot::channel();
        pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .waiting
            .insert(1, Waiting { waiter: Waiter::Slot(hello_tx), queued: Instant::now(), deadline: None });
        let hello = Request::Hello { version: PROTOCOL_VERSION, capability: capability.clone() };
        tx.send(encode_request_parts(1, &hello)).map_err(|_| ClientError::Closed("writer ended".into()))?;
        let reply = hello_rx.await.map_err(|_| ClientError::Closed("connection task ended".into()))??;
        let node = match reply {
            Reply::HelloOk { version, node } if version == PROTOCOL_VERSION => node,
            Reply::HelloOk { version, .. } => {
                return Err(ClientError::Protocol(format!("node speaks version {version}")))
            }
            Reply::Error(e) => return Err(ClientError::Remote(e)),
            other => return Err(ClientError::Protocol(format!("unexpected hello reply {other:?}"))),
        };
        let inner = Inner { frames: tx, pending, next_id: AtomicU64::new(2), node, peer: addr, capability };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The node's id, as it announced in its hello reply.
    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    /// The node's address.
    pub fn peer(&self) -> SocketAddr {
        self.inner.peer
    }

    /// The volume and generation of this session's capability (what requests are normally tagged with).
    pub fn target(&self) -> Target {
        let c = &self.inner.capability.claims;
        Target { volume: c.volume, generation: c.generation }
    }

    /// Sends `req` now (frames leave in the order of `start` calls) and returns its reply's future.
    pub fn start(&self, req: &Request) -> ReplyFuture {
        let (tx, rx) = oneshot::channel();
        match self.enqueue(req, Waiter::Slot(tx), None) {
            Ok(()) => ReplyFuture { state: ReplyState::Waiting(rx) },
            Err((e, _)) => ReplyFuture { state: ReplyState::Failed(Some(e)) },
        }
    }

    /// Sends `req` now, like [`NodeClient::start`], and calls `on_reply` with its outcome
    /// from the connection's reader task: no task or timer per request. Without a reply
    /// within `timeout` the outcome is [`ClientError::Timeout`] (checked every 250 ms).
    pub fn start_with(&self, req: &Request, timeout: std::time::Duration, on_reply: OnReply) {
        if let Err((e, w)) = self.enqueue(req, Waiter::Call(on_reply), Some(Instant::now() + timeout)) {
            w.finish(Err(e));
        }
    }

    fn enqueue(&self, req: &Request, waiter: Waiter, deadline: Option<Instant>) -> Result<(), (ClientError, Waiter)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut p = self.inner.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = &p.closed {
            return Err((e.clone(), waiter));
        }
        p.waiting.insert(id, Waiting { waiter, queued: Instant::now(), deadline });
        // Encoding under the lock keeps the channel order equal to the call order across threads.
        if self.inner.frames.send(encode_request_parts(id, req)).is_err() {
            let w = p.waiting.remove(&id).map(|w| w.waiter);
            return Err((ClientError::Closed("writer ended".into()), w.expect("just inserted")));
        }
        Ok(())
    }

    /// Sends `req` and waits for its reply; an error reply becomes [`ClientError::Remote`].
    pub async fn request(&self, req: Request) -> Result<Reply, ClientError> {
        match self.start(&req).await? {
            Reply::Error(e) => Err(ClientError::Remote(e)),
            r => Ok(r),
        }
    }

    /// Writes whole blocks at `start` under this session's target, computing their crcs.
    pub async fn write_blocks(&self, start: BlockIndex, data: Bytes) -> Result<(), ClientError> {
        let req = write_request(self.target(), start, data)?;
        match self.request(req).await? {
            Reply::Done => Ok(()),
            other => Err(ClientError::Protocol(format!("unexpected write reply {other:?}"))),
        }
    }

    /// Reads `count` blocks at `start`; checks every written block's crc; unwritten blocks are zeros.
    pub async fn read_blocks(&self, start: BlockIndex, count: u32) -> Result<Bytes, ClientError> {
        self.read_request(Request::Read { target: self.target(), start, count }, start, count).await
    }

    /// Reads `count` blocks at `start` as they were in the snapshot frozen at `epoch`
    /// (through the layers frozen at or before it); checked like [`NodeClient::read_blocks`].
    pub async fn read_blocks_at(&self, epoch: Epoch, start: BlockIndex, count: u32) -> Result<Bytes, ClientError> {
        self.read_request(Request::ReadAt { target: self.target(), epoch, start, count }, start, count).await
    }

    async fn read_request(&self, req: Request, start: BlockIndex, count: u32) -> Result<Bytes, ClientError> {
        match self.request(req).await? {
            Reply::Data { written, crcs, data } => {
                check_data(start, count, &written, &crcs, &data)?;
                Ok(data)
            }
            other => Err(ClientError::Protocol(format!("unexpected read reply {other:?}"))),
        }
    }

    /// Unmaps blocks.
    pub async fn trim(&self, range: BlockRange) -> Result<(), ClientError> {
        self.request(Request::Trim { target: self.target(), range }).await.map(drop)
    }

    /// Durability barrier.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(Request::Flush { target: self.target() }).await.map(drop)
    }
}

/// Builds a write request for whole blocks, computing each block's crc32c.
pub fn write_request(target: Target, start: BlockIndex, data: Bytes) -> Result<Request, ClientError> {
    if data.is_empty() || !data.len().is_multiple_of(BLOCK_SIZE_BYTES) {
        return Err(ClientError::Protocol(format!("write of {} bytes is not whole blocks", data.len())));
    }
    let crcs = data.chunks(BLOCK_SIZE_BYTES).map(slate_protocol::block_crc).collect();
    Ok(Request::Write { target, start, fua: false, crcs, data })
}

/// Checks a data reply against the request and every written block against its crc.
pub fn check_data(start: BlockIndex, count: u32, written: &[u8], crcs: &[u32], data: &[u8]) -> Result<(), ClientError> {
    let n = count as usize;
    if crcs.len() != n || data.len() != n * BLOCK_SIZE_BYTES || written.len() != n.div_ceil(8) {
        return Err(ClientError::Protocol("read reply has the wrong size".into()));
    }
    for (i, (block, crc)) in data.chunks(BLOCK_SIZE_BYTES).zip(crcs).enumerate() {
        let ok = if slate_protocol::message::bit(written, i) {
            slate_protocol::block_crc(block) == *crc
        } else {
            block.iter().all(|b| *b == 0)
        };
        if !ok {
            let at = BlockIndex(start.0 + i as u64);
            return Err(ClientError::Protocol(format!("block {at} does not match its crc in transit")));
        }
    }
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<(Bytes, Bytes)>, pending: Pending) {
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    while let Some((head, data)) = rx.recv().await {
        let mut result = write_parts(&mut wr, &head, &data).await;
        while result.is_ok() {
            match rx.try_recv() {
                Ok((head, data)) => result = write_parts(&mut wr, &head, &data).await,
                Err(_) => break,
            }
        }
        if let Err(e) = result.and(wr.flush().await) {
            fail_all(&pending, &ClientError::Closed(format!("write: {e}")));
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Writes one frame's two parts, in order.
async fn write_parts<W: AsyncWrite + Unpin>(wr: &mut BufWriter<W>, head: &[u8], data: &[u8]) -> std::io::Result<()> {
    wr.write_all(head).await?;
    if !data.is_empty() {
        wr.write_all(data).await?;
    }
    Ok(())
}

/// Fails the requests whose deadline has passed.
fn sweep_timeouts(pending: &Pending) {
    let now = Instant::now();
    let expired: Vec<Waiting> = {
        let mut p = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ids: Vec<u64> =
            p.waiting.iter().filter(|(_, w)| w.deadline.is_some_and(|d| d <= now)).map(|(id, _)| *id).collect();
        p.timed_out.extend(ids.iter().copied());
        ids.into_iter().filter_map(|id| p.waiting.remove(&id)).collect()
    };
    for w in expired {
        w.waiter.finish(Err(ClientError::Timeout));
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut rd: R, pending: Pending) {
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut sweep = tokio::time::interval(TIMEOUT_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        match decode_frame(&mut buf) {
            Err(e) => break ClientError::Protocol(format!("bad frame from node: {e}")),
            Ok(Some(payload)) => match Reply::decode(&payload) {
                Err(e) => break ClientError::Protocol(format!("bad reply from node: {e}")),
                Ok((0, Reply::Error(e))) => break ClientError::Remote(e),
                Ok((id, reply)) => {
                    let (tx, late) = {
                        let mut p = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let w = p.waiting.remove(&id);
                        let late = w.is_none() && p.timed_out.remove(&id);
                        (w, late)
                    };
                    match tx {
                        Some(w) => {
                            Stage::Replica.since(w.queued);
                            w.waiter.finish(Ok(reply));
                        }
                        // A request that timed out (its outcome was given already) gets its reply late.
                        None if late => {}
                        None => break ClientError::Protocol(format!("reply for unknown request id {id}")),
                    }
                }
            },
            Ok(None) => tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => break ClientError::Closed("closed by node".into()),
                    Ok(_) => {}
                    Err(e) => break ClientError::Closed(format!("read: {e}")),
                },
                _ = sweep.tick() => sweep_timeouts(&pending),
            },
        }
    };
    fail_all(&pending, &why);
}
