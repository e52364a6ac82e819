//! Snapshot layers (redirect-on-write): resolving a block through a segment's
//! layer stack, starting a new head layer at a snapshot, the blocks changed
//! between two layers, and deleting a layer by folding it into its newer
//! neighbour.

use super::commit::Batch;
use super::{Core, SegKey};
use crate::engine::journal::Record;
use crate::engine::layout::{Superblock, CHUNK_BLOCKS};
use crate::engine::meta::{ExtentState, MAX_LAYERS};
use crate::engine::uring::{AlignedBuf, ALIGN};
use crate::engine::{EngineError, HEAD_EPOCH};
use slate_protocol::{BlockIndex, BlockRange, Epoch, SegmentIndex, VolumeId};

/// Where a block of a segment layer stack resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Loc {
    Data { extent: u32, off: u32, crc: u32 },
    Zero,
    Unwritten,
}

impl Core {
    /// Resolves segment block `sblock` through layers `0..=top`, newest first.
    pub(super) fn resolve(&mut self, key: SegKey, top: usize, sblock: u64) -> Result<Loc, EngineError> {
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

    /// The layer index that a read at `epoch` starts from.
    pub(super) fn top_for(&self, key: SegKey, epoch: Epoch) -> Result<usize, EngineError> {
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

    pub(super) fn snapshot(&mut self, b: &mut Batch, volume: VolumeId, epoch: Epoch) -> Result<(), EngineError> {
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

    pub(super) fn changed_blocks(
        &mut self,
        key: SegKey,
        from: Epoch,
        to: Epoch,
    ) -> Result<Vec<BlockRange>, EngineError> {
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

    pub(super) fn delete_layer(&mut self, key: SegKey, epoch: Epoch) -> Result<Vec<u32>, EngineError> {
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
    pub(super) fn fold_layer(&mut self, key: SegKey, id: u64) -> Result<Vec<u32>, EngineError> {
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
