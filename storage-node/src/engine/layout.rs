//! On-disk layout: superblock, geometry and page framing (work in progress).

use super::{EngineError, FormatOptions};
use std::path::Path;

/// Default extent size: 4 MiB.
pub const DEFAULT_EXTENT_SIZE_BYTES: u64 = 4 << 20;
/// Default journal size: 64 MiB.
pub const DEFAULT_JOURNAL_BYTES: u64 = 64 << 20;

/// What `format` laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatReport {
    pub capacity_bytes: u64,
    pub extent_size_bytes: u64,
    pub extent_count: u64,
    pub data_start_bytes: u64,
}

pub fn format(_path: &Path, _opts: &FormatOptions) -> Result<FormatReport, EngineError> {
    Err(EngineError::Format("not implemented yet".into()))
}
