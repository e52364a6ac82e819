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
/// A new file is created 0600: it holds tenants' (encrypted) data.
pub fn preallocate(path: &Path, size_bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
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

    /// The open file (for range operations that are not reads or writes).
    pub fn file(&self) -> &File {
        &self.file
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

/// Wakes the engine thread from another thread: an eventfd that the engine polls
/// together with its ring's completion eventfd. `notify` writes only when the
/// engine said it is about to sleep, so a busy engine costs callers no syscall.
#[derive(Debug)]
pub struct Waker {
    fd: std::os::fd::OwnedFd,
    sleeping: std::sync::atomic::AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; returns a new fd or -1.
        Ok(Self { fd: new_eventfd()?, sleeping: std::sync::atomic::AtomicBool::new(false) })
    }

    /// Called by a sender after queueing a command.
    pub fn notify(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.sleeping.load(SeqCst) && self.sleeping.swap(false, SeqCst) {
            self.kick();
        }
    }

    fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live stack buffer to our eventfd.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// The engine is about to block: after this, senders kick the eventfd.
    pub fn set_sleeping(&self, v: bool) {
        self.sleeping.store(v, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A non-blocking eventfd.
fn new_eventfd() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain syscall; returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Empties an eventfd's counter (non-blocking).
fn drain_eventfd(fd: &std::os::fd::OwnedFd) {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live stack buffer; EAGAIN when empty is fine.
    let _ = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
}

/// One completed operation of an [`AsyncRing`].
#[derive(Debug)]
pub struct Completion {
    pub user: u64,
    /// The buffer handed in, returned (None for a bare fsync).
    pub buf: Option<AlignedBuf>,
    pub result: io::Result<()>,
}

#[derive(Debug)]
struct Part {
    write: bool,
    offset: u64,
    start: usize,
    end: usize,
    done: usize,
}

#[derive(Debug)]
struct BufOp {
    user: u64,
    buf: Option<AlignedBuf>,
    parts: Vec<Part>,
    /// Issue an fdatasync once every part is written.
    fsync: bool,
    fsync_done: bool,
    /// A part was resubmitted after a short transfer: sync again once all is done.
    refsync: bool,
    outstanding: usize,
    err: Option<io::Error>,
}

const FSYNC_PART: u64 = 0xFFFF;
/// Backlog marker (never in user_data): submit this fsync with IO_DRAIN.
const DRAIN_BIT: u64 = 1 << 16;

/// Whether (and how) an operation ends with an fdatasync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    No,
    /// At once, drained behind everything submitted before it.
    Drain,
}

/// The engine thread's data-path ring: operations are submitted and complete
/// independently (reads reply as soon as they finish, writes keep flowing while a
/// commit's fdatasync is in flight). The ring owns every buffer while the kernel
/// may use it and hands it back in the [`Completion`]; dropping the ring first
/// waits for everything in flight, so no buffer is freed under the kernel.
///
/// The thread sleeps in poll(2) on two eventfds, the ring's completion eventfd and
/// the [`Waker`], rather than on an operation armed in the ring: nothing is ever
/// pending in the ring but real I/O, so IO_DRAIN means what it says.
pub struct AsyncRing {
    ring: IoUring,
    file: File,
    ops: std::collections::HashMap<u64, BufOp>,
    next_slot: u64,
    /// Entries waiting for room in the submission queue: (slot, part index or FSYNC_PART, linked).
    backlog: std::collections::VecDeque<(u64, u64)>,
    in_kernel: usize,
    waker: std::sync::Arc<Waker>,
    /// Signalled by the kernel for every completion (IORING_REGISTER_EVENTFD).
    cq_event: std::os::fd::OwnedFd,
    pub fsyncs: u64,
}

impl std::fmt::Debug for AsyncRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncRing")
            .field("ops", &self.ops.len())
            .field("in_kernel", &self.in_kernel)
            .finish_non_exhaustive()
    }
}

impl AsyncRing {
    pub fn new(disk: &Disk, waker: std::sync::Arc<Waker>) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES * 2)?;
        let cq_event = new_eventfd()?;
        ring.submitter().register_eventfd(cq_event.as_raw_fd())?;
        Ok(Self {
            ring,
            file: disk.file.try_clone()?,
            ops: std::collections::HashMap::new(),
            next_slot: 1,
            backlog: std::collections::VecDeque::new(),
            in_kernel: 0,
            waker,
            cq_event,
            fsyncs: 0,
        })
    }

    /// Operations (buffer ops and fsyncs) not yet completed.
    pub fn busy(&self) -> usize {
        self.ops.len()
    }

    /// A bare fdatasync, submitted now; completes as one [`Completion`] without buffer.
    pub fn start_fsync(&mut self, user: u64) {
        let slot = self.next_slot;
        self.next_slot += 1;
        let op = BufOp {
            user,
            buf: None,
            parts: Vec::new(),
            fsync: true,
            fsync_done: false,
            refsync: false,
            outstanding: 1,
            err: None,
        };
        self.ops.insert(slot, op);
        self.backlog.push_back((slot, FSYNC_PART));
        self.push_backlog();
    }

    /// Starts reads/writes of `parts` = (write?, disk offset, buffer range) on `buf`,
    /// then (if `fsync`) one fdatasync once they are done; with `drain` the fdatasync
    /// is submitted at once with IO_DRAIN, so it also waits for everything submitted
    /// before it (one round trip instead of two). Completes as one [`Completion`].
    pub fn start(&mut self, user: u64, buf: AlignedBuf, parts: &[(bool, u64, usize, usize)], fsync: Fsync) {
        let slot = self.next_slot;
        self.next_slot += 1;
        let mut err = None;
        let parts: Vec<Part> = parts
            .iter()
            .map(|&(write, offset, start, end)| {
                if start >= end
                    || end > buf.len()
                    || offset % ALIGN as u64 != 0
                    || (end - start) % ALIGN != 0
                    || start % ALIGN != 0
                {
                    err = Some(io::Error::new(io::ErrorKind::InvalidInput, "unaligned I/O"));
                }
                Part { write, offset, start, end, done: 0 }
            })
            .collect();
        let n = parts.len();
        let mut op = BufOp {
            user,
            buf: Some(buf),
            parts,
            fsync: fsync != Fsync::No,
            fsync_done: false,
            refsync: false,
            outstanding: 0,
            err,
        };
        if op.err.is_none() {
            for i in 0..n {
                self.backlog.push_back((slot, i as u64));
                op.outstanding += 1;
            }
            if fsync == Fsync::Drain {
                self.backlog.push_back((slot, FSYNC_PART | DRAIN_BIT));
                op.outstanding += 1;
            }
        }
        self.ops.insert(slot, op);
        self.push_backlog();
    }

    fn push_backlog(&mut self) {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut sq = self.ring.submission();
        while let Some(&(slot, part)) = self.backlog.front() {
            let Some(op) = self.ops.get_mut(&slot) else {
                self.backlog.pop_front();
                continue;
            };
            let drain = part & DRAIN_BIT != 0;
            let part = part & !DRAIN_BIT;
            let entry = if part == FSYNC_PART {
                let e = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
                if drain {
                    e.flags(squeue::Flags::IO_DRAIN)
                } else {
                    e
                }
            } else {
                let p = &op.parts[part as usize];
                let Some(buf) = op.buf.as_mut() else {
                    self.backlog.pop_front();
                    continue;
                };
                let rest = &mut buf[p.start + p.done..p.end];
                let off = p.offset + p.done as u64;
                if p.write {
                    opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32).offset(off).build()
                } else {
                    opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32).offset(off).build()
                }
            }
            .user_data((slot << 16) | part);
            // SAFETY: the buffer is owned by `self.ops` until the op's last completion
            // has been reaped; AlignedBuf's heap memory does not move with the struct.
            if unsafe { sq.push(&entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
            self.in_kernel += 1;
        }
    }

    /// Submits what is queued and waits for at least one completion, a wake-up
    /// through the [`Waker`], or the timeout (None: no timeout). Completed
    /// operations are appended to `out`.
    pub fn wait(&mut self, timeout: Option<std::time::Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        self.push_backlog();
        if !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
        }
        let before = out.len();
        self.reap(out);
        if out.len() > before || timeout.is_some_and(|t| t.is_zero()) {
            return Ok(());
        }
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(t.subsec_nanos()),
        });
        let mut fds = [
            libc::pollfd { fd: self.cq_event.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.waker.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
        // SAFETY: polls two live descriptors through a stack array of the right length;
        // the timeout (if any) lives on the stack for the call; no signal mask.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, ts_ptr, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[0].revents != 0 {
            drain_eventfd(&self.cq_event);
        }
        if fds[1].revents != 0 {
            drain_eventfd(&self.waker.fd);
        }
        self.reap(out);
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in cqes {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            let slot = ud >> 16;
            let part = ud & 0xFFFF;
            let Some(op) = self.ops.get_mut(&slot) else { continue };
            op.outstanding -= 1;
            if part == FSYNC_PART {
                self.fsyncs += 1;
                op.fsync_done = true;
                if res < 0 && op.err.is_none() {
                    op.err = Some(io::Error::from_raw_os_error(-res));
                }
            } else {
                let p = &mut op.parts[part as usize];
                if res < 0 {
                    if op.err.is_none() {
                        op.err = Some(io::Error::from_raw_os_error(-res));
                    }
                } else if let Some(moved) = usize::try_from(res).ok().filter(|m| *m > 0) {
                    p.done += moved;
                    if p.start + p.done < p.end {
                        op.outstanding += 1;
                        op.refsync = op.fsync;
                        self.backlog.push_back((slot, part));
                    }
                } else if op.err.is_none() {
                    op.err = Some(io::Error::new(io::ErrorKind::UnexpectedEof, "zero-length transfer"));
                }
            }
            // Every part written: the fsync, if asked and not already done after them, goes now.
            if op.outstanding == 0 && op.fsync && (!op.fsync_done || op.refsync) && op.err.is_none() {
                op.outstanding += 1;
                op.refsync = false;
                op.fsync_done = false;
                self.backlog.push_back((slot, FSYNC_PART));
            }
            if op.outstanding == 0 {
                if let Some(op) = self.ops.remove(&slot) {
                    let result = op.err.map_or(Ok(()), Err);
                    out.push(Completion { user: op.user, buf: op.buf, result });
                }
            }
        }
        self.push_backlog();
    }
}

impl Drop for AsyncRing {
    fn drop(&mut self) {
        // Complete the armed eventfd read and wait for everything the kernel still
        // holds, so that no buffer is freed while it may be written.
        self.backlog.clear();
        let mut sink = Vec::new();
        while self.in_kernel > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(&mut sink);
            self.backlog.clear();
        }
    }
}
