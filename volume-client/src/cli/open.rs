//! Attaching a volume, or one of its snapshots, through slate-meta: the one
//! step `slate attach`, `slate backup`, `slate export` and `slate volume
//! flatten` share. The attach reply's views, the `VOL@SNAP` syntax and the
//! volume key's hand-over (zeroized as soon as it is a [`Dek`]) live here.

use super::api::ApiClient;
use crate::volume::{ControlError, Dek, PendingSnapshot, ReplicaInfo, ReplicaRole, SegmentReplicas, VolumeLayout};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use slate_protocol::{Epoch, Generation, NodeId, SegmentIndex, SignedCapability, VolumeId};

#[derive(Deserialize)]
pub(super) struct CapabilityView {
    pub(super) token: String,
}

#[derive(Deserialize)]
pub(super) struct ReplicaView {
    pub(super) node: u64,
    pub(super) addr: String,
    pub(super) state: String,
}

#[derive(Deserialize)]
pub(super) struct SegmentView {
    pub(super) index: u32,
    pub(super) epoch: u64,
    pub(super) replicas: Vec<ReplicaView>,
}

#[derive(Deserialize)]
pub(super) struct VolumeView {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) size_bytes: u64,
    pub(super) generation: u64,
    pub(super) segment_blocks: u64,
    pub(super) segments: Vec<SegmentView>,
    /// `{id, name, epoch, state, created_ms}` per snapshot; read leniently, so
    /// that an entry of another shape never stops the layout from being read.
    #[serde(default)]
    pub(super) snapshots: Vec<Value>,
}

/// The snapshots of a volume view that wait for the read-write attachment to freeze them.
pub(super) fn pending_snapshots(v: &VolumeView) -> Vec<PendingSnapshot> {
    v.snapshots
        .iter()
        .filter(|s| s["state"] == "pending")
        .filter_map(|s| Some(PendingSnapshot { id: s["id"].as_u64()?, epoch: Epoch(s["epoch"].as_u64()?) }))
        .collect()
}

#[derive(Debug, Deserialize)]
pub(super) struct SnapshotEntry {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) epoch: u64,
    /// Absent from metadata services that only list finished snapshots.
    #[serde(default)]
    pub(super) state: Option<String>,
}

/// Splits `VOL@SNAP` (neither volume nor snapshot names may contain `@`).
pub(super) fn split_snapshot_spec(spec: &str) -> Result<(&str, Option<&str>)> {
    match spec.split_once('@') {
        None => Ok((spec, None)),
        Some((vol, snap)) if !vol.is_empty() && !snap.is_empty() && !snap.contains('@') => Ok((vol, Some(snap))),
        Some(_) => bail!("{spec:?} is not VOLUME@SNAPSHOT: give one volume and one snapshot name"),
    }
}

/// Picks snapshot `name` of volume `volume` from its list; it must be ready to be served.
pub(super) fn pick_snapshot<'a>(list: &'a [SnapshotEntry], volume: &str, name: &str) -> Result<&'a SnapshotEntry> {
    let by_name: Vec<&SnapshotEntry> = list.iter().filter(|s| s.name == name).collect();
    let snap = match by_name.as_slice() {
        [one] => *one,
        [] => match name.parse::<u64>().ok().and_then(|id| list.iter().find(|s| s.id == id)) {
            Some(s) => s,
            None => bail!("volume {volume} has no snapshot named {name:?}"),
        },
        _ => bail!("volume {volume} has several snapshots named {name:?}"),
    };
    match snap.state.as_deref() {
        None | Some("ready") => Ok(snap),
        Some(state) => {
            bail!("snapshot {name:?} of volume {volume} is {state}, not ready: only a ready snapshot can be served")
        }
    }
}

#[derive(Deserialize)]
pub(super) struct AttachmentView {
    pub(super) id: u64,
}

#[derive(Deserialize)]
pub(super) struct AttachReply {
    pub(super) attachment: AttachmentView,
    pub(super) volume: VolumeView,
    pub(super) capability: CapabilityView,
    pub(super) dek_hex: String,
    /// For a clone: how to read its parent.
    #[serde(default)]
    pub(super) parent: Option<ParentReply>,
}

/// A clone's parent as an attach reply or a capability refresh hands it over: the
/// parent's layout, the snapshot's epoch and a read-only capability for the parent.
#[derive(Deserialize)]
pub(super) struct ParentReply {
    pub(super) volume: VolumeView,
    pub(super) snapshot_name: String,
    pub(super) epoch: u64,
    /// The parent's size at the snapshot (0: not told; the parent's current size).
    #[serde(default)]
    pub(super) size_bytes: u64,
    pub(super) capability: CapabilityView,
}

impl ParentReply {
    /// The parent's layout and capability, checked against each other.
    pub(super) fn open(&self) -> Result<AttachedParent, ControlError> {
        let capability = parse_capability(&self.capability.token)?;
        if capability.claims.volume.0 != self.volume.id {
            return Err(ControlError("slate-meta handed out a parent capability for another volume".into()));
        }
        let generation = capability.claims.generation.0.max(self.volume.generation);
        let mut layout = layout_from_view(&self.volume, generation);
        // A parent grown since the snapshot: its later segments hold no layer at the epoch.
        if self.size_bytes > 0 && self.size_bytes < layout.size_bytes {
            layout.size_bytes = self.size_bytes;
            let count = layout.segment_count();
            layout.segments.retain(|s| s.segment.0 < count);
        }
        Ok(AttachedParent {
            id: self.volume.id,
            name: self.volume.name.clone(),
            snapshot_name: self.snapshot_name.clone(),
            epoch: Epoch(self.epoch),
            layout,
            capability,
        })
    }
}

/// How a clone's attachment reads its parent (see `volume/clone.rs`).
#[derive(Debug, Clone)]
pub struct AttachedParent {
    pub id: u64,
    pub name: String,
    pub snapshot_name: String,
    pub epoch: Epoch,
    pub layout: VolumeLayout,
    pub capability: SignedCapability,
}

pub(super) fn segment_from_view(s: &SegmentView) -> SegmentReplicas {
    SegmentReplicas {
        segment: SegmentIndex(s.index),
        epoch: Epoch(s.epoch),
        replicas: s
            .replicas
            .iter()
            .map(|r| ReplicaInfo {
                node: NodeId(r.node),
                addr: r.addr.clone(),
                role: if r.state == "in_sync" { ReplicaRole::InSync } else { ReplicaRole::Rebuilding },
            })
            .collect(),
    }
}

pub(super) fn layout_from_view(v: &VolumeView, generation: u64) -> VolumeLayout {
    VolumeLayout {
        volume: VolumeId(v.id),
        size_bytes: v.size_bytes,
        segment_blocks: v.segment_blocks,
        generation: Generation(generation),
        segments: v.segments.iter().map(segment_from_view).collect(),
    }
}

pub(super) fn parse_capability(token: &str) -> Result<SignedCapability, ControlError> {
    SignedCapability::from_token(token).map_err(|e| ControlError(format!("capability from slate-meta: {e}")))
}

/// Finds a volume's id by name or id.
pub async fn resolve_volume(api: &ApiClient, name_or_id: &str) -> Result<u64> {
    if let Ok(id) = name_or_id.parse::<u64>() {
        return Ok(id);
    }
    let vols: Vec<Value> = api.get("/v1/volumes").await?;
    let hits: Vec<u64> = vols.iter().filter(|v| v["name"] == name_or_id).filter_map(|v| v["id"].as_u64()).collect();
    match hits.as_slice() {
        [id] => Ok(*id),
        [] => bail!("no volume named {name_or_id:?} is visible to you"),
        _ => bail!("several volumes are named {name_or_id:?}; use the id"),
    }
}

/// The snapshot an attachment reads.
#[derive(Debug, Clone)]
pub struct AttachedSnapshot {
    pub id: u64,
    pub name: String,
    pub epoch: Epoch,
}

/// What an attach hands over: the layout, the capability and the volume key.
#[derive(Debug)]
pub struct Attached {
    pub id: u64,
    pub name: String,
    /// The snapshot read, for `VOL@SNAP`.
    pub snapshot: Option<AttachedSnapshot>,
    pub attachment: u64,
    pub generation: u64,
    pub layout: VolumeLayout,
    pub capability: SignedCapability,
    pub dek: Dek,
    /// For a clone: its parent, read with the same DEK.
    pub parent: Option<AttachedParent>,
}

/// Attaches volume `volume` (name or id), or its snapshot `snapshot` (by name;
/// it must be ready), read-only or read-write.
pub async fn attach(
    api: &ApiClient,
    volume: &str,
    snapshot: Option<&str>,
    read_only: bool,
    host: &str,
    force: bool,
) -> Result<Attached> {
    attach_opts(api, volume, snapshot, read_only, host, force, false).await
}

/// [`attach`], telling slate-meta (for its audit chain) whether the volume will be
/// served over NBD on TCP without TLS.
pub async fn attach_opts(
    api: &ApiClient,
    volume: &str,
    snapshot: Option<&str>,
    read_only: bool,
    host: &str,
    force: bool,
    insecure_plaintext_nbd: bool,
) -> Result<Attached> {
    if snapshot.is_some() && !read_only {
        bail!("{volume}@{} names a snapshot, which can only be read: attach it read-only", snapshot.unwrap_or(""));
    }
    let id = resolve_volume(api, volume).await?;
    let snapshot = match snapshot {
        None => None,
        Some(name) => {
            let list: Vec<SnapshotEntry> =
                api.get(&format!("/v1/volumes/{id}/snapshots")).await.with_context(|| {
                    format!("listing the snapshots of volume {volume} (a snapshot or backup grant is needed)")
                })?;
            let snap = pick_snapshot(&list, volume, name)?;
            Some(AttachedSnapshot { id: snap.id, name: snap.name.clone(), epoch: Epoch(snap.epoch) })
        }
    };
    let mode = if read_only { "read_only" } else { "read_write" };
    let reply: AttachReply = api
        .post(
            &format!("/v1/volumes/{id}/attach"),
            &json!({"mode": mode, "host": host, "force": force, "insecure_plaintext_nbd": insecure_plaintext_nbd}),
        )
        .await?;
    let capability = parse_capability(&reply.capability.token)?;
    let generation = capability.claims.generation.0.max(reply.volume.generation);
    let layout = layout_from_view(&reply.volume, generation);
    // Decoded straight into the key's secret page (no intermediate copy).
    let mut reply = reply;
    let dek = Dek::from_hex(&reply.dek_hex);
    zeroize::Zeroize::zeroize(&mut reply.dek_hex);
    let dek = dek.map_err(|e| anyhow::anyhow!(e))?;
    let name = reply.volume.name.clone();
    let attachment = reply.attachment.id;
    let parent = reply.parent.as_ref().map(ParentReply::open).transpose()?;
    drop(reply);
    Ok(Attached { id, name, snapshot, attachment, generation, layout, capability, dek, parent })
}

/// Ends attachment `attachment` of volume `id`.
pub async fn detach(api: &ApiClient, id: u64, attachment: u64) -> Result<()> {
    let _: Value = api.post(&format!("/v1/volumes/{id}/detach"), &json!({"attachment": attachment})).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, name: &str, state: Option<&str>) -> SnapshotEntry {
        SnapshotEntry { id, name: name.into(), epoch: id * 10, state: state.map(str::to_owned) }
    }

    #[test]
    fn vol_at_snap_is_split_once() {
        assert_eq!(split_snapshot_spec("db").unwrap(), ("db", None));
        assert_eq!(split_snapshot_spec("db@nightly").unwrap(), ("db", Some("nightly")));
        assert_eq!(split_snapshot_spec("7@3").unwrap(), ("7", Some("3")));
        for bad in ["db@", "@nightly", "@", "db@a@b"] {
            assert!(split_snapshot_spec(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_a_ready_snapshot_is_picked() {
        let list = vec![snap(1, "a", None), snap(2, "b", Some("ready")), snap(3, "c", Some("creating"))];
        assert_eq!(pick_snapshot(&list, "db", "a").unwrap().epoch, 10);
        assert_eq!(pick_snapshot(&list, "db", "b").unwrap().epoch, 20);
        assert_eq!(pick_snapshot(&list, "db", "2").unwrap().name, "b", "an id works where no name matches");
        let e = pick_snapshot(&list, "db", "c").unwrap_err().to_string();
        assert!(e.contains("creating") && e.contains("not ready"), "{e}");
        assert!(pick_snapshot(&list, "db", "zz").unwrap_err().to_string().contains("no snapshot"));
        let twice = vec![snap(1, "a", None), snap(2, "a", None)];
        assert!(pick_snapshot(&twice, "db", "a").unwrap_err().to_string().contains("several"));
    }

    #[test]
    fn snapshot_list_parses_with_and_without_state() {
        let old: Vec<SnapshotEntry> =
            serde_json::from_str(r#"[{"id":1,"volume":4,"name":"a","epoch":3,"created_ms":5}]"#).unwrap();
        assert_eq!(old[0].state, None);
        let new: Vec<SnapshotEntry> =
            serde_json::from_str(r#"[{"id":1,"volume":4,"name":"a","epoch":3,"created_ms":5,"state":"deleting"}]"#)
                .unwrap();
        assert_eq!(new[0].state.as_deref(), Some("deleting"));
    }

    #[test]
    fn a_clones_attach_reply_carries_its_parent() {
        let key = slate_protocol::capability::generate_signing_key();
        let cap = |volume: u64, generation: u64| {
            slate_protocol::Capability {
                volume: VolumeId(volume),
                generation: Generation(generation),
                rights: slate_protocol::Rights::READ,
                expires_unix_secs: u64::MAX,
                nodes: vec![NodeId(1), NodeId(2)],
                ..Default::default()
            }
            .sign(&key)
            .to_token()
        };
        let view = json!({
            "id": 4, "name": "c1", "size_bytes": 8192, "generation": 1, "segment_blocks": 2,
            "segments": [{"index": 0, "epoch": 1, "replicas": [
                {"node": 1, "addr": "127.0.0.1:1", "state": "in_sync"},
                {"node": 2, "addr": "127.0.0.1:2", "state": "in_sync"}]}]
        });
        // The parent grew since the snapshot: two segments now, one at the snapshot.
        let mut parent_view = view.clone();
        parent_view["id"] = json!(1);
        parent_view["name"] = json!("demo");
        parent_view["generation"] = json!(5);
        parent_view["size_bytes"] = json!(16384);
        let second = json!({"index": 1, "epoch": 1, "replicas": view["segments"][0]["replicas"].clone()});
        parent_view["segments"].as_array_mut().unwrap().push(second);
        let mut reply = json!({
            "attachment": {"id": 9}, "volume": view, "capability": {"token": cap(4, 1)}, "dek_hex": "00",
            "parent": {"volume": parent_view, "snapshot": 3, "snapshot_name": "s1", "epoch": 2,
                       "size_bytes": 8192, "capability": {"token": cap(1, 5)}}
        });
        let r: AttachReply = serde_json::from_value(reply.clone()).unwrap();
        let p = r.parent.as_ref().unwrap().open().unwrap();
        assert_eq!((p.id, p.name.as_str(), p.snapshot_name.as_str(), p.epoch), (1, "demo", "s1", Epoch(2)));
        assert_eq!((p.layout.volume, p.layout.generation), (VolumeId(1), Generation(5)));
        assert_eq!((p.layout.size_bytes, p.layout.segments.len()), (8192, 1), "read no further than the snapshot");
        p.layout.validate().unwrap();
        // A capability for another volume than the parent's layout is refused.
        reply["parent"]["capability"]["token"] = json!(cap(4, 5));
        let r: AttachReply = serde_json::from_value(reply.clone()).unwrap();
        assert!(r.parent.as_ref().unwrap().open().unwrap_err().to_string().contains("another volume"));
        // A plain volume's reply has none.
        reply.as_object_mut().unwrap().remove("parent");
        assert!(serde_json::from_value::<AttachReply>(reply).unwrap().parent.is_none());
    }

    #[test]
    fn the_volume_view_yields_its_pending_snapshots() {
        let v: VolumeView = serde_json::from_value(json!({
            "id": 7, "name": "v", "size_bytes": 8192, "generation": 3, "segment_blocks": 2,
            "segments": [{"index": 0, "epoch": 1, "replicas": [
                {"node": 1, "addr": "127.0.0.1:1", "state": "in_sync"},
                {"node": 2, "addr": "127.0.0.1:2", "state": "rebuilding"}]}],
            "snapshots": [
                {"id": 4, "name": "a", "epoch": 2, "state": "ready", "created_ms": 1},
                {"id": 5, "name": "b", "epoch": 3, "state": "pending", "created_ms": 2},
                {"id": 6, "name": "c", "state": "pending"}
            ]
        }))
        .unwrap();
        assert_eq!(pending_snapshots(&v), vec![PendingSnapshot { id: 5, epoch: Epoch(3) }]);
        let l = layout_from_view(&v, 3);
        assert_eq!(l.segments[0].replicas[1].role, ReplicaRole::Rebuilding);
        // A view without snapshots (an older slate-meta) has none pending.
        let v: VolumeView = serde_json::from_value(json!({
            "id": 7, "name": "v", "size_bytes": 8192, "generation": 3, "segment_blocks": 2, "segments": []
        }))
        .unwrap();
        assert!(pending_snapshots(&v).is_empty());
    }
}
