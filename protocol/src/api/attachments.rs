//! Attaching a volume: the request, the reply with its signed capability and
//! key, capability refreshes and the attached client's reports (failed
//! replicas, rebuild progress, replicas back in sync).

use super::{SegmentView, VolumeView};
use serde::{Deserialize, Serialize};

/// How a volume is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// Exclusive; bumps the volume's generation.
    ReadWrite,
    /// Shared; keeps the generation.
    ReadOnly,
}

wire_names!(AttachMode { ReadWrite => "read_write", ReadOnly => "read_only" });

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub mode: AttachMode,
    /// The attaching host's name, for the record (1-128 printable characters).
    pub host: String,
    /// Take over a live read-write attachment (fences its holder).
    #[serde(default)]
    pub force: bool,
    /// The client will serve the volume over NBD on TCP without TLS (`slate attach
    /// --insecure-plaintext`): recorded in the audit chain.
    #[serde(default)]
    pub insecure_plaintext_nbd: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DetachRequest {
    pub attachment: u64,
}

/// A live attachment: the metadata service's record and its view at once (it holds nothing
/// secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttachmentView {
    pub id: u64,
    pub principal: u64,
    pub host: String,
    pub mode: AttachMode,
    pub generation: u64,
    pub attached_ms: u64,
}

/// A signed capability. `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CapabilityView {
    /// The token storage nodes verify (hex of the wire form; see `SignedCapability::from_token`).
    pub token: String,
    pub volume: u64,
    pub generation: u64,
    /// Rights bits: 1 read, 2 write, 4 admin (assign/release segments, snapshots).
    pub rights: u8,
    pub nodes: Vec<u64>,
    pub expires_unix_secs: u64,
}

impl std::fmt::Debug for CapabilityView {
    /// The token is a bearer credential for the data plane: left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapabilityView")
            .field("volume", &self.volume)
            .field("generation", &self.generation)
            .field("rights", &self.rights)
            .field("nodes", &self.nodes)
            .field("expires_unix_secs", &self.expires_unix_secs)
            .finish_non_exhaustive()
    }
}

/// What an attach returns. `Debug` leaves the key out.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttachReply {
    pub attachment: AttachmentView,
    /// The volume with its segment map (replica sets with node addresses).
    pub volume: VolumeView,
    pub capability: CapabilityView,
    /// The volume's AES-256-XTS key (128 hex digits), for this attachment only. Keep it in memory only.
    pub dek_hex: String,
    /// The cluster's capability verifying key (hex), as storage nodes hold it.
    pub verifying_key_hex: String,
    /// For a clone: how to read its parent's snapshot (layout, epoch, read-only capability).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentAttach>,
}

impl std::fmt::Debug for AttachReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachReply")
            .field("attachment", &self.attachment)
            .field("volume", &self.volume.id)
            .field("capability", &self.capability)
            .finish_non_exhaustive()
    }
}

/// How a clone's attachment reads its parent: the parent's layout, the snapshot
/// epoch, and a read-only capability for the parent volume (same lifetime as the
/// attachment's own, renewed with it).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ParentAttach {
    pub volume: VolumeView,
    pub snapshot: u64,
    pub snapshot_name: String,
    pub epoch: u64,
    /// The parent's size at the snapshot: the clone reads the parent no further (0 from
    /// services that did not say: the parent's current size).
    #[serde(default)]
    pub size_bytes: u64,
    pub capability: CapabilityView,
}

/// A capability refresh's reply: the fresh capability and, for a clone, its parent's.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CapabilityRefresh {
    #[serde(flatten)]
    pub capability: CapabilityView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentAttach>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportFailureRequest {
    pub segment: u32,
    /// The storage node whose replica failed.
    pub node: u64,
}

/// The outcome of a failure report, with a capability re-signed for the new node scope.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReconfigureReply {
    pub replaced: bool,
    pub new_node: Option<u64>,
    pub segment: SegmentView,
    pub capability: Option<CapabilityView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MarkInSyncRequest {
    pub segment: u32,
    pub node: u64,
}

/// A rebuild's progress, reported by the client that copies.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RebuildProgressRequest {
    pub segment: u32,
    pub node: u64,
    pub done_blocks: u64,
    pub total_blocks: u64,
}
