//! Consensus: replicates an opaque command log with raft-rs and applies it to a [`StateMachine`].
//!
//! Why it is shaped so:
//! - One owner: a dedicated OS thread (the "raft thread", see `node.rs`) owns the `RawNode`, the
//!   log store and the state machine. Everything else talks to it through one bounded channel of
//!   events, so there is no shared mutable state besides the published [`Status`].
//! - Generic over the state machine: consensus knows nothing about tenants or keys; it moves bytes
//!   and calls [`StateMachine::apply`]. The state helper's service plugs in its own machine.
//! - Log storage is TiKV's `raft-engine` (`storage.rs`), snapshots are files (`snapshot.rs`), the
//!   peer transport is length-prefixed protobuf frames over TCP (`transport.rs`).
//! - Writes can be proposed on any node: a follower hands the proposal to raft-rs, which forwards
//!   it to the leader over the peer transport; the proposer learns the result when it applies the
//!   entry itself (every node applies every entry), matched by (node id, boot id, request id)
//!   carried in the entry context. Reads use ReadIndex (`read_barrier`).
//! - Every call has a deadline; nothing waits forever.

mod codec;
mod node;
mod slog_bridge;
mod snapshot;
mod storage;
pub use storage::read_log_entries;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// The replicated state machine driven by consensus. Implemented by the metadata state.
pub trait StateMachine: Send + 'static {
    /// Apply one committed command (opaque bytes produced by the state helper), at raft log `index`.
    /// Deterministic: same commands in the same order -> same state and same response on every node.
    /// Returns the response bytes handed back to the proposer.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    /// As [`StateMachine::apply`], told whether this node proposed the entry (its caller waits
    /// here for the response). The state change must not depend on it; only the response may
    /// (e.g. key material opened for the proposer alone).
    fn apply_proposed(&mut self, index: u64, command: &[u8], proposed_here: bool) -> Vec<u8> {
        let _ = proposed_here;
        self.apply(index, command)
    }
    /// The index of the last applied entry, as durably persisted with the state (passed to raft `Config.applied`
    /// on restart).
    fn applied_index(&self) -> u64;
    /// Serialize the whole state (for raft snapshots sent to lagging followers and for compaction).
    fn snapshot(&self) -> Vec<u8>;
    /// Replace the state by a snapshot taken at `index`.
    fn restore(&mut self, index: u64, snapshot: &[u8]) -> Result<(), String>;
    /// Persist state durably (fsync): called by consensus before log compaction.
    fn persist(&mut self) -> std::io::Result<()>;
    /// After apply(): true if the log up to the applied index must be purged from every file (crypto-shred).
    fn take_purge_request(&mut self) -> bool;
}

/// Default size of one raft-engine log file.
pub const DEFAULT_LOG_FILE_BYTES: u64 = 8 << 20;
/// Default total size of the log files beyond which compacted ones are deleted.
pub const DEFAULT_LOG_PURGE_BYTES: u64 = 64 << 20;

/// Configuration of one consensus member. Build with [`ConsensusConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct ConsensusConfig {
    /// This node's raft id (non-zero, unique in the cluster, never reused).
    pub id: u64,
    /// Known members and their peer addresses. When bootstrapping (`join == false`) this is the initial
    /// voter set and must contain `id`. When joining, it only tells where existing members listen.
    pub peers: Vec<(u64, SocketAddr)>,
    /// Start as an empty node that waits to be added with [`ConsensusHandle::add_node`] by the cluster
    /// (it learns the membership and state from the leader's snapshot). Ignored once the data dir is initialized.
    pub join: bool,
    /// Directory for the raft log (`raft-log/`) and snapshots (`snapshots/`). Created if missing.
    pub data_dir: PathBuf,
    /// Address the peer transport listens on.
    pub listen: SocketAddr,
    /// Raft tick interval.
    pub tick: Duration,
    /// Election timeout in ticks (randomized by raft in [election, 2*election)).
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log once this many entries were applied since the last snapshot.
    pub snapshot_every_entries: u64,
    /// Size at which raft-engine starts a new log file.
    pub log_file_bytes: u64,
    /// Once the log files total more than this, compacted files are deleted (raft-engine's purge
    /// threshold): with snapshots every `snapshot_every_entries`, the log directory stays near
    /// this size plus one file.
    pub log_purge_bytes: u64,
    /// How long a proposal, conf change or read barrier may take before `Err(Timeout)`.
    pub request_timeout: Duration,
    /// How long a request waits for a leader to become known before `Err(NoLeader)`.
    pub no_leader_timeout: Duration,
    /// Largest command accepted by `propose`.
    pub max_command_bytes: usize,
    /// Capacity of the per-peer outbound queue (messages beyond it are dropped; raft retransmits).
    pub peer_queue_len: usize,
    /// Mutual TLS on the peer transport. `None` = plaintext (only on a trusted network: whoever reaches the
    /// peer port can speak raft, including proposing commands).
    pub tls: Option<PeerTls>,
}

/// Mutual TLS for the peer transport: every node presents a certificate of the cluster CA and verifies the
/// peer's. The client side verifies the server against the IP address it dialed, so node certificates must
/// carry their peer IP as a subject alternative name.
#[derive(Clone)]
pub struct PeerTls {
    /// Accepting side; must require and verify client certificates.
    pub server: Arc<rustls::ServerConfig>,
    /// Connecting side; trusts the cluster CA and presents this node's certificate.
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls(..)")
    }
}

impl PeerTls {
    /// Mutual TLS from PEM: the cluster CA certificate(s), this node's certificate chain and private key.
    /// Uses the ring provider explicitly (no process-wide provider needed).
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, ConsensusError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| ConsensusError::Config(format!("peer TLS {what}: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
            roots.add(c.map_err(|e| bad("CA", &e))?).map_err(|e| bad("CA", &e))?;
        }
        if roots.is_empty() {
            return Err(ConsensusError::Config("peer TLS CA: no certificate".to_owned()));
        }
        let roots = Arc::new(roots);
        let chain: Vec<_> =
            rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<_, _>>().map_err(|e| bad("cert", &e))?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| bad("key", &e))?
            .ok_or_else(|| ConsensusError::Config("peer TLS key: none found".to_owned()))?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider.clone())
                .build()
                .map_err(|e| bad("client verifier", &e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("server", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| bad("server cert", &e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("client", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("client cert", &e))?;
        Ok(Self { server: Arc::new(server), client: Arc::new(client) })
    }
}

impl ConsensusConfig {
    /// Defaults: 100 ms tick, election after 10 ticks, heartbeat every 2, snapshot every 10,000 entries,
    /// 10 s request timeout, 3 s no-leader timeout, 8 MiB commands.
    pub fn new(id: u64, listen: SocketAddr, peers: Vec<(u64, SocketAddr)>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            peers,
            join: false,
            data_dir: data_dir.into(),
            listen,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every_entries: 10_000,
            log_file_bytes: DEFAULT_LOG_FILE_BYTES,
            log_purge_bytes: DEFAULT_LOG_PURGE_BYTES,
            request_timeout: Duration::from_secs(10),
            no_leader_timeout: Duration::from_secs(3),
            max_command_bytes: 8 << 20,
            peer_queue_len: 4096,
            tls: None,
        }
    }

    /// Check the relations between the settings.
    pub fn validate(&self) -> Result<(), ConsensusError> {
        let bad = |m: &str| Err(ConsensusError::Config(m.to_owned()));
        if self.id == 0 {
            return bad("id must be non-zero");
        }
        if !self.join && !self.peers.iter().any(|(id, _)| *id == self.id) {
            return bad("peers must contain this node's id when bootstrapping");
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) || ids.contains(&0) {
            return bad("peer ids must be unique and non-zero");
        }
        if self.tick.is_zero() || self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return bad("need tick > 0, heartbeat_ticks > 0 and election_ticks > heartbeat_ticks");
        }
        if self.snapshot_every_entries == 0 {
            return bad("snapshot_every_entries must be > 0");
        }
        if self.log_file_bytes < 64 << 10 || self.log_purge_bytes < self.log_file_bytes {
            return bad("need log_file_bytes >= 64 KiB and log_purge_bytes >= log_file_bytes");
        }
        if self.max_command_bytes == 0 || self.max_command_bytes > transport::MAX_FRAME_BYTES / 2 {
            return bad("max_command_bytes must be in 1..=MAX_FRAME_BYTES/2");
        }
        if self.peer_queue_len == 0 {
            return bad("peer_queue_len must be > 0");
        }
        if self.request_timeout.is_zero() || self.no_leader_timeout.is_zero() {
            return bad("timeouts must be > 0");
        }
        Ok(())
    }
}

/// Raft role of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    /// The node hit a fatal storage error and stopped participating.
    Failed,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
            Role::Failed => "failed",
        }
    }
}

/// A snapshot of this node's consensus state, for metrics and `/status`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub id: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub role: Role,
    /// Current voters and their addresses (when known).
    pub peers: Vec<(u64, Option<SocketAddr>)>,
    /// Index of the latest snapshot (the log before it is compacted).
    pub snapshot_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// Applied index up to which this node purged its log files (crypto-shred): every
    /// entry at or below it is gone from this node's disk.
    pub purged_index: u64,
}

/// The one error type of consensus.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// No leader became known within `no_leader_timeout` (election in progress or quorum lost). Not applied.
    #[error("no raft leader is known; retry later")]
    NoLeader,
    /// The request did not complete within `request_timeout`. A proposal may or may not have been applied.
    #[error("timed out waiting for raft; the operation may or may not have been applied")]
    Timeout,
    /// Raft refused the proposal; it was not applied.
    #[error("proposal dropped by raft; it was not applied")]
    Dropped,
    /// A membership change is already in progress.
    #[error("a membership change is already in progress")]
    ConfChangePending,
    /// The membership change makes no sense (adding a member twice, removing an unknown one, ...).
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("command of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// The raft thread's queue is full.
    #[error("consensus is overloaded; retry")]
    Busy,
    #[error("consensus is shut down")]
    Shutdown,
    #[error("invalid consensus configuration: {0}")]
    Config(String),
    /// The log store or snapshot files failed; the node stopped participating.
    #[error("consensus storage failure: {0}")]
    Storage(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

type Reply<T> = oneshot::Sender<Result<T, ConsensusError>>;
type ReadFn<S> = Box<dyn FnOnce(&S) + Send>;

/// Requests from handles to the raft thread.
pub(crate) enum Event<S> {
    Propose { command: Vec<u8>, reply: Reply<Vec<u8>> },
    ConfChange { change: MembershipChange, reply: Reply<()> },
    ReadIndex { reply: Reply<()> },
    Read { f: ReadFn<S> },
    Transport(transport::Inbound),
}

#[derive(Debug, Clone)]
pub(crate) enum MembershipChange {
    Add(u64, SocketAddr),
    Remove(u64),
}

struct Shared {
    status: Mutex<Status>,
}

/// A running consensus member: the raft thread plus the peer transport. Stop it with [`Consensus::shutdown`].
pub struct Consensus {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    transport: transport::Transport,
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus").finish_non_exhaustive()
    }
}

/// A cheap, cloneable handle to a running consensus member.
pub struct ConsensusHandle<S> {
    tx: SyncSender<Event<S>>,
    shared: Arc<Shared>,
    request_timeout: Duration,
    no_leader_timeout: Duration,
    max_command_bytes: usize,
}

impl<S> Clone for ConsensusHandle<S> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
            request_timeout: self.request_timeout,
            no_leader_timeout: self.no_leader_timeout,
            max_command_bytes: self.max_command_bytes,
        }
    }
}

impl<S: 'static> std::fmt::Debug for ConsensusHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsensusHandle").field("id", &self.status().id).finish_non_exhaustive()
    }
}

impl Consensus {
    /// Open (or initialize) the data dir, bind the peer listener and start the raft thread.
    /// Must be called from within a tokio runtime (the transport runs on it).
    pub fn start<S: StateMachine>(
        cfg: ConsensusConfig,
        sm: S,
    ) -> Result<(Consensus, ConsensusHandle<S>), ConsensusError> {
        node::start(cfg, sm)
    }

    /// Stop the raft thread (pending requests fail with `Shutdown`) and the transport, and wait for
    /// the log store to be closed, so that the data dir can be reopened.
    pub async fn shutdown(self) {
        let mut this = self;
        this.stop.store(true, Ordering::SeqCst);
        if let Some(join) = this.thread.take() {
            let _ = tokio::task::spawn_blocking(move || join.join()).await;
        }
        this.transport.close().await;
    }
}

impl Drop for Consensus {
    fn drop(&mut self) {
        // Dropped without `shutdown`: stop the thread and the transport, but do not block.
        self.stop.store(true, Ordering::SeqCst);
        self.transport.shutdown();
    }
}

impl<S: 'static> ConsensusHandle<S> {
    fn send(&self, ev: Event<S>) -> Result<(), ConsensusError> {
        match self.tx.try_send(ev) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ConsensusError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(self.dead_error()),
        }
    }

    fn dead_error(&self) -> ConsensusError {
        if self.status().role == Role::Failed {
            ConsensusError::Storage("the raft thread stopped after a storage failure".to_owned())
        } else {
            ConsensusError::Shutdown
        }
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, ConsensusError>>) -> Result<T, ConsensusError> {
        // The raft thread enforces the deadlines itself; this outer bound only guards against a stuck thread.
        let bound = self.request_timeout + self.no_leader_timeout + Duration::from_secs(5);
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.dead_error()),
            Err(_) => Err(ConsensusError::Timeout),
        }
    }

    /// Propose a command; resolves with `apply()`'s response once committed and applied on THIS node.
    /// On a follower the proposal is forwarded to the leader by raft; the response comes from this node's own
    /// apply of the entry. Fails with `NoLeader` if no leader is known within `no_leader_timeout` (not applied),
    /// `Timeout` after `request_timeout` (may or may not have been applied).
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ConsensusError> {
        if command.len() > self.max_command_bytes {
            return Err(ConsensusError::TooLarge { size: command.len(), max: self.max_command_bytes });
        }
        let (reply, rx) = oneshot::channel();
        self.send(Event::Propose { command, reply })?;
        self.wait(rx).await
    }

    /// Linearizable read barrier (ReadIndex): resolves when this node has applied everything that was committed
    /// when the call was made. Follow it with [`ConsensusHandle::read`].
    pub async fn read_barrier(&self) -> Result<(), ConsensusError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::ReadIndex { reply })?;
        self.wait(rx).await
    }

    /// Run a closure against the state machine on the raft thread (no barrier: may be stale on a follower;
    /// call [`ConsensusHandle::read_barrier`] first, or use [`ConsensusHandle::linearizable_read`]).
    pub async fn read<R: Send + 'static>(&self, f: impl FnOnce(&S) -> R + Send + 'static) -> Result<R, ConsensusError> {
        let (tx, rx) = oneshot::channel();
        let f: ReadFn<S> = Box::new(move |s: &S| {
            let _ = tx.send(Ok(f(s)));
        });
        self.send(Event::Read { f })?;
        self.wait(rx).await
    }

    /// `read_barrier` then `read`.
    pub async fn linearizable_read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> R + Send + 'static,
    ) -> Result<R, ConsensusError> {
        self.read_barrier().await?;
        self.read(f).await
    }

    /// The latest published status (updated by the raft thread after every event).
    pub fn status(&self) -> Status {
        self.shared.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Add a voter. One membership change at a time: `Err(ConfChangePending)` while another is in flight.
    /// Resolves once the change is applied on this node. Start the new node with `join = true` first or after.
    pub async fn add_node(&self, id: u64, addr: SocketAddr) -> Result<(), ConsensusError> {
        if id == 0 {
            return Err(ConsensusError::Membership("node id 0 is invalid".to_owned()));
        }
        let (reply, rx) = oneshot::channel();
        self.send(Event::ConfChange { change: MembershipChange::Add(id, addr), reply })?;
        self.wait(rx).await
    }

    /// Remove a voter. One membership change at a time.
    pub async fn remove_node(&self, id: u64) -> Result<(), ConsensusError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::ConfChange { change: MembershipChange::Remove(id), reply })?;
        self.wait(rx).await
    }
}
