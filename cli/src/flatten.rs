//! `slate volume flatten NEW`: copy into a clone every block it still reads
//! from its parent, then detach it from the parent.
//!
//! The clone is attached read-write (refused, with the holder named, while
//! another read-write attachment holds it, unless `--force`, which fences it)
//! and walked in steps of 1-4 MiB: in each step, blocks the parent holds and
//! the clone has not written are copied as ciphertext (`Volume::copy_from_parent`:
//! the same DEK and tweak make the parent's ciphertext the clone's, so nothing
//! is decrypted). Copying only blocks the clone has not written is idempotent,
//! so a flatten killed half way (even with kill -9) simply runs again and
//! continues where the copy stands. Once every step is done, slate-meta is told
//! (`POST /v1/volumes/{id}/flattened`, by the attachment that copied) and the
//! clone no longer reads its parent; a parent deleted meanwhile is then released.

use super::attach::{open_volume, CONTROL_PATIENCE};
use super::commands::{bytes_h, print};
use super::open::{self, resolve_volume};
use super::up::parse_size;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use slate::api::ApiClient;
use slate::volume::{CopyStep, Parent};
use slate_protocol::api::{FlattenedRequest, VolumeView};
use slate_protocol::BLOCK_SIZE_BYTES_U64;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tracing::warn;

/// Options of `slate volume flatten`.
#[derive(Debug, Clone, clap::Args)]
pub struct FlattenArgs {
    /// The clone, by name or id.
    pub volume: String,
    /// Take the clone over from a live read-write attachment (fences it): a
    /// `slate attach` of the clone, or a flatten that was killed.
    #[arg(long)]
    pub force: bool,
    /// Bytes copied per step, from 1M to 4M.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub step: u64,
    /// This host's name, recorded with the attachment.
    #[arg(long, default_value = "localhost")]
    pub host: String,
}

/// Checks a step size: whole blocks, 1 to 4 MiB.
fn step_blocks(step: u64) -> Result<u64> {
    if !((1 << 20)..=(4 << 20)).contains(&step) || !step.is_multiple_of(BLOCK_SIZE_BYTES_U64) {
        bail!("--step must be a multiple of 4096 bytes from 1M to 4M (got {step})");
    }
    Ok(step / BLOCK_SIZE_BYTES_U64)
}

fn progress(json_out: bool, bytes: u64) -> indicatif::ProgressBar {
    if json_out || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs `slate volume flatten`.
pub async fn run(api: &ApiClient, args: FlattenArgs, json_out: bool) -> Result<()> {
    let blocks_per_step = step_blocks(args.step)?;
    let quick_api = api.clone();
    let api = api.patient(CONTROL_PATIENCE);
    let id = resolve_volume(&api, &args.volume).await?;
    let v: VolumeView = api.get(&format!("/v1/volumes/{id}")).await?;
    if v.parent.is_none() {
        print(json_out, &json!({"volume": id, "flattened": true, "copied_bytes": 0}), |_| {
            format!("volume {} reads no parent: it is not a clone, or it is flattened already\n", args.volume)
        });
        return Ok(());
    }
    let snaps: Vec<&str> = v.snapshots.iter().map(|s| s.name.as_str()).collect();
    if !snaps.is_empty() {
        bail!(
            "volume {} has snapshots {snaps:?}, which read through its parent and would lose it: \
             delete them before flattening",
            args.volume
        );
    }
    let opened = open::attach(&api, &id.to_string(), None, false, &args.host, args.force).await.with_context(|| {
        format!(
            "attaching {} read-write to flatten it (if a `slate attach` of it, or a flatten that was killed, \
             holds it, stop it, or add --force, which fences that attachment)",
            args.volume
        )
    })?;
    let attachment = opened.attachment;
    let result = flatten(&api, quick_api, opened, blocks_per_step, json_out).await;
    if let Err(e) = open::detach(&api, id, attachment).await {
        warn!(error = %format!("{e:#}"), "detach failed (the next flatten or attach may need --force)");
    }
    let report = result?;
    print(json_out, &report, |r| {
        let b = |k: &str| bytes_h(r[k].as_u64().unwrap_or(0));
        format!(
            "flattened {}: copied {} from {}@{} in {:.1} s ({:.1} MiB/s); {} was its own already, {} empty in the parent; \
             it no longer reads its parent\n",
            args.volume,
            b("copied_bytes"),
            r["parent_name"].as_str().unwrap_or("?"),
            r["snapshot"].as_str().unwrap_or("?"),
            r["seconds"].as_f64().unwrap_or(0.0),
            r["mib_per_sec"].as_f64().unwrap_or(0.0),
            b("own_bytes"),
            b("empty_bytes"),
        )
    });
    Ok(())
}

/// Copies, reports the clone flattened, closes. The caller detaches.
async fn flatten(
    api: &ApiClient,
    quick_api: ApiClient,
    opened: open::Attached,
    blocks_per_step: u64,
    json_out: bool,
) -> Result<Value> {
    let (id, name, attachment) = (opened.id, opened.name.clone(), opened.attachment);
    let Some(parent) = &opened.parent else {
        bail!("volume {name} stopped being a clone while it was being attached (flattened by someone else?)");
    };
    let (parent_id, parent_name, snapshot) = (parent.id, parent.name.clone(), parent.snapshot_name.clone());
    // Assigns the clone's segments (read-write) and opens its parent at the snapshot's epoch.
    let volume = open_volume(&quick_api, api, opened).await.context("opening the clone and its parent")?;
    let parent_blocks = volume.parent().map_or(0, Parent::blocks);
    let total = volume.size_now() / BLOCK_SIZE_BYTES_U64;
    let upto = parent_blocks.min(total);
    let bar = progress(json_out, upto * BLOCK_SIZE_BYTES_U64);
    bar.set_message(format!("from {parent_name}@{snapshot}"));
    let started = Instant::now();
    let mut sum = CopyStep { empty: total - upto, ..CopyStep::default() };
    let mut at = 0;
    let copied = loop {
        if at >= upto {
            break Ok(());
        }
        let n = blocks_per_step.min(upto - at);
        match volume.copy_from_parent(at, n).await {
            Ok(s) => {
                sum.copied += s.copied;
                sum.own += s.own;
                sum.empty += s.empty;
            }
            Err(e) => break Err(anyhow::anyhow!("copying blocks {at}..{} from the parent: {e}", at + n)),
        }
        at += n;
        bar.inc(n * BLOCK_SIZE_BYTES_U64);
    };
    let copied = match copied {
        Ok(()) => volume.flush_all().await.context("flushing the copied blocks"),
        Err(e) => Err(e),
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let done = match copied {
        Ok(()) => api
            .post::<_, Value>(&format!("/v1/volumes/{id}/flattened"), &FlattenedRequest { attachment })
            .await
            .context("telling slate-meta the clone is flattened (run the flatten again: it copies nothing twice)"),
        Err(e) => Err(e.context(format!(
            "flattening {name} stopped after {} copied; run it again to continue",
            bytes_h(sum.copied * BLOCK_SIZE_BYTES_U64)
        ))),
    };
    volume.close().await;
    done?;
    let mib = (sum.copied * BLOCK_SIZE_BYTES_U64) as f64 / f64::from(1 << 20);
    Ok(json!({
        "volume": id,
        "name": name,
        "parent": parent_id,
        "parent_name": parent_name,
        "snapshot": snapshot,
        "copied_bytes": sum.copied * BLOCK_SIZE_BYTES_U64,
        "own_bytes": sum.own * BLOCK_SIZE_BYTES_U64,
        "empty_bytes": sum.empty * BLOCK_SIZE_BYTES_U64,
        "seconds": secs,
        "mib_per_sec": if secs > 0.0 { mib / secs } else { 0.0 },
        "flattened": true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_whole_blocks_from_one_to_four_mib() {
        assert_eq!(step_blocks(4 << 20).unwrap(), 1024);
        assert_eq!(step_blocks(1 << 20).unwrap(), 256);
        for bad in [0, 4096, (1 << 20) - 4096, (4 << 20) + 4096, (2 << 20) + 1] {
            assert!(step_blocks(bad).unwrap_err().to_string().contains("--step"), "{bad}");
        }
    }
}
