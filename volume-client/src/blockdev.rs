//! The seam between the NBD server and whatever serves a volume's blocks.
//!
//! The NBD layer speaks bytes at any offset; everything behind [`BlockDevice`]
//! speaks whole 4 KiB blocks (the unit of encryption and of checksums in Slate).
//! The NBD server turns unaligned client requests into aligned ones
//! (read-modify-write under its own ordering), so a device never sees a partial
//! block. The trait is object safe and its futures are `Send`, so an export is an
//! `Arc<dyn BlockDevice>` that any tokio task can drive.
//!
//! Two simple devices live here: [`MemDevice`] (in memory, for tests of the NBD
//! layer) and [`FileDevice`] (a plain file; holes are punched for trim and
//! zeroes, and `SEEK_DATA`/`SEEK_HOLE` answer block status).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

/// The block size every device speaks, in bytes.
pub const DEVICE_BLOCK_BYTES: u32 = 4096;
const BLOCK: u64 = DEVICE_BLOCK_BYTES as u64;

/// The future every [`BlockDevice`] method returns.
pub type DevFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DevError>> + Send + 'a>>;

/// Why a device operation failed. Each kind maps to one NBD error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevError {
    /// The medium failed (disk error, every replica unreachable, checksum beyond repair).
    #[error("I/O error: {0}")]
    Io(String),
    /// The request is outside the device or not block aligned.
    #[error("request out of range or not aligned")]
    OutOfRange,
    /// No space could be allocated for the write.
    #[error("no space left")]
    NoSpace,
    /// A newer attachment of the volume owns it; this one may no longer write.
    #[error("fenced: the volume is attached elsewhere with a newer generation")]
    Fenced,
    /// The device is read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// The device cannot do this (e.g. a fast zero it cannot make fast).
    #[error("operation not supported")]
    NotSupported,
    /// The device is shutting down.
    #[error("device is shutting down")]
    Shutdown,
}

/// NBD error numbers (the protocol fixes their values).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

impl DevError {
    /// The NBD error number a client sees for this error.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            DevError::Io(_) => errno::EIO,
            DevError::OutOfRange => errno::EINVAL,
            DevError::NoSpace => errno::ENOSPC,
            DevError::Fenced | DevError::ReadOnly => errno::EPERM,
            DevError::NotSupported => errno::ENOTSUP,
            DevError::Shutdown => errno::ESHUTDOWN,
        }
    }
}

impl From<io::Error> for DevError {
    fn from(e: io::Error) -> Self {
        let nospc = [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT, rustix::io::Errno::FBIG];
        if nospc.iter().any(|n| e.raw_os_error() == Some(n.raw_os_error())) {
            DevError::NoSpace
        } else {
            DevError::Io(e.to_string())
        }
    }
}

/// The allocation state of a run of blocks, as `NBD_CMD_BLOCK_STATUS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes (a multiple of the block size, never zero).
    pub len: u32,
    /// Backed by storage (`false` = a hole).
    pub allocated: bool,
    /// Reads as zeroes for sure.
    pub zero: bool,
}

/// A device of fixed-size blocks that an NBD export serves.
///
/// Offsets and lengths given to the I/O methods are multiples of
/// [`block_size`](Self::block_size) and lie within the device; the NBD layer
/// guarantees both. A write is acknowledged (its future resolves) only when a
/// read issued afterwards returns the new data; with `fua` the data must also be
/// durable. [`flush`](Self::flush) makes every acknowledged write durable.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes (a multiple of the block size).
    fn size_bytes(&self) -> u64;
    /// The device's block size in bytes (4096 in Slate).
    fn block_size(&self) -> u32 {
        DEVICE_BLOCK_BYTES
    }
    /// Whether `write_zeroes` is cheap (no data written), so that NBD's
    /// `FAST_ZERO` can be honoured instead of answered with `ENOTSUP`.
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// Read `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> DevFuture<'_, Bytes>;
    /// Write `data` at `offset`; with `fua`, durable before the future resolves.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DevFuture<'_, ()>;
    /// Make every acknowledged write durable.
    fn flush(&self) -> DevFuture<'_, ()>;
    /// The range is no longer needed; later reads may return anything (Slate returns zeroes).
    fn trim(&self, offset: u64, len: u64) -> DevFuture<'_, ()>;
    /// The range reads as zeroes afterwards; with `no_hole` it stays allocated.
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DevFuture<'_, ()>;
    /// Allocation state of the range, as consecutive extents starting at `offset`
    /// whose lengths add up to at most `len` (at least one extent).
    fn block_status(&self, offset: u64, len: u32) -> DevFuture<'_, Vec<Extent>>;
}

/// Check that `offset..offset+len` is block aligned and inside a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), DevError> {
    let end = offset.checked_add(len).ok_or(DevError::OutOfRange)?;
    if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) || end > size {
        return Err(DevError::OutOfRange);
    }
    Ok(())
}

/// Append an extent to `out`, merging it with the previous one when the state is the same.
fn push_extent(out: &mut Vec<Extent>, len: u64, allocated: bool, zero: bool) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.allocated == allocated && last.zero == zero {
            if let Some(sum) = u32::try_from(len).ok().and_then(|l| last.len.checked_add(l)) {
                last.len = sum;
                return;
            }
        }
    }
    out.push(Extent { len: len as u32, allocated, zero });
}

// ---------------------------------------------------------------------------
// MemDevice

#[derive(Debug, Clone)]
enum MemBlock {
    Data(Bytes),
    /// Allocated and zero (a `write_zeroes` with `no_hole`).
    Zero,
}

#[derive(Debug, Default)]
struct MemState {
    blocks: BTreeMap<u64, MemBlock>,
    flushes: u64,
}

/// An in-memory device for tests of the NBD layer: unwritten and trimmed blocks
/// are holes that read as zeroes. An optional per-write delay (longer for lower
/// offsets) lets tests provoke concurrency.
#[derive(Debug)]
pub struct MemDevice {
    size: u64,
    fast_zero: bool,
    write_delay: Option<Duration>,
    state: Mutex<MemState>,
}

impl MemDevice {
    /// A device of `size_bytes` (rounded down to whole blocks).
    pub fn new(size_bytes: u64) -> Self {
        Self { size: size_bytes / BLOCK * BLOCK, fast_zero: true, write_delay: None, state: Mutex::default() }
    }

    /// Whether `write_zeroes` claims to be fast (default: true).
    pub fn with_fast_zero(mut self, fast: bool) -> Self {
        self.fast_zero = fast;
        self
    }

    /// Sleep this long in every write before applying it (to provoke reordering).
    pub fn with_write_delay(mut self, delay: Duration) -> Self {
        self.write_delay = Some(delay);
        self
    }

    /// How many flushes the device has seen.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// A copy of the whole device content.
    pub fn snapshot(&self) -> Vec<u8> {
        let st = self.lock();
        let mut out = vec![0u8; self.size as usize];
        for (idx, b) in &st.blocks {
            if let MemBlock::Data(d) = b {
                let at = (*idx * BLOCK) as usize;
                out[at..at + d.len()].copy_from_slice(d);
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remove_range(&self, offset: u64, len: u64, keep_allocated: bool) {
        let mut st = self.lock();
        let first = offset / BLOCK;
        let last = (offset + len) / BLOCK;
        if keep_allocated {
            for idx in first..last {
                st.blocks.insert(idx, MemBlock::Zero);
            }
        } else {
            let keys: Vec<u64> = st.blocks.range(first..last).map(|(k, _)| *k).collect();
            for k in keys {
                st.blocks.remove(&k);
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn can_fast_zero(&self) -> bool {
        self.fast_zero
    }

    fn read(&self, offset: u64, len: u32) -> DevFuture<'_, Bytes> {
        Box::pin(async move {
            check_range(self.size, offset, u64::from(len))?;
            let mut out = BytesMut::zeroed(len as usize);
            let st = self.lock();
            let first = offset / BLOCK;
            for (idx, b) in st.blocks.range(first..first + u64::from(len) / BLOCK) {
                if let MemBlock::Data(d) = b {
                    let at = ((idx - first) * BLOCK) as usize;
                    out[at..at + d.len()].copy_from_slice(d);
                }
            }
            Ok(out.freeze())
        })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DevFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.size, offset, data.len() as u64)?;
            if let Some(d) = self.write_delay {
                // Earlier offsets sleep longer, so that a naive server would reorder.
                let factor = 1 + (self.size - offset) * 4 / self.size.max(1);
                tokio::time::sleep(d * factor as u32).await;
            }
            let mut st = self.lock();
            let first = offset / BLOCK;
            for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
                st.blocks.insert(first + i as u64, MemBlock::Data(Bytes::copy_from_slice(chunk)));
            }
            Ok(())
        })
    }

    fn flush(&self) -> DevFuture<'_, ()> {
        Box::pin(async move {
            self.lock().flushes += 1;
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u64) -> DevFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.size, offset, len)?;
            self.remove_range(offset, len, false);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DevFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.size, offset, len)?;
            self.remove_range(offset, len, no_hole);
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u32) -> DevFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            check_range(self.size, offset, u64::from(len))?;
            let st = self.lock();
            let first = offset / BLOCK;
            let end = first + u64::from(len) / BLOCK;
            let mut out = Vec::new();
            let mut pos = first;
            for (idx, b) in st.blocks.range(first..end) {
                push_extent(&mut out, (idx - pos) * BLOCK, false, true);
                let zero = matches!(b, MemBlock::Zero);
                push_extent(&mut out, BLOCK, true, zero);
                pos = idx + 1;
            }
            push_extent(&mut out, (end - pos) * BLOCK, false, true);
            Ok(out)
        })
    }
}

// ---------------------------------------------------------------------------
// FileDevice

/// A device backed by a plain file (no O_DIRECT; for tests and local use).
/// Trim and write-zeroes punch holes; block status comes from `SEEK_DATA`/`SEEK_HOLE`.
#[derive(Debug, Clone)]
pub struct FileDevice {
    file: Arc<File>,
    size: u64,
}

impl FileDevice {
    /// Open an existing file; its size (rounded down to whole blocks) is the device size.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len() / BLOCK * BLOCK;
        Ok(Self { file: Arc::new(file), size })
    }

    /// Create (or truncate) a sparse file of `size_bytes` (rounded down to whole blocks).
    pub fn create(path: &Path, size_bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        let size = size_bytes / BLOCK * BLOCK;
        file.set_len(size)?;
        Ok(Self { file: Arc::new(file), size })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, DevError>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(DevError::from),
            Err(e) => Err(DevError::Io(format!("blocking task failed: {e}"))),
        }
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len).map_err(io::Error::from)
}

fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(file, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, offset, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            // Fall back to writing zeroes, a block run at a time.
            let zeros = vec![0u8; 1 << 20];
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let n = (end - pos).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn file_extents(file: &File, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    use rustix::fs::{seek, SeekFrom};
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => return Err(e.into()),
        };
        // Data wins over holes at block granularity: round data starts down and ends up.
        let data_start = (data / BLOCK * BLOCK).max(pos);
        push_extent(&mut out, data_start - pos, false, true);
        if data_start >= end {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => return Err(e.into()),
        };
        let data_end = hole.div_ceil(BLOCK).saturating_mul(BLOCK).min(end).max(data_start + BLOCK);
        push_extent(&mut out, data_end - data_start, true, false);
        pos = data_end;
    }
    Ok(out)
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> DevFuture<'_, Bytes> {
        Box::pin(async move {
            check_range(self.size, offset, u64::from(len))?;
            self.blocking(move |f| {
                let mut buf = BytesMut::zeroed(len as usize);
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf.freeze())
            })
            .await
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DevFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.size, offset, data.len() as u64)?;
            self.blocking(move |f| {
                f.write_all_at(&data, offset)?;
                if fua {
                    f.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }

    fn flush(&self) -> DevFuture<'_, ()> {
        Box::pin(async move { self.blocking(File::sync_data).await })
    }

    fn trim(&self, offset: u64, len: u64) -> DevFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.size, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            self.blocking(move |f| match punch_hole(f, offset, len) {
                // Trim is advisory: a file system without holes just keeps the data.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => Ok(()),
                r => r,
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DevFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.size, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            self.blocking(move |f| {
                if no_hole {
                    zero_range(f, offset, len)
                } else {
                    match punch_hole(f, offset, len) {
                        Ok(()) => Ok(()),
                        Err(_) => zero_range(f, offset, len),
                    }
                }
            })
            .await
        })
    }

    fn block_status(&self, offset: u64, len: u32) -> DevFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            check_range(self.size, offset, u64::from(len))?;
            self.blocking(move |f| file_extents(f, offset, u64::from(len))).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_device_reads_holes_as_zero_and_reports_extents() {
        let d = MemDevice::new(64 * BLOCK);
        d.write(4 * BLOCK, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
        d.write_zeroes(10 * BLOCK, 2 * BLOCK, true).await.unwrap();
        let r = d.read(3 * BLOCK, 4 * BLOCK as u32).await.unwrap();
        assert!(r[..4096].iter().all(|b| *b == 0));
        assert!(r[4096..12288].iter().all(|b| *b == 7));
        let ext = d.block_status(0, 16 * BLOCK as u32).await.unwrap();
        let expect = vec![
            Extent { len: 4 * 4096, allocated: false, zero: true },
            Extent { len: 2 * 4096, allocated: true, zero: false },
            Extent { len: 4 * 4096, allocated: false, zero: true },
            Extent { len: 2 * 4096, allocated: true, zero: true },
            Extent { len: 4 * 4096, allocated: false, zero: true },
        ];
        assert_eq!(ext, expect);
        assert_eq!(d.read(63 * BLOCK, 8192).await, Err(DevError::OutOfRange));
        assert_eq!(d.read(1, 4096).await, Err(DevError::OutOfRange));
    }

    #[tokio::test]
    async fn file_device_round_trip_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(&dir.path().join("dev"), 1 << 20).unwrap();
        d.write(8 * BLOCK, Bytes::from(vec![1u8; 4096 * 3]), true).await.unwrap();
        let r = d.read(8 * BLOCK, 3 * 4096).await.unwrap();
        assert!(r.iter().all(|b| *b == 1));
        let ext = d.block_status(0, 1 << 20).await.unwrap();
        assert_eq!(ext.iter().map(|e| u64::from(e.len)).sum::<u64>(), 1 << 20);
        assert!(ext.iter().any(|e| e.allocated));
        d.trim(8 * BLOCK, 3 * BLOCK).await.unwrap();
        let r = d.read(8 * BLOCK, 3 * 4096).await.unwrap();
        assert!(r.iter().all(|b| *b == 0));
        d.flush().await.unwrap();
    }
}
