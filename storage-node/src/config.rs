//! The storage node's configuration file (TOML), loaded and validated once at start.
//!
//! Until the metadata service exists a node learns everything it needs from
//! this file: who it is, where it listens, which disk it owns, the metadata
//! service's public key (to verify capabilities) and, optionally, a static list
//! of segment assignments. The same path stays useful for tests. Every relation
//! between values is checked here, so the rest of the node can trust them.
//!
//! ```toml
//! node_id = 1
//! listen = "127.0.0.1:7400"
//! metrics_listen = "127.0.0.1:9400"        # optional; no metrics endpoint without it
//! admin_socket = "/run/slate/node-1.sock"  # optional; local admin commands (0600)
//! disks = ["/var/lib/slate/disk0.img"]
//! verifying_key = "<64 hex chars: the metadata service's ed25519 public key>"
//! zero_rate_bytes_per_sec = 268435456
//! metadata_cache_bytes = 67108864
//! max_inflight_bytes_per_connection = 67108864
//! drain_rate_bytes_per_sec = 134217728     # drain copies onto this node
//! scrub_rate_bytes_per_sec = 16777216      # background scrub reads; 0: only on request
//!
//! [[assignments]]
//! volume = 1
//! segment = 0
//! segment_blocks = 262144
//!
//! [tls]                                    # the data plane is TLS (see dataplane/src/tls.rs)
//! cert = "/etc/slate/node-1-cert.pem"      # issued by the cluster CA for the listen IP
//! key = "/etc/slate/node-1-key.pem"        # 0600
//! ca = "/etc/slate/ca.pem"                 # the cluster CA: checks peers this node dials
//! # insecure_plaintext = true              # instead of [tls]: plain TCP, tests only
//!
//! [meta]                                   # optional: heartbeats, reports, the node's work
//! apis = ["https://127.0.0.1:7600"]
//! ca = "/etc/slate/ca.pem"
//! token_file = "/etc/slate/node.token"     # 0600; this node's own principal (`slate node token`)
//! ```

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use slate_dataplane::tls::{Connector, Identity};
use slate_protocol::frame::MAX_FRAME_PAYLOAD;
use slate_protocol::{Holder, NodeId, SegmentIndex, VolumeId};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default bound on request and reply bytes in flight on one connection.
pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Default background zeroing rate.
pub const DEFAULT_ZERO_RATE_BYTES_PER_SEC: u64 = 256 << 20;
/// Default rate of drain copies onto a node.
pub const DEFAULT_DRAIN_RATE_BYTES_PER_SEC: u64 = 128 << 20;
/// Default rate of background scrub reads.
pub const DEFAULT_SCRUB_RATE_BYTES_PER_SEC: u64 = 16 << 20;
/// Default memory for cached on-disk metadata.
pub const DEFAULT_METADATA_CACHE_BYTES: u64 = 64 << 20;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One segment of a volume this node holds a replica of, given statically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticAssignment {
    pub volume: VolumeId,
    pub segment: SegmentIndex,
    pub segment_blocks: u64,
}

/// Where the metadata service is, for the node's own link to it: the node
/// heartbeats to it (see `heartbeat.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaLink {
    /// Management API base URLs of the metadata replicas.
    pub apis: Vec<String>,
    /// CA certificate that signs the metadata service's TLS certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// File holding the bearer token the node presents: a token of the node's own principal
    /// (role `node`, bound to this node's id; `slate node token ID --out FILE` makes one).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// The data plane's TLS material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This node's certificate (PEM), issued by the cluster CA for the listen address's IP.
    pub cert: PathBuf,
    /// Its private key (PEM, 0600).
    pub key: PathBuf,
    /// The cluster CA (PEM): the node checks the peers it dials (drain, scrub repair) against it.
    pub ca: PathBuf,
}

/// The node's configuration file, as written by an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// Data-plane listen address.
    pub listen: SocketAddr,
    /// HTTP address serving `/metrics`, if any.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Unix socket for local admin commands (`slate-node admin ...`), if any.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Formatted disks (block devices or preallocated files). One is served today.
    pub disks: Vec<PathBuf>,
    /// Hex of the metadata service's ed25519 verifying key.
    pub verifying_key: String,
    #[serde(default = "default_zero_rate")]
    pub zero_rate_bytes_per_sec: u64,
    #[serde(default = "default_cache")]
    pub metadata_cache_bytes: u64,
    #[serde(default = "default_inflight")]
    pub max_inflight_bytes_per_connection: u64,
    /// Rate of drain copies onto this node (bytes per second).
    #[serde(default = "default_drain_rate")]
    pub drain_rate_bytes_per_sec: u64,
    /// Rate of background scrub reads (bytes per second; 0: no background scrub,
    /// only scrubs an operator asks for).
    #[serde(default = "default_scrub_rate")]
    pub scrub_rate_bytes_per_sec: u64,
    /// Segments to assign at start (idempotent), until the metadata service does it.
    #[serde(default)]
    pub assignments: Vec<StaticAssignment>,
    /// The metadata service link, if any (see [`MetaLink`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<MetaLink>,
    /// Data-plane TLS; required unless `insecure_plaintext`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Serve the data plane as plain TCP: capabilities then travel in clear and
    /// are not bound to a client. For in-process tests only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_plaintext: bool,
}

fn default_zero_rate() -> u64 {
    DEFAULT_ZERO_RATE_BYTES_PER_SEC
}
fn default_cache() -> u64 {
    DEFAULT_METADATA_CACHE_BYTES
}
fn default_inflight() -> u64 {
    DEFAULT_MAX_INFLIGHT_BYTES
}
fn default_drain_rate() -> u64 {
    DEFAULT_DRAIN_RATE_BYTES_PER_SEC
}
fn default_scrub_rate() -> u64 {
    DEFAULT_SCRUB_RATE_BYTES_PER_SEC
}

impl NodeConfig {
    /// A configuration with defaults for everything optional. It serves plain
    /// TCP (`insecure_plaintext`) until [`Self::with_tls`] is called: in-process
    /// tests use it as it is; every real node sets TLS.
    pub fn new(node_id: NodeId, listen: SocketAddr, disk: PathBuf, verifying_key: &VerifyingKey) -> Self {
        Self {
            node_id,
            listen,
            metrics_listen: None,
            admin_socket: None,
            disks: vec![disk],
            verifying_key: hex::encode(verifying_key.as_bytes()),
            zero_rate_bytes_per_sec: DEFAULT_ZERO_RATE_BYTES_PER_SEC,
            metadata_cache_bytes: DEFAULT_METADATA_CACHE_BYTES,
            max_inflight_bytes_per_connection: DEFAULT_MAX_INFLIGHT_BYTES,
            drain_rate_bytes_per_sec: DEFAULT_DRAIN_RATE_BYTES_PER_SEC,
            scrub_rate_bytes_per_sec: DEFAULT_SCRUB_RATE_BYTES_PER_SEC,
            assignments: Vec::new(),
            meta: None,
            tls: None,
            insecure_plaintext: true,
        }
    }

    /// The same configuration serving TLS with these files.
    #[must_use]
    pub fn with_tls(mut self, tls: TlsFiles) -> Self {
        self.tls = Some(tls);
        self.insecure_plaintext = false;
        self
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), source: Box::new(e) })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The TOML text of this config.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The verifying key, parsed (validated at load).
    pub fn verifying_key(&self) -> Result<VerifyingKey, ConfigError> {
        slate_protocol::capability::verifying_key_from_hex(&self.verifying_key)
            .ok_or_else(|| ConfigError::Invalid("verifying_key is not 64 hex chars of a valid ed25519 key".into()))
    }

    /// Checks the relations between values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        self.verifying_key()?;
        if self.disks.is_empty() {
            return bad("disks: at least one disk is needed");
        }
        if self.disks.len() > 1 {
            return bad("disks: this version serves exactly one disk per node process");
        }
        if self.zero_rate_bytes_per_sec == 0 {
            return bad("zero_rate_bytes_per_sec must be > 0 or freed extents are never reused");
        }
        // A connection must be able to hold at least one largest request and its reply.
        if self.max_inflight_bytes_per_connection < 2 * MAX_FRAME_PAYLOAD as u64 + 4096
            || self.max_inflight_bytes_per_connection > 1 << 32
        {
            return bad("max_inflight_bytes_per_connection must be between 2 frames (~8.1 MiB) and 4 GiB");
        }
        if self.listen.port() != 0 && Some(self.listen) == self.metrics_listen {
            return bad("listen and metrics_listen must differ");
        }
        match (&self.tls, self.insecure_plaintext) {
            (None, false) => {
                return bad("[tls] cert, key and ca are required (or insecure_plaintext = true, for tests only)")
            }
            (Some(_), true) => return bad("[tls] and insecure_plaintext = true contradict each other"),
            _ => {}
        }
        if self.meta.as_ref().is_some_and(|m| m.apis.is_empty()) {
            return bad("meta.apis: at least one metadata service URL is needed");
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.assignments {
            if a.segment_blocks == 0 {
                return bad("assignments: segment_blocks must be > 0");
            }
            if !seen.insert((a.volume, a.segment)) {
                return bad("assignments: a (volume, segment) appears twice");
            }
        }
        Ok(())
    }
}

/// A node's connector for the peers it dials, and the holder binding to ask
/// slate-meta for: TLS as the node's own certificate when `[tls]` is set.
pub fn node_connector(cfg: &NodeConfig) -> anyhow::Result<(Connector, Option<Holder>)> {
    match &cfg.tls {
        None => Ok((Connector::plaintext(), None)),
        Some(files) => {
            let identity = Identity::from_pem_files(&files.cert, &files.key)?;
            let connector = Connector::tls(&files.ca, &identity)?;
            Ok((connector, Some(identity.holder())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_validates() {
        let key = slate_protocol::capability::generate_signing_key();
        let mut cfg =
            NodeConfig::new(NodeId(3), "127.0.0.1:7400".parse().unwrap(), "/tmp/d.img".into(), &key.verifying_key());
        cfg.assignments.push(StaticAssignment { volume: VolumeId(1), segment: SegmentIndex(0), segment_blocks: 256 });
        let text = cfg.to_toml();
        assert_eq!(NodeConfig::parse(&text).unwrap(), cfg);

        let mut bad = cfg.clone();
        bad.verifying_key = "abcd".into();
        assert!(bad.validate().is_err());
        let mut bad = cfg.clone();
        bad.assignments.push(bad.assignments[0]);
        assert!(bad.validate().is_err());
        let mut bad = cfg;
        bad.max_inflight_bytes_per_connection = 1024;
        assert!(bad.validate().is_err());
        assert!(NodeConfig::parse("node_id = 1\nbogus = 2").is_err());
        let with_meta = format!("{text}\n[meta]\napis = [\"https://127.0.0.1:1\"]\nca = \"/x/ca.pem\"\n");
        assert_eq!(NodeConfig::parse(&with_meta).unwrap().meta.unwrap().apis.len(), 1);
    }

    #[test]
    fn the_data_plane_is_tls_unless_told_otherwise() {
        let key = slate_protocol::capability::generate_signing_key();
        let cfg = NodeConfig::new(NodeId(3), "127.0.0.1:7400".parse().unwrap(), "/d.img".into(), &key.verifying_key());
        let tls = TlsFiles { cert: "/c.pem".into(), key: "/k.pem".into(), ca: "/ca.pem".into() };
        let secure = cfg.clone().with_tls(tls.clone());
        assert_eq!(NodeConfig::parse(&secure.to_toml()).unwrap(), secure);
        assert!(!secure.to_toml().contains("insecure_plaintext"));
        let text = secure.to_toml();
        let bare = &text[..text.find("[tls]").unwrap()];
        let e = NodeConfig::parse(bare).unwrap_err().to_string();
        assert!(e.contains("[tls]"), "{e}");
        let mut both = secure;
        both.insecure_plaintext = true;
        assert!(both.validate().is_err());
    }
}
