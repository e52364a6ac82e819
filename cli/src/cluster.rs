//! `cluster.json`: how tools, tests and the CLI find a running cluster.
//!
//! `slate up` writes it (atomically: temp file, fsync, rename) only once the
//! volume is being served, and removes it when it stops, so its presence means
//! "ready". The CLI reads it to learn the API address, the CA to trust and the
//! token to present, so that commands run from the same directory need no flags.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One process `slate up` started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    /// "meta", "node" or "client".
    pub role: String,
    pub id: u64,
    pub pid: u32,
    /// The process's main listen address (API for meta, data plane for node, NBD TCP for client).
    pub addr: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub failure_domain: String,
    /// Its data directory or disk file.
    pub data: PathBuf,
    /// Extra addresses (peer port, metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// One volume being served.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub nbd_unix: String,
    /// A libnbd URI (`nbds://…?tls-certificates=DIR`): the TCP listener takes mutual TLS only.
    pub nbd_tcp: String,
    /// Client credentials for the TCP listener, laid out as qemu's `tls-creds-x509`
    /// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`) and libnbd expect.
    #[serde(default)]
    pub tls_creds_dir: Option<PathBuf>,
}

/// The whole file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterFile {
    pub ready: bool,
    /// The management API of one metadata node (any works; followers forward).
    pub api: String,
    /// Every metadata node's API address, for failover.
    #[serde(default)]
    pub apis: Vec<String>,
    /// PEM of the CA that signed the API's certificates.
    pub ca: PathBuf,
    /// A file holding the operator bearer token (mode 0600).
    pub token_file: PathBuf,
    pub processes: Vec<ProcessInfo>,
    pub volumes: Vec<VolumeInfo>,
    /// The cluster's ed25519 verifying key (hex): checks capabilities and erase certificates.
    #[serde(default)]
    pub verifying_key: Option<String>,
}

impl ClusterFile {
    /// Reads the file named by `explicit`, else `$SLATE_CLUSTER`, else `./slate-data/cluster.json`.
    pub fn locate(explicit: Option<&Path>) -> Result<(PathBuf, Self)> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => match std::env::var_os("SLATE_CLUSTER") {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from("slate-data/cluster.json"),
            },
        };
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no cluster found at {} (start one with `slate up`, or pass --cluster PATH / set SLATE_CLUSTER)",
                path.display()
            )
        })?;
        let file: Self =
            serde_json::from_str(&text).with_context(|| format!("{} is not a cluster file", path.display()))?;
        Ok((path, file))
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        // Names token files and credential directories: owner only, like the rest of the cluster directory.
        write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes(), 0o600)
    }
}

/// Writes `bytes` to `path` through a temp file, fsync and rename, with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
