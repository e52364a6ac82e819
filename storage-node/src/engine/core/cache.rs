//! Chunk pages (per-block crcs, written and zero bitmaps) through the bounded
//! page cache: loading both slots of a page, evicting least recently used
//! unpinned pages (dirty ones written home to their older slot), and the bits
//! of one block.

use super::Core;
use crate::engine::layout::{Superblock, CHUNK_BLOCKS, MAGIC_CHUNK};
use crate::engine::meta::{ChunkPage, CACHE_ENTRY_BYTES};
use crate::engine::uring::{AlignedBuf, ALIGN};
use crate::engine::EngineError;
use std::sync::atomic::Ordering;

impl Core {
    pub(super) fn page_of(&self, extent: u32, off: u32) -> (u64, usize) {
        let page = u64::from(extent) * self.sb.pages_per_extent + u64::from(off) / CHUNK_BLOCKS;
        (page, (u64::from(off) % CHUNK_BLOCKS) as usize)
    }

    /// Makes sure `page` is cached, reading both slots from disk if needed.
    pub(super) fn load_page(&mut self, page: u64) -> Result<(), EngineError> {
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

    pub(super) fn note_cache_size(&self) {
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
    pub(super) fn drop_cached_pages(&mut self, extent: u32) {
        for p in 0..self.sb.pages_per_extent {
            let page = u64::from(extent) * self.sb.pages_per_extent + p;
            if self.cache.peek(page).is_some_and(|c| !c.pinned()) {
                self.cache.remove(page);
            }
        }
        self.note_cache_size();
    }

    pub(super) fn page_bits(&mut self, extent: u32, off: u32) -> Result<(bool, bool, u32), EngineError> {
        let (page, i) = self.page_of(extent, off);
        self.load_page(page)?;
        let c = self.cache.get(page).ok_or_else(|| EngineError::Failed("page vanished from cache".into()))?;
        Ok((c.page.is_written(i), c.page.is_zero(i), c.page.crcs[i]))
    }
}
