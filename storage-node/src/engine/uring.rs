//! The engine's only `unsafe` code: the disk file opened with O_DIRECT, 4 KiB
//! aligned buffers, and batches of reads/writes (+ one fdatasync) through
//! io_uring.
//!
//! The API is deliberately synchronous and batch-shaped: [`Disk::run`] takes a
//! slice of I/Os that *borrow* their buffers, submits them all (and, if asked,
//! an fdatasync drained behind them), and returns only when every submitted
//! entry has completed. Because no buffer can be released before `run`
//! returns, the kernel never writes into freed memory, which is what makes the
//! borrowed-buffer interface sound. One engine thread owns the `Disk`.
#![allow(unsafe_code)]

use io_uring::{opcode, squeue, types, IoUring};
use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

/// Alignment and granularity of every O_DIRECT transfer.
pub const ALIGN: usize = 4096;
const RING_ENTRIES: u32 = 256;

/// A zero-initialised heap buffer aligned to 4 KiB, length a multiple of 4 KiB.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like a Box<[u8]>); moving it
// between threads or sharing `&` references is as safe as for Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only gives `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to 4 KiB, at least 4 KiB).
    pub fn zeroed(len: usize) -> Self {
        let len = len.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(len, ALIGN).expect("aligned buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len }
    }

    /// A buffer holding a copy of `data`, zero-padded to 4 KiB.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b[..data.len()].copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("aligned buffer layout");
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// One transfer: `buf.len()` bytes at byte `offset` of the disk (both 4 KiB aligned).
#[derive(Debug)]
pub enum Io<'a> {
    Read { offset: u64, buf: &'a mut [u8] },
    Write { offset: u64, buf: &'a [u8] },
}

impl Io<'_> {
    fn offset(&self) -> u64 {
        match self {
            Io::Read { offset, .. } | Io::Write { offset, .. } => *offset,
        }
    }
    fn len(&self) -> usize {
        match self {
            Io::Read { buf, .. } => buf.len(),
            Io::Write { buf, .. } => buf.len(),
        }
    }
}

/// Per-I/O outcomes of a batch, and of its sync if one was asked for.
#[derive(Debug)]
pub struct BatchResult {
    pub ios: Vec<io::Result<()>>,
    pub sync: Option<io::Result<()>>,
}

impl BatchResult {
    /// The first error of the batch, if any.
    pub fn first_error(self) -> io::Result<()> {
        for r in self.ios {
            r?;
        }
        self.sync.unwrap_or(Ok(()))
    }
}

/// The raw disk: O_DIRECT file descriptor (exclusively locked) and its io_uring.
pub struct Disk {
    file: File,
    ring: IoUring,
    size_bytes: u64,
    pub fsyncs: u64,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk").field("size_bytes", &self.size_bytes).finish_non_exhaustive()
    }
}

/// Creates (if missing) or extends a regular file to `size_bytes`, preallocating its blocks.
pub fn preallocate(path: &Path, size_bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    if file.metadata()?.file_type().is_block_device() {
        return Ok(());
    }
    let len = i64::try_from(size_bytes).map_err(|_| io::Error::other("size too large"))?;
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        // Filesystems without fallocate: fall back to a sparse extension.
        file.set_len(size_bytes)?;
    }
    file.sync_all()
}

impl Disk {
    /// Opens `path` (regular file or block device) with O_DIRECT, locks it exclusively.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {} with O_DIRECT: {e}", path.display())))?;
        // SAFETY: plain syscall on a valid fd; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{} is in use by another engine: {e}", path.display())));
        }
        let meta = file.metadata()?;
        let size_bytes = if meta.file_type().is_block_device() {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        } else {
            meta.len()
        };
        let ring = IoUring::new(RING_ENTRIES)?;
        Ok(Self { file, ring, size_bytes, fsyncs: 0 })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Submits every I/O of `ios` (and then, if `sync`, one fdatasync drained behind
    /// them) and waits for all of them. Short transfers are resubmitted for the rest.
    pub fn run(&mut self, ios: &mut [Io<'_>], sync: bool) -> BatchResult {
        let n = ios.len();
        let mut results: Vec<Option<io::Result<()>>> = (0..n).map(|_| None).collect();
        let mut done_bytes = vec![0usize; n];
        let mut sync_result = None;
        for (i, io) in ios.iter().enumerate() {
            if io.offset() % ALIGN as u64 != 0 || io.len() % ALIGN != 0 || io.len() == 0 {
                results[i] = Some(Err(io::Error::new(io::ErrorKind::InvalidInput, "unaligned I/O")));
            } else if io.offset() + io.len() as u64 > self.size_bytes {
                results[i] = Some(Err(io::Error::new(io::ErrorKind::InvalidInput, "I/O beyond end of disk")));
            }
        }
        let fd = types::Fd(self.file.as_raw_fd());
        // Queue of (index, resubmission) still to push; index n is the sync.
        let mut to_push: std::collections::VecDeque<usize> = (0..n).filter(|&i| results[i].is_none()).collect();
        let mut sync_pending = sync;
        let mut in_flight = 0usize;
        loop {
            // Push as many as fit. The sync goes last, drained behind everything before it.
            {
                let mut sq = self.ring.submission();
                while let Some(&i) = to_push.front() {
                    let off = done_bytes[i];
                    let entry = match &mut ios[i] {
                        Io::Read { offset, buf } => {
                            let rest = &mut buf[off..];
                            opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                                .offset(*offset + off as u64)
                                .build()
                        }
                        Io::Write { offset, buf } => {
                            let rest = &buf[off..];
                            opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                                .offset(*offset + off as u64)
                                .build()
                        }
                    }
                    .user_data(i as u64);
                    // SAFETY: the entry points into a buffer borrowed by `ios` for the whole
                    // call; `run` does not return until every pushed entry has completed.
                    if unsafe { sq.push(&entry) }.is_err() {
                        break;
                    }
                    to_push.pop_front();
                    in_flight += 1;
                }
                if to_push.is_empty() && sync_pending {
                    let entry = opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .flags(squeue::Flags::IO_DRAIN)
                        .user_data(n as u64);
                    // SAFETY: fsync carries no buffer.
                    if unsafe { sq.push(&entry) }.is_ok() {
                        sync_pending = false;
                        in_flight += 1;
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Submission failed: nothing more can be completed reliably. Entries that were
                // accepted by the kernel still complete; wait for them without submitting more.
                to_push.clear();
                if sync {
                    sync_result = Some(Err(io::Error::new(e.kind(), e.to_string())));
                }
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(Err(io::Error::new(e.kind(), e.to_string())));
                }
                // Best effort drain of whatever is in flight.
                while in_flight > 0 {
                    if self.ring.submit_and_wait(1).is_err() {
                        break;
                    }
                    in_flight -= self.ring.completion().count();
                }
                break;
            }
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (ud, res) in cqes {
                in_flight -= 1;
                let i = ud as usize;
                if i == n {
                    self.fsyncs += 1;
                    sync_result = Some(if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(()) });
                    continue;
                }
                if res < 0 {
                    results[i] = Some(Err(io::Error::from_raw_os_error(-res)));
                } else if let Some(moved) = usize::try_from(res).ok().filter(|m| *m > 0) {
                    done_bytes[i] += moved;
                    if done_bytes[i] >= ios[i].len() {
                        results[i] = Some(Ok(()));
                    } else {
                        to_push.push_back(i);
                    }
                } else {
                    results[i] = Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "zero-length transfer")));
                }
            }
        }
        let ios = results.into_iter().map(|r| r.unwrap_or_else(|| Err(io::Error::other("not completed")))).collect();
        if sync && sync_result.is_none() {
            sync_result = Some(Err(io::Error::other("sync not completed")));
        }
        BatchResult { ios, sync: sync_result }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.run(&mut [Io::Read { offset, buf }], false).first_error()
    }

    /// Writes `buf` at `offset` (not synced).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.run(&mut [Io::Write { offset, buf }], false).first_error()
    }

    /// fdatasync through the ring.
    pub fn sync(&mut self) -> io::Result<()> {
        self.run(&mut [], true).first_error()
    }
}
