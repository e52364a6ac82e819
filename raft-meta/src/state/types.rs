//! The entities of the replicated state, as stored.
//!
//! Everything is kept in `BTreeMap`s keyed by id so that serialization (state
//! files, Raft snapshots) is byte-identical on every replica. Ids come from
//! per-kind counters in the state and are never reused. Secrets appear only in
//! wrapped form ([`WrappedKey`]) or as SHA-256 hashes (token secrets); the API
//! shows these entities through the views in `view.rs` (defined in
//! `slate_protocol::api`), never directly.

use crate::keys::WrappedKey;
use crate::placement::DomainLevel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

// The enums and settings the API shows as they are stored: pure data, defined once with
// the API's other types.
pub use slate_protocol::api::{
    Access, AttachMode, DiskState, NodeState, Qos, ReplicaState, Role, Settings, SnapshotState,
    DEFAULT_AUDIT_MAX_AGE_MS, DEFAULT_AUDIT_MAX_RECORDS,
};

/// A live attachment of a volume, as stored and as shown.
pub type Attachment = slate_protocol::api::AttachmentView;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: u64,
    pub name: String,
    pub created_ms: u64,
    /// The tenant key, wrapped under the root key at the state's `root_epoch`.
    pub wrapped_key: WrappedKey,
    /// Bumped at every rotation (explicit, or forced by a shred of one of its volumes).
    pub key_version: u64,
    pub key_created_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub id: u64,
    pub name: String,
    pub role: Role,
    /// The tenant (tenant roles always; hosts optionally; operators and nodes never).
    pub tenant: Option<u64>,
    /// The storage node a `node` principal speaks for (that role always; others never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    pub created_ms: u64,
    /// Not usable before this time (ms since the Unix epoch).
    pub not_before_ms: Option<u64>,
    /// Not usable from this time on.
    pub not_after_ms: Option<u64>,
    /// Consecutive failed authentications.
    pub failed_auths: u32,
    /// Locked out until this time after too many failures.
    pub locked_until_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: u64,
    pub principal: u64,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_sha256: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    pub principal: u64,
    pub volume: u64,
    pub access: Access,
    pub created_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageNode {
    pub id: u64,
    pub name: String,
    /// Data-plane address (`host:port`).
    pub addr: String,
    /// `zone/rack/host`.
    pub failure_domain: String,
    pub state: NodeState,
    pub registered_ms: u64,
    pub last_heartbeat_ms: u64,
    /// Bytes of segment replicas placed on the node.
    pub allocated_bytes: u64,
    /// The node's drain, once asked for.
    #[serde(default)]
    pub drain: Option<Drain>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: u64,
    pub node: u64,
    pub name: String,
    pub capacity_bytes: u64,
    #[serde(default)]
    pub state: DiskState,
    /// The decommission of this disk, once asked for.
    #[serde(default)]
    pub decommission: Option<Decommission>,
}

/// A disk's decommission: progress as its node reports it, then the certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decommission {
    pub requested_ms: u64,
    /// The operator who asked (audit label).
    pub operator: String,
    /// `queued`, `overwrite`, `verify`, `done` or `failed`.
    pub stage: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub failure: Option<String>,
    pub finished_ms: Option<u64>,
    /// The certificate's body (canonical JSON) and its SHA-256, once done.
    pub certificate: Option<serde_json::Value>,
    pub certificate_sha256: Option<String>,
}

/// A node's drain: every replica moved elsewhere, one segment at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub started_ms: u64,
    pub operator: String,
    /// Replicas on the node when the drain started, and moved off it since.
    pub replicas_total: u64,
    pub replicas_moved: u64,
    pub completed_ms: Option<u64>,
    /// Why the drain cannot make progress right now (no node in a suitable domain, ...).
    pub blocked: Option<String>,
}

/// One replica being moved by a drain: `to` was added to the segment as
/// rebuilding; when it is in sync, `from` leaves the set and is released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub id: u64,
    pub volume: u64,
    pub segment: u32,
    pub from: u64,
    pub to: u64,
    pub started_ms: u64,
    /// Progress of the copy onto `to`, as last reported (by the mover or the client).
    pub done_blocks: u64,
    pub total_blocks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Replica {
    pub node: u64,
    pub state: ReplicaState,
    /// While rebuilding: blocks copied so far and blocks to copy, as last reported.
    #[serde(default)]
    pub rebuild_done_blocks: u64,
    #[serde(default)]
    pub rebuild_total_blocks: u64,
}

impl Replica {
    /// A replica in `state` with no rebuild progress.
    pub fn new(node: u64, state: ReplicaState) -> Self {
        Self { node, state, rebuild_done_blocks: 0, rebuild_total_blocks: 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub index: u32,
    /// Replica-set version: bumped every time the set changes.
    pub epoch: u64,
    pub replicas: Vec<Replica>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    /// The data-plane layer epoch the snapshot froze.
    pub epoch: u64,
    pub created_ms: u64,
    /// `pending` until every replica is frozen at `epoch` (by the read-write client, which
    /// quiesces its writes for the moment, or by the nodes themselves for a detached volume).
    #[serde(default)]
    pub state: SnapshotState,
    /// Nodes that froze the volume at `epoch` themselves (detached volume).
    #[serde(default)]
    pub frozen_nodes: std::collections::BTreeSet<u64>,
    #[serde(default)]
    pub ready_ms: Option<u64>,
    /// The volume's size when the snapshot was taken (0: recorded before sizes were).
    #[serde(default)]
    pub size_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: u64,
    pub tenant: u64,
    pub name: String,
    pub size_bytes: u64,
    pub segment_blocks: u64,
    pub replicas: u8,
    pub level: DomainLevel,
    pub qos: Qos,
    pub created_ms: u64,
    /// Bumped at every read-write attach; storage nodes refuse older ones.
    pub generation: u64,
    pub segments: Vec<Segment>,
    pub attachments: BTreeMap<u64, Attachment>,
    pub snapshots: BTreeMap<u64, Snapshot>,
    /// The last snapshot layer epoch handed out.
    pub snapshot_epoch: u64,
    /// The DEK wrapped under the tenant key at `Tenant::key_version`.
    pub wrapped_dek: WrappedKey,
    pub dek_created_ms: u64,
    pub dek_wrapped_ms: u64,
    /// For a clone: the snapshot it reads through where it has not written (see `clones.rs`).
    #[serde(default)]
    pub parent: Option<CloneParent>,
}

/// A clone's parent: a ready snapshot of another volume, shared (blocks and key) until
/// the clone writes over it or is flattened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloneParent {
    /// The parent volume (live, or deleted and kept in `MetaState::retained` for its clones).
    pub volume: u64,
    /// The parent's snapshot: its id, its name and the layer epoch the clone reads at.
    pub snapshot: u64,
    pub snapshot_name: String,
    pub epoch: u64,
}

/// One entry of the durable release queue: a segment replica (or one snapshot layer of it)
/// that a storage node must release into its zeroer, and whose zeroing it must confirm.
/// Entries stay after they are erased: they are the per-replica proof of an erasure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: u64,
    pub node: u64,
    pub volume: u64,
    pub tenant: u64,
    pub segment: u32,
    /// `None`: the whole segment replica; `Some(e)`: the snapshot layer of epoch `e`.
    pub layer_epoch: Option<u64>,
    pub reason: slate_protocol::ops::ReleaseReason,
    pub queued_ms: u64,
    /// When the node reported the extents journaled dirty.
    pub released_ms: Option<u64>,
    /// The extents the node released.
    pub extents: Vec<u32>,
    /// When the node reported every released extent verified zero.
    pub erased_ms: Option<u64>,
    pub verified_extents: u64,
    /// Extents that failed verification repeatedly and were retired by the node.
    pub failed_extents: u64,
}

impl Release {
    /// The entry is still owed work by its node.
    pub fn outstanding(&self) -> bool {
        self.erased_ms.is_none()
    }
}

/// A deleted volume, kept as the record of its erasure: complete only when every
/// release of the volume is verified zero and every metadata voter purged its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    pub volume: u64,
    pub name: String,
    pub tenant: u64,
    pub size_bytes: u64,
    pub deleted_ms: u64,
    /// The actor that deleted it (audit label).
    pub deleted_by: String,
    /// The root key epoch the delete ratcheted to: a metadata voter has purged the
    /// volume's wrapped key (log, snapshots, root key file) once it reports this epoch.
    pub root_epoch: u64,
    /// Metadata voters when the volume was deleted.
    pub voters: Vec<u64>,
    pub completed_ms: Option<u64>,
}

/// A node's scrub: the last one asked for and the last progress reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// The last scrub an operator asked for (0: none; background scrubs run anyway).
    pub requested: u64,
    #[serde(default)]
    pub report: Option<slate_protocol::ops::ScrubReport>,
    #[serde(default)]
    pub reported_ms: u64,
    /// The last report of an operator-requested pass (a background pass does not replace it).
    #[serde(default)]
    pub requested_report: Option<slate_protocol::ops::ScrubReport>,
}
