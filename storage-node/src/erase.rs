//! Whole-device erase for decommissioning a drained disk: overwrite every byte
//! (superblocks, journal, metadata, extents, and any tail the engine never used),
//! then read every byte back and count the ones that are not zero.
//!
//! It works on a disk no engine has open: it takes the same exclusive `flock` as the
//! engine, so a running engine makes it fail with [`EraseError::InUse`] (and an engine
//! cannot open the disk while an erase runs).
//!
//! Phase 1 zeroes the device in chunks (default 64 MiB) with its own primitive where it
//! has one (BLKZEROOUT on a block device, `FALLOC_FL_ZERO_RANGE` on a file; see
//! `engine/zero.rs`), else by O_DIRECT writes of zeros, and fdatasyncs each chunk.
//! Phase 2 reads every byte back with O_DIRECT. A size that is not a multiple of 4 KiB
//! has its last partial block written and read through a buffered descriptor (synced,
//! then dropped from the page cache before it is read back).
//!
//! Resuming: the whole job is one number line of `2 * size` bytes. A resume point `r`
//! with `r <= size` means bytes `0..r` were zeroed AND synced by phase 1; `r > size`
//! means phase 1 is complete and phase 2 has read back bytes `0..r - size`. Every
//! [`EraseProgress`] carries the resume point valid at that moment (reported only after
//! the chunk's fdatasync), so a caller that persists it before returning `true` can be
//! killed at any instant and continue with that value. A resumed run reports only what
//! it did itself (`resumed_from`, `bytes_written`, `bytes_verified`, mismatches): the
//! caller keeps the earlier runs' counts (the progress records carry them).

use crate::engine::uring::{AlignedBuf, ALIGN};
use crate::engine::zero::{ZeroMethod, Zeroing};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Default bytes per chunk: one fdatasync and one progress report each.
pub const DEFAULT_CHUNK_BYTES: u64 = 64 << 20;
/// Bytes per write or read call inside a chunk.
const IO_BYTES: usize = 4 << 20;

/// Tuning of [`erase_device_with`].
#[derive(Clone, Debug)]
pub struct EraseOptions {
    /// Bytes per chunk (rounded down to 4 KiB, at least 4 KiB).
    pub chunk_bytes: u64,
    /// Write zeros even where the device has its own zeroing.
    pub overwrite_only: bool,
}

impl Default for EraseOptions {
    fn default() -> Self {
        Self { chunk_bytes: DEFAULT_CHUNK_BYTES, overwrite_only: false }
    }
}

/// Which pass an [`EraseProgress`] belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasePhase {
    Overwrite,
    Verify,
}

/// Reported after every chunk (after its fdatasync in phase 1).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EraseProgress {
    pub phase: ErasePhase,
    /// Bytes of this phase done (from offset 0, counting what earlier runs did).
    pub done_bytes: u64,
    pub size_bytes: u64,
    /// Pass this as `resume_from` to continue from here after a crash or a stop.
    pub resume_from: u64,
    /// Non-zero bytes found so far by this run's phase 2.
    pub mismatched_bytes: u64,
    pub first_mismatch_offset: Option<u64>,
}

/// What kind of device was erased.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    File,
    BlockDevice,
}

/// What identifies the erased device beyond its path.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    /// Files: the filesystem device and inode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub st_dev: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub st_ino: Option<u64>,
    /// Block devices: "major:minor", the kernel name and what sysfs says about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Loop devices: the file behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
}

/// The result of an erase, with the fields an erase certificate needs (NIST SP 800-88).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EraseReport {
    pub device: PathBuf,
    pub kind: DeviceKind,
    pub size_bytes: u64,
    pub identity: DeviceIdentity,
    /// "zero-range", "blkzeroout", "overwrite" (or e.g. "zero-range+overwrite" when the
    /// device refused its primitive part way).
    pub method: String,
    /// In words: what was done and how it was checked.
    pub technique: String,
    /// The `resume_from` this run started at (0 for a run from the start).
    pub resumed_from: u64,
    /// Bytes zeroed by this run's phase 1.
    pub bytes_written: u64,
    /// Bytes read back by this run's phase 2.
    pub bytes_verified: u64,
    /// Bytes read back that were not zero (0: verified).
    pub mismatched_bytes: u64,
    pub first_mismatch_offset: Option<u64>,
    /// Unix milliseconds.
    pub started_ms: u64,
    pub finished_ms: u64,
    pub tool: String,
    pub version: String,
}

/// Why an erase did not finish.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("{0} is in use (an engine or another erase holds it)")]
    InUse(PathBuf),
    #[error("invalid erase request: {0}")]
    Invalid(String),
    #[error("stopped by the caller; resume from {resume_from}")]
    Stopped { resume_from: u64 },
    #[error("I/O error on {path} at byte {offset}: {source}")]
    Io { path: PathBuf, offset: u64, source: io::Error },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Erases `path` with the default options. See the module docs for `resume_from`;
/// `progress` is called after every chunk and stops the erase when it returns false.
pub fn erase_device(
    path: &Path,
    resume_from: u64,
    progress: &mut dyn FnMut(&EraseProgress) -> bool,
) -> Result<EraseReport, EraseError> {
    erase_device_with(path, &EraseOptions::default(), resume_from, progress)
}

/// [`erase_device`] with explicit options.
pub fn erase_device_with(
    path: &Path,
    opts: &EraseOptions,
    resume_from: u64,
    progress: &mut dyn FnMut(&EraseProgress) -> bool,
) -> Result<EraseReport, EraseError> {
    let started_ms = now_ms();
    let io_err = |offset: u64| move |source: io::Error| EraseError::Io { path: path.to_path_buf(), offset, source };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(0))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Err(EraseError::InUse(path.to_path_buf())),
        Err(e) => return Err(io_err(0)(e.into())),
    }
    let meta = file.metadata().map_err(io_err(0))?;
    let is_block = meta.file_type().is_block_device();
    let size = if is_block {
        use std::io::Seek;
        (&file).seek(io::SeekFrom::End(0)).map_err(io_err(0))?
    } else if meta.file_type().is_file() {
        meta.len()
    } else {
        return Err(EraseError::Invalid(format!("{} is neither a regular file nor a block device", path.display())));
    };
    if resume_from > 2 * size {
        return Err(EraseError::Invalid(format!("resume point {resume_from} beyond 2 x {size} bytes")));
    }
    let identity = identify(&meta, is_block);
    let chunk = (opts.chunk_bytes / ALIGN as u64).max(1) * ALIGN as u64;
    let aligned = size / ALIGN as u64 * ALIGN as u64;
    let mut zeroing = Zeroing::for_file(&file, opts.overwrite_only).map_err(io_err(0))?;
    let mut methods: Vec<ZeroMethod> = Vec::new();
    let zero_buf = AlignedBuf::zeroed(IO_BYTES);
    let mut read_buf = AlignedBuf::zeroed(IO_BYTES);
    let mut report = EraseReport {
        device: path.to_path_buf(),
        kind: if is_block { DeviceKind::BlockDevice } else { DeviceKind::File },
        size_bytes: size,
        identity,
        method: String::new(),
        technique: String::new(),
        resumed_from: resume_from,
        bytes_written: 0,
        bytes_verified: 0,
        mismatched_bytes: 0,
        first_mismatch_offset: None,
        started_ms,
        finished_ms: 0,
        tool: "slate-node".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };

    // Phase 1: zero and sync, chunk by chunk.
    let mut pos = if resume_from >= size { size } else { resume_from / ALIGN as u64 * ALIGN as u64 };
    while pos < size {
        let end = (pos + chunk).min(size);
        let aligned_end = end.min(aligned);
        if aligned_end > pos {
            let used = zeroing.zero(&file, pos, aligned_end - pos).map_err(io_err(pos))?;
            if used == ZeroMethod::Overwrite {
                let mut at = pos;
                while at < aligned_end {
                    let n = (aligned_end - at).min(IO_BYTES as u64) as usize;
                    file.write_all_at(&zero_buf[..n], at).map_err(io_err(at))?;
                    at += n as u64;
                }
            }
            if !methods.contains(&used) {
                methods.push(used);
            }
        }
        if end > aligned_end {
            zero_tail(path, aligned_end, end).map_err(io_err(aligned_end))?;
            if !methods.contains(&ZeroMethod::Overwrite) {
                methods.push(ZeroMethod::Overwrite);
            }
        }
        file.sync_data().map_err(io_err(pos))?;
        report.bytes_written += end - pos;
        pos = end;
        let p = EraseProgress {
            phase: ErasePhase::Overwrite,
            done_bytes: pos,
            size_bytes: size,
            resume_from: pos,
            mismatched_bytes: 0,
            first_mismatch_offset: None,
        };
        if !progress(&p) {
            return Err(EraseError::Stopped { resume_from: pos });
        }
    }
    if methods.is_empty() {
        methods.push(zeroing.method());
    }

    // Phase 2: read every byte back.
    let mut pos = resume_from.saturating_sub(size) / ALIGN as u64 * ALIGN as u64;
    while pos < size {
        let end = (pos + chunk).min(size);
        let mut at = pos;
        while at < end.min(aligned) {
            let n = (end.min(aligned) - at).min(IO_BYTES as u64) as usize;
            file.read_exact_at(&mut read_buf[..n], at).map_err(io_err(at))?;
            count_nonzero(&read_buf[..n], at, &mut report);
            at += n as u64;
        }
        if end > at {
            let tail = read_tail(path, at, end).map_err(io_err(at))?;
            count_nonzero(&tail, at, &mut report);
        }
        report.bytes_verified += end - pos;
        pos = end;
        let p = EraseProgress {
            phase: ErasePhase::Verify,
            done_bytes: pos,
            size_bytes: size,
            resume_from: size + pos,
            mismatched_bytes: report.mismatched_bytes,
            first_mismatch_offset: report.first_mismatch_offset,
        };
        if !progress(&p) {
            return Err(EraseError::Stopped { resume_from: size + pos });
        }
    }
    report.method = methods.iter().map(|m| m.name()).collect::<Vec<_>>().join("+");
    report.technique = technique(&methods, chunk);
    report.finished_ms = now_ms();
    Ok(report)
}

fn count_nonzero(buf: &[u8], at: u64, report: &mut EraseReport) {
    for (i, b) in buf.iter().enumerate() {
        if *b != 0 {
            report.mismatched_bytes += 1;
            if report.first_mismatch_offset.is_none() {
                report.first_mismatch_offset = Some(at + i as u64);
            }
        }
    }
}

/// Zeroes `start..end` (less than 4 KiB at the very end of the device) with buffered I/O.
fn zero_tail(path: &Path, start: u64, end: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC).open(path)?;
    f.write_all_at(&vec![0u8; (end - start) as usize], start)?;
    f.sync_data()
}

/// Reads `start..end` back past the page cache (dropped first; the data was synced).
fn read_tail(path: &Path, start: u64, end: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let len = std::num::NonZeroU64::new(end - start);
    rustix::fs::fadvise(&f, start, len, rustix::fs::Advice::DontNeed)?;
    let mut buf = vec![0u8; (end - start) as usize];
    f.read_exact_at(&mut buf, start)?;
    Ok(buf)
}

fn technique(methods: &[ZeroMethod], chunk: u64) -> String {
    let how: Vec<&str> = methods
        .iter()
        .map(|m| match m {
            ZeroMethod::ZeroRange => "fallocate(FALLOC_FL_ZERO_RANGE) over the file",
            ZeroMethod::PunchHole => "fallocate(FALLOC_FL_PUNCH_HOLE) then re-allocation over the file",
            ZeroMethod::Blkzeroout => "ioctl(BLKZEROOUT) (the device's write-zeroes command where it has one)",
            ZeroMethod::Overwrite => "O_DIRECT writes of zeros",
        })
        .collect();
    format!(
        "Clear (NIST SP 800-88): every addressable byte set to zero by {}, in {} MiB chunks each made durable \
         with fdatasync; then every byte read back with O_DIRECT and compared with zero",
        how.join(", then "),
        chunk >> 20
    )
}

/// What identifies the device: inode for files; numbers and sysfs facts for block devices.
fn identify(meta: &std::fs::Metadata, is_block: bool) -> DeviceIdentity {
    if !is_block {
        return DeviceIdentity { st_dev: Some(meta.dev()), st_ino: Some(meta.ino()), ..DeviceIdentity::default() };
    }
    let rdev = meta.rdev();
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok();
    let read = |rel: &str| -> Option<String> {
        let base = sys.as_ref()?;
        [base.join(rel), base.join("..").join(rel)]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    DeviceIdentity {
        dev: Some(format!("{major}:{minor}")),
        name: sys.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()),
        serial: read("device/serial").or_else(|| read("serial")),
        model: read("device/model"),
        backing_file: sys
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p.join("loop/backing_file")).ok())
            .map(|s| s.trim().to_string()),
        ..DeviceIdentity::default()
    }
}
