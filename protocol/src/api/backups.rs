//! Backups of snapshots and restores (design/backups.md). The backup record is
//! the metadata service's state and its view at once: it holds nothing secret.

use super::VolumeView;
use serde::{Deserialize, Serialize};

/// Where a backup is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BackupState {
    /// Begun: the CLI is sending data (or was killed and will resume).
    Creating,
    /// Every object and the signed manifest are in the target.
    Complete,
}

wire_names!(BackupState { Creating => "creating", Complete => "complete" });

/// The record of one backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Backup {
    pub id: u64,
    pub volume: u64,
    pub volume_name: String,
    pub tenant: u64,
    pub snapshot: u64,
    pub snapshot_name: String,
    pub epoch: u64,
    /// `file:///dir` or `s3://bucket/prefix` (no credentials).
    pub target: String,
    /// The backup this one is an increment of.
    pub parent: Option<u64>,
    /// The parent's snapshot epoch (the base of the block difference).
    pub parent_epoch: Option<u64>,
    pub state: BackupState,
    pub created_ms: u64,
    pub completed_ms: Option<u64>,
    /// SHA-256 of the volume key.
    pub key_fingerprint: String,
    pub manifest_sha256: Option<String>,
    pub blocks_changed: u64,
    pub blocks_stored: u64,
    pub bytes_stored: u64,
}

/// A restore in progress into a volume (so that a killed restore resumes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Restore {
    pub volume: u64,
    pub backup: u64,
    /// Manifests of the chain fully applied, oldest first.
    pub done_manifests: u64,
    /// Objects of the next manifest applied.
    pub done_chunks: u64,
    pub started_ms: u64,
}

/// Begins (or resumes) a backup of a ready snapshot to a target.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BeginBackupRequest {
    /// The snapshot's id.
    pub snapshot: u64,
    /// `file:///DIR` or `s3://BUCKET[/PREFIX]`.
    pub target: String,
    /// For an incremental: the complete backup (of an older snapshot of the same volume) it builds on.
    #[serde(default)]
    pub parent: Option<u64>,
}

/// Completes a backup: its manifest (checked and signed by the API) is in the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CompleteBackupRequest {
    pub manifest_sha256: String,
    pub blocks_changed: u64,
    pub blocks_stored: u64,
    pub bytes_stored: u64,
}

/// A completed backup: its record and the signed manifest to store in the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompletedBackup {
    pub backup: Backup,
    /// SHA-256 of the manifest's canonical body.
    pub sha256: String,
    /// The signed manifest file.
    pub text: String,
}

/// Creates a volume to restore a backup into.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestoreVolumeRequest {
    pub backup: u64,
    pub name: String,
    /// The volume's size (at least the backed-up volume's).
    pub size_bytes: u64,
    /// Default: the source volume's tenant.
    #[serde(default)]
    pub tenant: Option<u64>,
    /// Default: the source volume's replication factor.
    #[serde(default)]
    pub replicas: Option<u8>,
}

/// The volume a restore writes into, how far the restore got, and the backed-up volume's
/// key to decrypt the backup with (128 hex digits; keep it in memory only). `Debug` leaves
/// the key out.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreReply {
    #[serde(flatten)]
    pub volume: VolumeView,
    pub restore: Restore,
    pub source_dek_hex: String,
}

impl std::fmt::Debug for RestoreReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreReply")
            .field("volume", &self.volume.id)
            .field("restore", &self.restore)
            .finish_non_exhaustive()
    }
}

/// How far a restore got, so that a killed one resumes there.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestoreProgressRequest {
    pub done_manifests: u64,
    pub done_chunks: u64,
    /// Every block is written: the volume is a normal volume from now on.
    #[serde(default)]
    pub finished: bool,
}
