//! Polling the layout for changes made elsewhere (a drain, a resize, snapshots).
//!
//! A read-write attachment fetches the volume's state every
//! `layout_poll_interval`. A segment whose epoch is newer than the one in use
//! is prepared off the actor (a capability covering its new members, the
//! segment assigned on them, sessions opened) and then adopted like a
//! replacement; a larger size is prepared and adopted as growth (`grow.rs`);
//! the pending snapshots go to the freeze (`freeze.rs`). An older or equal
//! epoch never changes a set.

use super::grow::{prepare_growth, Growth, PrepareError};
use super::{Actor, Event, MIN_COPIES};
use crate::volume::control::ControlPlane;
use crate::volume::layout::{PendingSnapshot, ReplicaInfo, SegmentReplicas};
use crate::volume::link::{Connector, LinkError, NodeLink};
use crate::volume::VolumeError;
use slate_protocol::{Epoch, ErrorKind, NodeId, SignedCapability, Target};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// What a layout poll found, prepared for the actor.
#[derive(Debug)]
pub struct LayoutPoll {
    /// Replica sets newer than the client's when the poll started, ready to
    /// adopt: their new members are assigned the segment and connected.
    pub sets: Vec<SegmentReplicas>,
    /// A capability whose node scope covers the new members, when the current one did not.
    pub capability: Option<SignedCapability>,
    /// Sessions with nodes new to this client.
    pub links: Vec<(NodeId, Arc<dyn NodeLink>)>,
    /// The volume's pending snapshots.
    pub snapshots: Vec<PendingSnapshot>,
    /// A larger size and the segments it added, ready to adopt (assigned on their nodes, connected).
    pub grown: Option<Growth>,
}

/// What a layout poll needs from the actor's state when it starts.
pub(super) struct PollCtx {
    pub(super) control: Arc<dyn ControlPlane>,
    pub(super) connector: Arc<dyn Connector>,
    pub(super) target: Target,
    segment_blocks: u64,
    /// The volume's size in use: a polled layout that is larger grows the volume.
    size_bytes: u64,
    /// Per segment (by index): the epoch and members in use.
    known: Vec<(Epoch, Vec<NodeId>)>,
    pub(super) linked: HashSet<NodeId>,
    pub(super) dead: HashSet<NodeId>,
    capability: SignedCapability,
    pub(super) timeout: Duration,
}

impl Actor {
    /// Starts a layout poll when due (read-write attachments only).
    pub(super) fn poll_layout_if_due(&mut self) {
        let interval = self.cfg.layout_poll_interval;
        if interval.is_zero() || !self.writable || self.fatal.is_some() || self.closing.is_some() {
            return;
        }
        if self.layout_poll_at.is_none_or(|at| Instant::now() < at) {
            return;
        }
        self.layout_poll_at = None;
        let ctx = PollCtx {
            control: Arc::clone(&self.control),
            connector: Arc::clone(&self.connector),
            target: self.target,
            segment_blocks: self.layout.segment_blocks,
            size_bytes: self.layout.size_bytes,
            known: self.sets.iter().map(|s| (s.epoch, s.write_set().collect())).collect(),
            linked: self.links.keys().copied().collect(),
            dead: self.dead.clone(),
            capability: self.capability.clone(),
            timeout: self.cfg.request_timeout,
        };
        let tx = self.events_tx.clone();
        let h = tokio::spawn(async move {
            let result = poll_layout(ctx, &tx).await;
            let _ = tx.send(Event::LayoutSeen(result));
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }
}

/// Fetches the layout and prepares the sets that are newer than the client's:
/// gets a capability covering their new members if needed, has those members
/// assigned the segment, and opens sessions with them. A set whose new
/// members cannot be prepared is left for the next poll.
async fn poll_layout(ctx: PollCtx, tx: &mpsc::UnboundedSender<Event>) -> Result<LayoutPoll, String> {
    let volume = ctx.target.volume;
    let state = ctx.control.refresh_state(volume).await.map_err(|e| e.to_string())?;
    let (layout, snapshots) = (state.layout, state.pending_snapshots);
    if layout.volume != volume || layout.segment_blocks != ctx.segment_blocks {
        return Err("the control plane returned the layout of another volume or geometry".into());
    }
    layout.validate()?;
    // A larger size brings the segments past the ones in use (never shrink).
    let grows = layout.size_bytes > ctx.size_bytes;
    let new_size = layout.size_bytes;
    let mut added: Vec<SegmentReplicas> = Vec::new();
    let mut sets: Vec<(SegmentReplicas, Vec<ReplicaInfo>)> = Vec::new();
    for s in layout.segments {
        let Some((epoch, members)) = ctx.known.get(s.segment.0 as usize) else {
            if grows {
                added.push(s);
            }
            continue;
        };
        if s.epoch <= *epoch {
            continue;
        }
        let fresh: Vec<ReplicaInfo> =
            s.replicas.iter().filter(|r| !members.contains(&r.node) && !ctx.dead.contains(&r.node)).cloned().collect();
        sets.push((s, fresh));
    }
    added.sort_by_key(|s| s.segment);
    if sets.is_empty() && !grows {
        return Ok(LayoutPoll { sets: Vec::new(), capability: None, links: Vec::new(), snapshots, grown: None });
    }
    // A capability whose node scope covers every new member (slate-meta signs from the current layout),
    // and, when the volume grew, whose size and segment scope cover the new segments.
    let uncovered = grows
        || sets
            .iter()
            .flat_map(|(_, f)| f)
            .chain(added.iter().flat_map(|s| &s.replicas))
            .any(|r| !ctx.capability.claims.nodes.contains(&r.node));
    let renewed = if uncovered {
        let c = ctx.control.renew_capability(volume, ctx.target.generation).await.map_err(|e| e.to_string())?;
        if c.claims.volume != volume || c.claims.generation != ctx.target.generation {
            return Err("the renewed capability is for another attachment".into());
        }
        Some(c)
    } else {
        None
    };
    let cap = renewed.clone().unwrap_or_else(|| ctx.capability.clone());
    let mut links: Vec<(NodeId, Arc<dyn NodeLink>)> = Vec::new();
    let mut ready = Vec::new();
    'sets: for (set, fresh) in sets {
        if !fresh.is_empty() {
            let new_members = SegmentReplicas { segment: set.segment, epoch: set.epoch, replicas: fresh.clone() };
            if let Err(e) = ctx.control.assign_replicas(volume, &new_members, &cap).await {
                warn!(%volume, segment = %set.segment, error = %e, "cannot assign the segment to its new replicas; trying again later");
                continue;
            }
            for r in &fresh {
                if ctx.linked.contains(&r.node) || links.iter().any(|(n, _)| *n == r.node) {
                    continue;
                }
                match tokio::time::timeout(ctx.timeout, ctx.connector.connect(r.node, &r.addr, &cap)).await {
                    Ok(Ok(link)) => links.push((r.node, link)),
                    Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                        let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                        return Err("fenced".into());
                    }
                    Ok(Err(e)) => {
                        warn!(%volume, node = %r.node, addr = %r.addr, error = %e, "cannot reach a new replica; trying again later");
                        continue 'sets;
                    }
                    Err(_) => {
                        warn!(%volume, node = %r.node, addr = %r.addr, "timed out reaching a new replica; trying again later");
                        continue 'sets;
                    }
                }
            }
        }
        ready.push(set);
    }
    let grown = if grows {
        match prepare_growth(&ctx, &cap, &added, &mut links, tx).await {
            Ok(()) => Some(Growth { size_bytes: new_size, segments: added }),
            Err(PrepareError::Fenced) => return Err("fenced".into()),
            Err(PrepareError::Later(why)) => {
                warn!(%volume, size = new_size, %why, "cannot prepare the grown volume's new segments; trying again later");
                None
            }
        }
    } else {
        None
    };
    Ok(LayoutPoll { sets: ready, capability: renewed, links, snapshots, grown })
}

impl Actor {
    /// Ends a layout poll: adopts every set whose epoch is newer than the one in use.
    pub(super) fn on_layout_seen(&mut self, result: Result<LayoutPoll, String>) {
        self.layout_poll_at = Some(Instant::now() + self.cfg.layout_poll_interval);
        let poll = match result {
            Ok(p) => p,
            Err(why) => {
                debug!(volume = %self.target.volume, %why, "layout poll failed; trying again later");
                return;
            }
        };
        if self.fatal.is_some() {
            return;
        }
        if let Some(c) = poll.capability {
            // Existing sessions keep theirs; the renewal schedule (from the oldest) stays as it is.
            self.capability = c;
            self.counters.capability_renewals += 1;
        }
        for (n, l) in poll.links {
            if !self.dead.contains(&n) {
                self.links.entry(n).or_insert(l);
            }
        }
        if let Some(g) = poll.grown {
            self.grow(g);
        }
        for set in poll.sets {
            let Some(current) = self.set(set.segment).map(|s| s.epoch) else { continue };
            if set.epoch <= current {
                continue; // our own report (or an earlier poll) got there first
            }
            if let Some(full) = self.full_size.get_mut(set.segment.0 as usize) {
                *full = set.replicas.len().max(MIN_COPIES);
            }
            self.counters.layout_changes += 1;
            self.adopt_set(set.segment, &set, &[]);
        }
        // After the sets: a freeze covers the members just adopted.
        self.on_snapshots_seen(poll.snapshots);
    }
}
