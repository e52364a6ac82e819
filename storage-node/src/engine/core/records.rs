//! Journal records and the in-RAM state: planning emits each record through
//! [`Core::emit`], which applies it with the same [`Core::apply`] that replay
//! uses, so live operation and recovery cannot disagree. Work that runs with the
//! pipeline drained (layer folds, repairs, checkpoints) commits its records
//! synchronously with [`Core::commit_records`].

use super::Core;
use crate::engine::journal::{encode_entry, Record};
use crate::engine::meta::{ExtentEntry, ExtentState, LayerMeta, SegMeta};
use crate::engine::uring::{Io, ALIGN};
use crate::engine::EngineError;
use slate_protocol::{Epoch, SegmentIndex};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

impl Core {
    /// Applies a record to the in-RAM state and queues it for the batch's entry.
    pub(super) fn emit(&mut self, out: &mut Vec<Record>, r: Record) -> Result<(), EngineError> {
        let lsn = self.durable_lsn + 1;
        self.apply(&r, lsn)?;
        out.push(r);
        Ok(())
    }

    pub(super) fn emit_pending(&mut self, r: Record) -> Result<(), EngineError> {
        let mut v = std::mem::take(&mut self.pending);
        let res = self.emit(&mut v, r);
        self.pending = v;
        res
    }

    /// Applies one record. Used live (through `emit`) and by replay, so both agree.
    /// Records name only things the engine wrote; a record that does not fit the
    /// state is a format error, never a panic.
    pub(super) fn apply(&mut self, r: &Record, lsn: u64) -> Result<(), EngineError> {
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

    /// Writes `pending + records` as one entry and makes it durable (data I/O, if
    /// any, must already be complete and synced by the caller when it matters).
    pub(super) fn commit_records(&mut self, records: Vec<Record>) -> Result<(), EngineError> {
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
}
