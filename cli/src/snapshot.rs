//! `slate snapshot create|list|delete`: crash-consistent snapshots of a volume.
//! `create` returns once every replica is frozen at the snapshot's epoch (by the
//! volume's read-write client, which quiesces its writes for that moment, or by
//! the nodes of a detached volume).

use super::commands::{print, table};
use super::open::resolve_volume;
use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::Value;
use slate::api::ApiClient;
use slate_protocol::api::{CreateSnapshotRequest, SnapshotState, SnapshotView};
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a crash-consistent snapshot of the whole volume, also while it is attached and written.
    Create {
        volume: String,
        name: String,
        /// Return once recorded, without waiting for every replica to freeze.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// List a volume's snapshots.
    List { volume: String },
    /// Delete a snapshot: its layer is folded and freed extents go through verified zeroing.
    Delete { volume: String, name: String },
}

async fn snapshot_by_name(api: &ApiClient, id: u64, name: &str) -> Result<SnapshotView> {
    let list: Vec<SnapshotView> = api.get(&format!("/v1/volumes/{id}/snapshots")).await?;
    match list.into_iter().find(|s| s.name == name) {
        Some(s) => Ok(s),
        None => bail!("volume {id} has no snapshot named {name:?}"),
    }
}

pub async fn run(api: &ApiClient, cmd: SnapshotCmd, json_out: bool) -> Result<()> {
    match cmd {
        SnapshotCmd::Create { volume, name, no_wait, timeout } => {
            let id = resolve_volume(api, &volume).await?;
            let t = Instant::now();
            let req = CreateSnapshotRequest { name: name.clone() };
            let mut s: SnapshotView = api.post(&format!("/v1/volumes/{id}/snapshots"), &req).await?;
            while !no_wait && s.state != SnapshotState::Ready {
                if t.elapsed() >= Duration::from_secs(timeout) {
                    bail!(
                        "snapshot {name:?} of volume {id} is recorded but not frozen on every replica after {timeout} s \
                         (is the volume's client or a node down?); it stays pending"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                s = snapshot_by_name(api, id, &name).await?;
            }
            let secs = t.elapsed().as_secs_f64();
            print(json_out, &serde_json::to_value(&s)?, |_| {
                format!(
                    "snapshot {} ({}) of volume {id}: {} at epoch {} ({secs:.1} s)\n",
                    s.name, s.id, s.state, s.epoch
                )
            });
        }
        SnapshotCmd::List { volume } => {
            let id = resolve_volume(api, &volume).await?;
            let v: Value = api.get(&format!("/v1/volumes/{id}/snapshots")).await?;
            print(json_out, &v, |v| {
                table(
                    v,
                    &[
                        ("ID", "id"),
                        ("NAME", "name"),
                        ("EPOCH", "epoch"),
                        ("STATE", "state"),
                        ("CREATED", "created_ms"),
                    ],
                )
            });
        }
        SnapshotCmd::Delete { volume, name } => {
            let id = resolve_volume(api, &volume).await?;
            let s = snapshot_by_name(api, id, &name).await?;
            let sid = s.id;
            let v: Value = api.delete(&format!("/v1/volumes/{id}/snapshots/{sid}")).await?;
            print(json_out, &v, |_| {
                format!("snapshot {name:?} of volume {id} deleted; its layer's extents are being zeroed and verified\n")
            });
        }
    }
    Ok(())
}
