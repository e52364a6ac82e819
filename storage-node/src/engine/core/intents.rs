//! Write intents: before the first write to a region, the region is journaled
//! as in flight (and made durable before the data). After a crash the recovered
//! regions are sticky until a client clears them; regions recorded live are
//! cleared lazily once idle, and the longest idle go first when the bound is hit.

use super::commit::Batch;
use super::Core;
use crate::engine::journal::Record;
use crate::engine::EngineError;
use slate_protocol::{BlockIndex, BlockRange, VolumeId};
use std::time::{Duration, Instant};

/// Most write-intent regions held (all volumes); beyond it the longest idle are cleared.
const MAX_INTENTS: usize = 1 << 16;

#[derive(Debug, Clone, Copy)]
pub(super) struct IntentLive {
    /// Recovered at open (a crash may have left the region inconsistent): only
    /// `clear_intents` removes it.
    pub(super) sticky: bool,
    pub(super) last_use: Instant,
}

impl Core {
    /// Records write intents for the regions of `[start, start+count)` not yet recorded.
    pub(super) fn note_intents(
        &mut self,
        b: &mut Batch,
        volume: VolumeId,
        start: u64,
        count: u64,
    ) -> Result<(), EngineError> {
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

    pub(super) fn clear_intents(
        &mut self,
        b: &mut Batch,
        volume: VolumeId,
        ranges: &[BlockRange],
    ) -> Result<(), EngineError> {
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

    pub(super) fn clear_idle_intents(&mut self, now: Instant) -> Result<(), EngineError> {
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

    /// The write-intent regions of `volume`, as block ranges (adjacent regions merged).
    pub(super) fn write_intents(&self, volume: VolumeId) -> Vec<BlockRange> {
        let rb = self.opts.intent_region_blocks;
        let mut out: Vec<BlockRange> = Vec::new();
        for r in self.cat.intents.get(&volume).into_iter().flatten() {
            let start = r * rb;
            match out.last_mut() {
                Some(last) if last.start.0 + last.count == start => last.count += rb,
                _ => out.push(BlockRange { start: BlockIndex(start), count: rb }),
            }
        }
        out
    }
}
