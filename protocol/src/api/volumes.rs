//! Volumes, their segment maps and their snapshots.

use super::{AttachmentView, CloneView, NodeState, ParentView};
use serde::{Deserialize, Serialize};

/// The level of the failure-domain path (`zone/rack/host`) at which replicas must be distinct.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DomainLevel {
    Zone,
    Rack,
    #[default]
    Host,
}

wire_names!(DomainLevel { Zone => "zone", Rack => "rack", Host => "host" });

impl DomainLevel {
    /// How many parts of a failure-domain path the level takes.
    pub fn depth(self) -> usize {
        match self {
            Self::Zone => 1,
            Self::Rack => 2,
            Self::Host => 3,
        }
    }
}

/// QoS limits of a volume (absent: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Qos {
    /// I/O operations per second.
    #[serde(default)]
    pub iops_limit: Option<u64>,
    /// Megabytes (10^6 bytes) per second.
    #[serde(default)]
    pub mbps_limit: Option<u64>,
}

/// A replica's state within its segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Holds every acknowledged write: serves reads, receives writes.
    #[default]
    InSync,
    /// Freshly placed; receives new writes while a background copy fills it; serves no reads.
    Rebuilding,
}

wire_names!(ReplicaState { InSync => "in_sync", Rebuilding => "rebuilding" });

/// Whether a snapshot can be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// Recorded; not every replica is frozen yet.
    Pending,
    /// Frozen on every replica at its epoch: crash-consistent and readable.
    #[default]
    Ready,
}

wire_names!(SnapshotState { Pending => "pending", Ready => "ready" });

/// A volume's state as the API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Not attached, every segment with R in-sync replicas.
    Available,
    /// Attached, every segment with R in-sync replicas.
    Attached,
    /// Some segment has fewer than R in-sync replicas.
    Degraded,
}

wire_names!(VolumeState { Available => "available", Attached => "attached", Degraded => "degraded" });

/// A new volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// 1-63 characters of letters, digits, '.', '_' or '-'; unique within the tenant.
    pub name: String,
    /// Multiple of 4096, from 1 MiB to 16 TiB.
    pub size_bytes: u64,
    /// Replication factor R, 2 to 5.
    pub replicas: u8,
    /// Owning tenant; defaults to the caller's tenant (required for operators).
    #[serde(default)]
    pub tenant: Option<u64>,
    #[serde(default)]
    pub qos: Qos,
    /// Failure-domain level for this volume's replicas (default: the cluster setting).
    #[serde(default)]
    pub failure_domain_level: Option<DomainLevel>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResizeVolumeRequest {
    /// New size: a multiple of 4096, not smaller than the current size, at most 16 TiB.
    pub size_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SegmentView {
    pub index: u32,
    /// Replica-set version: bumped every time the set changes.
    pub epoch: u64,
    pub first_block: u64,
    pub blocks: u64,
    pub replicas: Vec<ReplicaView>,
}

/// The volume key's age (never the key).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DekInfo {
    pub created_ms: u64,
    /// Age at the time of the call.
    pub age_secs: u64,
    /// Last time the key was re-wrapped (tenant key rotation or shred of a sibling).
    pub wrapped_ms: u64,
    pub tenant_key_version: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeView {
    pub id: u64,
    pub name: String,
    pub tenant: u64,
    pub size_bytes: u64,
    pub block_size: u64,
    pub replicas: u8,
    pub failure_domain_level: DomainLevel,
    pub qos: Qos,
    pub state: VolumeState,
    pub generation: u64,
    pub segment_blocks: u64,
    pub segments: Vec<SegmentView>,
    pub attachments: Vec<AttachmentView>,
    pub snapshots: Vec<SnapshotView>,
    /// For a clone: the snapshot it reads through where it has not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentView>,
    /// Clones that read through one of this volume's snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<CloneView>,
    pub dek: DekInfo,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// 1-63 characters; unique within the volume.
    pub name: String,
}

/// A snapshot is frozen: by a node on its replicas (`node` set), or by the read-write
/// client on every replica of the volume (`node` absent).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SnapshotFrozenRequest {
    #[serde(default)]
    pub node: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotView {
    pub id: u64,
    pub volume: u64,
    pub name: String,
    pub epoch: u64,
    pub created_ms: u64,
    /// `pending` until every replica is frozen at `epoch`, then `ready`.
    pub state: SnapshotState,
    pub ready_ms: Option<u64>,
}
