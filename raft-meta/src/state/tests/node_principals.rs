//! Node principals: a storage node's own credential, bound to its node id, good for that
//! node's heartbeats and reports and nothing else. Hosts no longer send node traffic.

use super::*;
use slate_protocol::ops::{DecommissionReport, MoveReport, ReleaseReport, RepairSourceRequest, ScrubReport};

const GIB: u64 = 1 << 30;

fn create_req(name: &str, role: Role, tenant: Option<u64>, node: Option<u64>) -> Command {
    Command::CreatePrincipal {
        req: CreatePrincipalRequest {
            name: name.into(),
            role,
            tenant,
            node,
            not_before_ms: None,
            not_after_ms: None,
            token_expires_ms: None,
        },
        token_secret_sha256: secret_hash(name),
        token_id: None,
    }
}

/// A node principal for `node`; its token's secret is its name.
fn node_principal(h: &mut Harness, name: &str, node: u64) -> (u64, Credential) {
    let v = h.op(create_req(name, Role::Node, None, Some(node)));
    assert_eq!(v["principal"]["role"], "node");
    assert_eq!(v["principal"]["node"], node);
    (v["principal"]["id"].as_u64().unwrap(), tok(v["token_id"].as_u64().unwrap(), name))
}

/// The node-traffic commands, each naming `node` (or, for the decommission report, its disk).
fn node_traffic(h: &Harness, node: u64, vid: u64, sid: u64) -> Vec<Command> {
    let disk = h.state().disks.values().find(|d| d.node == node).unwrap().id;
    vec![
        Command::Heartbeat { node },
        Command::ReportRelease { node, release: 1, report: ReleaseReport::Released { extents: vec![] } },
        Command::ReportMove { node, id: 1, report: MoveReport::Progress { done_blocks: 0, total_blocks: 1 } },
        Command::ReportScrub { node, report: ScrubReport::default() },
        Command::RepairSource { node, req: RepairSourceRequest { volume: vid, segment: 0 } },
        Command::SnapshotFrozen { volume: vid, snapshot: sid, req: SnapshotFrozenRequest { node: Some(node) } },
        Command::ReportDecommission {
            disk,
            report: DecommissionReport::Progress { stage: "x".into(), bytes_done: 0, bytes_total: 1 },
        },
    ]
}

fn denials_of(h: &Harness, principal: u64) -> usize {
    let who = format!("principal:{principal}(");
    h.state().audit.records.iter().filter(|r| r.actor.starts_with(&who) && r.result.starts_with("denied")).count()
}

#[test]
fn only_operators_create_node_principals_and_only_for_registered_nodes() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let n1 = h.node("n1", "z/r/h1");
    let bad = |h: &mut Harness, cmd: Command| h.err(tok(1, "op-secret"), cmd).code;
    assert_eq!(bad(&mut h, create_req("a", Role::Node, None, None)), ErrorCode::BadRequest, "no node");
    assert_eq!(bad(&mut h, create_req("b", Role::Node, Some(t), Some(n1))), ErrorCode::BadRequest, "tenant");
    assert_eq!(bad(&mut h, create_req("c", Role::Node, None, Some(999))), ErrorCode::NotFound, "unknown node");
    assert_eq!(bad(&mut h, create_req("d", Role::Host, None, Some(n1))), ErrorCode::BadRequest, "host bound");
    assert_eq!(bad(&mut h, create_req("e", Role::Operator, None, Some(n1))), ErrorCode::BadRequest);
    // A tenant admin and a host cannot make one.
    let (_, at) = h.principal("admin", Role::TenantAdmin, Some(t), "sa");
    let (_, ht) = h.principal("host", Role::Host, None, "sh");
    for c in [tok(at, "sa"), tok(ht, "sh")] {
        assert_eq!(h.err(c, create_req("f", Role::Node, None, Some(n1))).code, ErrorCode::Forbidden);
    }
    assert!(!h.state().principals.values().any(|p| p.role == Role::Node));
    let (p, cred) = node_principal(&mut h, "node-1", n1);
    assert_eq!(h.state().principals[&p].node, Some(n1));
    let me = h.ok(cred, Command::WhoAmI);
    assert_eq!((me["role"].as_str(), me["node"].as_u64()), (Some("node"), Some(n1)));
    // The guard's table carries the binding.
    let entry = h.state().auth_table().into_values().find(|e| e.principal == p).unwrap();
    assert_eq!((entry.role, entry.node), (Role::Node, Some(n1)));
}

#[test]
fn a_node_principal_sends_its_own_nodes_traffic_and_nothing_else() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let nodes = [h.node("n1", "z/r/h1"), h.node("n2", "z/r/h2"), h.node("n3", "z/r/h3")];
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", 3 * GIB).unwrap();
    let sid = h.op(Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: "s".into() } })["id"]
        .as_u64()
        .unwrap();
    // The node holding segment 0's first replica, and another one.
    let own = h.state().volumes[&vid].segments[0].replicas[0].node;
    let other = nodes.iter().copied().find(|n| *n != own).unwrap();
    let (p, cred) = node_principal(&mut h, "node-own", own);

    // Its own node: every call passes authorization (what follows is the handler's answer).
    let before = h.state().nodes[&own].last_heartbeat_ms;
    let beat = h.ok(cred.clone(), Command::Heartbeat { node: own });
    assert_eq!(beat["node"], own, "{beat}");
    assert!(h.state().nodes[&own].last_heartbeat_ms > before);
    assert_eq!(beat["work"]["freezes"][0]["snapshot"], sid, "its work comes with the heartbeat");
    let src =
        h.ok(cred.clone(), Command::RepairSource { node: own, req: RepairSourceRequest { volume: vid, segment: 0 } });
    assert_eq!(src["volume"], vid);
    h.ok(cred.clone(), Command::ReportScrub { node: own, report: ScrubReport::default() });
    h.ok(
        cred.clone(),
        Command::SnapshotFrozen { volume: vid, snapshot: sid, req: SnapshotFrozenRequest { node: Some(own) } },
    );
    assert!(h.state().volumes[&vid].snapshots[&sid].frozen_nodes.contains(&own));
    h.ok(cred.clone(), Command::ReportSecurityEvent { kind: "forged-capability".into() });
    for cmd in node_traffic(&h, own, vid, sid) {
        if let Response::Err(r) = h.run(cred.clone(), cmd.clone()) {
            assert_ne!(r.code, ErrorCode::Forbidden, "{cmd:?} on its own node: {r:?}");
        }
    }
    assert_eq!(denials_of(&h, p), 0);

    // Another node's: refused and audited, and nothing changes but the audit chain.
    let mut refused = 0;
    for cmd in node_traffic(&h, other, vid, sid) {
        let mut expect = h.state().clone();
        let r = h.err(cred.clone(), cmd.clone());
        assert_eq!(r.code, ErrorCode::Forbidden, "{cmd:?} for another node: {r:?}");
        refused += 1;
        assert_eq!(denials_of(&h, p), refused, "{cmd:?} refusal audited");
        let last = h.state().audit.records.last().unwrap().clone();
        assert!(
            last.result.contains(&format!("not node {other}")) || last.result.contains("is not on node"),
            "{last:?}"
        );
        expect.audit = h.state().audit.clone();
        expect.applied_index = h.state().applied_index;
        expect.last_time_ms = h.state().last_time_ms;
        assert_eq!(&expect, h.state(), "{cmd:?}: a refused call changed the state");
    }

    // Everything that is not node traffic: refused, whatever it names.
    let (w, ver, _) = h.wrap_dek(t);
    let disk = h.state().disks.values().find(|d| d.node == own).unwrap().id;
    let not_node_traffic = vec![
        Command::ListVolumes,
        Command::GetVolume { volume: vid },
        Command::Attach {
            volume: vid,
            req: AttachRequest {
                mode: AttachMode::ReadOnly,
                host: "h".into(),
                force: false,
                insecure_plaintext_nbd: false,
            },
        },
        Command::CreateVolume {
            tenant: t,
            req: CreateVolumeRequest {
                name: "x".into(),
                size_bytes: GIB,
                replicas: 2,
                tenant: Some(t),
                qos: Qos::default(),
                failure_domain_level: None,
            },
            wrapped_dek: w,
            tenant_key_version: ver,
        },
        Command::DeleteVolume { volume: vid, force: true },
        Command::ReportFailure { volume: vid, req: ReportFailureRequest { segment: 0, node: other } },
        Command::MarkInSync { volume: vid, req: MarkInSyncRequest { segment: 0, node: own } },
        Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: "n".into() } },
        Command::ListSnapshots { volume: vid },
        Command::SnapshotFrozen { volume: vid, snapshot: sid, req: SnapshotFrozenRequest { node: None } },
        Command::ListTenants,
        Command::GetTenant { tenant: t },
        Command::ListPrincipals,
        create_req("more", Role::Node, None, Some(own)),
        Command::CreateToken {
            principal: p,
            req: CreateTokenRequest::default(),
            secret_sha256: secret_hash("x"),
            token_id: None,
        },
        Command::ListTokens { principal: p },
        Command::CreateGrant(CreateGrantRequest { principal: p, volume: vid, access: Access::ReadOnly }),
        Command::ListGrants,
        Command::ListAudit { tenant: None, after_seq: None, limit: None },
        Command::VerifyAudit,
        Command::GetSettings,
        Command::ListNodes,
        Command::GetNode { node: own },
        Command::ListDisks,
        Command::SetNodeState { node: own, req: SetNodeStateRequest { state: NodeState::Active } },
        Command::DrainNode { node: own },
        Command::GetDrain { node: own },
        Command::DecommissionDisk { disk },
        Command::RequestScrub { node: own },
        Command::ListReleases { node: Some(own) },
        Command::ListErasures,
        Command::GetErasure { volume: vid },
        Command::ListMembers,
    ];
    for cmd in not_node_traffic {
        let r = h.err(cred.clone(), cmd.clone());
        assert_eq!(r.code, ErrorCode::Forbidden, "{cmd:?}: {r:?}");
        assert!(r.message.contains("may only send that node's heartbeats and reports"), "{cmd:?}: {r:?}");
        refused += 1;
        assert_eq!(denials_of(&h, p), refused, "{cmd:?} refusal audited");
    }
    assert!(!h.state().principals.values().any(|q| q.name == "more"));
    assert_eq!(h.state().tokens.values().filter(|k| k.principal == p).count(), 1);
    assert!(audit::verify(&h.state().audit.records).ok);
}

#[test]
fn hosts_no_longer_send_node_traffic_but_still_report_security_events() {
    let mut h = Harness::new();
    let t = h.tenant("acme");
    let nodes = [h.node("n1", "z/r/h1"), h.node("n2", "z/r/h2")];
    let (vid, _) = h.volume(tok(1, "op-secret"), t, "v", GIB).unwrap();
    let sid = h.op(Command::CreateSnapshot { volume: vid, req: CreateSnapshotRequest { name: "s".into() } })["id"]
        .as_u64()
        .unwrap();
    let (hp, ht) = h.principal("hv", Role::Host, Some(t), "sh");
    for cmd in node_traffic(&h, nodes[0], vid, sid) {
        let r = h.err(tok(ht, "sh"), cmd.clone());
        assert_eq!(r.code, ErrorCode::Forbidden, "{cmd:?} from a host: {r:?}");
    }
    assert_eq!(denials_of(&h, hp), 7);
    h.ok(tok(ht, "sh"), Command::ReportSecurityEvent { kind: "nbd-certificate-refused".into() });
    // Tenant principals cannot report security events; the operator still sends node traffic.
    let (_, mt) = h.principal("m", Role::TenantMember, Some(t), "sm");
    assert_eq!(
        h.err(tok(mt, "sm"), Command::ReportSecurityEvent { kind: "forged-capability".into() }).code,
        ErrorCode::Forbidden
    );
    h.op(Command::Heartbeat { node: nodes[1] });
}
