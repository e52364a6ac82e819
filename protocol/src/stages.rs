//! Where a request's time goes: one latency histogram per stage of the data path.
//!
//! Each stage is a fixed slot in a process-wide table of lock-free histograms
//! (power-of-two microsecond buckets), so recording costs two clock reads and
//! three relaxed atomic adds, and any thread (a tokio task, the engine thread)
//! records without plumbing. The volume client and the storage node render
//! their side's stages as Prometheus histograms
//! (`slate_client_stage_seconds{stage=...}`, `slate_node_stage_seconds{...}`);
//! `benches/e2e/breakdown.py` diffs two scrapes around a fio run and prints the
//! per-stage budget of a write.
//!
//! The stages of a 4 KiB write, in order:
//!
//! | side | stage | from → to |
//! |---|---|---|
//! | client | `nbd_receive` | NBD request header parsed → its payload read |
//! | client | `encrypt` | AES-XTS and crc32c of the payload |
//! | client | `actor_queue` | handed to the volume → the volume's actor starts it |
//! | client | `volume` | handed to the volume → the write acknowledged by enough replicas |
//! | client | `replica` | frame queued for a node → that node's reply decoded (per replica) |
//! | client | `nbd_reply` | reply queued → written to the NBD socket |
//! | client | `client_total` | NBD header parsed → reply written |
//! | node | `node_queue` | frame decoded → handed to the engine (ordering and fences) |
//! | node | `engine` | handed to the engine → its answer received |
//! | node | `engine_queue` | handed to the engine → planned by the engine thread |
//! | node | `commit_wait` | planned → its journal commit starts (the previous commit, gathering) |
//! | node | `engine_commit` | a commit's journal entry submitted → durable (entry write and fdatasync; per commit) |
//! | node | `disk_write` | a write's data submitted to io_uring → completed |
//! | node | `fdatasync` | a commit's own fdatasync submitted → completed (when not chained to the entry) |
//! | node | `commit_items` | not a time: writes carried by one journal commit (count, not µs) |
//! | node | `node_reply` | engine answered → reply written to the socket |
//! | node | `node_total` | frame decoded → reply written |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Buckets: `le` = 1, 2, 4, … 2^(BUCKETS-2) µs, then +Inf.
const BUCKETS: usize = 26;

/// A stage of the data path (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    NbdReceive,
    Encrypt,
    ActorQueue,
    Volume,
    Replica,
    NbdReply,
    ClientTotal,
    NodeQueue,
    Engine,
    EngineQueue,
    CommitWait,
    EngineCommit,
    DiskWrite,
    Fdatasync,
    CommitItems,
    NodeReply,
    NodeTotal,
}

/// Which process records a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Node,
}

impl Stage {
    pub const ALL: [Stage; 17] = [
        Stage::NbdReceive,
        Stage::Encrypt,
        Stage::ActorQueue,
        Stage::Volume,
        Stage::Replica,
        Stage::NbdReply,
        Stage::ClientTotal,
        Stage::NodeQueue,
        Stage::Engine,
        Stage::EngineQueue,
        Stage::CommitWait,
        Stage::EngineCommit,
        Stage::DiskWrite,
        Stage::Fdatasync,
        Stage::CommitItems,
        Stage::NodeReply,
        Stage::NodeTotal,
    ];

    /// The stage's label value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::NbdReceive => "nbd_receive",
            Stage::Encrypt => "encrypt",
            Stage::ActorQueue => "actor_queue",
            Stage::Volume => "volume",
            Stage::Replica => "replica",
            Stage::NbdReply => "nbd_reply",
            Stage::ClientTotal => "client_total",
            Stage::NodeQueue => "node_queue",
            Stage::Engine => "engine",
            Stage::EngineQueue => "engine_queue",
            Stage::CommitWait => "commit_wait",
            Stage::EngineCommit => "engine_commit",
            Stage::DiskWrite => "disk_write",
            Stage::Fdatasync => "fdatasync",
            Stage::CommitItems => "commit_items",
            Stage::NodeReply => "node_reply",
            Stage::NodeTotal => "node_total",
        }
    }

    /// The process that records it.
    pub fn side(self) -> Side {
        match self {
            Stage::NbdReceive
            | Stage::Encrypt
            | Stage::ActorQueue
            | Stage::Volume
            | Stage::Replica
            | Stage::NbdReply
            | Stage::ClientTotal => Side::Client,
            _ => Side::Node,
        }
    }

    /// Records one duration.
    pub fn record(self, d: Duration) {
        TABLE[self as usize].observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records the time since `start`.
    pub fn since(self, start: Instant) {
        self.record(start.elapsed());
    }

    /// Records a count (for [`Stage::CommitItems`]): rendered on the same bucket scale.
    pub fn count(self, n: u64) {
        TABLE[self as usize].observe(n.saturating_mul(1000));
    }

    /// The stage's totals so far: (observations, sum of nanoseconds).
    pub fn totals(self) -> (u64, u64) {
        let h = &TABLE[self as usize];
        (h.count.load(Ordering::Relaxed), h.sum_ns.load(Ordering::Relaxed))
    }
}

/// One lock-free histogram.
struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self { buckets: [const { AtomicU64::new(0) }; BUCKETS], count: AtomicU64::new(0), sum_ns: AtomicU64::new(0) }
    }

    fn observe(&self, ns: u64) {
        let us = ns.div_ceil(1000);
        // Smallest i with us <= 2^i.
        let i = if us <= 1 { 0 } else { (64 - (us - 1).leading_zeros()) as usize };
        self.buckets[i.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

static TABLE: [Histogram; Stage::ALL.len()] = [const { Histogram::new() }; Stage::ALL.len()];

/// Appends `side`'s stages to `out` in the Prometheus text format, as the histogram
/// `{prefix}_stage_seconds` (and `commit_items` in units of one item, as if seconds were items/1000).
pub fn render(side: Side, prefix: &str, out: &mut String) {
    let name = format!("{prefix}_stage_seconds");
    let _ = writeln!(out, "# HELP {name} Time spent in each stage of the data path (see docs/architecture.md).");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for stage in Stage::ALL.into_iter().filter(|s| s.side() == side) {
        let h = &TABLE[stage as usize];
        let mut cumulative = 0;
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = if i == BUCKETS - 1 { "+Inf".to_owned() } else { format!("{:e}", (1u64 << i) as f64 / 1e6) };
            let _ = writeln!(out, "{name}_bucket{{stage=\"{}\",le=\"{le}\"}} {cumulative}", stage.name());
        }
        let (count, sum) = (h.count.load(Ordering::Relaxed), h.sum_ns.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{{stage=\"{}\"}} {}", stage.name(), sum as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{{stage=\"{}\"}} {count}", stage.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounded() {
        // A stage no other test records, so the global table is ours here.
        let s = Stage::NodeReply;
        let (c0, _) = s.totals();
        s.record(Duration::from_nanos(500)); // le 1 µs
        s.record(Duration::from_micros(3)); // le 4 µs
        s.record(Duration::from_hours(1)); // +Inf
        assert_eq!(s.totals().0 - c0, 3);
        let mut out = String::new();
        render(Side::Node, "slate_node", &mut out);
        let line = |le: &str| {
            out.lines()
                .find(|l| {
                    l.starts_with(&format!("slate_node_stage_seconds_bucket{{stage=\"node_reply\",le=\"{le}\"}}"))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no bucket le={le} in\n{out}"))
        };
        assert!(line("1e-6") >= 1);
        assert!(line("4e-6") > line("1e-6"));
        assert_eq!(line("+Inf"), s.totals().0);
        assert!(!out.contains("stage=\"encrypt\""), "client stages rendered on the node side");
    }
}
