//! Clones of snapshots (design/clones.md).

use serde::{Deserialize, Serialize};

/// A new clone of a ready snapshot (`POST /v1/volumes/{id}/clones`, `id` the parent).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateCloneRequest {
    /// The parent's snapshot, by id; it must be ready.
    pub snapshot: u64,
    /// The clone's name: 1-63 characters of letters, digits, '.', '_' or '-'; unique within its tenant.
    pub name: String,
    /// The clone's tenant (default: the parent's).
    #[serde(default)]
    pub tenant: Option<u64>,
    /// The clone's size: a multiple of 4096, at least the snapshot's (the default).
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

/// The clone's client copied every block it read from its parent (`POST /v1/volumes/{id}/flattened`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FlattenedRequest {
    /// The clone's read-write attachment that did the copy.
    pub attachment: u64,
}

/// A clone's parent, as `slate volume show` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ParentView {
    pub volume: u64,
    pub volume_name: String,
    /// The parent was deleted; its segments stay until its last clone is flattened or deleted.
    pub deleted: bool,
    pub snapshot: u64,
    pub snapshot_name: String,
    /// The layer epoch the clone reads the parent at.
    pub epoch: u64,
    /// The parent's size at the snapshot: blocks past it read as zeros unless the clone wrote them.
    pub size_bytes: u64,
}

/// A clone reading through one of a volume's snapshots.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CloneView {
    pub volume: u64,
    pub name: String,
    pub snapshot: u64,
    pub snapshot_name: String,
}
