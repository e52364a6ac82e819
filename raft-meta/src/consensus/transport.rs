//! Peer transport: raft messages as length-prefixed protobuf frames over TCP.
//!
//! Shape and why:
//! - One outbound task per peer with a bounded queue. The raft thread never blocks on the network: it
//!   `try_send`s, and a full queue drops the message (raft retransmits whatever matters). While a peer is
//!   unreachable its queue is drained and dropped, raft is told (`report_unreachable`), and the task
//!   reconnects with a capped backoff.
//! - After a MsgSnapshot is written and flushed, the outcome goes back to raft (`report_snapshot`), so the
//!   leader neither waits forever on a lost snapshot nor resends one that arrived.
//! - Inbound connections start with a hello frame (magic, sender id, sender's listen address) so that a
//!   node that joined later becomes reachable without a configuration change; then raft frames follow.
//!   Frames are bounded in size, and an undecodable frame closes the connection: bad input never panics.
//! - With `PeerTls`, every connection is mutual TLS (cluster CA on both sides) before the hello; without it
//!   the port must sit on a trusted network.
//! - Only raft messages travel here. Proposals on a follower and ReadIndex requests are forwarded to the
//!   leader by raft-rs itself (MsgPropose / MsgReadIndex), so there is no second RPC protocol.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// Largest frame accepted (a snapshot travels in one message).
pub(crate) const MAX_FRAME_BYTES: usize = 256 << 20;
const HELLO_MAGIC: &[u8; 8] = b"SLRAFT01";
const MAX_HELLO_BYTES: usize = 8 + 8 + 2 + 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const WRITE_BATCH: usize = 64;

use super::PeerTls;

/// A plaintext or TLS connection.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

/// What the transport hands to the raft thread.
#[derive(Debug)]
pub(crate) enum Inbound {
    Message(Box<Message>),
    SnapshotStatus { to: u64, ok: bool },
    Unreachable { to: u64 },
    PeerAddr { id: u64, addr: SocketAddr },
}

/// Delivers to the raft thread; returns false when its queue is full (the event is dropped).
pub(crate) type Sink = Arc<dyn Fn(Inbound) -> bool + Send + Sync>;

struct Peer {
    addr: SocketAddr,
    tx: mpsc::Sender<Message>,
    task: AbortHandle,
}

struct Inner {
    id: u64,
    listen: SocketAddr,
    advertise: SocketAddr,
    rt: tokio::runtime::Handle,
    sink: Sink,
    queue_len: usize,
    tls: Option<PeerTls>,
    peers: Mutex<HashMap<u64, Peer>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
}

#[derive(Clone)]
pub(crate) struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("id", &self.inner.id).field("listen", &self.inner.listen).finish()
    }
}

impl Transport {
    /// Bind the listener now (so that an address in use fails `start`) and accept on the current runtime.
    pub fn start(
        id: u64,
        listen: SocketAddr,
        advertise: SocketAddr,
        queue_len: usize,
        tls: Option<PeerTls>,
        sink: Sink,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| std::io::Error::other("consensus must be started inside a tokio runtime"))?;
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let listen = std_listener.local_addr()?;
        let inner = Arc::new(Inner {
            id,
            listen,
            advertise,
            rt: rt.clone(),
            sink,
            queue_len,
            tls,
            peers: Mutex::new(HashMap::new()),
            listener: Mutex::new(None),
            closed: AtomicBool::new(false),
        });
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let task = rt.spawn(accept_loop(listener, Arc::clone(&inner)));
        *lock(&inner.listener) = Some(task);
        Ok(Self { inner })
    }

    /// The address announced to peers in the hello frame.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.inner.advertise
    }

    /// Set (or change) where peer `id` listens; starts its outbound task.
    pub fn set_peer(&self, id: u64, addr: SocketAddr) {
        if id == self.inner.id || self.inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut peers = lock(&self.inner.peers);
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        if let Some(old) = peers.remove(&id) {
            old.task.abort();
        }
        let (tx, rx) = mpsc::channel(self.inner.queue_len);
        let task = self.inner.rt.spawn(outbound(Arc::clone(&self.inner), id, addr, rx)).abort_handle();
        peers.insert(id, Peer { addr, tx, task });
    }

    pub fn remove_peer(&self, id: u64) {
        if let Some(p) = lock(&self.inner.peers).remove(&id) {
            p.task.abort();
        }
    }

    /// Queue a message for its recipient; never blocks. Dropped (and reported) when the queue is full.
    pub fn send(&self, msg: Message) {
        let to = msg.to;
        let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
        let sent = match lock(&self.inner.peers).get(&to) {
            Some(p) => p.tx.try_send(msg).is_ok(),
            None => false,
        };
        if !sent {
            if is_snapshot {
                (self.inner.sink)(Inbound::SnapshotStatus { to, ok: false });
            }
            (self.inner.sink)(Inbound::Unreachable { to });
        }
    }

    /// Stop accepting, close every connection.
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        if let Some(l) = lock(&self.inner.listener).as_ref() {
            l.abort();
        }
        for (_, p) in lock(&self.inner.peers).drain() {
            p.task.abort();
        }
    }

    /// `shutdown`, then wait until the listening socket is closed (so that the address can be bound again).
    pub async fn close(&self) {
        self.shutdown();
        let listener = lock(&self.inner.listener).take();
        if let Some(l) = listener {
            let _ = l.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn encode_hello(id: u64, addr: SocketAddr) -> Vec<u8> {
    let a = addr.to_string();
    let mut body = Vec::with_capacity(MAX_HELLO_BYTES);
    body.extend_from_slice(HELLO_MAGIC);
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&(a.len() as u16).to_be_bytes());
    body.extend_from_slice(a.as_bytes());
    body
}

fn decode_hello(b: &[u8]) -> Option<(u64, SocketAddr)> {
    let rest = b.strip_prefix(HELLO_MAGIC)?;
    if rest.len() < 10 {
        return None;
    }
    let id = u64::from_be_bytes(rest[..8].try_into().ok()?);
    let len = u16::from_be_bytes(rest[8..10].try_into().ok()?) as usize;
    let addr = std::str::from_utf8(rest.get(10..10 + len)?).ok()?.parse().ok()?;
    (id != 0).then_some((id, addr))
}

async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await
}

/// Read one frame of at most `max` bytes; `Ok(None)` on a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too large"));
    }
    // Grow with the data actually received rather than trusting the length for the allocation.
    let mut body = Vec::with_capacity(len.min(64 << 10));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(body))
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(inbound(stream, Arc::clone(&inner)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "raft peer accept failed");
                    tokio::time::sleep(BACKOFF_MIN).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn inbound(stream: TcpStream, inner: Arc<Inner>) {
    let _ = stream.set_nodelay(true);
    let mut stream: BoxIo = match &inner.tls {
        None => Box::new(stream),
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server));
            match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "raft peer TLS handshake refused");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let Ok(Ok(Some(hello))) = tokio::time::timeout(IO_TIMEOUT, read_frame(&mut stream, MAX_HELLO_BYTES)).await else {
        return;
    };
    let Some((from, addr)) = decode_hello(&hello) else {
        tracing::warn!("raft peer connection with a bad hello; closing");
        return;
    };
    (inner.sink)(Inbound::PeerAddr { id: from, addr });
    loop {
        let body = match read_frame(&mut stream, MAX_FRAME_BYTES).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(peer = from, error = %e, "raft peer connection closed");
                return;
            }
        };
        let Ok(msg) = Message::parse_from_bytes(&body) else {
            tracing::warn!(peer = from, "undecodable raft frame; closing the connection");
            return;
        };
        if msg.to != inner.id || msg.from != from {
            tracing::warn!(peer = from, "raft frame addressed to another node or from an impostor; closing");
            return;
        }
        // A full raft queue drops the message; raft retransmits.
        let _ = (inner.sink)(Inbound::Message(Box::new(msg)));
    }
}

async fn outbound(inner: Arc<Inner>, to: u64, addr: SocketAddr, mut rx: mpsc::Receiver<Message>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let stream = connect(&inner, addr).await;
        if let Some(stream) = stream {
            backoff = BACKOFF_MIN;
            match run_outbound(&inner, stream, &mut rx).await {
                Ok(()) => return, // queue closed: peer removed
                Err(e) => tracing::debug!(peer = to, error = %e, "raft peer connection lost"),
            }
        }
        // Unreachable: drop what is queued (raft retransmits) and tell raft.
        loop {
            match rx.try_recv() {
                Ok(m) => {
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        (inner.sink)(Inbound::SnapshotStatus { to, ok: false });
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        (inner.sink)(Inbound::Unreachable { to });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect(inner: &Inner, addr: SocketAddr) -> Option<BoxIo> {
    let Ok(Ok(stream)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await else {
        return None;
    };
    let _ = stream.set_nodelay(true);
    let Some(tls) = &inner.tls else { return Some(Box::new(stream)) };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    match tokio::time::timeout(IO_TIMEOUT, connector.connect(name, stream)).await {
        Ok(Ok(s)) => Some(Box::new(s)),
        Ok(Err(e)) => {
            tracing::warn!(peer = %addr, error = %e, "raft peer TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

async fn run_outbound(inner: &Inner, stream: BoxIo, rx: &mut mpsc::Receiver<Message>) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, stream);
    let io = |r: Result<std::io::Result<()>, tokio::time::error::Elapsed>| {
        r.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    };
    io(tokio::time::timeout(IO_TIMEOUT, async {
        write_frame(&mut w, &encode_hello(inner.id, inner.advertise)).await?;
        w.flush().await
    })
    .await)?;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        let Some(first) = rx.recv().await else { return Ok(()) };
        batch.push(first);
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshots: Vec<u64> =
            batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).map(|m| m.to).collect();
        let result = io(tokio::time::timeout(IO_TIMEOUT, async {
            for m in batch.drain(..) {
                let body = m.write_to_bytes().map_err(std::io::Error::other)?;
                write_frame(&mut w, &body).await?;
            }
            w.flush().await
        })
        .await);
        batch.clear();
        for s in snapshots {
            (inner.sink)(Inbound::SnapshotStatus { to: s, ok: result.is_ok() });
        }
        result?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_roundtrip_and_garbage() {
        let a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(decode_hello(&encode_hello(5, a)), Some((5, a)));
        assert_eq!(decode_hello(b"SLRAFT01"), None);
        assert_eq!(decode_hello(b"garbage garbage garbage"), None);
        assert_eq!(decode_hello(&encode_hello(0, a)), None);
        let h = encode_hello(5, a);
        for cut in 0..h.len() {
            assert_eq!(decode_hello(&h[..cut]), None);
        }
    }
}
