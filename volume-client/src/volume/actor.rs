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
//!   flight completed on every replica around the freeze.
//! - **Fencing.** A `StaleGeneration` reply is fatal: every in-flight and
//!   later operation fails with [`VolumeError::Fenced`]; nothing is retried.
//!
//! Where each part lives:
//!
//! | module | owns |
//! | --- | --- |
//! | this file | the commands and events, the actor's state, its loop and dispatch, status |
//! | `ops.rs` | the operations in flight, their range locks and order, sending one request |
//! | `read.rs` | reads and block-status queries: picking a replica, corrupt blocks, repair |
//! | `write.rs` | the write path (writes, trims, write-zeroes) from command to reply |
//! | `flush.rs` | flush |
//! | `failure.rs` | a failed node; fencing and other fatal errors |
//! | `membership.rs` | replacing failed members, adopting changed sets, segment health |
//! | `rebuilds.rs` | starting rebuilds, locking their chunks, progress, marking in sync |
//! | `capability.rs` | renewing the capability and reopening sessions |
//! | `layout_poll.rs` | polling the layout for changes made elsewhere |
//! | `grow.rs` | online growth |
//! | `freeze.rs` | freezing pending snapshots |
//! | `intent_clearing.rs` | clearing write intents of quiet regions |

use super::control::ControlPlane;
use super::deps::DepTracker;
use super::error::VolumeError;
use super::intents::IntentTracker;
use super::layout::{ReplicaRole, VolumeLayout};
use super::link::{Connector, LinkError, NodeLink};
use super::rebuild::RebuildGrant;
use super::replicas::SegmentSet;
use super::status::{Counters, SegmentStatus, VolumeStatus};
use super::VolumeConfig;
use bytes::Bytes;
use ops::{Op, OpKind};
use slate_protocol::message::BlockRange;
use slate_protocol::{BlockIndex, ErrorKind, NodeId, Reply, SegmentIndex, SignedCapability, Target};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::debug;

mod capability;
mod failure;
mod flush;
mod freeze;
mod grow;
mod intent_clearing;
mod layout_poll;
mod membership;
mod ops;
mod read;
mod rebuilds;
mod write;

pub use grow::Growth;
pub use layout_poll::LayoutPoll;

/// A write is never acknowledged with fewer live copies than this.
pub const MIN_COPIES: usize = 2;

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

/// Which part of an operation a reply is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Piece(usize),
    Repair,
    Flush,
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
    /// Requests sent to each node whose reply has not come back (reads go to the least loaded).
    inflight: std::cell::RefCell<HashMap<NodeId, usize>>,
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
    let renew = capability::renew_at(slate_protocol::now_unix_secs(), init.capability.claims.expires_unix_secs);
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
        inflight: std::cell::RefCell::default(),
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
                self.on_write(start, fua, crcs, data, permit, reply);
            }
            Cmd::Trim { start, count, zeroes, permit, reply } => self.on_trim(start, count, zeroes, permit, reply),
            // A read-only attachment has nothing to make durable (and no right to ask).
            Cmd::Flush { reply } if !self.writable => drop(reply.send(Ok(()))),
            Cmd::Flush { reply } => self.on_flush(reply),
            Cmd::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Cmd::Close { reply } => self.begin_close(Some(reply)),
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Reply { op, tag, node, result } => {
                if let Some(n) = self.inflight.borrow_mut().get_mut(&node) {
                    *n = n.saturating_sub(1);
                }
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

    /// The periodic work: the freeze's hold limit, renewal, layout poll,
    /// intent clearing, and writes stalled for want of a second copy.
    fn on_tick(&mut self) {
        self.check_freeze_hold();
        self.renew_if_due();
        self.poll_layout_if_due();
        self.clear_intents_if_due();
        self.fail_stalled_writes();
    }

    fn set(&self, seg: SegmentIndex) -> Option<&SegmentSet> {
        self.sets.get(seg.0 as usize)
    }

    fn set_mut(&mut self, seg: SegmentIndex) -> Option<&mut SegmentSet> {
        self.sets.get_mut(seg.0 as usize)
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
