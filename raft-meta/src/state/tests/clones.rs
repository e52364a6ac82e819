//! Clones in the state machine: the shared DEK under the clone's own key path,
//! the refusals (missing or pending snapshot, taken name, clone of a clone,
//! rights), snapshot deletion refused while cloned, flatten, and a deleted
//! parent whose segments stay until its last clone is flattened or deleted.

use super::*;
use crate::state::clones::{CreateCloneRequest, FlattenedRequest};
use slate_protocol::ops::ReleaseReason;

const OP: &str = "op-secret";

fn cluster(h: &mut Harness) -> [u64; 3] {
    [h.node("n1", "z/r/h1"), h.node("n2", "z/r/h2"), h.node("n3", "z/r/h3")]
}

/// A snapshot of `vid`, frozen (ready) unless `ready` is false; returns its id.
fn snapshot(h: &mut Harness, vid: u64, name: &str, ready: bool) -> u64 {
    let s = h.op(Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: name.into() } });
    let sid = s["id"].as_u64().unwrap();
    if ready {
        h.op(Command::SnapshotFrozen { volume: vid, snapshot: sid, req: SnapshotFrozenRequest { node: None } });
    }
    sid
}

fn clone_cmd(parent: u64, snapshot: u64, name: &str, tenant: Option<u64>, size: Option<u64>) -> Command {
    Command::CreateClone {
        volume: parent,
        req: CreateCloneRequest { snapshot, name: name.into(), tenant, size_bytes: size },
    }
}

fn attach(h: &mut Harness, c: Credential, vid: u64, mode: AttachMode) -> (Value, String) {
    match h.run(
        c,
        Command::Attach {
            volume: vid,
            req: AttachRequest { mode, host: "h".into(), force: false, insecure_plaintext_nbd: false },
        },
    ) {
        Response::Ok { body, dek_hex, release } => {
            assert!(dek_hex.is_none(), "apply must not unwrap the DEK");
            (body, hex::encode(release.unwrap().open(h.root()).unwrap().expose()))
        }
        Response::Err(r) => panic!("attach refused: {r:?}"),
    }
}

fn clone_id(v: &Value) -> u64 {
    v["id"].as_u64().unwrap()
}

#[test]
fn clone_shares_the_parents_dek_under_its_own_key_path() {
    let mut h = Harness::new();
    let a = h.tenant("a");
    let b = h.tenant("b");
    cluster(&mut h);
    let (p, dek) = h.volume(tok(1, OP), a, "p", GIB).unwrap();
    let s1 = snapshot(&mut h, p, "s1", true);
    let c1 = clone_id(&h.op(clone_cmd(p, s1, "c1", None, None)));
    let v = &h.state().volumes[&c1];
    assert_eq!((v.tenant, v.size_bytes, v.replicas), (a, GIB, 2));
    let parent = v.parent.clone().unwrap();
    assert_eq!((parent.volume, parent.snapshot, parent.snapshot_name.as_str()), (p, s1, "s1"));
    assert_eq!(parent.epoch, h.state().volumes[&p].snapshots[&s1].epoch);
    // Placed like a new volume, charged to its nodes; nothing else changes on the parent.
    assert_eq!(v.segments.len(), 1);
    assert_eq!(v.segments[0].replicas.len(), 2);

    // The clone's attach hands out the parent's DEK and a read-only capability for the parent.
    let (body, dek_hex) = attach(&mut h, tok(1, OP), c1, AttachMode::ReadWrite);
    assert_eq!(dek_hex, hex::encode(dek.expose()), "the clone decrypts the shared blocks: same DEK");
    let g = &body["parent"];
    assert_eq!(g["volume"]["id"], p);
    assert_eq!(g["epoch"], parent.epoch);
    assert_eq!(g["snapshot_name"], "s1");
    assert_eq!(g["claims"]["volume"], p);
    assert_eq!(g["claims"]["rights"], 1, "read only");
    assert_eq!(g["claims"]["generation"], h.state().volumes[&p].generation);
    assert_eq!(g["claims"]["nodes"].as_array().unwrap().len(), 2);
    let aid = body["attachment"]["id"].as_u64().unwrap();
    let refreshed = h.op(Command::RefreshCapability { volume: c1, attachment: aid });
    assert_eq!(refreshed["volume"], c1);
    assert_eq!(refreshed["parent"]["claims"]["volume"], p, "renewal renews the parent's capability too");
    let shown = h.op(Command::GetVolume { volume: c1 });
    assert_eq!(shown["parent"]["volume_name"], "p");
    assert_eq!(shown["parent"]["deleted"], false);
    assert_eq!(h.op(Command::GetVolume { volume: p })["clones"][0]["name"], "c1");
    // A plain volume's attach and view carry no parent.
    let (body, _) = attach(&mut h, tok(1, OP), p, AttachMode::ReadOnly);
    assert!(body.get("parent").is_none(), "{body}");

    // Another tenant (operator), larger: the same DEK, wrapped under b's key, not a's.
    let c2 = clone_id(&h.op(clone_cmd(p, s1, "c2", Some(b), Some(3 * GIB))));
    let st = h.state();
    let v2 = &st.volumes[&c2];
    assert_eq!((v2.tenant, v2.size_bytes, v2.segments.len()), (b, 3 * GIB, 3));
    let kb = h.root().unwrap_tenant_key(&st.tenants[&b].wrapped_key).unwrap();
    let ka = h.root().unwrap_tenant_key(&st.tenants[&a].wrapped_key).unwrap();
    assert_eq!(kb.unwrap_dek(&v2.wrapped_dek).unwrap().expose(), dek.expose());
    assert!(ka.unwrap_dek(&v2.wrapped_dek).is_err(), "the clone's copy is under its own tenant's key");
    assert_ne!(v2.wrapped_dek, st.volumes[&p].wrapped_dek);
    assert!(audit::verify(&st.audit.records).ok);
    assert!(st.audit.records.iter().any(|r| r.action == "volume.clone" && r.object.contains("c2") && r.result == "ok"));

    // The parent grown since the snapshot: a clone is as large as the snapshot and reads no further.
    h.op(Command::ResizeVolume { volume: p, req: ResizeVolumeRequest { size_bytes: 2 * GIB } });
    let c3 = clone_id(&h.op(clone_cmd(p, s1, "c3", None, None)));
    assert_eq!(h.state().volumes[&c3].size_bytes, GIB);
    let (body, _) = attach(&mut h, tok(1, OP), c3, AttachMode::ReadOnly);
    assert_eq!(
        (body["parent"]["size_bytes"].as_u64(), body["parent"]["volume"]["size_bytes"].as_u64()),
        (Some(GIB), Some(2 * GIB))
    );
    assert_eq!(h.op(Command::GetVolume { volume: c3 })["parent"]["size_bytes"], GIB);
}

#[test]
fn bad_clones_are_refused_and_change_nothing() {
    let mut h = Harness::new();
    let a = h.tenant("a");
    let b = h.tenant("b");
    cluster(&mut h);
    let (alice, at) = h.principal("alice", Role::TenantAdmin, Some(a), "sa");
    let (_, bt) = h.principal("bob", Role::TenantAdmin, Some(b), "sb");
    let (host, ht) = h.principal("host", Role::Host, None, "sh");
    let _ = alice;
    let (p, _) = h.volume(tok(at, "sa"), a, "p", GIB).unwrap();
    let pending = snapshot(&mut h, p, "pending", false);
    let s1 = snapshot(&mut h, p, "s1", true);
    h.volume(tok(at, "sa"), a, "taken", GIB).unwrap();
    let c1 = clone_id(&h.ok(tok(at, "sa"), clone_cmd(p, s1, "c1", None, None)));
    let cs = snapshot(&mut h, c1, "cs", true);
    // A backup reads a volume's own layers: a clone's would lack what it reads from its parent.
    let e = h.err(
        tok(at, "sa"),
        Command::BeginBackup {
            volume: c1,
            req: BeginBackupRequest { snapshot: cs, target: "file:///backups".into(), parent: None },
        },
    );
    assert!(e.code == ErrorCode::Conflict && e.message.contains("flatten it first"), "{e:?}");
    h.op(Command::CreateGrant(CreateGrantRequest { principal: host, volume: p, access: Access::Snapshot }));
    let before = serde_json::to_vec(&h.state().volumes).unwrap();
    let cases: Vec<(Credential, Command, ErrorCode, &str)> = vec![
        (tok(at, "sa"), clone_cmd(p, 999, "x", None, None), ErrorCode::NotFound, "no snapshot 999"),
        (tok(at, "sa"), clone_cmd(p, pending, "x", None, None), ErrorCode::Conflict, "pending"),
        (tok(at, "sa"), clone_cmd(p, s1, "taken", None, None), ErrorCode::Conflict, "taken"),
        (tok(at, "sa"), clone_cmd(p, s1, "c1", None, None), ErrorCode::Conflict, "c1"),
        (tok(at, "sa"), clone_cmd(p, s1, "x", None, Some(GIB / 2)), ErrorCode::BadRequest, "at least as large"),
        (tok(at, "sa"), clone_cmd(p, s1, "x", None, Some(GIB + 1)), ErrorCode::BadRequest, "multiple of"),
        (tok(at, "sa"), clone_cmd(p, s1, "bad name", None, None), ErrorCode::BadRequest, "clone name"),
        (tok(at, "sa"), clone_cmd(c1, cs, "x", None, None), ErrorCode::Conflict, "itself a clone"),
        (tok(at, "sa"), clone_cmd(p, s1, "x", Some(b), None), ErrorCode::Forbidden, "tenant"),
        (tok(bt, "sb"), clone_cmd(p, s1, "x", None, None), ErrorCode::Forbidden, "snapshot"),
        (tok(bt, "sb"), clone_cmd(p, s1, "x", Some(b), None), ErrorCode::Forbidden, "snapshot"),
        (tok(ht, "sh"), clone_cmd(p, s1, "x", None, None), ErrorCode::Forbidden, "tenant"),
        (tok(1, OP), clone_cmd(p, s1, "x", Some(77), None), ErrorCode::NotFound, "no tenant 77"),
        (tok(1, OP), clone_cmd(424_242, s1, "x", None, None), ErrorCode::NotFound, "no volume"),
    ];
    for (c, cmd, code, why) in cases {
        let e = h.err(c, cmd);
        assert_eq!(e.code, code, "{e:?}");
        assert!(e.message.contains(why), "{why:?} not in {:?}", e.message);
    }
    assert_eq!(serde_json::to_vec(&h.state().volumes).unwrap(), before, "a refused clone changed the volumes");
    let denied = h.state().audit.records.iter().filter(|r| r.action == "volume.clone" && r.result != "ok").count();
    assert_eq!(denied, 14, "every refusal is audited");
}

#[test]
fn snapshot_delete_is_refused_while_cloned_and_flatten_lets_it_go() {
    let mut h = Harness::new();
    let a = h.tenant("a");
    cluster(&mut h);
    let (host, ht) = h.principal("host", Role::Host, None, "sh");
    let (p, _) = h.volume(tok(1, OP), a, "p", GIB).unwrap();
    let s1 = snapshot(&mut h, p, "s1", true);
    let c1 = clone_id(&h.op(clone_cmd(p, s1, "c1", None, None)));
    let e = h.err(tok(1, OP), Command::DeleteSnapshot { volume: p, snapshot: s1 });
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("c1 (vol-") && e.message.contains("flatten"), "{}", e.message);
    assert!(h.state().volumes[&p].snapshots.contains_key(&s1));

    // Flatten: only the clone's read-write attachment, by its holder, with no snapshot of the clone.
    h.op(Command::CreateGrant(CreateGrantRequest { principal: host, volume: c1, access: Access::ReadWrite }));
    let (ro, _) = attach(&mut h, tok(ht, "sh"), c1, AttachMode::ReadOnly);
    let ro = ro["attachment"]["id"].as_u64().unwrap();
    let (rw, _) = attach(&mut h, tok(ht, "sh"), c1, AttachMode::ReadWrite);
    let rw = rw["attachment"]["id"].as_u64().unwrap();
    let flat = |attachment| Command::CloneFlattened { volume: c1, req: FlattenedRequest { attachment } };
    assert_eq!(h.err(tok(ht, "sh"), flat(ro)).code, ErrorCode::Forbidden);
    assert_eq!(h.err(tok(1, OP), flat(rw)).code, ErrorCode::Forbidden, "not the holder");
    assert_eq!(h.err(tok(ht, "sh"), flat(9999)).code, ErrorCode::NotFound);
    let cs = snapshot(&mut h, c1, "cs", true);
    let e = h.err(tok(ht, "sh"), flat(rw));
    assert!(e.code == ErrorCode::Conflict && e.message.contains("cs"), "{e:?}");
    h.op(Command::DeleteSnapshot { volume: c1, snapshot: cs });
    assert!(h.state().volumes[&c1].parent.is_some(), "refusals changed nothing");
    h.ok(tok(ht, "sh"), flat(rw));
    assert!(h.state().volumes[&c1].parent.is_none());
    let e = h.err(tok(ht, "sh"), flat(rw));
    assert!(e.code == ErrorCode::Conflict && e.message.contains("not a clone"), "{e:?}");
    let (body, _) = attach(&mut h, tok(ht, "sh"), c1, AttachMode::ReadOnly);
    assert!(body.get("parent").is_none(), "a flattened clone reads no parent");
    assert!(h.op(Command::GetVolume { volume: p }).get("clones").is_none());
    h.op(Command::DeleteSnapshot { volume: p, snapshot: s1 });
    let rec = h.state().audit.records.iter().rev().find(|r| r.action == "volume.flatten" && r.result == "ok");
    assert!(rec.is_some_and(|r| r.object.contains(&format!("vol-{p}"))), "flatten audited");
}

#[test]
fn deleted_parent_keeps_its_segments_until_the_last_clone_goes() {
    let mut h = Harness::new();
    let a = h.tenant("a");
    let nodes = cluster(&mut h);
    h.run(Credential::System, Command::ReportPurge { meta_node: 1, root_epoch: 0, voters: vec![1] });
    let (p, _) = h.volume(tok(1, OP), a, "p", 2 * GIB).unwrap();
    let s1 = snapshot(&mut h, p, "s1", true);
    snapshot(&mut h, p, "other", true);
    let c1 = clone_id(&h.op(clone_cmd(p, s1, "c1", None, None)));
    let c2 = clone_id(&h.op(clone_cmd(p, s1, "c2", None, None)));
    let charged = |h: &Harness| nodes.iter().map(|n| h.state().nodes[n].allocated_bytes).sum::<u64>();
    let with_all = charged(&h);
    let releases_of = |h: &Harness, v: u64| h.state().releases.values().filter(|r| r.volume == v).count();

    h.op(Command::DeleteVolume { volume: p, force: false });
    let st = h.state();
    assert!(!st.volumes.contains_key(&p), "the parent is gone as a volume");
    assert_eq!(releases_of(&h, p), 0, "no segment of the parent is released while clones read it");
    let kept = &st.retained[&p];
    assert_eq!(kept.wrapped_dek, crate::keys::WrappedKey::default(), "the parent's own key copy is gone");
    assert_eq!(kept.snapshots.keys().copied().collect::<Vec<_>>(), vec![s1], "only the read snapshot is kept");
    assert_eq!(charged(&h), with_all, "its space stays charged");
    let epoch = h.state().root_epoch;
    h.run(Credential::System, Command::ReportPurge { meta_node: 1, root_epoch: epoch, voters: vec![1] });
    let er = h.op(Command::GetErasure { volume: p });
    assert_eq!(er["state"], "kept_for_clones", "not complete while clones hold the DEK and read the segments");
    // Its name is free again; the clones still read it (and see it as deleted).
    h.volume(tok(1, OP), a, "p", GIB).unwrap();
    let (body, _) = attach(&mut h, tok(1, OP), c1, AttachMode::ReadWrite);
    assert_eq!(body["parent"]["volume"]["id"], p);
    assert_eq!(body["parent"]["volume"]["segments"].as_array().unwrap().len(), 2);
    assert_eq!(h.op(Command::GetVolume { volume: c2 })["parent"]["deleted"], true);
    // Its segments are the clones' only copy: their nodes may not be drained or decommissioned.
    let holder = h.state().retained[&p].segments[0].replicas[0].node;
    let e = h.err(tok(1, OP), Command::DrainNode { node: holder });
    assert!(e.code == ErrorCode::Conflict && e.message.contains("kept for clones"), "{e:?}");
    let disk = h.state().disks.values().find(|d| d.node == holder).unwrap().id;
    assert_eq!(h.err(tok(1, OP), Command::DecommissionDisk { disk }).code, ErrorCode::Conflict);
    // A scrub on a holder still finds a peer to repair a kept segment from.
    let req = slate_protocol::ops::RepairSourceRequest { volume: p, segment: 0 };
    let src = h.op(Command::RepairSource { node: holder, req });
    assert_eq!(src["peers"].as_array().map(Vec::len), Some(1), "{src}");

    // One clone flattened: still kept for the other.
    let aid = body["attachment"]["id"].as_u64().unwrap();
    h.op(Command::CloneFlattened { volume: c1, req: FlattenedRequest { attachment: aid } });
    assert!(h.state().retained.contains_key(&p));
    assert_eq!(releases_of(&h, p), 0);
    // The last one deleted: the parent's segments are queued for verified zeroing.
    h.op(Command::DeleteVolume { volume: c2, force: false });
    assert!(h.state().retained.is_empty());
    let rel: Vec<_> = h.state().releases.values().filter(|r| r.volume == p).cloned().collect();
    assert_eq!(rel.len(), 4, "2 segments x 2 replicas");
    assert!(rel.iter().all(|r| r.reason == ReleaseReason::VolumeDeleted && r.layer_epoch.is_none()));
    assert_eq!(h.op(Command::GetErasure { volume: p })["state"], "erasing");
    assert!(charged(&h) < with_all, "the parent's space is no longer charged");
    h.op(Command::DrainNode { node: holder });
    assert!(audit::verify(&h.state().audit.records).ok);
}

#[test]
fn a_tenant_delete_takes_parent_and_clones_together() {
    let mut h = Harness::new();
    let a = h.tenant("a");
    let b = h.tenant("b");
    cluster(&mut h);
    let (p, _) = h.volume(tok(1, OP), a, "p", GIB).unwrap();
    let s1 = snapshot(&mut h, p, "s1", true);
    h.op(clone_cmd(p, s1, "c1", None, None));
    let cb = clone_id(&h.op(clone_cmd(p, s1, "cb", Some(b), None)));
    // Tenant a goes, with the parent and c1; cb (tenant b) still reads the parent.
    h.op(Command::DeleteTenant { tenant: a });
    assert!(h.state().retained.contains_key(&p));
    assert_eq!(h.state().releases.values().filter(|r| r.volume == p).count(), 0);
    let kb = h.root().unwrap_tenant_key(&h.state().tenants[&b].wrapped_key).unwrap();
    assert!(kb.unwrap_dek(&h.state().volumes[&cb].wrapped_dek).is_ok(), "cb keeps its own key path");
    h.op(Command::DeleteTenant { tenant: b });
    assert!(h.state().retained.is_empty());
    assert_eq!(h.state().releases.values().filter(|r| r.volume == p).count(), 2);
}
