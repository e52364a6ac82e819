//! The management commands: thin wrappers over slate-meta's API that print
//! a human table or, with `--json`, the API's JSON.

use super::open::resolve_volume;
use super::up::parse_size;
use super::Cmd;
use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use slate::api::ApiClient;
use slate_protocol::api::{DetachRequest, NodeView, ResizeVolumeRequest};
use std::fmt::Write as _;

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size, e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Replicas (at least 2).
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// The tenant (operators only; tenant principals create in their own tenant).
        #[arg(long)]
        tenant: Option<u64>,
        /// Failure-domain level to spread replicas over: zone, rack or host.
        #[arg(long)]
        level: Option<String>,
        #[arg(long)]
        iops_limit: Option<u64>,
        #[arg(long)]
        mbps_limit: Option<u64>,
    },
    /// List volumes.
    List,
    /// Show a volume: segments, replica sets, attachments, snapshots, key age.
    Show {
        volume: String,
        /// Show a deleted volume's erasure instead: per replica, extents released and
        /// verified zero; per metadata voter, whether it purged the key.
        #[arg(long)]
        deleted: bool,
    },
    /// Grow a volume.
    Resize {
        volume: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Copy into a clone everything it still reads from its parent, with progress, then
    /// detach it from the parent. Resumable: run it again after an interruption.
    Flatten(super::flatten::FlattenArgs),
    /// Delete a volume: its key is crypto-shredded, then every extent of every replica is
    /// zeroed and verified (`slate volume show V --deleted` shows how far).
    Delete {
        volume: String,
        /// Delete even while attached.
        #[arg(long)]
        force: bool,
        /// Block with a progress bar until every replica is verified zero and every metadata
        /// voter purged the key.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List storage nodes.
    List,
    /// Show a node: state, replicas, releases, drain and scrub progress, disks.
    Show { node: String },
    /// Move every replica off the node (never below R in-sync copies), while I/O runs.
    Drain {
        node: String,
        /// Block with a progress bar until the node holds no replica.
        #[arg(long)]
        wait: bool,
    },
    /// Give a storage node its own principal (role `node`: its heartbeats and reports,
    /// nothing else) and write its token to a 0600 file, for the node's `[meta] token_file`.
    /// Run again to issue a fresh token to the same principal. The token is not printed.
    Token {
        node: String,
        /// Where to write the token (created 0600).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The principal's name (default: node-ID).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// List disks.
    List,
    /// Show a disk's state and decommission progress.
    Show { disk: String },
    /// Move every replica off the disk (its node's only disk today).
    Drain {
        disk: String,
        #[arg(long)]
        wait: bool,
    },
    /// Overwrite every byte of a drained disk, read it back, and issue a signed erase certificate.
    Decommission {
        disk: String,
        /// Block with a progress bar until the disk is verified and certified.
        #[arg(long)]
        wait: bool,
        /// With --wait: write the signed certificate here.
        #[arg(long)]
        certificate_out: Option<std::path::PathBuf>,
    },
    /// Write a decommissioned disk's signed erase certificate to a file.
    Certificate {
        disk: String,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    Create {
        name: String,
    },
    List,
    /// Delete a tenant: its key is crypto-shredded, and with it every volume's key.
    Delete {
        id: u64,
    },
    /// Rotate the tenant key (re-wraps every volume key of the tenant).
    RotateKey {
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a principal and its first token (printed once).
    Create {
        name: String,
        /// operator, tenant_admin, tenant_member, host or node.
        #[arg(long)]
        role: String,
        #[arg(long)]
        tenant: Option<u64>,
        /// With `--role node`: the storage node id it speaks for (`slate node token` writes
        /// the token to a file instead of printing it).
        #[arg(long)]
        node: Option<u64>,
    },
    /// List principals.
    List,
    /// Revoke a token by id.
    Revoke { id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum GrantCmd {
    Create {
        #[arg(long)]
        principal: u64,
        #[arg(long)]
        volume: String,
        /// read_write, read_only, snapshot or backup.
        #[arg(long, default_value = "read_write")]
        access: String,
    },
    List,
    Delete {
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// List audit records you may see.
    List {
        /// Only security events (refused credentials, lockouts, rate limits, capability and
        /// NBD certificate refusals reported by nodes and hosts), with their source address
        /// and count. Operators see them all.
        #[arg(long)]
        security: bool,
    },
    /// Walk the hash chain; names the first broken record.
    Verify,
}

/// `slate status --json`: the answering node's status as before, plus `meta_nodes`,
/// each metadata node's own root key epoch and generation (or why it did not answer).
fn status_report(mut first: Value, per_node: &[(String, Result<Value, String>)]) -> Value {
    let nodes: Vec<Value> = per_node
        .iter()
        .map(|(api, r)| match r {
            Ok(s) => json!({
                "api": api,
                "node_id": s["node_id"],
                "role": s["role"],
                "applied_index": s["applied_index"],
                "root_epoch": s["root_epoch"],
                "root_key_epoch": s["root_key_epoch"],
                "root_generation": s["root_generation"],
            }),
            Err(e) => json!({"api": api, "error": e}),
        })
        .collect();
    first["meta_nodes"] = Value::Array(nodes);
    first
}

fn render_status(v: &Value) -> String {
    use std::fmt::Write;
    let n = |x: &Value| x.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut out = format!(
        "cluster: leader {} (term {}), commit index {}, root epoch {}\n",
        n(&v["leader_id"]),
        n(&v["term"]),
        n(&v["commit_index"]),
        n(&v["root_epoch"]),
    );
    let _ = writeln!(
        out,
        "{:<5} {:<10} {:>9}  {:>14}  {:>15}  API",
        "NODE", "ROLE", "APPLIED", "ROOT KEY EPOCH", "ROOT GENERATION"
    );
    for m in v["meta_nodes"].as_array().into_iter().flatten() {
        let api = m["api"].as_str().unwrap_or("");
        if let Some(e) = m["error"].as_str() {
            let _ = writeln!(out, "{:<5} {:<10} {:>9}  {:>14}  {:>15}  {api} ({e})", "?", "down", "-", "-", "-");
            continue;
        }
        let _ = writeln!(
            out,
            "{:<5} {:<10} {:>9}  {:>14}  {:>15}  {api}",
            n(&m["node_id"]),
            m["role"].as_str().unwrap_or("-"),
            n(&m["applied_index"]),
            n(&m["root_key_epoch"]),
            n(&m["root_generation"]),
        );
    }
    out
}

pub(super) fn print(json_out: bool, v: &Value, human: impl FnOnce(&Value) -> String) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", human(v));
    }
}

pub(super) fn bytes_h(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i < U.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", U[i])
    }
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
fn utc(ms: u64) -> String {
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date, counting in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The audit records of `v` (a list, or a page with `records`) with a `time` field in UTC beside `time_ms`.
fn with_utc_times(v: &Value) -> Value {
    let mut v = v.clone();
    let list = if v.is_array() { Some(&mut v) } else { v.get_mut("records") };
    if let Some(Value::Array(records)) = list {
        for r in records {
            if let Some(ms) = r["time_ms"].as_u64() {
                r["time"] = Value::String(utc(ms));
            }
        }
    }
    v
}

/// Every `security.*` audit record the caller may read, oldest first, paging through the chain.
async fn security_events(api: &ApiClient) -> Result<Value> {
    let mut out = Vec::new();
    let mut after = 0u64;
    // Each page read is itself audited: stop at the chain's end as of the first page.
    let mut end = None;
    loop {
        let page: Value = api.get(&format!("/v1/audit?after={after}&limit=10000")).await?;
        let end = *end.get_or_insert(page["last_seq"].as_u64().unwrap_or(0));
        let records = page["records"].as_array().cloned().unwrap_or_default();
        let Some(last) = records.last().and_then(|r| r["seq"].as_u64()) else { break };
        after = last;
        out.extend(records.into_iter().filter(|r| r["action"].as_str().is_some_and(|a| a.starts_with("security."))));
        if after >= end {
            break;
        }
    }
    Ok(Value::Array(out))
}

pub(super) fn table(rows: &Value, cols: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let items = rows.as_array().cloned().unwrap_or_default();
    let cells: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            cols.iter()
                .map(|(_, k)| match &r[*k] {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    v => v.to_string(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| cells.iter().map(|c| c[i].len()).max().unwrap_or(0).max(h.len()))
        .collect();
    for (i, (h, _)) in cols.iter().enumerate() {
        let _ = write!(out, "{h:<w$}  ", w = widths[i]);
    }
    out.push('\n');
    for row in cells {
        for (i, c) in row.iter().enumerate() {
            let _ = write!(out, "{c:<w$}  ", w = widths[i]);
        }
        out.push('\n');
    }
    out
}

/// Runs one management command.
pub async fn run(api: &ApiClient, cmd: Cmd, json_out: bool) -> Result<()> {
    match cmd {
        Cmd::Volume(v) => volume(api, v, json_out).await,
        Cmd::Node(NodeCmd::List) => {
            let v: Value = api.get("/v1/nodes").await?;
            print(json_out, &v, |v| {
                table(
                    v,
                    &[
                        ("ID", "id"),
                        ("NAME", "name"),
                        ("ADDR", "addr"),
                        ("DOMAIN", "failure_domain"),
                        ("STATE", "state"),
                        ("REPLICAS", "replicas"),
                    ],
                )
            });
            Ok(())
        }
        Cmd::Disk(DiskCmd::List) => {
            let v: Value = api.get("/v1/disks").await?;
            print(json_out, &v, |v| {
                table(
                    v,
                    &[
                        ("ID", "id"),
                        ("NAME", "name"),
                        ("NODE", "node_name"),
                        ("CAPACITY", "capacity_bytes"),
                        ("STATE", "state"),
                        ("DECOMMISSION", "decommission_stage"),
                    ],
                )
            });
            Ok(())
        }
        Cmd::Disk(DiskCmd::Show { disk }) => {
            let id = super::operations::resolve_disk(api, &disk).await?;
            let v: Value = api.get(&format!("/v1/disks/{id}/decommission")).await?;
            print(json_out, &v, |v| format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()));
            Ok(())
        }
        Cmd::Disk(DiskCmd::Drain { disk, wait }) => {
            let id = super::operations::resolve_disk(api, &disk).await?;
            let disks: Value = api.get("/v1/disks").await?;
            let node = disks
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["id"].as_u64() == Some(id))
                .and_then(|d| d["node"].as_u64())
                .unwrap_or_default();
            super::operations::drain(api, node, &format!("/v1/disks/{id}/drain"), wait, json_out).await
        }
        Cmd::Disk(DiskCmd::Decommission { disk, wait, certificate_out }) => {
            let id = super::operations::resolve_disk(api, &disk).await?;
            super::operations::decommission(api, id, wait, certificate_out.as_deref(), json_out).await
        }
        Cmd::Disk(DiskCmd::Certificate { disk, out }) => {
            let id = super::operations::resolve_disk(api, &disk).await?;
            super::operations::save_certificate(api, id, &out).await?;
            if !json_out {
                println!("certificate of disk {id} written to {}", out.display());
            }
            Ok(())
        }
        Cmd::Node(NodeCmd::Show { node }) => {
            let id = super::operations::resolve_node(api, &node).await?;
            let node: NodeView = api.get(&format!("/v1/nodes/{id}")).await?;
            print(json_out, &serde_json::to_value(&node)?, |_| super::operations::render_node(&node));
            Ok(())
        }
        Cmd::Node(NodeCmd::Token { node, out, name }) => {
            let id = super::operations::resolve_node(api, &node).await?;
            let name = name.unwrap_or_else(|| format!("node-{id}"));
            let principal = super::operations::node_token(api, id, &name, &out).await?;
            let v = json!({"principal": principal, "name": name, "node": id, "token_file": out});
            print(json_out, &v, |_| {
                format!(
                    "node principal {principal} ({name}) for node {id}: token written to {} (0600)\n",
                    out.display()
                )
            });
            Ok(())
        }
        Cmd::Node(NodeCmd::Drain { node, wait }) => {
            let id = super::operations::resolve_node(api, &node).await?;
            super::operations::drain(api, id, &format!("/v1/nodes/{id}/drain"), wait, json_out).await
        }
        Cmd::Scrub { node, wait } => {
            let id = super::operations::resolve_node(api, &node).await?;
            super::operations::scrub(api, id, wait, json_out).await
        }
        Cmd::Certificate(_) => unreachable!("handled without the API"),
        Cmd::Tenant(t) => {
            let v: Value = match t {
                TenantCmd::Create { name } => api.post("/v1/tenants", &json!({"name": name})).await?,
                TenantCmd::List => api.get("/v1/tenants").await?,
                TenantCmd::Delete { id } => api.delete(&format!("/v1/tenants/{id}")).await?,
                TenantCmd::RotateKey { id } => api.post(&format!("/v1/tenants/{id}/rotate-key"), &json!(null)).await?,
            };
            print(json_out, &v, |v| {
                if v.is_array() {
                    table(v, &[("ID", "id"), ("NAME", "name"), ("VOLUMES", "volumes"), ("KEY VERSION", "key_version")])
                } else {
                    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
                }
            });
            Ok(())
        }
        Cmd::Token(t) => {
            let v: Value = match t {
                TokenCmd::Create { name, role, tenant, node } => {
                    api.post("/v1/principals", &json!({"name": name, "role": role, "tenant": tenant, "node": node}))
                        .await?
                }
                TokenCmd::List => api.get("/v1/principals").await?,
                TokenCmd::Revoke { id } => api.delete(&format!("/v1/tokens/{id}")).await?,
            };
            print(json_out, &v, |v| {
                if v.is_array() {
                    table(
                        v,
                        &[("ID", "id"), ("NAME", "name"), ("ROLE", "role"), ("TENANT", "tenant"), ("TOKENS", "tokens")],
                    )
                } else if let Some(tok) = v["token"].as_str() {
                    format!(
                        "principal {} created; its token (shown once, keep it secret):\n{tok}\n",
                        v["principal"]["id"]
                    )
                } else {
                    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
                }
            });
            Ok(())
        }
        Cmd::Grant(g) => {
            let v: Value = match g {
                GrantCmd::Create { principal, volume, access } => {
                    let vol = resolve_volume(api, &volume).await?;
                    api.post("/v1/grants", &json!({"principal": principal, "volume": vol, "access": access})).await?
                }
                GrantCmd::List => api.get("/v1/grants").await?,
                GrantCmd::Delete { id } => api.delete(&format!("/v1/grants/{id}")).await?,
            };
            print(json_out, &v, |v| {
                if v.is_array() {
                    table(v, &[("ID", "id"), ("PRINCIPAL", "principal"), ("VOLUME", "volume"), ("ACCESS", "access")])
                } else {
                    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
                }
            });
            Ok(())
        }
        Cmd::Erasure(c) => super::erasure::run(api, c, json_out).await,
        Cmd::Snapshot(c) => super::snapshot::run(api, c, json_out).await,
        Cmd::Clone(args) => super::clone::run(api, args, json_out).await,
        Cmd::Audit(AuditCmd::List { security: true }) => {
            let v = security_events(api).await?;
            print(json_out, &v, |v| {
                table(
                    &with_utc_times(v),
                    &[
                        ("SEQ", "seq"),
                        ("TIME (UTC)", "time"),
                        ("SOURCE", "client"),
                        ("EVENT", "action"),
                        ("COUNT", "object"),
                        ("REPORTER", "actor"),
                        ("RESULT", "result"),
                    ],
                )
            });
            Ok(())
        }
        Cmd::Audit(AuditCmd::List { security: false }) => {
            let v: Value = api.get("/v1/audit").await?;
            print(json_out, &v, |v| {
                table(
                    &with_utc_times(v),
                    &[
                        ("SEQ", "seq"),
                        ("TIME (UTC)", "time"),
                        ("ACTOR", "actor"),
                        ("ACTION", "action"),
                        ("OBJECT", "object"),
                        ("RESULT", "result"),
                    ],
                )
            });
            Ok(())
        }
        Cmd::Audit(AuditCmd::Verify) => {
            let v: Value = api.get("/v1/audit/verify").await?;
            let ok = v["ok"].as_bool().unwrap_or(false);
            print(json_out, &v, |v| {
                if ok && v["anchor"].is_object() {
                    let a = &v["anchor"];
                    format!(
                        "audit chain verified: {} records from the anchor (records up to {} pruned, last pruned hash {})\n",
                        v["records"], a["seq"], a["hash"]
                    )
                } else if ok {
                    format!("audit chain verified: {} records\n", v["records"])
                } else {
                    format!("audit chain BROKEN: {}\n", serde_json::to_string(v).unwrap_or_default())
                }
            });
            if !ok {
                bail!("the audit chain does not verify");
            }
            Ok(())
        }
        Cmd::Status => {
            let v: Value = api.get("/v1/status").await?;
            // Every metadata node's own view: the root key epoch is per node (a voter that
            // was down during a shred holds an older key until it ratchets).
            let mut per_node = Vec::new();
            for base in api.bases() {
                let r = api.get_at::<Value>(&base, "/v1/status").await.map_err(|e| format!("{e:#}"));
                per_node.push((base, r));
            }
            let report = status_report(v, &per_node);
            print(json_out, &report, render_status);
            Ok(())
        }
        Cmd::Detach { volume, attachment } => {
            let id = resolve_volume(api, &volume).await?;
            let ids: Vec<u64> = if let Some(a) = attachment {
                vec![a]
            } else {
                let v: Value = api.get(&format!("/v1/volumes/{id}")).await?;
                v["attachments"].as_array().into_iter().flatten().filter_map(|a| a["id"].as_u64()).collect()
            };
            for a in ids {
                let _: Value = api.post(&format!("/v1/volumes/{id}/detach"), &DetachRequest { attachment: a }).await?;
                if !json_out {
                    println!("detached attachment {a} of volume {id}");
                }
            }
            Ok(())
        }
        Cmd::Up(_) | Cmd::Attach(_) | Cmd::Backup(_) | Cmd::Restore(_) | Cmd::Export(_) => {
            unreachable!("dispatched by the caller")
        }
    }
}

async fn volume(api: &ApiClient, cmd: VolumeCmd, json_out: bool) -> Result<()> {
    match cmd {
        VolumeCmd::Create { name, size, replicas, tenant, level, iops_limit, mbps_limit } => {
            let mut body = json!({"name": name, "size_bytes": size, "replicas": replicas, "tenant": tenant,
                                  "qos": {"iops_limit": iops_limit, "mbps_limit": mbps_limit}});
            if let Some(l) = level {
                body["failure_domain_level"] = json!(l);
            }
            let v: Value = api.post("/v1/volumes", &body).await?;
            print(json_out, &v, |v| {
                format!(
                    "created volume {} ({}), {}\n",
                    v["id"],
                    v["name"],
                    bytes_h(v["size_bytes"].as_u64().unwrap_or(0))
                )
            });
        }
        VolumeCmd::List => {
            let v: Value = api.get("/v1/volumes").await?;
            print(json_out, &v, |v| {
                table(
                    v,
                    &[
                        ("ID", "id"),
                        ("NAME", "name"),
                        ("TENANT", "tenant"),
                        ("SIZE", "size_bytes"),
                        ("R", "replicas"),
                        ("STATE", "state"),
                        ("GEN", "generation"),
                    ],
                )
            });
        }
        VolumeCmd::Show { volume, deleted: true } => {
            let id = super::erasure::resolve_deleted(api, &volume).await?;
            super::erasure::show(api, id, false, None, json_out).await?;
        }
        VolumeCmd::Show { volume, deleted: false } => {
            let id = resolve_volume(api, &volume).await?;
            let v: Value = api.get(&format!("/v1/volumes/{id}")).await?;
            print(json_out, &v, show_volume);
        }
        VolumeCmd::Resize { volume, size } => {
            let id = resolve_volume(api, &volume).await?;
            let v: Value =
                api.post(&format!("/v1/volumes/{id}/resize"), &ResizeVolumeRequest { size_bytes: size }).await?;
            print(json_out, &v, |v| {
                format!("volume {} is now {}\n", v["id"], bytes_h(v["size_bytes"].as_u64().unwrap_or(0)))
            });
        }
        VolumeCmd::Flatten(args) => super::flatten::run(api, args, json_out).await?,
        VolumeCmd::Delete { volume, force, wait } => {
            let id = resolve_volume(api, &volume).await?;
            let q = if force { "?force=true" } else { "" };
            let v: Value = api.delete(&format!("/v1/volumes/{id}{q}")).await?;
            if wait {
                if !json_out {
                    eprintln!("volume {id} deleted: its key is shredded; waiting for every extent to be verified zero");
                }
                super::erasure::show(api, id, true, None, json_out).await?;
            } else {
                print(json_out, &v, |_| {
                    format!(
                        "volume {id} deleted: its key is shredded; its extents are being zeroed and verified \
                         (follow with `slate volume show {id} --deleted`)\n"
                    )
                });
            }
        }
    }
    Ok(())
}

fn show_volume(v: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "volume {} ({})", v["id"], v["name"].as_str().unwrap_or("?"));
    let _ = writeln!(s, "  tenant:      {}", v["tenant"]);
    let _ = writeln!(s, "  size:        {}", bytes_h(v["size_bytes"].as_u64().unwrap_or(0)));
    let _ = writeln!(s, "  replicas:    {} across {}", v["replicas"], v["failure_domain_level"]);
    let _ = writeln!(s, "  state:       {}", v["state"].as_str().unwrap_or("?"));
    let _ = writeln!(s, "  generation:  {}", v["generation"]);
    let _ = writeln!(s, "  key age:     {} s (tenant key v{})", v["dek"]["age_secs"], v["dek"]["tenant_key_version"]);
    let p = &v["parent"];
    if p.is_object() {
        let _ = writeln!(
            s,
            "  parent:      {}@{} (volume {}{}, snapshot {}, epoch {}): read where this clone has not written",
            p["volume_name"].as_str().unwrap_or("?"),
            p["snapshot_name"].as_str().unwrap_or("?"),
            p["volume"],
            if p["deleted"] == true { ", deleted: kept for its clones" } else { "" },
            p["snapshot"],
            p["epoch"]
        );
    }
    let clones: Vec<String> = v["clones"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} (volume {}, of @{})",
                c["name"].as_str().unwrap_or("?"),
                c["volume"],
                c["snapshot_name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if !clones.is_empty() {
        let _ = writeln!(s, "  clones:      {}", clones.join(", "));
    }
    let _ = writeln!(s, "  segments:");
    for seg in v["segments"].as_array().into_iter().flatten() {
        let reps: Vec<String> = seg["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let mut t = format!(
                    "node-{}@{} [{}]",
                    r["node"],
                    r["failure_domain"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?")
                );
                if let (Some(d), Some(tot)) = (r["rebuild_done_blocks"].as_u64(), r["rebuild_total_blocks"].as_u64()) {
                    if tot > 0 {
                        let _ = write!(t, " {:.0}%", d as f64 * 100.0 / tot as f64);
                    }
                }
                t
            })
            .collect();
        let _ = writeln!(s, "    {:>4} epoch {:<3} {}", seg["index"], seg["epoch"], reps.join(", "));
    }
    let atts = v["attachments"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(s, "  attachments: {}", if atts.is_empty() { "none".into() } else { String::new() });
    for a in atts {
        let _ = writeln!(
            s,
            "    #{} {} on {} (generation {})",
            a["id"],
            a["mode"].as_str().unwrap_or("?"),
            a["host"].as_str().unwrap_or("?"),
            a["generation"]
        );
    }
    s
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn status_shows_each_meta_nodes_root_key_epoch() {
        let first = json!({"node_id": 1, "leader_id": 1, "term": 3, "commit_index": 40, "root_epoch": 2});
        let node = |id: u64, key_epoch: u64, generation: u64| {
            json!({"node_id": id, "role": "follower", "applied_index": 40, "root_epoch": 2,
                   "root_key_epoch": key_epoch, "root_generation": generation})
        };
        let per_node = vec![
            ("https://a:1".to_owned(), Ok(node(1, 2, 1))),
            ("https://b:2".to_owned(), Ok(node(2, 1, 0))),
            ("https://c:3".to_owned(), Err("connection refused".to_owned())),
        ];
        let report = status_report(first, &per_node);
        let nodes = report["meta_nodes"].as_array().expect("meta_nodes");
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0]["root_key_epoch"], 2);
        assert_eq!(nodes[1]["root_key_epoch"], 1);
        assert_eq!(nodes[1]["root_generation"], 0);
        assert_eq!(nodes[2]["error"], "connection refused");
        assert_eq!(report["root_epoch"], 2, "the answering node's fields stay");
        let text = render_status(&report);
        let line = |api: &str| text.lines().find(|l| l.contains(api)).unwrap_or_else(|| panic!("{api} in\n{text}"));
        let cols = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(cols(line("https://a:1"))[..5], ["1", "follower", "40", "2", "1"]);
        assert_eq!(cols(line("https://b:2"))[..5], ["2", "follower", "40", "1", "0"]);
        assert!(line("https://c:3").contains("down") && line("https://c:3").contains("connection refused"));
        assert!(text.contains("ROOT KEY EPOCH"));
    }

    #[test]
    fn audit_times_print_in_utc() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(super::utc(1_795_998_523_121), "2026-11-30T00:28:43.121Z");
        let page = serde_json::json!({"records": [{"seq": 1, "time_ms": 86_400_000}]});
        assert_eq!(super::with_utc_times(&page)["records"][0]["time"], "1970-01-02T00:00:00.000Z");
    }
}
