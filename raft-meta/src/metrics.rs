//! Prometheus metrics of a metadata node (text format at `/metrics`).
//!
//! Gauges that mirror consensus status or state counts are refreshed at scrape
//! time, so they are never stale and cost nothing between scrapes. No metric
//! carries a key, token, or tenant-chosen name.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// A security event: its kind and the source address (`other` past a bounded number of sources).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabel {
    pub kind: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// Every metric of the node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub term: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub apply_lag: Gauge,
    pub leader_id: Gauge,
    pub is_leader: Gauge,
    pub nodes: Family<StateLabel, Gauge>,
    pub volumes: Gauge,
    pub tenants: Gauge,
    pub attachments: Gauge,
    pub audit_records: Gauge,
    pub root_epoch: Gauge,
    pub attach_latency: Histogram,
    pub create_volume_latency: Histogram,
    pub requests: Family<StatusLabel, Counter>,
    pub security_events: Family<SecurityLabel, Counter>,
    pub auth_refusal_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slate_meta");
        let m = Self {
            registry: Registry::default(),
            term: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            apply_lag: Gauge::default(),
            leader_id: Gauge::default(),
            is_leader: Gauge::default(),
            nodes: Family::default(),
            volumes: Gauge::default(),
            tenants: Gauge::default(),
            attachments: Gauge::default(),
            audit_records: Gauge::default(),
            root_epoch: Gauge::default(),
            attach_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            create_volume_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            requests: Family::default(),
            security_events: Family::default(),
            // 10 us .. ~1.3 s: a refusal is a hash lookup, so the interesting part is below 1 ms.
            auth_refusal_latency: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
        };
        registry.register("raft_term", "Current Raft term", m.term.clone());
        registry.register("raft_commit_index", "Raft commit index", m.commit_index.clone());
        registry.register("raft_applied_index", "Last applied Raft index", m.applied_index.clone());
        registry.register("raft_apply_lag", "Committed but not yet applied entries", m.apply_lag.clone());
        registry.register("raft_leader_id", "Id of the known leader (0: none)", m.leader_id.clone());
        registry.register("raft_is_leader", "1 when this node is the leader", m.is_leader.clone());
        registry.register("storage_nodes", "Storage nodes by state", m.nodes.clone());
        registry.register("volumes", "Volumes", m.volumes.clone());
        registry.register("tenants", "Tenants", m.tenants.clone());
        registry.register("attachments", "Live attachments", m.attachments.clone());
        registry.register("audit_records", "Records in the audit chain", m.audit_records.clone());
        registry.register("root_key_epoch", "Root key epoch (number of crypto-shreds)", m.root_epoch.clone());
        registry.register("attach_latency_seconds", "Attach calls, end to end", m.attach_latency.clone());
        registry.register(
            "create_volume_latency_seconds",
            "Volume create calls, end to end",
            m.create_volume_latency.clone(),
        );
        registry.register("api_requests", "API responses by HTTP status", m.requests.clone());
        registry.register(
            "security_events",
            "Security events (refused credentials, lockouts, rate limits, reported capability and certificate refusals) by kind and source",
            m.security_events.clone(),
        );
        registry.register(
            "auth_refusal_seconds",
            "Time to refuse a request at the credential check (before anything is proposed)",
            m.auth_refusal_latency.clone(),
        );
        Self { registry, ..m }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
