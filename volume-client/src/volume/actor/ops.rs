//! The table of operations in flight and the order they run in.
//!
//! Every block operation (read, write, trim, a rebuild's chunk lock) is
//! queued on its block range in the FIFO range lock
//! ([`DepTracker`](crate::volume::deps::DepTracker)) and starts only when
//! nothing earlier that overlaps it is still running, so overlapping writes
//! are never in flight together and every replica applies them in the same
//! order. Finishing an operation releases its range and starts what waited
//! for it. One request to one node is sent by [`Actor::send`].

use super::flush::FlushOp;
use super::read::ReadOp;
use super::rebuilds::LockOp;
use super::write::WriteOp;
use super::{Actor, Budget, Event, Tag};
use crate::volume::deps::LockMode;
use crate::volume::link::LinkError;
use slate_protocol::{NodeId, Request};

#[derive(Debug)]
pub(super) enum OpKind {
    Read(ReadOp),
    Write(WriteOp),
    Flush(FlushOp),
    Lock(LockOp),
}

#[derive(Debug)]
pub(super) struct Op {
    pub(super) kind: OpKind,
    pub(super) locked: bool,
    pub(super) started: bool,
    pub(super) _permit: Option<Budget>,
}

impl Actor {
    pub(super) fn in_range(&self, start: u64, count: u64) -> bool {
        count > 0 && start.checked_add(count).is_some_and(|end| end <= self.layout.volume_blocks())
    }

    pub(super) fn alloc_op(&mut self) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        id
    }

    /// Queues an operation on its range; starts it if nothing earlier conflicts.
    pub(super) fn enqueue(&mut self, start: u64, count: u64, mode: LockMode, kind: OpKind, permit: Option<Budget>) {
        let id = self.alloc_op();
        let granted = self.deps.acquire(id, start, start + count, mode);
        self.ops.insert(id, Op { kind, locked: true, started: false, _permit: permit });
        if granted {
            self.start_op(id);
        }
    }

    fn start_op(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        if op.started {
            return;
        }
        op.started = true;
        match &op.kind {
            OpKind::Read(_) => self.start_read(id),
            OpKind::Write(_) => self.start_write(id),
            OpKind::Lock(_) => self.grant_lock(id),
            OpKind::Flush(_) => {}
        }
    }

    /// Sends `req` to `node` now; its outcome comes back as an [`Event::Reply`].
    /// The link calls back from its reader with the outcome: no task or timer per request.
    pub(super) fn send(&self, node: NodeId, req: &Request, op: u64, tag: Tag) {
        *self.inflight.borrow_mut().entry(node).or_default() += 1;
        let tx = self.events_tx.clone();
        let done = move |result| drop(tx.send(Event::Reply { op, tag, node, result }));
        match self.links.get(&node) {
            Some(l) => l.start_with(req, self.cfg.request_timeout, Box::new(done)),
            None => done(Err(LinkError::Closed("no connection to the node".into()))),
        }
    }

    pub(super) fn finish_op(&mut self, id: u64) {
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
}
