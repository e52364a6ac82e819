//! Segments: assigning and releasing them, splitting a volume block range into
//! per-segment pieces, and publishing the assigned list to the rest of the node.

use super::commit::Batch;
use super::{Core, SegKey};
use crate::engine::journal::Record;
use crate::engine::layout::BLOCK;
use crate::engine::meta::ExtentState;
use crate::engine::EngineError;
use slate_protocol::{SegmentIndex, VolumeId};

impl Core {
    /// Splits volume blocks `[start, start+count)` into per-segment pieces:
    /// (segment key, first segment block, count, index of the first block in the request).
    pub(super) fn pieces(
        &self,
        volume: VolumeId,
        start: u64,
        count: u64,
    ) -> Result<Vec<(SegKey, u64, u64, u64)>, EngineError> {
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

    pub(super) fn catalog_room(&self, extra: usize) -> Result<(), EngineError> {
        if (self.cat.encoded_len() + extra) as u64 + 4096 > self.sb.catalog_blocks * BLOCK {
            return Err(EngineError::NoSpace);
        }
        Ok(())
    }

    pub(super) fn assign(
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
    pub(super) fn release(
        &mut self,
        b: &mut Batch,
        volume: VolumeId,
        segment: SegmentIndex,
    ) -> Result<Vec<u32>, EngineError> {
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

    pub(super) fn publish(&mut self) {
        if !self.segments_changed {
            return;
        }
        self.segments_changed = false;
        let list: Vec<_> = self.cat.segments.iter().map(|(k, s)| (k.0, k.1, s.blocks)).collect();
        if let Ok(mut g) = self.segments_pub.write() {
            *g = list;
        }
    }
}
