//! The durable release queue and the erasure record of deleted volumes.
//!
//! Every byte Slate frees goes through here: a deleted volume's replicas, a
//! replica replaced after a failure, a replica moved by a drain, a deleted
//! snapshot's layer. Each becomes a [`Release`] for one storage node, which
//! the node pulls with its heartbeat, releases into its zeroer ("released":
//! the extents are journaled dirty) and, once the zeroer has read every one of
//! them back as zeros, reports "erased". A deleted volume's [`Erasure`] is
//! complete when all of its releases are erased and every metadata voter has
//! purged its log past the delete's key shred; that moment is recorded in the
//! audit chain.

use super::apply::{json, require_operator, Ctx, Res};
use super::command::Refusal;
use super::types::{Erasure, Release};
use super::view::{ErasureState, ErasureView, ReleaseState, ReleaseView, VoterPurgeView};
use super::{take, MetaState};
use crate::audit::AuditEntry;
use slate_protocol::ops::{NodeWork, ReleaseReason, ReleaseReport, ReleaseTask, MAX_REPORTED_EXTENTS};
use std::collections::BTreeSet;

/// Most release tasks handed to a node with one heartbeat.
pub const MAX_TASKS_PER_HEARTBEAT: usize = 256;

impl MetaState {
    /// Queues the release of `volume`'s `segment` (or one layer of it) on `node`.
    pub(super) fn queue_release(
        &mut self,
        now: u64,
        node: u64,
        (volume, tenant, segment): (u64, u64, u32),
        layer_epoch: Option<u64>,
        reason: ReleaseReason,
    ) -> u64 {
        let id = take(&mut self.next.release);
        self.releases.insert(
            id,
            Release {
                id,
                node,
                volume,
                tenant,
                segment,
                layer_epoch,
                reason,
                queued_ms: now,
                released_ms: None,
                extents: Vec::new(),
                erased_ms: None,
                verified_extents: 0,
                failed_extents: 0,
            },
        );
        id
    }

    /// True if `node` still holds data of `volume`'s `segment` that it has not released:
    /// placement must not put the segment back there until the release has happened.
    pub(super) fn release_pending_on(&self, node: u64, volume: u64, segment: u32) -> bool {
        self.releases.values().any(|r| {
            r.node == node
                && r.volume == volume
                && r.segment == segment
                && r.layer_epoch.is_none()
                && r.released_ms.is_none()
        })
    }

    /// What `node` must do next: its outstanding releases, oldest first.
    pub fn node_work(&self, node: u64) -> NodeWork {
        let releases = self
            .releases
            .values()
            .filter(|r| r.node == node && r.outstanding())
            .take(MAX_TASKS_PER_HEARTBEAT)
            .map(|r| ReleaseTask {
                id: r.id,
                volume: r.volume,
                segment: r.segment,
                layer_epoch: r.layer_epoch,
                reason: r.reason,
                released: r.released_ms.is_some(),
                extents: r.extents.clone(),
            })
            .collect();
        NodeWork { releases, ..NodeWork::default() }
    }

    /// Outstanding releases of `node` (for the node view).
    pub(super) fn releases_outstanding_on(&self, node: u64) -> u64 {
        self.releases.values().filter(|r| r.node == node && r.outstanding()).count() as u64
    }

    pub(super) fn report_release(&mut self, ctx: &mut Ctx, node: u64, id: u64, report: &ReleaseReport) -> Res {
        if !ctx.actor.sends_node_traffic() {
            return Err(Refusal::forbidden("release reports come from the node's own principal (or an operator)"));
        }
        let r = self.releases.get(&id).ok_or_else(|| Refusal::not_found(format!("no release {id}")))?;
        if r.node != node {
            return Err(Refusal::bad(format!("release {id} belongs to node {}, not node {node}", r.node)));
        }
        ctx.object_tenant = Some(r.tenant);
        let what = match r.layer_epoch {
            Some(e) => format!("volume:vol-{} segment:{} layer:{e} node:node-{node} release:{id}", r.volume, r.segment),
            None => format!("volume:vol-{} segment:{} node:node-{node} release:{id}", r.volume, r.segment),
        };
        match report {
            ReleaseReport::Released { extents } => {
                if extents.len() > MAX_REPORTED_EXTENTS {
                    return Err(Refusal::bad(format!("more than {MAX_REPORTED_EXTENTS} extents in one report")));
                }
                if r.released_ms.is_some() {
                    // A repeated report (the node restarted before it saw the answer): keep the first.
                    ctx.skip_audit = true;
                    return json(&self.release_view(&self.releases[&id]));
                }
                ctx.object = format!("{what} released extents:{}", extents.len());
                let r = self.releases.get_mut(&id).expect("checked");
                r.released_ms = Some(ctx.now);
                r.extents.clone_from(extents);
            }
            ReleaseReport::Erased { verified, failed } => {
                if r.released_ms.is_none() {
                    return Err(Refusal::conflict(format!("release {id} was not reported released yet")));
                }
                if verified.saturating_add(*failed) != r.extents.len() as u64 {
                    return Err(Refusal::bad(format!(
                        "release {id} released {} extents; the report accounts for {}",
                        r.extents.len(),
                        verified.saturating_add(*failed)
                    )));
                }
                if r.erased_ms.is_some() {
                    ctx.skip_audit = true;
                    return json(&self.release_view(&self.releases[&id]));
                }
                ctx.object = format!("{what} erased verified:{verified} failed:{failed}");
                let r = self.releases.get_mut(&id).expect("checked");
                r.erased_ms = Some(ctx.now);
                r.verified_extents = *verified;
                r.failed_extents = *failed;
            }
        }
        self.complete_erasures(ctx.now);
        json(&self.release_view(&self.releases[&id]))
    }

    pub(super) fn report_purge(&mut self, now: u64, meta_node: u64, root_epoch: u64, voters: &[u64]) -> Res {
        if root_epoch > self.root_epoch {
            return Err(Refusal::bad(format!("root epoch {root_epoch} is ahead of the state's {}", self.root_epoch)));
        }
        let e = self.meta_purged.entry(meta_node).or_insert(0);
        *e = (*e).max(root_epoch);
        if !voters.is_empty() {
            let mut v = voters.to_vec();
            v.sort_unstable();
            v.dedup();
            self.meta_voters = v;
        }
        self.complete_erasures(now);
        json(&serde_json::json!({"meta_node": meta_node, "purged_epoch": self.meta_purged[&meta_node]}))
    }

    /// Records a deleted volume's erasure; its releases were queued by the caller.
    pub(super) fn open_erasure(&mut self, ctx: &Ctx, volume: u64, name: &str, tenant: u64, size_bytes: u64) {
        let e = Erasure {
            volume,
            name: name.to_owned(),
            tenant,
            size_bytes,
            deleted_ms: ctx.now,
            deleted_by: ctx.actor.label(),
            root_epoch: self.root_epoch,
            voters: self.meta_voters.clone(),
            completed_ms: None,
        };
        self.erasures.insert(volume, e);
    }

    /// Marks every erasure whose conditions now hold complete, with an audit record each.
    pub(super) fn complete_erasures(&mut self, now: u64) {
        let done: Vec<u64> = self
            .erasures
            .values()
            .filter(|e| e.completed_ms.is_none() && !self.is_retained(e.volume))
            .filter(|e| {
                let releases_done = self.releases.values().filter(|r| r.volume == e.volume).all(|r| !r.outstanding());
                // No voter known yet (no purge report since start): not provably purged.
                let voters = self.voters_for(e);
                let voters_done = !voters.is_empty()
                    && voters.iter().all(|v| self.meta_purged.get(v).is_some_and(|p| *p >= e.root_epoch));
                releases_done && voters_done
            })
            .map(|e| e.volume)
            .collect();
        for vol in done {
            let (extents, replicas, failed) = self
                .releases
                .values()
                .filter(|r| r.volume == vol)
                .fold((0u64, 0u64, 0u64), |(x, n, f), r| (x + r.verified_extents, n + 1, f + r.failed_extents));
            let e = self.erasures.get_mut(&vol).expect("listed");
            e.completed_ms = Some(now);
            let voters = self.voters_for(&self.erasures[&vol]);
            let e = &self.erasures[&vol];
            self.audit.append(AuditEntry {
                time_ms: now,
                actor: "system".into(),
                tenant: Some(e.tenant),
                client: "-".into(),
                action: "volume.erased".into(),
                object: format!("volume:vol-{vol}({}) releases:{replicas} extents_verified:{extents}", e.name),
                result: format!(
                    "ok: every released extent verified zero (retired as failed: {failed}); voters {voters:?} purged root epoch {}",
                    e.root_epoch
                ),
            });
        }
    }

    /// The voters that must purge for an erasure: those at delete time and those now.
    fn voters_for(&self, e: &Erasure) -> Vec<u64> {
        let set: BTreeSet<u64> = e.voters.iter().chain(self.meta_voters.iter()).copied().collect();
        set.into_iter().collect()
    }

    pub(super) fn release_view(&self, r: &Release) -> ReleaseView {
        let state = if r.erased_ms.is_some() {
            ReleaseState::Erased
        } else if r.released_ms.is_some() {
            ReleaseState::Released
        } else {
            ReleaseState::Pending
        };
        ReleaseView {
            id: r.id,
            node: r.node,
            node_name: self.nodes.get(&r.node).map_or_else(|| format!("node-{}", r.node), |n| n.name.clone()),
            volume: r.volume,
            segment: r.segment,
            layer_epoch: r.layer_epoch,
            reason: r.reason,
            state,
            queued_ms: r.queued_ms,
            released_ms: r.released_ms,
            erased_ms: r.erased_ms,
            extents_released: r.extents.len() as u64,
            extents_verified: r.verified_extents,
            extents_failed: r.failed_extents,
            extents: r.extents.clone(),
        }
    }

    pub(super) fn erasure_view(&self, e: &Erasure) -> ErasureView {
        let releases: Vec<ReleaseView> =
            self.releases.values().filter(|r| r.volume == e.volume).map(|r| self.release_view(r)).collect();
        let current: BTreeSet<u64> = self.meta_voters.iter().copied().collect();
        let meta_voters: Vec<VoterPurgeView> = self
            .voters_for(e)
            .into_iter()
            .map(|id| {
                let purged_epoch = self.meta_purged.get(&id).copied();
                VoterPurgeView {
                    id,
                    purged_epoch,
                    purged: purged_epoch.is_some_and(|p| p >= e.root_epoch),
                    current: current.contains(&id),
                }
            })
            .collect();
        let pending: Vec<String> =
            meta_voters.iter().filter(|m: &&VoterPurgeView| !m.purged).map(|m| m.id.to_string()).collect();
        let key_shred = if meta_voters.is_empty() {
            "pending: no metadata voter has reported yet".to_string()
        } else if pending.is_empty() {
            "done on every voter".to_string()
        } else {
            format!("pending on node {}", pending.join(", "))
        };
        ErasureView {
            key_shred,
            volume: e.volume,
            name: e.name.clone(),
            tenant: e.tenant,
            size_bytes: e.size_bytes,
            deleted_ms: e.deleted_ms,
            deleted_by: e.deleted_by.clone(),
            state: if e.completed_ms.is_some() {
                ErasureState::Complete
            } else if self.is_retained(e.volume) {
                ErasureState::KeptForClones
            } else {
                ErasureState::Erasing
            },
            completed_ms: e.completed_ms,
            root_epoch: e.root_epoch,
            replicas_total: releases.len() as u64,
            replicas_released: releases.iter().filter(|r| r.state != ReleaseState::Pending).count() as u64,
            replicas_erased: releases.iter().filter(|r| r.state == ReleaseState::Erased).count() as u64,
            extents_released: releases.iter().map(|r| r.extents_released).sum(),
            extents_verified: releases.iter().map(|r| r.extents_verified).sum(),
            extents_failed: releases.iter().map(|r| r.extents_failed).sum(),
            releases,
            meta_voters,
        }
    }

    pub(super) fn list_erasures(&self, ctx: &mut Ctx) -> Res {
        let list: Vec<ErasureView> =
            self.erasures.values().filter(|e| ctx.actor.is_admin_of(e.tenant)).map(|e| self.erasure_view(e)).collect();
        json(&list)
    }

    pub(super) fn get_erasure(&self, ctx: &mut Ctx, volume: u64) -> Res {
        let e =
            self.erasures.get(&volume).ok_or_else(|| Refusal::not_found(format!("no deleted volume vol-{volume}")))?;
        ctx.object_tenant = Some(e.tenant);
        if !ctx.actor.is_admin_of(e.tenant) {
            return Err(Refusal::forbidden("an erasure record is readable by operators and its tenant's admins"));
        }
        json(&self.erasure_view(e))
    }

    pub(super) fn list_releases(&self, ctx: &mut Ctx, node: Option<u64>) -> Res {
        require_operator(&ctx.actor)?;
        let list: Vec<ReleaseView> =
            self.releases.values().filter(|r| node.is_none_or(|n| r.node == n)).map(|r| self.release_view(r)).collect();
        json(&list)
    }
}
