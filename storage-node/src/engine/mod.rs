//! The disk engine: one raw disk (block device or preallocated file) turned
//! into extents that hold volume segments, with per-block crc32c, a
//! written-bitmap, snapshot layers, verified zeroing and group commit.
//!
//! Shape: one engine thread per disk owns the io_uring, the file and all
//! metadata state (Crucible-style single owner). Callers hold a cheap,
//! cloneable [`EngineHandle`] whose async methods send a command over a
//! channel and await a oneshot reply. The thread drains everything queued
//! when it wakes into one batch, submits the batch's data I/O and one
//! journal entry together, issues ONE fdatasync for the whole batch and only
//! then completes the batch's replies: a write is acknowledged only when its
//! data and the metadata that finds it are on stable storage.
//!
//! The on-disk layout, journal, checkpoint, extent lifecycle and layer rules
//! are described in `docs/design/engine.md` and in the submodules:
//! - [`layout`]: superblock, geometry, page framing (checksummed, ping-pong slots).
//! - [`journal`]: the metadata journal records and their replay.
//! - [`meta`]: the extent table (in RAM), the catalog, the bounded page cache.
//! - [`uring`]: io_uring submission, aligned buffers (`unsafe`, documented).
//! - [`zero`]: zeroing a range with fallocate / BLKZEROOUT (one documented `unsafe` ioctl),
//!   shared with the whole-device erase (`crate::erase`).
//! - [`core`]: the engine thread, one submodule per responsibility: the write path
//!   (`core/commit.rs`), reads, recovery, page cache, allocation, zeroer, checkpoint,
//!   intents, fencing, layers, scrub.
//!
//! Failpoints (feature `failpoints`, always on in this crate's tests), each of
//! which stops the engine thread as a crash would (no checkpoint, no replies):
//! `after_data_write_before_journal`, `after_journal_before_fsync`, `before_ack`,
//! `mid_zeroing` (half the extent zeroed), `after_zeroing_before_verify`,
//! `mid_checkpoint` (pages written, checkpoint block not).

mod core;
mod journal;
mod layout;
mod meta;
pub(crate) mod uring;
pub(crate) mod zero;

use bytes::Bytes;
use slate_protocol::{
    BlockIndex, BlockRange, Epoch, ErrorKind, Generation, NodeId, SegmentIndex, VolumeId, WireError, BLOCK_SIZE_BYTES,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

pub use layout::{read_geometry, FormatReport, DEFAULT_EXTENT_SIZE_BYTES, DEFAULT_JOURNAL_BYTES};
pub use zero::ZeroMethod;

/// Epoch value that names a segment's writable head layer in [`EngineHandle::changed_blocks`]
/// and [`EngineHandle::read_at`] (`to = HEAD_EPOCH` means "up to and including the head").
pub const HEAD_EPOCH: Epoch = Epoch(u64::MAX);

/// Most extent ids one [`EngineHandle::extent_states`] call may ask about.
pub const MAX_EXTENT_QUERY: usize = 1 << 20;

/// Where an extent is in its lifecycle, as [`EngineHandle::extent_states`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentPhase {
    /// Zeroed and verified; the only phase allocation takes from.
    Free,
    /// Holds a segment layer's data.
    Owned,
    /// Released; still holds old data until the zeroer gets to it.
    Dirty,
    /// The zeroer is overwriting or verifying it.
    Zeroing,
    /// Failed zero verification repeatedly; never allocated again.
    Failed,
    /// No such extent on this disk.
    OutOfRange,
}

/// How to lay out a fresh disk.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// Size of one extent (unit of allocation and erasure). Multiple of 64 KiB, 64 KiB ..= 1 GiB.
    pub extent_size_bytes: u64,
    /// Size of the metadata journal region. At least 1 MiB.
    pub journal_bytes: u64,
    /// The node that owns this disk; recorded in the superblock.
    pub node_id: NodeId,
    /// If the path does not exist (or is a shorter regular file), create / extend it to
    /// this many bytes (preallocated with fallocate). `None`: use the existing size.
    pub size_bytes: Option<u64>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self {
            extent_size_bytes: DEFAULT_EXTENT_SIZE_BYTES,
            journal_bytes: DEFAULT_JOURNAL_BYTES,
            node_id: NodeId(0),
            size_bytes: None,
        }
    }
}

/// Writes a fresh superblock (two copies), journal, extent table and catalog.
/// Every extent starts dirty: the engine zeroes and verifies it before first use.
pub fn format(path: &Path, opts: &FormatOptions) -> Result<FormatReport, EngineError> {
    layout::format(path, opts)
}

/// Run-time options of an opened engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Background zeroing budget, in bytes of device work per second. Zeros written
    /// count in full; a range zeroed by the device's own primitive (zero-range on a
    /// file, BLKZEROOUT on a device with write-zeroes) a flat 64 KiB per call; the
    /// verify read a quarter of its length. `u64::MAX`: unlimited. Allocation that
    /// finds no verified extent zeroes one at full speed regardless.
    pub zero_rate_bytes_per_sec: u64,
    /// Always zero by writing zeros, never by fallocate or BLKZEROOUT (for a disk file
    /// whose underlying blocks must be physically overwritten; see the design notes).
    pub zero_with_writes: bool,
    /// Bound on RAM used by cached metadata pages (per-block crcs and bitmaps).
    pub metadata_cache_bytes: u64,
    /// Granularity of write-intent records, in volume blocks (power of two).
    pub intent_region_blocks: u64,
    /// Most commands in one group-commit batch.
    pub max_batch_commands: usize,
    /// Checkpoint at least this often (seconds) while there is something to checkpoint.
    pub checkpoint_interval_secs: u64,
    /// A write-intent region with no write for this long is cleared lazily (0, the default:
    /// never; only the client's `clear_intents` clears). Lazy clearing is unsafe when a client
    /// may die with a write on one replica only and re-attach later than this, so it is off
    /// unless a deployment knows better. Regions recovered after a crash are never cleared lazily.
    pub intent_idle_clear_secs: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            zero_rate_bytes_per_sec: 256 << 20,
            zero_with_writes: false,
            metadata_cache_bytes: 64 << 20,
            intent_region_blocks: 256,
            max_batch_commands: 256,
            checkpoint_interval_secs: 30,
            intent_idle_clear_secs: 0,
        }
    }
}

/// Everything the engine can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("blocks out of range of the segment or volume")]
    OutOfRange,
    #[error("segment not assigned to this node")]
    NotAssigned,
    #[error("crc mismatch on arrival at {block}")]
    BadCrc { block: BlockIndex },
    #[error("stored data does not match its crc (torn or corrupt) at {block}")]
    Corrupt { block: BlockIndex },
    #[error("no verified-zero extent left to allocate")]
    NoSpace,
    #[error("stale generation: {current} already seen")]
    StaleGeneration { current: Generation },
    #[error("no such layer or epoch: {0}")]
    NoSuchLayer(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("disk I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad on-disk format: {0}")]
    Format(String),
    #[error("engine is shutting down")]
    ShuttingDown,
    #[error("engine failed after an unrecoverable I/O error: {0}")]
    Failed(String),
}

impl EngineError {
    /// The typed error that crosses the wire.
    pub fn to_wire(&self) -> WireError {
        let detail = self.to_string();
        match self {
            Self::OutOfRange => WireError::new(ErrorKind::OutOfRange, detail),
            Self::NotAssigned => WireError::new(ErrorKind::NotAssigned, detail),
            Self::BadCrc { block } => WireError::at(ErrorKind::BadCrc, *block, detail),
            Self::Corrupt { block } => WireError::at(ErrorKind::Corrupt, *block, detail),
            Self::NoSpace => WireError::new(ErrorKind::NoSpace, detail),
            Self::StaleGeneration { .. } => WireError::new(ErrorKind::StaleGeneration, detail),
            Self::NoSuchLayer(_) => WireError::new(ErrorKind::NoSuchLayer, detail),
            Self::Invalid(_) => WireError::new(ErrorKind::Malformed, detail),
            Self::Io(_) | Self::Failed(_) => WireError::new(ErrorKind::Io, detail),
            Self::Format(_) | Self::ShuttingDown => WireError::new(ErrorKind::Internal, detail),
        }
    }
}

/// Result of a read: one bit per block (LSB first) set where the block holds data,
/// the stored crc per block (0 for unwritten), and the data (zeros for unwritten).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    pub written: Vec<u8>,
    pub crcs: Vec<u32>,
    pub data: Bytes,
}

/// Most blocks one [`EngineHandle::scrub`] call reads (a larger `max_blocks` is clamped).
pub const MAX_SCRUB_BLOCKS: u32 = 1024;

/// One step of a scrub: see [`EngineHandle::scrub`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScrubChunk {
    /// Where the next call continues; `None`: every layer of the segment has been scrubbed.
    pub next_cursor: Option<u64>,
    /// Written blocks read and checked by this call.
    pub blocks_checked: u64,
    /// Blocks whose data does not match their stored crc32c.
    pub corrupt: Vec<CorruptBlock>,
}

/// A block whose stored data fails its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CorruptBlock {
    /// The layer: the snapshot epoch it was frozen at, or [`HEAD_EPOCH`] for the head.
    pub epoch: Epoch,
    /// The volume block.
    pub block: BlockIndex,
    /// The crc32c recorded for it (what a good copy's data hashes to).
    pub stored_crc: u32,
}

/// Counters for metrics; a cheap copy of atomics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub capacity_bytes: u64,
    pub extent_size_bytes: u64,
    pub extents_total: u64,
    pub extents_free: u64,
    pub extents_owned: u64,
    pub extents_dirty: u64,
    pub extents_zeroing: u64,
    /// Extents that failed zero verification repeatedly and are never allocated.
    pub extents_failed: u64,
    pub bytes_zeroed_total: u64,
    /// Of `bytes_zeroed_total`, bytes zeroed by fallocate or BLKZEROOUT rather than written.
    pub bytes_zeroed_offload_total: u64,
    pub extents_zeroed_total: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
    pub batches: u64,
    pub journal_bytes_written: u64,
    pub checkpoints: u64,
    /// RAM held by cached metadata pages now, and the most it ever held.
    pub metadata_cache_bytes: u64,
    pub metadata_cache_bytes_peak: u64,
    pub metadata_cache_limit_bytes: u64,
    pub metadata_page_loads: u64,
    pub metadata_page_evictions: u64,
    pub corrupt_reads: u64,
    pub scrub_blocks_checked: u64,
    pub scrub_corrupt_blocks: u64,
    pub repaired_blocks: u64,
}

/// Shared atomic counters behind [`EngineStats`].
#[derive(Debug, Default)]
pub(crate) struct StatsCell {
    pub capacity_bytes: AtomicU64,
    pub extent_size_bytes: AtomicU64,
    pub extents_total: AtomicU64,
    pub extents_free: AtomicU64,
    pub extents_owned: AtomicU64,
    pub extents_dirty: AtomicU64,
    pub extents_zeroing: AtomicU64,
    pub extents_failed: AtomicU64,
    pub bytes_zeroed_total: AtomicU64,
    pub bytes_zeroed_offload_total: AtomicU64,
    pub extents_zeroed_total: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub fsyncs: AtomicU64,
    pub batches: AtomicU64,
    pub journal_bytes_written: AtomicU64,
    pub checkpoints: AtomicU64,
    pub metadata_cache_bytes: AtomicU64,
    pub metadata_cache_bytes_peak: AtomicU64,
    pub metadata_cache_limit_bytes: AtomicU64,
    pub metadata_page_loads: AtomicU64,
    pub metadata_page_evictions: AtomicU64,
    pub corrupt_reads: AtomicU64,
    pub scrub_blocks_checked: AtomicU64,
    pub scrub_corrupt_blocks: AtomicU64,
    pub repaired_blocks: AtomicU64,
}

impl StatsCell {
    fn snapshot(&self) -> EngineStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            capacity_bytes: g(&self.capacity_bytes),
            extent_size_bytes: g(&self.extent_size_bytes),
            extents_total: g(&self.extents_total),
            extents_free: g(&self.extents_free),
            extents_owned: g(&self.extents_owned),
            extents_dirty: g(&self.extents_dirty),
            extents_zeroing: g(&self.extents_zeroing),
            extents_failed: g(&self.extents_failed),
            bytes_zeroed_total: g(&self.bytes_zeroed_total),
            bytes_zeroed_offload_total: g(&self.bytes_zeroed_offload_total),
            extents_zeroed_total: g(&self.extents_zeroed_total),
            reads: g(&self.reads),
            writes: g(&self.writes),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            fsyncs: g(&self.fsyncs),
            batches: g(&self.batches),
            journal_bytes_written: g(&self.journal_bytes_written),
            checkpoints: g(&self.checkpoints),
            metadata_cache_bytes: g(&self.metadata_cache_bytes),
            metadata_cache_bytes_peak: g(&self.metadata_cache_bytes_peak),
            metadata_cache_limit_bytes: g(&self.metadata_cache_limit_bytes),
            metadata_page_loads: g(&self.metadata_page_loads),
            metadata_page_evictions: g(&self.metadata_page_evictions),
            corrupt_reads: g(&self.corrupt_reads),
            scrub_blocks_checked: g(&self.scrub_blocks_checked),
            scrub_corrupt_blocks: g(&self.scrub_corrupt_blocks),
            repaired_blocks: g(&self.repaired_blocks),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Called on the engine thread with a command's outcome (a write once it is durable, a
/// read once its data is in): it must not block. See [`EngineHandle::write_with`] and
/// [`EngineHandle::read_with`].
pub type OnDone<T = ()> = Box<dyn FnOnce(Result<T, EngineError>) + Send>;

/// Where the engine sends an outcome: a waiting task, or a callback.
pub(crate) enum Respond<T> {
    Slot(Reply<T>),
    Call(OnDone<T>),
}

/// An outcome without a value.
pub(crate) type Done = Respond<()>;

impl<T> Respond<T> {
    pub(crate) fn send(self, r: Result<T, EngineError>) {
        match self {
            Respond::Slot(tx) => drop(tx.send(r)),
            Respond::Call(f) => f(r),
        }
    }
}

impl<T> std::fmt::Debug for Respond<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Respond::Slot(_) => "Respond::Slot",
            Respond::Call(_) => "Respond::Call",
        })
    }
}

/// Checks a write's shape and every block's crc, on the caller's task, so that the
/// engine thread only does I/O.
fn check_write(start: BlockIndex, crcs: &[u32], data: &[u8]) -> Result<(), EngineError> {
    if data.len() != crcs.len() * BLOCK_SIZE_BYTES {
        return Err(EngineError::Invalid(format!("{} crcs for {} bytes", crcs.len(), data.len())));
    }
    for (i, (block, crc)) in data.chunks_exact(BLOCK_SIZE_BYTES).zip(crcs).enumerate() {
        if crc32c::crc32c(block) != *crc {
            return Err(EngineError::BadCrc { block: BlockIndex(start.0.saturating_add(i as u64)) });
        }
    }
    Ok(())
}

/// A command to the engine thread. Processed in arrival order.
#[derive(Debug)]
pub(crate) enum Cmd {
    CheckGeneration {
        volume: VolumeId,
        gen: Generation,
        tx: Reply<()>,
    },
    AssignSegment {
        volume: VolumeId,
        segment: SegmentIndex,
        segment_blocks: u64,
        tx: Reply<()>,
    },
    ReleaseSegment {
        volume: VolumeId,
        segment: SegmentIndex,
        tx: Reply<Vec<u32>>,
    },
    ExtentStates {
        extents: Vec<u32>,
        tx: Reply<Vec<ExtentPhase>>,
    },
    Write {
        volume: VolumeId,
        start: BlockIndex,
        crcs: Vec<u32>,
        data: Bytes,
        tx: Done,
        /// When the command was handed to the engine (the `engine_queue` stage).
        sent: std::time::Instant,
    },
    Read {
        volume: VolumeId,
        epoch: Epoch,
        start: BlockIndex,
        count: u32,
        tx: Respond<ReadResult>,
    },
    Flush {
        tx: Reply<()>,
    },
    Trim {
        volume: VolumeId,
        range: BlockRange,
        tx: Reply<()>,
    },
    Allocated {
        volume: VolumeId,
        range: BlockRange,
        tx: Reply<Vec<u8>>,
    },
    Snapshot {
        volume: VolumeId,
        epoch: Epoch,
        tx: Reply<()>,
    },
    ChangedBlocks {
        volume: VolumeId,
        segment: SegmentIndex,
        from: Epoch,
        to: Epoch,
        tx: Reply<Vec<BlockRange>>,
    },
    DeleteLayer {
        volume: VolumeId,
        segment: SegmentIndex,
        epoch: Epoch,
        tx: Reply<Vec<u32>>,
    },
    Layers {
        volume: VolumeId,
        segment: SegmentIndex,
        tx: Reply<Vec<Epoch>>,
    },
    WriteIntents {
        volume: VolumeId,
        tx: Reply<Vec<BlockRange>>,
    },
    ClearIntents {
        volume: VolumeId,
        ranges: Vec<BlockRange>,
        tx: Reply<()>,
    },
    /// Runs with the pipeline drained (no write in flight).
    Scrub {
        volume: VolumeId,
        segment: SegmentIndex,
        cursor: u64,
        max_blocks: u32,
        tx: Reply<ScrubChunk>,
    },
    /// Runs with the pipeline drained (no write in flight).
    RepairBlock {
        volume: VolumeId,
        epoch: Epoch,
        block: BlockIndex,
        bad_crc: u32,
        data: Bytes,
        crc: u32,
        tx: Reply<bool>,
    },
    /// Test hook: wait until no extent is dirty or zeroing (or the timeout passes).
    WaitZeroed {
        tx: Reply<bool>,
        deadline: std::time::Instant,
    },
    /// Forces a checkpoint now.
    Checkpoint {
        tx: Reply<()>,
    },
    /// Stops the thread at once: no checkpoint, queued commands dropped (a simulated crash).
    Crash,
    /// Clean stop: finish queued commands, checkpoint, close.
    Shutdown,
}

/// Owns the disk. Dropping it stops the engine cleanly (as [`Engine::shutdown`]).
#[derive(Debug)]
pub struct Engine {
    tx: mpsc::Sender<Cmd>,
    waker: Arc<uring::Waker>,
    thread: Option<JoinHandle<Result<(), EngineError>>>,
}

/// Cheap to clone; every method talks to the engine thread by channel.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    waker: Arc<uring::Waker>,
    node_id: NodeId,
    stats: Arc<StatsCell>,
    segments: Arc<RwLock<Vec<(VolumeId, SegmentIndex, u64)>>>,
}

impl Engine {
    /// Opens a formatted disk, replays its journal and starts the engine thread.
    pub fn open(path: &Path, opts: EngineOptions) -> Result<(Engine, EngineHandle), EngineError> {
        let stats = Arc::new(StatsCell::default());
        let segments = Arc::new(RwLock::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let (core, node_id, waker) = core::Core::open(path, opts, Arc::clone(&stats), Arc::clone(&segments))?;
        let thread = std::thread::Builder::new()
            .name(format!("slate-engine-{}", path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into())))
            .spawn(move || core.run(&rx))
            .map_err(EngineError::Io)?;
        let handle = EngineHandle { tx: tx.clone(), waker: Arc::clone(&waker), node_id, stats, segments };
        Ok((Engine { tx, waker, thread: Some(thread) }, handle))
    }

    /// Clean stop: queued commands are finished, a checkpoint is written, the disk closed.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        self.stop(Cmd::Shutdown)
    }

    /// Simulated crash (for tests): the engine thread stops at once, without a
    /// checkpoint; queued and in-progress commands get no reply (their callers
    /// see [`EngineError::ShuttingDown`]). The on-disk state is whatever the
    /// last completed I/O left, exactly as after a process kill.
    pub fn crash(mut self) -> Result<(), EngineError> {
        self.stop(Cmd::Crash)
    }

    fn stop(&mut self, cmd: Cmd) -> Result<(), EngineError> {
        let Some(thread) = self.thread.take() else { return Ok(()) };
        let _ = self.tx.send(cmd);
        self.waker.notify();
        match thread.join() {
            Ok(r) => r,
            Err(_) => Err(EngineError::Failed("engine thread panicked".into())),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Cmd::Shutdown) {
            tracing::warn!(error = %e, "engine shutdown on drop failed");
        }
    }
}

impl EngineHandle {
    /// The node recorded in the disk's superblock.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| EngineError::ShuttingDown)?;
        self.waker.notify();
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Fencing: Ok if `gen` >= the highest generation persisted for `volume` (raising it
    /// durably if greater); `StaleGeneration` if older. Survives restart.
    pub async fn check_generation(&self, volume: VolumeId, gen: Generation) -> Result<(), EngineError> {
        self.call(|tx| Cmd::CheckGeneration { volume, gen, tx }).await
    }

    /// Records that this node holds `segment` of `volume` (idempotent; a different
    /// `segment_blocks` for an existing segment is refused). Extents are allocated lazily.
    pub async fn assign_segment(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        segment_blocks: u64,
    ) -> Result<(), EngineError> {
        self.call(|tx| Cmd::AssignSegment { volume, segment, segment_blocks, tx }).await
    }

    /// Drops the segment: all its layers' extents go to dirty, then zeroing. Returns the
    /// extents it released (every layer's, durable as dirty when this returns); empty if the
    /// segment is not held here. Idempotent: a repeated release returns an empty list.
    /// Follow them with [`Self::extent_states`]: an extent released here that is no longer
    /// `Dirty` or `Zeroing` has been zeroed and verified (only the zeroer makes it `Free`,
    /// and allocation only takes `Free` extents).
    pub async fn release_segment(&self, volume: VolumeId, segment: SegmentIndex) -> Result<Vec<u32>, EngineError> {
        self.call(|tx| Cmd::ReleaseSegment { volume, segment, tx }).await
    }

    /// The lifecycle phase of each extent id (`OutOfRange` for ids the disk does not have),
    /// as durable on disk when this returns (at most [`MAX_EXTENT_QUERY`] ids per call).
    pub async fn extent_states(&self, extents: Vec<u32>) -> Result<Vec<ExtentPhase>, EngineError> {
        if extents.len() > MAX_EXTENT_QUERY {
            return Err(EngineError::Invalid(format!("{} extents queried, at most {MAX_EXTENT_QUERY}", extents.len())));
        }
        self.call(|tx| Cmd::ExtentStates { extents, tx }).await
    }

    /// The segments held: (volume, segment, segment_blocks).
    pub fn segments(&self) -> Vec<(VolumeId, SegmentIndex, u64)> {
        self.segments.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Writes `crcs.len()` whole blocks from `start` (volume block numbers, within one
    /// segment). Checks each crc on arrival (`BadCrc`). Durable when it returns Ok.
    pub async fn write(
        &self,
        volume: VolumeId,
        start: BlockIndex,
        crcs: Vec<u32>,
        data: Bytes,
    ) -> Result<(), EngineError> {
        check_write(start, &crcs, &data)?;
        let sent = std::time::Instant::now();
        self.call(|tx| Cmd::Write { volume, start, crcs, data, tx: Done::Slot(tx), sent }).await
    }

    /// [`Self::write`] without a task waiting: `on_done` is called with the outcome, on the
    /// engine thread once the write is durable (or at once if it is refused here). The data
    /// plane answers its client from there, saving a task wake-up per write.
    pub fn write_with(&self, volume: VolumeId, start: BlockIndex, crcs: Vec<u32>, data: Bytes, on_done: OnDone) {
        if let Err(e) = check_write(start, &crcs, &data) {
            return on_done(Err(e));
        }
        let sent = std::time::Instant::now();
        match self.tx.send(Cmd::Write { volume, start, crcs, data, tx: Done::Call(on_done), sent }) {
            Ok(()) => self.waker.notify(),
            Err(mpsc::SendError(cmd)) => {
                if let Cmd::Write { tx, .. } = cmd {
                    tx.send(Err(EngineError::ShuttingDown));
                }
            }
        }
    }

    /// Checks every written block of a read against its stored crc.
    fn verify_read(&self, start: BlockIndex, r: ReadResult) -> Result<ReadResult, EngineError> {
        for (i, block) in r.data.chunks_exact(BLOCK_SIZE_BYTES).enumerate() {
            let written = r.written.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1);
            if written && crc32c::crc32c(block) != r.crcs[i] {
                self.stats.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                return Err(EngineError::Corrupt { block: BlockIndex(start.0.saturating_add(i as u64)) });
            }
        }
        Ok(r)
    }

    /// Reads `count` blocks of the head (writable layer) from `start`; checks the stored
    /// crc of every written block (`Corrupt`).
    pub async fn read(&self, volume: VolumeId, start: BlockIndex, count: u32) -> Result<ReadResult, EngineError> {
        let r = self.call(|tx| Cmd::Read { volume, epoch: HEAD_EPOCH, start, count, tx: Respond::Slot(tx) }).await?;
        self.verify_read(start, r)
    }

    /// [`Self::read`] without a task waiting: `on_done` is called on the engine thread with
    /// the checked data (the crc check runs there too, so keep these reads small).
    pub fn read_with(&self, volume: VolumeId, start: BlockIndex, count: u32, on_done: OnDone<ReadResult>) {
        let handle = self.clone();
        let on_done: OnDone<ReadResult> = Box::new(move |r| on_done(r.and_then(|r| handle.verify_read(start, r))));
        match self.tx.send(Cmd::Read { volume, epoch: HEAD_EPOCH, start, count, tx: Respond::Call(on_done) }) {
            Ok(()) => self.waker.notify(),
            Err(mpsc::SendError(cmd)) => {
                if let Cmd::Read { tx, .. } = cmd {
                    tx.send(Err(EngineError::ShuttingDown));
                }
            }
        }
    }

    /// Reads blocks as they were in the snapshot frozen at `epoch` (`HEAD_EPOCH`: the head).
    pub async fn read_at(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        start: BlockIndex,
        count: u32,
    ) -> Result<ReadResult, EngineError> {
        let r = self.call(|tx| Cmd::Read { volume, epoch, start, count, tx: Respond::Slot(tx) }).await?;
        self.verify_read(start, r)
    }

    /// A barrier: every write acknowledged before it is durable (they are already).
    pub async fn flush(&self, _volume: VolumeId) -> Result<(), EngineError> {
        self.call(|tx| Cmd::Flush { tx }).await
    }

    /// Blocks read as unwritten (zeros) afterwards; whole extents are released to zeroing.
    pub async fn trim(&self, volume: VolumeId, range: BlockRange) -> Result<(), EngineError> {
        self.call(|tx| Cmd::Trim { volume, range, tx }).await
    }

    /// Same visible result as [`Self::trim`]: the blocks read as zeros.
    pub async fn write_zeroes(&self, volume: VolumeId, range: BlockRange) -> Result<(), EngineError> {
        self.call(|tx| Cmd::Trim { volume, range, tx }).await
    }

    /// One bit per block of `range` (LSB first): set where the block holds data (any layer).
    pub async fn allocated(&self, volume: VolumeId, range: BlockRange) -> Result<Vec<u8>, EngineError> {
        self.call(|tx| Cmd::Allocated { volume, range, tx }).await
    }

    /// Freezes the head layer of every local segment of `volume` at `epoch` (which must be
    /// greater than every earlier snapshot epoch of those segments; repeating the latest
    /// one is a no-op). Later writes go to a new head layer.
    pub async fn snapshot(&self, volume: VolumeId, epoch: Epoch) -> Result<(), EngineError> {
        self.call(|tx| Cmd::Snapshot { volume, epoch, tx }).await
    }

    /// Blocks written or trimmed in the layers frozen after `from` up to and including `to`
    /// (`from = Epoch(0)`: from the beginning; `to = HEAD_EPOCH`: including the head).
    pub async fn changed_blocks(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        from: Epoch,
        to: Epoch,
    ) -> Result<Vec<BlockRange>, EngineError> {
        self.call(|tx| Cmd::ChangedBlocks { volume, segment, from, to, tx }).await
    }

    /// Deletes the snapshot frozen at `epoch`: its layer is folded into the next newer
    /// layer (blocks still visible there are moved or copied), then its extents go to
    /// dirty and zeroing. Reads of newer layers are unchanged. Returns the extents it
    /// released to dirty (those moved to the newer layer are not among them).
    pub async fn delete_layer(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        epoch: Epoch,
    ) -> Result<Vec<u32>, EngineError> {
        self.call(|tx| Cmd::DeleteLayer { volume, segment, epoch, tx }).await
    }

    /// The snapshot epochs of a segment, oldest first (the head is not listed).
    pub async fn layers(&self, volume: VolumeId, segment: SegmentIndex) -> Result<Vec<Epoch>, EngineError> {
        self.call(|tx| Cmd::Layers { volume, segment, tx }).await
    }

    /// Scrubs the next written blocks of every layer of a segment: reads each, checks it
    /// against its stored crc32c and reports those that fail.
    ///
    /// `cursor` is a position in the segment's layers laid end to end in the order of
    /// their ids (oldest layer first, the head last; ids never change and a new snapshot's
    /// head gets a higher id): layer id `k` covers `k * segment_blocks ..
    /// (k + 1) * segment_blocks`, and within it the segment block. Start at 0 and pass
    /// `next_cursor` back until it is `None`. A layer created or folded between calls
    /// keeps the order (blocks a fold moves to a newer layer may be checked twice).
    ///
    /// Each call is one step of the engine thread, taken with no write in flight: it
    /// reads at most `max_blocks` (clamped to 1 ..= [`MAX_SCRUB_BLOCKS`]) blocks and
    /// visits at most 64 times as many block positions, so tenant I/O waits at most
    /// one such step.
    pub async fn scrub(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        cursor: u64,
        max_blocks: u32,
    ) -> Result<ScrubChunk, EngineError> {
        self.call(|tx| Cmd::Scrub { volume, segment, cursor, max_blocks, tx }).await
    }

    /// Rewrites volume block `block` in the layer named by `epoch` ([`HEAD_EPOCH`]: the
    /// head) with `data` (one block whose crc32c is `crc`), but only if that layer holds
    /// the block with stored crc `bad_crc` and its data there still fails that crc: a
    /// repair that raced a newer write of the block never overwrites the newer data.
    /// Returns whether it wrote. Durable when it returns.
    pub async fn repair_block(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        block: BlockIndex,
        bad_crc: u32,
        data: Bytes,
        crc: u32,
    ) -> Result<bool, EngineError> {
        if data.len() != BLOCK_SIZE_BYTES {
            return Err(EngineError::Invalid(format!("repair with {} bytes", data.len())));
        }
        if crc32c::crc32c(&data) != crc {
            return Err(EngineError::BadCrc { block });
        }
        self.call(|tx| Cmd::RepairBlock { volume, epoch, block, bad_crc, data, crc, tx }).await
    }

    /// Regions (volume blocks) that may hold incomplete writes or differ between replicas.
    pub async fn write_intents(&self, volume: VolumeId) -> Result<Vec<BlockRange>, EngineError> {
        self.call(|tx| Cmd::WriteIntents { volume, tx }).await
    }

    /// Clears intent regions fully covered by `ranges` (after the client reconciled them).
    pub async fn clear_intents(&self, volume: VolumeId, ranges: Vec<BlockRange>) -> Result<(), EngineError> {
        self.call(|tx| Cmd::ClearIntents { volume, ranges, tx }).await
    }

    /// Waits until no extent is dirty or zeroing; false if `timeout` passed first.
    pub async fn wait_zeroed(&self, timeout: std::time::Duration) -> Result<bool, EngineError> {
        let deadline = std::time::Instant::now() + timeout;
        self.call(|tx| Cmd::WaitZeroed { tx, deadline }).await
    }

    /// Writes a checkpoint now (dirty metadata pages home, journal tail advanced).
    pub async fn checkpoint(&self) -> Result<(), EngineError> {
        self.call(|tx| Cmd::Checkpoint { tx }).await
    }

    /// Counters for metrics.
    pub fn stats(&self) -> EngineStats {
        self.stats.snapshot()
    }
}
