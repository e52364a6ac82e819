//! Unit tests of the state machine driven directly (no consensus): two
//! replicas apply the same envelopes and must end byte-identical.

#![allow(clippy::many_single_char_names)]

use super::command::*;
use super::types::*;
use super::MetaState;
use crate::audit;
use crate::keys::{hash_secret, Dek, RootKey, TenantKey};
use crate::placement::DomainLevel;
use serde_json::Value;

struct Replica {
    state: MetaState,
    root: RootKey,
}

struct Harness {
    replicas: Vec<Replica>,
    index: u64,
    now: u64,
}

fn secret_hash(s: &str) -> String {
    hex::encode(hash_secret(s.as_bytes()))
}

fn tok(id: u64, secret: &str) -> Credential {
    Credential::Token { token: id, secret_sha256: secret_hash(secret) }
}

impl Harness {
    fn new() -> Self {
        let root = RootKey::generate();
        let copy = root.ratchet_to(0).unwrap();
        let mut h = Self {
            replicas: vec![
                Replica { state: MetaState::default(), root },
                Replica { state: MetaState::default(), root: copy },
            ],
            index: 0,
            now: 1_000_000,
        };
        let r = h.run(
            Credential::System,
            Command::Bootstrap {
                operator_name: "op".into(),
                token_secret_sha256: secret_hash("op-secret"),
                token_id: None,
            },
        );
        assert!(matches!(r, Response::Ok { .. }));
        h
    }

    fn run(&mut self, credential: Credential, command: Command) -> Response {
        self.index += 1;
        self.now += 10;
        let env = Envelope { time_ms: self.now, client: "127.0.0.1:9".into(), credential, command };
        let bytes = serde_json::to_vec(&env).unwrap();
        let mut out = Vec::new();
        for r in &mut self.replicas {
            let a = r.state.apply_bytes(self.index, &bytes, &mut r.root);
            out.push(serde_json::to_string(&a.response).unwrap());
        }
        assert_eq!(out[0], out[1], "replicas answered differently");
        let a = serde_json::to_vec(&self.replicas[0].state).unwrap();
        let b = serde_json::to_vec(&self.replicas[1].state).unwrap();
        assert_eq!(a, b, "replicas diverged");
        serde_json::from_str(&out[0]).unwrap()
    }

    fn op(&mut self, command: Command) -> Value {
        self.ok(tok(1, "op-secret"), command)
    }

    fn ok(&mut self, c: Credential, command: Command) -> Value {
        match self.run(c, command) {
            Response::Ok { body, .. } => body,
            Response::Err(r) => panic!("refused: {r:?}"),
        }
    }

    fn err(&mut self, c: Credential, command: Command) -> Refusal {
        match self.run(c, command) {
            Response::Ok { body, .. } => panic!("unexpectedly ok: {body}"),
            Response::Err(r) => r,
        }
    }

    fn state(&self) -> &MetaState {
        &self.replicas[0].state
    }

    fn root(&self) -> &RootKey {
        &self.replicas[0].root
    }

    fn tenant(&mut self, name: &str) -> u64 {
        let wrapped = self.root().wrap_tenant_key(&TenantKey::generate());
        let epoch = self.root().epoch();
        let v = self.op(Command::CreateTenant {
            req: CreateTenantRequest { name: name.into() },
            wrapped_key: wrapped,
            root_epoch: epoch,
        });
        v["id"].as_u64().unwrap()
    }

    fn principal(&mut self, name: &str, role: Role, tenant: Option<u64>, secret: &str) -> (u64, u64) {
        let v = self.op(Command::CreatePrincipal {
            req: CreatePrincipalRequest {
                name: name.into(),
                role,
                tenant,
                node: None,
                not_before_ms: None,
                not_after_ms: None,
                token_expires_ms: None,
            },
            token_secret_sha256: secret_hash(secret),
            token_id: None,
        });
        (v["principal"]["id"].as_u64().unwrap(), v["token_id"].as_u64().unwrap())
    }

    fn node(&mut self, name: &str, domain: &str) -> u64 {
        let v = self.op(Command::RegisterNode(RegisterNodeRequest {
            id: None,
            name: name.into(),
            addr: "127.0.0.1:7000".into(),
            failure_domain: domain.into(),
            disks: vec![DiskSpec { name: "d0".into(), capacity_bytes: 1 << 40 }],
        }));
        v["id"].as_u64().unwrap()
    }

    fn wrap_dek(&self, tenant: u64) -> (crate::keys::WrappedKey, u64, Dek) {
        let t = &self.state().tenants[&tenant];
        let tk = self.root().unwrap_tenant_key(&t.wrapped_key).unwrap();
        let dek = Dek::generate();
        (tk.wrap_dek(&dek), t.key_version, dek)
    }

    fn volume(&mut self, c: Credential, tenant: u64, name: &str, size: u64) -> Result<(u64, Dek), Refusal> {
        let (w, ver, dek) = self.wrap_dek(tenant);
        let req = CreateVolumeRequest {
            name: name.into(),
            size_bytes: size,
            replicas: 2,
            tenant: Some(tenant),
            qos: Qos::default(),
            failure_domain_level: None,
        };
        match self.run(c, Command::CreateVolume { tenant, req, wrapped_dek: w, tenant_key_version: ver }) {
            Response::Ok { body, .. } => Ok((body["id"].as_u64().unwrap(), dek)),
            Response::Err(r) => Err(r),
        }
    }
}

const GIB: u64 = 1 << 30;

#[test]
fn placement_uses_distinct_domains_or_fails_clearly() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    h.node("n1", "z/r/h1");
    let err = h.volume(tok(1, "op-secret"), t, "v1", 2 * GIB).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unsatisfiable);
    assert!(err.message.contains("distinct failure domains"), "{}", err.message);
    h.node("n2", "z/r/h2");
    h.node("n3", "z/r/h3");
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v1", 5 * GIB).unwrap();
    let v = &h.state().volumes[&vid];
    assert_eq!(v.segments.len(), 5);
    for s in &v.segments {
        let domains: std::collections::BTreeSet<_> =
            s.replicas.iter().map(|r| h.state().nodes[&r.node].failure_domain.clone()).collect();
        assert_eq!(domains.len(), 2);
    }
    // At rack level the three hosts are one domain.
    let (w, ver, _) = h.wrap_dek(t);
    let r = h.err(
        tok(1, "op-secret"),
        Command::CreateVolume {
            tenant: t,
            req: CreateVolumeRequest {
                name: "v2".into(),
                size_bytes: GIB,
                replicas: 2,
                tenant: Some(t),
                qos: Qos::default(),
                failure_domain_level: Some(DomainLevel::Rack),
            },
            wrapped_dek: w,
            tenant_key_version: ver,
        },
    );
    assert_eq!(r.code, ErrorCode::Unsatisfiable);
}

#[test]
fn attach_is_exclusive_and_takeover_bumps_generation() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    for i in 1..=3 {
        h.node(&format!("n{i}"), &format!("z/r/h{i}"));
    }
    let (vid, dek) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let (h1, h1t) = h.principal("host1", Role::Host, None, "s1");
    let (h2, h2t) = h.principal("host2", Role::Host, None, "s2");
    for p in [h1, h2] {
        h.op(Command::CreateGrant(CreateGrantRequest { principal: p, volume: vid, access: Access::ReadWrite }));
    }
    let attach = |force| Command::Attach {
        volume: vid,
        req: AttachRequest { mode: AttachMode::ReadWrite, host: "h".into(), force, insecure_plaintext_nbd: false },
    };
    let r = h.run(tok(h1t, "s1"), attach(false));
    let Response::Ok { body, dek_hex, release } = r else { panic!("attach refused") };
    assert!(dek_hex.is_none(), "apply (on every replica) must not unwrap the DEK");
    let opened = release.expect("a key release").open(h.root()).unwrap();
    assert_eq!(opened.expose(), dek.expose());
    assert_eq!(body["claims"]["generation"], 1);
    assert_eq!(body["claims"]["nodes"].as_array().unwrap().len(), 2);
    let e = h.err(tok(h2t, "s2"), attach(false));
    assert_eq!(e.code, ErrorCode::Conflict);
    let body = h.ok(tok(h2t, "s2"), attach(true));
    assert_eq!(body["claims"]["generation"], 2);
    assert_eq!(h.state().volumes[&vid].attachments.len(), 1);
    // Read-only attaches are shared and keep the generation.
    for _ in 0..2 {
        let body = h.ok(
            tok(h1t, "s1"),
            Command::Attach {
                volume: vid,
                req: AttachRequest {
                    mode: AttachMode::ReadOnly,
                    host: "h".into(),
                    force: false,
                    insecure_plaintext_nbd: false,
                },
            },
        );
        assert_eq!(body["claims"]["generation"], 2);
        assert_eq!(body["claims"]["rights"], 1);
    }
    assert_eq!(h.state().volumes[&vid].attachments.len(), 3);
}

#[test]
fn tenants_are_isolated_and_refusals_audited() {
    let mut h = Harness::new();
    let a = h.tenant("a");
    let b = h.tenant("b");
    for i in 1..=2 {
        h.node(&format!("n{i}"), &format!("z/r/h{i}"));
    }
    let (_, at) = h.principal("alice", Role::TenantAdmin, Some(a), "sa");
    let (_, bt) = h.principal("bob", Role::TenantAdmin, Some(b), "sb");
    let (va, _) = h.volume(tok(at, "sa"), a, "va", GIB).unwrap();
    let (vb, _) = h.volume(tok(bt, "sb"), b, "vb", GIB).unwrap();
    let list = h.ok(tok(at, "sa"), Command::ListVolumes);
    let ids: Vec<u64> = list.as_array().unwrap().iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![va]);
    for cmd in [
        Command::GetVolume { volume: vb },
        Command::DeleteVolume { volume: vb, force: true },
        Command::Attach {
            volume: vb,
            req: AttachRequest {
                mode: AttachMode::ReadWrite,
                host: "x".into(),
                force: true,
                insecure_plaintext_nbd: false,
            },
        },
        Command::CreateSnapshot { volume: vb, req: CreateSnapshotRequest { name: "s".into() } },
        Command::ListAudit { tenant: Some(b), after_seq: None, limit: None },
    ] {
        assert_eq!(h.err(tok(at, "sa"), cmd).code, ErrorCode::Forbidden);
    }
    assert!(h.volume(tok(at, "sa"), b, "sneaky", GIB).is_err());
    // Alice's audit view holds only tenant a's records, including her refusals.
    let page = h.ok(tok(at, "sa"), Command::ListAudit { tenant: None, after_seq: None, limit: None });
    let recs = page["records"].as_array().unwrap();
    assert!(recs.iter().all(|r| r["tenant"] == a));
    assert!(recs.iter().filter(|r| r["result"].as_str().unwrap().starts_with("denied")).count() >= 6);
    // Lockout after 5 bad secrets, even for the right one afterwards.
    for _ in 0..5 {
        assert_eq!(h.err(tok(bt, "wrong"), Command::ListVolumes).code, ErrorCode::Unauthorized);
    }
    assert_eq!(h.err(tok(bt, "sb"), Command::ListVolumes).code, ErrorCode::Locked);
    // Unknown token, missing token.
    assert_eq!(h.err(tok(999, "x"), Command::ListVolumes).code, ErrorCode::Unauthorized);
    assert_eq!(h.err(Credential::Missing, Command::ListVolumes).code, ErrorCode::Unauthorized);
    // Time-bounded accounts.
    let now = h.now;
    let v = h.op(Command::CreatePrincipal {
        req: CreatePrincipalRequest {
            name: "later".into(),
            role: Role::TenantMember,
            tenant: Some(a),
            node: None,
            not_before_ms: Some(now + 1_000_000),
            not_after_ms: None,
            token_expires_ms: None,
        },
        token_secret_sha256: secret_hash("sl"),
        token_id: None,
    });
    let lt = v["token_id"].as_u64().unwrap();
    assert!(h.err(tok(lt, "sl"), Command::ListVolumes).message.contains("not valid yet"));
    let v = h.op(Command::CreatePrincipal {
        req: CreatePrincipalRequest {
            name: "gone".into(),
            role: Role::TenantMember,
            tenant: Some(a),
            node: None,
            not_before_ms: None,
            not_after_ms: Some(now),
            token_expires_ms: None,
        },
        token_secret_sha256: secret_hash("sg"),
        token_id: None,
    });
    let gt = v["token_id"].as_u64().unwrap();
    assert!(h.err(tok(gt, "sg"), Command::ListVolumes).message.contains("expired"));
    assert!(audit::verify(&h.state().audit.records).ok);
}

#[test]
fn shred_rotates_keys_and_keeps_survivors_readable() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let other = h.tenant("other");
    for i in 1..=2 {
        h.node(&format!("n{i}"), &format!("z/r/h{i}"));
    }
    let (victim, victim_dek) = h.volume(tok(1, "op-secret"), t, "victim", GIB).unwrap();
    let (keep, keep_dek) = h.volume(tok(1, "op-secret"), t, "keep", GIB).unwrap();
    let old_state = h.state().clone();
    let old_root = h.root().ratchet_to(h.root().epoch()).unwrap();
    let wrapped_victim = old_state.volumes[&victim].wrapped_dek.clone();
    h.op(Command::DeleteVolume { volume: victim, force: false });
    let s = h.state();
    assert_eq!(s.root_epoch, 1);
    assert_eq!(h.root().epoch(), 1);
    assert!(!s.volumes.contains_key(&victim));
    assert_eq!(s.tenants[&t].key_version, 2);
    assert_ne!(s.volumes[&keep].wrapped_dek, old_state.volumes[&keep].wrapped_dek);
    // Survivors still unwrap to the same DEK under the new keys.
    let tk_new = h.root().unwrap_tenant_key(&s.tenants[&t].wrapped_key).unwrap();
    assert_eq!(tk_new.unwrap_dek(&s.volumes[&keep].wrapped_dek).unwrap().expose(), keep_dek.expose());
    // Nothing that remains opens the old copy: not the new root, not the new tenant key.
    assert!(h.root().unwrap_tenant_key(&old_state.tenants[&t].wrapped_key).is_err());
    assert!(tk_new.unwrap_dek(&wrapped_victim).is_err());
    // The old root (destroyed in real life) would have.
    let tk_old = old_root.unwrap_tenant_key(&old_state.tenants[&t].wrapped_key).unwrap();
    assert_eq!(tk_old.unwrap_dek(&wrapped_victim).unwrap().expose(), victim_dek.expose());
    // Tenant delete: another ratchet; the other tenant survives.
    h.op(Command::DeleteTenant { tenant: t });
    assert_eq!(h.state().root_epoch, 2);
    assert!(!h.state().tenants.contains_key(&t));
    assert!(h.root().unwrap_tenant_key(&h.state().tenants[&other].wrapped_key).is_ok());
    // A proposal wrapped under the old root epoch is refused for retry.
    let e = h.err(
        tok(1, "op-secret"),
        Command::CreateTenant {
            req: CreateTenantRequest { name: "late".into() },
            wrapped_key: old_root.wrap_tenant_key(&TenantKey::generate()),
            root_epoch: 0,
        },
    );
    assert_eq!(e.code, ErrorCode::KeyRotated);
    // Explicit rotation re-wraps survivors.
    let (_, other_dek) = h.volume(tok(1, "op-secret"), other, "o", GIB).unwrap();
    let w = h.root().wrap_tenant_key(&TenantKey::generate());
    let epoch = h.root().epoch();
    h.op(Command::RotateTenantKey { tenant: other, wrapped_key: w, root_epoch: epoch });
    let s = h.state();
    let tk = h.root().unwrap_tenant_key(&s.tenants[&other].wrapped_key).unwrap();
    let vid = s.volumes.values().find(|v| v.tenant == other).unwrap();
    assert_eq!(tk.unwrap_dek(&vid.wrapped_dek).unwrap().expose(), other_dek.expose());
    assert!(audit::verify(&s.audit.records).ok);
}

#[test]
fn failure_reconfigures_and_sweep_marks_down() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let n1 = h.node("n1", "z/r/h1");
    let _n2 = h.node("n2", "z/r/h2");
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let before = h.state().volumes[&vid].segments[0].clone();
    let failed = before.replicas[0].node;
    let e = h.err(
        tok(1, "op-secret"),
        Command::ReportFailure { volume: vid, req: ReportFailureRequest { segment: 0, node: failed } },
    );
    assert_eq!(e.code, ErrorCode::Unsatisfiable);
    let n3 = h.node("n3", "z/r/h3");
    let body = h.op(Command::ReportFailure { volume: vid, req: ReportFailureRequest { segment: 0, node: failed } });
    assert_eq!(body["replaced"], true);
    assert_eq!(body["new_node"], n3);
    let seg = &h.state().volumes[&vid].segments[0];
    assert_eq!(seg.epoch, before.epoch + 1);
    assert!(seg.replicas.iter().any(|r| r.node == n3 && r.state == ReplicaState::Rebuilding));
    h.op(Command::MarkInSync { volume: vid, req: MarkInSyncRequest { segment: 0, node: n3 } });
    // Liveness: n1 stays silent past the timeout.
    h.now += 60_000;
    for n in h.state().nodes.keys().copied().collect::<Vec<_>>() {
        if n != n1 {
            h.op(Command::Heartbeat { node: n });
        }
    }
    h.run(Credential::System, Command::Tick);
    assert_eq!(h.state().nodes[&n1].state, NodeState::Down);
    assert!(!h.state().volumes[&vid].segments[0].replicas.iter().any(|r| r.node == n1));
}

#[test]
fn bad_input_changes_nothing_but_audit() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    h.node("n1", "z/r/h1");
    h.node("n2", "z/r/h2");
    let before_vols = h.state().volumes.len();
    for (size, r) in [(GIB + 1, 2), (1024, 2), (32 << 40, 2), (GIB, 1), (GIB, 9)] {
        let (w, ver, _) = h.wrap_dek(t);
        let e = h.err(
            tok(1, "op-secret"),
            Command::CreateVolume {
                tenant: t,
                req: CreateVolumeRequest {
                    name: "v".into(),
                    size_bytes: size,
                    replicas: r,
                    tenant: Some(t),
                    qos: Qos::default(),
                    failure_domain_level: None,
                },
                wrapped_dek: w,
                tenant_key_version: ver,
            },
        );
        assert_eq!(e.code, ErrorCode::BadRequest, "{size} {r}");
    }
    assert_eq!(h.state().volumes.len(), before_vols);
    let r = {
        let mut st = h.state().clone();
        let mut root = h.root().ratchet_to(0).unwrap();
        st.apply_bytes(99, b"{not json", &mut root).response
    };
    assert!(matches!(r, Response::Err(Refusal { code: ErrorCode::BadRequest, .. })));
}

#[test]
fn snapshot_restore_round_trip() {
    let mut h = Harness::new();
    h.tenant("acme");
    let bytes = serde_json::to_vec(h.state()).unwrap();
    let back: MetaState = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(&back, h.state());
}

#[test]
fn node_ids_can_be_chosen_and_system_cannot_run_client_commands() {
    let mut h = Harness::new();
    let reg = |id: Option<u64>, name: &str| {
        Command::RegisterNode(RegisterNodeRequest {
            id,
            name: name.into(),
            addr: "127.0.0.1:7000".into(),
            failure_domain: "z/r/h".into(),
            disks: vec![DiskSpec { name: "d0".into(), capacity_bytes: 1 << 30 }],
        })
    };
    assert_eq!(h.op(reg(Some(7), "seven"))["id"], 7);
    assert_eq!(h.err(tok(1, "op-secret"), reg(Some(7), "again")).code, ErrorCode::Conflict);
    assert_eq!(h.op(reg(None, "next"))["id"], 8);
    let r = h.run(Credential::System, Command::DeleteTenant { tenant: 1 });
    assert!(matches!(r, Response::Err(Refusal { code: ErrorCode::Forbidden, .. })));
}

fn work_of(h: &mut Harness, node: u64) -> Vec<slate_protocol::ops::ReleaseTask> {
    let body = h.op(Command::Heartbeat { node });
    serde_json::from_value(body["work"]["releases"].clone()).unwrap()
}

fn report(h: &mut Harness, node: u64, release: u64, report: slate_protocol::ops::ReleaseReport) -> Value {
    h.op(Command::ReportRelease { node, release, report })
}

#[test]
fn delete_queues_releases_and_completes_only_when_erased_and_purged() {
    use slate_protocol::ops::{ReleaseReason, ReleaseReport};
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let nodes = [h.node("n1", "z/r/h1"), h.node("n2", "z/r/h2"), h.node("n3", "z/r/h3")];
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", 2 * GIB).unwrap();
    h.run(Credential::System, Command::ReportPurge { meta_node: 1, root_epoch: 0, voters: vec![1, 2] });
    // A replica replaced while the volume lived is queued too, and its node is not chosen
    // again for that segment while the release is pending.
    let failed = h.state().volumes[&vid].segments[0].replicas[0].node;
    h.op(Command::ReportFailure { volume: vid, req: ReportFailureRequest { segment: 0, node: failed } });
    let queued: Vec<_> = h.state().releases.values().cloned().collect();
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].node, queued[0].reason), (failed, ReleaseReason::ReplicaReplaced));
    let e = h.err(
        tok(1, "op-secret"),
        Command::ReportFailure {
            volume: vid,
            req: ReportFailureRequest { segment: 0, node: h.state().volumes[&vid].segments[0].replicas[0].node },
        },
    );
    assert_eq!(e.code, ErrorCode::Unsatisfiable, "the only other node still holds an unreleased copy");

    h.op(Command::DeleteVolume { volume: vid, force: false });
    let er = h.op(Command::GetErasure { volume: vid });
    assert_eq!(er["state"], "erasing");
    assert_eq!(er["replicas_total"], 5, "2 segments x 2 replicas + the replaced one");
    // Each node gets exactly its own work; reports from another node are refused.
    let mut all = Vec::new();
    for n in nodes {
        for task in work_of(&mut h, n) {
            assert!(!task.released);
            all.push((n, task));
        }
    }
    assert_eq!(all.len(), 5);
    let (n0, t0) = (all[0].0, all[0].1.id);
    let other = nodes.iter().copied().find(|n| *n != n0).unwrap();
    let e = h.err(
        tok(1, "op-secret"),
        Command::ReportRelease { node: other, release: t0, report: ReleaseReport::Released { extents: vec![] } },
    );
    assert_eq!(e.code, ErrorCode::BadRequest);
    // Erased before released is refused; a count that does not match is refused.
    let e = h.err(
        tok(1, "op-secret"),
        Command::ReportRelease { node: n0, release: t0, report: ReleaseReport::Erased { verified: 0, failed: 0 } },
    );
    assert_eq!(e.code, ErrorCode::Conflict);
    for (i, (n, task)) in all.iter().enumerate() {
        report(&mut h, *n, task.id, ReleaseReport::Released { extents: vec![i as u32 * 10, i as u32 * 10 + 1] });
    }
    let again = work_of(&mut h, n0);
    assert!(again.iter().all(|t| t.released && t.extents.len() == 2));
    let e = h.err(
        tok(1, "op-secret"),
        Command::ReportRelease { node: n0, release: t0, report: ReleaseReport::Erased { verified: 1, failed: 0 } },
    );
    assert_eq!(e.code, ErrorCode::BadRequest);
    for (n, task) in &all {
        report(&mut h, *n, task.id, ReleaseReport::Erased { verified: 2, failed: 0 });
    }
    // Every replica is verified zero, but voter 2 has not purged past the delete's shred.
    let er = h.op(Command::GetErasure { volume: vid });
    assert_eq!((er["replicas_erased"].as_u64(), er["extents_verified"].as_u64()), (Some(5), Some(10)));
    assert_eq!(er["state"], "erasing");
    let epoch = h.state().root_epoch;
    h.run(Credential::System, Command::ReportPurge { meta_node: 1, root_epoch: epoch, voters: vec![1, 2] });
    assert_eq!(h.op(Command::GetErasure { volume: vid })["state"], "erasing");
    h.run(Credential::System, Command::ReportPurge { meta_node: 2, root_epoch: epoch, voters: vec![1, 2] });
    let er = h.op(Command::GetErasure { volume: vid });
    assert_eq!(er["state"], "complete");
    let rec = h.state().audit.records.iter().rev().find(|r| r.action == "volume.erased").expect("audit record");
    assert!(rec.object.contains(&format!("vol-{vid}")), "{}", rec.object);
    assert!(work_of(&mut h, n0).is_empty(), "nothing left to do");
    // A client cannot forge a purge report.
    let e = h.err(tok(1, "op-secret"), Command::ReportPurge { meta_node: 3, root_epoch: epoch, voters: vec![] });
    assert_eq!(e.code, ErrorCode::Forbidden);
}

#[test]
fn drain_moves_replicas_without_dropping_below_r_then_decommission_certifies() {
    use slate_protocol::ops::{DecommissionReport, EraseSummary, MoveReport};
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let nodes = [h.node("n1", "z/r/h1"), h.node("n2", "z/r/h2"), h.node("n3", "z/r/h3")];
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", 3 * GIB).unwrap();
    let victim = nodes[0];
    let held = h.state().volumes[&vid].segments.iter().filter(|s| s.replicas.iter().any(|r| r.node == victim)).count();
    assert!(held > 0);
    // Decommission of a disk that holds replicas: refused, nothing changes.
    let disk = h.state().disks.values().find(|d| d.node == victim).unwrap().id;
    let before = serde_json::to_vec(&h.state().disks).unwrap();
    let e = h.err(tok(1, "op-secret"), Command::DecommissionDisk { disk });
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(serde_json::to_vec(&h.state().disks).unwrap(), before);

    h.op(Command::DrainNode { node: victim });
    assert_eq!(h.err(tok(1, "op-secret"), Command::DrainNode { node: victim }).code, ErrorCode::Conflict);
    // A second node cannot be drained: only one domain would be left for R=2.
    assert_eq!(h.err(tok(1, "op-secret"), Command::DrainNode { node: nodes[1] }).code, ErrorCode::Unsatisfiable);
    let mut rounds = 0;
    while h.state().drain_due() {
        rounds += 1;
        assert!(rounds < 20, "the drain does not finish");
        h.run(Credential::System, Command::DrainStep);
        // Every segment keeps R in-sync members throughout.
        for s in &h.state().volumes[&vid].segments {
            assert!(s.replicas.iter().filter(|r| r.state == ReplicaState::InSync).count() >= 2, "{s:?}");
        }
        // The volume is detached: the targets' movers copy and report.
        let moves: Vec<_> = h.state().moves.values().cloned().collect();
        for m in moves {
            let body = h.op(Command::Heartbeat { node: m.to });
            let tasks = body["work"]["copies"].as_array().cloned().unwrap_or_default();
            let task = tasks.iter().find(|c| c["id"] == m.id).expect("a copy task for the move's target");
            let generation = task["generation"].as_u64().unwrap();
            h.op(Command::ReportMove {
                node: m.to,
                id: m.id,
                report: MoveReport::Copied { blocks_copied: 1, generation },
            });
        }
    }
    assert_eq!(h.state().replicas_on(victim), 0);
    assert_eq!(h.state().nodes[&victim].drain.as_ref().unwrap().replicas_moved, held as u64);
    let moved = h
        .state()
        .releases
        .values()
        .filter(|r| r.node == victim && r.reason == slate_protocol::ops::ReleaseReason::ReplicaMoved)
        .count();
    assert_eq!(moved, held, "every moved replica is queued for release");

    // Decommission: the node reports a verified erase; the certificate's hash is audited.
    h.op(Command::DecommissionDisk { disk });
    let work = h.op(Command::Heartbeat { node: victim });
    assert_eq!(work["work"]["decommission"]["disk"], disk);
    let erase = EraseSummary {
        device_path: "/dev/x".into(),
        device_kind: "block_device".into(),
        size_bytes: 1 << 40,
        identity: std::collections::BTreeMap::new(),
        method: "blkzeroout".into(),
        technique: "zeros".into(),
        bytes_written: 1 << 40,
        bytes_verified: 1 << 40,
        mismatched_bytes: 0,
        first_mismatch_offset: None,
        started_ms: 1,
        finished_ms: 2,
        tool: "slate-node".into(),
        tool_version: "0".into(),
    };
    // A report that verified less than the whole device does not certify.
    let short = EraseSummary { bytes_verified: 1 << 39, ..erase.clone() };
    let e = h.err(
        tok(1, "op-secret"),
        Command::ReportDecommission { disk, report: DecommissionReport::Done { erase: short } },
    );
    assert_eq!(e.code, ErrorCode::Conflict);
    // The failed attempt is recorded and shown; a later complete report certifies.
    assert_eq!(h.state().disks[&disk].decommission.as_ref().unwrap().stage, "failed");
    h.op(Command::ReportDecommission { disk, report: DecommissionReport::Done { erase } });
    assert_eq!(h.state().disks[&disk].state, DiskState::Decommissioned);
    assert_eq!(h.state().nodes[&victim].state, NodeState::Decommissioned);
    let cert = h.op(Command::GetCertificate { disk });
    let sha = cert["sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha, slate_protocol::certificate::body_sha256(&cert["certificate"]));
    assert!(h.state().audit.records.iter().any(|r| r.object.contains(&sha)), "certificate hash audited");
    assert!(audit::verify(&h.state().audit.records).ok);
}

#[test]
fn detached_snapshot_is_frozen_by_every_node_and_blocks_a_writer_meanwhile() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let nodes = [h.node("n1", "z/r/h1"), h.node("n2", "z/r/h2"), h.node("n3", "z/r/h3")];
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", 3 * GIB).unwrap();
    let s = h.op(Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: "s1".into() } });
    assert_eq!(s["state"], "pending");
    let sid = s["id"].as_u64().unwrap();
    let attach = |h: &mut Harness| {
        h.run(
            tok(1, "op-secret"),
            Command::Attach {
                volume: vid,
                req: AttachRequest {
                    mode: AttachMode::ReadWrite,
                    host: "h".into(),
                    force: false,
                    insecure_plaintext_nbd: false,
                },
            },
        )
    };
    match attach(&mut h) {
        Response::Err(r) => assert_eq!(r.code, ErrorCode::Unavailable, "{r:?}"),
        Response::Ok { .. } => panic!("a writer attached while the nodes freeze"),
    }
    let holders: Vec<u64> = nodes
        .iter()
        .copied()
        .filter(|n| h.state().volumes[&vid].segments.iter().any(|s| s.replicas.iter().any(|r| r.node == *n)))
        .collect();
    for (i, n) in holders.iter().enumerate() {
        let w = h.op(Command::Heartbeat { node: *n });
        assert_eq!(w["work"]["freezes"][0]["snapshot"], sid);
        let req = SnapshotFrozenRequest { node: Some(*n) };
        h.op(Command::SnapshotFrozen { volume: vid, snapshot: sid, req });
        let state = h.state().volumes[&vid].snapshots[&sid].state;
        let last = i + 1 == holders.len();
        assert_eq!(state == SnapshotState::Ready, last, "ready only when every holder froze");
    }
    assert!(matches!(attach(&mut h), Response::Ok { .. }), "the writer attaches once the snapshot is ready");
    // The attachment's layout polls are not audited (they come every few seconds).
    let records = h.state().audit.records.len();
    h.op(Command::GetVolume { volume: vid });
    assert_eq!(h.state().audit.records.len(), records, "a layout poll grew the audit chain");
    // With a writer attached, nodes no longer freeze: its client does.
    let s2 = h.op(Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: "s2".into() } });
    let w = h.op(Command::Heartbeat { node: holders[0] });
    assert!(w["work"]["freezes"].as_array().is_none_or(Vec::is_empty), "{w}");
    let s2id = s2["id"].as_u64().unwrap();
    h.op(Command::SnapshotFrozen { volume: vid, snapshot: s2id, req: SnapshotFrozenRequest { node: None } });
    assert_eq!(h.state().volumes[&vid].snapshots[&s2id].state, SnapshotState::Ready);
}

#[test]
fn backups_resume_complete_and_restore_with_the_source_key_until_it_is_shredded() {
    use super::backups::BackupState;
    let mut h = Harness::new();
    let t = h.tenant("acme");
    for (n, d) in [("n1", "z/r/h1"), ("n2", "z/r/h2"), ("n3", "z/r/h3")] {
        h.node(n, d);
    }
    let (vid, dek) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let snap = |h: &mut Harness, name: &str| {
        let s = h.op(Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: name.into() } });
        let sid = s["id"].as_u64().unwrap();
        h.op(Command::SnapshotFrozen { volume: vid, snapshot: sid, req: SnapshotFrozenRequest { node: None } });
        sid
    };
    let s1 = snap(&mut h, "s1");
    let begin = |h: &mut Harness, snapshot: u64, parent: Option<u64>| {
        h.run(
            tok(1, "op-secret"),
            Command::BeginBackup {
                volume: vid,
                req: BeginBackupRequest { snapshot, target: "file:///backups".into(), parent },
            },
        )
    };
    let Response::Ok { body: b1, .. } = begin(&mut h, s1, None) else { panic!("begin refused") };
    assert_eq!(b1["key_fingerprint"], dek.fingerprint());
    // A second begin of the same unfinished backup resumes it.
    let Response::Ok { body: again, .. } = begin(&mut h, s1, None) else { panic!("resume refused") };
    assert_eq!(again["id"], b1["id"]);
    let b1 = b1["id"].as_u64().unwrap();
    // An incremental needs a complete base.
    let s2 = snap(&mut h, "s2");
    assert!(matches!(begin(&mut h, s2, Some(b1)), Response::Err(r) if r.code == ErrorCode::Conflict));
    let done = CompleteBackupRequest {
        manifest_sha256: "ab".repeat(32),
        blocks_changed: 1,
        blocks_stored: 1,
        bytes_stored: 4100,
    };
    h.op(Command::CompleteBackup { backup: b1, req: done });
    assert_eq!(h.state().backups[&b1].state, BackupState::Complete);
    assert!(matches!(begin(&mut h, s2, Some(b1)), Response::Ok { .. }));
    assert!(matches!(begin(&mut h, s1, Some(b1)), Response::Err(r) if r.code == ErrorCode::BadRequest));
    // Restore: a new volume under a fresh key of its own; the reply carries the source's key.
    let restore = |h: &mut Harness, name: &str| {
        let (wrapped_dek, tenant_key_version, _) = h.wrap_dek(t);
        h.run(
            tok(1, "op-secret"),
            Command::RestoreVolume {
                req: RestoreVolumeRequest {
                    backup: b1,
                    name: name.into(),
                    size_bytes: GIB,
                    tenant: None,
                    replicas: None,
                },
                wrapped_dek,
                tenant_key_version,
            },
        )
    };
    let Response::Ok { body: r, dek_hex, release } = restore(&mut h, "r1") else { panic!("restore refused") };
    assert!(dek_hex.is_none(), "apply must not unwrap the source's key");
    assert_eq!(release.unwrap().open(h.root()).unwrap().expose(), dek.expose(), "the source's key");
    let rid = r["id"].as_u64().unwrap();
    let tk = h.root().unwrap_tenant_key(&h.state().tenants[&t].wrapped_key).unwrap();
    let restored = tk.unwrap_dek(&h.state().volumes[&rid].wrapped_dek).unwrap();
    assert_ne!(restored.fingerprint(), dek.fingerprint(), "a restored volume never shares its source's key");
    assert!(h.state().restores.contains_key(&rid));
    // The same restore again (after kill -9) resumes it; another name that is taken is refused.
    let Response::Ok { body: again, .. } = restore(&mut h, "r1") else { panic!("resume refused") };
    assert_eq!((again["id"].as_u64(), again["restore"]["backup"].as_u64()), (Some(rid), Some(b1)));
    assert!(matches!(restore(&mut h, "v"), Response::Err(r) if r.code == ErrorCode::Conflict), "name taken");
    // Deleting the source shreds its key: the backup can no longer be restored.
    h.op(Command::DeleteVolume { volume: vid, force: false });
    match restore(&mut h, "r2") {
        Response::Err(r) => assert!(r.message.contains("key destroyed"), "{}", r.message),
        Response::Ok { .. } => panic!("restored a backup of a deleted volume"),
    }
    assert!(h.state().backups.contains_key(&b1), "backup records outlive their volume");
    assert!(!h.state().volumes.values().any(|v| v.name == "r2"), "a refused restore leaves no volume");
}

#[test]
fn the_backup_right_snapshots_and_reads_but_never_writes() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    for i in 1..=3 {
        h.node(&format!("n{i}"), &format!("z/r/h{i}"));
    }
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let (bk, bkt) = h.principal("backup-agent", Role::Host, None, "b");
    let (sn, snt) = h.principal("snapper", Role::Host, None, "s");
    h.op(Command::CreateGrant(CreateGrantRequest { principal: bk, volume: vid, access: Access::Backup }));
    h.op(Command::CreateGrant(CreateGrantRequest { principal: sn, volume: vid, access: Access::Snapshot }));
    let snap =
        h.ok(tok(bkt, "b"), Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: "s1".into() } });
    let sid = snap["id"].as_u64().unwrap();
    h.op(Command::SnapshotFrozen { volume: vid, snapshot: sid, req: SnapshotFrozenRequest { node: None } });
    let attach = |mode| Command::Attach {
        volume: vid,
        req: AttachRequest { mode, host: "h".into(), force: false, insecure_plaintext_nbd: false },
    };
    let ro = h.ok(tok(bkt, "b"), attach(AttachMode::ReadOnly));
    assert_eq!(ro["claims"]["rights"], 1, "read only");
    assert_eq!(h.err(tok(bkt, "b"), attach(AttachMode::ReadWrite)).code, ErrorCode::Forbidden);
    let begin = |snapshot| Command::BeginBackup {
        volume: vid,
        req: BeginBackupRequest { snapshot, target: "s3://b/p".into(), parent: None },
    };
    h.ok(tok(bkt, "b"), begin(sid));
    // The snapshot right alone takes snapshots, not backups.
    assert_eq!(h.err(tok(snt, "s"), begin(sid)).code, ErrorCode::Forbidden);
    // A target with credentials in it is refused (they would be recorded).
    let bad = Command::BeginBackup {
        volume: vid,
        req: BeginBackupRequest { snapshot: sid, target: "s3://key:secret@b/p".into(), parent: None },
    };
    assert_eq!(h.err(tok(bkt, "b"), bad).code, ErrorCode::BadRequest);
}

mod audit_retention;
mod clones;
mod keys_and_grants;
mod node_principals;
