//! `slate clone VOL@SNAP NEW`: a writable volume that reads through a ready
//! snapshot wherever it has not written. Nothing is copied: slate-meta records
//! the clone (placed like a new volume, the parent's DEK re-wrapped under the
//! clone tenant's key) and the clone's client does the layering.
//!
//! Also here: how a clone's attachment opens its parent ([`open_parent`]), a
//! read-only volume at the snapshot's epoch whose capability comes from the
//! clone's own attachment (the clone's principal needs no grant on the parent),
//! and is renewed with it ([`ParentLink`]).

use super::commands::{bytes_h, print};
use super::open::{self, attached_parent, resolve_volume, AttachedParent};
use super::up::parse_size;
use anyhow::{Context, Result};
use serde_json::json;
use slate::api::ApiClient;
use slate::volume::{
    AttachInfo, ControlError, ControlPlane, Dek, Parent, ParentOpener, ReplicaUpdate, Volume, VolumeConfig,
    VolumeError, VolumeLayout,
};
use slate_protocol::api::{CapabilityRefresh, CreateCloneRequest, SnapshotView, VolumeView};
use slate_protocol::{Generation, NodeId, SegmentIndex, SignedCapability, VolumeId};
use std::sync::Arc;

/// Options of `slate clone`.
#[derive(Debug, Clone, clap::Args)]
pub struct CloneArgs {
    /// The parent's snapshot, `VOLUME@SNAPSHOT` (it must be ready).
    pub snapshot: String,
    /// The new volume's name.
    pub name: String,
    /// The clone's tenant (default: the parent's; another tenant needs an operator).
    #[arg(long)]
    pub tenant: Option<u64>,
    /// The clone's size, e.g. 20G (default and minimum: the parent's).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
}

/// Runs `slate clone`.
pub async fn run(api: &ApiClient, args: CloneArgs, json_out: bool) -> Result<()> {
    let (volume, snap) = open::split_snapshot_spec(&args.snapshot)?;
    let Some(snap) = snap else {
        anyhow::bail!("{volume} names no snapshot: clone VOLUME@SNAPSHOT (take one with `slate snapshot create`)");
    };
    let id = resolve_volume(api, volume).await?;
    let list: Vec<SnapshotView> = api
        .get(&format!("/v1/volumes/{id}/snapshots"))
        .await
        .with_context(|| format!("listing the snapshots of volume {volume} (a snapshot or backup grant is needed)"))?;
    let s = open::pick_snapshot(&list, volume, snap)?;
    let body =
        CreateCloneRequest { snapshot: s.id, name: args.name.clone(), tenant: args.tenant, size_bytes: args.size };
    let v: VolumeView = api
        .post(&format!("/v1/volumes/{id}/clones"), &body)
        .await
        .with_context(|| format!("cloning {volume}@{snap} as {}", args.name))?;
    print(json_out, &serde_json::to_value(&v)?, |_| {
        format!(
            "created clone {} ({}) of {volume}@{snap}, {}, tenant {}: nothing copied; it reads the snapshot until written\n",
            v.name,
            v.id,
            bytes_h(v.size_bytes),
            v.tenant,
        )
    });
    Ok(())
}

/// A clone's way to its parent: renews the parent's read-only capability (and
/// learns its layout) through the clone's own attachment, and opens the parent again.
#[derive(Debug, Clone)]
pub struct ParentLink {
    api: ApiClient,
    /// The clone and its attachment.
    clone: u64,
    attachment: u64,
    parent: u64,
    dek: Dek,
}

impl ParentLink {
    async fn fetch(&self) -> Result<AttachedParent, ControlError> {
        let path = format!("/v1/volumes/{}/attachments/{}/capability", self.clone, self.attachment);
        let r: CapabilityRefresh =
            self.api.post(&path, &json!(null)).await.map_err(|e| ControlError(format!("{e:#}")))?;
        let p = r.parent.ok_or_else(|| ControlError(format!("vol-{} no longer reads a parent", self.clone)))?;
        let p = attached_parent(&p)?;
        if p.id != self.parent {
            return Err(ControlError(format!("vol-{} now reads vol-{}, not vol-{}", self.clone, p.id, self.parent)));
        }
        Ok(p)
    }

    async fn open_volume(&self, p: AttachedParent) -> Result<Volume, VolumeError> {
        let cfg = VolumeConfig { read_epoch: Some(p.epoch), ..VolumeConfig::default() };
        let info = AttachInfo { layout: p.layout, capability: p.capability, dek: self.dek.clone() };
        Volume::attach(info, Arc::new(self.clone()), self.api.data_plane().clone(), cfg).await
    }
}

#[async_trait::async_trait]
impl ControlPlane for ParentLink {
    async fn report_failed_replica(
        &self,
        volume: VolumeId,
        _segment: SegmentIndex,
        _node: NodeId,
    ) -> Result<ReplicaUpdate, ControlError> {
        // Read-only readers never reconfigure; the parent's own writer (or slate-meta) does.
        Err(ControlError(format!("{volume} is read through a clone; its replicas are not this client's to replace")))
    }

    async fn renew_capability(
        &self,
        volume: VolumeId,
        generation: Generation,
    ) -> Result<SignedCapability, ControlError> {
        let p = self.fetch().await?;
        if p.capability.claims.volume != volume || p.capability.claims.generation != generation {
            // The parent was attached read-write since: the reader is opened again when fenced.
            return Err(ControlError(format!(
                "the parent's generation moved on to {}",
                p.capability.claims.generation
            )));
        }
        Ok(p.capability)
    }

    async fn refresh_layout(&self, _volume: VolumeId) -> Result<VolumeLayout, ControlError> {
        Ok(self.fetch().await?.layout)
    }
}

#[async_trait::async_trait]
impl ParentOpener for ParentLink {
    async fn open(&self) -> Result<Volume, VolumeError> {
        let p = self.fetch().await.map_err(|e| VolumeError::Io(e.to_string()))?;
        self.open_volume(p).await
    }
}

/// Opens the parent of attachment `attachment` of clone `clone`, read-only at the
/// snapshot's epoch, with the clone's DEK (the same key).
pub async fn open_parent(
    api: &ApiClient,
    clone: u64,
    attachment: u64,
    parent: AttachedParent,
    dek: &Dek,
) -> Result<Parent> {
    let link = ParentLink { api: api.clone(), clone, attachment, parent: parent.id, dek: dek.clone() };
    let (name, snap) = (parent.name.clone(), parent.snapshot_name.clone());
    let volume = link
        .open_volume(parent)
        .await
        .with_context(|| format!("opening the clone's parent {name}@{snap} on its storage nodes"))?;
    Ok(Parent::new(volume, Some(Arc::new(link))))
}
