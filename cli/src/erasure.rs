//! `slate erasure ...`, `slate volume show V --deleted` and `slate volume delete
//! V --wait`: the progress of a deleted volume's erasure, from the key shred to
//! the last extent verified zero on the last replica and the last metadata
//! voter's purge.

use super::commands::{bytes_h, print, table};
use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::Value;
use slate::api::ApiClient;
use slate_protocol::api::{ErasureState, ErasureView};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum ErasureCmd {
    /// Deleted volumes and the state of their erasure.
    List,
    /// One deleted volume's erasure, per replica and per metadata voter.
    Show {
        /// The deleted volume's id or name.
        volume: String,
        /// Block until the erasure is complete, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit status 1).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// The release queue: replicas and layers nodes must release and zero (operators).
    Releases {
        /// Only this node's entries (id).
        #[arg(long)]
        node: Option<u64>,
    },
}

pub async fn run(api: &ApiClient, cmd: ErasureCmd, json_out: bool) -> Result<()> {
    match cmd {
        ErasureCmd::List => {
            let v: Value = api.get("/v1/erasures").await?;
            print(json_out, &v, |v| {
                table(
                    v,
                    &[
                        ("VOLUME", "volume"),
                        ("NAME", "name"),
                        ("TENANT", "tenant"),
                        ("STATE", "state"),
                        ("REPLICAS", "replicas_total"),
                        ("ERASED", "replicas_erased"),
                        ("EXTENTS", "extents_released"),
                        ("VERIFIED", "extents_verified"),
                    ],
                )
            });
        }
        ErasureCmd::Show { volume, wait, timeout } => {
            let id = resolve_deleted(api, &volume).await?;
            show(api, id, wait, timeout.map(Duration::from_secs), json_out).await?;
        }
        ErasureCmd::Releases { node } => {
            let q = node.map(|n| format!("?node={n}")).unwrap_or_default();
            let v: Value = api.get(&format!("/v1/releases{q}")).await?;
            print(json_out, &v, |v| {
                table(
                    v,
                    &[
                        ("ID", "id"),
                        ("NODE", "node_name"),
                        ("VOLUME", "volume"),
                        ("SEGMENT", "segment"),
                        ("REASON", "reason"),
                        ("STATE", "state"),
                        ("EXTENTS", "extents_released"),
                        ("VERIFIED", "extents_verified"),
                    ],
                )
            });
        }
    }
    Ok(())
}

/// A deleted volume's id from its id or name.
pub async fn resolve_deleted(api: &ApiClient, volume: &str) -> Result<u64> {
    let id = volume.strip_prefix("vol-").unwrap_or(volume);
    if let Ok(n) = id.parse::<u64>() {
        return Ok(n);
    }
    let list: Vec<ErasureView> = api.get("/v1/erasures").await?;
    let ids: Vec<u64> = list.iter().filter(|e| e.name == volume).map(|e| e.volume).collect();
    match ids.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no deleted volume named {volume:?}"),
        many => bail!("several deleted volumes are named {volume:?} (ids {many:?}); give the id"),
    }
}

/// Shows one erasure; with `wait`, polls with a progress bar until it is complete.
pub async fn show(api: &ApiClient, id: u64, wait: bool, timeout: Option<Duration>, json_out: bool) -> Result<()> {
    let path = format!("/v1/erasures/{id}");
    let out = |v: &ErasureView| -> Result<()> {
        print(json_out, &serde_json::to_value(v)?, |_| render(v));
        Ok(())
    };
    if !wait {
        let v: ErasureView = api.get(&path).await?;
        return out(&v);
    }
    let started = Instant::now();
    let bar = if json_out { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(1) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    loop {
        let v: ErasureView = api.get(&path).await?;
        let (done, total) = steps(&v);
        bar.set_length(total.max(1));
        bar.set_position(done);
        bar.set_message(summary(&v));
        match v.state {
            ErasureState::Complete => {
                bar.finish_and_clear();
                return out(&v);
            }
            ErasureState::KeptForClones => {
                bar.abandon();
                out(&v)?;
                bail!(
                    "volume {id}'s key is shredded, but its segments are kept while clones read through its snapshot: \
                     they are zeroed once the last of them is flattened (`slate volume flatten CLONE`) or deleted"
                );
            }
            ErasureState::Erasing => {}
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            bar.abandon();
            out(&v)?;
            bail!("the erasure of volume {id} is not complete after {:?}", started.elapsed());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Metadata voters that purged the volume's key, of all.
fn voters_purged(v: &ErasureView) -> (u64, u64) {
    (v.meta_voters.iter().filter(|m| m.purged).count() as u64, v.meta_voters.len() as u64)
}

/// Progress in steps: each replica released, each replica verified, each voter purged.
fn steps(v: &ErasureView) -> (u64, u64) {
    let (purged, voters) = voters_purged(v);
    (v.replicas_released + v.replicas_erased + purged, 2 * v.replicas_total + voters)
}

fn summary(v: &ErasureView) -> String {
    let (purged, voters) = voters_purged(v);
    format!(
        "replicas {}/{} erased, extents {}/{} verified zero, voters {purged}/{voters} purged",
        v.replicas_erased, v.replicas_total, v.extents_verified, v.extents_released,
    )
}

/// The human view of one erasure.
pub fn render(v: &ErasureView) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "deleted volume {} ({})", v.volume, v.name);
    let _ = writeln!(s, "  tenant:      {}", v.tenant);
    let _ = writeln!(s, "  size:        {}", bytes_h(v.size_bytes));
    let _ = writeln!(s, "  deleted by:  {} at {} ms", v.deleted_by, v.deleted_ms);
    let state = v.state;
    match (v.completed_ms, state) {
        (Some(t), _) => {
            let _ = writeln!(s, "  erasure:     {state} at {t} ms (recorded in the audit chain as volume.erased)");
        }
        (None, ErasureState::KeptForClones) => {
            let _ = writeln!(
                s,
                "  erasure:     {state}: key shredded; its segments stay while clones read through its snapshot, \
                 and are zeroed once the last of them is flattened or deleted"
            );
        }
        (None, _) => {
            let _ = writeln!(
                s,
                "  erasure:     {state}: complete once every replica is verified zero and every metadata voter purged the key"
            );
        }
    }
    let _ = writeln!(
        s,
        "  replicas:    {} total, {} released, {} verified zero",
        v.replicas_total, v.replicas_released, v.replicas_erased
    );
    let _ = writeln!(
        s,
        "  extents:     {} released, {} verified zero, {} retired after failed verification",
        v.extents_released, v.extents_verified, v.extents_failed
    );
    let _ = writeln!(s, "  releases:");
    for r in &v.releases {
        let layer = r.layer_epoch.map(|e| format!(" layer {e}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "    {:<10} segment {:<4}{layer} {:<9} {:<17} extents released {:>5}, verified zero {:>5}",
            r.node_name,
            r.segment,
            r.state.as_str(),
            r.reason.as_str(),
            r.extents_released,
            r.extents_verified,
        );
    }
    if !v.key_shred.is_empty() {
        let _ = writeln!(s, "  key shred:   {}", v.key_shred);
    }
    let _ = writeln!(s, "  metadata voters (key shredded at root epoch {}):", v.root_epoch);
    for m in &v.meta_voters {
        let what = if m.purged { "purged".to_string() } else { format!("pending on node {}", m.id) };
        let gone = if m.current { "" } else { " (no longer a voter)" };
        let _ = writeln!(s, "    meta-{}: {what}{gone}", m.id);
    }
    s
}
