//! Clearing the nodes' write intents of regions that stayed quiet while serving.
//!
//! Every `intent_clear_interval`, the actor asks the members of healthy
//! segments for their recorded regions and clears, on each, those that no
//! write touched during the interval, none is in flight on, and none left
//! possibly different between replicas ([`IntentTracker`](crate::volume::intents::IntentTracker)).

use super::{classify, Actor, Event, Outcome};
use crate::volume::layout::ReplicaRole;
use crate::volume::link::{BoxFuture, LinkError, NodeLink};
use crate::volume::runs;
use slate_protocol::message::{BlockRange, MAX_RANGES};
use slate_protocol::{BlockIndex, NodeId, Reply, Request};
use std::sync::Arc;
use std::time::Instant;
use tracing::debug;

impl Actor {
    /// Starts a round of intent clearing when due: asks every node for its recorded regions.
    pub(super) fn clear_intents_if_due(&mut self) {
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
        let asks: Vec<(NodeId, BoxFuture<Result<Reply, LinkError>>)> =
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
    pub(super) fn on_intents_seen(&mut self, per_node: Vec<(NodeId, Vec<BlockRange>)>) {
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
}
