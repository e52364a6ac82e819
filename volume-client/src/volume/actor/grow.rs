//! Online growth: adopting a larger size polled from the control plane.
//!
//! The new segments' replicas are assigned and connected (with a capability
//! that covers them) before the actor adds their sets, and only then is the
//! new size published to the `Volume` handle, so no request past the old end
//! is accepted before it can be served. A smaller size is never adopted.

use super::layout_poll::PollCtx;
use super::{Actor, Event, MIN_COPIES};
use crate::volume::layout::{ReplicaInfo, ReplicaRole, SegmentReplicas};
use crate::volume::link::{LinkError, NodeLink};
use crate::volume::replicas::SegmentSet;
use crate::volume::VolumeError;
use slate_protocol::{ErrorKind, NodeId, SignedCapability};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The volume grew elsewhere (`slate volume resize`).
#[derive(Debug)]
pub struct Growth {
    /// The new size in bytes.
    pub size_bytes: u64,
    /// The replica sets of the segments past the old last one, in segment order.
    pub segments: Vec<SegmentReplicas>,
}

/// Why the new segments of a grown volume are not ready.
pub(super) enum PrepareError {
    /// A node refused this attachment's generation: the volume is fenced.
    Fenced,
    /// Anything else: the growth is tried again at the next poll.
    Later(String),
}

/// Tells the replicas of a grown volume's new segments that they hold them
/// (the assignment a joining replica gets) and opens sessions with the nodes
/// this client has none with yet. Nodes already known failed are left out:
/// the actor asks for their replacement once the sets are in.
pub(super) async fn prepare_growth(
    ctx: &PollCtx,
    cap: &SignedCapability,
    added: &[SegmentReplicas],
    links: &mut Vec<(NodeId, Arc<dyn NodeLink>)>,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<(), PrepareError> {
    let volume = ctx.target.volume;
    let mut opened: Vec<(NodeId, Arc<dyn NodeLink>)> = Vec::new();
    for set in added {
        let live: Vec<ReplicaInfo> = set.replicas.iter().filter(|r| !ctx.dead.contains(&r.node)).cloned().collect();
        let assign = SegmentReplicas { segment: set.segment, epoch: set.epoch, replicas: live.clone() };
        ctx.control.assign_replicas(volume, &assign, cap).await.map_err(|e| PrepareError::Later(e.to_string()))?;
        for r in &live {
            let known = ctx.linked.contains(&r.node)
                || links.iter().any(|(n, _)| *n == r.node)
                || opened.iter().any(|(n, _)| *n == r.node);
            if known {
                continue;
            }
            match tokio::time::timeout(ctx.timeout, ctx.connector.connect(r.node, &r.addr, cap)).await {
                Ok(Ok(link)) => opened.push((r.node, link)),
                Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                    let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                    return Err(PrepareError::Fenced);
                }
                Ok(Err(e)) => return Err(PrepareError::Later(format!("{} ({}): {e}", r.node, r.addr))),
                Err(_) => return Err(PrepareError::Later(format!("{} ({}): timed out", r.node, r.addr))),
            }
        }
    }
    links.extend(opened);
    Ok(())
}

impl Actor {
    /// Adopts a larger size: adds the new segments' sets (their replicas are
    /// assigned and connected already), lengthens the last old segment, then
    /// publishes the size so that requests up to the new end are accepted.
    pub(super) fn grow(&mut self, g: Growth) {
        if g.size_bytes <= self.layout.size_bytes {
            return; // never shrink; an equal size is nothing new
        }
        let old_count = self.sets.len();
        let mut grown = self.layout.clone();
        grown.size_bytes = g.size_bytes;
        grown.segments.extend(g.segments.iter().cloned());
        let new_count = grown.segment_count() as usize;
        let in_order = g.segments.iter().enumerate().all(|(i, s)| s.segment.0 as usize == old_count + i);
        if new_count != old_count + g.segments.len() || !in_order {
            warn!(
                volume = %self.target.volume, size = g.size_bytes, segments = g.segments.len(),
                "the grown layout does not add exactly the missing segments; ignored"
            );
            return;
        }
        info!(
            volume = %self.target.volume, from = self.layout.size_bytes, to = g.size_bytes,
            new_segments = g.segments.len(), "volume grew"
        );
        self.layout = grown;
        // The last old segment may have grown in place (it was short).
        if let Some(last) = self.sets.last_mut() {
            last.len_blocks = self.layout.segment_len(last.segment);
        }
        for s in &g.segments {
            let set = SegmentSet::from_layout(s, self.layout.segment_len(s.segment));
            self.full_size.push(set.members().len().max(MIN_COPIES));
            self.sets.push(set);
        }
        for s in &g.segments {
            for r in &s.replicas {
                if self.dead.contains(&r.node) {
                    if let Some(set) = self.set_mut(s.segment) {
                        set.remove(r.node);
                    }
                    self.request_replacement(s.segment, r.node);
                } else if !self.links.contains_key(&r.node) {
                    self.node_failed(r.node, "unreachable when the volume grew");
                } else if r.role == ReplicaRole::Rebuilding {
                    self.spawn_rebuild(s.segment, r.node);
                }
            }
        }
        self.counters.growths += 1;
        self.size.store(self.layout.size_bytes, Ordering::Release);
    }
}
