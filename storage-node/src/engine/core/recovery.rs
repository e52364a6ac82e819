//! Opening a disk: the newest checkpoint, the catalog copy it names, the extent
//! table (newest valid slot of every page), then the journal replayed from the
//! checkpoint's tail through the same `apply` that live operation uses, the
//! in-RAM indexes rebuilt, recovered write intents made sticky, a checkpoint,
//! and layer deletions a crash interrupted finished.

use super::intents::IntentLive;
use super::zeroer::ZERO_STEP_BYTES;
use super::{Core, SegKey, SegList, PIN_BUDGET_PAGES};
use crate::engine::journal::{decode_entry, entry_blocks, JournalRing, Record};
use crate::engine::layout::{check_page, read_superblock, Checkpoint, Superblock, BLOCK, MAGIC_ET};
use crate::engine::meta::{Catalog, ExtentState, ExtentTable, PageCache, CACHE_ENTRY_BYTES};
use crate::engine::uring::{AlignedBuf, AsyncRing, Disk, Waker, ALIGN};
use crate::engine::zero::Zeroing;
use crate::engine::{EngineError, EngineOptions, StatsCell};
use slate_protocol::NodeId;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Core {
    /// Opens the disk, loads the last checkpoint, replays the journal, checkpoints.
    pub(in crate::engine) fn open(
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
                let l0 = check_page(s0, MAGIC_ET, nonce, page);
                let l1 = check_page(s1, MAGIC_ET, nonce, page);
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
}
