//! The volume engine's one public error type.

use crate::blockdev::DevError;

/// Why a volume operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// A newer attachment of the volume exists: a storage node refused this
    /// attachment's generation. Fatal: every later request fails with it and
    /// nothing is retried on other replicas.
    #[error("fenced: the volume was attached elsewhere under a newer generation")]
    Fenced,
    /// The storage nodes refuse this attachment's capability (expired,
    /// forged, wrong volume or rights). Fatal like `Fenced`.
    #[error("access denied by the storage nodes: {0}")]
    Denied(String),
    /// The request is outside the volume or not block aligned.
    #[error("request out of range or not block aligned")]
    OutOfRange,
    /// No replica could serve or store the blocks.
    #[error("I/O error: {0}")]
    Io(String),
    /// The attachment is read-only.
    #[error("the volume is attached read-only")]
    ReadOnly,
    /// The attach information does not describe a usable volume.
    #[error("invalid attach information: {0}")]
    Layout(String),
    /// The volume has been closed.
    #[error("the volume is closed")]
    Closed,
}

impl From<VolumeError> for DevError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Fenced => DevError::Fenced,
            VolumeError::OutOfRange => DevError::OutOfRange,
            VolumeError::Closed => DevError::Shutdown,
            VolumeError::ReadOnly => DevError::ReadOnly,
            VolumeError::Denied(s) | VolumeError::Io(s) | VolumeError::Layout(s) => DevError::Io(s),
        }
    }
}
