//! The task that owns one volume's state.
//!
//! Everything mutable about an attached volume — replica sets, node
//! connections, the dependency tracker, in-flight operations, the fenced
//! flag — belongs to this one task. Callers talk to it through a bounded
//! command channel; the per-request tasks it spawns (one per request sent to
//! a node), the replacement tasks and the rebuild tasks talk back through an
//! event channel. No lock is shared with anyone.
//!
//! The rules it enforces:
//!
//! - **Order.** Every block operation takes the FIFO range lock
//!   ([`DepTracker`]) before anything is sent; overlapping writes are never in
//!   flight together, so all replicas apply them in the same order.
//! - **Writes** go to the whole write set of the block's segment (in-sync and
//!   rebuilding members) and complete when every member still in the set has
//!   made them durable and at least [`MIN_COPIES`] live members hold them. A
//!   member that fails is dropped from the piece; if fewer than two copies
//!   remain, the piece waits (holding its range) until the replacement joins,
//!   then is sent to it.
//! - **Reads** go to one in-sync member (round robin); a failed node or a
//!   corrupt block sends the read to the next in-sync member, and a good copy
//!   is written back over the bad one before the range is released.
//! - **Failure.** A node that stops answering is dropped from every set and
//!   reported once per segment through [`ControlPlane`]; the new member joins
//!   as rebuilding at once and a rebuild task copies the segment into it,
//!   chunk by chunk, each chunk under an exclusive range lock.
//! - **Layout changes made elsewhere** (a drain) are polled for every
//!   `layout_poll_interval`. A segment whose epoch is newer than the client's
//!   is adopted through the same merge as a replacement: members that joined
//!   (assigned the segment and reachable first, with a renewed capability if
//!   the current one does not cover them) get every write at once and are
//!   rebuilt, then reported in sync; members that left stop receiving reads
//!   and writes, and a write still in flight to one no longer waits for it
//!   (its late reply, good or bad, is ignored and never marks the node
//!   failed). An older or equal epoch never changes a set, so a poll reply
//!   that raced with the client's own failure report cannot undo it.
//! - **Growth.** A polled layout with a larger size brings whole new
//!   segments (and may lengthen the last one in place): their replicas are
//!   assigned and connected (with a renewed capability if needed) before the
//!   actor adds their sets and only then publishes the new size, so no
//!   request past the old end is accepted before it can be served. A smaller
//!   size is never adopted.
//! - **Snapshots** the metadata service records as pending come with the
//!   layout poll; each is frozen with new writes held and the writes in
//!   flight completed on every replica around the freeze (`freeze.rs`).
//! - **Fencing.** A `StaleGeneration` reply is fatal: every in-flight and
//!   later operation fails with [`VolumeError::Fenced`]; nothing is retried.

use super::control::ControlPlane;
use super::deps::{DepTracker, LockMode};
use super::error::VolumeError;
use super::intents::IntentTracker;
use super::layout::{PendingSnapshot, ReplicaInfo, ReplicaRole, SegmentReplicas, VolumeLayout};
use super::link::{Connector, LinkError, NodeLink};
use super::rebuild::{self, RebuildCtx, RebuildGrant};
use super::replicas::SegmentSet;
use super::runs::{self, check_data};
use super::status::{Counters, SegmentStatus, VolumeStatus};
use super::VolumeConfig;
use bytes::Bytes;
use slate_protocol::message::{BlockRange, MAX_IO_BLOCKS, MAX_RANGES, MAX_RANGE_BLOCKS};
use slate_protocol::{BlockIndex, Epoch, ErrorKind, NodeId, Reply, Request, SegmentIndex, SignedCapability, Target};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

mod freeze;

/// A write is never acknowledged with fewer live copies than this.
pub const MIN_COPIES: usize = 2;
/// Retries of one request to one node after a transient refusal (bad crc in transit, node busy).
const MAX_RETRIES: u32 = 5;
/// Longest wait between two attempts at a control-plane call.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Blocks of one read piece, as the node returned them (ciphertext).
#[derive(Debug, Clone)]
pub struct ReadChunk {
    /// Offset of the chunk from the start of the read, in blocks.
    pub offset: u64,
    pub count: u64,
    /// One bit per block (LSB first): written blocks; the others read as zeros.
    pub written: Vec<u8>,
    /// `count` blocks of ciphertext (empty for block-status queries).
    pub data: Bytes,
}

type Responder<T> = oneshot::Sender<Result<T, VolumeError>>;

/// What one operation holds of the volume's in-flight limits (bytes and
/// operations); released when the operation completes.
#[derive(Debug)]
pub struct Budget {
    pub bytes: Option<OwnedSemaphorePermit>,
    pub op: OwnedSemaphorePermit,
}

/// A caller's request.
#[derive(Debug)]
pub enum Cmd {
    Read { start: u64, count: u64, permit: Option<Budget>, reply: Responder<Vec<ReadChunk>> },
    BlockStatus { start: u64, count: u64, permit: Option<Budget>, reply: Responder<Vec<ReadChunk>> },
    Write { start: u64, fua: bool, crcs: Vec<u32>, data: Bytes, permit: Option<Budget>, reply: Responder<()> },
    Trim { start: u64, count: u64, zeroes: bool, permit: Option<Budget>, reply: Responder<()> },
    Flush { reply: Responder<()> },
    Status { reply: oneshot::Sender<VolumeStatus> },
    Close { reply: oneshot::Sender<()> },
}

/// What spawned tasks tell the actor.
#[derive(Debug)]
pub enum Event {
    Reply {
        op: u64,
        tag: Tag,
        node: NodeId,
        result: Result<Reply, LinkError>,
    },
    /// Re-send a piece after a transient refusal.
    Resend {
        op: u64,
        piece: usize,
        node: NodeId,
    },
    ReplicaSet {
        segment: SegmentIndex,
        failed: NodeId,
        update: super::control::ReplicaUpdate,
        new_links: Vec<(NodeId, Arc<dyn NodeLink>)>,
        unreachable: Vec<NodeId>,
    },
    LockRequest {
        segment: SegmentIndex,
        target: NodeId,
        range: BlockRange,
        reply: oneshot::Sender<Option<RebuildGrant>>,
    },
    Unlock {
        lock: u64,
        progress: Option<(SegmentIndex, NodeId, u64)>,
    },
    RebuildDone {
        segment: SegmentIndex,
        target: NodeId,
        copied_blocks: u64,
    },
    NodeDown {
        node: NodeId,
        /// The segment the failure was seen for, if one: a node that has left
        /// that segment's set meanwhile is not failed for it.
        segment: Option<SegmentIndex>,
        why: String,
    },
    Fatal(VolumeError),
    /// A renewed capability and sessions opened with it.
    Renewed {
        capability: SignedCapability,
        links: Vec<(NodeId, Arc<dyn NodeLink>)>,
    },
    RenewFailed(String),
    /// The nodes' recorded write intents, for a round of clearing.
    IntentsSeen {
        per_node: Vec<(NodeId, Vec<BlockRange>)>,
    },
    /// A round of layout polling ended.
    LayoutSeen(Result<LayoutPoll, String>),
    /// The nodes' replies to the freeze of snapshot attempt `attempt`.
    Frozen {
        attempt: u64,
        replies: Vec<(NodeId, Result<Reply, LinkError>)>,
    },
    /// The control plane's answer to the report that `snapshot` is frozen.
    FreezeReported {
        snapshot: u64,
        result: Result<(), String>,
    },
}

/// What a layout poll found, prepared for the actor.
#[derive(Debug)]
pub struct LayoutPoll {
    /// Replica sets newer than the client's when the poll started, ready to
    /// adopt: their new members are assigned the segment and connected.
    pub sets: Vec<SegmentReplicas>,
    /// A capability whose node scope covers the new members, when the current one did not.
    pub capability: Option<SignedCapability>,
    /// Sessions with nodes new to this client.
    pub links: Vec<(NodeId, Arc<dyn NodeLink>)>,
    /// The volume's pending snapshots.
    pub snapshots: Vec<PendingSnapshot>,
    /// A larger size and the segments it added, ready to adopt (assigned on their nodes, connected).
    pub grown: Option<Growth>,
}

/// The volume grew elsewhere (`slate volume resize`).
#[derive(Debug)]
pub struct Growth {
    /// The new size in bytes.
    pub size_bytes: u64,
    /// The replica sets of the segments past the old last one, in segment order.
    pub segments: Vec<SegmentReplicas>,
}

/// Which part of an operation a reply is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Piece(usize),
    Repair,
    Flush,
}

#[derive(Debug)]
struct ReadPiece {
    piece: runs::Piece,
    tried: Vec<NodeId>,
    current: Option<NodeId>,
    /// Replicas that returned a corrupt block for this piece, and which block if known.
    corrupt: Vec<(NodeId, Option<BlockIndex>)>,
    chunk: Option<ReadChunk>,
    done: bool,
}

#[derive(Debug)]
struct ReadOp {
    allocated_only: bool,
    pieces: Vec<ReadPiece>,
    remaining: usize,
    /// Nodes with a repair write in flight (one entry per request).
    repairs: Vec<NodeId>,
    reply: Option<Responder<Vec<ReadChunk>>>,
    failed: Option<VolumeError>,
}

#[derive(Debug)]
struct WritePiece {
    piece: runs::Piece,
    request: Request,
    pending: Vec<NodeId>,
    acked: Vec<NodeId>,
    retries: u32,
    done: bool,
}

#[derive(Debug)]
struct WriteOp {
    pieces: Vec<WritePiece>,
    remaining: usize,
    reply: Option<Responder<()>>,
    failed: Option<VolumeError>,
    waiting_since: Option<Instant>,
}

#[derive(Debug)]
struct FlushOp {
    pending: Vec<NodeId>,
    reply: Option<Responder<()>>,
}

#[derive(Debug)]
struct LockOp {
    segment: SegmentIndex,
    target: NodeId,
    reply: Option<oneshot::Sender<Option<RebuildGrant>>>,
}

#[derive(Debug)]
enum OpKind {
    Read(ReadOp),
    Write(WriteOp),
    Flush(FlushOp),
    Lock(LockOp),
}

#[derive(Debug)]
struct Op {
    kind: OpKind,
    locked: bool,
    started: bool,
    _permit: Option<Budget>,
}

/// The state the actor starts from (built by `Volume::open`).
#[derive(Debug)]
pub struct Init {
    pub layout: VolumeLayout,
    pub capability: SignedCapability,
    pub links: HashMap<NodeId, Arc<dyn NodeLink>>,
    /// Nodes found down while opening: reported as soon as the actor runs.
    pub down: Vec<(NodeId, String)>,
    pub control: Arc<dyn ControlPlane>,
    pub connector: Arc<dyn Connector>,
    pub cfg: VolumeConfig,
    /// Blocks made equal by write-intent reconciliation before serving.
    pub reconciled_blocks: u64,
    /// The size the `Volume` handle checks requests against; the actor raises it on growth.
    pub size: Arc<AtomicU64>,
}

/// When to renew the capability: two thirds into its lifetime, counted from when it was received.
fn renew_at(received_unix_secs: u64, expires_unix_secs: u64) -> u64 {
    received_unix_secs.saturating_add(expires_unix_secs.saturating_sub(received_unix_secs) / 3 * 2)
}

/// Outcome of one reply, as the engine treats it.
#[derive(Debug)]
pub(super) enum Outcome {
    Ok(Reply),
    NodeDown(String),
    Fatal(VolumeError),
    Corrupt(Option<BlockIndex>),
    Retry(String),
    Failed(String),
}

pub(super) fn classify(result: Result<Reply, LinkError>) -> Outcome {
    let e = match result {
        Ok(Reply::Error(e)) | Err(LinkError::Remote(e)) => e,
        Ok(r) => return Outcome::Ok(r),
        Err(LinkError::Timeout) => return Outcome::NodeDown("no reply within the request timeout".into()),
        Err(LinkError::Closed(s) | LinkError::Protocol(s)) => return Outcome::NodeDown(s),
    };
    match e.kind {
        ErrorKind::StaleGeneration => Outcome::Fatal(VolumeError::Fenced),
        ErrorKind::Forged
        | ErrorKind::Expired
        | ErrorKind::WrongVolume
        | ErrorKind::NoRight
        | ErrorKind::NoSession
        | ErrorKind::Version
        | ErrorKind::NotHolder
        | ErrorKind::NotYetValid
        | ErrorKind::Malformed => Outcome::Fatal(VolumeError::Denied(e.to_string())),
        ErrorKind::Corrupt => Outcome::Corrupt(e.block),
        // NoSuchLayer: this replica lacks the snapshot a `ReadAt` asked for; another may have it.
        ErrorKind::BadCrc | ErrorKind::TooLarge | ErrorKind::NoSuchLayer => Outcome::Retry(e.to_string()),
        ErrorKind::OutOfRange => Outcome::Failed(e.to_string()),
        ErrorKind::WrongNode | ErrorKind::NotAssigned | ErrorKind::NoSpace | ErrorKind::Io | ErrorKind::Internal => {
            Outcome::NodeDown(e.to_string())
        }
    }
}

pub struct Actor {
    layout: VolumeLayout,
    target: Target,
    capability: SignedCapability,
    cfg: VolumeConfig,
    sets: Vec<SegmentSet>,
    links: HashMap<NodeId, Arc<dyn NodeLink>>,
    dead: HashSet<NodeId>,
    replacing: HashSet<(SegmentIndex, NodeId)>,
    control: Arc<dyn ControlPlane>,
    connector: Arc<dyn Connector>,
    deps: DepTracker,
    ops: BTreeMap<u64, Op>,
    next_op: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    fatal: Option<VolumeError>,
    rebuilds: HashMap<(SegmentIndex, NodeId), JoinHandle<()>>,
    helpers: Vec<JoinHandle<()>>,
    counters: Counters,
    closing: Option<oneshot::Sender<()>>,
    cmds_closed: bool,
    /// False for a read-only attachment: no repairs, no rebuilds, no replacements.
    writable: bool,
    /// Unix time at which to renew the capability; `None` while a renewal runs.
    renew_at: Option<u64>,
    /// Sessions replaced by a renewal, kept until their last replies are in.
    retired: Vec<(Instant, Arc<dyn NodeLink>)>,
    /// When each rebuild's progress was last reported to the control plane.
    progress_reported: HashMap<(SegmentIndex, NodeId), Instant>,
    /// Replacement requests per segment since its last finished rebuild (for backoff).
    replacement_attempts: HashMap<SegmentIndex, u32>,
    /// Regions touched and regions never to clear (periodic intent clearing).
    intents: IntentTracker,
    /// When the next round of intent clearing starts; `None` while one runs.
    intent_round_at: Option<Instant>,
    /// Members per segment when healthy (as attached or last adopted from the
    /// control plane): fewer means a replica is missing.
    full_size: Vec<usize>,
    /// When the next layout poll starts; `None` while one runs.
    layout_poll_at: Option<Instant>,
    /// Write requests (op, piece, node) still in flight to a member that has
    /// left the piece's segment: their replies are dropped, whatever they say.
    detached: HashSet<(u64, usize, NodeId)>,
    /// Snapshot freezes: the one running, the writes it holds, what is done.
    freeze: freeze::FreezeState,
    /// The size published to the `Volume` handle (set after the layout grew).
    size: Arc<AtomicU64>,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("volume", &self.target.volume)
            .field("ops", &self.ops.len())
            .finish_non_exhaustive()
    }
}

/// Runs the actor until the volume is closed or its handle dropped.
pub async fn run(init: Init, cmds: mpsc::Receiver<Cmd>) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut sets: Vec<SegmentSet> =
        init.layout.segments.iter().map(|s| SegmentSet::from_layout(s, init.layout.segment_len(s.segment))).collect();
    sets.sort_by_key(|s| s.segment);
    let target = Target { volume: init.layout.volume, generation: init.layout.generation };
    let writable = init.capability.claims.rights.contains(slate_protocol::Rights::WRITE);
    let renew = renew_at(slate_protocol::now_unix_secs(), init.capability.claims.expires_unix_secs);
    let full_size: Vec<usize> = sets.iter().map(|s| s.members().len().max(MIN_COPIES)).collect();
    let intent_round_at = Some(Instant::now() + init.cfg.intent_clear_interval);
    let layout_poll_at = Some(Instant::now() + init.cfg.layout_poll_interval);
    let mut actor = Actor {
        layout: init.layout,
        target,
        capability: init.capability,
        cfg: init.cfg,
        sets,
        links: init.links,
        dead: HashSet::new(),
        replacing: HashSet::new(),
        control: init.control,
        connector: init.connector,
        deps: DepTracker::new(),
        ops: BTreeMap::new(),
        next_op: 1,
        events_tx,
        fatal: None,
        rebuilds: HashMap::new(),
        helpers: Vec::new(),
        counters: Counters { blocks_reconciled: init.reconciled_blocks, ..Counters::default() },
        closing: None,
        cmds_closed: false,
        writable,
        renew_at: Some(renew),
        retired: Vec::new(),
        progress_reported: HashMap::new(),
        replacement_attempts: HashMap::new(),
        intents: IntentTracker::new(),
        intent_round_at,
        full_size,
        layout_poll_at,
        detached: HashSet::new(),
        freeze: freeze::FreezeState::default(),
        size: init.size,
    };
    for (node, why) in init.down {
        actor.node_failed(node, &why);
    }
    // Members the metadata service lists as rebuilding (a rebuild cut short by a crash) start over.
    let rebuilding: Vec<(SegmentIndex, NodeId)> = actor
        .sets
        .iter()
        .flat_map(|s| s.members().iter().filter(|m| m.role == ReplicaRole::Rebuilding).map(|m| (s.segment, m.node)))
        .collect();
    for (seg, node) in rebuilding {
        actor.spawn_rebuild(seg, node);
    }
    actor.main_loop(cmds, events_rx).await;
}

impl Actor {
    async fn main_loop(&mut self, mut cmds: mpsc::Receiver<Cmd>, mut events: mpsc::UnboundedReceiver<Event>) {
        let mut period = Duration::from_millis(500);
        if !self.cfg.layout_poll_interval.is_zero() {
            period = period.min(self.cfg.layout_poll_interval).max(Duration::from_millis(10));
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(ev) = events.recv() => self.on_event(ev),
                cmd = cmds.recv(), if !self.cmds_closed && self.closing.is_none() => match cmd {
                    Some(Cmd::Close { reply }) => self.begin_close(Some(reply)),
                    Some(c) => self.on_cmd(c),
                    None => { self.cmds_closed = true; self.begin_close(None); }
                },
                _ = tick.tick() => self.on_tick(),
            }
            if (self.closing.is_some() || self.cmds_closed) && self.ops.is_empty() {
                break;
            }
        }
        for (_, h) in self.rebuilds.drain() {
            h.abort();
        }
        for h in self.helpers.drain(..) {
            h.abort();
        }
        if let Some(reply) = self.closing.take() {
            let _ = reply.send(());
        }
        debug!(volume = %self.target.volume, "volume actor stopped");
    }

    fn begin_close(&mut self, reply: Option<oneshot::Sender<()>>) {
        // A freeze under way is abandoned: the writes it holds go on and complete.
        self.abandon_freeze("the volume is closing");
        // Rebuilds stop (they resume from the start at the next attach); user I/O in flight completes.
        for (_, h) in self.rebuilds.drain() {
            h.abort();
        }
        match reply {
            Some(r) => self.closing = Some(r),
            None => self.cmds_closed = true,
        }
    }

    // ----- commands ---------------------------------------------------------------------------

    fn on_cmd(&mut self, cmd: Cmd) {
        if let Some(err) = &self.fatal {
            let err = err.clone();
            match cmd {
                Cmd::Read { reply, .. } | Cmd::BlockStatus { reply, .. } => drop(reply.send(Err(err))),
                Cmd::Write { reply, .. } | Cmd::Trim { reply, .. } | Cmd::Flush { reply } => drop(reply.send(Err(err))),
                Cmd::Status { reply } => drop(reply.send(self.status())),
                Cmd::Close { reply } => self.begin_close(Some(reply)),
            }
            return;
        }
        // A snapshot freeze holds new writes (in order) until the nodes froze.
        let Some(cmd) = self.hold_if_freezing(cmd) else { return };
        match cmd {
            Cmd::Read { start, count, permit, reply } => self.new_read(start, count, false, permit, reply),
            Cmd::BlockStatus { start, count, permit, reply } => self.new_read(start, count, true, permit, reply),
            Cmd::Write { reply, .. } | Cmd::Trim { reply, .. } if !self.writable => {
                let _ = reply.send(Err(VolumeError::ReadOnly));
            }
            Cmd::Write { start, fua, crcs, data, permit, reply } => {
                if !self.in_range(start, crcs.len() as u64)
                    || data.len() != crcs.len() * slate_protocol::BLOCK_SIZE_BYTES
                {
                    let _ = reply.send(Err(VolumeError::OutOfRange));
                    return;
                }
                let target = self.target;
                let pieces =
                    runs::split(start, crcs.len() as u64, self.layout.segment_blocks, u64::from(MAX_IO_BLOCKS));
                let pieces = pieces
                    .into_iter()
                    .map(|p| {
                        let (a, b) = (p.offset as usize, (p.offset + p.count) as usize);
                        let request = Request::Write {
                            target,
                            start: BlockIndex(p.start),
                            fua,
                            crcs: crcs[a..b].to_vec(),
                            data: data
                                .slice(a * slate_protocol::BLOCK_SIZE_BYTES..b * slate_protocol::BLOCK_SIZE_BYTES),
                        };
                        WritePiece {
                            piece: p,
                            request,
                            pending: Vec::new(),
                            acked: Vec::new(),
                            retries: 0,
                            done: false,
                        }
                    })
                    .collect();
                self.counters.writes += 1;
                self.counters.blocks_written += crcs.len() as u64;
                self.new_write(start, crcs.len() as u64, pieces, permit, reply);
            }
            Cmd::Trim { start, count, zeroes, permit, reply } => {
                if !self.in_range(start, count) {
                    let _ = reply.send(Err(VolumeError::OutOfRange));
                    return;
                }
                let target = self.target;
                let pieces = runs::split(start, count, self.layout.segment_blocks, u64::from(MAX_RANGE_BLOCKS))
                    .into_iter()
                    .map(|p| {
                        let range = BlockRange { start: BlockIndex(p.start), count: p.count };
                        let request = if zeroes {
                            Request::WriteZeroes { target, range }
                        } else {
                            Request::Trim { target, range }
                        };
                        WritePiece {
                            piece: p,
                            request,
                            pending: Vec::new(),
                            acked: Vec::new(),
                            retries: 0,
                            done: false,
                        }
                    })
                    .collect();
                self.new_write(start, count, pieces, permit, reply);
            }
            // A read-only attachment has nothing to make durable (and no right to ask).
            Cmd::Flush { reply } if !self.writable => drop(reply.send(Ok(()))),
            Cmd::Flush { reply } => {
                let mut nodes: Vec<NodeId> = self.sets.iter().flat_map(SegmentSet::write_set).collect();
                nodes.sort_unstable();
                nodes.dedup();
                let id = self.alloc_op();
                self.ops.insert(
                    id,
                    Op {
                        kind: OpKind::Flush(FlushOp { pending: nodes.clone(), reply: Some(reply) }),
                        locked: false,
                        started: true,
                        _permit: None,
                    },
                );
                let req = Request::Flush { target: self.target };
                for n in nodes {
                    self.send(n, &req, id, Tag::Flush);
                }
                self.check_flush(id);
            }
            Cmd::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Cmd::Close { reply } => self.begin_close(Some(reply)),
        }
    }

    fn in_range(&self, start: u64, count: u64) -> bool {
        count > 0 && start.checked_add(count).is_some_and(|end| end <= self.layout.volume_blocks())
    }

    fn alloc_op(&mut self) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        id
    }

    /// Queues an operation on its range; starts it if nothing earlier conflicts.
    fn enqueue(&mut self, start: u64, count: u64, mode: LockMode, kind: OpKind, permit: Option<Budget>) {
        let id = self.alloc_op();
        let granted = self.deps.acquire(id, start, start + count, mode);
        self.ops.insert(id, Op { kind, locked: true, started: false, _permit: permit });
        if granted {
            self.start_op(id);
        }
    }

    fn new_read(
        &mut self,
        start: u64,
        count: u64,
        allocated_only: bool,
        permit: Option<Budget>,
        reply: Responder<Vec<ReadChunk>>,
    ) {
        if !self.in_range(start, count) {
            let _ = reply.send(Err(VolumeError::OutOfRange));
            return;
        }
        let max = if allocated_only { u64::from(MAX_RANGE_BLOCKS) } else { u64::from(MAX_IO_BLOCKS) };
        let pieces: Vec<ReadPiece> = runs::split(start, count, self.layout.segment_blocks, max)
            .into_iter()
            .map(|piece| ReadPiece {
                piece,
                tried: Vec::new(),
                current: None,
                corrupt: Vec::new(),
                chunk: None,
                done: false,
            })
            .collect();
        if !allocated_only {
            self.counters.reads += 1;
            self.counters.blocks_read += count;
        }
        let remaining = pieces.len();
        let op = ReadOp { allocated_only, pieces, remaining, repairs: Vec::new(), reply: Some(reply), failed: None };
        self.enqueue(start, count, LockMode::Shared, OpKind::Read(op), permit);
    }

    fn new_write(
        &mut self,
        start: u64,
        count: u64,
        pieces: Vec<WritePiece>,
        permit: Option<Budget>,
        reply: Responder<()>,
    ) {
        self.intents.touch(start, count);
        if pieces.iter().any(|p| !self.segment_healthy(p.piece.segment)) {
            // A replica is missing or catching up: this region may end up different on the replicas.
            self.intents.make_sticky(start, count);
        }
        let remaining = pieces.len();
        let op = WriteOp { pieces, remaining, reply: Some(reply), failed: None, waiting_since: None };
        self.enqueue(start, count, LockMode::Exclusive, OpKind::Write(op), permit);
    }

    fn start_op(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        if op.started {
            return;
        }
        op.started = true;
        match &op.kind {
            OpKind::Read(r) => {
                for i in 0..r.pieces.len() {
                    self.dispatch_read(id, i);
                }
                self.check_read(id);
            }
            OpKind::Write(w) => {
                let segs: Vec<SegmentIndex> = w.pieces.iter().map(|p| p.piece.segment).collect();
                for (i, seg) in segs.iter().enumerate() {
                    let members: Vec<NodeId> = self.set(*seg).map(|s| s.write_set().collect()).unwrap_or_default();
                    for n in members {
                        self.add_write_target(id, i, n);
                    }
                }
                for i in 0..segs.len() {
                    self.check_write_piece(id, i);
                }
            }
            OpKind::Lock(_) => self.grant_lock(id),
            OpKind::Flush(_) => {}
        }
    }

    fn set(&self, seg: SegmentIndex) -> Option<&SegmentSet> {
        self.sets.get(seg.0 as usize)
    }

    fn set_mut(&mut self, seg: SegmentIndex) -> Option<&mut SegmentSet> {
        self.sets.get_mut(seg.0 as usize)
    }

    /// Sends `req` to `node` now; its outcome comes back as an [`Event::Reply`].
    fn send(&self, node: NodeId, req: &Request, op: u64, tag: Tag) {
        let fut = self.links.get(&node).map(|l| l.start(req));
        let tx = self.events_tx.clone();
        let timeout = self.cfg.request_timeout;
        tokio::spawn(async move {
            let result = match fut {
                None => Err(LinkError::Closed("no connection to the node".into())),
                Some(f) => tokio::time::timeout(timeout, f).await.unwrap_or(Err(LinkError::Timeout)),
            };
            let _ = tx.send(Event::Reply { op, tag, node, result });
        });
    }

    // ----- reads ------------------------------------------------------------------------------

    fn dispatch_read(&mut self, id: u64, i: usize) {
        let target = self.target;
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get(&id) else { return };
        let p = &r.pieces[i];
        if p.done {
            return;
        }
        let (seg, tried, allocated_only, piece) = (p.piece.segment, p.tried.clone(), r.allocated_only, p.piece);
        let pick = self.set_mut(seg).and_then(|s| s.pick_reader(&tried));
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get_mut(&id) else { return };
        if let Some(node) = pick {
            let p = &mut r.pieces[i];
            p.current = Some(node);
            p.tried.push(node);
            let req = if allocated_only {
                Request::Allocated { target, range: BlockRange { start: BlockIndex(piece.start), count: piece.count } }
            } else {
                let (start, count) = (BlockIndex(piece.start), piece.count as u32);
                match self.cfg.read_epoch {
                    Some(epoch) => Request::ReadAt { target, epoch, start, count },
                    None => Request::Read { target, start, count },
                }
            };
            self.send(node, &req, id, Tag::Piece(i));
        } else {
            let p = &mut r.pieces[i];
            p.done = true;
            p.current = None;
            r.remaining -= 1;
            r.failed.get_or_insert_with(|| {
                VolumeError::Io(format!(
                    "no in-sync replica could serve blocks {}..{}",
                    piece.start,
                    piece.start + piece.count
                ))
            });
            error!(volume = %target.volume, start = piece.start, count = piece.count, "read failed on every replica");
        }
    }

    fn on_read_reply(&mut self, id: u64, i: usize, node: NodeId, outcome: Outcome) {
        let seg = match self.ops.get(&id) {
            Some(Op { kind: OpKind::Read(r), .. }) => r.pieces.get(i).map(|p| p.piece.segment),
            _ => None,
        };
        let Some(seg) = seg else { return };
        let members: Vec<NodeId> = self.set(seg).map(|s| s.write_set().collect()).unwrap_or_default();
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get_mut(&id) else { return };
        let allocated_only = r.allocated_only;
        let Some(p) = r.pieces.get_mut(i) else { return };
        if p.done || p.current != Some(node) {
            return;
        }
        if !members.contains(&node) && !matches!(outcome, Outcome::Ok(_) | Outcome::Fatal(_)) {
            // The node left the segment's set (or failed) while the read was in flight: its
            // refusal says nothing about its other segments. Read another member.
            debug!(volume = %self.target.volume, %node, segment = %seg, ?outcome, "read from a former member failed; reading another");
            self.dispatch_read(id, i);
            self.check_read(id);
            return;
        }
        let count = p.piece.count as usize;
        match outcome {
            Outcome::Ok(Reply::Data { written, crcs, data }) if !allocated_only => {
                match check_data(count, &written, &crcs, &data) {
                    Ok(()) => {
                        let start = BlockIndex(p.piece.start);
                        let bad_copies = if self.writable { p.corrupt.as_slice() } else { &[] };
                        let repairs: Vec<(NodeId, Vec<Request>)> = bad_copies
                            .iter()
                            .filter(|(bad, _)| members.contains(bad))
                            .map(|(bad, block)| {
                                let only =
                                    block.and_then(|b| b.0.checked_sub(start.0)).map(|k| k as usize..k as usize + 1);
                                (*bad, runs::copy_requests(self.target, start, &written, &crcs, &data, only, true))
                            })
                            .collect();
                        p.chunk = Some(ReadChunk { offset: p.piece.offset, count: p.piece.count, written, data });
                        p.done = true;
                        r.remaining -= 1;
                        for (bad, reqs) in &repairs {
                            r.repairs.extend(std::iter::repeat_n(*bad, reqs.len()));
                        }
                        for (bad, reqs) in repairs {
                            for req in reqs {
                                self.counters.repairs += 1;
                                warn!(volume = %self.target.volume, node = %bad, ?req, "repairing a corrupt block from a good replica");
                                self.send(bad, &req, id, Tag::Repair);
                            }
                        }
                    }
                    Err(pos) => {
                        let block = pos.map(|k| BlockIndex(p.piece.start + k as u64));
                        warn!(volume = %self.target.volume, %node, ?block, "read reply does not match its checksums");
                        self.on_corrupt(id, i, node, block);
                    }
                }
            }
            Outcome::Ok(Reply::Bitmap(bits)) if allocated_only => {
                p.chunk =
                    Some(ReadChunk { offset: p.piece.offset, count: p.piece.count, written: bits, data: Bytes::new() });
                p.done = true;
                r.remaining -= 1;
            }
            Outcome::Ok(other) => {
                warn!(%node, ?other, "unexpected reply to a read");
                self.dispatch_read(id, i);
            }
            Outcome::Corrupt(block) => {
                warn!(volume = %self.target.volume, %node, ?block, "replica returned a corrupt block; reading another");
                self.on_corrupt(id, i, node, block);
            }
            Outcome::NodeDown(why) => {
                self.node_failed(node, &why);
                // node_failed re-sends every piece still on a node it newly marks dead; only a
                // piece it left alone (the node was already known dead) is re-sent here.
                let still_on_node = match self.ops.get(&id) {
                    Some(Op { kind: OpKind::Read(r), .. }) => {
                        r.pieces.get(i).is_some_and(|p| !p.done && p.current == Some(node))
                    }
                    _ => false,
                };
                if still_on_node {
                    self.dispatch_read(id, i);
                }
            }
            Outcome::Retry(why) => {
                debug!(%node, %why, "read refused; trying another replica");
                self.dispatch_read(id, i);
            }
            Outcome::Fatal(e) => return self.go_fatal(e),
            Outcome::Failed(why) => {
                p.done = true;
                r.remaining -= 1;
                r.failed.get_or_insert(VolumeError::Io(why));
            }
        }
        self.check_read(id);
    }

    /// `node` holds a corrupt copy of `block` in piece `i`. The piece narrows
    /// to that one block, read from another replica (and later repaired on
    /// `node`); the blocks around it become new pieces, read afresh from any
    /// replica. So replicas with different bad blocks still serve a read
    /// together, and a corrupt block costs one extra single-block read.
    fn on_corrupt(&mut self, id: u64, idx: usize, node: NodeId, block: Option<BlockIndex>) {
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get_mut(&id) else { return };
        let piece = &mut r.pieces[idx];
        let whole = piece.piece;
        let (lo, hi) = (whole.start, whole.start + whole.count);
        let mk = |a: u64, b: u64| runs::Piece {
            segment: whole.segment,
            start: a,
            count: b - a,
            offset: whole.offset + (a - lo),
        };
        let mut around = Vec::new();
        if let Some(k) = block.map(|b| b.0).filter(|k| (lo..hi).contains(k)) {
            if k > lo {
                around.push(mk(lo, k));
            }
            if k + 1 < hi {
                around.push(mk(k + 1, hi));
            }
            piece.piece = mk(k, k + 1);
        }
        piece.corrupt.push((node, block));
        let first_new = r.pieces.len();
        for extra in &around {
            r.pieces.push(ReadPiece {
                piece: *extra,
                tried: Vec::new(),
                current: None,
                corrupt: Vec::new(),
                chunk: None,
                done: false,
            });
            r.remaining += 1;
        }
        self.dispatch_read(id, idx);
        for k in first_new..first_new + around.len() {
            self.dispatch_read(id, k);
        }
    }

    fn on_repair_reply(&mut self, id: u64, node: NodeId, outcome: Outcome) {
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get_mut(&id) else { return };
        let Some(pos) = r.repairs.iter().position(|n| *n == node) else { return };
        r.repairs.swap_remove(pos);
        let segs: Vec<SegmentIndex> =
            r.pieces.iter().filter(|p| p.corrupt.iter().any(|(n, _)| *n == node)).map(|p| p.piece.segment).collect();
        let member = segs.iter().any(|s| self.set(*s).is_some_and(|set| set.contains(node)));
        match outcome {
            Outcome::Ok(_) => {}
            Outcome::Fatal(e) => return self.go_fatal(e),
            _ if !member => debug!(%node, "repair of a former member failed; it holds no data of ours any more"),
            Outcome::NodeDown(why) | Outcome::Failed(why) | Outcome::Retry(why) => self.node_failed(node, &why),
            Outcome::Corrupt(_) => self.node_failed(node, "corrupt reply to a repair write"),
        }
        self.check_read(id);
    }

    fn check_read(&mut self, id: u64) {
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get_mut(&id) else { return };
        if r.remaining == 0 {
            if let Some(reply) = r.reply.take() {
                let result = match r.failed.take() {
                    Some(e) => Err(e),
                    None => Ok(r.pieces.iter_mut().filter_map(|p| p.chunk.take()).collect()),
                };
                let _ = reply.send(result);
            }
            if r.repairs.is_empty() {
                self.finish_op(id);
            }
        }
    }

    // ----- writes -----------------------------------------------------------------------------

    fn write_piece_count(&self, id: u64) -> usize {
        match self.ops.get(&id) {
            Some(Op { kind: OpKind::Write(w), .. }) => w.pieces.len(),
            _ => 0,
        }
    }

    /// Sends piece `i` of write `id` to `node` (a member of its segment's write set).
    fn add_write_target(&mut self, id: u64, i: usize, node: NodeId) {
        let Some(Op { kind: OpKind::Write(w), .. }) = self.ops.get_mut(&id) else { return };
        let p = &mut w.pieces[i];
        if p.done || p.pending.contains(&node) || p.acked.contains(&node) {
            return;
        }
        p.pending.push(node);
        let req = p.request.clone();
        self.send(node, &req, id, Tag::Piece(i));
    }

    fn on_write_reply(&mut self, id: u64, i: usize, node: NodeId, outcome: Outcome) {
        let Some(Op { kind: OpKind::Write(w), .. }) = self.ops.get_mut(&id) else { return };
        let Some(p) = w.pieces.get_mut(i) else { return };
        if !p.pending.contains(&node) {
            return;
        }
        match outcome {
            Outcome::Ok(Reply::Done) => {
                p.pending.retain(|n| *n != node);
                p.acked.push(node);
            }
            Outcome::Ok(other) => {
                warn!(%node, ?other, "unexpected reply to a write");
                self.node_failed(node, "unexpected reply to a write");
            }
            Outcome::Retry(why) if p.retries < MAX_RETRIES => {
                p.retries += 1;
                let delay = self.cfg.retry_delay * p.retries;
                debug!(%node, %why, retry = p.retries, "write refused; sending it again");
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Event::Resend { op: id, piece: i, node });
                });
                return;
            }
            Outcome::Retry(why) | Outcome::NodeDown(why) => self.node_failed(node, &why),
            Outcome::Corrupt(_) => self.node_failed(node, "corrupt reply to a write"),
            Outcome::Fatal(e) => return self.go_fatal(e),
            Outcome::Failed(why) => {
                p.pending.retain(|n| *n != node);
                w.failed.get_or_insert(VolumeError::Io(why));
            }
        }
        self.forget_node_in_op(id, node);
        self.check_write_piece(id, i);
    }

    fn on_resend(&mut self, id: u64, i: usize, node: NodeId) {
        let Some(Op { kind: OpKind::Write(w), .. }) = self.ops.get(&id) else { return };
        let Some(p) = w.pieces.get(i) else { return };
        if !p.done && p.pending.contains(&node) && !self.dead.contains(&node) {
            let req = p.request.clone();
            self.send(node, &req, id, Tag::Piece(i));
        } else {
            // Nothing is in flight for it any more (it was waiting to be sent again).
            self.detached.remove(&(id, i, node));
        }
    }

    fn check_write_piece(&mut self, id: u64, i: usize) {
        let Some(Op { kind: OpKind::Write(w), .. }) = self.ops.get_mut(&id) else { return };
        let Some(p) = w.pieces.get_mut(i) else { return };
        if p.done || !p.pending.is_empty() {
            return;
        }
        if p.acked.len() >= MIN_COPIES || w.failed.is_some() {
            p.done = true;
            w.remaining -= 1;
        } else if w.waiting_since.is_none() {
            w.waiting_since = Some(Instant::now());
            warn!(
                volume = %self.target.volume, segment = %p.piece.segment, copies = p.acked.len(),
                "write waits for a replacement replica before it can be acknowledged"
            );
        }
        if w.remaining == 0 {
            if w.failed.is_some() {
                for p in &w.pieces {
                    self.intents.make_sticky(p.piece.start, p.piece.count);
                }
            }
            if let Some(reply) = w.reply.take() {
                let _ = reply.send(w.failed.take().map_or(Ok(()), Err));
            }
            self.finish_op(id);
        }
    }

    // ----- flush ------------------------------------------------------------------------------

    fn on_flush_reply(&mut self, id: u64, node: NodeId, outcome: Outcome) {
        let member = self.sets.iter().any(|s| s.contains(node));
        match outcome {
            Outcome::Ok(_) => {}
            Outcome::Fatal(e) => return self.go_fatal(e),
            _ if !member => debug!(%node, "flush of a former member failed; it holds no data of ours any more"),
            Outcome::NodeDown(why) | Outcome::Retry(why) | Outcome::Failed(why) => self.node_failed(node, &why),
            Outcome::Corrupt(_) => self.node_failed(node, "corrupt reply to a flush"),
        }
        if let Some(Op { kind: OpKind::Flush(f), .. }) = self.ops.get_mut(&id) {
            f.pending.retain(|n| *n != node);
        }
        self.check_flush(id);
    }

    fn check_flush(&mut self, id: u64) {
        let Some(Op { kind: OpKind::Flush(f), .. }) = self.ops.get_mut(&id) else { return };
        if f.pending.is_empty() {
            if let Some(reply) = f.reply.take() {
                let _ = reply.send(Ok(()));
            }
            self.finish_op(id);
        }
    }

    // ----- completion -------------------------------------------------------------------------

    fn finish_op(&mut self, id: u64) {
        let Some(op) = self.ops.remove(&id) else { return };
        if op.locked {
            for next in self.deps.release(id) {
                self.start_op(next);
            }
        }
        if matches!(op.kind, OpKind::Write(_)) {
            self.freeze_if_quiesced();
        }
    }

    // ----- failures ---------------------------------------------------------------------------

    /// `node` stopped answering (or answered in a way that disqualifies it):
    /// drop it from every replica set and every operation, and ask for replacements.
    fn node_failed(&mut self, node: NodeId, why: &str) {
        if !self.dead.insert(node) {
            return;
        }
        warn!(volume = %self.target.volume, %node, %why, "replica failed; asking for a replacement");
        self.links.remove(&node);
        // Writes in flight or queued may now land on some replicas only: their regions stay recorded.
        for op in self.ops.values() {
            if let OpKind::Write(w) = &op.kind {
                for p in &w.pieces {
                    self.intents.make_sticky(p.piece.start, p.piece.count);
                }
            }
        }
        self.counters.node_failures += 1;
        let segs: Vec<SegmentIndex> =
            self.sets.iter_mut().filter_map(|s| s.remove(node).then_some(s.segment)).collect();
        for (key, h) in &self.rebuilds {
            if key.1 == node {
                h.abort();
            }
        }
        self.rebuilds.retain(|k, _| k.1 != node);
        for seg in segs {
            self.request_replacement(seg, node);
        }
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for id in ids {
            self.forget_node_in_op(id, node);
        }
    }

    /// Removes `node` from one operation and lets the operation go on without it.
    fn forget_node_in_op(&mut self, id: u64, node: NodeId) {
        if !self.dead.contains(&node) {
            return;
        }
        let Some(op) = self.ops.get_mut(&id) else { return };
        match &mut op.kind {
            OpKind::Read(r) => {
                let again: Vec<usize> = r
                    .pieces
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !p.done && p.current == Some(node))
                    .map(|(i, _)| i)
                    .collect();
                let before = r.repairs.len();
                r.repairs.retain(|n| *n != node);
                let repairs_dropped = before != r.repairs.len();
                for i in again {
                    self.dispatch_read(id, i);
                }
                if repairs_dropped || self.ops.contains_key(&id) {
                    self.check_read(id);
                }
            }
            OpKind::Write(w) => {
                let mut touched = Vec::new();
                for (i, p) in w.pieces.iter_mut().enumerate() {
                    if p.done {
                        continue;
                    }
                    let before = p.pending.len() + p.acked.len();
                    p.pending.retain(|n| *n != node);
                    p.acked.retain(|n| *n != node);
                    if before != p.pending.len() + p.acked.len() {
                        touched.push(i);
                    }
                }
                for i in touched {
                    self.check_write_piece(id, i);
                }
            }
            OpKind::Flush(f) => {
                f.pending.retain(|n| *n != node);
                self.check_flush(id);
            }
            OpKind::Lock(_) => {}
        }
    }

    fn request_replacement(&mut self, segment: SegmentIndex, failed: NodeId) {
        // A read-only attachment leaves replacements to the metadata service (node heartbeats).
        if self.fatal.is_some() || !self.writable || !self.replacing.insert((segment, failed)) {
            return;
        }
        let control = Arc::clone(&self.control);
        let connector = Arc::clone(&self.connector);
        let tx = self.events_tx.clone();
        let volume = self.target.volume;
        let capability = self.capability.clone();
        let known: HashSet<NodeId> = self.links.keys().copied().collect();
        let retry = self.cfg.retry_delay;
        let connect_timeout = self.cfg.request_timeout;
        // A segment whose replacements keep failing (unreachable, or the same dead node offered
        // again) is asked again with a growing delay rather than in a tight loop.
        let attempt = self.replacement_attempts.entry(segment).or_insert(0);
        let first_delay =
            if *attempt == 0 { Duration::ZERO } else { (retry * 2u32.pow((*attempt).min(6))).min(MAX_BACKOFF) };
        *attempt += 1;
        let h = tokio::spawn(async move {
            tokio::time::sleep(first_delay).await;
            let mut delay = retry;
            let update = loop {
                match control.report_failed_replica(volume, segment, failed).await {
                    Ok(u) => break u,
                    Err(e) => {
                        warn!(%volume, %segment, node = %failed, error = %e, "replacement request failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_BACKOFF);
                    }
                }
            };
            let cap = update.capability.clone().unwrap_or(capability);
            let mut new_links = Vec::new();
            let mut unreachable = Vec::new();
            for r in &update.set.replicas {
                if known.contains(&r.node) || r.node == failed {
                    continue;
                }
                match tokio::time::timeout(connect_timeout, connector.connect(r.node, &r.addr, &cap)).await {
                    Ok(Ok(link)) => new_links.push((r.node, link)),
                    Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                        let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                        return;
                    }
                    Ok(Err(e)) => {
                        warn!(node = %r.node, addr = %r.addr, error = %e, "cannot reach the replacement replica");
                        unreachable.push(r.node);
                    }
                    Err(_) => unreachable.push(r.node),
                }
            }
            let _ = tx.send(Event::ReplicaSet { segment, failed, update, new_links, unreachable });
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    fn on_replica_set(
        &mut self,
        segment: SegmentIndex,
        failed: NodeId,
        update: super::control::ReplicaUpdate,
        new_links: Vec<(NodeId, Arc<dyn NodeLink>)>,
        unreachable: Vec<NodeId>,
    ) {
        self.replacing.remove(&(segment, failed));
        if self.fatal.is_some() {
            return;
        }
        if let Some(c) = update.capability {
            self.capability = c;
        }
        for (n, l) in new_links {
            if !self.dead.contains(&n) {
                self.links.entry(n).or_insert(l);
            }
        }
        let current = self.set(segment).map(|s| s.epoch);
        if current.is_some_and(|e| update.set.epoch < e) {
            // A layout poll already brought a newer set (made after this reply): keep it.
            info!(
                volume = %self.target.volume, %segment, epoch = %update.set.epoch.0, current = ?current,
                "replacement reply is older than the set in use; ignored"
            );
            return;
        }
        let joined = self.adopt_set(segment, &update.set, &unreachable);
        self.counters.replicas_replaced += joined as u64;
    }

    /// Installs a replica set from the control plane (a replacement's reply or
    /// a polled layout): members that left stop receiving reads and writes,
    /// members that joined receive every write at once and are rebuilt.
    /// Returns how many members joined.
    fn adopt_set(&mut self, segment: SegmentIndex, new: &SegmentReplicas, unreachable: &[NodeId]) -> usize {
        let Some(set) = self.set_mut(segment) else { return 0 };
        let out = set.merge(new);
        info!(
            volume = %self.target.volume, %segment, epoch = %new.epoch.0, joined = ?out.joined, left = ?out.left,
            "replica set changed"
        );
        for n in &out.left {
            if let Some(h) = self.rebuilds.remove(&(segment, *n)) {
                h.abort();
            }
            self.progress_reported.remove(&(segment, *n));
            self.detach_member(segment, *n);
        }
        // Members that cannot serve: already failed, or unreachable now.
        let members: Vec<NodeId> = self.set(segment).map(|s| s.write_set().collect()).unwrap_or_default();
        for n in members {
            if self.dead.contains(&n) {
                // Failed earlier: drop it here too and ask again.
                if let Some(s) = self.set_mut(segment) {
                    s.remove(n);
                }
                self.request_replacement(segment, n);
            } else if unreachable.contains(&n) || !self.links.contains_key(&n) {
                // Drops it from every set it is in and asks for replacements.
                self.node_failed(n, "unreachable when it joined");
            }
        }
        let mut joined = 0;
        for n in out.joined {
            if self.set(segment).is_some_and(|s| s.contains(n)) {
                joined += 1;
                self.join_in_flight_writes(segment, n);
                self.spawn_rebuild(segment, n);
            }
        }
        // Pieces that lost a member (left) may be complete now.
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for id in ids {
            for i in 0..self.write_piece_count(id) {
                self.check_write_piece(id, i);
            }
        }
        joined
    }

    /// `node` left `segment`'s set (the metadata service moved the replica):
    /// unfinished writes of the segment stop waiting for it and stop counting
    /// its copy; requests still in flight to it finish on their own and their
    /// replies are ignored. Its session closes once it is in no set.
    fn detach_member(&mut self, segment: SegmentIndex, node: NodeId) {
        for (id, op) in &mut self.ops {
            let OpKind::Write(w) = &mut op.kind else { continue };
            for (i, p) in w.pieces.iter_mut().enumerate() {
                if p.done || p.piece.segment != segment {
                    continue;
                }
                if p.pending.contains(&node) {
                    p.pending.retain(|n| *n != node);
                    self.detached.insert((*id, i, node));
                }
                p.acked.retain(|n| *n != node);
            }
        }
        if !self.sets.iter().any(|s| s.contains(node)) {
            if let Some(link) = self.links.remove(&node) {
                self.retired.push((Instant::now(), link));
            }
        }
    }

    /// A new member receives every write of its segment already in flight.
    fn join_in_flight_writes(&mut self, segment: SegmentIndex, node: NodeId) {
        let targets: Vec<(u64, usize)> = self
            .ops
            .iter()
            .filter(|(_, op)| op.started)
            .flat_map(|(id, op)| match &op.kind {
                OpKind::Write(w) => w
                    .pieces
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !p.done && p.piece.segment == segment)
                    .map(|(i, _)| (*id, i))
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
            .collect();
        for (id, i) in targets {
            self.add_write_target(id, i, node);
        }
    }

    fn go_fatal(&mut self, err: VolumeError) {
        if self.fatal.is_some() {
            return;
        }
        error!(volume = %self.target.volume, error = %err, "volume stops serving");
        self.fatal = Some(err.clone());
        self.detached.clear();
        for (_, h) in self.rebuilds.drain() {
            h.abort();
        }
        for h in self.helpers.drain(..) {
            h.abort();
        }
        for (_, op) in std::mem::take(&mut self.ops) {
            match op.kind {
                OpKind::Read(mut r) => {
                    if let Some(reply) = r.reply.take() {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
                OpKind::Write(mut w) => {
                    if let Some(reply) = w.reply.take() {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
                OpKind::Flush(mut f) => {
                    if let Some(reply) = f.reply.take() {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
                OpKind::Lock(mut l) => {
                    if let Some(reply) = l.reply.take() {
                        let _ = reply.send(None);
                    }
                }
            }
        }
        self.deps = DepTracker::new();
        // Writes held by a freeze fail like the others.
        self.abandon_freeze("the volume stopped serving");
    }

    // ----- rebuild ----------------------------------------------------------------------------

    fn spawn_rebuild(&mut self, segment: SegmentIndex, node: NodeId) {
        if self.fatal.is_some() || !self.writable || self.rebuilds.contains_key(&(segment, node)) {
            return;
        }
        let Some(set) = self.set(segment) else { return };
        let ctx = RebuildCtx {
            events: self.events_tx.clone(),
            target: self.target,
            segment,
            node,
            first_block: self.layout.segment_start(segment).0,
            len_blocks: set.len_blocks,
            chunk_blocks: u64::from(self.cfg.rebuild_chunk_blocks.clamp(1, MAX_IO_BLOCKS)),
            request_timeout: self.cfg.request_timeout,
        };
        info!(volume = %self.target.volume, %segment, %node, blocks = set.len_blocks, "rebuild starts");
        self.rebuilds.insert((segment, node), tokio::spawn(rebuild::run(ctx)));
    }

    fn on_lock_request(
        &mut self,
        segment: SegmentIndex,
        target: NodeId,
        range: BlockRange,
        reply: oneshot::Sender<Option<RebuildGrant>>,
    ) {
        if self.fatal.is_some() || range.count == 0 {
            let _ = reply.send(None);
            return;
        }
        let op = LockOp { segment, target, reply: Some(reply) };
        self.enqueue(range.start.0, range.count, LockMode::Exclusive, OpKind::Lock(op), None);
    }

    fn grant_lock(&mut self, id: u64) {
        let Some(Op { kind: OpKind::Lock(l), .. }) = self.ops.get(&id) else { return };
        let (segment, target) = (l.segment, l.target);
        let mut grant = None;
        if self.set(segment).and_then(|s| s.role(target)) == Some(ReplicaRole::Rebuilding) {
            if let Some(target_link) = self.links.get(&target).cloned() {
                let mut sources = Vec::new();
                if let Some(set) = self.set_mut(segment) {
                    let mut order: Vec<NodeId> = Vec::new();
                    while let Some(n) = set.pick_reader(&order) {
                        order.push(n);
                    }
                    sources = order;
                }
                let sources: Vec<(NodeId, Arc<dyn NodeLink>)> =
                    sources.into_iter().filter_map(|n| self.links.get(&n).map(|l| (n, Arc::clone(l)))).collect();
                if !sources.is_empty() {
                    grant = Some(RebuildGrant { lock: id, sources, target: target_link });
                }
            }
        }
        let Some(Op { kind: OpKind::Lock(l), .. }) = self.ops.get_mut(&id) else { return };
        let reply = l.reply.take();
        let granted = grant.is_some();
        let delivered = reply.is_some_and(|r| r.send(grant).is_ok());
        if !granted || !delivered {
            self.finish_op(id);
        }
    }

    fn on_unlock(&mut self, lock: u64, progress: Option<(SegmentIndex, NodeId, u64)>) {
        if let Some((seg, node, done)) = progress {
            let total = self.set(seg).map_or(0, |s| s.len_blocks);
            if let Some(s) = self.set_mut(seg) {
                s.set_progress(node, done);
            }
            let due = self.progress_reported.get(&(seg, node)).is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due && done < total {
                self.progress_reported.insert((seg, node), Instant::now());
                let control = Arc::clone(&self.control);
                let volume = self.target.volume;
                let h = tokio::spawn(async move {
                    let _ = control.report_rebuild_progress(volume, seg, node, done, total).await;
                });
                self.helpers.retain(|h| !h.is_finished());
                self.helpers.push(h);
            }
        }
        if matches!(self.ops.get(&lock), Some(Op { kind: OpKind::Lock(_), .. })) {
            self.finish_op(lock);
        }
    }

    fn on_rebuild_done(&mut self, segment: SegmentIndex, node: NodeId, copied_blocks: u64) {
        self.rebuilds.remove(&(segment, node));
        self.progress_reported.remove(&(segment, node));
        self.replacement_attempts.remove(&segment);
        self.counters.blocks_rebuilt += copied_blocks;
        if self.fatal.is_some() || !self.set_mut(segment).is_some_and(|s| s.mark_in_sync(node)) {
            return;
        }
        self.counters.rebuilds_done += 1;
        info!(volume = %self.target.volume, %segment, %node, copied_blocks, "rebuild finished; replica is in sync");
        let control = Arc::clone(&self.control);
        let volume = self.target.volume;
        let retry = self.cfg.retry_delay;
        let h = tokio::spawn(async move {
            for attempt in 1..=10u32 {
                match control.report_rebuilt(volume, segment, node).await {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(%volume, %segment, %node, error = %e, "could not report a finished rebuild; retrying");
                        tokio::time::sleep(retry * attempt).await;
                    }
                }
            }
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    // ----- events, ticks, status --------------------------------------------------------------

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Reply { op, tag, node, result } => {
                if self.fatal.is_some() {
                    return;
                }
                if let Tag::Piece(i) = tag {
                    if self.detached.remove(&(op, i, node)) {
                        debug!(%node, op, piece = i, ok = result.is_ok(), "late reply of a former member ignored");
                        return;
                    }
                }
                let outcome = classify(result);
                match tag {
                    Tag::Piece(i) => match self.ops.get(&op).map(|o| &o.kind) {
                        Some(OpKind::Read(_)) => self.on_read_reply(op, i, node, outcome),
                        Some(OpKind::Write(_)) => self.on_write_reply(op, i, node, outcome),
                        _ => {
                            if let Outcome::NodeDown(why) = outcome {
                                self.node_failed(node, &why);
                            }
                        }
                    },
                    Tag::Repair => self.on_repair_reply(op, node, outcome),
                    Tag::Flush => self.on_flush_reply(op, node, outcome),
                }
            }
            Event::Resend { op, piece, node } => self.on_resend(op, piece, node),
            Event::ReplicaSet { segment, failed, update, new_links, unreachable } => {
                self.on_replica_set(segment, failed, update, new_links, unreachable);
            }
            Event::LockRequest { segment, target, range, reply } => self.on_lock_request(segment, target, range, reply),
            Event::Unlock { lock, progress } => self.on_unlock(lock, progress),
            Event::RebuildDone { segment, target, copied_blocks } => {
                self.on_rebuild_done(segment, target, copied_blocks);
            }
            Event::NodeDown { node, segment, why } => {
                let left = segment.is_some_and(|seg| !self.set(seg).is_some_and(|s| s.contains(node)));
                if left {
                    debug!(%node, ?segment, %why, "failure of a former member ignored");
                } else if self.fatal.is_none() {
                    self.node_failed(node, &why);
                }
            }
            Event::Fatal(e) => self.go_fatal(e),
            Event::Renewed { capability, links } => self.on_renewed(capability, links),
            Event::RenewFailed(why) => self.on_renew_failed(&why),
            Event::IntentsSeen { per_node } => self.on_intents_seen(per_node),
            Event::LayoutSeen(result) => self.on_layout_seen(result),
            Event::Frozen { attempt, replies } => self.on_frozen(attempt, replies),
            Event::FreezeReported { snapshot, result } => self.on_freeze_reported(snapshot, result),
        }
    }

    /// Renews the capability when it is due; retires old sessions.
    fn renew_if_due(&mut self) {
        let grace = self.cfg.request_timeout * 2;
        self.retired.retain(|(t, _)| t.elapsed() < grace);
        let due = self.renew_at.is_some_and(|at| slate_protocol::now_unix_secs() >= at);
        if !due || self.fatal.is_some() {
            return;
        }
        self.renew_at = None;
        let control = Arc::clone(&self.control);
        let connector = Arc::clone(&self.connector);
        let tx = self.events_tx.clone();
        let target = self.target;
        let timeout = self.cfg.request_timeout;
        let mut nodes: Vec<(NodeId, String)> =
            self.sets.iter().flat_map(|s| s.members().iter().map(|m| (m.node, m.addr.clone()))).collect();
        nodes.sort();
        nodes.dedup_by_key(|(n, _)| *n);
        let h = tokio::spawn(async move {
            let cap = match control.renew_capability(target.volume, target.generation).await {
                Ok(c) if c.claims.volume == target.volume && c.claims.generation == target.generation => c,
                Ok(_) => {
                    let _ = tx.send(Event::RenewFailed("renewed capability is for another attachment".into()));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Event::RenewFailed(e.to_string()));
                    return;
                }
            };
            let mut links = Vec::new();
            for (node, addr) in nodes {
                match tokio::time::timeout(timeout, connector.connect(node, &addr, &cap)).await {
                    Ok(Ok(link)) => links.push((node, link)),
                    Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                        let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                        return;
                    }
                    // The old session serves until the node fails it; then the node is replaced as usual.
                    Ok(Err(e)) => warn!(%node, error = %e, "could not reopen a session with the renewed capability"),
                    Err(_) => warn!(%node, "timed out reopening a session with the renewed capability"),
                }
            }
            let _ = tx.send(Event::Renewed { capability: cap, links });
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    fn on_renewed(&mut self, capability: SignedCapability, links: Vec<(NodeId, Arc<dyn NodeLink>)>) {
        if self.fatal.is_some() {
            return;
        }
        info!(volume = %self.target.volume, expires = capability.claims.expires_unix_secs, "capability renewed");
        self.renew_at = Some(renew_at(slate_protocol::now_unix_secs(), capability.claims.expires_unix_secs));
        self.capability = capability;
        self.counters.capability_renewals += 1;
        for (node, link) in links {
            if self.dead.contains(&node) {
                continue;
            }
            if let Some(old) = self.links.insert(node, link) {
                self.retired.push((Instant::now(), old));
            }
        }
    }

    fn on_renew_failed(&mut self, why: &str) {
        warn!(volume = %self.target.volume, %why, "capability renewal failed; retrying");
        let now = slate_protocol::now_unix_secs();
        let left = self.capability.claims.expires_unix_secs.saturating_sub(now);
        self.renew_at = Some(now + (left / 2).clamp(1, 10));
    }

    /// Starts a layout poll when due (read-write attachments only).
    fn poll_layout_if_due(&mut self) {
        let interval = self.cfg.layout_poll_interval;
        if interval.is_zero() || !self.writable || self.fatal.is_some() || self.closing.is_some() {
            return;
        }
        if self.layout_poll_at.is_none_or(|at| Instant::now() < at) {
            return;
        }
        self.layout_poll_at = None;
        let ctx = PollCtx {
            control: Arc::clone(&self.control),
            connector: Arc::clone(&self.connector),
            target: self.target,
            segment_blocks: self.layout.segment_blocks,
            size_bytes: self.layout.size_bytes,
            known: self.sets.iter().map(|s| (s.epoch, s.write_set().collect())).collect(),
            linked: self.links.keys().copied().collect(),
            dead: self.dead.clone(),
            capability: self.capability.clone(),
            timeout: self.cfg.request_timeout,
        };
        let tx = self.events_tx.clone();
        let h = tokio::spawn(async move {
            let result = poll_layout(ctx, &tx).await;
            let _ = tx.send(Event::LayoutSeen(result));
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    /// Ends a layout poll: adopts every set whose epoch is newer than the one in use.
    fn on_layout_seen(&mut self, result: Result<LayoutPoll, String>) {
        self.layout_poll_at = Some(Instant::now() + self.cfg.layout_poll_interval);
        let poll = match result {
            Ok(p) => p,
            Err(why) => {
                debug!(volume = %self.target.volume, %why, "layout poll failed; trying again later");
                return;
            }
        };
        if self.fatal.is_some() {
            return;
        }
        if let Some(c) = poll.capability {
            // Existing sessions keep theirs; the renewal schedule (from the oldest) stays as it is.
            self.capability = c;
            self.counters.capability_renewals += 1;
        }
        for (n, l) in poll.links {
            if !self.dead.contains(&n) {
                self.links.entry(n).or_insert(l);
            }
        }
        if let Some(g) = poll.grown {
            self.grow(g);
        }
        for set in poll.sets {
            let Some(current) = self.set(set.segment).map(|s| s.epoch) else { continue };
            if set.epoch <= current {
                continue; // our own report (or an earlier poll) got there first
            }
            if let Some(full) = self.full_size.get_mut(set.segment.0 as usize) {
                *full = set.replicas.len().max(MIN_COPIES);
            }
            self.counters.layout_changes += 1;
            self.adopt_set(set.segment, &set, &[]);
        }
        // After the sets: a freeze covers the members just adopted.
        self.on_snapshots_seen(poll.snapshots);
    }

    /// Adopts a larger size: adds the new segments' sets (their replicas are
    /// assigned and connected already), lengthens the last old segment, then
    /// publishes the size so that requests up to the new end are accepted.
    fn grow(&mut self, g: Growth) {
        if g.size_bytes <= self.layout.size_bytes {
            return; // never shrink; an equal size is nothing new
        }
        let old_count = self.sets.len();
        let mut grown = self.layout.clone();
        grown.size_bytes = g.size_bytes;
        grown.segments.extend(g.segments.iter().cloned());
        let new_count = grown.segment_count() as usize;
        let in_order = g.segments.iter().enumerate().all(|(i, s)| s.segment.0 as usize == old_count + i);
        if new_count != old_count + g.segments.len() || !in_order {
            warn!(
                volume = %self.target.volume, size = g.size_bytes, segments = g.segments.len(),
                "the grown layout does not add exactly the missing segments; ignored"
            );
            return;
        }
        info!(
            volume = %self.target.volume, from = self.layout.size_bytes, to = g.size_bytes,
            new_segments = g.segments.len(), "volume grew"
        );
        self.layout = grown;
        // The last old segment may have grown in place (it was short).
        if let Some(last) = self.sets.last_mut() {
            last.len_blocks = self.layout.segment_len(last.segment);
        }
        for s in &g.segments {
            let set = SegmentSet::from_layout(s, self.layout.segment_len(s.segment));
            self.full_size.push(set.members().len().max(MIN_COPIES));
            self.sets.push(set);
        }
        for s in &g.segments {
            for r in &s.replicas {
                if self.dead.contains(&r.node) {
                    if let Some(set) = self.set_mut(s.segment) {
                        set.remove(r.node);
                    }
                    self.request_replacement(s.segment, r.node);
                } else if !self.links.contains_key(&r.node) {
                    self.node_failed(r.node, "unreachable when the volume grew");
                } else if r.role == ReplicaRole::Rebuilding {
                    self.spawn_rebuild(s.segment, r.node);
                }
            }
        }
        self.counters.growths += 1;
        self.size.store(self.layout.size_bytes, Ordering::Release);
    }

    /// Fails writes that have waited too long for a second copy (a replacement that never comes).
    fn on_tick(&mut self) {
        self.check_freeze_hold();
        self.renew_if_due();
        self.poll_layout_if_due();
        self.clear_intents_if_due();
        let limit = self.cfg.stall_timeout;
        let stuck: Vec<u64> = self
            .ops
            .iter()
            .filter(
                |(_, op)| matches!(&op.kind, OpKind::Write(w) if w.waiting_since.is_some_and(|t| t.elapsed() > limit)),
            )
            .map(|(id, _)| *id)
            .collect();
        for id in stuck {
            if let Some(Op { kind: OpKind::Write(w), .. }) = self.ops.get_mut(&id) {
                error!(volume = %self.target.volume, "write could not reach two replicas in time; failing it");
                w.failed.get_or_insert(VolumeError::Io("fewer than two replicas could store the write".into()));
                for p in &mut w.pieces {
                    p.pending.clear();
                }
            }
            for i in 0..self.write_piece_count(id) {
                self.check_write_piece(id, i);
            }
        }
    }

    /// True when every member of the segment is in sync, none is missing and no replacement is pending.
    fn segment_healthy(&self, segment: SegmentIndex) -> bool {
        let Some(set) = self.set(segment) else { return false };
        let full = self.full_size.get(segment.0 as usize).copied().unwrap_or(MIN_COPIES);
        set.members().len() >= full
            && set.members().iter().all(|m| m.role == ReplicaRole::InSync && !self.dead.contains(&m.node))
            && !self.replacing.iter().any(|(s, _)| *s == segment)
            && !self.rebuilds.keys().any(|(s, _)| *s == segment)
    }

    /// Starts a round of intent clearing when due: asks every node for its recorded regions.
    fn clear_intents_if_due(&mut self) {
        let interval = self.cfg.intent_clear_interval;
        if interval.is_zero() || !self.writable || self.fatal.is_some() || self.closing.is_some() {
            return;
        }
        if self.intent_round_at.is_none_or(|at| Instant::now() < at) {
            return;
        }
        self.intent_round_at = None;
        let mut nodes: Vec<NodeId> = self
            .sets
            .iter()
            .filter(|s| self.segment_healthy(s.segment))
            .flat_map(|s| s.members().iter().map(|m| m.node))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let links: Vec<(NodeId, Arc<dyn NodeLink>)> =
            nodes.into_iter().filter_map(|n| self.links.get(&n).map(|l| (n, Arc::clone(l)))).collect();
        let req = Request::WriteIntents { target: self.target };
        let asks: Vec<(NodeId, super::link::BoxFuture<Result<Reply, LinkError>>)> =
            links.iter().map(|(n, l)| (*n, l.start(&req))).collect();
        let tx = self.events_tx.clone();
        let timeout = self.cfg.request_timeout;
        let h = tokio::spawn(async move {
            let mut per_node = Vec::new();
            for (node, fut) in asks {
                match classify(tokio::time::timeout(timeout, fut).await.unwrap_or(Err(LinkError::Timeout))) {
                    Outcome::Ok(Reply::Ranges(r)) => per_node.push((node, r)),
                    Outcome::Fatal(e) => {
                        let _ = tx.send(Event::Fatal(e));
                        return;
                    }
                    // The data path notices a node that is down; this round just leaves it out.
                    other => debug!(%node, ?other, "write intents not available"),
                }
            }
            let _ = tx.send(Event::IntentsSeen { per_node });
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    /// Ends a round of intent clearing: clears, on each node, the recorded regions that are cold.
    fn on_intents_seen(&mut self, per_node: Vec<(NodeId, Vec<BlockRange>)>) {
        self.intent_round_at = Some(Instant::now() + self.cfg.intent_clear_interval);
        let touched = self.intents.take_touched();
        if self.fatal.is_some() || !self.writable {
            return;
        }
        let busy = self.deps.ranges();
        let volume_blocks = self.layout.volume_blocks();
        let mut sent = 0u64;
        for (node, ranges) in per_node {
            if self.dead.contains(&node) {
                continue;
            }
            let Some(link) = self.links.get(&node).cloned() else { continue };
            let mut clear: Vec<BlockRange> = Vec::new();
            for r in ranges {
                let (a, b) = (r.start.0.min(volume_blocks), r.start.0.saturating_add(r.count).min(volume_blocks));
                if a >= b {
                    continue;
                }
                for piece in runs::split(a, b - a, self.layout.segment_blocks, u64::MAX) {
                    let in_sync_member =
                        self.set(piece.segment).and_then(|s| s.role(node)) == Some(ReplicaRole::InSync);
                    if !in_sync_member || !self.segment_healthy(piece.segment) {
                        continue;
                    }
                    for (x, y) in self.intents.clearable(piece.start, piece.start + piece.count, &touched, &busy) {
                        clear.push(BlockRange { start: BlockIndex(x), count: y - x });
                    }
                }
            }
            if clear.is_empty() {
                continue;
            }
            debug!(volume = %self.target.volume, %node, ranges = clear.len(), "clearing write intents of quiet regions");
            for batch in clear.chunks(MAX_RANGES) {
                sent += batch.len() as u64;
                // Sent now, so that the node orders it before any later write of this session.
                let fut = link.start(&Request::ClearIntents { target: self.target, ranges: batch.to_vec() });
                let tx = self.events_tx.clone();
                let timeout = self.cfg.request_timeout;
                tokio::spawn(async move {
                    match classify(tokio::time::timeout(timeout, fut).await.unwrap_or(Err(LinkError::Timeout))) {
                        Outcome::Ok(_) => {}
                        Outcome::Fatal(e) => drop(tx.send(Event::Fatal(e))),
                        other => debug!(%node, ?other, "clearing write intents failed; they stay recorded"),
                    }
                });
            }
        }
        if sent > 0 {
            self.counters.intent_clear_rounds += 1;
            self.counters.intent_ranges_cleared += sent;
        }
    }

    fn status(&self) -> VolumeStatus {
        VolumeStatus {
            volume: self.target.volume,
            generation: self.target.generation,
            size_bytes: self.layout.size_bytes,
            fenced: self.fatal == Some(VolumeError::Fenced),
            error: self.fatal.as_ref().map(ToString::to_string),
            in_flight_ops: self.ops.len(),
            segments: self
                .sets
                .iter()
                .map(|s| SegmentStatus { segment: s.segment, epoch: s.epoch, replicas: s.members().to_vec() })
                .collect(),
            counters: self.counters.clone(),
        }
    }
}

/// What a layout poll needs from the actor's state when it starts.
struct PollCtx {
    control: Arc<dyn ControlPlane>,
    connector: Arc<dyn Connector>,
    target: Target,
    segment_blocks: u64,
    /// The volume's size in use: a polled layout that is larger grows the volume.
    size_bytes: u64,
    /// Per segment (by index): the epoch and members in use.
    known: Vec<(Epoch, Vec<NodeId>)>,
    linked: HashSet<NodeId>,
    dead: HashSet<NodeId>,
    capability: SignedCapability,
    timeout: Duration,
}

/// Fetches the layout and prepares the sets that are newer than the client's:
/// gets a capability covering their new members if needed, has those members
/// assigned the segment, and opens sessions with them. A set whose new
/// members cannot be prepared is left for the next poll.
async fn poll_layout(ctx: PollCtx, tx: &mpsc::UnboundedSender<Event>) -> Result<LayoutPoll, String> {
    let volume = ctx.target.volume;
    let state = ctx.control.refresh_state(volume).await.map_err(|e| e.to_string())?;
    let (layout, snapshots) = (state.layout, state.pending_snapshots);
    if layout.volume != volume || layout.segment_blocks != ctx.segment_blocks {
        return Err("the control plane returned the layout of another volume or geometry".into());
    }
    layout.validate()?;
    // A larger size brings the segments past the ones in use (never shrink).
    let grows = layout.size_bytes > ctx.size_bytes;
    let new_size = layout.size_bytes;
    let mut added: Vec<SegmentReplicas> = Vec::new();
    let mut sets: Vec<(SegmentReplicas, Vec<ReplicaInfo>)> = Vec::new();
    for s in layout.segments {
        let Some((epoch, members)) = ctx.known.get(s.segment.0 as usize) else {
            if grows {
                added.push(s);
            }
            continue;
        };
        if s.epoch <= *epoch {
            continue;
        }
        let fresh: Vec<ReplicaInfo> =
            s.replicas.iter().filter(|r| !members.contains(&r.node) && !ctx.dead.contains(&r.node)).cloned().collect();
        sets.push((s, fresh));
    }
    added.sort_by_key(|s| s.segment);
    if sets.is_empty() && !grows {
        return Ok(LayoutPoll { sets: Vec::new(), capability: None, links: Vec::new(), snapshots, grown: None });
    }
    // A capability whose node scope covers every new member (slate-meta signs from the current layout),
    // and, when the volume grew, whose size and segment scope cover the new segments.
    let uncovered = grows
        || sets
            .iter()
            .flat_map(|(_, f)| f)
            .chain(added.iter().flat_map(|s| &s.replicas))
            .any(|r| !ctx.capability.claims.nodes.contains(&r.node));
    let renewed = if uncovered {
        let c = ctx.control.renew_capability(volume, ctx.target.generation).await.map_err(|e| e.to_string())?;
        if c.claims.volume != volume || c.claims.generation != ctx.target.generation {
            return Err("the renewed capability is for another attachment".into());
        }
        Some(c)
    } else {
        None
    };
    let cap = renewed.clone().unwrap_or_else(|| ctx.capability.clone());
    let mut links: Vec<(NodeId, Arc<dyn NodeLink>)> = Vec::new();
    let mut ready = Vec::new();
    'sets: for (set, fresh) in sets {
        if !fresh.is_empty() {
            let new_members = SegmentReplicas { segment: set.segment, epoch: set.epoch, replicas: fresh.clone() };
            if let Err(e) = ctx.control.assign_replicas(volume, &new_members, &cap).await {
                warn!(%volume, segment = %set.segment, error = %e, "cannot assign the segment to its new replicas; trying again later");
                continue;
            }
            for r in &fresh {
                if ctx.linked.contains(&r.node) || links.iter().any(|(n, _)| *n == r.node) {
                    continue;
                }
                match tokio::time::timeout(ctx.timeout, ctx.connector.connect(r.node, &r.addr, &cap)).await {
                    Ok(Ok(link)) => links.push((r.node, link)),
                    Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                        let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                        return Err("fenced".into());
                    }
                    Ok(Err(e)) => {
                        warn!(%volume, node = %r.node, addr = %r.addr, error = %e, "cannot reach a new replica; trying again later");
                        continue 'sets;
                    }
                    Err(_) => {
                        warn!(%volume, node = %r.node, addr = %r.addr, "timed out reaching a new replica; trying again later");
                        continue 'sets;
                    }
                }
            }
        }
        ready.push(set);
    }
    let grown = if grows {
        match prepare_growth(&ctx, &cap, &added, &mut links, tx).await {
            Ok(()) => Some(Growth { size_bytes: new_size, segments: added }),
            Err(PrepareError::Fenced) => return Err("fenced".into()),
            Err(PrepareError::Later(why)) => {
                warn!(%volume, size = new_size, %why, "cannot prepare the grown volume's new segments; trying again later");
                None
            }
        }
    } else {
        None
    };
    Ok(LayoutPoll { sets: ready, capability: renewed, links, snapshots, grown })
}

/// Why the new segments of a grown volume are not ready.
enum PrepareError {
    /// A node refused this attachment's generation: the volume is fenced.
    Fenced,
    /// Anything else: the growth is tried again at the next poll.
    Later(String),
}

/// Tells the replicas of a grown volume's new segments that they hold them
/// (the assignment a joining replica gets) and opens sessions with the nodes
/// this client has none with yet. Nodes already known failed are left out:
/// the actor asks for their replacement once the sets are in.
async fn prepare_growth(
    ctx: &PollCtx,
    cap: &SignedCapability,
    added: &[SegmentReplicas],
    links: &mut Vec<(NodeId, Arc<dyn NodeLink>)>,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<(), PrepareError> {
    let volume = ctx.target.volume;
    let mut opened: Vec<(NodeId, Arc<dyn NodeLink>)> = Vec::new();
    for set in added {
        let live: Vec<ReplicaInfo> = set.replicas.iter().filter(|r| !ctx.dead.contains(&r.node)).cloned().collect();
        let assign = SegmentReplicas { segment: set.segment, epoch: set.epoch, replicas: live.clone() };
        ctx.control.assign_replicas(volume, &assign, cap).await.map_err(|e| PrepareError::Later(e.to_string()))?;
        for r in &live {
            let known = ctx.linked.contains(&r.node)
                || links.iter().any(|(n, _)| *n == r.node)
                || opened.iter().any(|(n, _)| *n == r.node);
            if known {
                continue;
            }
            match tokio::time::timeout(ctx.timeout, ctx.connector.connect(r.node, &r.addr, cap)).await {
                Ok(Ok(link)) => opened.push((r.node, link)),
                Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                    let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                    return Err(PrepareError::Fenced);
                }
                Ok(Err(e)) => return Err(PrepareError::Later(format!("{} ({}): {e}", r.node, r.addr))),
                Err(_) => return Err(PrepareError::Later(format!("{} ({}): timed out", r.node, r.addr))),
            }
        }
    }
    links.extend(opened);
    Ok(())
}
