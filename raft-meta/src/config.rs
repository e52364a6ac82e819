//! `meta.toml`: one metadata node's configuration, validated when loaded.
//!
//! Secrets are never in the config itself, only the paths of the files that
//! hold them (root key, signing key, TLS key), which live outside the data
//! directory so that a copy of the data directory holds no key that opens it.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One metadata cluster member as seen in the config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: u64,
    /// Raft peer transport address.
    pub raft_addr: SocketAddr,
    /// Management API address (for redirect hints and the CLI).
    pub api_addr: SocketAddr,
}

/// Raft timing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_every_entries: u64,
    pub request_timeout_ms: u64,
    /// Size of one Raft log file.
    pub log_file_bytes: u64,
    /// Total Raft log size beyond which compacted files are deleted.
    pub log_purge_bytes: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every_entries: 10_000,
            request_timeout_ms: 10_000,
            log_file_bytes: crate::consensus::DEFAULT_LOG_FILE_BYTES,
            log_purge_bytes: crate::consensus::DEFAULT_LOG_PURGE_BYTES,
        }
    }
}

/// The API guard: rate limits, failed-credential backoff, security-event aggregation
/// (design/api-security.md). The defaults are far above the cluster's own traffic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Requests per second one source IP may make (token bucket), and its burst.
    pub per_source_rps: u32,
    pub per_source_burst: u32,
    /// Authenticated requests per second one principal may make, and its burst.
    pub per_principal_rps: u32,
    pub per_principal_burst: u32,
    /// Failed credentials a source (or token id) may present before backoff starts.
    pub free_failures: u32,
    /// First backoff window; each further failure after a window doubles it, up to the max.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// A source (or token id) without a failure for this long starts again from zero.
    pub failure_forget_ms: u64,
    /// How often aggregated security events become audit records (one per source and kind).
    pub event_flush_ms: u64,
    /// Most sources, principals and token ids tracked at once (memory bound).
    pub max_tracked: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            per_source_rps: 5_000,
            per_source_burst: 10_000,
            per_principal_rps: 5_000,
            per_principal_burst: 10_000,
            free_failures: 10,
            backoff_base_ms: 250,
            backoff_max_ms: 60_000,
            failure_forget_ms: 300_000,
            event_flush_ms: 10_000,
            max_tracked: 65_536,
        }
    }
}

impl GuardConfig {
    /// Checks the relations between fields.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.per_source_rps >= 1 && self.per_principal_rps >= 1, "rate limits must be at least 1/s");
        anyhow::ensure!(
            self.per_source_burst >= 1 && self.per_principal_burst >= 1,
            "rate-limit bursts must be at least 1"
        );
        anyhow::ensure!(
            (1..=self.backoff_max_ms).contains(&self.backoff_base_ms),
            "guard.backoff_base_ms must be 1..=backoff_max_ms"
        );
        anyhow::ensure!(self.backoff_max_ms <= 86_400_000, "guard.backoff_max_ms is at most a day");
        anyhow::ensure!(
            self.failure_forget_ms >= self.backoff_max_ms,
            "guard.failure_forget_ms must be >= backoff_max_ms"
        );
        anyhow::ensure!((100..=600_000).contains(&self.event_flush_ms), "guard.event_flush_ms must be 100..600000");
        anyhow::ensure!((16..=10_000_000).contains(&self.max_tracked), "guard.max_tracked must be 16..10000000");
        Ok(())
    }
}

/// A node's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id.
    pub node_id: u64,
    /// Management API listen address (HTTPS).
    pub api_addr: SocketAddr,
    /// Raft peer transport listen address.
    pub raft_addr: SocketAddr,
    /// Every member, this node included.
    pub peers: Vec<Peer>,
    /// Start empty and wait to be added to an existing cluster.
    #[serde(default)]
    pub join: bool,
    /// Raft log, snapshots and state file.
    pub data_dir: PathBuf,
    /// Root key file (outside `data_dir`). Ignored when `root_key_env` is set.
    #[serde(default)]
    pub root_key_file: Option<PathBuf>,
    /// Take the root key from this environment variable instead (read-only: no ratchet).
    /// Test-only: refused unless `insecure_test_root_key = true`.
    #[serde(default)]
    pub root_key_env: Option<String>,
    /// Accept `root_key_env`. The environment value never changes, so a shred cannot
    /// destroy the old root and `rotate-root` cannot store a new one: an old copy of a
    /// data directory stays readable by whoever holds the value. Tests only.
    #[serde(default)]
    pub insecure_test_root_key: bool,
    /// ed25519 capability signing key (hex seed), same on every node.
    pub signing_key_file: PathBuf,
    /// This node's certificate and key: served by the API and, with `ca_cert`, used for mutual TLS
    /// between metadata nodes (the certificate must name the node's IP and allow client auth too).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The cluster CA. When set, the Raft peer transport uses mutual TLS; without it the Raft port is
    /// plaintext and must only be reachable by the other metadata nodes.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// SHA-256 (hex) of the first operator token, used once to bootstrap the cluster.
    #[serde(default)]
    pub bootstrap_token_hash_file: Option<PathBuf>,
    /// Largest request body accepted by the API.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How often the leader runs the storage-node liveness sweep.
    #[serde(default = "default_sweep_ms")]
    pub sweep_interval_ms: u64,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub guard: GuardConfig,
}

fn default_max_body() -> usize {
    64 * 1024
}

fn default_sweep_ms() -> u64 {
    5_000
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between fields.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.node_id != 0, "node_id must be non-zero");
        anyhow::ensure!(
            self.join || self.peers.iter().any(|p| p.id == self.node_id),
            "peers must include this node (id {})",
            self.node_id
        );
        anyhow::ensure!(
            self.root_key_file.is_some() || self.root_key_env.is_some(),
            "set root_key_file or root_key_env"
        );
        anyhow::ensure!(
            self.root_key_env.is_none() || self.insecure_test_root_key,
            "root_key_env is for tests only: an environment variable cannot be ratcheted or re-keyed, so a \
             crypto-shred would not protect old copies of the data directory; use root_key_file (or a KMS), \
             or set insecure_test_root_key = true in a test configuration"
        );
        if let Some(k) = &self.root_key_file {
            let data = self.data_dir.canonicalize().unwrap_or_else(|_| self.data_dir.clone());
            let key = k.canonicalize().unwrap_or_else(|_| k.clone());
            anyhow::ensure!(
                !key.starts_with(&data),
                "root_key_file must live outside data_dir, or a copy of the data directory would carry its own key"
            );
        }
        anyhow::ensure!((1024..=16 << 20).contains(&self.max_body_bytes), "max_body_bytes must be 1 KiB..16 MiB");
        anyhow::ensure!(self.sweep_interval_ms >= 100, "sweep_interval_ms must be at least 100");
        self.guard.validate()
    }

    /// The API address of a peer.
    pub fn api_of(&self, id: u64) -> Option<SocketAddr> {
        self.peers.iter().find(|p| p.id == id).map(|p| p.api_addr)
    }
}
