//! `slate backup create|list|verify` and `slate restore`: backups of snapshots
//! to `file:///DIR` or `s3://BUCKET[/PREFIX]`, and restores into new volumes.
//! The work is in [`slate::backup`]; this is the command line around it.

use super::attach::{open_volume, CONTROL_PATIENCE};
use super::commands::{print, table};
use super::open::{self, resolve_volume};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use slate::api::ApiClient;
use slate::backup::chain::{load_chain, verify_objects};
use slate::backup::create::{self, BackupHeader};
use slate::backup::reader::SnapshotReader;
use slate::backup::restore::{self, Position};
use slate::backup::store::{S3Options, Store};
use slate::crypto::{VolumeCipher, XtsKey};
use slate_protocol::api::{
    Backup, BackupState, BeginBackupRequest, CompletedBackup, RestoreProgressRequest, RestoreReply,
    RestoreVolumeRequest,
};
use slate_protocol::backup::{Manifest, ManifestSnapshot, ManifestVolume, ParentRef};
use std::sync::Arc;
use std::time::Instant;
use zeroize::Zeroizing;

/// Reaching an S3 target.
#[derive(Args, Debug, Clone, Default)]
pub struct S3Args {
    /// The S3 endpoint (e.g. http://127.0.0.1:9000); credentials come from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY (and AWS_REGION, default us-east-1).
    #[arg(long, env = "SLATE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
}

impl S3Args {
    fn options(&self) -> S3Options {
        S3Options { endpoint: self.s3_endpoint.clone() }
    }
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back up a snapshot (the ciphertext as stored, so a volume delete makes it undecryptable).
    Create {
        /// VOLUME@SNAPSHOT.
        snapshot: String,
        /// file:///DIR or s3://BUCKET[/PREFIX].
        #[arg(long)]
        to: String,
        /// VOLUME@SNAPSHOT of an older snapshot already backed up to the same target:
        /// send only the blocks changed since it.
        #[arg(long)]
        incremental_from: Option<String>,
        /// Objects read and sent at once (1 MiB each).
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[command(flatten)]
        s3: S3Args,
    },
    /// List a volume's backups (or every backup you may read).
    List { volume: Option<String> },
    /// Check a backup and its chain without restoring: signatures, links, every object and crc.
    Verify {
        /// The backup's id (`slate backup list`).
        backup: u64,
        /// The cluster's verifying key (hex); default: the cluster file's.
        #[arg(long)]
        verifying_key: Option<String>,
        #[command(flatten)]
        s3: S3Args,
    },
}

/// Options of `slate restore`.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The backup's id (`slate backup list`); its whole chain is restored.
    pub backup: u64,
    /// The new volume's name.
    pub name: String,
    /// The new volume's tenant (default: the backed-up volume's).
    #[arg(long)]
    pub tenant: Option<u64>,
    /// The cluster's verifying key (hex); default: the cluster file's.
    #[arg(long)]
    pub verifying_key: Option<String>,
    /// Objects fetched and written at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    #[command(flatten)]
    pub s3: S3Args,
}

fn bar(json_out: bool, len: u64, unit: &str) -> ProgressBar {
    if json_out {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len.max(1));
    let style =
        format!("{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}})");
    if let Ok(s) = ProgressStyle::with_template(&style) {
        b.set_style(s);
    }
    b
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn key_or(cluster_key: Option<String>, flag: Option<String>) -> Result<String> {
    flag.or(cluster_key).map(|k| k.trim().to_owned()).context(
        "no verifying key to check the manifest's signature with: pass --verifying-key HEX or run where the cluster file is",
    )
}

pub async fn run(api: &ApiClient, cmd: BackupCmd, cluster_key: Option<String>, json_out: bool) -> Result<()> {
    match cmd {
        BackupCmd::Create { snapshot, to, incremental_from, parallel, s3 } => {
            create(api, &snapshot, &to, incremental_from.as_deref(), parallel, &s3, json_out).await
        }
        BackupCmd::List { volume } => {
            let list: Vec<Backup> = match &volume {
                Some(v) => api.get(&format!("/v1/volumes/{}/backups", resolve_volume(api, v).await?)).await?,
                None => api.get("/v1/backups").await?,
            };
            let rows: Vec<Value> = list
                .iter()
                .map(|b| {
                    json!({
                        "id": b.id,
                        "snapshot": format!("{}@{}", b.volume_name, b.snapshot_name),
                        "kind": b.parent.map_or("full".into(), |p| format!("incremental of {p}")),
                        "state": b.state,
                        "stored": format!("{:.1} MiB", b.bytes_stored as f64 / 1_048_576.0),
                        "target": b.target,
                    })
                })
                .collect();
            print(json_out, &serde_json::to_value(&list)?, |_| {
                table(
                    &Value::Array(rows),
                    &[
                        ("ID", "id"),
                        ("SNAPSHOT", "snapshot"),
                        ("KIND", "kind"),
                        ("STATE", "state"),
                        ("STORED", "stored"),
                        ("TARGET", "target"),
                    ],
                )
            });
            Ok(())
        }
        BackupCmd::Verify { backup, verifying_key, s3 } => {
            let key = key_or(cluster_key, verifying_key)?;
            let b: Backup = api.get(&format!("/v1/backups/{backup}")).await?;
            if b.state != BackupState::Complete {
                bail!("backup {backup} is not complete ({}): resume it with the same `slate backup create`", b.state);
            }
            let store = Store::open(&b.target, &s3.options())?;
            let t = Instant::now();
            let chain = load_chain(&store, b.volume, backup, Some(&key)).await?;
            if chain.last().map(|m| m.sha256.as_str()) != b.manifest_sha256.as_deref() {
                bail!("backup {backup}: the manifest in {} is not the one slate-meta recorded", b.target);
            }
            let objects: u64 = chain.iter().map(|m| m.manifest.chunks.len() as u64).sum();
            let pb = bar(json_out, objects, "objects");
            let report = verify_objects(&store, &chain, 8, |d, _| pb.set_position(d)).await?;
            pb.finish_and_clear();
            let out = json!({"backup": backup, "verified": true, "chain": chain.iter().map(|m| m.manifest.backup).collect::<Vec<_>>(),
                "objects": report.objects, "blocks": report.blocks, "bytes": report.bytes, "seconds": t.elapsed().as_secs_f64()});
            print(json_out, &out, |o| {
                format!(
                    "backup {backup} verified: chain {}, {} objects, {} blocks, {:.1} MiB, signatures and every crc good\n",
                    o["chain"],
                    report.objects,
                    report.blocks,
                    report.bytes as f64 / 1048576.0
                )
            });
            Ok(())
        }
    }
}

async fn create(
    api: &ApiClient,
    spec: &str,
    to: &str,
    incremental_from: Option<&str>,
    parallel: usize,
    s3: &S3Args,
    json_out: bool,
) -> Result<()> {
    let (vol, snap) = open::split_snapshot_spec(spec)?;
    let snap = snap.ok_or_else(|| anyhow!("{spec:?}: back up a snapshot, VOLUME@SNAPSHOT"))?;
    let store = Store::open(to, &s3.options())?;
    // Reach the target before anything is recorded: an unreachable target fails here.
    store.exists("manifests").await.with_context(|| format!("the backup target {to} is not reachable"))?;
    let id = resolve_volume(api, vol).await?;
    let parent = match incremental_from {
        None => None,
        Some(base) => {
            let (bvol, bsnap) = open::split_snapshot_spec(base)?;
            let bsnap = bsnap.ok_or_else(|| anyhow!("--incremental-from {base:?}: give VOLUME@SNAPSHOT"))?;
            if resolve_volume(api, bvol).await? != id {
                bail!("--incremental-from {base}: the base must be a snapshot of the same volume");
            }
            let list: Vec<Backup> = api.get(&format!("/v1/volumes/{id}/backups")).await?;
            let found = list
                .into_iter()
                .filter(|b| b.snapshot_name == bsnap && b.state == BackupState::Complete && b.target == to)
                .max_by_key(|b| b.id);
            Some(found.ok_or_else(|| {
                anyhow!(
                    "the base of an incremental is missing: {base} has no complete backup in {to}; back it up first"
                )
            })?)
        }
    };
    // A read-only attachment of the snapshot: its capability reads the nodes; the key is not needed.
    let opened = open::attach(api, vol, Some(snap), true, "backup", false).await?;
    let attachment = opened.attachment;
    let res = async {
        let s = opened.snapshot.clone().ok_or_else(|| anyhow!("no snapshot attached"))?;
        let body = BeginBackupRequest { snapshot: s.id, target: to.to_owned(), parent: parent.as_ref().map(|p| p.id) };
        let rec: Backup = api.post(&format!("/v1/volumes/{id}/backups"), &body).await?;
        let header = BackupHeader {
            backup: rec.id,
            volume: ManifestVolume {
                id,
                name: opened.name.clone(),
                tenant: rec.tenant,
                size_bytes: opened.layout.size_bytes,
            },
            snapshot: ManifestSnapshot { id: rec.snapshot, name: rec.snapshot_name.clone(), epoch: rec.epoch },
            key_fingerprint: rec.key_fingerprint.clone(),
            parent: match &parent {
                Some(p) => Some(ParentRef {
                    backup: p.id,
                    manifest_sha256: p
                        .manifest_sha256
                        .clone()
                        .ok_or_else(|| anyhow!("base backup without manifest"))?,
                }),
                None => None,
            },
            base_epoch: rec.parent_epoch.unwrap_or(0),
        };
        let reader = Arc::new(SnapshotReader::new(
            opened.layout.clone(),
            opened.capability.clone(),
            s.epoch,
            api.data_plane().clone(),
        ));
        let t = Instant::now();
        let pb = bar(json_out, 1, "blocks");
        let (manifest, resumed) = create::run(reader, &store, &header, parallel, now_ms(), |d, total| {
            pb.set_length(total.max(1));
            pb.set_position(d);
        })
        .await?;
        pb.finish_and_clear();
        let done: CompletedBackup =
            api.post(&format!("/v1/backups/{}/complete", rec.id), &json!({"manifest": manifest})).await?;
        store.put(&Manifest::manifest_key(id, rec.id), Bytes::from(done.text)).await?;
        create::finish(&store, rec.id).await?;
        let secs = t.elapsed().as_secs_f64();
        // The rate of this run: blocks a killed earlier run had sent are not counted.
        let mb = manifest.blocks_changed.saturating_sub(resumed) as f64 * 4096.0 / 1e6;
        Ok::<Value, anyhow::Error>(json!({
            "id": rec.id, "volume": id, "snapshot": rec.snapshot_name, "target": to,
            "kind": if parent.is_some() { "incremental" } else { "full" }, "parent": parent.as_ref().map(|p| p.id),
            "blocks_changed": manifest.blocks_changed, "blocks_stored": manifest.blocks_stored,
            "bytes_stored": manifest.bytes_stored, "manifest_sha256": done.sha256, "seconds": secs,
            "resumed_blocks": resumed,
            "mb_per_s": if secs > 0.0 { mb / secs } else { 0.0 },
        }))
    }
    .await;
    if let Err(e) = open::detach(api, id, attachment).await {
        tracing::warn!(error = %format!("{e:#}"), "detaching the backup's read-only attachment failed");
    }
    let out = res?;
    print(json_out, &out, |o| {
        format!(
            "backup {} of {spec} ({}) in {to}: {} blocks changed, {} stored ({:.1} MiB) in {:.1} s, {:.0} MB/s\n",
            o["id"],
            o["kind"].as_str().unwrap_or("?"),
            o["blocks_changed"],
            o["blocks_stored"],
            o["bytes_stored"].as_u64().unwrap_or(0) as f64 / 1048576.0,
            o["seconds"].as_f64().unwrap_or(0.0),
            o["mb_per_s"].as_f64().unwrap_or(0.0)
        )
    });
    Ok(())
}

/// `slate restore BACKUP NAME`.
pub async fn restore(api: &ApiClient, args: RestoreArgs, cluster_key: Option<String>, json_out: bool) -> Result<()> {
    let key = key_or(cluster_key, args.verifying_key.clone())?;
    let quick = api.clone();
    let api = api.patient(CONTROL_PATIENCE);
    let b: Backup = api.get(&format!("/v1/backups/{}", args.backup)).await?;
    if b.state != BackupState::Complete {
        bail!("backup {} is not complete ({}): only a complete backup can be restored", args.backup, b.state);
    }
    let store = Store::open(&b.target, &args.s3.options())?;
    let chain = load_chain(&store, b.volume, b.id, Some(&key)).await?;
    if chain.last().map(|m| m.sha256.as_str()) != b.manifest_sha256.as_deref() {
        bail!("backup {}: the manifest in {} is not the one slate-meta recorded", b.id, b.target);
    }
    let size = chain.last().map_or(0, |m| m.manifest.volume.size_bytes);
    let body = RestoreVolumeRequest {
        backup: b.id,
        name: args.name.clone(),
        size_bytes: size,
        tenant: args.tenant,
        replicas: None,
    };
    let mut created: RestoreReply = api.post("/v1/restores", &body).await?;
    let vid = created.volume.id;
    // The backed-up volume's key, to decrypt the backup with; the new volume has its own.
    let source = {
        let mut hex_key = Zeroizing::new(std::mem::take(&mut created.source_dek_hex));
        let bytes = Zeroizing::new(hex::decode(hex_key.as_str()).context("the backup's key is not hex")?);
        zeroize::Zeroize::zeroize(&mut *hex_key);
        let key = XtsKey::from_bytes(&bytes).map_err(|e| anyhow!("the backup's key: {e}"))?;
        Arc::new(VolumeCipher::new(&key))
    };
    let from = Position { manifests: created.restore.done_manifests, chunks: created.restore.done_chunks };
    drop(created);
    let t = Instant::now();
    let res = async {
        // Force: the only writer of a volume being restored is a restore (one killed
        // with -9 leaves its attachment behind).
        let opened = open::attach(&api, &vid.to_string(), None, false, "restore", true).await?;
        let attachment = opened.attachment;
        let volume = open_volume(&quick, &api, opened).await?;
        let objects: u64 = chain.iter().map(|m| m.manifest.chunks.len() as u64).sum();
        let done_before: u64 =
            chain.iter().take(from.manifests as usize).map(|m| m.manifest.chunks.len() as u64).sum::<u64>()
                + from.chunks;
        let pb = bar(json_out, objects, "objects");
        pb.set_position(done_before);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Position>();
        let reporter = {
            let api = quick.clone();
            tokio::spawn(async move {
                let mut last = Instant::now();
                while let Some(p) = rx.recv().await {
                    if last.elapsed().as_secs() >= 1 {
                        last = Instant::now();
                        let body = RestoreProgressRequest {
                            done_manifests: p.manifests,
                            done_chunks: p.chunks,
                            finished: false,
                        };
                        let _: Result<Value> = api.post(&format!("/v1/volumes/{vid}/restore-progress"), &body).await;
                    }
                }
            })
        };
        let mut blocks = 0u64;
        let mut n = done_before;
        let r =
            restore::apply(Arc::clone(&volume), Arc::clone(&source), &store, &chain, from, args.parallel, |p, w| {
                blocks += w;
                if p.chunks > 0 {
                    n += 1;
                }
                pb.set_position(n);
                let _ = tx.send(p);
            })
            .await;
        drop(tx);
        let _ = reporter.await;
        pb.finish_and_clear();
        volume.flush_all().await.ok();
        volume.close().await;
        if let Err(e) = open::detach(&api, vid, attachment).await {
            tracing::warn!(error = %format!("{e:#}"), "detaching the restore's attachment failed");
        }
        r?;
        let _: Value = api
            .post(
                &format!("/v1/volumes/{vid}/restore-progress"),
                &RestoreProgressRequest { done_manifests: chain.len() as u64, done_chunks: 0, finished: true },
            )
            .await?;
        Ok::<u64, anyhow::Error>(blocks)
    }
    .await;
    let blocks = match res {
        Ok(b) => b,
        Err(e) => {
            // A restore that failed (not one that was killed) leaves nothing behind.
            let _: Result<Value> = api.delete(&format!("/v1/volumes/{vid}?force=true")).await;
            return Err(
                e.context(format!("restoring backup {} into {} failed; the new volume was deleted", b.id, args.name))
            );
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let out = json!({"volume": vid, "name": args.name, "backup": b.id, "chain": chain.iter().map(|m| m.manifest.backup).collect::<Vec<_>>(),
        "blocks_written": blocks, "seconds": secs});
    print(json_out, &out, |o| {
        format!(
            "restored backup {} (chain {}) into volume {} ({vid}): {blocks} blocks in {secs:.1} s\n",
            b.id, o["chain"], args.name
        )
    });
    Ok(())
}
