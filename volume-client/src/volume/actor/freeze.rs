//! Freezing the snapshots the metadata service records as pending, while I/O runs.
//!
//! A snapshot must be crash-consistent across the whole volume: every write
//! acknowledged before the freeze started is in it, and no write first
//! admitted after the freeze finished is. The layout poll brings the volume's
//! pending snapshots; for each one (oldest epoch first, one at a time) the
//! actor:
//!
//! 1. **quiesces**: new writes, trims and write-zeroes are held (in arrival
//!    order, not failed; reads go on), and the actor waits until no write is
//!    left in flight, that is until every member of every write set has
//!    answered (or failed) every write admitted before;
//! 2. **freezes**: sends `Snapshot { epoch }` to every node holding a replica
//!    of the volume (in sync or rebuilding) and waits for every reply;
//! 3. **reports** the snapshot frozen through [`ControlPlane`](super::ControlPlane);
//! 4. **resumes** the held writes in their order.
//!
//! The hold is bounded: writes in flight that do not complete within
//! `freeze_hold_limit` end the attempt (writes resume; nothing was frozen);
//! a node that does not answer the freeze within the request timeout is
//! failed like any node that does not answer; a report slower than the hold
//! limit goes on without holding writes (the nodes froze already). A failed
//! attempt (a node refused or failed, or a member joined meanwhile) resumes
//! the writes and is tried again after the next poll, where the snapshot is
//! still pending (after repeated failures, with a growing pause of up to 30 s
//! between attempts, so that a snapshot refused for good does not stall
//! writes at every poll). A freeze repeated at the same epoch is harmless: the nodes
//! treat the latest epoch again as a no-op, and a snapshot frozen everywhere
//! whose report failed is only reported again, without a second freeze.
//! Freezing needs the capability's admin right (as assigning segments does);
//! a node's refusal fails the attempt, never the volume (fencing aside).

use super::ops::OpKind;
use super::{classify, Actor, Cmd, Event, Outcome};
use crate::volume::layout::PendingSnapshot;
use crate::volume::link::LinkError;
use crate::volume::replicas::SegmentSet;
use crate::volume::VolumeError;
use slate_protocol::{Epoch, NodeId, Reply, Request, Rights};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The actor's snapshot-freeze state.
#[derive(Debug, Default)]
pub(super) struct FreezeState {
    /// The freeze under way, if one.
    run: Option<Run>,
    /// Writes, trims and write-zeroes that arrived while `run` holds them, in arrival order.
    held: VecDeque<Cmd>,
    /// The pending snapshots of the last poll not yet done here, oldest epoch first.
    pending: Vec<PendingSnapshot>,
    /// Frozen on every replica but not yet reported: only the report is tried again.
    unreported: HashMap<u64, Epoch>,
    /// Frozen and reported by this attachment: never frozen again.
    done: HashSet<u64>,
    /// Tried since the last poll: a failed snapshot waits for the next poll.
    tried: HashSet<u64>,
    /// Consecutive failed attempts per snapshot and when the next one may start: a
    /// snapshot refused for good does not stall writes at every poll.
    backoff: HashMap<u64, (u32, Instant)>,
    /// The highest epoch this attachment froze on every node.
    highest_frozen: Option<Epoch>,
    next_attempt: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Holding new writes; waiting for the writes in flight.
    Quiescing,
    /// `Snapshot` sent to `nodes`; waiting for their replies.
    Freezing,
    /// Waiting for the control plane to take the report.
    Reporting,
}

#[derive(Debug)]
struct Run {
    attempt: u64,
    snapshot: u64,
    epoch: Epoch,
    started: Instant,
    phase: Phase,
    /// New writes are held while this is set.
    holding: bool,
    /// The nodes sent the freeze.
    nodes: Vec<NodeId>,
}

impl Actor {
    /// Holds `cmd` when it is a write, trim or write-zeroes and a freeze holds
    /// writes; otherwise hands it back.
    pub(super) fn hold_if_freezing(&mut self, cmd: Cmd) -> Option<Cmd> {
        let holding = self.freeze.run.as_ref().is_some_and(|r| r.holding);
        if holding && matches!(cmd, Cmd::Write { .. } | Cmd::Trim { .. }) {
            self.freeze.held.push_back(cmd);
            return None;
        }
        Some(cmd)
    }

    /// A layout poll listed these pending snapshots: freezes the first one not done yet.
    pub(super) fn on_snapshots_seen(&mut self, mut pending: Vec<PendingSnapshot>) {
        pending.retain(|p| !self.freeze.done.contains(&p.id));
        pending.sort_by_key(|p| (p.epoch, p.id));
        // A report that went through but is not yet reflected stays in `done`; a
        // snapshot frozen but no longer pending (deleted) needs no report.
        self.freeze.unreported.retain(|id, _| pending.iter().any(|p| p.id == *id));
        self.freeze.backoff.retain(|id, _| pending.iter().any(|p| p.id == *id));
        self.freeze.pending = pending;
        self.freeze.tried.clear();
        self.start_next_freeze();
    }

    fn start_next_freeze(&mut self) {
        if self.freeze.run.is_some()
            || self.fatal.is_some()
            || self.closing.is_some()
            || self.cmds_closed
            || !self.writable
        {
            return;
        }
        // Oldest epoch first, and never past one that waits: a node refuses an epoch below
        // one it froze already, so a later snapshot frozen first would doom the earlier one.
        // A snapshot below an epoch frozen here already can never succeed and blocks nothing.
        let f = &self.freeze;
        let now = Instant::now();
        let mut next = None;
        for p in f.pending.iter().filter(|p| !f.done.contains(&p.id)) {
            let waits = f.tried.contains(&p.id) || f.backoff.get(&p.id).is_some_and(|(_, at)| *at > now);
            if !waits {
                next = Some(*p);
                break;
            }
            if f.highest_frozen.is_none_or(|h| p.epoch > h) {
                break;
            }
        }
        let Some(snap) = next else { return };
        self.freeze.tried.insert(snap.id);
        if !self.capability.claims.rights.contains(Rights::ADMIN) {
            // Nothing is held; asked again every 30 s (a renewed capability may carry the right).
            let entry = self.freeze.backoff.entry(snap.id).or_insert((0, now));
            entry.0 += 1;
            entry.1 = now + Duration::from_secs(30);
            if entry.0 == 1 {
                warn!(
                    volume = %self.target.volume, snapshot = snap.id,
                    "a snapshot is pending but this attachment's capability has no admin right to freeze it"
                );
            }
            self.counters.freeze_failures += 1;
            return;
        }
        self.freeze.next_attempt += 1;
        let attempt = self.freeze.next_attempt;
        let already = self.freeze.unreported.get(&snap.id) == Some(&snap.epoch);
        let phase = if already { Phase::Reporting } else { Phase::Quiescing };
        self.freeze.run = Some(Run {
            attempt,
            snapshot: snap.id,
            epoch: snap.epoch,
            started: Instant::now(),
            phase,
            holding: !already,
            nodes: Vec::new(),
        });
        if already {
            debug!(volume = %self.target.volume, snapshot = snap.id, "snapshot frozen earlier; reporting it again");
            self.report_frozen(snap.id);
            return;
        }
        info!(
            volume = %self.target.volume, snapshot = snap.id, epoch = %snap.epoch.0,
            "snapshot pending: holding new writes until it is frozen"
        );
        self.freeze_if_quiesced();
    }

    /// Sends the freeze once no write is in flight any more.
    pub(super) fn freeze_if_quiesced(&mut self) {
        let Some(run) = &self.freeze.run else { return };
        if run.phase != Phase::Quiescing || self.ops.values().any(|op| matches!(op.kind, OpKind::Write(_))) {
            return;
        }
        let (attempt, epoch) = (run.attempt, run.epoch);
        let mut nodes: Vec<NodeId> =
            self.sets.iter().flat_map(SegmentSet::write_set).filter(|n| !self.dead.contains(n)).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let req = Request::Snapshot { target: self.target, epoch };
        let timeout = self.cfg.request_timeout;
        let asks: Vec<(NodeId, tokio::task::JoinHandle<Result<Reply, LinkError>>)> = nodes
            .iter()
            .map(|n| {
                let fut = self.links.get(n).map(|l| l.start(&req));
                let h = tokio::spawn(async move {
                    match fut {
                        None => Err(LinkError::Closed("no connection to the node".into())),
                        Some(f) => tokio::time::timeout(timeout, f).await.unwrap_or(Err(LinkError::Timeout)),
                    }
                });
                (*n, h)
            })
            .collect();
        debug!(volume = %self.target.volume, epoch = %epoch.0, ?nodes, "writes quiesced; freezing");
        if let Some(run) = self.freeze.run.as_mut() {
            run.phase = Phase::Freezing;
            run.nodes = nodes;
        }
        let tx = self.events_tx.clone();
        let h = tokio::spawn(async move {
            let mut replies = Vec::with_capacity(asks.len());
            for (node, h) in asks {
                let r = h.await.unwrap_or_else(|e| Err(LinkError::Closed(format!("freeze task: {e}"))));
                replies.push((node, r));
            }
            let _ = tx.send(Event::Frozen { attempt, replies });
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    /// The nodes answered the freeze: reports it when every one froze, else gives up until the next poll.
    pub(super) fn on_frozen(&mut self, attempt: u64, replies: Vec<(NodeId, Result<Reply, LinkError>)>) {
        let Some(run) = self.freeze.run.as_ref().filter(|r| r.attempt == attempt && r.phase == Phase::Freezing) else {
            return;
        };
        let (snapshot, epoch, sent) = (run.snapshot, run.epoch, run.nodes.clone());
        let mut failures: Vec<String> = Vec::new();
        for (node, result) in replies {
            if !self.sets.iter().any(|s| s.contains(node)) {
                continue; // left the volume meanwhile: its layers are no longer ours
            }
            match result {
                Ok(Reply::Done) => {}
                Err(LinkError::Timeout | LinkError::Closed(_) | LinkError::Protocol(_)) => {
                    // As for any request: a node that does not answer is failed and replaced (and a
                    // late freeze on it can no longer make replicas in use disagree at the epoch).
                    let why = format!("{:?}", result.err());
                    self.node_failed(node, &format!("no answer to a snapshot freeze: {why}"));
                    failures.push(format!("{node}: {why}"));
                }
                other => match classify(other) {
                    Outcome::Fatal(VolumeError::Fenced) => return self.go_fatal(VolumeError::Fenced),
                    // Any other refusal (a missing right, a later epoch frozen already) fails this
                    // freeze only: the volume keeps serving.
                    o => failures.push(format!("{node}: {o:?}")),
                },
            }
        }
        let mut joined: Vec<NodeId> = self
            .sets
            .iter()
            .flat_map(SegmentSet::write_set)
            .filter(|n| !self.dead.contains(n) && !sent.contains(n))
            .collect();
        joined.sort_unstable();
        joined.dedup();
        if !joined.is_empty() {
            failures.push(format!("{joined:?} joined the volume during the freeze"));
        }
        if failures.is_empty() {
            info!(volume = %self.target.volume, snapshot, epoch = %epoch.0, nodes = ?sent, "snapshot frozen on every replica");
            self.freeze.unreported.insert(snapshot, epoch);
            self.freeze.highest_frozen = self.freeze.highest_frozen.max(Some(epoch));
            if let Some(run) = self.freeze.run.as_mut() {
                run.phase = Phase::Reporting;
            }
            self.report_frozen(snapshot);
        } else {
            warn!(
                volume = %self.target.volume, snapshot, epoch = %epoch.0, ?failures,
                "snapshot freeze failed; writes resume and it is tried again after the next poll"
            );
            self.freeze_failed();
            self.end_freeze();
        }
    }

    fn report_frozen(&mut self, snapshot: u64) {
        let control = Arc::clone(&self.control);
        let volume = self.target.volume;
        let tx = self.events_tx.clone();
        let h = tokio::spawn(async move {
            let result = control.report_snapshot_frozen(volume, snapshot).await.map_err(|e| e.to_string());
            let _ = tx.send(Event::FreezeReported { snapshot, result });
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    pub(super) fn on_freeze_reported(&mut self, snapshot: u64, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.freeze.backoff.remove(&snapshot);
                if self.freeze.unreported.remove(&snapshot).is_some() && self.freeze.done.insert(snapshot) {
                    self.counters.snapshots_frozen += 1;
                }
                self.freeze.pending.retain(|p| p.id != snapshot);
            }
            Err(why) => {
                warn!(volume = %self.target.volume, snapshot, %why, "could not report a frozen snapshot; reporting again after the next poll");
            }
        }
        let ours = self.freeze.run.as_ref().is_some_and(|r| r.snapshot == snapshot && r.phase == Phase::Reporting);
        if ours {
            self.end_freeze();
        }
    }

    /// Counts a failed attempt of the freeze under way: the first is tried again
    /// at the next poll, later ones after twice as long each time (at most 30 s).
    fn freeze_failed(&mut self) {
        self.counters.freeze_failures += 1;
        let Some(run) = &self.freeze.run else { return };
        let poll = self.cfg.layout_poll_interval;
        let entry = self.freeze.backoff.entry(run.snapshot).or_insert((0, Instant::now()));
        entry.0 += 1;
        let wait = (poll * 2u32.pow((entry.0 - 1).min(10))).min(Duration::from_secs(30));
        entry.1 = Instant::now() + wait.saturating_sub(poll);
    }

    /// Ends the freeze under way: resumes the held writes, then starts the next pending snapshot.
    fn end_freeze(&mut self) {
        self.freeze.run = None;
        self.resume_held();
        self.start_next_freeze();
    }

    /// Lets the held writes go, in their order (they fail at once if the volume stopped serving).
    fn resume_held(&mut self) {
        if let Some(run) = self.freeze.run.as_mut() {
            run.holding = false;
        }
        let held = std::mem::take(&mut self.freeze.held);
        if !held.is_empty() {
            debug!(volume = %self.target.volume, writes = held.len(), "resuming held writes");
        }
        for cmd in held {
            self.on_cmd(cmd);
        }
    }

    /// Drops the freeze under way (the volume closes or stops serving); held writes go on.
    pub(super) fn abandon_freeze(&mut self, why: &str) {
        if let Some(run) = self.freeze.run.take() {
            debug!(volume = %self.target.volume, snapshot = run.snapshot, %why, "snapshot freeze abandoned");
        }
        self.resume_held();
    }

    /// Keeps the hold bounded (called every tick).
    pub(super) fn check_freeze_hold(&mut self) {
        let limit = self.cfg.freeze_hold_limit;
        let Some(run) = &self.freeze.run else { return };
        if !run.holding || run.started.elapsed() < limit {
            return;
        }
        let snapshot = run.snapshot;
        match run.phase {
            Phase::Quiescing => {
                warn!(
                    volume = %self.target.volume, snapshot, ?limit,
                    "writes in flight did not complete within the hold limit; writes resume and the freeze is tried again after the next poll"
                );
                self.freeze_failed();
                self.end_freeze();
            }
            // Bounded by the request timeout: a node that does not answer is failed.
            Phase::Freezing => {}
            Phase::Reporting => {
                // The nodes froze already: later writes cannot reach the snapshot any more.
                debug!(volume = %self.target.volume, snapshot, "report is slow; writes resume while it goes on");
                self.resume_held();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::volume::fake::{layout, FakeConnector, FakeControl, FakeNode};
    use crate::volume::{
        AttachInfo, ControlError, ControlPlane, Dek, PendingSnapshot, ReplicaUpdate, Volume, VolumeConfig,
        VolumeLayout, VolumeState,
    };
    use slate_protocol::{Capability, Epoch, NodeId, Rights, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// The fake control plane with one snapshot pending for good.
    #[derive(Debug)]
    struct Pending {
        inner: Arc<FakeControl>,
        reports: AtomicU32,
    }

    #[async_trait::async_trait]
    impl ControlPlane for Pending {
        async fn report_failed_replica(
            &self,
            volume: VolumeId,
            segment: SegmentIndex,
            node: NodeId,
        ) -> Result<ReplicaUpdate, ControlError> {
            self.inner.report_failed_replica(volume, segment, node).await
        }

        async fn refresh_layout(&self, volume: VolumeId) -> Result<VolumeLayout, ControlError> {
            self.inner.refresh_layout(volume).await
        }

        async fn refresh_state(&self, volume: VolumeId) -> Result<VolumeState, ControlError> {
            let layout = self.inner.refresh_layout(volume).await?;
            Ok(VolumeState { layout, pending_snapshots: vec![PendingSnapshot { id: 7, epoch: Epoch(2) }] })
        }

        async fn report_snapshot_frozen(&self, _volume: VolumeId, _snapshot: u64) -> Result<(), ControlError> {
            self.reports.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Slow writes outlast the hold limit, and the in-memory nodes refuse the
    /// freeze when it is sent: each attempt gives up, the held writes go on in
    /// order, none fails, and the volume keeps serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_freeze_that_cannot_finish_never_fails_or_loses_a_held_write() {
        let nodes = [FakeNode::new(1), FakeNode::new(2)];
        for n in &nodes {
            n.lock().max_delay_us = 200_000;
        }
        let l = layout(64, &[&[1, 2]], 1);
        let capability = Capability {
            volume: l.volume,
            generation: l.generation,
            rights: Rights::READ_WRITE.union(Rights::ADMIN),
            expires_unix_secs: u64::MAX,
            nodes: vec![NodeId(1), NodeId(2)],
            ..Default::default()
        }
        .sign(&slate_protocol::capability::generate_signing_key());
        let info = AttachInfo { layout: l.clone(), capability, dek: Dek::new(std::array::from_fn(|i| i as u8)) };
        let control = Arc::new(Pending { inner: FakeControl::new(l, &[], Duration::ZERO), reports: AtomicU32::new(0) });
        let cfg = VolumeConfig {
            request_timeout: Duration::from_secs(2),
            freeze_hold_limit: Duration::from_millis(50),
            layout_poll_interval: Duration::from_millis(20),
            ..VolumeConfig::default()
        };
        let vol = Arc::new(
            Volume::open(info, Arc::clone(&control) as Arc<dyn ControlPlane>, FakeConnector::new(&nodes), cfg)
                .await
                .unwrap(),
        );
        let until = Instant::now() + Duration::from_millis(1500);
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let vol = Arc::clone(&vol);
            tasks.push(tokio::spawn(async move {
                let mut k = 0u8;
                while Instant::now() < until {
                    k = k.wrapping_add(1);
                    vol.write_blocks(w, &vec![k; BLOCK_SIZE_BYTES], false).await.unwrap();
                }
                k
            }));
        }
        let mut last = Vec::new();
        for t in tasks {
            last.push(t.await.unwrap());
        }
        let status = vol.status().await.unwrap();
        assert!(status.error.is_none(), "{status:?}");
        assert!(status.counters.freeze_failures >= 2, "{:?}", status.counters);
        assert_eq!(status.counters.snapshots_frozen, 0);
        assert_eq!(control.reports.load(Ordering::SeqCst), 0);
        // The last write of each writer is what every replica holds (held writes kept their order).
        for (w, k) in last.iter().enumerate() {
            for _ in 0..2 {
                assert_eq!(&vol.read_blocks(w as u64, 1).await.unwrap()[..], &vec![*k; BLOCK_SIZE_BYTES][..]);
            }
        }
        vol.close().await;
    }
}
