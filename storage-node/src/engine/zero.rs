//! Zeroing a byte range of a disk with the cheapest primitive it offers, shared by
//! the engine's zeroer and the whole-device erase (`crate::erase`).
//!
//! - Regular file: `fallocate(FALLOC_FL_ZERO_RANGE)`; if the filesystem refuses it,
//!   `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE` followed by a plain `fallocate` of the
//!   same range (so the hole is reserved again and a later write cannot fail for space);
//!   else the caller writes zeros.
//! - Block device: `ioctl(BLKZEROOUT)` (the kernel uses the device's write-zeroes
//!   command where there is one, else writes zero pages itself); else the caller
//!   writes zeros.
//!
//! A method that fails as unsupported is not tried again on that disk. Nothing here
//! syncs: callers fdatasync and then verify by reading the range back.
//!
//! The only `unsafe` is the `BLKZEROOUT` ioctl: libc's `ioctl` with a pointer to a
//! live two-element `u64` array on the stack, which the kernel only reads.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// `_IO(0x12, 127)`: zero a byte range of a block device (`u64 [start, len]`).
const BLKZEROOUT: u64 = 0x127f;

/// How a range was (or is to be) zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroMethod {
    /// `fallocate(FALLOC_FL_ZERO_RANGE)` on a regular file.
    ZeroRange,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`, then re-reserved.
    PunchHole,
    /// `ioctl(BLKZEROOUT)` on a block device.
    Blkzeroout,
    /// Zeros written by the caller.
    Overwrite,
}

impl ZeroMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::ZeroRange => "zero-range",
            Self::PunchHole => "punch-hole",
            Self::Blkzeroout => "blkzeroout",
            Self::Overwrite => "overwrite",
        }
    }
}

/// Per-disk zeroing state: which primitive to try first, and whether it is cheap.
#[derive(Debug, Clone)]
pub struct Zeroing {
    is_block: bool,
    next: ZeroMethod,
    /// Block devices: the device advertises a write-zeroes command (sysfs
    /// `queue/write_zeroes_max_bytes` > 0), so BLKZEROOUT moves no data over the bus.
    device_offload: bool,
}

impl Zeroing {
    /// Chooses the primitives for `file` (a regular file or a block device). With
    /// `writes_only` every range is written with zeros (the caller's fallback).
    pub fn for_file(file: &File, writes_only: bool) -> io::Result<Self> {
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        let (next, device_offload) = if writes_only {
            (ZeroMethod::Overwrite, false)
        } else if is_block {
            (ZeroMethod::Blkzeroout, write_zeroes_offloaded(meta.rdev()))
        } else {
            (ZeroMethod::ZeroRange, false)
        };
        Ok(Self { is_block, next, device_offload })
    }

    pub fn is_block(&self) -> bool {
        self.is_block
    }

    /// The primitive the next [`Self::zero`] will try first.
    pub fn method(&self) -> ZeroMethod {
        self.next
    }

    /// True when the next zeroing costs the device far less than writing the range:
    /// a filesystem range operation, or a block device's own write-zeroes command.
    pub fn is_cheap(&self) -> bool {
        match self.next {
            ZeroMethod::ZeroRange | ZeroMethod::PunchHole => true,
            ZeroMethod::Blkzeroout => self.device_offload,
            ZeroMethod::Overwrite => false,
        }
    }

    /// Zeroes `len` bytes at `offset` with the best primitive not yet found unsupported.
    /// Returns the method used; [`ZeroMethod::Overwrite`] means nothing was done and the
    /// caller must write zeros itself. Errors other than "unsupported" are returned.
    pub fn zero(&mut self, file: &File, offset: u64, len: u64) -> io::Result<ZeroMethod> {
        use rustix::fs::{fallocate, FallocateFlags};
        loop {
            let res = match self.next {
                ZeroMethod::ZeroRange => {
                    fallocate(file, FallocateFlags::ZERO_RANGE, offset, len).map_err(io::Error::from)
                }
                ZeroMethod::PunchHole => {
                    fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)
                        .map_err(io::Error::from)?;
                    // Reserve the blocks again: the disk file stays fully allocated.
                    match fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            tracing::warn!(error = %e, "re-reserving a punched range failed; writing zeros instead");
                            return Ok(ZeroMethod::Overwrite);
                        }
                    }
                }
                ZeroMethod::Blkzeroout => blkzeroout(file, offset, len),
                ZeroMethod::Overwrite => return Ok(ZeroMethod::Overwrite),
            };
            match res {
                Ok(()) => return Ok(self.next),
                Err(e) if unsupported(&e) => {
                    let fallback = match self.next {
                        ZeroMethod::ZeroRange => ZeroMethod::PunchHole,
                        _ => ZeroMethod::Overwrite,
                    };
                    tracing::info!(method = self.next.name(), error = %e, fallback = fallback.name(), "zeroing primitive unsupported");
                    self.next = fallback;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Errors that mean "this primitive is not available here", not "the disk failed".
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS | libc::EINVAL | libc::ENODEV))
}

fn blkzeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads a `u64[2]` (start, length) through the pointer; `range` is
    // a live, properly aligned stack array for the whole call and the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT as libc::Ioctl, range.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the block device `rdev` (or, for a partition, its disk) advertises write-zeroes.
fn write_zeroes_offloaded(rdev: u64) -> bool {
    let base = format!("/sys/dev/block/{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    ["queue/write_zeroes_max_bytes", "../queue/write_zeroes_max_bytes"].iter().any(|rel| {
        std::fs::read_to_string(format!("{base}/{rel}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    })
}
