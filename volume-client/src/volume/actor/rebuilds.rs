//! The actor's side of rebuilds: starting them, locking their chunks, finishing them.
//!
//! The copy itself runs in a task of its own (`volume/rebuild.rs`). For each
//! chunk it asks the actor for an exclusive range lock, queued like any write,
//! and gets the in-sync sources and the target's session with it; the actor
//! records its progress (reported to the control plane at most once a
//! second) and, when the segment is copied, marks the member in sync and
//! reports it.

use super::ops::{Op, OpKind};
use super::Actor;
use crate::volume::deps::LockMode;
use crate::volume::layout::ReplicaRole;
use crate::volume::link::NodeLink;
use crate::volume::rebuild::{self, RebuildCtx, RebuildGrant};
use slate_protocol::message::{BlockRange, MAX_IO_BLOCKS};
use slate_protocol::{NodeId, SegmentIndex};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{info, warn};

#[derive(Debug)]
pub(super) struct LockOp {
    segment: SegmentIndex,
    target: NodeId,
    pub(super) reply: Option<oneshot::Sender<Option<RebuildGrant>>>,
}

impl Actor {
    pub(super) fn spawn_rebuild(&mut self, segment: SegmentIndex, node: NodeId) {
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

    pub(super) fn on_lock_request(
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

    pub(super) fn grant_lock(&mut self, id: u64) {
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

    pub(super) fn on_unlock(&mut self, lock: u64, progress: Option<(SegmentIndex, NodeId, u64)>) {
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

    pub(super) fn on_rebuild_done(&mut self, segment: SegmentIndex, node: NodeId, copied_blocks: u64) {
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
}
