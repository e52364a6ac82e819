//! File modes for everything that holds secrets or tenant data: directories are
//! created 0700 and files 0600 explicitly, whatever the umask.
//!
//! The one exception is the Raft log: raft-engine creates its own files, so
//! [`restrict_umask`] makes the process umask 077 before it opens, and its
//! directory is created 0700 here first.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Creates `dir` and any missing parents with mode 0700 (existing ones are left as they are).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Opens `path` for writing (created 0600, truncated).
pub fn create_private_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// Writes `bytes` to `path`, creating it 0600 (an existing file keeps its mode).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    create_private_file(path)?.write_all(bytes)
}

/// Sets the process umask to 077, for files that libraries create on their own
/// (raft-engine's log files): they can then have no group or other bits.
pub fn restrict_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}
