//! The raft thread: owns the `RawNode`, the log store and the state machine, and runs the Ready loop.
//!
//! One OS thread (not a tokio task) because every step may fsync and call into the state machine; it
//! must never stall the async runtime, and nothing else touches raft state, so no locks are needed.
//!
//! The Ready loop follows raft-rs's documented order: send the leader's messages; install a snapshot;
//! apply committed entries; persist entries and hard state (fsync when `must_sync`); only then send the
//! persisted messages; `advance`; handle the light ready (commit index, messages, committed entries);
//! `advance_apply`. Snapshots for compaction, and purges for crypto-shred, are taken after that, when
//! no Ready is in flight.
//!
//! Requests carry deadlines checked on every tick: proposals and reads wait at most
//! `no_leader_timeout` for a leader to be known and `request_timeout` in total.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};

use super::codec::{decode_snapshot_data, encode_snapshot_data, RequestCtx};
use super::storage::LogStore;
use super::transport::{Inbound, Sink, Transport};
use super::{
    Consensus, ConsensusConfig, ConsensusError, ConsensusHandle, Event, MembershipChange, Reply, Role, Shared,
    StateMachine, Status,
};

/// The index and term of the initial snapshot every bootstrapped member starts from.
const BOOTSTRAP_INDEX: u64 = 1;
const BOOTSTRAP_TERM: u64 = 1;
/// Capacity of the raft thread's event queue.
const EVENT_QUEUE: usize = 8192;
/// Events handled per wake-up before the Ready is processed (batches many proposals into one fsync).
const EVENT_BATCH: usize = 512;
/// Requests waiting in the raft thread at once (proposals, queued requests and reads); beyond: `Busy`.
const MAX_PENDING: usize = 65_536;

pub(crate) fn start<S: StateMachine>(
    cfg: ConsensusConfig,
    mut sm: S,
) -> Result<(Consensus, ConsensusHandle<S>), ConsensusError> {
    cfg.validate()?;
    let mut store =
        LogStore::open_with(&cfg.data_dir, cfg.log_file_bytes, cfg.log_purge_bytes).map_err(ConsensusError::Storage)?;
    // Stored addresses reflect membership changes; the configuration fills the gaps.
    let mut peers = store.peers();
    for (id, addr) in &cfg.peers {
        peers.entry(*id).or_insert(*addr);
    }
    if store.initialized() {
        // Restart: bring the state machine up to the recorded snapshot if it is behind it.
        let snap_index = store.snapshot_meta().index;
        if sm.applied_index() < snap_index {
            let snap = store.load_snapshot().map_err(ConsensusError::Storage)?;
            let (_, data) = decode_snapshot_data(&snap.data).map_err(ConsensusError::Storage)?;
            sm.restore(snap_index, data).map_err(ConsensusError::Storage)?;
        }
        let (_, last) = store.first_last();
        if sm.applied_index() > last {
            return Err(ConsensusError::Storage(format!(
                "state machine applied index {} is ahead of the raft log (last index {last})",
                sm.applied_index()
            )));
        }
        store.ensure_commit_at_least(sm.applied_index()).map_err(ConsensusError::Storage)?;
        compact_to_state_machine(&mut store, &mut sm, &peers).map_err(ConsensusError::Storage)?;
    } else if !cfg.join {
        if sm.applied_index() > 0 {
            return Err(ConsensusError::Config(
                "the raft log is empty but the state machine has applied entries; refusing to bootstrap".into(),
            ));
        }
        let mut snap = Snapshot::default();
        let m = snap.mut_metadata();
        m.index = BOOTSTRAP_INDEX;
        m.term = BOOTSTRAP_TERM;
        m.mut_conf_state().voters = cfg.peers.iter().map(|(id, _)| *id).collect();
        snap.data = encode_snapshot_data(&peers, &sm.snapshot()).into();
        store.bootstrap(&snap, &peers).map_err(ConsensusError::Storage)?;
    }
    let applied = sm.applied_index().max(store.snapshot_meta().index);

    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        max_uncommitted_size: 256 << 20,
        ..Default::default()
    };
    raft_cfg.validate().map_err(|e| ConsensusError::Config(e.to_string()))?;
    let logger = super::slog_bridge::logger(cfg.id);
    let raw = RawNode::new(&raft_cfg, store, &logger).map_err(|e| ConsensusError::Storage(e.to_string()))?;

    let (tx, rx) = sync_channel::<Event<S>>(EVENT_QUEUE);
    let sink_tx = tx.clone();
    let sink: Sink = Arc::new(move |ev| sink_tx.try_send(Event::Transport(ev)).is_ok());
    let advertise = cfg.peers.iter().find(|(id, _)| *id == cfg.id).map_or(cfg.listen, |(_, a)| *a);
    let transport = Transport::start(cfg.id, cfg.listen, advertise, cfg.peer_queue_len, cfg.tls.clone(), sink)?;
    for (id, addr) in &peers {
        transport.set_peer(*id, *addr);
    }
    let shared = Arc::new(Shared { status: Mutex::new(Status { id: cfg.id, ..Status::default() }) });
    let stop = Arc::new(AtomicBool::new(false));
    let handle = ConsensusHandle {
        tx,
        shared: Arc::clone(&shared),
        request_timeout: cfg.request_timeout,
        no_leader_timeout: cfg.no_leader_timeout,
        max_command_bytes: cfg.max_command_bytes,
    };
    let mut node = Node {
        id: cfg.id,
        boot: rand::random(),
        raw,
        sm,
        rx,
        transport: transport.clone(),
        peers,
        shared: Arc::clone(&shared),
        stop: Arc::clone(&stop),
        next_request: 1,
        proposals: HashMap::new(),
        proposed_at: HashMap::new(),
        conf: None,
        queued: VecDeque::new(),
        reads: HashMap::new(),
        applied,
        purge_pending: false,
        purged_index: applied,
        done_proposals: Vec::new(),
        done_conf: Vec::new(),
        cfg,
    };
    node.publish_status();
    let thread = std::thread::Builder::new().name(format!("raft-{}", node.id)).spawn(move || {
        let shared = Arc::clone(&node.shared);
        if std::panic::catch_unwind(AssertUnwindSafe(|| node.run())).is_err() {
            tracing::error!("raft thread panicked; this node stopped participating");
            if let Ok(mut s) = shared.status.lock() {
                s.role = Role::Failed;
            }
        }
    })?;
    Ok((Consensus { stop, thread: Some(thread), transport }, handle))
}

/// At start: compact the log up to what the state machine has durably applied, then purge obsolete files.
///
/// This closes a crash window of crypto-shred: a state machine that persisted a shred but crashed before the
/// purge would not ask again (the entry is not applied twice), so every start compacts and purges anyway.
/// Skipped when a membership change lies after the state machine's index (the recorded conf state might then
/// be newer than that index, and a snapshot must carry the conf state of its own index).
fn compact_to_state_machine<S: StateMachine>(
    store: &mut LogStore,
    sm: &mut S,
    peers: &BTreeMap<u64, SocketAddr>,
) -> Result<(), String> {
    let index = sm.applied_index();
    let (_, last) = store.first_last();
    if index > store.snapshot_meta().index && !store.has_conf_change_in(index + 1, last + 1)? {
        let term = store.term_of(index)?;
        let mut snap = Snapshot { data: encode_snapshot_data(peers, &sm.snapshot()).into(), ..Default::default() };
        let m = snap.mut_metadata();
        m.index = index;
        m.term = term;
        m.set_conf_state(store.conf_state().clone());
        store.compact_with_snapshot(&snap)?;
    }
    store.purge_all_obsolete()
}

struct Pending<T> {
    reply: Reply<T>,
    deadline: Instant,
}

enum Op {
    Propose(Vec<u8>, Reply<Vec<u8>>),
    Conf(MembershipChange, Reply<()>),
}

/// A request waiting for a leader to be known (or for raft to accept it again).
struct Queued {
    request: u64,
    op: Op,
    no_leader_deadline: Instant,
    deadline: Instant,
}

struct PendingRead {
    reply: Reply<()>,
    created: Instant,
    deadline: Instant,
    /// The read index once the leader confirmed it.
    index: Option<u64>,
    /// When the ReadIndex request was last handed to raft (it is resent if no answer comes).
    sent: Option<Instant>,
}

struct Node<S> {
    id: u64,
    boot: u64,
    cfg: ConsensusConfig,
    raw: RawNode<LogStore>,
    sm: S,
    rx: Receiver<Event<S>>,
    transport: Transport,
    peers: BTreeMap<u64, SocketAddr>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    next_request: u64,
    /// Proposals handed to raft, by request id, completed when this node applies them.
    proposals: HashMap<u64, Pending<Vec<u8>>>,
    /// Log index at which this node, as leader, appended a proposal (index -> request id).
    proposed_at: HashMap<u64, u64>,
    /// This node's membership change in flight (request id).
    conf: Option<(u64, Pending<()>)>,
    queued: VecDeque<Queued>,
    reads: HashMap<u64, PendingRead>,
    applied: u64,
    purge_pending: bool,
    /// See [`Status::purged_index`].
    purged_index: u64,
    /// Replies for entries applied in this iteration, sent only after `maintain` (so that a caller who sees
    /// the result of a command that asked for a purge also sees the purge done).
    done_proposals: Vec<(Reply<Vec<u8>>, Vec<u8>)>,
    done_conf: Vec<(Reply<()>, Result<(), ConsensusError>)>,
}

impl<S: StateMachine> Node<S> {
    fn run(&mut self) {
        let tick = self.cfg.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(ev) => {
                    self.handle_event(ev);
                    for _ in 0..EVENT_BATCH {
                        match self.rx.try_recv() {
                            Ok(ev) => self.handle_event(ev),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + tick;
                self.on_tick(now);
            }
            if let Err(e) = self.on_ready().and_then(|()| self.maintain()) {
                tracing::error!(error = %e, "raft storage failure; this node stops participating");
                self.fail_all(&e);
                return;
            }
            self.send_replies();
            self.publish_status();
        }
        self.shutdown_all();
    }

    fn request_id(&mut self) -> u64 {
        let r = self.next_request;
        self.next_request += 1;
        r
    }

    fn ctx(&self, request: u64) -> Vec<u8> {
        RequestCtx { node: self.id, boot: self.boot, request }.encode()
    }

    fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    fn handle_event(&mut self, ev: Event<S>) {
        let now = Instant::now();
        match ev {
            Event::Propose { command, reply } => {
                if self.pending_count() >= MAX_PENDING {
                    let _ = reply.send(Err(ConsensusError::Busy));
                    return;
                }
                let request = self.request_id();
                let q = self.queued_op(request, Op::Propose(command, reply), now);
                self.try_submit(q, now);
            }
            Event::ConfChange { change, reply } => {
                if let Err(e) = self.check_conf_change(&change) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let request = self.request_id();
                let q = self.queued_op(request, Op::Conf(change, reply), now);
                self.try_submit(q, now);
            }
            Event::ReadIndex { reply } => {
                if self.pending_count() >= MAX_PENDING {
                    let _ = reply.send(Err(ConsensusError::Busy));
                    return;
                }
                let request = self.request_id();
                let read = PendingRead {
                    reply,
                    created: now,
                    deadline: now + self.cfg.request_timeout,
                    index: None,
                    sent: None,
                };
                self.reads.insert(request, read);
                self.send_read_index(request, now);
            }
            Event::Read { f } => {
                // A panicking read closure drops its reply (the caller gets an error) but not the node.
                let sm = &self.sm;
                if std::panic::catch_unwind(AssertUnwindSafe(|| f(sm))).is_err() {
                    tracing::error!("a read closure panicked on the raft thread");
                }
            }
            Event::Transport(t) => self.handle_inbound(t),
        }
    }

    fn pending_count(&self) -> usize {
        self.proposals.len() + self.queued.len() + self.reads.len()
    }

    fn queued_op(&self, request: u64, op: Op, now: Instant) -> Queued {
        Queued {
            request,
            op,
            no_leader_deadline: now + self.cfg.no_leader_timeout,
            deadline: now + self.cfg.request_timeout,
        }
    }

    fn handle_inbound(&mut self, t: Inbound) {
        match t {
            Inbound::Message(m) => {
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(error = %e, "raft step refused a peer message");
                }
            }
            Inbound::SnapshotStatus { to, ok } => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
            Inbound::Unreachable { to } => self.raw.report_unreachable(to),
            Inbound::PeerAddr { id, addr } => {
                if id != self.id && !self.peers.contains_key(&id) {
                    self.peers.insert(id, addr);
                    self.transport.set_peer(id, addr);
                }
            }
        }
    }

    fn check_conf_change(&self, change: &MembershipChange) -> Result<(), ConsensusError> {
        let conf_queued = self.queued.iter().any(|q| matches!(q.op, Op::Conf(..)));
        let leader_pending = self.raw.raft.state == StateRole::Leader && self.raw.raft.has_pending_conf();
        if self.conf.is_some() || conf_queued || leader_pending {
            return Err(ConsensusError::ConfChangePending);
        }
        let voters: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        match change {
            MembershipChange::Add(id, _) if voters.contains(id) => {
                Err(ConsensusError::Membership(format!("node {id} is already a voter")))
            }
            MembershipChange::Remove(id) if !voters.contains(id) => {
                Err(ConsensusError::Membership(format!("node {id} is not a voter")))
            }
            MembershipChange::Remove(_) if voters.len() <= 1 => {
                Err(ConsensusError::Membership("cannot remove the last voter".to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// Hand a request to raft, or keep it queued until a leader is known; fail it once its deadline passed.
    fn try_submit(&mut self, q: Queued, now: Instant) {
        let no_leader = self.leader() == raft::INVALID_ID;
        if no_leader || now >= q.deadline {
            if now >= q.no_leader_deadline || now >= q.deadline {
                let err = if no_leader { ConsensusError::NoLeader } else { ConsensusError::Timeout };
                fail_op(q.op, err);
            } else {
                self.queued.push_back(q);
            }
            return;
        }
        let ctx = self.ctx(q.request);
        let result = match &q.op {
            Op::Propose(cmd, _) => self.raw.propose(ctx, cmd.clone()),
            Op::Conf(change, _) => {
                let mut cc = ConfChange::default();
                match change {
                    MembershipChange::Add(id, addr) => {
                        cc.set_change_type(ConfChangeType::AddNode);
                        cc.node_id = *id;
                        cc.context = addr.to_string().into_bytes().into();
                    }
                    MembershipChange::Remove(id) => {
                        cc.set_change_type(ConfChangeType::RemoveNode);
                        cc.node_id = *id;
                    }
                }
                self.raw.propose_conf_change(ctx, cc)
            }
        };
        match result {
            Ok(()) => match q.op {
                Op::Propose(_, reply) => {
                    self.proposals.insert(q.request, Pending { reply, deadline: q.deadline });
                    if self.raw.raft.state == StateRole::Leader {
                        // A leader appends at once: if another entry is ever applied at this index, the
                        // proposal was lost in a leadership change and can fail fast with `Dropped`.
                        self.proposed_at.insert(self.raw.raft.raft_log.last_index(), q.request);
                    }
                }
                Op::Conf(_, reply) => self.conf = Some((q.request, Pending { reply, deadline: q.deadline })),
            },
            Err(raft::Error::ProposalDropped) => {
                // Leadership in flux (transfer, election) or too much uncommitted: retry on the next tick.
                if now >= q.no_leader_deadline {
                    fail_op(q.op, ConsensusError::Dropped);
                } else {
                    self.queued.push_back(q);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "raft refused a proposal");
                fail_op(q.op, ConsensusError::Dropped);
            }
        }
    }

    fn send_read_index(&mut self, request: u64, now: Instant) {
        if self.leader() == raft::INVALID_ID {
            return;
        }
        let ctx = self.ctx(request);
        if let Some(r) = self.reads.get_mut(&request) {
            r.sent = Some(now);
            self.raw.read_index(ctx);
        }
    }

    fn on_tick(&mut self, now: Instant) {
        // Requests waiting for a leader.
        for q in std::mem::take(&mut self.queued) {
            self.try_submit(q, now);
        }
        // Proposals in raft past their deadline: the outcome is unknown to us.
        let expired: Vec<u64> = self.proposals.iter().filter(|(_, p)| now >= p.deadline).map(|(r, _)| *r).collect();
        for r in expired {
            if let Some(p) = self.proposals.remove(&r) {
                let _ = p.reply.send(Err(ConsensusError::Timeout));
            }
        }
        if self.conf.as_ref().is_some_and(|(_, p)| now >= p.deadline) {
            if let Some((_, p)) = self.conf.take() {
                let _ = p.reply.send(Err(ConsensusError::Timeout));
            }
        }
        // Reads: fail on deadline; (re)send the ReadIndex if unanswered for an election timeout.
        let resend_after = self.cfg.tick * self.cfg.election_ticks as u32;
        let leader_known = self.leader() != raft::INVALID_ID;
        let mut resend = Vec::new();
        let mut failed = Vec::new();
        for (r, read) in &self.reads {
            if read.index.is_some() {
                if now >= read.deadline {
                    failed.push((*r, ConsensusError::Timeout));
                }
                continue;
            }
            if !leader_known && now >= read.created + self.cfg.no_leader_timeout {
                failed.push((*r, ConsensusError::NoLeader));
            } else if now >= read.deadline {
                failed.push((*r, ConsensusError::Timeout));
            } else if read.sent.is_none_or(|s| now >= s + resend_after) {
                resend.push(*r);
            }
        }
        for (r, e) in failed {
            if let Some(read) = self.reads.remove(&r) {
                let _ = read.reply.send(Err(e));
            }
        }
        for r in resend {
            self.send_read_index(r, now);
        }
    }

    fn send_messages(&self, msgs: Vec<Message>) {
        for m in msgs {
            self.transport.send(m);
        }
    }

    fn on_ready(&mut self) -> Result<(), String> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if !rd.messages().is_empty() {
            self.send_messages(rd.take_messages());
        }
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.mut_store().persist_ready(rd.entries(), rd.hs(), rd.must_sync())?;
        if !rd.persisted_messages().is_empty() {
            self.send_messages(rd.take_persisted_messages());
        }
        let read_states = rd.take_read_states();
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send_messages(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        for rs in read_states {
            let Some(ctx) = RequestCtx::decode(&rs.request_ctx) else { continue };
            if ctx.node != self.id || ctx.boot != self.boot {
                continue;
            }
            if let Some(read) = self.reads.get_mut(&ctx.request) {
                read.index.get_or_insert(rs.index);
            }
        }
        Ok(())
    }

    fn send_replies(&mut self) {
        for (reply, response) in self.done_proposals.drain(..) {
            let _ = reply.send(Ok(response));
        }
        for (reply, outcome) in self.done_conf.drain(..) {
            let _ = reply.send(outcome);
        }
        self.complete_reads();
    }

    fn complete_reads(&mut self) {
        let applied = self.applied;
        let done: Vec<u64> =
            self.reads.iter().filter(|(_, r)| r.index.is_some_and(|i| i <= applied)).map(|(k, _)| *k).collect();
        for k in done {
            if let Some(r) = self.reads.remove(&k) {
                let _ = r.reply.send(Ok(()));
            }
        }
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), String> {
        let index = snap.get_metadata().index;
        let (peers, data) = decode_snapshot_data(&snap.data)?;
        for (id, addr) in peers {
            self.peers.insert(id, addr);
        }
        // Durable first: after a crash the state machine is restored from the recorded file.
        self.raw.mut_store().install_snapshot(snap, &self.peers)?;
        self.sm.restore(index, data).map_err(|e| format!("state machine refused the snapshot: {e}"))?;
        for (id, addr) in &self.peers {
            self.transport.set_peer(*id, *addr);
        }
        self.applied = index;
        self.proposed_at.retain(|i, _| *i > index);
        // The discarded log may hold entries that the snapshot no longer has (e.g. shredded keys).
        self.purge_pending = true;
        tracing::info!(index, "installed a raft snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            if let Some(request) = self.proposed_at.remove(&e.index) {
                if self.own_request(&e.context) != Some(request) {
                    if let Some(p) = self.proposals.remove(&request) {
                        let _ = p.reply.send(Err(ConsensusError::Dropped));
                    }
                }
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    // Empty entries are the leaders' no-ops (or conf changes raft refused).
                    if !e.data.is_empty() && e.index > self.sm.applied_index() {
                        let mine = self.own_request(&e.context).is_some_and(|r| self.proposals.contains_key(&r));
                        let response = self.sm.apply_proposed(e.index, &e.data, mine);
                        if self.sm.take_purge_request() {
                            self.purge_pending = true;
                        }
                        if let Some(p) = self.own_request(&e.context).and_then(|r| self.proposals.remove(&r)) {
                            self.done_proposals.push((p.reply, response));
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|e| format!("bad conf change: {e}"))?;
                    let mut single = ConfChangeSingle::default();
                    single.set_change_type(cc.get_change_type());
                    single.node_id = cc.node_id;
                    let v2 = ConfChangeV2 { changes: vec![single].into(), ..Default::default() };
                    self.apply_conf_change(&e, v2, &cc.context)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).map_err(|e| format!("bad conf change: {e}"))?;
                    let context = cc.context.clone();
                    self.apply_conf_change(&e, cc, &context)?;
                }
            }
            self.applied = e.index;
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, e: &Entry, cc: ConfChangeV2, context: &[u8]) -> Result<(), String> {
        let result = self.raw.apply_conf_change(&cc);
        let outcome = match result {
            Ok(cs) => {
                for c in &cc.changes {
                    match c.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            let addr = std::str::from_utf8(context).ok().and_then(|s| s.parse().ok());
                            if let Some(addr) = addr {
                                self.peers.insert(c.node_id, addr);
                                self.transport.set_peer(c.node_id, addr);
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            self.peers.remove(&c.node_id);
                            self.transport.remove_peer(c.node_id);
                        }
                    }
                }
                self.raw.mut_store().set_conf_state(&cs, &self.peers)?;
                tracing::info!(index = e.index, voters = ?cs.voters, "membership changed");
                Ok(())
            }
            Err(err) => {
                tracing::warn!(error = %err, "conf change could not be applied");
                Err(ConsensusError::Membership(err.to_string()))
            }
        };
        if let Some(r) = self.own_request(&e.context) {
            if self.conf.as_ref().is_some_and(|(req, _)| *req == r) {
                if let Some((_, p)) = self.conf.take() {
                    self.done_conf.push((p.reply, outcome));
                }
            }
        }
        Ok(())
    }

    /// The request id if this entry was proposed by this incarnation of this node.
    fn own_request(&self, context: &[u8]) -> Option<u64> {
        let ctx = RequestCtx::decode(context)?;
        (ctx.node == self.id && ctx.boot == self.boot).then_some(ctx.request)
    }

    /// After the Ready: compaction snapshots and purges.
    fn maintain(&mut self) -> Result<(), String> {
        let snap_index = self.raw.store().snapshot_meta().index;
        let wanted = self.raw.store().take_snapshot_wanted();
        if self.purge_pending {
            self.purge_pending = false;
            self.make_snapshot()?;
            self.raw.mut_store().purge_all_obsolete()?;
            self.purged_index = self.applied;
            tracing::info!(applied = self.applied, "raft log purged up to the applied index");
        } else if wanted || self.applied.saturating_sub(snap_index) >= self.cfg.snapshot_every_entries {
            self.make_snapshot()?;
        }
        Ok(())
    }

    /// Snapshot the state machine at the applied index and compact the log up to it.
    fn make_snapshot(&mut self) -> Result<(), String> {
        let index = self.applied;
        if index <= self.raw.store().snapshot_meta().index {
            return Ok(());
        }
        self.sm.persist().map_err(|e| format!("state machine persist failed: {e}"))?;
        let term = self.raw.raft.raft_log.term(index).map_err(|e| e.to_string())?;
        let mut snap =
            Snapshot { data: encode_snapshot_data(&self.peers, &self.sm.snapshot()).into(), ..Default::default() };
        let m = snap.mut_metadata();
        m.index = index;
        m.term = term;
        m.set_conf_state(self.raw.store().conf_state().clone());
        self.raw.mut_store().compact_with_snapshot(&snap)?;
        tracing::info!(index, "raft snapshot taken, log compacted");
        Ok(())
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        let (first, last) = self.raw.store().first_last();
        let voters: Vec<u64> = r.prs().conf().voters().ids().iter().collect();
        let mut peers: Vec<(u64, Option<SocketAddr>)> = voters
            .into_iter()
            .map(|id| {
                let addr =
                    if id == self.id { Some(self.transport.advertised_addr()) } else { self.peers.get(&id).copied() };
                (id, addr)
            })
            .collect();
        peers.sort_unstable_by_key(|p| p.0);
        let status = Status {
            id: self.id,
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.applied,
            leader_id: r.leader_id,
            role: match r.state {
                StateRole::Follower => Role::Follower,
                StateRole::Candidate => Role::Candidate,
                StateRole::PreCandidate => Role::PreCandidate,
                StateRole::Leader => Role::Leader,
            },
            peers,
            snapshot_index: self.raw.store().snapshot_meta().index,
            first_index: first,
            last_index: last,
            purged_index: self.purged_index,
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = status;
        }
    }

    fn fail_all(&mut self, why: &str) {
        if let Ok(mut s) = self.shared.status.lock() {
            s.role = Role::Failed;
        }
        let err = || ConsensusError::Storage(why.to_owned());
        for (reply, _) in self.done_proposals.drain(..) {
            let _ = reply.send(Err(err()));
        }
        for (reply, _) in self.done_conf.drain(..) {
            let _ = reply.send(Err(err()));
        }
        for (_, p) in self.proposals.drain() {
            let _ = p.reply.send(Err(err()));
        }
        if let Some((_, p)) = self.conf.take() {
            let _ = p.reply.send(Err(err()));
        }
        for q in self.queued.drain(..) {
            fail_op(q.op, err());
        }
        for (_, r) in self.reads.drain() {
            let _ = r.reply.send(Err(err()));
        }
        self.transport.shutdown();
    }

    fn shutdown_all(&mut self) {
        self.send_replies();
        // A clean stop leaves the state machine current, so the next start replays nothing.
        if let Err(e) = self.sm.persist() {
            tracing::warn!(error = %e, "state machine persist at shutdown failed; the log will be replayed");
        }
        for (_, p) in self.proposals.drain() {
            let _ = p.reply.send(Err(ConsensusError::Shutdown));
        }
        if let Some((_, p)) = self.conf.take() {
            let _ = p.reply.send(Err(ConsensusError::Shutdown));
        }
        for q in self.queued.drain(..) {
            fail_op(q.op, ConsensusError::Shutdown);
        }
        for (_, r) in self.reads.drain() {
            let _ = r.reply.send(Err(ConsensusError::Shutdown));
        }
        self.transport.shutdown();
    }
}

fn fail_op(op: Op, err: ConsensusError) {
    match op {
        Op::Propose(_, reply) => {
            let _ = reply.send(Err(err));
        }
        Op::Conf(_, reply) => {
            let _ = reply.send(Err(err));
        }
    }
}
