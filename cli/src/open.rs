//! Attaching a volume, or one of its snapshots, through slate-meta: the one
//! step `slate attach`, `slate backup`, `slate export` and `slate volume
//! flatten` share. Reading the attach reply (`slate_protocol::api`) into a
//! layout, the `VOL@SNAP` syntax and the volume key's hand-over (zeroized as
//! soon as it is a [`Dek`]) live here.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use slate::api::ApiClient;
use slate::volume::{ControlError, Dek, PendingSnapshot, ReplicaInfo, SegmentReplicas, VolumeLayout};
use slate_protocol::api::{
    AttachMode, AttachReply, AttachRequest, DetachRequest, ParentAttach, SegmentView, SnapshotState, SnapshotView,
    VolumeView,
};
use slate_protocol::{Epoch, Generation, NodeId, SegmentIndex, SignedCapability, VolumeId};

/// The snapshots of a volume view that wait for the read-write attachment to freeze them.
pub(super) fn pending_snapshots(v: &VolumeView) -> Vec<PendingSnapshot> {
    v.snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::Pending)
        .map(|s| PendingSnapshot { id: s.id, epoch: Epoch(s.epoch) })
        .collect()
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
pub(super) fn pick_snapshot<'a>(list: &'a [SnapshotView], volume: &str, name: &str) -> Result<&'a SnapshotView> {
    let by_name: Vec<&SnapshotView> = list.iter().filter(|s| s.name == name).collect();
    let snap = match by_name.as_slice() {
        [one] => *one,
        [] => match name.parse::<u64>().ok().and_then(|id| list.iter().find(|s| s.id == id)) {
            Some(s) => s,
            None => bail!("volume {volume} has no snapshot named {name:?}"),
        },
        _ => bail!("volume {volume} has several snapshots named {name:?}"),
    };
    match snap.state {
        SnapshotState::Ready => Ok(snap),
        SnapshotState::Pending => {
            bail!("snapshot {name:?} of volume {volume} is pending, not ready: only a ready snapshot can be served")
        }
    }
}

/// A clone's parent as an attach reply or a capability refresh hands it over (the
/// parent's layout, the snapshot's epoch and a read-only capability for the parent),
/// its layout and capability checked against each other.
pub(super) fn attached_parent(p: &ParentAttach) -> Result<AttachedParent, ControlError> {
    let capability = parse_capability(&p.capability.token)?;
    if capability.claims.volume.0 != p.volume.id {
        return Err(ControlError("slate-meta handed out a parent capability for another volume".into()));
    }
    let generation = capability.claims.generation.0.max(p.volume.generation);
    let mut layout = layout_from_view(&p.volume, generation);
    // A parent grown since the snapshot: its later segments hold no layer at the epoch.
    if p.size_bytes > 0 && p.size_bytes < layout.size_bytes {
        layout.size_bytes = p.size_bytes;
        let count = layout.segment_count();
        layout.segments.retain(|s| s.segment.0 < count);
    }
    Ok(AttachedParent {
        id: p.volume.id,
        name: p.volume.name.clone(),
        snapshot_name: p.snapshot_name.clone(),
        epoch: Epoch(p.epoch),
        layout,
        capability,
    })
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
            .map(|r| ReplicaInfo { node: NodeId(r.node), addr: r.addr.clone(), role: r.state })
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
    let vols: Vec<VolumeView> = api.get("/v1/volumes").await?;
    let hits: Vec<u64> = vols.iter().filter(|v| v.name == name_or_id).map(|v| v.id).collect();
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
            let list: Vec<SnapshotView> = api.get(&format!("/v1/volumes/{id}/snapshots")).await.with_context(|| {
                format!("listing the snapshots of volume {volume} (a snapshot or backup grant is needed)")
            })?;
            let snap = pick_snapshot(&list, volume, name)?;
            Some(AttachedSnapshot { id: snap.id, name: snap.name.clone(), epoch: Epoch(snap.epoch) })
        }
    };
    let mode = if read_only { AttachMode::ReadOnly } else { AttachMode::ReadWrite };
    let req = AttachRequest { mode, host: host.to_owned(), force, insecure_plaintext_nbd };
    let reply: AttachReply = api.post(&format!("/v1/volumes/{id}/attach"), &req).await?;
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
    let parent = reply.parent.as_ref().map(attached_parent).transpose()?;
    drop(reply);
    Ok(Attached { id, name, snapshot, attachment, generation, layout, capability, dek, parent })
}

/// Ends attachment `attachment` of volume `id`.
pub async fn detach(api: &ApiClient, id: u64, attachment: u64) -> Result<()> {
    let _: Value = api.post(&format!("/v1/volumes/{id}/detach"), &DetachRequest { attachment }).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn snap(id: u64, name: &str, state: SnapshotState) -> SnapshotView {
        SnapshotView { id, volume: 4, name: name.into(), epoch: id * 10, created_ms: 1, state, ready_ms: None }
    }

    fn replica(node: u64, state: &str) -> Value {
        json!({"node": node, "addr": format!("127.0.0.1:{node}"), "failure_domain": format!("z/r/h{node}"),
               "state": state, "node_state": "active", "rebuild_done_blocks": 0, "rebuild_total_blocks": 0})
    }

    fn segment(index: u32, replicas: &[Value]) -> Value {
        json!({"index": index, "epoch": 1, "first_block": u64::from(index) * 2, "blocks": 2, "replicas": replicas})
    }

    /// A volume view as slate-meta sends it.
    fn volume(id: u64, name: &str, size_bytes: u64, generation: u64, segments: &[Value]) -> Value {
        json!({
            "id": id, "name": name, "tenant": 1, "size_bytes": size_bytes, "block_size": 4096, "replicas": 2,
            "failure_domain_level": "host", "qos": {}, "state": "attached", "generation": generation,
            "segment_blocks": 2, "segments": segments, "attachments": [], "snapshots": [],
            "dek": {"created_ms": 1, "age_secs": 0, "wrapped_ms": 1, "tenant_key_version": 1}
        })
    }

    fn capability(token: &str, volume: u64) -> Value {
        json!({"token": token, "volume": volume, "generation": 1, "rights": 1, "nodes": [1, 2], "expires_unix_secs": 9})
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
        let list = vec![
            snap(1, "a", SnapshotState::Ready),
            snap(2, "b", SnapshotState::Ready),
            snap(3, "c", SnapshotState::Pending),
        ];
        assert_eq!(pick_snapshot(&list, "db", "a").unwrap().epoch, 10);
        assert_eq!(pick_snapshot(&list, "db", "b").unwrap().epoch, 20);
        assert_eq!(pick_snapshot(&list, "db", "2").unwrap().name, "b", "an id works where no name matches");
        let e = pick_snapshot(&list, "db", "c").unwrap_err().to_string();
        assert!(e.contains("pending") && e.contains("not ready"), "{e}");
        assert!(pick_snapshot(&list, "db", "zz").unwrap_err().to_string().contains("no snapshot"));
        let twice = vec![snap(1, "a", SnapshotState::Ready), snap(2, "a", SnapshotState::Ready)];
        assert!(pick_snapshot(&twice, "db", "a").unwrap_err().to_string().contains("several"));
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
        let reps = [replica(1, "in_sync"), replica(2, "in_sync")];
        let view = volume(4, "c1", 8192, 1, &[segment(0, &reps)]);
        // The parent grew since the snapshot: two segments now, one at the snapshot.
        let parent_view = volume(1, "demo", 16384, 5, &[segment(0, &reps), segment(1, &reps)]);
        let mut reply = json!({
            "attachment": {"id": 9, "principal": 3, "host": "h", "mode": "read_write", "generation": 1, "attached_ms": 1},
            "volume": view, "capability": capability(&cap(4, 1), 4), "dek_hex": "00", "verifying_key_hex": "00",
            "parent": {"volume": parent_view, "snapshot": 3, "snapshot_name": "s1", "epoch": 2,
                       "size_bytes": 8192, "capability": capability(&cap(1, 5), 1)}
        });
        let r: AttachReply = serde_json::from_value(reply.clone()).unwrap();
        let p = attached_parent(r.parent.as_ref().unwrap()).unwrap();
        assert_eq!((p.id, p.name.as_str(), p.snapshot_name.as_str(), p.epoch), (1, "demo", "s1", Epoch(2)));
        assert_eq!((p.layout.volume, p.layout.generation), (VolumeId(1), Generation(5)));
        assert_eq!((p.layout.size_bytes, p.layout.segments.len()), (8192, 1), "read no further than the snapshot");
        p.layout.validate().unwrap();
        // A capability for another volume than the parent's layout is refused.
        reply["parent"]["capability"]["token"] = json!(cap(4, 5));
        let r: AttachReply = serde_json::from_value(reply.clone()).unwrap();
        assert!(attached_parent(r.parent.as_ref().unwrap()).unwrap_err().to_string().contains("another volume"));
        // A plain volume's reply has none.
        reply.as_object_mut().unwrap().remove("parent");
        assert!(serde_json::from_value::<AttachReply>(reply).unwrap().parent.is_none());
    }

    #[test]
    fn the_volume_view_yields_its_pending_snapshots() {
        let mut view = volume(7, "v", 8192, 3, &[segment(0, &[replica(1, "in_sync"), replica(2, "rebuilding")])]);
        view["snapshots"] = json!([
            {"id": 4, "volume": 7, "name": "a", "epoch": 2, "state": "ready", "created_ms": 1, "ready_ms": 2},
            {"id": 5, "volume": 7, "name": "b", "epoch": 3, "state": "pending", "created_ms": 2, "ready_ms": null}
        ]);
        let v: VolumeView = serde_json::from_value(view).unwrap();
        assert_eq!(pending_snapshots(&v), vec![PendingSnapshot { id: 5, epoch: Epoch(3) }]);
        let l = layout_from_view(&v, 3);
        assert_eq!(l.segments[0].replicas[0].role, slate::volume::ReplicaRole::InSync);
        assert_eq!(l.segments[0].replicas[1].role, slate::volume::ReplicaRole::Rebuilding);
        let v: VolumeView = serde_json::from_value(volume(7, "v", 8192, 3, &[])).unwrap();
        assert!(pending_snapshots(&v).is_empty());
    }
}
