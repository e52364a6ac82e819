//! Reads and block-status queries.
//!
//! A read takes a shared range lock, is cut into pieces (one segment and at
//! most one request each), and each piece goes to one in-sync member of its
//! segment, round robin. A failed node or a corrupt block sends the piece to
//! the next in-sync member; a good copy is written back over the bad one
//! before the range is released, so the repair cannot race a later write.

use super::ops::{Op, OpKind};
use super::{Actor, Budget, Outcome, ReadChunk, Responder, Tag};
use crate::volume::deps::LockMode;
use crate::volume::runs::{self, check_data};
use crate::volume::VolumeError;
use bytes::Bytes;
use slate_protocol::message::{BlockRange, MAX_IO_BLOCKS, MAX_RANGE_BLOCKS};
use slate_protocol::{BlockIndex, NodeId, Reply, Request, SegmentIndex};
use tracing::{debug, error, warn};

#[derive(Debug)]
pub(super) struct ReadPiece {
    piece: runs::Piece,
    tried: Vec<NodeId>,
    pub(super) current: Option<NodeId>,
    /// Replicas that returned a corrupt block for this piece, and which block if known.
    corrupt: Vec<(NodeId, Option<BlockIndex>)>,
    chunk: Option<ReadChunk>,
    pub(super) done: bool,
}

#[derive(Debug)]
pub(super) struct ReadOp {
    allocated_only: bool,
    pub(super) pieces: Vec<ReadPiece>,
    remaining: usize,
    /// Nodes with a repair write in flight (one entry per request).
    pub(super) repairs: Vec<NodeId>,
    pub(super) reply: Option<Responder<Vec<ReadChunk>>>,
    failed: Option<VolumeError>,
}

impl Actor {
    pub(super) fn new_read(
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

    /// Sends every piece of read `id` to an in-sync member of its segment.
    pub(super) fn start_read(&mut self, id: u64) {
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get(&id) else { return };
        for i in 0..r.pieces.len() {
            self.dispatch_read(id, i);
        }
        self.check_read(id);
    }

    pub(super) fn dispatch_read(&mut self, id: u64, i: usize) {
        let target = self.target;
        let Some(Op { kind: OpKind::Read(r), .. }) = self.ops.get(&id) else { return };
        let p = &r.pieces[i];
        if p.done {
            return;
        }
        let (seg, tried, allocated_only, piece) = (p.piece.segment, p.tried.clone(), r.allocated_only, p.piece);
        // The replica with the fewest requests in flight from this client serves the read.
        let inflight = &self.inflight;
        let load = |n: NodeId| inflight.borrow().get(&n).copied().unwrap_or(0);
        let pick = self.sets.get_mut(seg.0 as usize).and_then(|s| s.pick_least_loaded(&tried, load));
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

    pub(super) fn on_read_reply(&mut self, id: u64, i: usize, node: NodeId, outcome: Outcome) {
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

    pub(super) fn on_repair_reply(&mut self, id: u64, node: NodeId, outcome: Outcome) {
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

    pub(super) fn check_read(&mut self, id: u64) {
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
}
