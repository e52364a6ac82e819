//! Clones: a writable volume that reads through a ready snapshot of another
//! volume (its parent) wherever it has not written itself. Nothing is copied
//! when a clone is made; the layering is done by the clone's client (as
//! librbd does for Ceph RBD clones), so this module only keeps the records:
//!
//! * **Create** (`POST /v1/volumes/{id}/clones`): the clone is placed like a
//!   new volume, in the parent's tenant unless another is named, at least as
//!   large as the parent, and gets the parent's DEK re-wrapped under its own
//!   tenant key. The DEK must be the same: the shared blocks are ciphertext
//!   under it, with the block index as the XTS tweak. Needs a snapshot (or
//!   backup) right on the parent and the admin of the clone's tenant.
//! * **Attach**: a clone's attach reply (and every capability refresh) also
//!   carries the parent's layout, the epoch and the claims of a read-only
//!   capability for the parent. That is the only way the clone's principal
//!   reads the parent: it needs no grant on it.
//! * **Snapshot delete**: refused while clones read through the snapshot.
//! * **Parent delete**: the parent's key path is shredded as for any volume
//!   (each clone keeps its own wrapped copy of the DEK) and its name is
//!   freed, but its segments are kept (in [`MetaState::retained`], still
//!   charged to their nodes) until the last clone reading through them is
//!   flattened or deleted; then they go to the release queue and verified
//!   zeroing like any deleted volume's, and the parent's erasure completes.
//! * **Flatten** (`POST /v1/volumes/{id}/flattened`): the clone's read-write
//!   client copied every block it still read from the parent; the clone
//!   forgets its parent. Refused while the clone has snapshots of its own
//!   (they would lose what they read through the parent).
//!
//! Clones of a clone's snapshot are refused (one level of layering); flatten
//! the clone first.

use super::apply::{json, place_segments, validate_name, validate_size, Ctx, Need, Res};
use super::command::{ErrorCode, Refusal};
use super::types::{AttachMode, CloneParent, SnapshotState, Volume};
use super::view::{CapabilityClaims, VolumeView};
use super::{take, MetaState};
use crate::keys::{RootKey, WrappedKey};
use serde::{Deserialize, Serialize};
use slate_protocol::ops::ReleaseReason;
use slate_protocol::Rights;
use std::collections::{BTreeMap, BTreeSet};
use utoipa::ToSchema;

pub use slate_protocol::api::{CloneView, CreateCloneRequest, FlattenedRequest, ParentView};

/// Checks a clone request (also done by the API before proposing).
pub fn validate_create_clone(req: &CreateCloneRequest) -> Result<(), Refusal> {
    validate_name("clone name", &req.name, &[])?;
    if let Some(size) = req.size_bytes {
        validate_size(size)?;
    }
    Ok(())
}

/// What a clone's attachment needs to read its parent: the parent's layout, the
/// snapshot's epoch and the claims of a read-only capability for the parent
/// (the API signs them, with the attachment's own).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ParentGrant {
    pub volume: VolumeView,
    pub snapshot: u64,
    pub snapshot_name: String,
    pub epoch: u64,
    /// The parent's size at the snapshot: the clone reads no further (later segments have no layer at `epoch`).
    pub size_bytes: u64,
    pub claims: CapabilityClaims,
}

/// A capability refresh: the attachment's claims and, for a clone, its parent's.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RefreshGrant {
    #[serde(flatten)]
    pub claims: CapabilityClaims,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentGrant>,
}

/// A snapshot's size (recorded with it; older snapshots: the volume's current size).
fn snapshot_size(v: &Volume, recorded: u64) -> u64 {
    if recorded == 0 {
        v.size_bytes
    } else {
        recorded
    }
}

fn internal(msg: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::Internal, msg)
}

impl MetaState {
    /// A clone's parent record: live, or deleted and kept for its clones.
    fn parent_of(&self, p: &CloneParent) -> Option<&Volume> {
        self.volumes.get(&p.volume).or_else(|| self.retained.get(&p.volume))
    }

    /// Live volumes reading through a snapshot of `volume` (any snapshot, or only `snapshot`).
    fn clones_reading(&self, volume: u64, snapshot: Option<u64>) -> Vec<&Volume> {
        self.volumes
            .values()
            .filter(|v| {
                v.parent.as_ref().is_some_and(|p| p.volume == volume && snapshot.is_none_or(|s| s == p.snapshot))
            })
            .collect()
    }

    pub(super) fn create_clone(&mut self, ctx: &mut Ctx, root: &RootKey, volume: u64, req: &CreateCloneRequest) -> Res {
        validate_create_clone(req)?;
        let p = self.volume_for(ctx, volume)?;
        ctx.object = format!("volume:vol-{volume} snapshot:{} clone:{}", req.snapshot, req.name);
        self.check_volume(&ctx.actor, p, Need::Snapshot)?;
        let tenant = req.tenant.unwrap_or(p.tenant);
        if !ctx.actor.is_admin_of(tenant) {
            return Err(Refusal::forbidden(format!(
                "{} may not create volumes in tenant {tenant} (a clone needs that tenant's admin)",
                ctx.actor.label()
            )));
        }
        if let Some(pp) = &p.parent {
            return Err(Refusal::conflict(format!(
                "vol-{volume} is itself a clone (of vol-{} at snapshot {:?}); flatten it before cloning its snapshots",
                pp.volume, pp.snapshot_name
            )));
        }
        let snap = p.snapshots.get(&req.snapshot).ok_or_else(|| {
            Refusal::not_found(format!(
                "vol-{volume} ({}) has no snapshot {}: clone a ready snapshot",
                p.name, req.snapshot
            ))
        })?;
        if snap.state != SnapshotState::Ready {
            return Err(Refusal::conflict(format!(
                "snapshot {:?} of vol-{volume} is still pending (not frozen on every replica); clone it once it is ready",
                snap.name
            )));
        }
        let snap_size = snapshot_size(p, snap.size_bytes);
        let size_bytes = req.size_bytes.unwrap_or(snap_size);
        if size_bytes < snap_size {
            return Err(Refusal::bad(format!(
                "a clone is at least as large as its snapshot: {:?} of vol-{volume} is {snap_size} bytes, asked {size_bytes}",
                snap.name
            )));
        }
        let ct = self.tenants.get(&tenant).ok_or_else(|| Refusal::not_found(format!("no tenant {tenant}")))?;
        if self.volumes.values().any(|v| v.tenant == tenant && v.name == req.name) {
            return Err(Refusal::conflict(format!("tenant {tenant} has a volume named {:?}", req.name)));
        }
        let pt = self.tenants.get(&p.tenant).ok_or_else(|| internal("the parent's tenant is missing"))?;
        // The same DEK, under the clone's own key path: the shared blocks are ciphertext under it.
        let dek = root
            .unwrap_tenant_key(&pt.wrapped_key)
            .and_then(|k| k.unwrap_dek(&p.wrapped_dek))
            .map_err(|e| internal(e.to_string()))?;
        let wrapped_dek = root.unwrap_tenant_key(&ct.wrapped_key).map_err(|e| internal(e.to_string()))?.wrap_dek(&dek);
        let parent = CloneParent { volume, snapshot: snap.id, snapshot_name: snap.name.clone(), epoch: snap.epoch };
        let (replicas, level, qos, dek_created_ms) = (p.replicas, p.level, p.qos, p.dek_created_ms);
        let segment_blocks = self.settings.segment_blocks;
        let mut cands = self.candidates();
        let segments = place_segments(&mut cands, 0, size_bytes, segment_blocks, replicas, level)?;
        let id = take(&mut self.next.volume);
        ctx.object = format!(
            "volume:vol-{id}({}) clone of volume:vol-{volume} snapshot:{}({}) epoch:{} tenant:{tenant}",
            req.name, parent.snapshot, parent.snapshot_name, parent.epoch
        );
        ctx.object_tenant = Some(tenant);
        self.charge(&segments, size_bytes, segment_blocks, true);
        self.volumes.insert(
            id,
            Volume {
                id,
                tenant,
                name: req.name.clone(),
                size_bytes,
                segment_blocks,
                replicas,
                level,
                qos,
                created_ms: ctx.now,
                generation: 0,
                segments,
                attachments: BTreeMap::new(),
                snapshots: BTreeMap::new(),
                snapshot_epoch: 0,
                wrapped_dek,
                dek_created_ms,
                dek_wrapped_ms: ctx.now,
                parent: Some(parent),
            },
        );
        json(&self.volume_view(&self.volumes[&id], ctx.now))
    }

    pub(super) fn clone_flattened(&mut self, ctx: &mut Ctx, volume: u64, req: &FlattenedRequest) -> Res {
        let v = self.volume_for(ctx, volume)?;
        ctx.object = format!("volume:vol-{volume} attachment:{}", req.attachment);
        let a = v
            .attachments
            .get(&req.attachment)
            .ok_or_else(|| Refusal::not_found(format!("vol-{volume} has no attachment {}", req.attachment)))?;
        if a.mode != AttachMode::ReadWrite || Some(a.principal) != ctx.actor.principal {
            return Err(Refusal::forbidden(
                "only the clone's read-write attachment, by its holder, may mark it flattened",
            ));
        }
        let Some(p) = v.parent.clone() else {
            return Err(Refusal::conflict(format!("vol-{volume} is not a clone (or is already flattened)")));
        };
        if !v.snapshots.is_empty() {
            let names: Vec<&str> = v.snapshots.values().map(|s| s.name.as_str()).collect();
            return Err(Refusal::conflict(format!(
                "vol-{volume} has snapshots {names:?}, which read through its parent: delete them before flattening"
            )));
        }
        self.volumes.get_mut(&volume).expect("checked").parent = None;
        ctx.object = format!(
            "volume:vol-{volume} attachment:{} flattened: no longer reads vol-{} snapshot:{}({}) epoch:{}",
            req.attachment, p.volume, p.snapshot, p.snapshot_name, p.epoch
        );
        self.release_unread_parents(ctx.now);
        json(&serde_json::json!({"volume": volume, "flattened": true, "parent": p}))
    }

    /// Refuses to delete snapshot `snapshot` of `volume` while clones read through it.
    pub(super) fn refuse_if_cloned(&self, volume: u64, snapshot: u64) -> Result<(), Refusal> {
        let clones = self.clones_reading(volume, Some(snapshot));
        if clones.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = clones.iter().map(|c| format!("{} (vol-{})", c.name, c.id)).collect();
        Err(Refusal::conflict(format!(
            "snapshot {snapshot} of vol-{volume} has clones reading through it: {}; flatten or delete them first",
            names.join(", ")
        )))
    }

    /// A deleted volume that clones still read through is kept (segments assigned and
    /// charged, stripped of key, attachments and unread snapshots) instead of released.
    /// Returns the volume back when nothing reads it: the caller releases it.
    pub(super) fn retain_for_clones(&mut self, mut v: Volume) -> Option<Volume> {
        let read: BTreeSet<u64> =
            self.clones_reading(v.id, None).iter().filter_map(|c| c.parent.as_ref().map(|p| p.snapshot)).collect();
        if read.is_empty() {
            return Some(v);
        }
        v.wrapped_dek = WrappedKey::default();
        v.attachments.clear();
        v.snapshots.retain(|id, _| read.contains(id));
        self.retained.insert(v.id, v);
        None
    }

    /// Releases every kept parent no clone reads any more: its segments go to the
    /// release queue (and verified zeroing), and its erasure can complete.
    pub(super) fn release_unread_parents(&mut self, now: u64) {
        let unread: Vec<u64> =
            self.retained.keys().copied().filter(|id| self.clones_reading(*id, None).is_empty()).collect();
        for id in unread {
            let v = self.retained.remove(&id).expect("listed");
            for s in &v.segments {
                for r in &s.replicas {
                    self.queue_release(now, r.node, (v.id, v.tenant, s.index), None, ReleaseReason::VolumeDeleted);
                }
            }
            self.charge(&v.segments, v.size_bytes, v.segment_blocks, false);
        }
    }

    /// Refuses to decommission (or drain) `node` while it holds segments kept for clones:
    /// nothing moves or repairs them, and they are the clones' only copy of the parent.
    pub(super) fn refuse_if_retained_on(&self, node: u64) -> Result<(), Refusal> {
        let held: Vec<String> = self
            .retained
            .values()
            .filter(|v| v.segments.iter().any(|s| s.replicas.iter().any(|r| r.node == node)))
            .map(|v| {
                let clones: Vec<String> = self.clones_reading(v.id, None).iter().map(|c| c.name.clone()).collect();
                format!("deleted vol-{} ({}) read by clones {}", v.id, v.name, clones.join(", "))
            })
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        Err(Refusal::conflict(format!(
            "node {node} holds segments kept for clones: {}; flatten or delete those clones first",
            held.join("; ")
        )))
    }

    /// Refuses to `what` a clone: that needs every block in the volume's own layers (a
    /// backup reads the nodes' layers, which hold only what the clone wrote).
    pub(super) fn refuse_if_clone(v: &Volume, what: &str) -> Result<(), Refusal> {
        match &v.parent {
            None => Ok(()),
            Some(p) => Err(Refusal::conflict(format!(
                "vol-{} is a clone of vol-{}@{}: its own layers lack what it reads from the parent, so it cannot be {what}; \
                 flatten it first (slate volume flatten)",
                v.id, p.volume, p.snapshot_name
            ))),
        }
    }

    /// Deleted volumes kept for clones (erasure records say "kept for clones" meanwhile).
    pub(super) fn is_retained(&self, volume: u64) -> bool {
        self.retained.contains_key(&volume)
    }

    pub(super) fn parent_view(&self, v: &Volume) -> Option<ParentView> {
        let p = v.parent.as_ref()?;
        let pv = self.parent_of(p);
        Some(ParentView {
            volume: p.volume,
            volume_name: pv.map(|x| x.name.clone()).unwrap_or_default(),
            deleted: !self.volumes.contains_key(&p.volume),
            snapshot: p.snapshot,
            snapshot_name: p.snapshot_name.clone(),
            epoch: p.epoch,
            size_bytes: pv.map_or(0, |x| snapshot_size(x, x.snapshots.get(&p.snapshot).map_or(0, |s| s.size_bytes))),
        })
    }

    pub(super) fn clone_views(&self, volume: u64) -> Vec<CloneView> {
        self.clones_reading(volume, None)
            .into_iter()
            .filter_map(|c| {
                let p = c.parent.as_ref()?;
                Some(CloneView {
                    volume: c.id,
                    name: c.name.clone(),
                    snapshot: p.snapshot,
                    snapshot_name: p.snapshot_name.clone(),
                })
            })
            .collect()
    }

    /// For a clone's attachment: how to read its parent (read-only, at the snapshot's epoch,
    /// at the parent's current generation, on every node of the parent's layout).
    pub(super) fn parent_grant(&self, v: &Volume, now: u64) -> Option<ParentGrant> {
        let p = v.parent.as_ref()?;
        let pv = self.parent_of(p)?;
        let nodes: BTreeSet<u64> = pv.segments.iter().flat_map(|s| s.replicas.iter().map(|r| r.node)).collect();
        Some(ParentGrant {
            volume: self.volume_view(pv, now),
            snapshot: p.snapshot,
            snapshot_name: p.snapshot_name.clone(),
            epoch: p.epoch,
            size_bytes: snapshot_size(pv, pv.snapshots.get(&p.snapshot).map_or(0, |s| s.size_bytes)),
            claims: CapabilityClaims {
                volume: pv.id,
                generation: pv.generation,
                rights: Rights::READ.bits(),
                nodes: nodes.into_iter().collect(),
                ttl_secs: self.settings.capability_ttl_secs,
                size_blocks: 0,
                segments: 0,
            }
            .scoped_to(pv.size_bytes, pv.segments.len()),
        })
    }
}
