//! Dependency tracking: a FIFO range lock over block ranges.
//!
//! Every operation that touches blocks takes the lock on its range before any
//! request leaves for a node, in the order the volume received it:
//!
//! - writes, trims, write-zeroes and rebuild copies take it **exclusive**;
//! - reads (which may repair a block) and block-status queries take it **shared**.
//!
//! An operation is granted when no *earlier* operation (granted or still
//! waiting) overlaps it in a conflicting mode. So a write that overlaps an
//! in-flight write is sent only after that write completed on every replica:
//! two overlapping writes are never in flight at the same time, and every
//! replica therefore applies them in the same order whatever the network or
//! the node's scheduling does — including a replica that joins mid-way and a
//! rebuild copy that races new writes. Non-overlapping operations never wait
//! for each other, and a later operation may overtake an earlier one it does
//! not conflict with.
//!
//! Pure logic, no I/O: the volume's actor owns one tracker.

use std::collections::BTreeMap;

/// How an operation holds its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Compatible with other shared holders (reads).
    Shared,
    /// Excludes every other holder (writes, trims, rebuild copies).
    Exclusive,
}

#[derive(Debug)]
struct Entry {
    start: u64,
    end: u64,
    mode: LockMode,
    granted: bool,
}

impl Entry {
    fn conflicts(&self, start: u64, end: u64, mode: LockMode) -> bool {
        self.start < end && start < self.end && (self.mode == LockMode::Exclusive || mode == LockMode::Exclusive)
    }
}

/// The lock table. Ids must be handed in increasing order (arrival order).
#[derive(Debug, Default)]
pub struct DepTracker {
    entries: BTreeMap<u64, Entry>,
}

impl DepTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues operation `id` on blocks `[start, end)`. Returns true if it may start now.
    ///
    /// # Panics
    /// If `id` is not greater than every id in the table, or the range is empty (both are bugs).
    pub fn acquire(&mut self, id: u64, start: u64, end: u64, mode: LockMode) -> bool {
        assert!(start < end, "empty lock range");
        assert!(self.entries.last_key_value().is_none_or(|(last, _)| *last < id), "lock ids must increase");
        let granted = !self.entries.values().any(|e| e.conflicts(start, end, mode));
        self.entries.insert(id, Entry { start, end, mode, granted });
        granted
    }

    /// Releases `id` (granted or not). Returns the ids that may start now, in order.
    pub fn release(&mut self, id: u64) -> Vec<u64> {
        let Some(gone) = self.entries.remove(&id) else { return Vec::new() };
        let mut now = Vec::new();
        // Only a waiter overlapping the released range can have lost a blocker.
        let waiting: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.granted && e.start < gone.end && gone.start < e.end)
            .map(|(k, _)| *k)
            .collect();
        for k in waiting {
            let (start, end, mode) = {
                let e = &self.entries[&k];
                (e.start, e.end, e.mode)
            };
            let blocked = self.entries.range(..k).any(|(_, e)| e.conflicts(start, end, mode));
            if !blocked {
                if let Some(e) = self.entries.get_mut(&k) {
                    e.granted = true;
                }
                now.push(k);
            }
        }
        now
    }

    /// Whether `id` holds its range.
    pub fn is_granted(&self, id: u64) -> bool {
        self.entries.get(&id).is_some_and(|e| e.granted)
    }

    /// The ranges `[start, end)` of every operation in the table (granted and waiting).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.entries.values().map(|e| (e.start, e.end)).collect()
    }

    /// Operations in the table (granted and waiting).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::LockMode::{Exclusive, Shared};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overlapping_writes_wait_in_order() {
        let mut t = DepTracker::new();
        assert!(t.acquire(1, 0, 10, Exclusive));
        assert!(!t.acquire(2, 5, 6, Exclusive));
        assert!(!t.acquire(3, 5, 15, Exclusive));
        assert!(t.acquire(4, 20, 30, Exclusive), "disjoint ranges never wait");
        assert_eq!(t.release(1), vec![2]);
        assert!(!t.is_granted(3));
        assert_eq!(t.release(2), vec![3]);
        assert_eq!(t.release(3), Vec::<u64>::new());
        assert_eq!(t.release(4), Vec::<u64>::new());
        assert!(t.is_empty());
    }

    #[test]
    fn reads_share_but_order_against_writes() {
        let mut t = DepTracker::new();
        assert!(t.acquire(1, 0, 8, Shared));
        assert!(t.acquire(2, 4, 12, Shared));
        assert!(!t.acquire(3, 6, 7, Exclusive), "a write waits for earlier overlapping reads");
        assert!(t.acquire(4, 0, 2, Shared), "a read overtakes a write it does not overlap");
        assert!(!t.acquire(5, 6, 7, Shared), "a read waits for an earlier overlapping write");
        assert_eq!(t.release(1), Vec::<u64>::new());
        assert_eq!(t.release(2), vec![3]);
        assert_eq!(t.release(3), vec![5]);
    }

    #[test]
    fn releasing_a_waiter_unblocks_later_ones() {
        let mut t = DepTracker::new();
        assert!(t.acquire(1, 0, 4, Exclusive));
        assert!(!t.acquire(2, 0, 8, Exclusive));
        assert!(!t.acquire(3, 6, 8, Exclusive));
        // Op 2 is cancelled (e.g. the volume was fenced) before it ran.
        assert_eq!(t.release(2), vec![3]);
    }

    proptest! {
        /// Whatever the order of releases, two granted conflicting entries never
        /// coexist, and every entry is eventually granted.
        #[test]
        fn never_two_conflicting_holders(ops in proptest::collection::vec((0u64..32, 1u64..8, any::<bool>()), 1..40),
                                         order in proptest::collection::vec(any::<prop::sample::Index>(), 40)) {
            let mut t = DepTracker::new();
            let mut granted: Vec<(u64, u64, u64, LockMode)> = Vec::new();
            let mut waiting: Vec<(u64, u64, u64, LockMode)> = Vec::new();
            for (i, (s, n, excl)) in ops.iter().enumerate() {
                let mode = if *excl { Exclusive } else { Shared };
                let e = (i as u64 + 1, *s, s + n, mode);
                if t.acquire(e.0, e.1, e.2, e.3) { granted.push(e) } else { waiting.push(e) }
            }
            let check = |g: &[(u64, u64, u64, LockMode)]| {
                for a in g {
                    for b in g {
                        if a.0 < b.0 && a.1 < b.2 && b.1 < a.2 {
                            assert!(a.3 == Shared && b.3 == Shared, "conflicting holders {a:?} {b:?}");
                        }
                    }
                }
            };
            check(&granted);
            let mut k = 0;
            while !granted.is_empty() {
                let idx = order[k % order.len()].index(granted.len());
                k += 1;
                let (id, ..) = granted.remove(idx);
                for now in t.release(id) {
                    let pos = waiting.iter().position(|w| w.0 == now).expect("granted a waiter");
                    granted.push(waiting.remove(pos));
                }
                check(&granted);
            }
            prop_assert!(waiting.is_empty(), "starved: {waiting:?}");
            prop_assert!(t.is_empty());
        }
    }
}
