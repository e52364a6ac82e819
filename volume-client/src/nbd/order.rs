//! Arrival-order dependencies between overlapping mutating requests of one export.
//!
//! NBD lets a server run requests concurrently, but Slate promises that
//! overlapping writes are applied in the order they arrived, and a
//! read-modify-write of a partial block must not interleave with another write
//! to that block (or an update is lost). So every mutating request registers
//! its block-aligned range here, synchronously and in arrival order, before it
//! is spawned; it then waits for every earlier registered request whose range
//! overlaps, and releases its own range when it completes. Reads do not
//! register: NBD gives no ordering between in-flight reads and writes.
//!
//! The tracker is per export, not per connection, so the guarantee also holds
//! across the connections of a multi-conn client. Waiting only on earlier
//! entries makes the wait graph acyclic: no deadlock is possible.

use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Active {
    id: u64,
    start: u64,
    end: u64,
    done: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    active: Vec<Active>,
}

/// The in-flight mutating ranges of one export.
#[derive(Debug, Default)]
pub struct WriteOrder {
    state: Mutex<State>,
}

/// Held while a registered request runs; dropping it releases the range.
#[derive(Debug)]
pub struct OrderGuard {
    order: Arc<WriteOrder>,
    id: u64,
    done: CancellationToken,
}

/// What a registered request must wait for before touching the device.
#[derive(Debug)]
pub struct Dependencies(Vec<CancellationToken>);

impl Dependencies {
    /// Wait until every earlier overlapping request has completed.
    pub async fn wait(self) {
        for d in self.0 {
            d.cancelled().await;
        }
    }

    /// How many earlier requests this one waits for.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether this request can run at once.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl WriteOrder {
    /// Register `start..end` (bytes, end exclusive) as the next mutating request.
    pub fn register(self: &Arc<Self>, start: u64, end: u64) -> (OrderGuard, Dependencies) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let deps =
            st.active.iter().filter(|a| a.start < end && start < a.end).map(|a| a.done.clone()).collect::<Vec<_>>();
        let id = st.next_id;
        st.next_id += 1;
        let done = CancellationToken::new();
        st.active.push(Active { id, start, end, done: done.clone() });
        (OrderGuard { order: Arc::clone(self), id, done }, Dependencies(deps))
    }

    /// Number of registered, unfinished requests.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).active.len()
    }
}

impl Drop for OrderGuard {
    fn drop(&mut self) {
        let mut st = self.order.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pos) = st.active.iter().position(|a| a.id == self.id) {
            st.active.swap_remove(pos);
        }
        drop(st);
        self.done.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_depend_on_earlier_ones_only() {
        let o = Arc::new(WriteOrder::default());
        let (g1, d1) = o.register(0, 8192);
        assert!(d1.is_empty());
        let (g2, d2) = o.register(8192, 16384);
        assert!(d2.is_empty());
        let (_g3, d3) = o.register(4096, 12288);
        assert_eq!(d3.len(), 2);
        drop(g1);
        drop(g2);
        let (_g4, d4) = o.register(0, 4096);
        assert!(d4.is_empty());
        assert_eq!(o.in_flight(), 2);
    }
}
