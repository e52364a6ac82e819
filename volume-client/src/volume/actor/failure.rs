//! Failures: a node that stops answering, and the volume that stops serving.
//!
//! A failed node is dropped from every replica set and every operation (which
//! go on without it), and its replacement is asked for per segment
//! (`membership.rs`). A fatal error (fencing, a refused capability) fails
//! every operation in flight and every later one; nothing is retried.

use super::ops::OpKind;
use super::Actor;
use crate::volume::deps::DepTracker;
use crate::volume::VolumeError;
use slate_protocol::{NodeId, SegmentIndex};
use tracing::{error, warn};

impl Actor {
    /// `node` stopped answering (or answered in a way that disqualifies it):
    /// drop it from every replica set and every operation, and ask for replacements.
    pub(super) fn node_failed(&mut self, node: NodeId, why: &str) {
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
    pub(super) fn forget_node_in_op(&mut self, id: u64, node: NodeId) {
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

    pub(super) fn go_fatal(&mut self, err: VolumeError) {
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
}
