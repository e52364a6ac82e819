//! What `slate up` does with the metadata service: lay out its directory,
//! initialise a local cluster (`slate meta init`), wait for a leader, and
//! provision the demo tenant, host principal, volume and grant.

use super::cluster::write_atomic;
use super::up::{NodeMember, UpState};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use slate::api::ApiClient;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where the metadata service's files live under `slate up`'s directory.
#[derive(Debug, Clone)]
pub struct MetaLayout {
    root: PathBuf,
    api_ports: Vec<(u64, u16)>,
    raft_ports: Vec<u16>,
}

impl MetaLayout {
    pub fn new(dir: &Path, st: &UpState) -> Self {
        Self {
            root: dir.join("meta"),
            api_ports: st.meta.iter().map(|m| (m.id, m.api_port)).collect(),
            raft_ports: st.meta.iter().map(|m| m.peer_port).collect(),
        }
    }
    pub fn api_url(&self, id: u64) -> String {
        let port = self.api_ports.iter().find(|(i, _)| *i == id).map_or(0, |(_, p)| *p);
        format!("https://127.0.0.1:{port}")
    }
    pub fn api_urls(&self) -> Vec<String> {
        self.api_ports.iter().map(|(id, _)| self.api_url(*id)).collect()
    }
    pub fn ca_path(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    /// The cluster CA's private key (0600), written by `slate-meta init`.
    pub fn ca_key_path(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn operator_token_path(&self) -> PathBuf {
        self.root.join("operator.token")
    }
    pub fn host_token_path(&self) -> PathBuf {
        self.root.join("host.token")
    }
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("node-{id}")).join("data")
    }
    pub fn config_path(&self, id: u64) -> PathBuf {
        self.root.join(format!("node-{id}")).join("meta.toml")
    }
}

/// Creates the metadata cluster's keys, CA, certificates and configs.
pub fn init(l: &MetaLayout) -> Result<()> {
    let api = l.api_ports.iter().map(|(_, p)| p.to_string()).collect::<Vec<_>>().join(",");
    let raft = l.raft_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("run-meta")
        .arg("init")
        .arg("--dir")
        .arg(&l.root)
        .arg("--nodes")
        .arg(l.api_ports.len().to_string())
        .arg("--api-ports")
        .arg(api)
        .arg("--raft-ports")
        .arg(raft)
        .output()
        .context("running slate meta init")?;
    if !out.status.success() {
        bail!("slate meta init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Arguments of `slate meta ...` that run node `id`.
pub fn serve_args(l: &MetaLayout, id: u64) -> Result<Vec<String>> {
    Ok(vec!["serve".into(), "--config".into(), l.config_path(id).display().to_string()])
}

/// The capability verifying key storage nodes need (hex).
pub fn verifying_key_hex(l: &MetaLayout) -> Result<String> {
    let p = l.root.join("verifying.key");
    Ok(std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?.trim().to_owned())
}

/// Where a storage node finds the metadata service (for heartbeats and reports), and the
/// file holding its own node principal's token.
pub fn node_meta_link(l: &MetaLayout, token_file: &Path) -> slate_node::config::MetaLink {
    slate_node::config::MetaLink { apis: l.api_urls(), ca: Some(l.ca_path()), token_file: Some(token_file.to_owned()) }
}

/// A blocking wrapper around the API client for `slate up`'s sequential steps.
#[derive(Debug)]
pub struct Api {
    rt: tokio::runtime::Runtime,
    client: ApiClient,
}

impl Api {
    pub fn connect(l: &MetaLayout) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = ApiClient::new(l.api_urls(), &l.ca_path(), &l.operator_token_path())?;
        Ok(Self { rt, client })
    }

    fn get(&self, path: &str) -> Result<Value> {
        self.rt.block_on(self.client.get(path))
    }
    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.rt.block_on(self.client.post(path, body))
    }

    /// Waits until a leader is elected and the cluster answers writes-able reads.
    pub fn wait_for_leader(&self, timeout: Duration, stop: &AtomicBool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(v) = self.get("/v1/status") {
                if v["leader_id"].as_u64().is_some_and(|l| l != 0) && v["bootstrapped"].as_bool() == Some(true) {
                    return Ok(());
                }
            }
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!("the metadata service elected no leader within {timeout:?}; see the logs under logs/");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Registers storage node `n` if the cluster does not know it; returns its id.
    pub fn register_node(&self, n: &NodeMember, disk_bytes: u64) -> Result<u64> {
        let name = format!("node-{}", n.id);
        let nodes = self.get("/v1/nodes")?;
        if let Some(existing) = nodes.as_array().into_iter().flatten().find(|v| v["name"] == name.as_str()) {
            return existing["id"].as_u64().context("node without id");
        }
        let v = self.post(
            "/v1/nodes",
            &json!({
                "name": name,
                "addr": format!("127.0.0.1:{}", n.port),
                "failure_domain": n.failure_domain,
                "disks": [{"name": format!("{name}-disk0"), "capacity_bytes": disk_bytes}],
            }),
        )?;
        let id = v["id"].as_u64().context("register reply without id")?;
        if id != n.id {
            bail!("the metadata service gave storage node {} the id {id}; expected {}", name, n.id);
        }
        Ok(id)
    }

    /// Gives storage node `id` its own principal (`node-ID`) and writes its token to `out`
    /// (0600), unless `out` already holds one.
    pub fn ensure_node_token(&self, id: u64, out: &Path) -> Result<()> {
        if std::fs::read_to_string(out).is_ok_and(|t| !t.trim().is_empty()) {
            return Ok(());
        }
        self.rt.block_on(super::operations::node_token(&self.client, id, &format!("node-{id}"), out)).map(drop)
    }

    /// Marks a node alive.
    pub fn heartbeat(&self, id: u64) -> Result<()> {
        self.post(&format!("/v1/nodes/{id}/heartbeat"), &json!(null)).map(|_| ())
    }

    /// Creates the demo tenant, a host principal (its token in `host.token`), the volume and the grant.
    pub fn provision_demo(&self, st: &UpState, l: &MetaLayout, segment_blocks: Option<u64>) -> Result<()> {
        if let Some(sb) = segment_blocks {
            self.rt.block_on(self.client.call::<Value, Value>(
                reqwest::Method::PATCH,
                "/v1/settings",
                Some(&json!({"segment_blocks": sb})),
            ))?;
        }
        let tenant = self.post("/v1/tenants", &json!({"name": "demo"}))?;
        let tenant_id = tenant["id"].as_u64().context("tenant reply without id")?;
        let host = self.post("/v1/principals", &json!({"name": "demo-host", "role": "host", "tenant": tenant_id}))?;
        let host_id = host["principal"]["id"].as_u64().context("principal reply without id")?;
        let token = host["token"].as_str().context("principal reply without token")?;
        write_atomic(&l.host_token_path(), format!("{token}\n").as_bytes(), 0o600)?;
        let vol = self.post(
            "/v1/volumes",
            &json!({"name": st.volume_name, "size_bytes": st.volume_size, "replicas": 2, "tenant": tenant_id}),
        )?;
        let vol_id = vol["id"].as_u64().context("volume reply without id")?;
        self.post("/v1/grants", &json!({"principal": host_id, "volume": vol_id, "access": "read_write"}))?;
        Ok(())
    }
}
