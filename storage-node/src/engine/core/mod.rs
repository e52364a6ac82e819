//! The engine thread: owns the disk, the ring and all metadata; turns queued
//! commands into group-committed batches; runs the zeroer, checkpoints and
//! crash recovery.
//!
//! One struct, [`Core`], owned by the thread; its `impl` is split by
//! responsibility:
//! - [`commit`]: the thread's loop and the write path, from a command taken off
//!   the channel to its durable reply (batching, data writes, the journal entry,
//!   fdatasync, replies).
//! - [`read`]: reads: planning through the layer stack, submission, completion.
//! - [`commands`]: planning of every other command (trims, metadata commands, queries).
//! - [`records`]: journal records applied to the in-RAM state, live and in replay
//!   alike; synchronous commits for work that runs with the pipeline drained.
//! - [`recovery`]: opening a disk: checkpoint, extent table, journal replay, indexes.
//! - [`cache`]: chunk pages (per-block crcs and bitmaps) through the bounded page cache.
//! - [`alloc`]: allocation of verified-zero extents; extent phases and counters.
//! - [`zeroer`]: dirty extents back to verified zero, rate-limited, between batches.
//! - [`checkpoint`]: writing metadata home and moving the journal tail.
//! - [`background`]: work between batches and work that needs the pipeline drained.
//! - [`intents`]: write-intent regions: recording, lazy and explicit clearing.
//! - [`fencing`]: the highest generation per volume.
//! - [`segments`]: segment assignment and release, volume blocks to segment pieces.
//! - [`layers`]: snapshot layers: resolution, creation, changed blocks, deletion by folding.
//! - [`scrub`]: scrub and repair of single blocks.
//!
//! Pages changed by a batch are pinned in the cache until its entry is durable
//! (never written home before the journal describes them). Between batches the
//! zeroer takes a rate-limited step and checkpoints run when the journal is
//! half full or on a timer.

mod alloc;
mod background;
mod cache;
mod checkpoint;
mod commands;
mod commit;
mod fencing;
mod intents;
mod layers;
mod read;
mod records;
mod recovery;
mod scrub;
mod segments;
mod zeroer;

use super::journal::{JournalRing, Record};
use super::layout::{Checkpoint, Superblock};
use super::meta::{Catalog, ExtentTable, PageCache};
use super::uring::{AlignedBuf, AsyncRing, Disk, Waker};
use super::zero::Zeroing;
use super::{Cmd, EngineError, EngineOptions, Reply, StatsCell};
use commit::{Commit, Item};
use intents::IntentLive;
use read::ReadOp;
use slate_protocol::{SegmentIndex, VolumeId};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use zeroer::ZeroJob;

type SegKey = (VolumeId, SegmentIndex);
type SegList = Arc<RwLock<Vec<(VolumeId, SegmentIndex, u64)>>>;

/// Most blocks in one read or write command.
const MAX_IO_BLOCKS: usize = 8192;

/// Cache pages a single command may pin (bounds trims); the cache holds at least 4x this.
const PIN_BUDGET_PAGES: usize = 640;

/// A failpoint that simulates a crash: true if configured (feature `failpoints`).
fn crash_point(name: &str) -> bool {
    let _ = name;
    fail::fail_point!(name, |_| true);
    false
}

/// Everything the engine thread owns. Its fields are private to this module and
/// its submodules, which implement it by responsibility (see above).
#[derive(Debug)]
pub(super) struct Core {
    disk: Disk,
    sb: Superblock,
    opts: EngineOptions,
    et: ExtentTable,
    cat: Catalog,
    cache: PageCache,
    journal: JournalRing,
    ckpt: Checkpoint,
    durable_lsn: u64,
    pending: Vec<Record>,
    free: BTreeSet<u32>,
    dirty: VecDeque<u32>,
    queued_dirty: BTreeSet<u32>,
    /// lsn of the entry that released a dirty extent, while that entry is not yet durable.
    dirty_at: HashMap<u32, u64>,
    zero_job: Option<ZeroJob>,
    /// Extents of a zeroed batch (synced) waiting for their verify read after `zero_job`.
    verify_queue: VecDeque<u32>,
    zero_tokens: f64,
    zero_refill: Instant,
    zero_buf: AlignedBuf,
    verify_buf: AlignedBuf,
    zeroing: Zeroing,
    intents_live: HashMap<(VolumeId, u64), IntentLive>,
    vol_geom: HashMap<VolumeId, u64>,
    stats: Arc<StatsCell>,
    segments_pub: SegList,
    segments_changed: bool,
    failed: Option<String>,
    crashed: bool,
    replaying: bool,
    ring: AsyncRing,
    waker: Arc<Waker>,
    /// Commands waiting to be planned (arrival order).
    queue: VecDeque<Cmd>,
    /// Planned commands waiting for their commit (arrival order).
    fifo: VecDeque<Item>,
    fifo_record_bytes: usize,
    committing: Option<Commit>,
    reads: HashMap<u64, ReadOp>,
    /// In-flight reads per extent (the zeroer leaves those extents alone).
    read_extents: HashMap<u32, u32>,
    inflight_data_bytes: usize,
    next_seq: u64,
    /// The command being planned (pins the pages it changes).
    cur_seq: u64,
    committed_seq: u64,
    /// Chunk pages written home since the last fdatasync, with the fsync epoch then.
    evicted_unsynced: HashMap<u64, u64>,
    fsync_epoch: u64,
    want_checkpoint: bool,
    /// Client items in the last commit, and a moving average of commit latency: a
    /// commit that would carry fewer items than the last one waits up to half a
    /// commit latency for more to arrive (group commit under concurrency; no
    /// wait at queue depth 1).
    last_commit_items: usize,
    commit_latency: Duration,
    commit_started: Instant,
    gather_until: Option<Instant>,
    last_ckpt: Instant,
    last_intent_scan: Instant,
    waiters: Vec<(Reply<bool>, Instant)>,
    max_entry_bytes: usize,
}

impl Core {
    /// Enters the failed state: later mutations fail with `Failed`.
    pub(super) fn fail(&mut self, why: String) -> EngineError {
        tracing::error!(reason = %why, "disk engine failed; refusing further writes");
        self.failed = Some(why.clone());
        EngineError::Failed(why)
    }
}
