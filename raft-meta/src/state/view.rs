//! What the API shows of the state: views without secrets.
//!
//! Wrapped keys and token hashes never leave the state through a view; the
//! one secret that leaves is the attach reply's DEK, which travels beside
//! the body (see `Response::Ok::dek_hex`), never inside a view.

use super::types::{Access, AttachMode, NodeState, Qos, ReplicaState, Role, Settings};
use crate::audit::AuditRecord;
use crate::placement::DomainLevel;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    pub id: u64,
    pub name: String,
    pub created_ms: u64,
    /// Tenant key version (bumped by rotations and by shreds of its volumes).
    pub key_version: u64,
    pub key_created_ms: u64,
    pub volumes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PrincipalView {
    pub id: u64,
    pub name: String,
    pub role: Role,
    pub tenant: Option<u64>,
    /// The storage node a `node` principal speaks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    pub created_ms: u64,
    pub not_before_ms: Option<u64>,
    pub not_after_ms: Option<u64>,
    pub failed_auths: u32,
    pub locked_until_ms: Option<u64>,
    pub tokens: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: u64,
    pub principal: u64,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
}

/// A newly issued token. `token` is shown once and never stored; `Debug` leaves it out.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct IssuedToken {
    pub principal: PrincipalView,
    pub token_id: u64,
    /// The bearer token, `slate_<id>_<secret>`: keep it secret.
    #[serde(default)]
    pub token: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct GrantView {
    pub id: u64,
    pub principal: u64,
    pub volume: u64,
    pub access: Access,
    pub created_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    pub id: u64,
    pub node: u64,
    /// The node's name.
    pub node_name: String,
    pub name: String,
    pub capacity_bytes: u64,
    pub state: super::types::DiskState,
    /// Decommission progress (`none` if never asked).
    pub decommission_stage: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: u64,
    pub name: String,
    pub addr: String,
    pub failure_domain: String,
    pub state: NodeState,
    pub registered_ms: u64,
    pub last_heartbeat_ms: u64,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    /// Segment replicas held.
    pub replicas: u64,
    /// Release queue entries the node has not yet verified zero.
    pub releases_outstanding: u64,
    pub disks: Vec<DiskView>,
    pub drain: DrainView,
    /// The last scrub progress the node reported.
    #[schema(value_type = Object)]
    pub scrub: Option<slate_protocol::ops::ScrubReport>,
    /// The last scrub an operator asked for (0: none).
    pub scrub_requested: u64,
    /// The last report of an operator-requested scrub.
    #[schema(value_type = Object)]
    pub scrub_requested_report: Option<slate_protocol::ops::ScrubReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplicaView {
    pub node: u64,
    /// The node's data-plane address.
    pub addr: String,
    pub failure_domain: String,
    pub state: ReplicaState,
    pub node_state: NodeState,
    /// While rebuilding: blocks copied so far, of `rebuild_total_blocks`.
    pub rebuild_done_blocks: u64,
    pub rebuild_total_blocks: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SegmentView {
    pub index: u32,
    /// Replica-set version: bumped every time the set changes.
    pub epoch: u64,
    pub first_block: u64,
    pub blocks: u64,
    pub replicas: Vec<ReplicaView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AttachmentView {
    pub id: u64,
    pub principal: u64,
    pub host: String,
    pub mode: AttachMode,
    pub generation: u64,
    pub attached_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SnapshotView {
    pub id: u64,
    pub volume: u64,
    pub name: String,
    pub epoch: u64,
    pub created_ms: u64,
    /// `pending` until every replica is frozen at `epoch`, then `ready`.
    pub state: super::types::SnapshotState,
    pub ready_ms: Option<u64>,
}

/// The volume key's age (never the key).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DekInfo {
    pub created_ms: u64,
    /// Age at the time of the call.
    pub age_secs: u64,
    /// Last time the key was re-wrapped (tenant key rotation or shred of a sibling).
    pub wrapped_ms: u64,
    pub tenant_key_version: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VolumeView {
    pub id: u64,
    pub name: String,
    pub tenant: u64,
    pub size_bytes: u64,
    pub block_size: u64,
    pub replicas: u8,
    pub failure_domain_level: DomainLevel,
    pub qos: Qos,
    /// `available`, `attached` or `degraded` (some segment below R in-sync replicas).
    pub state: String,
    pub generation: u64,
    pub segment_blocks: u64,
    pub segments: Vec<SegmentView>,
    pub attachments: Vec<AttachmentView>,
    pub snapshots: Vec<SnapshotView>,
    /// For a clone: the snapshot it reads through where it has not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<super::clones::ParentView>,
    /// Clones that read through one of this volume's snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<super::clones::CloneView>,
    pub dek: DekInfo,
}

/// What the capability handed out with an attach must say; the API signs it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CapabilityClaims {
    pub volume: u64,
    pub generation: u64,
    /// Rights bits (1 read, 2 write, 4 admin).
    pub rights: u8,
    pub nodes: Vec<u64>,
    pub ttl_secs: u64,
    /// The volume's size in blocks (bounds the segments a node may be told to hold).
    #[serde(default = "unbounded")]
    pub size_blocks: u64,
    /// The volume's segment count.
    #[serde(default = "unbounded")]
    pub segments: u64,
}

fn unbounded() -> u64 {
    u64::MAX
}

impl CapabilityClaims {
    /// The scope of volume `v` (size and segments) filled in.
    pub fn scoped_to(mut self, size_bytes: u64, segments: usize) -> Self {
        self.size_blocks = size_bytes / slate_protocol::BLOCK_SIZE_BYTES_U64;
        self.segments = segments as u64;
        self
    }
}

/// The committed part of an attach (the API adds the signed capability and the key).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AttachGrant {
    pub attachment: AttachmentView,
    pub volume: VolumeView,
    pub claims: CapabilityClaims,
    /// For a clone: how to read its parent (see `clones.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<super::clones::ParentGrant>,
}

/// A reconfiguration's outcome.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ReconfigureResult {
    /// True when a replica was replaced by this call.
    pub replaced: bool,
    /// The node that took the failed replica's place.
    pub new_node: Option<u64>,
    pub segment: SegmentView,
    /// Claims for the caller's live attachment with the new node scope (signed by the API).
    pub claims: Option<CapabilityClaims>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    /// The chain's last sequence number (all tenants).
    pub last_seq: u64,
    /// Where the kept chain starts: records up to `anchor.seq` were pruned by retention.
    #[serde(default)]
    pub anchor: Option<crate::audit::AuditAnchor>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ShredReport {
    /// What was deleted, e.g. `volume:vol-7`.
    pub deleted: String,
    /// The root key epoch after the shred.
    pub root_epoch: u64,
    pub volumes_shredded: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SettingsView {
    #[serde(flatten)]
    pub settings: Settings,
    pub root_epoch: u64,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("principal", &self.principal)
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

/// One release queue entry: a replica (or layer) a node must release and zero.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ReleaseView {
    pub id: u64,
    pub node: u64,
    pub node_name: String,
    pub volume: u64,
    pub segment: u32,
    /// Set for a snapshot layer; absent for a whole replica.
    pub layer_epoch: Option<u64>,
    /// `volume_deleted`, `replica_replaced`, `replica_moved` or `snapshot_deleted`.
    pub reason: String,
    /// `pending` (not yet released by its node), `released` (extents journaled dirty,
    /// zeroing under way) or `erased` (every extent verified zero).
    pub state: String,
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
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VoterPurgeView {
    pub id: u64,
    /// The highest root epoch the voter reported purged.
    pub purged_epoch: Option<u64>,
    pub purged: bool,
    /// Still a voter (false: removed since the delete).
    pub current: bool,
}

/// A deleted volume and the progress of its erasure.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErasureView {
    pub volume: u64,
    pub name: String,
    pub tenant: u64,
    pub size_bytes: u64,
    pub deleted_ms: u64,
    pub deleted_by: String,
    /// `erasing`, `kept_for_clones` (its segments stay until its last clone is flattened or deleted) or `complete`.
    pub state: String,
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

/// One replica move of a drain.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MoveView {
    pub id: u64,
    pub volume: u64,
    pub segment: u32,
    /// The node the replica moves to.
    pub to: u64,
    pub started_ms: u64,
    pub done_blocks: u64,
    pub total_blocks: u64,
}

/// A node's drain.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DrainView {
    pub node: u64,
    pub node_name: String,
    /// `none`, `draining`, `blocked` or `complete`.
    pub state: String,
    pub started_ms: Option<u64>,
    pub completed_ms: Option<u64>,
    pub replicas_total: u64,
    pub replicas_moved: u64,
    /// Replicas still on the node.
    pub replicas_left: u64,
    pub blocked: Option<String>,
    pub moves: Vec<MoveView>,
}

/// A disk's decommission.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DecommissionView {
    pub disk: u64,
    pub disk_name: String,
    pub node: u64,
    pub state: super::types::DiskState,
    /// `none`, `queued`, `overwrite`, `verify`, `done` or `failed`.
    pub stage: String,
    pub requested_ms: Option<u64>,
    pub operator: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub failure: Option<String>,
    pub finished_ms: Option<u64>,
    pub certificate_sha256: Option<String>,
}
