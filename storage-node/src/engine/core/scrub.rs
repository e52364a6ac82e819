//! Scrub and repair: reading back every written block of a segment's layers
//! against its stored crc in bounded steps, and rewriting one block that still
//! fails its crc. Both run with the pipeline drained.

use super::{Core, SegKey};
use crate::engine::journal::Record;
use crate::engine::layout::Superblock;
use crate::engine::uring::{AlignedBuf, Io, ALIGN};
use crate::engine::{CorruptBlock, EngineError, ScrubChunk, HEAD_EPOCH, MAX_SCRUB_BLOCKS};
use slate_protocol::{BlockIndex, Epoch, VolumeId};
use std::sync::atomic::Ordering;

impl Core {
    /// One scrub step (see `EngineHandle::scrub` for the cursor). Runs with no write in flight.
    pub(super) fn scrub(&mut self, key: SegKey, cursor: u64, max_blocks: u32) -> Result<ScrubChunk, EngineError> {
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
    pub(super) fn repair_block(
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
}
