//! Prometheus metrics of the storage node.
//!
//! The data-plane server counts requests, bytes, latencies and errors as they
//! happen; the engine's own counters (extents by state, zeroing, disk I/O,
//! fsyncs) are read from a cheap stats snapshot at scrape time, so the engine
//! thread never touches the registry. [`serve`] answers scrapes with the
//! minimal HTTP responder of [`slate_dataplane::metrics`].

use crate::engine::EngineHandle;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use slate_protocol::stages::Side;
use slate_protocol::{ErrorKind, Request};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// A data-plane operation, as a label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Op {
    Hello,
    Write,
    Read,
    Flush,
    Trim,
    WriteZeroes,
    Snapshot,
    ChangedBlocks,
    DeleteLayer,
    WriteIntents,
    ClearIntents,
    AssignSegment,
    ReleaseSegment,
    Allocated,
}

impl Op {
    /// The operation of a request.
    pub fn of(req: &Request) -> Self {
        match req {
            Request::Hello { .. } => Self::Hello,
            Request::Write { .. } => Self::Write,
            Request::Read { .. } | Request::ReadAt { .. } => Self::Read,
            Request::Flush { .. } => Self::Flush,
            Request::Trim { .. } => Self::Trim,
            Request::WriteZeroes { .. } => Self::WriteZeroes,
            Request::Snapshot { .. } => Self::Snapshot,
            Request::ChangedBlocks { .. } => Self::ChangedBlocks,
            Request::DeleteLayer { .. } => Self::DeleteLayer,
            Request::WriteIntents { .. } => Self::WriteIntents,
            Request::ClearIntents { .. } => Self::ClearIntents,
            Request::AssignSegment { .. } => Self::AssignSegment,
            Request::ReleaseSegment { .. } => Self::ReleaseSegment,
            Request::Allocated { .. } => Self::Allocated,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: Op,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResultLabels {
    pub op: Op,
    pub result: ResultLabel,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ResultLabel {
    Ok,
    Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// Every metric of the node. Cheap to share (`Arc`); updates are lock-free.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<OpResultLabels, Counter>,
    pub request_bytes: Family<OpLabels, Counter>,
    pub request_seconds: Family<OpLabels, Histogram>,
    pub errors: Family<KindLabels, Counter>,
    pub sessions_active: Gauge,
    pub sessions_opened: Counter,
    pub sessions_refused: Family<KindLabels, Counter>,
    pub connections_active: Gauge,
    pub malformed_frames: Counter,
    extents: Family<StateLabels, Gauge>,
    capacity_bytes: Gauge,
    zeroed_bytes: Counter,
    disk_ops: Family<DirectionLabels, Counter>,
    disk_bytes: Family<DirectionLabels, Counter>,
    fsyncs: Counter,
    engine_last: Mutex<EngineTotals>,
    /// Written blocks read and checked against their crc32c by the scrubber.
    pub scrub_blocks_checked: Counter,
    /// Blocks the scrubber found not matching their stored crc32c.
    pub scrub_corrupt_found: Counter,
    /// Corrupt blocks rewritten from a peer replica's good copy.
    pub scrub_repaired: Counter,
    /// Corrupt blocks left as they are for now (no good copy reachable).
    pub scrub_unrepaired: Counter,
    /// Scrub passes finished.
    pub scrub_passes: Counter,
    /// Blocks the drain mover copied onto this node.
    pub mover_blocks_copied: Counter,
    /// Drain copies finished, by result (`copied`, `failed`).
    pub mover_copies: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Engine totals last copied into the counters (counters only go up by deltas).
#[derive(Debug, Default, Clone, Copy)]
struct EngineTotals {
    zeroed_bytes: u64,
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
    fsyncs: u64,
}

fn bump(counter: &Counter, last: &mut u64, now: u64) {
    if now > *last {
        counter.inc_by(now - *last);
    }
    *last = now.max(*last);
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new(zero_rate_bytes_per_sec: u64) -> Arc<Self> {
        let mut registry = Registry::with_prefix("slate_node");
        let requests = Family::<OpResultLabels, Counter>::default();
        registry.register("requests", "Data-plane requests handled, by operation and result", requests.clone());
        let request_bytes = Family::<OpLabels, Counter>::default();
        registry.register("request_bytes", "Block bytes written or read by the data plane", request_bytes.clone());
        let request_seconds =
            Family::<OpLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(25e-6, 2.0, 18)));
        registry.register("request_duration_seconds", "Data-plane request latency", request_seconds.clone());
        let errors = Family::<KindLabels, Counter>::default();
        registry.register("errors", "Error replies sent, by wire error kind", errors.clone());
        let sessions_active = Gauge::default();
        registry.register("sessions_active", "Open data-plane sessions", sessions_active.clone());
        let sessions_opened = Counter::default();
        registry.register("sessions_opened", "Sessions accepted (capability verified)", sessions_opened.clone());
        let sessions_refused = Family::<KindLabels, Counter>::default();
        registry.register("sessions_refused", "Hellos refused, by reason", sessions_refused.clone());
        let connections_active = Gauge::default();
        registry.register("connections_active", "Open data-plane TCP connections", connections_active.clone());
        let malformed_frames = Counter::default();
        registry.register("malformed_frames", "Connections closed for a malformed frame", malformed_frames.clone());
        let extents = Family::<StateLabels, Gauge>::default();
        registry.register("extents", "Extents on this node's disk, by lifecycle state", extents.clone());
        let capacity_bytes = Gauge::default();
        registry.register("capacity_bytes", "Bytes of extent space on this node's disk", capacity_bytes.clone());
        let zero_rate_limit: Gauge = Gauge::default();
        zero_rate_limit.set(i64::try_from(zero_rate_bytes_per_sec).unwrap_or(i64::MAX));
        registry.register(
            "zero_rate_limit_bytes_per_second",
            "Configured bound on background zeroing",
            zero_rate_limit.clone(),
        );
        let zeroed_bytes = Counter::default();
        registry.register(
            "zeroed_bytes",
            "Bytes overwritten with zeros and verified by the zeroer (rate() gives the zeroing rate)",
            zeroed_bytes.clone(),
        );
        let disk_ops = Family::<DirectionLabels, Counter>::default();
        registry.register("disk_ops", "Block I/Os issued by the engine", disk_ops.clone());
        let disk_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register("disk_bytes", "Bytes moved by the engine's block I/O", disk_bytes.clone());
        let fsyncs = Counter::default();
        registry.register("fsyncs", "Durability syncs issued by the engine (group commit)", fsyncs.clone());
        let scrub_blocks_checked = Counter::default();
        registry.register(
            "scrub_blocks_checked",
            "Written blocks the scrubber read and checked against their crc32c",
            scrub_blocks_checked.clone(),
        );
        let scrub_corrupt_found = Counter::default();
        registry.register(
            "scrub_corrupt_found",
            "Blocks the scrubber found not matching their stored crc32c",
            scrub_corrupt_found.clone(),
        );
        let scrub_repaired = Counter::default();
        registry.register("scrub_repaired", "Corrupt blocks rewritten from a peer replica", scrub_repaired.clone());
        let scrub_unrepaired = Counter::default();
        registry.register(
            "scrub_unrepaired",
            "Corrupt blocks not repairable when found (retried by the next pass)",
            scrub_unrepaired.clone(),
        );
        let scrub_passes = Counter::default();
        registry.register("scrub_passes", "Scrub passes finished", scrub_passes.clone());
        let mover_blocks_copied = Counter::default();
        registry.register(
            "mover_blocks_copied",
            "Blocks drain copies wrote onto this node",
            mover_blocks_copied.clone(),
        );
        let mover_copies = Family::<ResultLabels, Counter>::default();
        registry.register("mover_copies", "Drain copies finished, by result", mover_copies.clone());
        Arc::new(Self {
            registry,
            requests,
            request_bytes,
            request_seconds,
            errors,
            sessions_active,
            sessions_opened,
            sessions_refused,
            connections_active,
            malformed_frames,
            extents,
            capacity_bytes,
            zeroed_bytes,
            disk_ops,
            disk_bytes,
            fsyncs,
            engine_last: Mutex::new(EngineTotals::default()),
            scrub_blocks_checked,
            scrub_corrupt_found,
            scrub_repaired,
            scrub_unrepaired,
            scrub_passes,
            mover_blocks_copied,
            mover_copies,
        })
    }

    /// Records one finished request.
    pub fn observe(&self, op: Op, elapsed: Duration, block_bytes: u64, error: Option<ErrorKind>) {
        let result = if error.is_some() { ResultLabel::Error } else { ResultLabel::Ok };
        self.requests.get_or_create(&OpResultLabels { op, result }).inc();
        self.request_seconds.get_or_create(&OpLabels { op }).observe(elapsed.as_secs_f64());
        if block_bytes > 0 {
            self.request_bytes.get_or_create(&OpLabels { op }).inc_by(block_bytes);
        }
        if let Some(kind) = error {
            self.error(kind);
        }
    }

    /// Counts one error reply.
    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&KindLabels { kind: format!("{kind:?}") }).inc();
    }

    /// Copies the engine's counters into the registry (called at scrape time).
    pub fn observe_engine(&self, engine: &EngineHandle) {
        let s = engine.stats();
        for (state, n) in [
            ("free", s.extents_free),
            ("owned", s.extents_owned),
            ("dirty", s.extents_dirty),
            ("zeroing", s.extents_zeroing),
            ("failed", s.extents_failed),
        ] {
            self.extents.get_or_create(&StateLabels { state }).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.capacity_bytes.set(i64::try_from(s.capacity_bytes).unwrap_or(i64::MAX));
        let mut last = self.engine_last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        bump(&self.zeroed_bytes, &mut last.zeroed_bytes, s.bytes_zeroed_total);
        bump(&self.fsyncs, &mut last.fsyncs, s.fsyncs);
        let read = DirectionLabels { direction: "read" };
        let write = DirectionLabels { direction: "write" };
        bump(&self.disk_ops.get_or_create(&read), &mut last.reads, s.reads);
        bump(&self.disk_ops.get_or_create(&write), &mut last.writes, s.writes);
        bump(&self.disk_bytes.get_or_create(&read), &mut last.read_bytes, s.bytes_read);
        bump(&self.disk_bytes.get_or_create(&write), &mut last.write_bytes, s.bytes_written);
    }

    /// The registry in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        slate_dataplane::metrics::with_stages(out, Side::Node, "slate_node")
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    engine: EngineHandle,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let render = move || {
        metrics.observe_engine(&engine);
        metrics.render()
    };
    slate_dataplane::metrics::serve_text(listener, Arc::new(render), shutdown).await;
}
