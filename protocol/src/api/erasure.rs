//! The release queue and the erasure records of deleted volumes (design/operations.md).

use crate::ops::ReleaseReason;
use serde::{Deserialize, Serialize};

/// Where one release queue entry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// Not yet released by its node.
    Pending,
    /// Extents journaled dirty; zeroing under way.
    Released,
    /// Every extent verified zero.
    Erased,
}

wire_names!(ReleaseState { Pending => "pending", Released => "released", Erased => "erased" });

/// One release queue entry: a replica (or layer) a node must release and zero.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseView {
    pub id: u64,
    pub node: u64,
    pub node_name: String,
    pub volume: u64,
    pub segment: u32,
    /// Set for a snapshot layer; absent for a whole replica.
    pub layer_epoch: Option<u64>,
    pub reason: ReleaseReason,
    pub state: ReleaseState,
    pub queued_ms: u64,
    pub released_ms: Option<u64>,
    pub erased_ms: Option<u64>,
    pub extents_released: u64,
    pub extents_verified: u64,
    pub extents_failed: u64,
    /// The ids of the released extents on the node's disk.
    pub extents: Vec<u32>,
}

/// Whether one metadata voter has purged a deleted volume's key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VoterPurgeView {
    pub id: u64,
    /// The highest root epoch the voter reported purged.
    pub purged_epoch: Option<u64>,
    pub purged: bool,
    /// Still a voter (false: removed since the delete).
    pub current: bool,
}

/// Where a deleted volume's erasure stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErasureState {
    /// Replicas are being released and zeroed, or voters have yet to purge the key.
    Erasing,
    /// Its segments stay until its last clone is flattened or deleted.
    KeptForClones,
    /// Every replica verified zero and every voter purged the key.
    Complete,
}

wire_names!(ErasureState { Erasing => "erasing", KeptForClones => "kept_for_clones", Complete => "complete" });

/// A deleted volume and the progress of its erasure.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErasureView {
    pub volume: u64,
    pub name: String,
    pub tenant: u64,
    pub size_bytes: u64,
    pub deleted_ms: u64,
    pub deleted_by: String,
    pub state: ErasureState,
    pub completed_ms: Option<u64>,
    /// The root key epoch the delete ratcheted to.
    pub root_epoch: u64,
    pub replicas_total: u64,
    pub replicas_released: u64,
    pub replicas_erased: u64,
    pub extents_released: u64,
    pub extents_verified: u64,
    pub extents_failed: u64,
    pub releases: Vec<ReleaseView>,
    pub meta_voters: Vec<VoterPurgeView>,
    /// The key shred as a sentence: `done on every voter`, or `pending on node N[, M]` while
    /// a metadata voter has not yet ratcheted its root key and purged its log.
    #[serde(default)]
    pub key_shred: String,
}
