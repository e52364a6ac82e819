//! The entities of the replicated state, as stored.
//!
//! Everything is kept in `BTreeMap`s keyed by id so that serialization (state
//! files, Raft snapshots) is byte-identical on every replica. Ids come from
//! per-kind counters in the state and are never reused. Secrets appear only in
//! wrapped form ([`WrappedKey`]) or as SHA-256 hashes (token secrets); the API
//! shows these entities through the views in `view.rs`, never directly.

use crate::keys::WrappedKey;
use crate::placement::DomainLevel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// What a principal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the cluster: every action, every tenant.
    Operator,
    /// Manages one tenant: its volumes, principals, grants, keys and audit records.
    TenantAdmin,
    /// Sees its tenant's volumes; acts on volumes through grants.
    TenantMember,
    /// A hypervisor host: attaches volumes it is granted; reports security events.
    Host,
    /// One storage node (`Principal::node`): its heartbeats and reports, nothing else.
    Node,
}

/// What a grant allows on one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Attach read-write (and read-only).
    ReadWrite,
    /// Attach read-only.
    ReadOnly,
    /// Create, list and delete snapshots.
    Snapshot,
    /// Snapshot and attach read-only (to copy a snapshot out).
    Backup,
}

/// A storage node's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Takes new replicas.
    Active,
    /// Takes no new replicas; its replicas are being moved away.
    Draining,
    /// Out of service for good (holds no replicas).
    Decommissioned,
    /// Missed heartbeats for longer than the timeout; its replicas were re-placed.
    Down,
}

/// How a volume is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// Exclusive; bumps the volume's generation.
    ReadWrite,
    /// Shared; keeps the generation.
    ReadOnly,
}

/// A replica's state within its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Holds every acknowledged write.
    InSync,
    /// Freshly placed; receives new writes while a background copy fills it.
    Rebuilding,
}

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

/// A disk's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    #[default]
    Active,
    /// Being overwritten and verified by its node.
    Decommissioning,
    /// Erased, verified and certified; never used again.
    Decommissioned,
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
pub struct Attachment {
    pub id: u64,
    pub principal: u64,
    pub host: String,
    pub mode: AttachMode,
    pub generation: u64,
    pub attached_ms: u64,
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

/// Whether a snapshot can be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// Recorded; not every replica is frozen yet.
    Pending,
    /// Frozen on every replica at its epoch: crash-consistent and readable.
    #[default]
    Ready,
}

/// QoS limits of a volume (absent: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Qos {
    /// I/O operations per second.
    #[serde(default)]
    pub iops_limit: Option<u64>,
    /// Megabytes (10^6 bytes) per second.
    #[serde(default)]
    pub mbps_limit: Option<u64>,
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

/// Cluster-wide settings (operator-controlled).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Settings {
    /// Failure-domain level at which a segment's replicas must differ, for new volumes by default.
    pub placement_level: DomainLevel,
    /// A storage node silent for longer than this is marked down.
    pub heartbeat_timeout_ms: u64,
    /// Consecutive failed authentications that lock a principal out.
    pub lockout_threshold: u32,
    /// How long a lockout lasts.
    pub lockout_ms: u64,
    /// Lifetime of a capability handed out at attach.
    pub capability_ttl_secs: u64,
    /// Blocks per segment for new volumes.
    pub segment_blocks: u64,
    /// Most audit records kept in the replicated state; older ones are pruned in batches and
    /// the chain is anchored at the last pruned record (audit.rs).
    #[serde(default = "default_audit_max_records")]
    pub audit_max_records: u64,
    /// Audit records older than this (by the proposer's clock) are pruned, in batches, at most
    /// a tenth of it (capped at a day) later.
    #[serde(default = "default_audit_max_age_ms")]
    pub audit_max_age_ms: u64,
}

/// Default audit record budget: about 1 KB each, so on the order of 1 GB of state at most.
pub const DEFAULT_AUDIT_MAX_RECORDS: u64 = 1_000_000;
/// Default audit record age: 400 days (a year of records, with room for an annual review).
pub const DEFAULT_AUDIT_MAX_AGE_MS: u64 = 400 * 24 * 3600 * 1000;

fn default_audit_max_records() -> u64 {
    DEFAULT_AUDIT_MAX_RECORDS
}

fn default_audit_max_age_ms() -> u64 {
    DEFAULT_AUDIT_MAX_AGE_MS
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            placement_level: DomainLevel::Host,
            heartbeat_timeout_ms: 30_000,
            lockout_threshold: 5,
            lockout_ms: 15 * 60 * 1000,
            capability_ttl_secs: 3600,
            segment_blocks: slate_protocol::DEFAULT_SEGMENT_BLOCKS,
            audit_max_records: DEFAULT_AUDIT_MAX_RECORDS,
            audit_max_age_ms: DEFAULT_AUDIT_MAX_AGE_MS,
        }
    }
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
