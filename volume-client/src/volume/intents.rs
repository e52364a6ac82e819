//! Which write-intent regions the client may clear while it serves I/O.
//!
//! A storage node records a region as "in flight" before its first write to
//! it and keeps the record until a client clears it (see `reconcile.rs`: a
//! re-attach reconciles every recorded region). Without periodic clearing the
//! records pile up for the whole attachment and the next attach reconciles
//! far more than was ever in flight. So every `intent_clear_interval` the
//! actor asks each node for its recorded regions and clears those that are
//! **cold**: every replica of the segment is in sync and healthy, and nothing
//! has touched the region since the previous round.
//!
//! A region is never cleared when:
//!
//! - an operation on it is in flight or queued (the range lock knows);
//! - a write or trim was issued to it since the previous round (so a region is
//!   cleared only after a whole quiet interval, and a hot region is not
//!   cleared and re-recorded over and over);
//! - it is **sticky**: a write to it was in flight or issued while a replica
//!   of its segment was failed, being replaced or rebuilding, or a write to it
//!   failed. Its replicas might differ; it stays recorded for the next attach
//!   to reconcile;
//! - its segment is not healthy now (a member rebuilding or missing, a
//!   replacement pending), or the node is not an in-sync member of it.
//!
//! The clear request is sent on the node's session before any later write to
//! the region (sessions keep the client's order, and the node orders
//! `ClearIntents` against every mutation of the session), so a write issued
//! after the decision records its intent again.
//!
//! Pure bookkeeping, no I/O: the actor owns one tracker.

use std::collections::HashSet;

/// Granularity of the bookkeeping, in blocks (1 MiB, the nodes' default intent region).
pub const GRAIN_BLOCKS: u64 = 256;

/// Regions touched since the last round, and regions never to clear.
#[derive(Debug, Default)]
pub struct IntentTracker {
    touched: HashSet<u64>,
    sticky: HashSet<u64>,
}

fn grains(start: u64, count: u64) -> std::ops::Range<u64> {
    if count == 0 {
        return 0..0;
    }
    start / GRAIN_BLOCKS..(start + count - 1) / GRAIN_BLOCKS + 1
}

impl IntentTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A write or trim of `[start, start + count)` was issued.
    pub fn touch(&mut self, start: u64, count: u64) {
        self.touched.extend(grains(start, count));
    }

    /// `[start, start + count)` may differ between replicas: never clear it.
    pub fn make_sticky(&mut self, start: u64, count: u64) {
        self.sticky.extend(grains(start, count));
    }

    /// Sticky regions (for status and tests).
    pub fn sticky_grains(&self) -> usize {
        self.sticky.len()
    }

    /// Ends a round: returns what was touched during it and starts the next one empty.
    pub fn take_touched(&mut self) -> HashSet<u64> {
        std::mem::take(&mut self.touched)
    }

    /// The parts of `[start, end)` that may be cleared, given the regions `touched` during the
    /// round and the ranges `busy` (operations in flight or queued), as `(start, end)` pairs.
    pub fn clearable(&self, start: u64, end: u64, touched: &HashSet<u64>, busy: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let g = pos / GRAIN_BLOCKS;
            let grain_end = ((g + 1) * GRAIN_BLOCKS).min(end);
            let blocked = touched.contains(&g) || self.sticky.contains(&g);
            if !blocked {
                match out.last_mut() {
                    Some(last) if last.1 == pos => last.1 = grain_end,
                    _ => out.push((pos, grain_end)),
                }
            }
            pos = grain_end;
        }
        // Cut out every busy range.
        for &(b0, b1) in busy {
            let mut next = Vec::with_capacity(out.len() + 1);
            for (a0, a1) in out {
                if b1 <= a0 || a1 <= b0 {
                    next.push((a0, a1));
                    continue;
                }
                if a0 < b0 {
                    next.push((a0, b0));
                }
                if b1 < a1 {
                    next.push((b1, a1));
                }
            }
            out = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_regions_only() {
        let mut t = IntentTracker::new();
        t.touch(300, 1); // grain 1
        t.make_sticky(1024, 10); // grain 4
        let touched = t.take_touched();
        assert!(t.take_touched().is_empty(), "a round starts empty");
        // Grains 0..6 recorded; 1 touched, 4 sticky, an operation in flight in grain 2.
        let got = t.clearable(0, 6 * GRAIN_BLOCKS, &touched, &[(600, 601)]);
        assert_eq!(got, vec![(0, 256), (512, 600), (601, 1024), (1280, 1536)]);
        // Next round: grain 1 is cold now; grain 4 stays.
        let got = t.clearable(0, 6 * GRAIN_BLOCKS, &HashSet::new(), &[]);
        assert_eq!(got, vec![(0, 1024), (1280, 1536)]);
    }

    #[test]
    fn unaligned_ranges_and_edges() {
        let t = IntentTracker::new();
        assert_eq!(t.clearable(100, 700, &HashSet::new(), &[(0, 150), (650, 800)]), vec![(150, 650)]);
        assert!(t.clearable(0, 256, &HashSet::from([0]), &[]).is_empty());
        assert_eq!(grains(255, 2), 0..2);
        assert_eq!(grains(256, 256), 1..2);
    }
}
