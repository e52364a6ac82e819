//! The write path: writes, trims and write-zeroes, from the command to the reply.
//!
//! `Actor::on_cmd` (in `actor.rs`) hands a write here once it is admitted (the
//! volume is not fenced, no snapshot freeze holds writes, the attachment is
//! writable). Then, in the order of this file:
//!
//! 1. the write is checked against the volume's size and cut into pieces, one
//!    segment and at most one request each ([`Actor::on_write`], [`Actor::on_trim`]);
//! 2. its region is recorded for write-intent clearing and it is queued on an
//!    exclusive range lock ([`Actor::new_write`]); overlapping writes run in
//!    arrival order, never together;
//! 3. once the lock is granted, every piece goes to the whole write set of its
//!    segment, in-sync and rebuilding members alike ([`Actor::start_write`]);
//! 4. each member's reply is taken in ([`Actor::on_write_reply`]): a transient
//!    refusal is sent again after a pause, a failure drops the member (and asks
//!    for its replacement), a request out of range fails the write, fencing
//!    stops the volume;
//! 5. a piece is done when every member still in its set has answered and at
//!    least [`MIN_COPIES`] hold it (or the write failed); the write replies once every piece is done
//!    and releases its range ([`Actor::check_write_piece`]). A piece left with
//!    fewer copies waits, holding its range, for a replacement member (which
//!    receives it when it joins); one that waits longer than `stall_timeout`
//!    fails ([`Actor::fail_stalled_writes`]).

use super::ops::{Op, OpKind};
use super::{Actor, Budget, Event, Outcome, Responder, Tag, MIN_COPIES};
use crate::volume::deps::LockMode;
use crate::volume::runs;
use crate::volume::VolumeError;
use bytes::Bytes;
use slate_protocol::message::{BlockRange, MAX_IO_BLOCKS, MAX_RANGE_BLOCKS};
use slate_protocol::{BlockIndex, NodeId, Reply, Request, SegmentIndex};
use std::time::Instant;
use tracing::{debug, error, warn};

/// Retries of one request to one node after a transient refusal (bad crc in transit, node busy).
const MAX_RETRIES: u32 = 5;

#[derive(Debug)]
pub(super) struct WritePiece {
    pub(super) piece: runs::Piece,
    request: Request,
    pub(super) pending: Vec<NodeId>,
    pub(super) acked: Vec<NodeId>,
    retries: u32,
    pub(super) done: bool,
}

#[derive(Debug)]
pub(super) struct WriteOp {
    pub(super) pieces: Vec<WritePiece>,
    remaining: usize,
    pub(super) reply: Option<Responder<()>>,
    failed: Option<VolumeError>,
    waiting_since: Option<Instant>,
}

impl Actor {
    /// A write command: checks it and cuts it into one request per piece.
    pub(super) fn on_write(
        &mut self,
        start: u64,
        fua: bool,
        crcs: Vec<u32>,
        data: Bytes,
        permit: Option<Budget>,
        reply: Responder<()>,
    ) {
        if !self.in_range(start, crcs.len() as u64) || data.len() != crcs.len() * slate_protocol::BLOCK_SIZE_BYTES {
            let _ = reply.send(Err(VolumeError::OutOfRange));
            return;
        }
        let target = self.target;
        let pieces = runs::split(start, crcs.len() as u64, self.layout.segment_blocks, u64::from(MAX_IO_BLOCKS));
        let pieces = pieces
            .into_iter()
            .map(|p| {
                let (a, b) = (p.offset as usize, (p.offset + p.count) as usize);
                let request = Request::Write {
                    target,
                    start: BlockIndex(p.start),
                    fua,
                    crcs: crcs[a..b].to_vec(),
                    data: data.slice(a * slate_protocol::BLOCK_SIZE_BYTES..b * slate_protocol::BLOCK_SIZE_BYTES),
                };
                WritePiece { piece: p, request, pending: Vec::new(), acked: Vec::new(), retries: 0, done: false }
            })
            .collect();
        self.counters.writes += 1;
        self.counters.blocks_written += crcs.len() as u64;
        self.new_write(start, crcs.len() as u64, pieces, permit, reply);
    }

    /// A trim or write-zeroes command: checks it and cuts it into one request per piece.
    pub(super) fn on_trim(
        &mut self,
        start: u64,
        count: u64,
        zeroes: bool,
        permit: Option<Budget>,
        reply: Responder<()>,
    ) {
        if !self.in_range(start, count) {
            let _ = reply.send(Err(VolumeError::OutOfRange));
            return;
        }
        let target = self.target;
        let pieces = runs::split(start, count, self.layout.segment_blocks, u64::from(MAX_RANGE_BLOCKS))
            .into_iter()
            .map(|p| {
                let range = BlockRange { start: BlockIndex(p.start), count: p.count };
                let request =
                    if zeroes { Request::WriteZeroes { target, range } } else { Request::Trim { target, range } };
                WritePiece { piece: p, request, pending: Vec::new(), acked: Vec::new(), retries: 0, done: false }
            })
            .collect();
        self.new_write(start, count, pieces, permit, reply);
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

    /// Sends every piece of write `id` to the whole write set of its segment.
    pub(super) fn start_write(&mut self, id: u64) {
        let Some(Op { kind: OpKind::Write(w), .. }) = self.ops.get(&id) else { return };
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

    /// Sends piece `i` of write `id` to `node` (a member of its segment's write set).
    pub(super) fn add_write_target(&mut self, id: u64, i: usize, node: NodeId) {
        let Some(Op { kind: OpKind::Write(w), .. }) = self.ops.get_mut(&id) else { return };
        let p = &mut w.pieces[i];
        if p.done || p.pending.contains(&node) || p.acked.contains(&node) {
            return;
        }
        p.pending.push(node);
        let req = p.request.clone();
        self.send(node, &req, id, Tag::Piece(i));
    }

    pub(super) fn on_write_reply(&mut self, id: u64, i: usize, node: NodeId, outcome: Outcome) {
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

    pub(super) fn on_resend(&mut self, id: u64, i: usize, node: NodeId) {
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

    pub(super) fn check_write_piece(&mut self, id: u64, i: usize) {
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

    pub(super) fn write_piece_count(&self, id: u64) -> usize {
        match self.ops.get(&id) {
            Some(Op { kind: OpKind::Write(w), .. }) => w.pieces.len(),
            _ => 0,
        }
    }

    /// Fails writes that have waited too long for a second copy (a replacement that never comes).
    pub(super) fn fail_stalled_writes(&mut self) {
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
}
