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

/// What slate-meta asks a node to do, returned with every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeWork {
    /// Releases that are not yet verified zero, oldest first.
    #[serde(default)]
    pub releases: Vec<ReleaseTask>,
}

/// A heartbeat's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub node: u64,
    /// The node's state as slate-meta records it (`active`, `draining`, ...).
    pub state: String,
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

/// Most extents one release report may name (a 16 GiB segment of 4 MiB extents
/// has 4096, times a few snapshot layers).
pub const MAX_REPORTED_EXTENTS: usize = 1 << 16;
