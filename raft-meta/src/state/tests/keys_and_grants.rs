//! Grant revocation fences, reconfiguration reserved to the current writer, and
//! re-keying the root, on two replicas that must stay byte-identical.

use super::*;

const GIB: u64 = 1 << 30;

fn attach(mode: AttachMode, vid: u64, force: bool) -> Command {
    Command::Attach { volume: vid, req: AttachRequest { mode, host: "h".into(), force, insecure_plaintext_nbd: false } }
}

fn grant(h: &mut Harness, p: u64, vid: u64) -> u64 {
    h.op(Command::CreateGrant(CreateGrantRequest { principal: p, volume: vid, access: Access::ReadWrite }))["id"]
        .as_u64()
        .unwrap()
}

#[test]
fn revoking_a_grant_ends_the_attachment_and_fences_its_nodes() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let nodes: Vec<u64> = (1..=3).map(|i| h.node(&format!("n{i}"), &format!("z/r/h{i}"))).collect();
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let (h1, h1t) = h.principal("host1", Role::Host, None, "s1");
    let g = grant(&mut h, h1, vid);
    let body = h.ok(tok(h1t, "s1"), attach(AttachMode::ReadWrite, vid, false));
    let aid = body["attachment"]["id"].as_u64().unwrap();
    let generation = h.state().volumes[&vid].generation;
    assert!(nodes.iter().all(|n| h.state().fences_for(*n).is_empty()), "no fence before the revocation");

    let r = h.op(Command::DeleteGrant { grant: g });
    assert_eq!(r["attachments_ended"], serde_json::json!([aid]));
    let v = &h.state().volumes[&vid];
    assert!(v.attachments.is_empty(), "the revoked attachment is still live");
    assert_eq!(v.generation, generation + 1, "the generation was not bumped");
    let holders: Vec<u64> = v.segments[0].replicas.iter().map(|r| r.node).collect();
    for n in &nodes {
        let f = h.state().fences_for(*n);
        if holders.contains(n) {
            assert_eq!(f, vec![slate_protocol::ops::VolumeFence { volume: vid, generation: generation + 1 }]);
        } else {
            assert!(f.is_empty(), "node {n} holds no replica but got {f:?}");
        }
    }
    // The capability stops renewing, and the principal cannot attach again.
    let e = h.err(tok(h1t, "s1"), Command::RefreshCapability { volume: vid, attachment: aid });
    assert!(matches!(e.code, ErrorCode::NotFound | ErrorCode::Forbidden), "{e:?}");
    let e = h.err(tok(h1t, "s1"), attach(AttachMode::ReadWrite, vid, false));
    assert_eq!(e.code, ErrorCode::Forbidden);
    // The fence is in the audit chain.
    let rec = h.state().audit.records.iter().rev().find(|r| r.action == "grant.delete").unwrap().clone();
    assert!(rec.object.contains("fenced generation"), "{}", rec.object);
}

#[test]
fn revoking_one_of_two_grants_keeps_an_attachment_that_is_still_allowed() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    for i in 1..=3 {
        h.node(&format!("n{i}"), &format!("z/r/h{i}"));
    }
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let (h1, h1t) = h.principal("host1", Role::Host, None, "s1");
    let g1 = grant(&mut h, h1, vid);
    let _g2 = grant(&mut h, h1, vid);
    h.ok(tok(h1t, "s1"), attach(AttachMode::ReadWrite, vid, false));
    let generation = h.state().volumes[&vid].generation;
    let r = h.op(Command::DeleteGrant { grant: g1 });
    assert_eq!(r["attachments_ended"], serde_json::json!([]));
    assert_eq!(h.state().volumes[&vid].generation, generation);
    assert_eq!(h.state().volumes[&vid].attachments.len(), 1);
}

#[test]
fn reconfiguration_needs_the_current_writer_and_a_rebuilding_replica() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    for i in 1..=3 {
        h.node(&format!("n{i}"), &format!("z/r/h{i}"));
    }
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let (h1, h1t) = h.principal("host1", Role::Host, None, "s1");
    let (h2, h2t) = h.principal("host2", Role::Host, None, "s2");
    grant(&mut h, h1, vid);
    grant(&mut h, h2, vid);
    let seg_node = h.state().volumes[&vid].segments[0].replicas[0].node;
    let fail = |node| Command::ReportFailure { volume: vid, req: ReportFailureRequest { segment: 0, node } };
    let in_sync = |node| Command::MarkInSync { volume: vid, req: MarkInSyncRequest { segment: 0, node } };

    // A read-only holder (with a read-write grant) may not reconfigure.
    h.ok(tok(h2t, "s2"), attach(AttachMode::ReadOnly, vid, false));
    assert_eq!(h.err(tok(h2t, "s2"), fail(seg_node)).code, ErrorCode::Forbidden);
    assert_eq!(h.err(tok(h2t, "s2"), in_sync(seg_node)).code, ErrorCode::Forbidden);
    // h1 writes at generation 1; h2 takes over at generation 2: h1 is now stale.
    h.ok(tok(h1t, "s1"), attach(AttachMode::ReadWrite, vid, false));
    h.ok(tok(h2t, "s2"), attach(AttachMode::ReadWrite, vid, true));
    let e = h.err(tok(h1t, "s1"), fail(seg_node));
    assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
    assert!(e.message.contains("current generation"), "{}", e.message);
    assert_eq!(h.err(tok(h1t, "s1"), in_sync(seg_node)).code, ErrorCode::Forbidden);
    assert!(
        h.state().volumes[&vid].segments[0].replicas.iter().all(|r| r.state == ReplicaState::InSync),
        "a refused report changed the segment"
    );

    // The current writer: an in-sync replica cannot be marked in sync.
    let e = h.err(tok(h2t, "s2"), in_sync(seg_node));
    assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
    // After a failure report the replacement is rebuilding, and only it can be marked.
    let r = h.ok(tok(h2t, "s2"), fail(seg_node));
    let new_node = r["new_node"].as_u64().expect("replaced");
    h.ok(tok(h2t, "s2"), in_sync(new_node));
    assert_eq!(h.err(tok(h2t, "s2"), in_sync(new_node)).code, ErrorCode::Conflict, "marked twice");
}

#[test]
fn rotate_root_rewraps_every_tenant_key_under_a_fresh_root() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    for i in 1..=3 {
        h.node(&format!("n{i}"), &format!("z/r/h{i}"));
    }
    let (vid, dek) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let old = h.root().ratchet_to(0).unwrap();
    let next = old.fresh_successor();
    let wrapped_root = old.wrap_successor(&next);
    // A stale epoch is refused, a tenant admin is refused.
    let e = h.err(tok(1, "op-secret"), Command::RotateRoot { wrapped_root: wrapped_root.clone(), root_epoch: 7 });
    assert_eq!(e.code, ErrorCode::KeyRotated);
    let (_, adm) = h.principal("adm", Role::TenantAdmin, Some(t), "a");
    let e = h.err(tok(adm, "a"), Command::RotateRoot { wrapped_root: wrapped_root.clone(), root_epoch: 0 });
    assert_eq!(e.code, ErrorCode::Forbidden);

    let r = h.ok(tok(1, "op-secret"), Command::RotateRoot { wrapped_root, root_epoch: 0 });
    assert_eq!(r["root_generation"], 1);
    assert_eq!(h.root().epoch(), 1);
    assert_eq!(h.root().wrap_tenant_key(&TenantKey::generate()).0.len(), 40);
    let st = h.state();
    assert_eq!(st.root_epoch, 1);
    // The new root opens the tenant key and through it the DEK; the old root, ratcheted, does not.
    let tk = next.unwrap_tenant_key(&st.tenants[&t].wrapped_key).unwrap();
    assert_eq!(tk.unwrap_dek(&st.volumes[&vid].wrapped_dek).unwrap().expose(), dek.expose());
    assert!(old.ratchet().unwrap_tenant_key(&st.tenants[&t].wrapped_key).is_err());
    // A node that was at epoch 0 crosses the rotation with the record; the record goes
    // once every voter reported the new epoch.
    assert!(old
        .advance_to(1, st.root_rotation.as_ref())
        .is_some_and(|k| k.unwrap_tenant_key(&st.tenants[&t].wrapped_key).is_ok()));
    for n in [1, 2, 3] {
        h.run(Credential::System, Command::ReportPurge { meta_node: n, root_epoch: 1, voters: vec![1, 2, 3] });
        assert_eq!(h.state().root_rotation.is_some(), n < 3, "after voter {n}'s report");
    }
}
