//! The operator's commands on storage: `slate node drain|show`, `slate disk
//! drain|decommission|show|certificate`, `slate scrub NODE` and `slate
//! certificate verify|render`. NODE and DISK are taken by name or id; every
//! long operation takes `--wait` and shows a progress bar until it is done.

use super::commands::{bytes_h, print};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::Value;
use slate::api::ApiClient;
use slate_protocol::api::{
    CreatePrincipalRequest, CreateTokenRequest, DecommissionView, DiskState, DrainState, DrainView, IssuedToken,
    NodeView, PrincipalView, Role,
};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum CertificateCmd {
    /// Check an erase certificate offline: its signature with the cluster's verifying key,
    /// and that not one byte of the file was changed.
    Verify {
        file: PathBuf,
        /// The cluster's verifying key (hex); default: the one in the cluster file.
        #[arg(long)]
        verifying_key: Option<String>,
    },
    /// Render a certificate as a printable HTML page (after verifying it).
    Render {
        file: PathBuf,
        /// Where to write the page.
        #[arg(long)]
        html: PathBuf,
        #[arg(long)]
        verifying_key: Option<String>,
    },
}

/// Gives storage node `node` its own principal (role `node`, named `name`) and writes a token
/// of it to `out` (0600, replaced atomically): the node's `[meta] token_file`. If a node
/// principal of that name for that node exists already, a new token is issued to it. The
/// token is never printed. Returns the principal's id.
pub async fn node_token(api: &ApiClient, node: u64, name: &str, out: &Path) -> Result<u64> {
    let list: Vec<PrincipalView> = api.get("/v1/principals").await?;
    let mut issued: IssuedToken = if let Some(p) = list.into_iter().find(|p| p.name == name) {
        if p.role != Role::Node || p.node != Some(node) {
            bail!("a principal named {name:?} exists and is not node {node}'s; choose another --name");
        }
        api.post(&format!("/v1/principals/{}/tokens", p.id), &CreateTokenRequest::default()).await?
    } else {
        let req = CreatePrincipalRequest {
            name: name.to_owned(),
            role: Role::Node,
            tenant: None,
            node: Some(node),
            not_before_ms: None,
            not_after_ms: None,
            token_expires_ms: None,
        };
        api.post("/v1/principals", &req).await?
    };
    let secret = zeroize::Zeroizing::new(issued.token.take().context("reply without a token")?);
    let token = zeroize::Zeroizing::new(format!("{}\n", secret.as_str()));
    write_secret(out, token.as_bytes())?;
    Ok(issued.principal.id)
}

/// Writes `bytes` to `path` through a fresh 0600 temporary file and a rename.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// A storage node's id from its id or name.
pub async fn resolve_node(api: &ApiClient, node: &str) -> Result<u64> {
    let list: Value = api.get("/v1/nodes").await?;
    let all = list.as_array().cloned().unwrap_or_default();
    let found = all
        .iter()
        .find(|n| n["name"].as_str() == Some(node) || n["id"].as_u64().map(|i| i.to_string()).as_deref() == Some(node));
    if let Some(id) = found.and_then(|n| n["id"].as_u64()) {
        return Ok(id);
    }
    let names: Vec<&str> = all.iter().filter_map(|n| n["name"].as_str()).collect();
    bail!("no storage node {node:?} (nodes: {})", names.join(", "))
}

/// A disk's id from its id, its name, or `NODE` / `NODE/NAME` for a node's (only) disk.
pub async fn resolve_disk(api: &ApiClient, disk: &str) -> Result<u64> {
    let list: Value = api.get("/v1/disks").await?;
    let all = list.as_array().cloned().unwrap_or_default();
    let by = |f: &dyn Fn(&Value) -> bool| -> Vec<u64> {
        all.iter().filter(|d| f(d)).filter_map(|d| d["id"].as_u64()).collect()
    };
    let mut hits = by(&|d| d["id"].as_u64().map(|i| i.to_string()).as_deref() == Some(disk));
    if hits.is_empty() {
        hits = by(&|d| d["name"].as_str() == Some(disk));
    }
    if hits.is_empty() {
        hits = by(&|d| {
            let node = d["node_name"].as_str().unwrap_or_default();
            disk == node || disk == format!("{node}/{}", d["name"].as_str().unwrap_or_default())
        });
    }
    match hits.as_slice() {
        [one] => Ok(*one),
        [] => {
            let names: Vec<&str> = all.iter().filter_map(|d| d["name"].as_str()).collect();
            bail!("no disk {disk:?} (disks: {})", names.join(", "))
        }
        many => bail!("{disk:?} names several disks (ids {many:?}); give the id"),
    }
}

fn bar(json_out: bool, len: u64, template: &str) -> indicatif::ProgressBar {
    let b = if json_out { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(len.max(1)) };
    b.set_style(
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// `slate node drain` / `slate disk drain`.
pub async fn drain(api: &ApiClient, node: u64, path: &str, wait: bool, json_out: bool) -> Result<()> {
    let v: Value = api.post(path, &serde_json::json!(null)).await?;
    if !wait {
        print(json_out, &v, |v| {
            format!(
                "draining node {} ({} replica(s) to move); follow with `slate node show {}`\n",
                v["node_name"].as_str().unwrap_or("?"),
                v["replicas_total"],
                v["node_name"].as_str().unwrap_or("?")
            )
        });
        return Ok(());
    }
    let b = bar(
        json_out,
        v["replicas_total"].as_u64().unwrap_or(0),
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} replicas moved  {msg}",
    );
    loop {
        let v: DrainView = api.get(&format!("/v1/nodes/{node}/drain")).await?;
        b.set_length(v.replicas_total.max(1));
        b.set_position(v.replicas_moved);
        let moving: Vec<String> = v
            .moves
            .iter()
            .map(|m| {
                let pct = m.done_blocks * 100 / m.total_blocks.max(1);
                format!("vol-{}/{} -> node {} {pct}%", m.volume, m.segment, m.to)
            })
            .collect();
        let mut msg = moving.join(", ");
        if let Some(why) = &v.blocked {
            let _ = write!(msg, " (blocked: {why})");
        }
        b.set_message(msg);
        if v.state == DrainState::Complete {
            b.finish_and_clear();
            print(json_out, &serde_json::to_value(&v)?, |_| {
                format!("node {} drained: {} replica(s) moved; it holds none\n", v.node_name, v.replicas_moved)
            });
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `slate node show`.
pub fn render_node(v: &NodeView) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "node {} ({})", v.id, v.name);
    let _ = writeln!(s, "  address:     {}", v.addr);
    let _ = writeln!(s, "  domain:      {}", v.failure_domain);
    let _ = writeln!(s, "  state:       {}", v.state);
    let _ = writeln!(s, "  capacity:    {} ({} allocated)", bytes_h(v.capacity_bytes), bytes_h(v.allocated_bytes));
    let _ = writeln!(s, "  replicas:    {}", v.replicas);
    let _ = writeln!(s, "  releases:    {} not yet verified zero", v.releases_outstanding);
    let d = &v.drain;
    if d.state != DrainState::None {
        let _ = writeln!(
            s,
            "  drain:       {} ({}/{} moved, {} left){}",
            d.state,
            d.replicas_moved,
            d.replicas_total,
            d.replicas_left,
            d.blocked.as_ref().map(|b| format!("; blocked: {b}")).unwrap_or_default()
        );
        for m in &d.moves {
            let _ = writeln!(
                s,
                "    vol-{} segment {} -> node {}: {}/{} blocks",
                m.volume, m.segment, m.to, m.done_blocks, m.total_blocks
            );
        }
    }
    if let Some(sc) = &v.scrub {
        let _ = writeln!(
            s,
            "  scrub:       {} ({}/{} segments, {} blocks checked, {} corrupt found, {} repaired, {} unrepaired)",
            if sc.running { "running" } else { "last pass done" },
            sc.segments_done,
            sc.segments_total,
            sc.blocks_checked,
            sc.corrupt_found,
            sc.repaired,
            sc.unrepaired
        );
    }
    for d in &v.disks {
        let _ = writeln!(
            s,
            "  disk {} ({}): {}, {}; decommission {}",
            d.id,
            d.name,
            bytes_h(d.capacity_bytes),
            d.state,
            d.decommission_stage
        );
    }
    s
}

/// `slate disk decommission`.
pub async fn decommission(api: &ApiClient, disk: u64, wait: bool, out: Option<&Path>, json_out: bool) -> Result<()> {
    let v: Value = api.post(&format!("/v1/disks/{disk}/decommission"), &serde_json::json!(null)).await?;
    if !wait {
        print(json_out, &v, |v| {
            format!(
                "disk {} is being decommissioned: every byte will be overwritten and read back; follow with `slate disk show {}`\n",
                v["disk_name"].as_str().unwrap_or("?"),
                v["disk"]
            )
        });
        return Ok(());
    }
    let b = bar(
        json_out,
        v["bytes_total"].as_u64().unwrap_or(0) * 2,
        "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes}  {msg}",
    );
    loop {
        let v: DecommissionView = api.get(&format!("/v1/disks/{disk}/decommission")).await?;
        let (total, done) = (v.bytes_total, v.bytes_done);
        let stage = v.stage.clone();
        b.set_length((2 * total).max(1));
        b.set_position(if stage == "verify" {
            total + done
        } else if stage == "done" {
            2 * total
        } else {
            done
        });
        b.set_message(stage.clone());
        if stage == "failed" {
            b.abandon();
            bail!("decommission of disk {disk} failed: {}", v.failure.as_deref().unwrap_or("?"));
        }
        if v.state == DiskState::Decommissioned {
            b.finish_and_clear();
            if let Some(path) = out {
                save_certificate(api, disk, path).await?;
            }
            print(json_out, &serde_json::to_value(&v)?, |_| {
                format!(
                    "disk {} decommissioned: every byte overwritten and verified zero; certificate sha256 {}{}\n",
                    v.disk_name,
                    v.certificate_sha256.as_deref().unwrap_or("?"),
                    out.map(|p| format!(", written to {}", p.display())).unwrap_or_default()
                )
            });
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Fetches a disk's signed certificate into `path` (0600: it names devices and operators).
pub async fn save_certificate(api: &ApiClient, disk: u64, path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let v: Value = api.get(&format!("/v1/disks/{disk}/certificate")).await?;
    let text = v["text"].as_str().context("the API returned no certificate text")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// `slate scrub NODE`.
pub async fn scrub(api: &ApiClient, node: u64, wait: bool, json_out: bool) -> Result<()> {
    let v: Value = api.post(&format!("/v1/nodes/{node}/scrub"), &serde_json::json!(null)).await?;
    let id = v["scrub"].as_u64().unwrap_or(0);
    if !wait {
        print(json_out, &v, |_| format!("scrub {id} of node {node} asked for; follow with `slate node show {node}`\n"));
        return Ok(());
    }
    let b = bar(json_out, 1, "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} segments  {msg}");
    loop {
        let n: NodeView = api.get(&format!("/v1/nodes/{node}")).await?;
        if let Some(sc) = n.scrub_requested_report.filter(|sc| sc.scrub_id == id) {
            b.set_length(sc.segments_total.max(1));
            b.set_position(sc.segments_done);
            b.set_message(format!(
                "{} blocks checked, {} corrupt, {} repaired",
                sc.blocks_checked, sc.corrupt_found, sc.repaired
            ));
            if !sc.running {
                b.finish_and_clear();
                print(json_out, &serde_json::to_value(&sc)?, |_| {
                    format!(
                        "scrub {id} of node {node} done: {} blocks checked, {} corrupt found, {} repaired, {} unrepaired\n",
                        sc.blocks_checked, sc.corrupt_found, sc.repaired, sc.unrepaired
                    )
                });
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `slate certificate ...` (offline: needs no cluster, only the verifying key).
pub fn certificate(cmd: CertificateCmd, cluster_key: Option<String>, json_out: bool) -> Result<()> {
    let (file, key, html) = match cmd {
        CertificateCmd::Verify { file, verifying_key } => (file, verifying_key, None),
        CertificateCmd::Render { file, html, verifying_key } => (file, verifying_key, Some(html)),
    };
    let key = key.or(cluster_key).context(
        "no verifying key: pass --verifying-key HEX (the cluster's meta/verifying.key) or run where the cluster file is",
    )?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let v = slate_protocol::certificate::verify_document(&text, Some(key.trim()))
        .map_err(|e| anyhow::anyhow!("{} does NOT verify: {e}", file.display()))?;
    if let Some(out) = html {
        std::fs::write(&out, super::certificate_page::render(&v.body, &v.sha256, &v.verifying_key))
            .with_context(|| format!("writing {}", out.display()))?;
        if !json_out {
            println!("verified; page written to {}", out.display());
        }
        return Ok(());
    }
    let out = serde_json::json!({"verified": true, "sha256": v.sha256, "verifying_key": v.verifying_key, "certificate": v.body});
    print(json_out, &out, |o| {
        let c = &o["certificate"];
        format!(
            "certificate OK: signed by {}\n  device {} ({}, {}) of node {}\n  {} by {}, verified {} bytes, {} mismatched: {}\n  sha256 {}\n",
            o["verifying_key"].as_str().unwrap_or("?"),
            c["device"]["path"].as_str().unwrap_or("?"),
            c["device"]["kind"].as_str().unwrap_or("?"),
            bytes_h(c["device"]["size_bytes"].as_u64().unwrap_or(0)),
            c["device"]["node_name"].as_str().unwrap_or("?"),
            c["sanitization"]["category"].as_str().unwrap_or("?"),
            c["sanitization"]["device_primitive"].as_str().unwrap_or("?"),
            c["verification"]["bytes_checked"],
            c["verification"]["mismatched_bytes"],
            c["verification"]["result"].as_str().unwrap_or("?"),
            o["sha256"].as_str().unwrap_or("?"),
        )
    });
    Ok(())
}
