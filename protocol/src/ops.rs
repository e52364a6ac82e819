//! Operator work between slate-meta and the storage nodes, as JSON on the
//! management API: what a node must do (its share of the durable release
//! queue, and later disk erasure and scrubs) and what it reports back.
//!
//! A node asks for its work with its heartbeat and answers each task with a
//! report. Both sides use these types, so a field added here is added for
//! both. Nothing here carries a secret.

use serde::{Deserialize, Serialize};

/// Why a segment replica (or one of its layers) is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The volume was deleted (its key shredded).
    VolumeDeleted,
    /// The replica was replaced after its node was reported failed or went down.
    ReplicaReplaced,
    /// The replica was moved away by a drain.
    ReplicaMoved,
    /// A snapshot was deleted: its layer is folded away.
    SnapshotDeleted,
}

wire_names!(ReleaseReason {
    VolumeDeleted => "volume_deleted",
    ReplicaReplaced => "replica_replaced",
    ReplicaMoved => "replica_moved",
    SnapshotDeleted => "snapshot_deleted",
});

/// One entry of the release queue, as a node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseTask {
    /// The queue entry's id (what the report names).
    pub id: u64,
    pub volume: u64,
    pub segment: u32,
    /// `None`: the whole segment replica; `Some(e)`: only the snapshot layer of epoch `e`.
    #[serde(default)]
    pub layer_epoch: Option<u64>,
    pub reason: ReleaseReason,
    /// True once the node reported the extents journaled as dirty: only the
    /// verification is outstanding.
    #[serde(default)]
    pub released: bool,
    /// The extents the node released (known once `released`), whose zeroing it must confirm.
    #[serde(default)]
    pub extents: Vec<u32>,
}

/// A drain's copy of one segment replica onto this node (the target), from a
/// source node, for a volume that no client has attached read-write. The copy
/// carries the volume's generation: a client that attaches meanwhile bumps it,
/// the nodes then refuse the mover's writes, and the client's own rebuild takes over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyTask {
    /// The move's id (what the report names).
    pub id: u64,
    pub volume: u64,
    pub segment: u32,
    /// Blocks per segment of the volume (for the assignment).
    pub segment_blocks: u64,
    /// First block of the segment in the volume, and its length in blocks.
    pub first_block: u64,
    pub blocks: u64,
    pub generation: u64,
    pub source_node: u64,
    pub source_addr: String,
    /// A capability for the volume on the source and this node (filled in by the API).
    #[serde(default)]
    pub capability: String,
}

/// A disk to overwrite, verify and retire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecommissionTask {
    pub disk: u64,
    pub disk_name: String,
}

/// Freeze a detached volume's segments on this node at a snapshot's epoch
/// (`Request::Snapshot` semantics), then report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeTask {
    pub volume: u64,
    pub snapshot: u64,
    pub epoch: u64,
}

/// A scrub to run now on this node (requested by an operator).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubRequest {
    /// Increases with every request: a node runs a scrub for each new id once.
    pub id: u64,
}

/// What slate-meta asks a node to do, returned with every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeWork {
    /// Releases that are not yet verified zero, oldest first.
    #[serde(default)]
    pub releases: Vec<ReleaseTask>,
    /// Drain copies onto this node.
    #[serde(default)]
    pub copies: Vec<CopyTask>,
    #[serde(default)]
    pub decommission: Option<DecommissionTask>,
    #[serde(default)]
    pub scrub: Option<ScrubRequest>,
    /// Snapshots of detached volumes to freeze here.
    #[serde(default)]
    pub freezes: Vec<FreezeTask>,
    /// Generations the node must refuse below, per volume: set when a grant revocation
    /// ended a live read-write attachment, so its sessions stop at their next request.
    #[serde(default)]
    pub fences: Vec<VolumeFence>,
}

/// Refuse every request of `volume` below `generation` (raise the node's generation table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFence {
    pub volume: u64,
    pub generation: u64,
}

/// A heartbeat's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub node: u64,
    /// The node's state as slate-meta records it.
    pub state: crate::api::NodeState,
    #[serde(default)]
    pub work: NodeWork,
}

/// A node's report on one release task: `POST /v1/nodes/{node}/releases/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReleaseReport {
    /// The extents are journaled dirty on the node: no read can reach them any more
    /// and the zeroer owns them.
    Released { extents: Vec<u32> },
    /// Every released extent was overwritten with zeros and read back as zeros
    /// (`verified`), except `failed` extents that failed verification repeatedly
    /// and were retired (never allocated again).
    Erased { verified: u64, failed: u64 },
}

/// A mover's report on one copy: `POST /v1/nodes/{node}/moves/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case", deny_unknown_fields)]
pub enum MoveReport {
    Progress {
        done_blocks: u64,
        total_blocks: u64,
    },
    /// Every written block of the source is on this node, under `generation`.
    Copied {
        blocks_copied: u64,
        generation: u64,
    },
    /// The copy stopped (e.g. a client attached and fenced it); slate-meta decides what next.
    Failed {
        message: String,
    },
}

/// How a disk was erased and verified, as the node measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EraseSummary {
    pub device_path: String,
    /// `file` or `block_device`.
    pub device_kind: String,
    pub size_bytes: u64,
    /// Identity of the device: serial, model, major:minor, inode, backing file, ...
    pub identity: std::collections::BTreeMap<String, String>,
    /// `zero-range`, `blkzeroout` or `overwrite`.
    pub method: String,
    pub technique: String,
    pub bytes_written: u64,
    pub bytes_verified: u64,
    pub mismatched_bytes: u64,
    #[serde(default)]
    pub first_mismatch_offset: Option<u64>,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub tool: String,
    pub tool_version: String,
}

/// A node's report on a decommission: `POST /v1/disks/{disk}/decommission-report`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case", deny_unknown_fields)]
pub enum DecommissionReport {
    /// `stage` is `overwrite` or `verify`.
    Progress {
        stage: String,
        bytes_done: u64,
        bytes_total: u64,
    },
    Done {
        erase: EraseSummary,
    },
    Failed {
        message: String,
    },
}

/// A node's scrub progress: `POST /v1/nodes/{node}/scrub-report`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubReport {
    /// The operator request this pass answers (0: a background pass).
    pub scrub_id: u64,
    pub running: bool,
    pub started_ms: u64,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    pub segments_done: u64,
    pub segments_total: u64,
    pub blocks_checked: u64,
    /// Blocks whose stored crc32c did not match their data.
    pub corrupt_found: u64,
    /// Of those, rewritten from a peer replica's good copy.
    pub repaired: u64,
    /// Of those, not repairable now (no good copy reachable); retried next pass.
    pub unrepaired: u64,
}

/// A node asks where a good copy of a segment is: `POST /v1/nodes/{node}/repair-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepairSourceRequest {
    pub volume: u64,
    pub segment: u32,
}

/// Another member of a segment's replica set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReplica {
    pub node: u64,
    pub addr: String,
}

/// Where to read good copies of a segment's blocks, with a read capability for them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairSource {
    pub volume: u64,
    pub segment: u32,
    pub generation: u64,
    /// In-sync members other than the asking node.
    pub peers: Vec<PeerReplica>,
    /// Read capability for `peers` (filled in by the API).
    #[serde(default)]
    pub capability: String,
}

/// Most extents one release report may name (a 16 GiB segment of 4 MiB extents
/// has 4096, times a few snapshot layers).
pub const MAX_REPORTED_EXTENTS: usize = 1 << 16;

/// What storage nodes and hosts may report to `POST /v1/security-events`.
pub mod security_kind {
    /// A hello's capability did not verify (bad signature, or unparseable).
    pub const FORGED_CAPABILITY: &str = "forged-capability";
    /// A hello's capability is past its expiry or before its not-before time.
    pub const EXPIRED_CAPABILITY: &str = "expired-capability";
    /// A capability presented on a TLS session with another certificate than its holder's.
    pub const CAPABILITY_KEY_MISMATCH: &str = "capability-key-mismatch";
    /// A data-plane client failed the TLS handshake (no certificate, or no proof of its key).
    pub const DATA_PLANE_TLS_REFUSED: &str = "data-plane-tls-refused";
    /// An NBD client failed mutual TLS (no certificate, or one the CA did not issue).
    pub const NBD_CERTIFICATE_REFUSED: &str = "nbd-certificate-refused";
    /// Every reportable kind.
    pub const REPORTABLE: [&str; 5] = [
        FORGED_CAPABILITY,
        EXPIRED_CAPABILITY,
        CAPABILITY_KEY_MISMATCH,
        DATA_PLANE_TLS_REFUSED,
        NBD_CERTIFICATE_REFUSED,
    ];
}

/// One security event a storage node or host observed (`POST /v1/security-events`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityEventReport {
    /// One of [`security_kind::REPORTABLE`].
    pub kind: String,
    /// The offending peer as the reporter saw it: `IP:port` or `IP`.
    pub source: String,
    /// A short description (at most 256 printable ASCII characters, never a secret).
    #[serde(default)]
    pub detail: String,
}
