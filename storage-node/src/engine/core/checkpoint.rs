//! Checkpoints: every dirty chunk page and extent-table page to its older slot,
//! the catalog to its other copy, one sync, then the checkpoint block that moves
//! the journal tail. A crash before the checkpoint block leaves the previous
//! checkpoint and the journal behind it in force.

use super::{crash_point, Core};
use crate::engine::layout::{Checkpoint, Superblock, BLOCK, MAGIC_CHUNK};
use crate::engine::uring::{AlignedBuf, Io};
use crate::engine::EngineError;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Core {
    /// Writes every dirty page and the catalog home, syncs, then moves the journal tail.
    pub(super) fn checkpoint(&mut self) -> Result<(), EngineError> {
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
}
