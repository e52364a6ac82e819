//! Freezing snapshots: a snapshot is recorded `pending` with a layer epoch and
//! becomes `ready` once every replica of the volume is frozen at that epoch.
//!
//! With a read-write attachment, its client does the freeze: it holds new writes,
//! waits for those in flight, sends the freeze to every node of the volume, reports,
//! and resumes. So no write acknowledged before the freeze is missing from the
//! snapshot and none admitted after it is in it. A detached volume is frozen by its
//! nodes themselves (the heartbeat's `freezes`); no writer can attach meanwhile
//! (attach answers 503 until the snapshot is ready).

use super::apply::{json, Ctx, Need, Res};
use super::command::{Refusal, SnapshotFrozenRequest};
use super::types::{AttachMode, SnapshotState};
use super::MetaState;
use slate_protocol::ops::FreezeTask;
use std::collections::BTreeSet;

impl MetaState {
    /// Nodes holding any replica of `volume`.
    fn nodes_of(&self, volume: u64) -> BTreeSet<u64> {
        self.volumes
            .get(&volume)
            .map(|v| v.segments.iter().flat_map(|s| s.replicas.iter().map(|r| r.node)).collect())
            .unwrap_or_default()
    }

    /// Freezes `node` must make: pending snapshots of detached volumes it holds.
    pub(super) fn freeze_tasks(&self, node: u64) -> Vec<FreezeTask> {
        self.volumes
            .values()
            .filter(|v| !v.attachments.values().any(|a| a.mode == AttachMode::ReadWrite))
            .filter(|v| v.segments.iter().any(|s| s.replicas.iter().any(|r| r.node == node)))
            .flat_map(|v| {
                v.snapshots
                    .values()
                    .filter(|s| s.state == SnapshotState::Pending && !s.frozen_nodes.contains(&node))
                    .map(|s| FreezeTask { volume: v.id, snapshot: s.id, epoch: s.epoch })
            })
            .collect()
    }

    pub(super) fn snapshot_frozen(
        &mut self,
        ctx: &mut Ctx,
        volume: u64,
        snapshot: u64,
        req: &SnapshotFrozenRequest,
    ) -> Res {
        let v = self.volume_for(ctx, volume)?;
        let s = v
            .snapshots
            .get(&snapshot)
            .ok_or_else(|| Refusal::not_found(format!("vol-{volume} has no snapshot {snapshot}")))?;
        ctx.object = format!("volume:vol-{volume} snapshot:{snapshot}({}) epoch:{}", s.name, s.epoch);
        if let Some(node) = req.node {
            if !ctx.actor.sends_node_traffic() {
                return Err(Refusal::forbidden("node freeze reports come from storage nodes"));
            }
            if v.attachments.values().any(|a| a.mode == AttachMode::ReadWrite) {
                return Err(Refusal::conflict("the volume is attached read-write: its client freezes it"));
            }
            ctx.skip_audit = true;
            let all = self.nodes_of(volume);
            let v = self.volumes.get_mut(&volume).expect("checked");
            let s = v.snapshots.get_mut(&snapshot).expect("checked");
            s.frozen_nodes.insert(node);
            if s.state == SnapshotState::Pending && all.is_subset(&s.frozen_nodes) {
                s.state = SnapshotState::Ready;
                s.ready_ms = Some(ctx.now);
                ctx.skip_audit = false;
                use std::fmt::Write as _;
                let _ = write!(ctx.object, " ready: frozen by its {} node(s)", all.len());
            }
        } else {
            self.check_volume(&ctx.actor, v, Need::Reconfigure)?;
            let v = self.volumes.get_mut(&volume).expect("checked");
            let s = v.snapshots.get_mut(&snapshot).expect("checked");
            if s.state == SnapshotState::Pending {
                s.state = SnapshotState::Ready;
                s.ready_ms = Some(ctx.now);
                ctx.object.push_str(" ready: frozen by the read-write client");
            } else {
                ctx.skip_audit = true;
            }
        }
        let s = &self.volumes[&volume].snapshots[&snapshot];
        json(&serde_json::json!({"snapshot": snapshot, "state": s.state}))
    }
}
