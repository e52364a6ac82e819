//! Grants and what hangs on them: a revoked grant ends its principal's live
//! attachments, and reconfiguration is reserved to the current writer.
//!
//! When `DELETE /v1/grants/{id}` leaves a principal without the access its
//! attachment needs, the attachment is removed (its capability can no longer be
//! refreshed), and if it was read-write the volume's generation is bumped and
//! recorded as a *fence*. Storage nodes holding the volume get the fence in
//! every heartbeat reply ([`MetaState::fences_for`]) and raise their generation
//! table (durably, like a hello of a newer generation), so the revoked client's
//! next request fails with `StaleGeneration` within one heartbeat interval,
//! without waiting for its capability to expire.

use super::apply::{Actor, Ctx, Need};
use super::command::Refusal;
use super::types::{AttachMode, ReplicaState, Volume};
use super::MetaState;
use slate_protocol::ops::VolumeFence;

impl MetaState {
    /// The fences storage node `node` must apply: every fenced volume with a replica on it.
    pub fn fences_for(&self, node: u64) -> Vec<VolumeFence> {
        self.fences
            .iter()
            .filter_map(|(vol, generation)| {
                let v = self.volumes.get(vol)?;
                let here = v.segments.iter().any(|s| s.replicas.iter().any(|r| r.node == node));
                here.then_some(VolumeFence { volume: *vol, generation: (*generation).max(v.generation) })
            })
            .collect()
    }

    /// After a grant of `principal` on `volume` was deleted: ends the principal's
    /// attachments it no longer has the right to hold. Returns the ended attachment
    /// ids and the fence generation (when a read-write attachment ended).
    pub(super) fn revoke_attachments(&mut self, ctx: &mut Ctx, principal: u64, volume: u64) -> (Vec<u64>, Option<u64>) {
        let Some(p) = self.principals.get(&principal) else { return (Vec::new(), None) };
        let actor = Actor { principal: Some(p.id), name: p.name.clone(), role: p.role, tenant: p.tenant, node: p.node };
        let Some(v) = self.volumes.get(&volume) else { return (Vec::new(), None) };
        let ended: Vec<(u64, AttachMode)> = v
            .attachments
            .values()
            .filter(|a| a.principal == principal)
            .filter(|a| {
                let need = if a.mode == AttachMode::ReadWrite { Need::AttachRw } else { Need::AttachRo };
                self.check_volume(&actor, v, need).is_err()
            })
            .map(|a| (a.id, a.mode))
            .collect();
        if ended.is_empty() {
            return (Vec::new(), None);
        }
        let v = self.volumes.get_mut(&volume).expect("checked");
        for (id, _) in &ended {
            v.attachments.remove(id);
        }
        let fence = ended.iter().any(|(_, m)| *m == AttachMode::ReadWrite).then(|| {
            v.generation += 1;
            v.generation
        });
        if let Some(g) = fence {
            self.fences.insert(volume, g);
        }
        let ids: Vec<u64> = ended.iter().map(|(id, _)| *id).collect();
        use std::fmt::Write as _;
        let _ = write!(ctx.object, " ended attachments:{ids:?}");
        if let Some(g) = fence {
            let _ = write!(ctx.object, " fenced generation:{g}");
        }
        (ids, fence)
    }

    /// Reconfiguration (report-failure, mark-in-sync) is the current writer's: the caller
    /// must hold a read-write attachment at the volume's current generation. Operators
    /// may act without one (their calls are audited).
    pub(super) fn require_current_writer(actor: &Actor, v: &Volume) -> Result<(), Refusal> {
        if actor.is_operator() {
            return Ok(());
        }
        let current = v.attachments.values().any(|a| {
            Some(a.principal) == actor.principal && a.mode == AttachMode::ReadWrite && a.generation == v.generation
        });
        if current {
            Ok(())
        } else {
            Err(Refusal::forbidden(format!(
                "reconfiguring vol-{} needs a read-write attachment at its current generation {}",
                v.id, v.generation
            )))
        }
    }

    /// Mark-in-sync applies only to a replica that is rebuilding.
    pub(super) fn require_rebuilding(v: &Volume, segment: u32, node: u64) -> Result<(), Refusal> {
        let rebuilding = v
            .segments
            .get(segment as usize)
            .is_some_and(|s| s.replicas.iter().any(|r| r.node == node && r.state == ReplicaState::Rebuilding));
        if rebuilding {
            Ok(())
        } else {
            Err(Refusal::conflict(format!(
                "node {node}'s replica of vol-{} segment {segment} is not rebuilding: nothing to mark in sync",
                v.id
            )))
        }
    }
}
