//! What the API shows of the state: views without secrets. The views are
//! defined with the API's other types in `slate_protocol::api`, which every
//! client reads them with; what stays here passes between `apply` and the API
//! layer only (claims the API signs, the committed part of an attach).
//!
//! Wrapped keys and token hashes never leave the state through a view; the
//! one secret that leaves is the attach reply's DEK, which travels beside
//! the body (see `Response::Ok::dek_hex`), never inside a view.

use crate::audit::AuditRecord;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use slate_protocol::api::{
    AttachmentView, DecommissionView, DekInfo, DiskView, DrainState, DrainView, ErasureState, ErasureView, GrantView,
    IssuedToken, MoveView, NodeView, PrincipalView, ReleaseState, ReleaseView, ReplicaView, SegmentView, SettingsView,
    ShredReport, SnapshotView, TenantView, TokenView, VolumeState, VolumeView, VoterPurgeView,
};

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
