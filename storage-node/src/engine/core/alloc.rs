//! Allocation: only verified-zero extents are handed out (the invariant erasure
//! rests on; `apply` asserts it). Also the extent lifecycle as others see it:
//! the phase reported to callers and the per-state counters in the stats.

use super::{Core, SegKey};
use crate::engine::journal::Record;
use crate::engine::meta::ExtentState;
use crate::engine::{EngineError, ExtentPhase};
use std::sync::atomic::Ordering;

impl Core {
    /// Takes a verified-zero extent for `slot` of layer `layer`; zeroes one at full
    /// speed if none is free but some are dirty.
    pub(super) fn alloc(
        &mut self,
        out: &mut Vec<Record>,
        key: SegKey,
        layer: u64,
        slot: u32,
    ) -> Result<u32, EngineError> {
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

    /// The in-RAM lifecycle phase of extent `e`.
    pub(super) fn phase(&self, e: u32) -> ExtentPhase {
        match self.et.get(e).map(|x| x.state) {
            None => ExtentPhase::OutOfRange,
            Some(ExtentState::Free) => ExtentPhase::Free,
            Some(ExtentState::Owned) => ExtentPhase::Owned,
            Some(ExtentState::Dirty) => ExtentPhase::Dirty,
            Some(ExtentState::Zeroing) => ExtentPhase::Zeroing,
            Some(ExtentState::Failed) => ExtentPhase::Failed,
        }
    }

    pub(super) fn update_extent_stats(&self) {
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

    pub(super) fn stat_extent_move(&self, from: ExtentState, to: ExtentState) {
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
}
