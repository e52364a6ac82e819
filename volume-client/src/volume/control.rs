//! The volume engine's view of the metadata service.
//!
//! The data plane never waits on slate-meta except when the layout must
//! change: a replica stopped answering (the engine asks for a replacement)
//! or a rebuild finished (the engine says the new replica is in sync). A
//! read-write attachment also polls the layout, to follow changes made
//! elsewhere (a drain adds a replica, then removes the drained one). Those
//! calls sit behind this small trait so that the engine can be driven by an
//! in-test fake and the lead can implement it over slate-meta's HTTP API.

use super::layout::{SegmentReplicas, VolumeLayout, VolumeState};
use slate_protocol::{Generation, NodeId, SegmentIndex, SignedCapability, VolumeId};

/// A control-plane call failed; the engine retries with backoff.
#[derive(Debug, Clone, thiserror::Error)]
#[error("control plane: {0}")]
pub struct ControlError(pub String);

/// The metadata service's answer to a failed replica.
#[derive(Debug, Clone)]
pub struct ReplicaUpdate {
    /// The segment's new replica set: the survivors plus a fresh replica
    /// (verified-zero extents, already assigned the segment on its node).
    pub set: SegmentReplicas,
    /// A new capability, when the old one's node scope does not cover the new replica.
    pub capability: Option<SignedCapability>,
}

/// What the volume engine needs from the metadata service.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + std::fmt::Debug + 'static {
    /// `node` stopped answering for `segment` of `volume`: remove it from the
    /// segment's replica set and put a fresh replica in its place. Returns the
    /// new set. The engine calls this once per (segment, failed node) and
    /// retries on error.
    async fn report_failed_replica(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
    ) -> Result<ReplicaUpdate, ControlError>;

    /// `node` now holds every acknowledged write of `segment` (its rebuild finished).
    async fn report_rebuilt(&self, volume: VolumeId, segment: SegmentIndex, node: NodeId) -> Result<(), ControlError> {
        let _ = (volume, segment, node);
        Ok(())
    }

    /// How far the rebuild of `node` for `segment` has got (for `slate volume
    /// show`). Called at most about once a second per rebuild; failures are ignored.
    async fn report_rebuild_progress(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
        done_blocks: u64,
        total_blocks: u64,
    ) -> Result<(), ControlError> {
        let _ = (volume, segment, node, done_blocks, total_blocks);
        Ok(())
    }

    /// A fresh capability for the same attachment (same volume and
    /// generation, later expiry). The engine asks for it when two thirds of
    /// the current one's lifetime have passed and reopens its node sessions
    /// with it; without renewal the volume stops serving at expiry.
    async fn renew_capability(
        &self,
        volume: VolumeId,
        generation: Generation,
    ) -> Result<SignedCapability, ControlError> {
        let _ = (volume, generation);
        Err(ControlError("capability renewal is not supported".into()))
    }

    /// The volume's current layout (after a reconfiguration made elsewhere,
    /// such as a drain adding or removing a replica). Polled by a read-write
    /// attachment every `VolumeConfig::layout_poll_interval`.
    async fn refresh_layout(&self, volume: VolumeId) -> Result<VolumeLayout, ControlError>;

    /// The layout as [`ControlPlane::refresh_layout`] returns it, with the
    /// volume's pending snapshots (which the attachment freezes). This is what
    /// the poll calls; the default reports no snapshots.
    async fn refresh_state(&self, volume: VolumeId) -> Result<VolumeState, ControlError> {
        Ok(VolumeState { layout: self.refresh_layout(volume).await?, pending_snapshots: Vec::new() })
    }

    /// Every replica of the volume froze pending snapshot `snapshot` (its
    /// writes are quiesced around the freeze): the metadata service may mark it
    /// ready. An error leaves it pending; the engine reports again after a
    /// later poll. The default does nothing.
    async fn report_snapshot_frozen(&self, volume: VolumeId, snapshot: u64) -> Result<(), ControlError> {
        let _ = (volume, snapshot);
        Ok(())
    }

    /// `set` lists replicas that joined `set.segment` elsewhere (seen through
    /// [`ControlPlane::refresh_layout`]): tell their nodes that they hold the
    /// segment (idempotent) before the engine writes to them. `capability`
    /// covers them. The default does nothing (the nodes already know).
    async fn assign_replicas(
        &self,
        volume: VolumeId,
        set: &SegmentReplicas,
        capability: &SignedCapability,
    ) -> Result<(), ControlError> {
        let _ = (volume, set, capability);
        Ok(())
    }
}
