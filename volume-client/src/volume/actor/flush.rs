//! Flush: every node of every write set makes what it acknowledged durable.
//!
//! A flush takes no range lock; it is sent at once to each node of the
//! volume's write sets and answers when each has replied or left.

use super::ops::{Op, OpKind};
use super::{Actor, Outcome, Responder, Tag};
use crate::volume::replicas::SegmentSet;
use slate_protocol::{NodeId, Request};
use tracing::debug;

#[derive(Debug)]
pub(super) struct FlushOp {
    pub(super) pending: Vec<NodeId>,
    pub(super) reply: Option<Responder<()>>,
}

impl Actor {
    /// A flush command: sent to every node of every write set at once.
    pub(super) fn on_flush(&mut self, reply: Responder<()>) {
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

    pub(super) fn on_flush_reply(&mut self, id: u64, node: NodeId, outcome: Outcome) {
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

    pub(super) fn check_flush(&mut self, id: u64) {
        let Some(Op { kind: OpKind::Flush(f), .. }) = self.ops.get_mut(&id) else { return };
        if f.pending.is_empty() {
            if let Some(reply) = f.reply.take() {
                let _ = reply.send(Ok(()));
            }
            self.finish_op(id);
        }
    }
}
