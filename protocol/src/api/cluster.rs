//! The metadata cluster: status, membership and settings.

use super::DomainLevel;
use serde::{Deserialize, Serialize};

/// One metadata node's view of the cluster (`GET /v1/status`: no authentication; nothing secret).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusView {
    pub node_id: u64,
    pub role: MetaRole,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// 0 when unknown.
    pub leader_id: u64,
    /// The leader's API address, when known.
    pub leader_api: Option<String>,
    pub members: Vec<MemberView>,
    pub bootstrapped: bool,
    pub root_epoch: u64,
    /// The epoch of the root key this node holds (after a shred it equals `root_epoch`
    /// once the node has ratcheted; `slate status` shows it per metadata node).
    #[serde(default)]
    pub root_key_epoch: u64,
    /// The root key generation: bumped by `slate-meta rotate-root` (fresh randomness).
    #[serde(default)]
    pub root_generation: u64,
    /// DEKs this node unwrapped for replies to calls it proposed (never for replicated ones).
    #[serde(default)]
    pub dek_unwraps: u64,
    pub snapshot_index: u64,
    pub first_log_index: u64,
    pub last_log_index: u64,
}

/// A metadata node's part in consensus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum MetaRole {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    /// The consensus loop stopped on an error.
    Failed,
}

wire_names!(MetaRole {
    Follower => "follower",
    PreCandidate => "pre-candidate",
    Candidate => "candidate",
    Leader => "leader",
    Failed => "failed",
});

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemberView {
    pub id: u64,
    pub raft_addr: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    /// Raft id of the metadata node.
    pub id: u64,
    /// Its peer address (`ip:port`); required to add.
    #[serde(default)]
    pub addr: Option<String>,
}

/// Cluster-wide settings (operator-controlled).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// the chain is anchored at the last pruned record.
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
            segment_blocks: crate::DEFAULT_SEGMENT_BLOCKS,
            audit_max_records: DEFAULT_AUDIT_MAX_RECORDS,
            audit_max_age_ms: DEFAULT_AUDIT_MAX_AGE_MS,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SettingsView {
    #[serde(flatten)]
    pub settings: Settings,
    pub root_epoch: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateSettingsRequest {
    #[serde(default)]
    pub placement_level: Option<DomainLevel>,
    /// 1 s to 1 h.
    #[serde(default)]
    pub heartbeat_timeout_ms: Option<u64>,
    /// 1 to 100.
    #[serde(default)]
    pub lockout_threshold: Option<u32>,
    /// 1 s to 1 day.
    #[serde(default)]
    pub lockout_ms: Option<u64>,
    /// 60 s to 1 day.
    #[serde(default)]
    pub capability_ttl_secs: Option<u64>,
    /// A power of two from 256 (1 MiB) to 4194304 (16 GiB).
    #[serde(default)]
    pub segment_blocks: Option<u64>,
    /// Most audit records kept, 10 to 100,000,000 (older ones are pruned, the chain anchored).
    #[serde(default)]
    pub audit_max_records: Option<u64>,
    /// Audit records older than this are pruned, 1 min to 10 years.
    #[serde(default)]
    pub audit_max_age_ms: Option<u64>,
}
