//! The engine thread: owns the disk, the ring and all metadata; turns queued
//! commands into group-committed batches; runs the zeroer, checkpoints and
//! crash recovery.
//!
//! One batch = everything queued when the thread wakes (up to a bound), cut
//! before the first command whose blocks overlap a data I/O already in the
//! batch, so overlapping requests are applied in arrival order and two writes
//! to one physical block are never in flight together. Planning a command
//! changes the in-RAM state and emits journal records through [`Core::emit`],
//! which applies each record with the same [`Core::apply`] that replay uses:
//! live operation and recovery cannot disagree. Then:
//!
//! 1. if the batch touches write-intent regions not yet recorded, one small
//!    entry with those intents + fdatasync (so an intent is durable before any
//!    data it covers can reach the disk);
//! 2. the data writes, the reads and the batch's journal entry in one io_uring
//!    submission, an fdatasync drained behind them;
//! 3. only then the replies.
//!
//! Pages changed by a batch are pinned in the cache until its entry is durable
//! (never written home before the journal describes them). Between batches the
//! zeroer takes a rate-limited step and checkpoints run when the journal is
//! half full or on a timer.

use super::journal::{decode_entry, encode_entry, entry_blocks, JournalRing, Record};
use super::layout::{read_superblock, Checkpoint, Superblock, BLOCK, CHUNK_BLOCKS, MAGIC_CHUNK};
use super::meta::{
    Catalog, ChunkPage, ExtentEntry, ExtentState, ExtentTable, LayerMeta, PageCache, SegMeta, CACHE_ENTRY_BYTES,
    MAX_LAYERS,
};
use super::uring::{AlignedBuf, AsyncRing, Completion, Disk, Fsync, Io, Waker, ALIGN};
use super::zero::{ZeroMethod, Zeroing};
use super::{
    Cmd, CorruptBlock, EngineError, EngineOptions, ExtentPhase, ReadResult, Reply, ScrubChunk, StatsCell, HEAD_EPOCH,
    MAX_SCRUB_BLOCKS,
};
use bytes::Bytes;
use slate_protocol::{BlockIndex, BlockRange, Epoch, Generation, NodeId, SegmentIndex, VolumeId};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

type SegKey = (VolumeId, SegmentIndex);
type SegList = Arc<RwLock<Vec<(VolumeId, SegmentIndex, u64)>>>;

/// Bytes written (and then read back) per zeroer step.
const ZERO_STEP_BYTES: usize = 256 << 10;
/// Bytes zeroed per step by a cheap primitive (zero-range, device write-zeroes).
const OFFLOAD_STEP_BYTES: usize = 16 << 20;
/// Extents zeroed by a cheap primitive before one shared fdatasync.
const ZERO_BATCH_EXTENTS: usize = 8;
/// Rate-limiter cost of one cheap zeroing call, whatever its length.
const OFFLOAD_COST_BYTES: f64 = (64 << 10) as f64;
/// A verify read costs this fraction of its length.
const VERIFY_COST_FRACTION: f64 = 0.25;
/// Zero verification failures before an extent is retired.
const MAX_ZERO_FAILURES: u8 = 3;
/// Most blocks in one read or write command.
const MAX_IO_BLOCKS: usize = 8192;
/// Most blocks in one trim / allocated command (one default segment).
const MAX_RANGE_BLOCKS: u64 = 1 << 18;
/// Most write-intent regions held (all volumes); beyond it the longest idle are cleared.
const MAX_INTENTS: usize = 1 << 16;
/// Most volumes with a recorded generation.
const MAX_VOLUMES: usize = 1 << 16;
/// Cache pages a single command may pin (bounds trims); the cache holds at least 4x this.
const PIN_BUDGET_PAGES: usize = 640;
/// Data bytes (write and read buffers) one batch may hold.
const MAX_BATCH_DATA_BYTES: usize = 64 << 20;
/// Background records that are committed on their own once this many are pending.
const PENDING_FLUSH_RECORDS: usize = 512;

/// A failpoint that simulates a crash: true if configured (feature `failpoints`).
fn crash_point(name: &str) -> bool {
    let _ = name;
    fail::fail_point!(name, |_| true);
    false
}

/// What a queued command replies once its commit is durable.
#[derive(Debug)]
enum ItemReply {
    /// Background records (zeroer, lazy intent clears): nobody waits.
    None,
    Unit(Reply<()>),
    Ranges(Reply<Vec<BlockRange>>, Vec<BlockRange>),
    Bitmap(Reply<Vec<u8>>, Vec<u8>),
    Epochs(Reply<Vec<Epoch>>, Vec<Epoch>),
    Extents(Reply<Vec<u32>>, Vec<u32>),
    Phases(Reply<Vec<ExtentPhase>>, Vec<ExtentPhase>),
}

/// The data I/O of a queued write.
#[derive(Debug)]
enum DataState {
    None,
    /// Waiting for the commit of its write-intent item (`after`).
    Deferred {
        buf: AlignedBuf,
        parts: Vec<(bool, u64, usize, usize)>,
        after: u64,
        range: (VolumeId, u64, u64),
    },
    InFlight {
        range: (VolumeId, u64, u64),
    },
    Done,
}

/// A planned command between planning and its durable reply, in arrival order.
#[derive(Debug)]
struct Item {
    seq: u64,
    records: Vec<Record>,
    record_bytes: usize,
    reply: ItemReply,
    data: DataState,
    /// Volume blocks this uncommitted write covers (for ordering overlapping requests).
    range: Option<(VolumeId, u64, u64)>,
    io_err: Option<String>,
    planned_at: Instant,
}

/// The commit in flight: one journal entry and its fdatasync.
#[derive(Debug)]
struct Commit {
    items: Vec<Item>,
    lsn: u64,
    at: u64,
    nblocks: u64,
    last_seq: u64,
    epoch: u64,
    /// The entry is written (and, if `drained`, synced).
    entry_done: bool,
    drained: bool,
    /// Items of this commit whose data is still being written.
    data_pending: usize,
    fsync_started: bool,
}

/// A read in flight.
#[derive(Debug)]
struct ReadOp {
    tx: Reply<ReadResult>,
    written: Vec<u8>,
    crcs: Vec<u32>,
    range: (VolumeId, u64, u64),
    extents: Vec<u32>,
}

const COMMIT_TOKEN: u64 = 1 << 63;
const COMMIT_FSYNC_TOKEN: u64 = COMMIT_TOKEN | 1;
const READ_TOKEN: u64 = 1 << 62;

/// What planning one command produced: journal records, and write-intent records
/// that must be durable before the command's data may reach the disk.
#[derive(Debug, Default)]
struct Batch {
    records: Vec<Record>,
    intent_records: Vec<Record>,
    record_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
enum ZeroPhase {
    Write(usize),
    Verify(usize),
}

#[derive(Debug, Clone, Copy)]
struct ZeroJob {
    extent: u32,
    phase: ZeroPhase,
}

#[derive(Debug, Clone, Copy)]
struct IntentLive {
    /// Recovered at open (a crash may have left the region inconsistent): only
    /// `clear_intents` removes it.
    sticky: bool,
    last_use: Instant,
}

/// Where a block of a segment layer stack resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Data { extent: u32, off: u32, crc: u32 },
    Zero,
    Unwritten,
}

#[derive(Debug)]
pub(crate) struct Core {
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
    /// Opens the disk, loads the last checkpoint, replays the journal, checkpoints.
    pub fn open(
        path: &Path,
        opts: EngineOptions,
        stats: Arc<StatsCell>,
        segments_pub: SegList,
    ) -> Result<(Self, NodeId, Arc<Waker>), EngineError> {
        let mut disk = Disk::open(path)?;
        let sb = read_superblock(&mut disk)?;
        if sb.total_blocks * BLOCK > disk.size_bytes() {
            return Err(EngineError::Format("device smaller than its superblock says".into()));
        }
        let nonce = sb.nonce;
        // Checkpoint: the valid slot with the highest sequence.
        let mut cb = AlignedBuf::zeroed(2 * ALIGN);
        disk.read_at(Superblock::off(sb.ckpt_start), &mut cb)?;
        let ckpt = [Checkpoint::decode(&cb[..ALIGN], nonce), Checkpoint::decode(&cb[ALIGN..], nonce)]
            .into_iter()
            .flatten()
            .max_by_key(|c| c.seq)
            .ok_or_else(|| EngineError::Format("no valid checkpoint block".into()))?;
        if ckpt.tail_off >= sb.journal_blocks {
            return Err(EngineError::Format("checkpoint journal tail out of range".into()));
        }
        // Catalog copy written by that checkpoint.
        let cat_at = Superblock::off(sb.catalog_start + u64::from(ckpt.catalog_copy) * sb.catalog_blocks);
        let mut first = AlignedBuf::zeroed(ALIGN);
        disk.read_at(cat_at, &mut first)?;
        let len =
            Catalog::blob_len(&first, nonce).ok_or_else(|| EngineError::Format("catalog header invalid".into()))?;
        if len as u64 > sb.catalog_blocks * BLOCK {
            return Err(EngineError::Format("catalog length out of range".into()));
        }
        let mut blob = AlignedBuf::zeroed(len);
        disk.read_at(cat_at, &mut blob)?;
        let (cat, _) = Catalog::decode(&blob, nonce)?;
        // Extent table: both slots of every page, newest valid wins.
        let mut et = ExtentTable::fresh(sb.extent_count);
        let pages_per_read = 128u64;
        let mut p = 0;
        while p < sb.et_pages {
            let n = pages_per_read.min(sb.et_pages - p);
            let mut buf = AlignedBuf::zeroed((2 * n) as usize * ALIGN);
            disk.read_at(Superblock::off(sb.et_page_block(p, 0)), &mut buf)?;
            for i in 0..n {
                let page = p + i;
                let s0 = &buf[(2 * i) as usize * ALIGN..(2 * i + 1) as usize * ALIGN];
                let s1 = &buf[(2 * i + 1) as usize * ALIGN..(2 * i + 2) as usize * ALIGN];
                let l0 = super::layout::check_page(s0, super::layout::MAGIC_ET, nonce, page);
                let l1 = super::layout::check_page(s1, super::layout::MAGIC_ET, nonce, page);
                let slot = match (l0, l1) {
                    (Some(a), Some(b)) => u8::from(b > a),
                    (Some(_), None) => 0,
                    (None, Some(_)) => 1,
                    (None, None) => {
                        return Err(EngineError::Format(format!("extent table page {page}: both copies invalid")))
                    }
                };
                et.decode_page(if slot == 0 { s0 } else { s1 }, page, nonce)?;
                et.newest_slot[page as usize] = slot;
            }
            p += n;
        }
        let cache_pages = usize::try_from(opts.metadata_cache_bytes / CACHE_ENTRY_BYTES)
            .unwrap_or(usize::MAX)
            .max(4 * PIN_BUDGET_PAGES);
        let journal = JournalRing {
            start: sb.journal_start,
            blocks: sb.journal_blocks,
            head: ckpt.tail_off,
            next_lsn: ckpt.tail_lsn,
            tail: ckpt.tail_off,
            tail_lsn: ckpt.tail_lsn,
        };
        let max_entry_bytes = usize::try_from((sb.journal_blocks * BLOCK) / 8).unwrap_or(usize::MAX).min(16 << 20);
        stats.metadata_cache_limit_bytes.store(cache_pages as u64 * CACHE_ENTRY_BYTES, Ordering::Relaxed);
        stats.capacity_bytes.store(sb.extent_count * sb.extent_blocks * BLOCK, Ordering::Relaxed);
        stats.extent_size_bytes.store(sb.extent_blocks * BLOCK, Ordering::Relaxed);
        stats.extents_total.store(sb.extent_count, Ordering::Relaxed);
        let node_id = sb.node_id;
        let now = Instant::now();
        let waker = Arc::new(Waker::new()?);
        let ring = AsyncRing::new(&disk, Arc::clone(&waker))?;
        let zeroing = Zeroing::for_file(disk.file(), opts.zero_with_writes)?;
        tracing::debug!(
            method = zeroing.method().name(),
            block_device = zeroing.is_block(),
            cheap = zeroing.is_cheap(),
            "zeroing primitive"
        );
        let mut core = Core {
            disk,
            opts,
            et,
            cat,
            cache: PageCache::new(cache_pages),
            journal,
            ckpt,
            durable_lsn: ckpt.tail_lsn.saturating_sub(1),
            pending: Vec::new(),
            free: BTreeSet::new(),
            dirty: VecDeque::new(),
            queued_dirty: BTreeSet::new(),
            dirty_at: HashMap::new(),
            zero_job: None,
            verify_queue: VecDeque::new(),
            zero_tokens: 0.0,
            zero_refill: now,
            zero_buf: AlignedBuf::zeroed(ZERO_STEP_BYTES),
            verify_buf: AlignedBuf::zeroed(ZERO_STEP_BYTES),
            zeroing,
            intents_live: HashMap::new(),
            vol_geom: HashMap::new(),
            stats,
            segments_pub,
            segments_changed: true,
            failed: None,
            crashed: false,
            replaying: true,
            ring,
            waker: Arc::clone(&waker),
            queue: VecDeque::new(),
            fifo: VecDeque::new(),
            fifo_record_bytes: 0,
            committing: None,
            reads: HashMap::new(),
            read_extents: HashMap::new(),
            inflight_data_bytes: 0,
            next_seq: 0,
            cur_seq: 0,
            committed_seq: 0,
            evicted_unsynced: HashMap::new(),
            fsync_epoch: 0,
            want_checkpoint: false,
            last_commit_items: 1,
            commit_latency: Duration::from_micros(200),
            commit_started: now,
            gather_until: None,
            last_ckpt: now,
            last_intent_scan: now,
            waiters: Vec::new(),
            max_entry_bytes,
            sb,
        };
        core.rebuild_indexes();
        core.replay()?;
        core.replaying = false;
        core.rebuild_indexes();
        for (v, set) in &core.cat.intents {
            for r in set {
                core.intents_live.insert((*v, *r), IntentLive { sticky: true, last_use: now });
            }
        }
        core.checkpoint()?;
        // Finish layer deletions a crash interrupted.
        let deleting: Vec<(SegKey, u64)> =
            core.cat.segments.iter().filter_map(|(k, s)| s.deleting.map(|d| (*k, d))).collect();
        for (key, layer) in deleting {
            core.fold_layer(key, layer)?;
        }
        core.publish();
        Ok((core, node_id, waker))
    }

    /// Rebuilds the free list, the zeroer queue and the layer maps from the extent
    /// table and the catalog. Owned extents that no catalog layer claims go to dirty.
    fn rebuild_indexes(&mut self) {
        self.free.clear();
        self.dirty.clear();
        self.queued_dirty.clear();
        self.vol_geom.clear();
        for (key, seg) in &mut self.cat.segments {
            self.vol_geom.insert(key.0, seg.blocks);
            for l in &mut seg.layers {
                l.extents.clear();
            }
        }
        let mut orphans = Vec::new();
        for (i, e) in self.et.entries.iter().enumerate() {
            let id = i as u32;
            match e.state {
                ExtentState::Free => {
                    self.free.insert(id);
                }
                ExtentState::Dirty | ExtentState::Zeroing => {
                    if self.queued_dirty.insert(id) {
                        self.dirty.push_back(id);
                    }
                }
                ExtentState::Owned => {
                    let layer = self
                        .cat
                        .segments
                        .get_mut(&(e.volume, e.segment))
                        .and_then(|s| s.layers.iter_mut().find(|l| l.id == e.layer));
                    match layer {
                        Some(l) if !l.extents.contains_key(&e.slot) => {
                            l.extents.insert(e.slot, id);
                        }
                        _ => orphans.push(id),
                    }
                }
                ExtentState::Failed => {}
            }
        }
        for id in orphans {
            if !self.replaying {
                tracing::warn!(extent = id, "owned extent not claimed by any segment layer; zeroing it");
            }
            let mut e = self.et.entries[id as usize];
            e.state = ExtentState::Dirty;
            self.et.set(id, e);
            if self.queued_dirty.insert(id) {
                self.dirty.push_back(id);
            }
        }
        self.update_extent_stats();
    }

    fn update_extent_stats(&self) {
        let mut counts = [0u64; 6];
        for e in &self.et.entries {
            counts[e.state as usize] += 1;
        }
        let s = &self.stats;
        s.extents_free.store(counts[ExtentState::Free as usize], Ordering::Relaxed);
        s.extents_owned.store(counts[ExtentState::Owned as usize], Ordering::Relaxed);
        s.extents_dirty.store(counts[ExtentState::Dirty as usize], Ordering::Relaxed);
        s.extents_zeroing.store(counts[ExtentState::Zeroing as usize], Ordering::Relaxed);
        s.extents_failed.store(counts[ExtentState::Failed as usize], Ordering::Relaxed);
    }

    fn stat_extent_move(&self, from: ExtentState, to: ExtentState) {
        let counter = |st: ExtentState| match st {
            ExtentState::Free => &self.stats.extents_free,
            ExtentState::Owned => &self.stats.extents_owned,
            ExtentState::Dirty => &self.stats.extents_dirty,
            ExtentState::Zeroing => &self.stats.extents_zeroing,
            ExtentState::Failed => &self.stats.extents_failed,
        };
        if from != to {
            let _ = counter(from).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
            counter(to).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Replays journal entries from the checkpoint's tail.
    fn replay(&mut self) -> Result<(), EngineError> {
        let mut replayed = 0u64;
        loop {
            let lsn = self.journal.next_lsn;
            let Some((at, n, records)) = self.read_entry(lsn)? else { break };
            self.durable_lsn = lsn;
            for r in &records {
                self.apply(r, lsn)?;
            }
            self.journal.advance(at, n);
            replayed += 1;
        }
        if !self.evicted_unsynced.is_empty() {
            self.disk.sync()?;
            self.evicted_unsynced.clear();
        }
        if replayed > 0 {
            tracing::info!(entries = replayed, last_lsn = self.durable_lsn, "journal replayed");
        }
        Ok(())
    }

    /// Reads the entry with `lsn` at the journal head (or, after a wrap, at offset 0).
    fn read_entry(&mut self, lsn: u64) -> Result<Option<(u64, u64, Vec<Record>)>, EngineError> {
        let nonce = self.sb.nonce;
        let mut candidates = vec![self.journal.head];
        if self.journal.head != 0 {
            candidates.push(0);
        }
        for at in candidates {
            let mut first = AlignedBuf::zeroed(ALIGN);
            self.disk.read_at(self.journal.disk_offset(at), &mut first)?;
            let Some(n) = entry_blocks(&first, nonce, lsn) else { continue };
            if at + n > self.journal.blocks {
                continue;
            }
            let buf = if n == 1 {
                first
            } else {
                let mut b = AlignedBuf::zeroed(n as usize * ALIGN);
                self.disk.read_at(self.journal.disk_offset(at), &mut b)?;
                b
            };
            if let Some(records) = decode_entry(&buf) {
                return Ok(Some((at, n, records)));
            }
        }
        Ok(None)
    }

    // ----- chunk pages -----

    fn page_of(&self, extent: u32, off: u32) -> (u64, usize) {
        let page = u64::from(extent) * self.sb.pages_per_extent + u64::from(off) / CHUNK_BLOCKS;
        (page, (u64::from(off) % CHUNK_BLOCKS) as usize)
    }

    /// Makes sure `page` is cached, reading both slots from disk if needed.
    fn load_page(&mut self, page: u64) -> Result<(), EngineError> {
        if self.cache.contains(page) {
            return Ok(());
        }
        self.make_room()?;
        let extent = (page / self.sb.pages_per_extent) as usize;
        let alloc_lsn = self.et.entries.get(extent).map_or(u64::MAX, |e| e.alloc_lsn);
        let mut buf = AlignedBuf::zeroed(2 * ALIGN);
        self.disk.read_at(Superblock::off(self.sb.chunk_page_block(page, 0)), &mut buf)?;
        let nonce = self.sb.nonce;
        let a = ChunkPage::decode(&buf[..ALIGN], MAGIC_CHUNK, nonce, page);
        let b = ChunkPage::decode(&buf[ALIGN..], MAGIC_CHUNK, nonce, page);
        let (content, lsn, slot) = match (a, b) {
            (Some((pa, la)), Some((pb, lb))) => {
                if lb > la {
                    (pb, lb, 1)
                } else {
                    (pa, la, 0)
                }
            }
            (Some((pa, la)), None) => (pa, la, 0),
            (None, Some((pb, lb))) => (pb, lb, 1),
            (None, None) => (ChunkPage::default(), 0, 1),
        };
        // A page last written before the extent's current allocation belongs to a previous owner.
        let content = if lsn >= alloc_lsn { content } else { ChunkPage::default() };
        self.cache.insert(page, content, slot);
        self.stats.metadata_page_loads.fetch_add(1, Ordering::Relaxed);
        self.note_cache_size();
        Ok(())
    }

    fn note_cache_size(&self) {
        let bytes = self.cache.len() as u64 * CACHE_ENTRY_BYTES;
        self.stats.metadata_cache_bytes.store(bytes, Ordering::Relaxed);
        self.stats.metadata_cache_bytes_peak.fetch_max(bytes, Ordering::Relaxed);
    }

    /// Evicts least recently used unpinned pages until there is room for one more;
    /// dirty ones are written home (to their older slot) first.
    fn make_room(&mut self) -> Result<(), EngineError> {
        while self.cache.len() >= self.cache.cap() {
            let Some(victim) = self.cache.victim() else { break };
            let Some(c) = self.cache.peek(victim) else { break };
            if c.dirty {
                let slot = 1 - c.newest_slot;
                let buf = c.page.encode(MAGIC_CHUNK, self.sb.nonce, victim, self.durable_lsn);
                if self.evicted_unsynced.contains_key(&victim) {
                    // Its other slot was written since the last fdatasync: make that one
                    // stable before overwriting this one.
                    self.disk.sync()?;
                    self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                    self.evicted_unsynced.clear();
                }
                self.disk.write_at(Superblock::off(self.sb.chunk_page_block(victim, slot)), &buf)?;
                self.evicted_unsynced.insert(victim, self.fsync_epoch);
            }
            self.cache.remove(victim);
            self.stats.metadata_page_evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Forgets cached (unpinned) pages of an extent that no longer has an owner.
    fn drop_cached_pages(&mut self, extent: u32) {
        for p in 0..self.sb.pages_per_extent {
            let page = u64::from(extent) * self.sb.pages_per_extent + p;
            if self.cache.peek(page).is_some_and(|c| !c.pinned()) {
                self.cache.remove(page);
            }
        }
        self.note_cache_size();
    }

    fn page_bits(&mut self, extent: u32, off: u32) -> Result<(bool, bool, u32), EngineError> {
        let (page, i) = self.page_of(extent, off);
        self.load_page(page)?;
        let c = self.cache.get(page).ok_or_else(|| EngineError::Failed("page vanished from cache".into()))?;
        Ok((c.page.is_written(i), c.page.is_zero(i), c.page.crcs[i]))
    }

    /// Resolves segment block `sblock` through layers `0..=top`, newest first.
    fn resolve(&mut self, key: SegKey, top: usize, sblock: u64) -> Result<Loc, EngineError> {
        let eb = self.sb.extent_blocks;
        let slot = (sblock / eb) as u32;
        let off = (sblock % eb) as u32;
        for li in (0..=top).rev() {
            let ext = self.cat.segments.get(&key).and_then(|s| s.layers.get(li)).and_then(|l| l.extents.get(&slot));
            let Some(&extent) = ext else { continue };
            let (w, z, crc) = self.page_bits(extent, off)?;
            if w {
                return Ok(Loc::Data { extent, off, crc });
            }
            if z {
                return Ok(Loc::Zero);
            }
        }
        Ok(Loc::Unwritten)
    }

    // ----- records -----

    /// Applies a record to the in-RAM state and queues it for the batch's entry.
    fn emit(&mut self, out: &mut Vec<Record>, r: Record) -> Result<(), EngineError> {
        let lsn = self.durable_lsn + 1;
        self.apply(&r, lsn)?;
        out.push(r);
        Ok(())
    }

    fn emit_pending(&mut self, r: Record) -> Result<(), EngineError> {
        let mut v = std::mem::take(&mut self.pending);
        let res = self.emit(&mut v, r);
        self.pending = v;
        res
    }

    /// Applies one record. Used live (through `emit`) and by replay, so both agree.
    /// Records name only things the engine wrote; a record that does not fit the
    /// state is a format error, never a panic.
    fn apply(&mut self, r: &Record, lsn: u64) -> Result<(), EngineError> {
        let bad = |what: String| EngineError::Format(format!("journal record does not fit the state: {what}"));
        let eb = self.sb.extent_blocks;
        match r {
            Record::Alloc { extent, volume, segment, layer, slot } => {
                let e = *self.et.get(*extent).ok_or_else(|| bad(format!("extent {extent}")))?;
                if !self.replaying {
                    // The one invariant that erasure rests on: only verified-zero extents are handed out.
                    assert!(
                        e.state == ExtentState::Free && self.free.contains(extent),
                        "allocating extent {extent} in state {:?}: only verified-zero extents may be allocated",
                        e.state
                    );
                }
                self.stat_extent_move(e.state, ExtentState::Owned);
                self.et.set(
                    *extent,
                    ExtentEntry {
                        state: ExtentState::Owned,
                        zero_failures: 0,
                        slot: *slot,
                        volume: *volume,
                        segment: *segment,
                        layer: *layer,
                        alloc_lsn: lsn,
                    },
                );
                self.free.remove(extent);
                if let Some(l) = self
                    .cat
                    .segments
                    .get_mut(&(*volume, *segment))
                    .and_then(|s| s.layers.iter_mut().find(|l| l.id == *layer))
                {
                    l.extents.insert(*slot, *extent);
                }
                for p in 0..self.sb.pages_per_extent {
                    self.cache.reset_clean(u64::from(*extent) * self.sb.pages_per_extent + p);
                }
            }
            Record::Reown { extent, layer } => {
                let mut e = *self.et.get(*extent).ok_or_else(|| bad(format!("extent {extent}")))?;
                if let Some(seg) = self.cat.segments.get_mut(&(e.volume, e.segment)) {
                    if let Some(l) = seg.layers.iter_mut().find(|l| l.id == e.layer) {
                        if l.extents.get(&e.slot) == Some(extent) {
                            l.extents.remove(&e.slot);
                        }
                    }
                    if let Some(l) = seg.layers.iter_mut().find(|l| l.id == *layer) {
                        l.extents.insert(e.slot, *extent);
                    }
                }
                e.layer = *layer;
                self.et.set(*extent, e);
            }
            Record::State { extent, state } => {
                let st = ExtentState::from_u8(*state).ok_or_else(|| bad(format!("state {state}")))?;
                let mut e = *self.et.get(*extent).ok_or_else(|| bad(format!("extent {extent}")))?;
                if e.state == ExtentState::Owned && st != ExtentState::Owned {
                    if let Some(l) = self
                        .cat
                        .segments
                        .get_mut(&(e.volume, e.segment))
                        .and_then(|s| s.layers.iter_mut().find(|l| l.id == e.layer))
                    {
                        if l.extents.get(&e.slot) == Some(extent) {
                            l.extents.remove(&e.slot);
                        }
                    }
                }
                self.stat_extent_move(e.state, st);
                match st {
                    ExtentState::Dirty => {
                        if !self.replaying {
                            self.dirty_at.insert(*extent, lsn);
                        }
                        e = ExtentEntry { zero_failures: e.zero_failures, ..ExtentEntry::dirty() };
                        self.free.remove(extent);
                        if self.queued_dirty.insert(*extent) {
                            self.dirty.push_back(*extent);
                        }
                    }
                    ExtentState::Zeroing => e.state = st,
                    ExtentState::Free => {
                        e.state = st;
                        e.zero_failures = 0;
                        self.free.insert(*extent);
                        self.queued_dirty.remove(extent);
                    }
                    ExtentState::Failed => {
                        e.state = st;
                        self.free.remove(extent);
                        self.queued_dirty.remove(extent);
                    }
                    ExtentState::Owned => return Err(bad("state record to owned".into())),
                }
                self.et.set(*extent, e);
            }
            Record::Write { extent, offset, crcs } => {
                if u64::from(*offset) + crcs.len() as u64 > eb || *extent as u64 >= self.sb.extent_count {
                    return Err(bad(format!("write {extent}+{offset}")));
                }
                for (i, crc) in crcs.iter().enumerate() {
                    let (page, idx) = self.page_of(*extent, offset + i as u32);
                    self.load_page(page)?;
                    if let Some(p) = self.cache.modify(page, if self.replaying { 0 } else { self.cur_seq }) {
                        p.set_written(idx, *crc);
                    }
                }
            }
            Record::Trim { extent, offset, count, zero } => {
                if u64::from(*offset) + u64::from(*count) > eb || *extent as u64 >= self.sb.extent_count {
                    return Err(bad(format!("trim {extent}+{offset}")));
                }
                for i in 0..*count {
                    let (page, idx) = self.page_of(*extent, offset + i);
                    self.load_page(page)?;
                    if let Some(p) = self.cache.modify(page, if self.replaying { 0 } else { self.cur_seq }) {
                        if *zero {
                            p.set_zero(idx);
                        } else {
                            p.clear(idx);
                        }
                    }
                }
            }
            Record::Generation { volume, gen } => {
                let cur = self.cat.generations.entry(*volume).or_insert(*gen);
                *cur = (*cur).max(*gen);
            }
            Record::Assign { volume, segment, blocks } => {
                self.cat.segments.entry((*volume, *segment)).or_insert_with(|| SegMeta {
                    blocks: *blocks,
                    next_layer_id: 1,
                    deleting: None,
                    layers: vec![LayerMeta { id: 0, base: Epoch(0), extents: BTreeMap::new() }],
                });
                self.vol_geom.insert(*volume, *blocks);
                self.segments_changed = true;
            }
            Record::Release { volume, segment } => {
                self.cat.segments.remove(&(*volume, *segment));
                if !self
                    .cat
                    .segments
                    .range((*volume, SegmentIndex(0))..=(*volume, SegmentIndex(u32::MAX)))
                    .any(|_| true)
                {
                    self.vol_geom.remove(volume);
                }
                self.segments_changed = true;
            }
            Record::LayerCreate { volume, segment, layer, base } => {
                let seg = self.cat.segments.get_mut(&(*volume, *segment)).ok_or_else(|| bad("layer create".into()))?;
                if !seg.layers.iter().any(|l| l.id == *layer) {
                    seg.layers.push(LayerMeta { id: *layer, base: *base, extents: BTreeMap::new() });
                }
                seg.next_layer_id = seg.next_layer_id.max(layer + 1);
            }
            Record::LayerDeleting { volume, segment, layer } => {
                let seg = self.cat.segments.get_mut(&(*volume, *segment)).ok_or_else(|| bad("layer delete".into()))?;
                seg.deleting = Some(*layer);
            }
            Record::LayerMerged { volume, segment, removed, into, base } => {
                let seg = self.cat.segments.get_mut(&(*volume, *segment)).ok_or_else(|| bad("layer merge".into()))?;
                seg.layers.retain(|l| l.id != *removed);
                if let Some(l) = seg.layers.iter_mut().find(|l| l.id == *into) {
                    l.base = *base;
                }
                if seg.layers.is_empty() {
                    return Err(bad("merge removed the last layer".into()));
                }
                seg.deleting = None;
            }
            Record::IntentSet { volume, region } => {
                self.cat.intents.entry(*volume).or_default().insert(*region);
            }
            Record::IntentClear { volume, region } => {
                if let Some(set) = self.cat.intents.get_mut(volume) {
                    set.remove(region);
                    if set.is_empty() {
                        self.cat.intents.remove(volume);
                    }
                }
            }
        }
        Ok(())
    }

    // ----- journal commits -----

    /// Writes `pending + records` as one entry and makes it durable (data I/O, if
    /// any, must already be complete and synced by the caller when it matters).
    fn commit_records(&mut self, records: Vec<Record>) -> Result<(), EngineError> {
        debug_assert!(self.fifo.is_empty() && self.committing.is_none(), "sync commit with a busy pipeline");
        let mut all = std::mem::take(&mut self.pending);
        all.extend(records);
        if all.is_empty() {
            if !self.evicted_unsynced.is_empty() {
                self.disk.sync()?;
                self.evicted_unsynced.clear();
            }
            return Ok(());
        }
        let lsn = self.journal.next_lsn;
        let entry = encode_entry(self.sb.nonce, lsn, &all);
        let n = (entry.len() / ALIGN) as u64;
        let at = self.place_entry(n)?;
        let res = self.disk.run(&mut [Io::Write { offset: self.journal.disk_offset(at), buf: &entry }], true);
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.stats.journal_bytes_written.fetch_add(entry.len() as u64, Ordering::Relaxed);
        if let Err(e) = res.first_error() {
            return Err(self.fail(format!("journal write failed: {e}")));
        }
        self.journal.advance(at, n);
        self.durable_lsn = lsn;
        self.evicted_unsynced.clear();
        self.committed_seq = self.committed_seq.max(self.cur_seq);
        self.cache.unpin_upto(u64::MAX);
        Ok(())
    }

    fn place_entry(&mut self, n: u64) -> Result<u64, EngineError> {
        self.journal.place(n).ok_or_else(|| self.fail("journal full (entry larger than the free journal space)".into()))
    }

    /// Enters the failed state: later mutations fail with `Failed`.
    fn fail(&mut self, why: String) -> EngineError {
        tracing::error!(reason = %why, "disk engine failed; refusing further writes");
        self.failed = Some(why.clone());
        EngineError::Failed(why)
    }

    // ----- checkpoint -----

    /// Writes every dirty page and the catalog home, syncs, then moves the journal tail.
    fn checkpoint(&mut self) -> Result<(), EngineError> {
        if self.failed.is_some() {
            return Ok(());
        }
        self.commit_records(Vec::new())?;
        let lsn = self.durable_lsn;
        let nonce = self.sb.nonce;
        let mut writes: Vec<(u64, AlignedBuf)> = Vec::new();
        let dirty_chunks = self.cache.dirty_pages();
        for p in &dirty_chunks {
            if let Some(c) = self.cache.peek(*p) {
                let slot = 1 - c.newest_slot;
                writes.push((self.sb.chunk_page_block(*p, slot), c.page.encode(MAGIC_CHUNK, nonce, *p, lsn)));
            }
        }
        let dirty_et: Vec<u64> = self.et.dirty_pages.iter().copied().collect();
        for p in &dirty_et {
            let slot = 1 - self.et.newest_slot[*p as usize];
            writes.push((self.sb.et_page_block(*p, slot), self.et.encode_page(*p, nonce, lsn)));
        }
        let copy = 1 - self.ckpt.catalog_copy;
        let catalog = self.cat.encode(nonce, lsn);
        if catalog.len() as u64 > self.sb.catalog_blocks * BLOCK {
            return Err(self.fail("catalog larger than its region".into()));
        }
        writes.push((self.sb.catalog_start + u64::from(copy) * self.sb.catalog_blocks, catalog));
        for chunk in writes.chunks(128) {
            let mut ios: Vec<Io<'_>> =
                chunk.iter().map(|(blk, buf)| Io::Write { offset: Superblock::off(*blk), buf: &buf[..] }).collect();
            if let Err(e) = self.disk.run(&mut ios, false).first_error() {
                return Err(self.fail(format!("checkpoint write failed: {e}")));
            }
        }
        if let Err(e) = self.disk.sync() {
            return Err(self.fail(format!("checkpoint sync failed: {e}")));
        }
        if crash_point("mid_checkpoint") {
            self.crashed = true;
            return Ok(());
        }
        for p in dirty_chunks {
            let slot = self.cache.peek(p).map_or(0, |c| 1 - c.newest_slot);
            self.cache.mark_written(p, slot);
        }
        for p in dirty_et {
            self.et.newest_slot[p as usize] = 1 - self.et.newest_slot[p as usize];
        }
        self.et.dirty_pages.clear();
        let ckpt = Checkpoint {
            seq: self.ckpt.seq + 1,
            tail_lsn: self.journal.next_lsn,
            tail_off: self.journal.head,
            catalog_copy: copy,
            lsn,
        };
        let block = self.sb.ckpt_start + ckpt.seq % 2;
        let res = self.disk.run(&mut [Io::Write { offset: Superblock::off(block), buf: &ckpt.encode(nonce) }], true);
        if let Err(e) = res.first_error() {
            return Err(self.fail(format!("checkpoint block write failed: {e}")));
        }
        self.ckpt = ckpt;
        self.journal.tail = self.journal.head;
        self.journal.tail_lsn = self.journal.next_lsn;
        self.evicted_unsynced.clear();
        self.last_ckpt = Instant::now();
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.stats.fsyncs.fetch_add(2, Ordering::Relaxed);
        Ok(())
    }

    // ----- allocation and zeroing -----

    /// Takes a verified-zero extent for `slot` of layer `layer`; zeroes one at full
    /// speed if none is free but some are dirty.
    fn alloc(&mut self, out: &mut Vec<Record>, key: SegKey, layer: u64, slot: u32) -> Result<u32, EngineError> {
        while self.free.is_empty() {
            if !self.has_zero_work() {
                return Err(EngineError::NoSpace);
            }
            self.zero_step(true)?;
            if self.crashed {
                return Err(EngineError::ShuttingDown);
            }
        }
        let extent = *self.free.iter().next().ok_or(EngineError::NoSpace)?;
        self.emit(out, Record::Alloc { extent, volume: key.0, segment: key.1, layer, slot })?;
        Ok(extent)
    }

    fn has_zero_work(&self) -> bool {
        self.zero_job.is_some()
            || self.dirty.iter().any(|e| self.dirty_at.get(e).is_none_or(|l| *l <= self.durable_lsn))
    }

    fn refill_tokens(&mut self) {
        let now = Instant::now();
        let rate = self.opts.zero_rate_bytes_per_sec;
        if rate == u64::MAX {
            self.zero_tokens = f64::MAX;
        } else {
            let dt = now.duration_since(self.zero_refill).as_secs_f64();
            self.zero_tokens = (self.zero_tokens + dt * rate as f64).min((2 * ZERO_STEP_BYTES) as f64);
        }
        self.zero_refill = now;
    }

    /// One step of the zeroer: write or verify up to `ZERO_STEP_BYTES` of the current
    /// dirty extent. Returns false if there was nothing to do.
    fn zero_step(&mut self, urgent: bool) -> Result<bool, EngineError> {
        if self.failed.is_some() {
            return Ok(false);
        }
        let job = if let Some(j) = self.zero_job {
            j
        } else {
            // Only extents whose release is durable: an unacknowledged release must
            // not destroy data that a crash would bring back. With a cheap primitive,
            // several extents are zeroed and share one fdatasync.
            let durable = self.durable_lsn;
            let batch_max = if self.zeroing.is_cheap() { ZERO_BATCH_EXTENTS } else { 1 };
            let mut picked = Vec::new();
            let mut skipped = false;
            while picked.len() < batch_max {
                let pos = self.dirty.iter().position(|e| {
                    self.dirty_at.get(e).is_none_or(|l| *l <= durable) && !self.read_extents.contains_key(e)
                });
                let Some(extent) = pos.and_then(|p| self.dirty.remove(p)) else { break };
                self.dirty_at.remove(&extent);
                let st = self.et.get(extent).map(|e| e.state);
                if !matches!(st, Some(ExtentState::Dirty | ExtentState::Zeroing)) {
                    self.queued_dirty.remove(&extent);
                    skipped = true;
                    continue;
                }
                self.emit_pending(Record::State { extent, state: ExtentState::Zeroing as u8 })?;
                picked.push(extent);
            }
            match picked.len() {
                0 => return Ok(skipped),
                1 => {
                    let j = ZeroJob { extent: picked[0], phase: ZeroPhase::Write(0) };
                    self.zero_job = Some(j);
                    j
                }
                _ => return self.zero_batch(&picked, urgent),
            }
        };
        let ext_bytes = (self.sb.extent_blocks * BLOCK) as usize;
        let base = Superblock::off(self.sb.extent_block(job.extent));
        match job.phase {
            ZeroPhase::Write(done) => {
                if done == 0 {
                    // Erase the extent's per-block metadata (crcs, bitmaps) as well: the
                    // previous owner's metadata goes with its data.
                    self.drop_cached_pages(job.extent);
                    let first = self.sb.chunk_page_block(u64::from(job.extent) * self.sb.pages_per_extent, 0);
                    let total = (2 * self.sb.pages_per_extent) as usize * ALIGN;
                    if let Err(e) = self.zero_range(Superblock::off(first), total, false) {
                        return Err(self.fail(format!("zeroing metadata failed: {e}")));
                    }
                }
                let step = if self.zeroing.is_cheap() { OFFLOAD_STEP_BYTES } else { ZERO_STEP_BYTES };
                let mut len = step.min(ext_bytes - done);
                let half = ext_bytes / 2;
                let crash_mid = done < half && done + len >= half && crash_point("mid_zeroing");
                if crash_mid {
                    // Simulated crash with the extent half zeroed.
                    len = half - done;
                }
                let cost = match self.zero_range(base + done as u64, len, true) {
                    Ok(c) => c,
                    Err(e) => return Err(self.fail(format!("zeroing failed: {e}"))),
                };
                if !urgent {
                    self.zero_tokens -= cost;
                }
                self.stats.bytes_zeroed_total.fetch_add(len as u64, Ordering::Relaxed);
                let done = done + len;
                if crash_mid {
                    self.crashed = true;
                    return Ok(true);
                }
                if done < ext_bytes {
                    self.zero_job = Some(ZeroJob { phase: ZeroPhase::Write(done), ..job });
                } else {
                    // Zeros must be on stable storage before they are verified and the
                    // extent is declared free.
                    if let Err(e) = self.disk.sync() {
                        return Err(self.fail(format!("zeroing sync failed: {e}")));
                    }
                    self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                    if crash_point("after_zeroing_before_verify") {
                        self.crashed = true;
                        return Ok(true);
                    }
                    self.zero_job = Some(ZeroJob { phase: ZeroPhase::Verify(0), ..job });
                }
            }
            ZeroPhase::Verify(done) => {
                let len = ZERO_STEP_BYTES.min(ext_bytes - done);
                let mut vb = std::mem::replace(&mut self.verify_buf, AlignedBuf::zeroed(ALIGN));
                let res = self.disk.read_at(base + done as u64, &mut vb[..len]);
                let all_zero = vb[..len].iter().all(|b| *b == 0);
                self.verify_buf = vb;
                if !urgent {
                    self.zero_tokens -= len as f64 * VERIFY_COST_FRACTION;
                }
                if let Err(e) = res {
                    return Err(self.fail(format!("zeroing verify read failed: {e}")));
                }
                if !all_zero {
                    let mut e = self.et.entries[job.extent as usize];
                    e.zero_failures = e.zero_failures.saturating_add(1);
                    tracing::warn!(extent = job.extent, failures = e.zero_failures, "zero verification failed");
                    let retire = e.zero_failures >= MAX_ZERO_FAILURES;
                    self.et.set(job.extent, e);
                    if retire {
                        self.emit_pending(Record::State { extent: job.extent, state: ExtentState::Failed as u8 })?;
                        self.zero_job = self.next_to_verify();
                    } else {
                        self.zero_job = Some(ZeroJob { phase: ZeroPhase::Write(0), ..job });
                    }
                    return Ok(true);
                }
                let done = done + len;
                if done < ext_bytes {
                    self.zero_job = Some(ZeroJob { phase: ZeroPhase::Verify(done), ..job });
                } else {
                    self.zero_job = self.next_to_verify();
                    self.emit_pending(Record::State { extent: job.extent, state: ExtentState::Free as u8 })?;
                    self.stats.extents_zeroed_total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(true)
    }

    /// The next extent of a zeroed batch waiting for its verify read.
    fn next_to_verify(&mut self) -> Option<ZeroJob> {
        self.verify_queue.pop_front().map(|extent| ZeroJob { extent, phase: ZeroPhase::Verify(0) })
    }

    /// Zeroes several extents (and their metadata pages) with the cheap primitive, one
    /// fdatasync for all, then queues them for their verify reads. One zeroer step.
    fn zero_batch(&mut self, extents: &[u32], urgent: bool) -> Result<bool, EngineError> {
        let ext_bytes = (self.sb.extent_blocks * BLOCK) as usize;
        let meta_bytes = (2 * self.sb.pages_per_extent) as usize * ALIGN;
        for (i, &extent) in extents.iter().enumerate() {
            self.drop_cached_pages(extent);
            let meta = Superblock::off(self.sb.chunk_page_block(u64::from(extent) * self.sb.pages_per_extent, 0));
            let base = Superblock::off(self.sb.extent_block(extent));
            let mut cost = match self.zero_range(meta, meta_bytes, false) {
                Ok(c) => c,
                Err(e) => return Err(self.fail(format!("zeroing metadata failed: {e}"))),
            };
            let mut done = 0usize;
            while done < ext_bytes {
                let mut len = OFFLOAD_STEP_BYTES.min(ext_bytes - done);
                let half = ext_bytes / 2;
                let crash_mid = i == 0 && done < half && done + len >= half && crash_point("mid_zeroing");
                if crash_mid {
                    // Simulated crash with the first extent half zeroed.
                    len = half - done;
                }
                cost += match self.zero_range(base + done as u64, len, true) {
                    Ok(c) => c,
                    Err(e) => return Err(self.fail(format!("zeroing failed: {e}"))),
                };
                self.stats.bytes_zeroed_total.fetch_add(len as u64, Ordering::Relaxed);
                if crash_mid {
                    self.crashed = true;
                    return Ok(true);
                }
                done += len;
            }
            if !urgent {
                self.zero_tokens -= cost;
            }
        }
        // Zeros must be on stable storage before they are verified and declared free.
        if let Err(e) = self.disk.sync() {
            return Err(self.fail(format!("zeroing sync failed: {e}")));
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        if crash_point("after_zeroing_before_verify") {
            self.crashed = true;
            return Ok(true);
        }
        self.verify_queue.extend(extents.iter().copied());
        self.zero_job = self.next_to_verify();
        Ok(true)
    }

    /// Zeroes `len` bytes at `offset` with the disk's cheapest primitive (writing zeros
    /// where there is none); not synced. Returns the rate-limiter cost; bytes of
    /// extent data (`data`) zeroed without writing are counted in the stats.
    fn zero_range(&mut self, offset: u64, len: usize, data: bool) -> std::io::Result<f64> {
        let cheap = self.zeroing.is_cheap();
        let method = self.zeroing.zero(self.disk.file(), offset, len as u64)?;
        if data && method != ZeroMethod::Overwrite {
            self.stats.bytes_zeroed_offload_total.fetch_add(len as u64, Ordering::Relaxed);
        }
        match method {
            ZeroMethod::Overwrite => {
                let mut at = 0usize;
                while at < len {
                    let n = (len - at).min(self.zero_buf.len());
                    self.disk.write_at(offset + at as u64, &self.zero_buf[..n])?;
                    at += n;
                }
                Ok(len as f64)
            }
            _ => Ok(if cheap { OFFLOAD_COST_BYTES } else { len as f64 }),
        }
    }

    // ----- the thread -----

    /// The engine thread's event loop.
    pub fn run(mut self, rx: &mpsc::Receiver<Cmd>) -> Result<(), EngineError> {
        let mut shutting_down = false;
        let mut completions: Vec<Completion> = Vec::new();
        loop {
            // Intake.
            if !shutting_down {
                loop {
                    match rx.try_recv() {
                        Ok(Cmd::Crash) => return Ok(()),
                        Ok(Cmd::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                            shutting_down = true;
                            break;
                        }
                        Ok(c) => self.queue.push_back(c),
                        Err(mpsc::TryRecvError::Empty) => break,
                    }
                }
            }
            self.plan_queue();
            if self.crashed {
                return Ok(());
            }
            self.submit_deferred();
            self.try_commit();
            if self.crashed {
                return Ok(());
            }
            if self.pipeline_idle() {
                self.run_drained_work();
                if self.crashed {
                    return Ok(());
                }
                if shutting_down && self.queue.is_empty() && self.pipeline_idle() {
                    return self.shutdown();
                }
            }
            if let Err(e) = self.background() {
                tracing::warn!(error = %e, "engine background work failed");
            }
            if self.crashed {
                return Ok(());
            }
            self.try_commit();
            // Wait for completions, a new command or the next background deadline.
            let timeout = self.wait_timeout(shutting_down);
            let blocking = !timeout.is_zero();
            if blocking && !shutting_down {
                self.waker.set_sleeping(true);
                match rx.try_recv() {
                    Ok(c) => {
                        self.waker.set_sleeping(false);
                        match c {
                            Cmd::Crash => return Ok(()),
                            Cmd::Shutdown => shutting_down = true,
                            c => self.queue.push_back(c),
                        }
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.waker.set_sleeping(false);
                        shutting_down = true;
                        continue;
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                }
            }
            let res = self.ring.wait(Some(timeout), &mut completions);
            self.waker.set_sleeping(false);
            if let Err(e) = res {
                let _ = self.fail(format!("io_uring wait failed: {e}"));
            }
            for c in completions.drain(..) {
                self.complete(c);
                if self.crashed {
                    return Ok(());
                }
            }
        }
    }

    /// No command is between planning and its durable reply, and no read is in flight.
    fn pipeline_idle(&self) -> bool {
        self.fifo.is_empty() && self.committing.is_none() && self.reads.is_empty()
    }

    /// How long the loop may block: not at all if something can be done now.
    fn wait_timeout(&mut self, shutting_down: bool) -> Duration {
        let plannable = self.queue.front().is_some_and(|c| self.can_plan(c));
        if plannable || (shutting_down && self.pipeline_idle()) {
            return Duration::ZERO;
        }
        if self.pipeline_idle() && self.queue.front().is_some() {
            return Duration::ZERO;
        }
        let mut t = Duration::from_millis(500);
        if let Some(until) = self.gather_until {
            t = t.min(until.saturating_duration_since(Instant::now()));
        }
        if self.has_zero_work() && self.failed.is_none() {
            self.refill_tokens();
            if self.zero_tokens >= ZERO_STEP_BYTES as f64 {
                return Duration::ZERO;
            }
            let rate = self.opts.zero_rate_bytes_per_sec.max(1) as f64;
            let wait = (ZERO_STEP_BYTES as f64 - self.zero_tokens) / rate;
            t = t.min(Duration::from_secs_f64(wait.clamp(0.0005, 0.5)));
        }
        if !self.pending.is_empty() || !self.waiters.is_empty() || !self.evicted_unsynced.is_empty() {
            t = t.min(Duration::from_millis(5));
        }
        if self.ring.busy() > 0 && t > Duration::from_millis(100) {
            // Completions wake the wait; the bound only keeps timers honest.
            t = Duration::from_millis(100);
        }
        t
    }

    /// Whether the command at the head of the queue can be planned now: it does not
    /// overlap blocks with uncommitted writes (or, for a write, in-flight reads), and
    /// the pipeline has room.
    fn can_plan(&self, cmd: &Cmd) -> bool {
        if self.want_checkpoint {
            return false;
        }
        if self.fifo.len() >= self.opts.max_batch_commands.max(1) * 2
            || self.inflight_data_bytes >= MAX_BATCH_DATA_BYTES
            || self.fifo_record_bytes >= self.max_entry_bytes * 2
            || self.cache.pinned_count() + PIN_BUDGET_PAGES > self.cache.cap()
        {
            return false;
        }
        let overlaps_write = |v: VolumeId, s: u64, e: u64| {
            self.fifo
                .iter()
                .chain(self.committing.iter().flat_map(|c| c.items.iter()))
                .filter_map(|i| i.range)
                .any(|(iv, is, ie)| iv == v && is < e && s < ie)
        };
        let overlaps_read =
            |v: VolumeId, s: u64, e: u64| self.reads.values().any(|r| r.range.0 == v && r.range.1 < e && s < r.range.2);
        match cmd {
            Cmd::Write { volume, start, crcs, .. } => {
                let end = start.0.saturating_add(crcs.len() as u64);
                !overlaps_write(*volume, start.0, end) && !overlaps_read(*volume, start.0, end)
            }
            Cmd::Read { volume, start, count, .. } => {
                !overlaps_write(*volume, start.0, start.0.saturating_add(u64::from(*count)))
            }
            // These run alone, with the pipeline drained.
            Cmd::DeleteLayer { .. } | Cmd::Checkpoint { .. } | Cmd::Scrub { .. } | Cmd::RepairBlock { .. } => false,
            _ => true,
        }
    }

    fn plan_queue(&mut self) {
        while let Some(cmd) = self.queue.front() {
            if !self.can_plan(cmd) {
                break;
            }
            let Some(cmd) = self.queue.pop_front() else { break };
            self.plan(cmd);
            if self.crashed {
                return;
            }
        }
    }

    fn new_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.cur_seq = self.next_seq;
        self.next_seq
    }

    /// Appends a planned command to the commit queue.
    fn push_item(&mut self, seq: u64, records: Vec<Record>, record_bytes: usize, reply: ItemReply, data: DataState) {
        let range = match &data {
            DataState::Deferred { range, .. } | DataState::InFlight { range } => Some(*range),
            DataState::None | DataState::Done => None,
        };
        self.fifo_record_bytes += record_bytes;
        self.fifo.push_back(Item {
            seq,
            records,
            record_bytes,
            reply,
            data,
            range,
            io_err: None,
            planned_at: Instant::now(),
        });
    }

    /// Records emitted by a command that then failed still have to be journaled.
    fn salvage(&mut self, b: Batch) {
        self.pending.extend(b.intent_records);
        self.pending.extend(b.records);
    }

    fn plan(&mut self, cmd: Cmd) {
        let failed = self.failed.clone().map(EngineError::Failed);
        let seq = self.new_seq();
        let mut b = Batch::default();
        match cmd {
            Cmd::Write { volume, start, crcs, data, tx } => {
                if let Some(e) = failed {
                    let _ = tx.send(Err(e));
                    return;
                }
                match self.plan_write(&mut b, volume, start, &crcs, &data) {
                    Ok((buf, parts)) => {
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                        self.stats.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
                        let range = (volume, start.0, start.0 + crcs.len() as u64);
                        let parts: Vec<(bool, u64, usize, usize)> =
                            parts.into_iter().map(|(off, s, e)| (true, off, s, e)).collect();
                        if b.intent_records.is_empty() {
                            self.inflight_data_bytes += buf.len();
                            self.ring.start(seq, buf, &parts, Fsync::No);
                            self.push_item(
                                seq,
                                b.records,
                                b.record_bytes,
                                ItemReply::Unit(tx),
                                DataState::InFlight { range },
                            );
                        } else {
                            // The intent must be durable before any of the data can reach the disk.
                            let intents = std::mem::take(&mut b.intent_records);
                            let n = intents.len() * 24;
                            self.push_item(seq, intents, n, ItemReply::None, DataState::None);
                            let wseq = self.new_seq();
                            self.push_item(
                                wseq,
                                b.records,
                                b.record_bytes,
                                ItemReply::Unit(tx),
                                DataState::Deferred { buf, parts, after: seq, range },
                            );
                        }
                    }
                    Err(e) => {
                        self.salvage(b);
                        let _ = tx.send(Err(e));
                    }
                }
            }
            Cmd::Read { volume, epoch, start, count, tx } => match self.plan_read(volume, epoch, start, count) {
                Ok((buf, parts, written, crcs)) => {
                    self.stats.reads.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes_read.fetch_add(u64::from(count) * BLOCK, Ordering::Relaxed);
                    if parts.is_empty() {
                        let len = crcs.len() * ALIGN;
                        let _ = tx.send(Ok(ReadResult { written, crcs, data: Bytes::from_owner(buf).slice(0..len) }));
                        return;
                    }
                    let extents: Vec<u32> = parts.iter().map(|p| self.extent_at(p.0)).collect();
                    for e in &extents {
                        *self.read_extents.entry(*e).or_insert(0) += 1;
                    }
                    let token = READ_TOKEN | seq;
                    let parts: Vec<(bool, u64, usize, usize)> =
                        parts.into_iter().map(|(off, s, e)| (false, off, s, e)).collect();
                    self.inflight_data_bytes += buf.len();
                    self.ring.start(token, buf, &parts, Fsync::No);
                    let range = (volume, start.0, start.0 + u64::from(count));
                    self.reads.insert(token, ReadOp { tx, written, crcs, range, extents });
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
            Cmd::Flush { tx } => match failed {
                Some(e) => {
                    let _ = tx.send(Err(e));
                }
                None => self.push_item(seq, Vec::new(), 0, ItemReply::Unit(tx), DataState::None),
            },
            Cmd::Trim { volume, range, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.plan_trim(&mut b, volume, range),
                };
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::CheckGeneration { volume, gen, tx } => {
                let r = self.check_generation(&mut b, volume, gen);
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::AssignSegment { volume, segment, segment_blocks, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.assign(&mut b, volume, segment, segment_blocks),
                };
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::ReleaseSegment { volume, segment, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.release(&mut b, volume, segment),
                };
                match r {
                    Ok(extents) => self.push_meta(seq, b, ItemReply::Extents(tx, extents)),
                    Err(e) => {
                        self.salvage(b);
                        let _ = tx.send(Err(e));
                    }
                }
            }
            Cmd::ExtentStates { extents, tx } => {
                // Answered after the next commit, so a phase reported is durable (a `free`
                // record the zeroer left pending is journaled first).
                let phases = extents.iter().map(|e| self.phase(*e)).collect();
                self.push_item(seq, Vec::new(), 0, ItemReply::Phases(tx, phases), DataState::None);
            }
            Cmd::Snapshot { volume, epoch, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.snapshot(&mut b, volume, epoch),
                };
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::ClearIntents { volume, ranges, tx } => {
                let r = self.clear_intents(&mut b, volume, &ranges);
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::Allocated { volume, range, tx } => match self.allocated(volume, range) {
                Ok(v) => self.push_item(seq, Vec::new(), 0, ItemReply::Bitmap(tx, v), DataState::None),
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
            Cmd::ChangedBlocks { volume, segment, from, to, tx } => {
                match self.changed_blocks((volume, segment), from, to) {
                    Ok(v) => self.push_item(seq, Vec::new(), 0, ItemReply::Ranges(tx, v), DataState::None),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            }
            Cmd::Layers { volume, segment, tx } => {
                match self
                    .cat
                    .segments
                    .get(&(volume, segment))
                    .map(|s| s.layers.iter().skip(1).map(|l| l.base).collect())
                {
                    Some(v) => self.push_item(seq, Vec::new(), 0, ItemReply::Epochs(tx, v), DataState::None),
                    None => {
                        let _ = tx.send(Err(EngineError::NotAssigned));
                    }
                }
            }
            Cmd::WriteIntents { volume, tx } => {
                let rb = self.opts.intent_region_blocks;
                let mut out: Vec<BlockRange> = Vec::new();
                for r in self.cat.intents.get(&volume).into_iter().flatten() {
                    let start = r * rb;
                    match out.last_mut() {
                        Some(last) if last.start.0 + last.count == start => last.count += rb,
                        _ => out.push(BlockRange { start: BlockIndex(start), count: rb }),
                    }
                }
                self.push_item(seq, Vec::new(), 0, ItemReply::Ranges(tx, out), DataState::None);
            }
            Cmd::WaitZeroed { tx, deadline } => self.waiters.push((tx, deadline)),
            // Never planned here (see can_plan / run_drained_work).
            Cmd::DeleteLayer { tx, .. } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            Cmd::Checkpoint { tx } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            Cmd::Scrub { tx, .. } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            Cmd::RepairBlock { tx, .. } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            Cmd::Crash | Cmd::Shutdown => {}
        }
    }

    /// A metadata command: its records wait for the next commit, its reply for that commit.
    fn finish_meta(&mut self, seq: u64, b: Batch, tx: Reply<()>, r: Result<(), EngineError>) {
        match r {
            Ok(()) => self.push_meta(seq, b, ItemReply::Unit(tx)),
            Err(e) => {
                self.salvage(b);
                let _ = tx.send(Err(e));
            }
        }
    }

    fn push_meta(&mut self, seq: u64, mut b: Batch, reply: ItemReply) {
        let mut records = std::mem::take(&mut b.intent_records);
        records.append(&mut b.records);
        let bytes = b.record_bytes + records.len() * 16;
        self.push_item(seq, records, bytes, reply, DataState::None);
    }

    /// The in-RAM lifecycle phase of extent `e`.
    fn phase(&self, e: u32) -> ExtentPhase {
        match self.et.get(e).map(|x| x.state) {
            None => ExtentPhase::OutOfRange,
            Some(ExtentState::Free) => ExtentPhase::Free,
            Some(ExtentState::Owned) => ExtentPhase::Owned,
            Some(ExtentState::Dirty) => ExtentPhase::Dirty,
            Some(ExtentState::Zeroing) => ExtentPhase::Zeroing,
            Some(ExtentState::Failed) => ExtentPhase::Failed,
        }
    }

    fn extent_at(&self, disk_offset: u64) -> u32 {
        ((disk_offset / BLOCK).saturating_sub(self.sb.data_start) / self.sb.extent_blocks) as u32
    }

    /// Starts the data of writes whose write-intent records are now durable.
    fn submit_deferred(&mut self) {
        let committed = self.committed_seq;
        for i in 0..self.fifo.len() {
            let ready = matches!(&self.fifo[i].data, DataState::Deferred { after, .. } if *after <= committed);
            if !ready {
                continue;
            }
            let seq = self.fifo[i].seq;
            let data = std::mem::replace(&mut self.fifo[i].data, DataState::None);
            if let DataState::Deferred { buf, parts, range, .. } = data {
                self.inflight_data_bytes += buf.len();
                self.ring.start(seq, buf, &parts, Fsync::No);
                self.fifo[i].data = DataState::InFlight { range };
            }
        }
    }

    /// Starts a commit of the longest prefix of the queue whose data is written: one
    /// journal entry (background records first, then the prefix's records in arrival
    /// order) and one fdatasync behind it.
    fn try_commit(&mut self) {
        if self.committing.is_some() || self.crashed {
            return;
        }
        let mut n = 0;
        let mut bytes = 0;
        for item in &self.fifo {
            // Data still being written may join: the fdatasync waits for it. Data not yet
            // submitted (waiting for its intent to be durable) may not.
            let ready = !matches!(item.data, DataState::Deferred { .. });
            if !ready || (n > 0 && bytes + item.record_bytes > self.max_entry_bytes) {
                break;
            }
            bytes += item.record_bytes;
            n += 1;
        }
        if n == 0 {
            // Background records alone (zeroer transitions, lazy intent clears) are
            // committed in bulk, when the zeroer has nothing left, or by a checkpoint.
            let flush = self.pending.len() >= PENDING_FLUSH_RECORDS || !self.has_zero_work();
            if self.pending.is_empty() || !self.fifo.is_empty() || !flush || self.want_checkpoint {
                return;
            }
        }
        // Gather: more commands are probably on their way (the last commit carried more).
        let clients = self.fifo.iter().take(n).filter(|i| !matches!(i.reply, ItemReply::None)).count();
        if n > 0 && clients < self.last_commit_items && !self.want_checkpoint {
            let window = (self.commit_latency / 2).min(Duration::from_micros(500));
            let until = self.fifo[0].planned_at + window;
            if Instant::now() < until {
                self.gather_until = Some(until);
                return;
            }
        }
        self.gather_until = None;
        self.last_commit_items = clients.max(1);
        self.commit_started = Instant::now();
        let items: Vec<Item> = self.fifo.drain(..n).collect();
        self.fifo_record_bytes = self.fifo_record_bytes.saturating_sub(bytes);
        let last_seq = items.last().map_or(self.committed_seq, |i| i.seq);
        let mut records = std::mem::take(&mut self.pending);
        for item in &items {
            records.extend(item.records.iter().cloned());
        }
        if let Some(f) = self.failed.clone() {
            Self::reply_items(items, Some(&f));
            return;
        }
        let data_pending = items.iter().filter(|i| matches!(i.data, DataState::InFlight { .. })).count();
        if records.is_empty() && data_pending == 0 {
            // Only queries and flushes: everything before them is durable already.
            self.committed_seq = self.committed_seq.max(last_seq);
            Self::reply_items(items, None);
            return;
        }
        if crash_point("after_data_write_before_journal") {
            self.crashed = true;
            return;
        }
        let lsn = self.journal.next_lsn;
        let entry = encode_entry(self.sb.nonce, lsn, &records);
        let nblocks = (entry.len() / ALIGN) as u64;
        let Some(at) = self.journal.place(nblocks) else {
            let j = &self.journal;
            let why = format!("journal full: entry {nblocks} blocks, head {} tail {} of {}", j.head, j.tail, j.blocks);
            let f = self.fail(why).to_string();
            Self::reply_items(items, Some(&f));
            return;
        };
        let offset = self.journal.disk_offset(at);
        if crash_point("after_journal_before_fsync") {
            let _ = self.disk.write_at(offset, &entry);
            self.crashed = true;
            return;
        }
        self.stats.journal_bytes_written.fetch_add(entry.len() as u64, Ordering::Relaxed);
        let len = entry.len();
        // With nothing else in flight but this commit's data, the fdatasync can be
        // drained behind the entry and the data in the same submission.
        let drained = self.ring.busy() == data_pending;
        let fsync = if drained { Fsync::Drain } else { Fsync::No };
        self.ring.start(COMMIT_TOKEN, entry, &[(true, offset, 0, len)], fsync);
        self.fsync_epoch += 1;
        self.committing = Some(Commit {
            items,
            lsn,
            at,
            nblocks,
            last_seq,
            epoch: self.fsync_epoch - 1,
            entry_done: false,
            drained,
            data_pending,
            fsync_started: drained,
        });
    }

    /// Starts the commit's fdatasync once its entry and all its data are written.
    fn maybe_commit_fsync(&mut self) {
        if let Some(c) = &mut self.committing {
            if c.entry_done && c.data_pending == 0 && !c.fsync_started {
                c.fsync_started = true;
                self.ring.start_fsync(COMMIT_FSYNC_TOKEN);
            }
        }
    }

    fn complete(&mut self, c: Completion) {
        if c.user == COMMIT_TOKEN {
            let done = match &mut self.committing {
                Some(commit) => {
                    commit.entry_done = true;
                    commit.drained || c.result.is_err()
                }
                None => return,
            };
            if done {
                self.finish_commit(c.result);
            } else {
                self.maybe_commit_fsync();
            }
        } else if c.user == COMMIT_FSYNC_TOKEN {
            self.finish_commit(c.result);
        } else if c.user & READ_TOKEN != 0 {
            let Some(op) = self.reads.remove(&c.user) else { return };
            for e in &op.extents {
                if let Some(n) = self.read_extents.get_mut(e) {
                    *n -= 1;
                    if *n == 0 {
                        self.read_extents.remove(e);
                    }
                }
            }
            let Some(buf) = c.buf else { return };
            self.inflight_data_bytes = self.inflight_data_bytes.saturating_sub(buf.len());
            let r = match c.result {
                Ok(()) => {
                    let len = op.crcs.len() * ALIGN;
                    Ok(ReadResult { written: op.written, crcs: op.crcs, data: Bytes::from_owner(buf).slice(0..len) })
                }
                Err(e) => Err(EngineError::Io(e)),
            };
            let _ = op.tx.send(r);
        } else {
            // A write's data.
            if let Some(buf) = &c.buf {
                self.inflight_data_bytes = self.inflight_data_bytes.saturating_sub(buf.len());
            }
            let err = c.result.err().map(|e| e.to_string());
            if let Ok(i) = self.fifo.binary_search_by_key(&c.user, |i| i.seq) {
                self.fifo[i].io_err = err;
                self.fifo[i].data = DataState::Done;
            } else if let Some(commit) = &mut self.committing {
                if let Ok(i) = commit.items.binary_search_by_key(&c.user, |i| i.seq) {
                    commit.items[i].io_err = err;
                    commit.items[i].data = DataState::Done;
                    commit.data_pending -= 1;
                }
                self.maybe_commit_fsync();
            }
        }
    }

    fn finish_commit(&mut self, result: std::io::Result<()>) {
        let Some(commit) = self.committing.take() else { return };
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            let f = self.fail(format!("journal commit failed: {e}")).to_string();
            Self::reply_items(commit.items, Some(&f));
            return;
        }
        self.journal.advance(commit.at, commit.nblocks);
        let took = self.commit_started.elapsed();
        self.commit_latency = (self.commit_latency * 7 + took) / 8;
        self.durable_lsn = commit.lsn;
        self.committed_seq = self.committed_seq.max(commit.last_seq);
        self.cache.unpin_upto(commit.last_seq);
        self.evicted_unsynced.retain(|_, e| *e > commit.epoch);
        if crash_point("before_ack") {
            self.crashed = true;
            return;
        }
        self.publish();
        Self::reply_items(commit.items, None);
        self.note_cache_size();
    }

    fn reply_items(items: Vec<Item>, failed: Option<&str>) {
        for item in items {
            let err = failed
                .map(|f| EngineError::Failed(f.to_string()))
                .or_else(|| item.io_err.map(|e| EngineError::Io(std::io::Error::other(e))));
            match item.reply {
                ItemReply::None => {}
                ItemReply::Unit(tx) => {
                    let _ = tx.send(err.map_or(Ok(()), Err));
                }
                ItemReply::Ranges(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Bitmap(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Epochs(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Extents(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Phases(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
            }
        }
    }

    /// Work that needs the pipeline drained: layer folds, explicit and due checkpoints.
    fn run_drained_work(&mut self) {
        while self.pipeline_idle() && !self.crashed {
            match self.queue.front() {
                Some(Cmd::DeleteLayer { .. }) => {
                    let Some(Cmd::DeleteLayer { volume, segment, epoch, tx }) = self.queue.pop_front() else { break };
                    let r = if let Some(f) = self.failed.clone() {
                        Err(EngineError::Failed(f))
                    } else {
                        self.new_seq();
                        self.delete_layer((volume, segment), epoch)
                    };
                    if self.crashed {
                        return;
                    }
                    self.publish();
                    let _ = tx.send(r);
                }
                Some(Cmd::Scrub { .. }) => {
                    let Some(Cmd::Scrub { volume, segment, cursor, max_blocks, tx }) = self.queue.pop_front() else {
                        break;
                    };
                    let r = self.scrub((volume, segment), cursor, max_blocks);
                    let _ = tx.send(r);
                }
                Some(Cmd::RepairBlock { .. }) => {
                    let Some(Cmd::RepairBlock { volume, epoch, block, bad_crc, data, crc, tx }) =
                        self.queue.pop_front()
                    else {
                        break;
                    };
                    let r = if let Some(f) = self.failed.clone() {
                        Err(EngineError::Failed(f))
                    } else {
                        self.new_seq();
                        self.repair_block(volume, epoch, block, bad_crc, &data, crc)
                    };
                    if self.crashed {
                        return;
                    }
                    let _ = tx.send(r);
                }
                Some(Cmd::Checkpoint { .. }) => {
                    let Some(Cmd::Checkpoint { tx }) = self.queue.pop_front() else { break };
                    let r = match self.failed.clone() {
                        Some(f) => Err(EngineError::Failed(f)),
                        None => self.checkpoint(),
                    };
                    if self.crashed {
                        return;
                    }
                    let _ = tx.send(r);
                }
                _ => break,
            }
        }
        if self.pipeline_idle() && self.want_checkpoint && self.failed.is_none() {
            if let Err(e) = self.checkpoint() {
                tracing::warn!(error = %e, "checkpoint failed");
            }
        }
        self.want_checkpoint = false;
    }

    /// Work between events: a zeroer step, lazy intent clearing, checkpoint triggers,
    /// syncing evicted pages, answering zero waiters.
    fn background(&mut self) -> Result<(), EngineError> {
        if self.failed.is_some() {
            self.answer_waiters();
            return Ok(());
        }
        if self.has_zero_work() {
            self.refill_tokens();
            if self.zero_tokens >= ZERO_STEP_BYTES as f64 {
                self.zero_step(false)?;
                if self.crashed {
                    return Ok(());
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(self.last_intent_scan) >= Duration::from_millis(500) {
            self.last_intent_scan = now;
            self.clear_idle_intents(now)?;
        }
        let journal_quarter = self.journal.used() * 4 > self.journal.blocks;
        let interval = Duration::from_secs(self.opts.checkpoint_interval_secs.max(1));
        let something = !self.et.dirty_pages.is_empty() || self.journal.used() > 0;
        if journal_quarter || (something && now.duration_since(self.last_ckpt) >= interval) {
            self.want_checkpoint = true;
        }
        if !self.evicted_unsynced.is_empty() && self.committing.is_none() && self.fifo.is_empty() {
            self.disk.sync()?;
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.evicted_unsynced.clear();
        }
        self.answer_waiters();
        Ok(())
    }

    fn answer_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let clean = !self.has_zero_work() && self.pending.is_empty() && self.zero_job.is_none();
        let now = Instant::now();
        let waiters = std::mem::take(&mut self.waiters);
        for (tx, deadline) in waiters {
            if clean {
                let _ = tx.send(Ok(true));
            } else if self.failed.is_some() || now >= deadline {
                let _ = tx.send(Ok(false));
            } else {
                self.waiters.push((tx, deadline));
            }
        }
    }

    fn clear_idle_intents(&mut self, now: Instant) -> Result<(), EngineError> {
        let idle = self.opts.intent_idle_clear_secs;
        if idle == 0 {
            return Ok(());
        }
        let idle = Duration::from_secs(idle);
        let stale: Vec<(VolumeId, u64)> = self
            .intents_live
            .iter()
            .filter(|(_, l)| !l.sticky && now.duration_since(l.last_use) >= idle)
            .map(|(k, _)| *k)
            .collect();
        for (volume, region) in stale {
            self.intents_live.remove(&(volume, region));
            self.emit_pending(Record::IntentClear { volume, region })?;
        }
        Ok(())
    }

    fn shutdown(mut self) -> Result<(), EngineError> {
        if self.failed.is_none() {
            // Intents stay: a clean stop of the node says nothing about its clients, one of which
            // may have died with a write on this replica only. Only `clear_intents` clears them.
            self.checkpoint()?;
        }
        for (tx, _) in self.waiters.drain(..) {
            let _ = tx.send(Err(EngineError::ShuttingDown));
        }
        Ok(())
    }

    fn publish(&mut self) {
        if !self.segments_changed {
            return;
        }
        self.segments_changed = false;
        let list: Vec<_> = self.cat.segments.iter().map(|(k, s)| (k.0, k.1, s.blocks)).collect();
        if let Ok(mut g) = self.segments_pub.write() {
            *g = list;
        }
    }

    // ----- planning of each command -----

    /// Splits volume blocks `[start, start+count)` into per-segment pieces:
    /// (segment key, first segment block, count, index of the first block in the request).
    fn pieces(&self, volume: VolumeId, start: u64, count: u64) -> Result<Vec<(SegKey, u64, u64, u64)>, EngineError> {
        let sbk = *self.vol_geom.get(&volume).ok_or(EngineError::NotAssigned)?;
        let end = start.checked_add(count).ok_or(EngineError::OutOfRange)?;
        let mut out = Vec::new();
        let mut b = start;
        while b < end {
            let seg = u32::try_from(b / sbk).map_err(|_| EngineError::OutOfRange)?;
            let sblock = b % sbk;
            let n = (sbk - sblock).min(end - b);
            let key = (volume, SegmentIndex(seg));
            if !self.cat.segments.contains_key(&key) {
                return Err(EngineError::NotAssigned);
            }
            out.push((key, sblock, n, b - start));
            b += n;
        }
        Ok(out)
    }

    /// Records write intents for the regions of `[start, start+count)` not yet recorded.
    fn note_intents(&mut self, b: &mut Batch, volume: VolumeId, start: u64, count: u64) -> Result<(), EngineError> {
        let rb = self.opts.intent_region_blocks.max(1);
        let now = Instant::now();
        for region in start / rb..=(start + count - 1) / rb {
            if let Some(l) = self.intents_live.get_mut(&(volume, region)) {
                l.last_use = now;
                continue;
            }
            if self.intents_live.len() >= MAX_INTENTS {
                // Over the bound: drop the longest idle non-sticky region.
                let oldest = self.intents_live.iter().filter(|(_, l)| !l.sticky).min_by_key(|(_, l)| l.last_use);
                match oldest.map(|(k, _)| *k) {
                    Some((v, r)) => {
                        self.intents_live.remove(&(v, r));
                        let mut recs = std::mem::take(&mut b.intent_records);
                        self.emit(&mut recs, Record::IntentClear { volume: v, region: r })?;
                        b.intent_records = recs;
                    }
                    None => return Err(EngineError::NoSpace),
                }
            }
            self.intents_live.insert((volume, region), IntentLive { sticky: false, last_use: now });
            let mut recs = std::mem::take(&mut b.intent_records);
            self.emit(&mut recs, Record::IntentSet { volume, region })?;
            b.intent_records = recs;
        }
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn plan_write(
        &mut self,
        b: &mut Batch,
        volume: VolumeId,
        start: BlockIndex,
        crcs: &[u32],
        data: &Bytes,
    ) -> Result<(AlignedBuf, Vec<(u64, usize, usize)>), EngineError> {
        let count = crcs.len();
        if count == 0 || count > MAX_IO_BLOCKS || data.len() != count * ALIGN {
            return Err(EngineError::Invalid(format!("write of {count} blocks with {} bytes", data.len())));
        }
        let pieces = self.pieces(volume, start.0, count as u64)?;
        let eb = self.sb.extent_blocks;
        // Allocate every extent the write needs before changing anything else.
        let mut recs = std::mem::take(&mut b.records);
        let mut runs: Vec<(u32, u32, usize, usize)> = Vec::new(); // (extent, off, first idx, len)
        let res = (|| {
            for &(key, sblock, n, idx0) in &pieces {
                let head = self.cat.segments.get(&key).map(|s| s.layers.len() - 1).ok_or(EngineError::NotAssigned)?;
                let head_id = self.cat.segments[&key].layers[head].id;
                let mut sb = sblock;
                let mut idx = idx0 as usize;
                while sb < sblock + n {
                    let slot = (sb / eb) as u32;
                    let off = (sb % eb) as u32;
                    let len = (eb - u64::from(off)).min(sblock + n - sb) as usize;
                    let existing = self.cat.segments[&key].layers[head].extents.get(&slot).copied();
                    let extent = match existing {
                        Some(e) => e,
                        None => self.alloc(&mut recs, key, head_id, slot)?,
                    };
                    runs.push((extent, off, idx, len));
                    sb += len as u64;
                    idx += len;
                }
            }
            Ok::<(), EngineError>(())
        })();
        b.records = recs;
        res?;
        self.note_intents(b, volume, start.0, count as u64)?;
        let buf = AlignedBuf::copy_from(data);
        let mut parts = Vec::with_capacity(runs.len());
        let mut recs = std::mem::take(&mut b.records);
        for (extent, off, idx, len) in runs {
            let r = Record::Write { extent, offset: off, crcs: crcs[idx..idx + len].to_vec() };
            b.record_bytes += r.encoded_len();
            if let Err(e) = self.emit(&mut recs, r) {
                b.records = recs;
                return Err(e);
            }
            let phys = Superblock::off(self.sb.extent_block(extent) + u64::from(off));
            parts.push((phys, idx * ALIGN, (idx + len) * ALIGN));
        }
        b.records = recs;
        Ok((buf, parts))
    }

    /// The layer index that a read at `epoch` starts from.
    fn top_for(&self, key: SegKey, epoch: Epoch) -> Result<usize, EngineError> {
        let seg = self.cat.segments.get(&key).ok_or(EngineError::NotAssigned)?;
        if epoch == HEAD_EPOCH {
            return Ok(seg.layers.len() - 1);
        }
        if seg.deleting.is_some() {
            return Err(EngineError::NoSuchLayer("a layer deletion is in progress".into()));
        }
        seg.layers
            .iter()
            .skip(1)
            .position(|l| l.base == epoch)
            .ok_or_else(|| EngineError::NoSuchLayer(format!("no snapshot at {epoch}")))
    }

    #[allow(clippy::type_complexity)]
    fn plan_read(
        &mut self,
        volume: VolumeId,
        epoch: Epoch,
        start: BlockIndex,
        count: u32,
    ) -> Result<(AlignedBuf, Vec<(u64, usize, usize)>, Vec<u8>, Vec<u32>), EngineError> {
        let n = count as usize;
        if n == 0 || n > MAX_IO_BLOCKS {
            return Err(EngineError::Invalid(format!("read of {count} blocks")));
        }
        let pieces = self.pieces(volume, start.0, u64::from(count))?;
        let mut written = vec![0u8; n.div_ceil(8)];
        let mut crcs = vec![0u32; n];
        let mut parts: Vec<(u64, usize, usize)> = Vec::new();
        for (key, sblock, len, idx0) in pieces {
            let top = self.top_for(key, epoch)?;
            for i in 0..len {
                let idx = (idx0 + i) as usize;
                if let Loc::Data { extent, off, crc } = self.resolve(key, top, sblock + i)? {
                    written[idx / 8] |= 1 << (idx % 8);
                    crcs[idx] = crc;
                    let phys = Superblock::off(self.sb.extent_block(extent) + u64::from(off));
                    match parts.last_mut() {
                        Some(last) if last.2 == idx * ALIGN && last.0 + (last.2 - last.1) as u64 == phys => {
                            last.2 += ALIGN;
                        }
                        _ => parts.push((phys, idx * ALIGN, (idx + 1) * ALIGN)),
                    }
                }
            }
        }
        Ok((AlignedBuf::zeroed(n * ALIGN), parts, written, crcs))
    }

    fn plan_trim(&mut self, batch: &mut Batch, volume: VolumeId, range: BlockRange) -> Result<(), EngineError> {
        if range.count == 0 {
            return Ok(());
        }
        if range.count > MAX_RANGE_BLOCKS {
            return Err(EngineError::Invalid(format!("trim of {} blocks", range.count)));
        }
        let pieces = self.pieces(volume, range.start.0, range.count)?;
        self.note_intents(batch, volume, range.start.0, range.count)?;
        let eb = self.sb.extent_blocks;
        let mut recs = std::mem::take(&mut batch.records);
        let res = (|| {
            for (key, sblock, n, _) in pieces {
                let seg_blocks = self.cat.segments[&key].blocks;
                let head = self.cat.segments[&key].layers.len() - 1;
                let head_id = self.cat.segments[&key].layers[head].id;
                let mut sb = sblock;
                while sb < sblock + n {
                    let slot = (sb / eb) as u32;
                    let off = (sb % eb) as u32;
                    let len = (eb - u64::from(off)).min(sblock + n - sb);
                    let slot_len = eb.min(seg_blocks - u64::from(slot) * eb);
                    // Blocks whose older-layer data must stay masked.
                    let mut mask = vec![false; len as usize];
                    if head > 0 {
                        for (i, m) in mask.iter_mut().enumerate() {
                            *m = matches!(self.resolve(key, head - 1, sb + i as u64)?, Loc::Data { .. });
                        }
                    }
                    let existing = self.cat.segments[&key].layers[head].extents.get(&slot).copied();
                    let whole = off == 0 && len >= slot_len;
                    if whole && !mask.iter().any(|m| *m) {
                        if let Some(extent) = existing {
                            // Nothing of this extent stays visible: release it to zeroing now.
                            self.emit(&mut recs, Record::State { extent, state: ExtentState::Dirty as u8 })?;
                        }
                    } else {
                        let needs_extent = mask.iter().any(|m| *m);
                        let extent = match existing {
                            Some(e) => Some(e),
                            None if needs_extent => Some(self.alloc(&mut recs, key, head_id, slot)?),
                            None => None,
                        };
                        if let Some(extent) = extent {
                            let mut i = 0usize;
                            while i < mask.len() {
                                let z = mask[i];
                                let mut j = i;
                                while j < mask.len() && mask[j] == z {
                                    j += 1;
                                }
                                let r = Record::Trim { extent, offset: off + i as u32, count: (j - i) as u32, zero: z };
                                batch.record_bytes += r.encoded_len();
                                self.emit(&mut recs, r)?;
                                i = j;
                            }
                        }
                    }
                    sb += len;
                }
            }
            Ok::<(), EngineError>(())
        })();
        batch.records = recs;
        res
    }

    fn allocated(&mut self, volume: VolumeId, range: BlockRange) -> Result<Vec<u8>, EngineError> {
        if range.count > MAX_RANGE_BLOCKS {
            return Err(EngineError::Invalid(format!("allocated over {} blocks", range.count)));
        }
        let mut out = vec![0u8; (range.count as usize).div_ceil(8)];
        if range.count == 0 {
            return Ok(out);
        }
        for (key, sblock, n, idx0) in self.pieces(volume, range.start.0, range.count)? {
            let top = self.cat.segments[&key].layers.len() - 1;
            for i in 0..n {
                if matches!(self.resolve(key, top, sblock + i)?, Loc::Data { .. }) {
                    let idx = (idx0 + i) as usize;
                    out[idx / 8] |= 1 << (idx % 8);
                }
            }
        }
        Ok(out)
    }

    fn check_generation(&mut self, b: &mut Batch, volume: VolumeId, gen: Generation) -> Result<(), EngineError> {
        match self.cat.generations.get(&volume) {
            Some(cur) if gen < *cur => Err(EngineError::StaleGeneration { current: *cur }),
            Some(cur) if gen == *cur => Ok(()),
            _ => {
                if let Some(f) = &self.failed {
                    return Err(EngineError::Failed(f.clone()));
                }
                if !self.cat.generations.contains_key(&volume) && self.cat.generations.len() >= MAX_VOLUMES {
                    return Err(EngineError::NoSpace);
                }
                let mut recs = std::mem::take(&mut b.records);
                let r = self.emit(&mut recs, Record::Generation { volume, gen });
                b.records = recs;
                r
            }
        }
    }

    fn catalog_room(&self, extra: usize) -> Result<(), EngineError> {
        if (self.cat.encoded_len() + extra) as u64 + 4096 > self.sb.catalog_blocks * BLOCK {
            return Err(EngineError::NoSpace);
        }
        Ok(())
    }

    fn assign(
        &mut self,
        b: &mut Batch,
        volume: VolumeId,
        segment: SegmentIndex,
        blocks: u64,
    ) -> Result<(), EngineError> {
        if blocks == 0 || blocks > (1 << 40) {
            return Err(EngineError::Invalid(format!("segment of {blocks} blocks")));
        }
        if let Some(&g) = self.vol_geom.get(&volume) {
            if g != blocks {
                return Err(EngineError::Invalid(format!("segments of {volume} have {g} blocks here, not {blocks}")));
            }
        }
        if self.cat.segments.contains_key(&(volume, segment)) {
            return Ok(());
        }
        self.catalog_room(64)?;
        let mut recs = std::mem::take(&mut b.records);
        let r = self.emit(&mut recs, Record::Assign { volume, segment, blocks });
        b.records = recs;
        r
    }

    /// Releases every layer's extents to dirty and forgets the segment; returns the extents.
    fn release(&mut self, b: &mut Batch, volume: VolumeId, segment: SegmentIndex) -> Result<Vec<u32>, EngineError> {
        let key = (volume, segment);
        let Some(seg) = self.cat.segments.get(&key) else { return Ok(Vec::new()) };
        let extents: Vec<u32> = seg.layers.iter().flat_map(|l| l.extents.values().copied()).collect();
        let mut recs = std::mem::take(&mut b.records);
        let res = (|| {
            for &extent in &extents {
                self.emit(&mut recs, Record::State { extent, state: ExtentState::Dirty as u8 })?;
            }
            self.emit(&mut recs, Record::Release { volume, segment })
        })();
        b.record_bytes += recs.len() * 8;
        b.records = recs;
        res.map(|()| extents)
    }

    fn snapshot(&mut self, b: &mut Batch, volume: VolumeId, epoch: Epoch) -> Result<(), EngineError> {
        if epoch == Epoch(0) || epoch == HEAD_EPOCH {
            return Err(EngineError::Invalid(format!("snapshot epoch {epoch}")));
        }
        let keys: Vec<SegKey> = self
            .cat
            .segments
            .range((volume, SegmentIndex(0))..=(volume, SegmentIndex(u32::MAX)))
            .map(|(k, _)| *k)
            .collect();
        let mut todo = Vec::new();
        for key in &keys {
            let seg = &self.cat.segments[key];
            let head = seg.layers.last().map_or(Epoch(0), |l| l.base);
            if head > epoch {
                return Err(EngineError::NoSuchLayer(format!("{key:?} already has a snapshot after {epoch}")));
            }
            if head == epoch {
                continue;
            }
            if seg.layers.len() >= MAX_LAYERS {
                return Err(EngineError::Invalid(format!("{key:?} has {MAX_LAYERS} layers already")));
            }
            todo.push((*key, seg.next_layer_id));
        }
        self.catalog_room(todo.len() * 16)?;
        let mut recs = std::mem::take(&mut b.records);
        let res = (|| {
            for (key, layer) in todo {
                self.emit(&mut recs, Record::LayerCreate { volume, segment: key.1, layer, base: epoch })?;
            }
            Ok(())
        })();
        b.records = recs;
        res
    }

    fn changed_blocks(&mut self, key: SegKey, from: Epoch, to: Epoch) -> Result<Vec<BlockRange>, EngineError> {
        let seg = self.cat.segments.get(&key).ok_or(EngineError::NotAssigned)?;
        if seg.deleting.is_some() {
            return Err(EngineError::NoSuchLayer("a layer deletion is in progress".into()));
        }
        if from >= to {
            return Err(EngineError::Invalid(format!("changed blocks from {from} to {to}")));
        }
        let bases: Vec<Epoch> = seg.layers.iter().map(|l| l.base).collect();
        if from != Epoch(0) && !bases[1..].contains(&from) {
            return Err(EngineError::NoSuchLayer(format!("no snapshot at {from}")));
        }
        if to != HEAD_EPOCH && !bases[1..].contains(&to) {
            return Err(EngineError::NoSuchLayer(format!("no snapshot at {to}")));
        }
        let seg_blocks = seg.blocks;
        let mut layers: Vec<Vec<(u32, u32)>> = Vec::new();
        for (i, l) in seg.layers.iter().enumerate() {
            let frozen = bases.get(i + 1).copied().unwrap_or(HEAD_EPOCH);
            if l.base >= from && frozen <= to {
                layers.push(l.extents.iter().map(|(s, e)| (*s, *e)).collect());
            }
        }
        let eb = self.sb.extent_blocks;
        let mut blocks: Vec<u64> = Vec::new();
        for exts in layers {
            for (slot, extent) in exts {
                for p in 0..self.sb.pages_per_extent {
                    let page = u64::from(extent) * self.sb.pages_per_extent + p;
                    self.load_page(page)?;
                    let c = self.cache.get(page).ok_or_else(|| EngineError::Failed("page vanished".into()))?;
                    for i in 0..CHUNK_BLOCKS as usize {
                        let off = p * CHUNK_BLOCKS + i as u64;
                        if off < eb && (c.page.is_written(i) || c.page.is_zero(i)) {
                            let sblock = u64::from(slot) * eb + off;
                            if sblock < seg_blocks {
                                blocks.push(sblock);
                            }
                        }
                    }
                }
            }
        }
        blocks.sort_unstable();
        blocks.dedup();
        let first = u64::from(key.1 .0) * seg_blocks;
        let mut out: Vec<BlockRange> = Vec::new();
        for sb in blocks {
            let v = first + sb;
            match out.last_mut() {
                Some(last) if last.start.0 + last.count == v => last.count += 1,
                _ => out.push(BlockRange { start: BlockIndex(v), count: 1 }),
            }
        }
        Ok(out)
    }

    fn clear_intents(&mut self, b: &mut Batch, volume: VolumeId, ranges: &[BlockRange]) -> Result<(), EngineError> {
        let rb = self.opts.intent_region_blocks.max(1);
        let regions: Vec<u64> = self.cat.intents.get(&volume).map(|s| s.iter().copied().collect()).unwrap_or_default();
        let mut recs = std::mem::take(&mut b.records);
        let res = (|| {
            for region in regions {
                let (s, e) = (region * rb, region * rb + rb);
                if ranges.iter().any(|r| r.start.0 <= s && r.start.0.saturating_add(r.count) >= e) {
                    self.intents_live.remove(&(volume, region));
                    self.emit(&mut recs, Record::IntentClear { volume, region })?;
                }
            }
            Ok(())
        })();
        b.records = recs;
        res
    }

    // ----- layer deletion -----

    fn delete_layer(&mut self, key: SegKey, epoch: Epoch) -> Result<Vec<u32>, EngineError> {
        let seg = self.cat.segments.get(&key).ok_or(EngineError::NotAssigned)?;
        let mut freed = Vec::new();
        if let Some(pending) = seg.deleting {
            freed = self.fold_layer(key, pending)?;
        }
        let seg = self.cat.segments.get(&key).ok_or(EngineError::NotAssigned)?;
        let i = seg
            .layers
            .iter()
            .skip(1)
            .position(|l| l.base == epoch)
            .ok_or_else(|| EngineError::NoSuchLayer(format!("no snapshot at {epoch}")))?;
        let id = seg.layers[i].id;
        freed.extend(self.fold_layer(key, id)?);
        Ok(freed)
    }

    /// Folds layer `id` into the next newer layer: slots the newer layer lacks move
    /// over (no copy), blocks of shared slots still visible through the newer layer
    /// are copied into it; the folded layer's remaining extents go to dirty. Each
    /// slot is committed on its own (data synced before the records that find it);
    /// a `LayerDeleting` record first makes a crash mid-fold resume at open. Returns the
    /// extents released to dirty.
    fn fold_layer(&mut self, key: SegKey, id: u64) -> Result<Vec<u32>, EngineError> {
        if self.journal.used() * 2 > self.journal.blocks {
            self.checkpoint()?;
        }
        let mut recs = Vec::new();
        self.emit(&mut recs, Record::LayerDeleting { volume: key.0, segment: key.1, layer: id })?;
        self.commit_records(recs)?;
        let seg = self.cat.segments.get(&key).ok_or(EngineError::NotAssigned)?;
        let i = seg.layers.iter().position(|l| l.id == id).ok_or_else(|| EngineError::NoSuchLayer("layer".into()))?;
        if i + 1 >= seg.layers.len() {
            return Err(EngineError::Invalid("the head layer cannot be deleted".into()));
        }
        let into = seg.layers[i + 1].id;
        let base = seg.layers[i].base;
        let slots: Vec<(u32, u32)> = seg.layers[i].extents.iter().map(|(s, e)| (*s, *e)).collect();
        let eb = self.sb.extent_blocks as u32;
        let mut freed = Vec::new();
        for (slot, src) in slots {
            if self.journal.used() * 2 > self.journal.blocks {
                self.checkpoint()?;
            }
            let dst = self.cat.segments[&key].layers[i + 1].extents.get(&slot).copied();
            let mut recs = Vec::new();
            match dst {
                None => self.emit(&mut recs, Record::Reown { extent: src, layer: into })?,
                Some(dst) => {
                    let mut copy: Vec<(u32, u32)> = Vec::new(); // (offset, crc)
                    let mut zero: Vec<u32> = Vec::new();
                    for off in 0..eb {
                        let (dw, dz, _) = self.page_bits(dst, off)?;
                        if dw || dz {
                            continue;
                        }
                        let (sw, sz, crc) = self.page_bits(src, off)?;
                        if sw {
                            copy.push((off, crc));
                        } else if sz {
                            zero.push(off);
                        }
                    }
                    self.copy_blocks(src, dst, &copy)?;
                    for run in runs(&copy.iter().map(|c| c.0).collect::<Vec<_>>()) {
                        let crcs: Vec<u32> =
                            copy.iter().filter(|c| c.0 >= run.0 && c.0 < run.0 + run.1).map(|c| c.1).collect();
                        self.emit(&mut recs, Record::Write { extent: dst, offset: run.0, crcs })?;
                    }
                    for run in runs(&zero) {
                        self.emit(&mut recs, Record::Trim { extent: dst, offset: run.0, count: run.1, zero: true })?;
                    }
                    self.emit(&mut recs, Record::State { extent: src, state: ExtentState::Dirty as u8 })?;
                    freed.push(src);
                }
            }
            self.commit_records(recs)?;
        }
        let mut recs = Vec::new();
        self.emit(&mut recs, Record::LayerMerged { volume: key.0, segment: key.1, removed: id, into, base })?;
        self.commit_records(recs)?;
        Ok(freed)
    }

    // ----- scrub and repair -----

    /// One scrub step (see `EngineHandle::scrub` for the cursor). Runs with no write in flight.
    fn scrub(&mut self, key: SegKey, cursor: u64, max_blocks: u32) -> Result<ScrubChunk, EngineError> {
        let seg = self.cat.segments.get(&key).ok_or(EngineError::NotAssigned)?;
        let seg_blocks = seg.blocks;
        let n = seg.layers.len();
        // (layer id, its epoch, its slots -> extents)
        type LayerSlots = (u64, Epoch, Vec<(u32, u32)>);
        let layers: Vec<LayerSlots> = seg
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let epoch = if i + 1 == n { HEAD_EPOCH } else { seg.layers[i + 1].base };
                (l.id, epoch, l.extents.iter().map(|(s, e)| (*s, *e)).collect())
            })
            .collect();
        let max = max_blocks.clamp(1, MAX_SCRUB_BLOCKS) as usize;
        let visit_budget = max as u64 * 64;
        let eb = self.sb.extent_blocks;
        let first_vblock = u64::from(key.1 .0) * seg_blocks;
        let (start_layer, start_block) = (cursor / seg_blocks, cursor % seg_blocks);
        // (extent, offset, stored crc, layer epoch, volume block)
        let mut todo: Vec<(u32, u32, u32, Epoch, u64)> = Vec::with_capacity(max);
        let mut visited = 0u64;
        let mut next = None;
        'layers: for (id, epoch, slots) in layers.iter().filter(|l| l.0 >= start_layer) {
            let from = if *id == start_layer { start_block } else { 0 };
            for &(slot, extent) in slots {
                let slot_first = u64::from(slot) * eb;
                let slot_end = (slot_first + eb).min(seg_blocks);
                let mut sb = slot_first.max(from);
                while sb < slot_end {
                    if todo.len() >= max || visited >= visit_budget {
                        let pos = id
                            .checked_mul(seg_blocks)
                            .and_then(|p| p.checked_add(sb))
                            .ok_or_else(|| EngineError::Invalid("scrub cursor overflows".into()))?;
                        next = Some(pos);
                        break 'layers;
                    }
                    visited += 1;
                    let off = (sb - slot_first) as u32;
                    let (written, _, crc) = self.page_bits(extent, off)?;
                    if written {
                        todo.push((extent, off, crc, *epoch, first_vblock + sb));
                    }
                    sb += 1;
                }
            }
        }
        let mut buf = AlignedBuf::zeroed(todo.len().max(1) * ALIGN);
        {
            let mut ios: Vec<Io<'_>> = Vec::new();
            let mut rest: &mut [u8] = &mut buf[..];
            let mut i = 0;
            while i < todo.len() {
                // Coalesce blocks that are adjacent on the disk into one read.
                let mut j = i + 1;
                while j < todo.len() && todo[j].0 == todo[i].0 && todo[j].1 == todo[j - 1].1 + 1 {
                    j += 1;
                }
                let (head, tail) = rest.split_at_mut((j - i) * ALIGN);
                let offset = Superblock::off(self.sb.extent_block(todo[i].0) + u64::from(todo[i].1));
                ios.push(Io::Read { offset, buf: head });
                rest = tail;
                i = j;
            }
            self.disk.run(&mut ios, false).first_error()?;
        }
        let mut corrupt = Vec::new();
        for (i, &(_, _, stored_crc, epoch, vblock)) in todo.iter().enumerate() {
            if crc32c::crc32c(&buf[i * ALIGN..(i + 1) * ALIGN]) != stored_crc {
                corrupt.push(CorruptBlock { epoch, block: BlockIndex(vblock), stored_crc });
            }
        }
        self.stats.scrub_blocks_checked.fetch_add(todo.len() as u64, Ordering::Relaxed);
        self.stats.scrub_corrupt_blocks.fetch_add(corrupt.len() as u64, Ordering::Relaxed);
        Ok(ScrubChunk { next_cursor: next, blocks_checked: todo.len() as u64, corrupt })
    }

    /// Rewrites one block in its layer if it still fails its stored crc `bad_crc` (see
    /// `EngineHandle::repair_block`). Runs with no write in flight, so the stored crc
    /// reflects every write acknowledged before it.
    fn repair_block(
        &mut self,
        volume: VolumeId,
        epoch: Epoch,
        block: BlockIndex,
        bad_crc: u32,
        data: &[u8],
        crc: u32,
    ) -> Result<bool, EngineError> {
        let pieces = self.pieces(volume, block.0, 1)?;
        let Some(&(key, sblock, _, _)) = pieces.first() else { return Err(EngineError::OutOfRange) };
        let li = self.top_for(key, epoch)?;
        let eb = self.sb.extent_blocks;
        let (slot, off) = ((sblock / eb) as u32, (sblock % eb) as u32);
        let Some(&extent) = self.cat.segments[&key].layers[li].extents.get(&slot) else { return Ok(false) };
        let (written, _, stored) = self.page_bits(extent, off)?;
        if !written || stored != bad_crc {
            return Ok(false);
        }
        let phys = Superblock::off(self.sb.extent_block(extent) + u64::from(off));
        let mut cur = AlignedBuf::zeroed(ALIGN);
        self.disk.read_at(phys, &mut cur)?;
        if crc32c::crc32c(&cur) == stored {
            return Ok(false);
        }
        // Data first and synced, then the record with its crc: a crash in between leaves
        // a block that still fails its (old) crc, i.e. still repairable.
        self.disk.write_at(phys, &AlignedBuf::copy_from(data))?;
        self.disk.sync()?;
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let mut recs = Vec::new();
        self.emit(&mut recs, Record::Write { extent, offset: off, crcs: vec![crc] })?;
        self.commit_records(recs)?;
        self.stats.repaired_blocks.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Copies blocks `offsets` of extent `src` to the same offsets of `dst` and syncs.
    fn copy_blocks(&mut self, src: u32, dst: u32, blocks: &[(u32, u32)]) -> Result<(), EngineError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let offs: Vec<u32> = blocks.iter().map(|b| b.0).collect();
        for (off, len) in runs(&offs) {
            let mut buf = AlignedBuf::zeroed(len as usize * ALIGN);
            self.disk.read_at(Superblock::off(self.sb.extent_block(src) + u64::from(off)), &mut buf)?;
            self.disk.write_at(Superblock::off(self.sb.extent_block(dst) + u64::from(off)), &buf)?;
        }
        self.disk.sync()?;
        Ok(())
    }
}

/// Runs of consecutive values in a sorted list: (first, length).
fn runs(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &v in sorted {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == v => last.1 += 1,
            _ => out.push((v, 1)),
        }
    }
    out
}
