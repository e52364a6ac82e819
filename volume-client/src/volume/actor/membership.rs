//! Replica sets: replacing failed members and adopting sets changed elsewhere.
//!
//! A failed member is reported once per segment through the control plane,
//! which picks a replacement; a set from the control plane (a replacement's
//! reply or a polled layout) is merged in only when its epoch is newer.
//! Members that join receive every write at once (also those in flight) and
//! are rebuilt; members that leave stop receiving reads and writes, and a
//! write in flight to one no longer waits for it.

use super::ops::OpKind;
use super::{Actor, Event, MIN_COPIES};
use crate::volume::control::ReplicaUpdate;
use crate::volume::layout::{ReplicaRole, SegmentReplicas};
use crate::volume::link::{LinkError, NodeLink};
use crate::volume::VolumeError;
use slate_protocol::{ErrorKind, NodeId, SegmentIndex};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Longest wait between two attempts at a control-plane call.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Actor {
    /// True when every member of the segment is in sync, none is missing and no replacement is pending.
    pub(super) fn segment_healthy(&self, segment: SegmentIndex) -> bool {
        let Some(set) = self.set(segment) else { return false };
        let full = self.full_size.get(segment.0 as usize).copied().unwrap_or(MIN_COPIES);
        set.members().len() >= full
            && set.members().iter().all(|m| m.role == ReplicaRole::InSync && !self.dead.contains(&m.node))
            && !self.replacing.iter().any(|(s, _)| *s == segment)
            && !self.rebuilds.keys().any(|(s, _)| *s == segment)
    }

    pub(super) fn request_replacement(&mut self, segment: SegmentIndex, failed: NodeId) {
        // A read-only attachment leaves replacements to the metadata service (node heartbeats).
        if self.fatal.is_some() || !self.writable || !self.replacing.insert((segment, failed)) {
            return;
        }
        let control = Arc::clone(&self.control);
        let connector = Arc::clone(&self.connector);
        let tx = self.events_tx.clone();
        let volume = self.target.volume;
        let capability = self.capability.clone();
        let known: HashSet<NodeId> = self.links.keys().copied().collect();
        let retry = self.cfg.retry_delay;
        let connect_timeout = self.cfg.request_timeout;
        // A segment whose replacements keep failing (unreachable, or the same dead node offered
        // again) is asked again with a growing delay rather than in a tight loop.
        let attempt = self.replacement_attempts.entry(segment).or_insert(0);
        let first_delay =
            if *attempt == 0 { Duration::ZERO } else { (retry * 2u32.pow((*attempt).min(6))).min(MAX_BACKOFF) };
        *attempt += 1;
        let h = tokio::spawn(async move {
            tokio::time::sleep(first_delay).await;
            let mut delay = retry;
            let update = loop {
                match control.report_failed_replica(volume, segment, failed).await {
                    Ok(u) => break u,
                    Err(e) => {
                        warn!(%volume, %segment, node = %failed, error = %e, "replacement request failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_BACKOFF);
                    }
                }
            };
            let cap = update.capability.clone().unwrap_or(capability);
            let mut new_links = Vec::new();
            let mut unreachable = Vec::new();
            for r in &update.set.replicas {
                if known.contains(&r.node) || r.node == failed {
                    continue;
                }
                match tokio::time::timeout(connect_timeout, connector.connect(r.node, &r.addr, &cap)).await {
                    Ok(Ok(link)) => new_links.push((r.node, link)),
                    Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                        let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                        return;
                    }
                    Ok(Err(e)) => {
                        warn!(node = %r.node, addr = %r.addr, error = %e, "cannot reach the replacement replica");
                        unreachable.push(r.node);
                    }
                    Err(_) => unreachable.push(r.node),
                }
            }
            let _ = tx.send(Event::ReplicaSet { segment, failed, update, new_links, unreachable });
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    pub(super) fn on_replica_set(
        &mut self,
        segment: SegmentIndex,
        failed: NodeId,
        update: ReplicaUpdate,
        new_links: Vec<(NodeId, Arc<dyn NodeLink>)>,
        unreachable: Vec<NodeId>,
    ) {
        self.replacing.remove(&(segment, failed));
        if self.fatal.is_some() {
            return;
        }
        if let Some(c) = update.capability {
            self.capability = c;
        }
        for (n, l) in new_links {
            if !self.dead.contains(&n) {
                self.links.entry(n).or_insert(l);
            }
        }
        let current = self.set(segment).map(|s| s.epoch);
        if current.is_some_and(|e| update.set.epoch < e) {
            // A layout poll already brought a newer set (made after this reply): keep it.
            info!(
                volume = %self.target.volume, %segment, epoch = %update.set.epoch.0, current = ?current,
                "replacement reply is older than the set in use; ignored"
            );
            return;
        }
        let joined = self.adopt_set(segment, &update.set, &unreachable);
        self.counters.replicas_replaced += joined as u64;
    }

    /// Installs a replica set from the control plane (a replacement's reply or
    /// a polled layout): members that left stop receiving reads and writes,
    /// members that joined receive every write at once and are rebuilt.
    /// Returns how many members joined.
    pub(super) fn adopt_set(&mut self, segment: SegmentIndex, new: &SegmentReplicas, unreachable: &[NodeId]) -> usize {
        let Some(set) = self.set_mut(segment) else { return 0 };
        let out = set.merge(new);
        info!(
            volume = %self.target.volume, %segment, epoch = %new.epoch.0, joined = ?out.joined, left = ?out.left,
            "replica set changed"
        );
        for n in &out.left {
            if let Some(h) = self.rebuilds.remove(&(segment, *n)) {
                h.abort();
            }
            self.progress_reported.remove(&(segment, *n));
            self.detach_member(segment, *n);
        }
        // Members that cannot serve: already failed, or unreachable now.
        let members: Vec<NodeId> = self.set(segment).map(|s| s.write_set().collect()).unwrap_or_default();
        for n in members {
            if self.dead.contains(&n) {
                // Failed earlier: drop it here too and ask again.
                if let Some(s) = self.set_mut(segment) {
                    s.remove(n);
                }
                self.request_replacement(segment, n);
            } else if unreachable.contains(&n) || !self.links.contains_key(&n) {
                // Drops it from every set it is in and asks for replacements.
                self.node_failed(n, "unreachable when it joined");
            }
        }
        let mut joined = 0;
        for n in out.joined {
            if self.set(segment).is_some_and(|s| s.contains(n)) {
                joined += 1;
                self.join_in_flight_writes(segment, n);
                self.spawn_rebuild(segment, n);
            }
        }
        // Pieces that lost a member (left) may be complete now.
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for id in ids {
            for i in 0..self.write_piece_count(id) {
                self.check_write_piece(id, i);
            }
        }
        joined
    }

    /// `node` left `segment`'s set (the metadata service moved the replica):
    /// unfinished writes of the segment stop waiting for it and stop counting
    /// its copy; requests still in flight to it finish on their own and their
    /// replies are ignored. Its session closes once it is in no set.
    fn detach_member(&mut self, segment: SegmentIndex, node: NodeId) {
        for (id, op) in &mut self.ops {
            let OpKind::Write(w) = &mut op.kind else { continue };
            for (i, p) in w.pieces.iter_mut().enumerate() {
                if p.done || p.piece.segment != segment {
                    continue;
                }
                if p.pending.contains(&node) {
                    p.pending.retain(|n| *n != node);
                    self.detached.insert((*id, i, node));
                }
                p.acked.retain(|n| *n != node);
            }
        }
        if !self.sets.iter().any(|s| s.contains(node)) {
            if let Some(link) = self.links.remove(&node) {
                self.retired.push((Instant::now(), link));
            }
        }
    }

    /// A new member receives every write of its segment already in flight.
    fn join_in_flight_writes(&mut self, segment: SegmentIndex, node: NodeId) {
        let targets: Vec<(u64, usize)> = self
            .ops
            .iter()
            .filter(|(_, op)| op.started)
            .flat_map(|(id, op)| match &op.kind {
                OpKind::Write(w) => w
                    .pieces
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !p.done && p.piece.segment == segment)
                    .map(|(i, _)| (*id, i))
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
            .collect();
        for (id, i) in targets {
            self.add_write_target(id, i, node);
        }
    }
}
