//! Storage nodes and their disks: registration, state, drains and decommissions.

use crate::ops::ScrubReport;
use serde::{Deserialize, Serialize};

/// A storage node's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

impl NodeState {
    /// Every state, in order.
    pub const ALL: [Self; 4] = [Self::Active, Self::Draining, Self::Decommissioned, Self::Down];
}

wire_names!(NodeState { Active => "active", Draining => "draining", Decommissioned => "decommissioned", Down => "down" });

/// A disk's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    #[default]
    Active,
    /// Being overwritten and verified by its node.
    Decommissioning,
    /// Erased, verified and certified; never used again.
    Decommissioned,
}

wire_names!(DiskState { Active => "active", Decommissioning => "decommissioning", Decommissioned => "decommissioned" });

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// 1-63 characters.
    pub name: String,
    /// From 1 MiB to 1 PiB.
    pub capacity_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterNodeRequest {
    /// The node id to use: must equal the id in the storage node's own configuration (it is what
    /// capabilities name). Default: the next free id.
    #[serde(default)]
    pub id: Option<u64>,
    /// Unique node name.
    pub name: String,
    /// Data-plane address, `ip:port`.
    pub addr: String,
    /// `zone/rack/host`.
    pub failure_domain: String,
    /// 1 to 64 disks.
    pub disks: Vec<DiskSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetNodeStateRequest {
    /// `active`, `draining` or `decommissioned` (`down` is set by liveness only).
    pub state: NodeState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskView {
    pub id: u64,
    pub node: u64,
    /// The node's name.
    pub node_name: String,
    pub name: String,
    pub capacity_bytes: u64,
    pub state: DiskState,
    /// Decommission progress (`none` if never asked).
    pub decommission_stage: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub scrub: Option<ScrubReport>,
    /// The last scrub an operator asked for (0: none).
    pub scrub_requested: u64,
    /// The last report of an operator-requested scrub.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub scrub_requested_report: Option<ScrubReport>,
}

/// Where a node's drain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DrainState {
    /// Never asked for.
    None,
    /// Replicas are being moved off the node.
    Draining,
    /// No progress possible right now (`DrainView::blocked` says why).
    Blocked,
    /// Every replica is off the node.
    Complete,
}

wire_names!(DrainState { None => "none", Draining => "draining", Blocked => "blocked", Complete => "complete" });

/// One replica move of a drain.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainView {
    pub node: u64,
    pub node_name: String,
    pub state: DrainState,
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
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DecommissionView {
    pub disk: u64,
    pub disk_name: String,
    pub node: u64,
    pub state: DiskState,
    /// `none`, `queued`, then as the node reports it (`overwrite`, `verify`), then `done` or
    /// `failed`.
    pub stage: String,
    pub requested_ms: Option<u64>,
    pub operator: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub failure: Option<String>,
    pub finished_ms: Option<u64>,
    pub certificate_sha256: Option<String>,
}
