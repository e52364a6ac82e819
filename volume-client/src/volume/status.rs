//! A snapshot of a volume's state for `slate volume show` and for metrics:
//! replica sets with roles and rebuild progress, counters, fenced or not.

use super::layout::ReplicaRole;
use super::replicas::Member;
use serde::Serialize;
use slate_protocol::{Epoch, Generation, SegmentIndex, VolumeId};

/// Monotonic counters since the volume was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub reads: u64,
    pub blocks_read: u64,
    pub writes: u64,
    pub blocks_written: u64,
    /// Repair writes sent after a corrupt block was found.
    pub repairs: u64,
    pub node_failures: u64,
    pub replicas_replaced: u64,
    pub rebuilds_done: u64,
    pub blocks_rebuilt: u64,
    /// Blocks copied between replicas by write-intent reconciliation at open.
    pub blocks_reconciled: u64,
    pub capability_renewals: u64,
    /// Replica sets changed elsewhere (a drain) and adopted from a layout poll.
    pub layout_changes: u64,
    /// Size increases (online growth) adopted from a layout poll.
    pub growths: u64,
    /// Rounds of periodic write-intent clearing that sent at least one clear.
    pub intent_clear_rounds: u64,
    /// Intent ranges sent to nodes to clear (a range may cover several regions).
    pub intent_ranges_cleared: u64,
    /// Pending snapshots frozen on every replica and reported to the control plane.
    pub snapshots_frozen: u64,
    /// Freeze attempts that gave up (a node refused or failed, or the hold
    /// limit passed) and are retried after a later poll.
    pub freeze_failures: u64,
}

/// One segment's replica set.
#[derive(Clone, Debug, Serialize)]
pub struct SegmentStatus {
    pub segment: SegmentIndex,
    pub epoch: Epoch,
    pub replicas: Vec<Member>,
}

/// The whole volume.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeStatus {
    pub volume: VolumeId,
    pub generation: Generation,
    pub size_bytes: u64,
    /// A newer attachment took the volume over.
    pub fenced: bool,
    /// Why the volume stopped serving, if it did.
    pub error: Option<String>,
    pub in_flight_ops: usize,
    pub segments: Vec<SegmentStatus>,
    pub counters: Counters,
}

impl VolumeStatus {
    /// Rebuild progress over all rebuilding replicas: (blocks done, blocks total).
    pub fn rebuild_progress(&self) -> (u64, u64) {
        self.segments
            .iter()
            .flat_map(|s| s.replicas.iter())
            .filter(|m| m.role == ReplicaRole::Rebuilding)
            .fold((0, 0), |(d, t), m| (d + m.rebuild_done_blocks, t + m.rebuild_total_blocks))
    }

    /// True when every replica of every segment is in sync.
    pub fn all_in_sync(&self) -> bool {
        self.segments.iter().all(|s| s.replicas.iter().all(|m| m.role == ReplicaRole::InSync))
    }
}
