//! Acceptance 6 (issue 5): isolation end to end.
//!
//! Management plane: a host principal of the same tenant without a grant, and
//! a host of another tenant, cannot attach the demo volume (`slate attach`
//! exits non-zero with a clear message, by name or id, read-write, `--force`
//! or read-only), and their attempts fence nobody. Once granted read-only
//! access, the first host can attach read-only (the refusal was about the grant).
//!
//! Data plane: with a capability for volume A (demo), a client asking a
//! storage node for volume B's blocks gets `WrongVolume`; a node outside A's
//! scope refuses the session (`WrongNode`); a capability edited to name B
//! fails its signature (`Forged`). B's own capability reads the same block,
//! so the refusals are about the capability.

mod e2e_support;

use e2e_support::{read_raw, runtime, segments};
use slate_dataplane::client::NodeClient;
use slate_protocol::{BlockIndex, ErrorKind, Generation, Reply, Request, SignedCapability, Target, VolumeId};
use slate_tests::cluster::{qemu_io_ok, qemu_io_ok_with, wait_for_unix_socket, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Runs `slate --token-file TOKEN attach ARGS --nbd-unix SOCK`; expects it to exit non-zero within a minute.
/// Returns its stderr.
fn attach_refused(cluster: &Cluster, token: &Path, args: &[&str]) -> String {
    let sock = cluster.scratch().join("refused.sock");
    let log_path = cluster.scratch().join("refused-attach.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut cmd = cluster.slate();
    cmd.arg("--token-file").arg(token).arg("attach").args(args).arg("--nbd-unix").arg(&sock);
    cmd.stdout(log.try_clone().expect("dup")).stderr(log);
    let t = Instant::now();
    let mut p = ProcessGuard::spawn("slate attach (refused)", &mut cmd).expect("spawn slate attach");
    while p.is_alive() && t.elapsed() < Duration::from_mins(1) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive = p.is_alive();
    let status = p.terminate();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!alive, "slate attach {args:?} without a grant is still running (serving?) after a minute:\n{text}");
    assert!(status.is_some_and(|s| !s.success()), "slate attach {args:?} without a grant succeeded:\n{text}");
    let msg = text.lines().last().unwrap_or_default().to_owned();
    eprintln!("refused in {:.1} s: slate attach {args:?}: {msg}", t.elapsed().as_secs_f64());
    msg
}

fn is_clear_refusal(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    ["may not", "forbidden", "not visible", "no volume", "not found", "denied", "permission"]
        .iter()
        .any(|w| m.contains(w))
}

#[test]
fn no_grant_no_attach_and_capabilities_are_per_volume() {
    let cluster = Cluster::start("e2e-isolation", UpOptions::default());
    let demo = cluster.volume_show("demo");
    let tenant = demo["tenant"].as_u64().expect("tenant");
    let demo_id = demo["id"].as_u64().expect("id").to_string();
    let generation = demo["generation"].clone();

    // ----- management plane -----
    let (other_id, other_token) = cluster.host_principal("other-host", tenant);
    for args in [vec!["demo"], vec![demo_id.as_str()], vec!["demo", "--force"], vec!["demo", "--read-only"]] {
        let msg = attach_refused(&cluster, &other_token, &args);
        assert!(is_clear_refusal(&msg), "unclear refusal for {args:?}: {msg}");
    }
    let t2 = cluster.slate_json(&["tenant", "create", "other-tenant"]);
    let t2 = t2["id"].as_u64().expect("tenant id");
    let (_, stranger_token) = cluster.host_principal("stranger-host", t2);
    for args in [vec!["demo"], vec![demo_id.as_str(), "--force"], vec![demo_id.as_str(), "--read-only"]] {
        let msg = attach_refused(&cluster, &stranger_token, &args);
        assert!(is_clear_refusal(&msg), "unclear refusal for {args:?}: {msg}");
    }
    // Nobody was fenced: the generation is unchanged and slate up's client still writes.
    let after = cluster.volume_show("demo");
    assert_eq!(after["generation"], generation, "a refused attach moved the generation");
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x5e 0 64k".into(), "read -P 0x5e 0 64k".into()]);

    // Positive control: with a read-only grant the same host attaches read-only.
    cluster.slate_json(&[
        "grant",
        "create",
        "--principal",
        &other_id.to_string(),
        "--volume",
        "demo",
        "--access",
        "read_only",
    ]);
    let sock = cluster.scratch().join("granted.sock");
    let mut cmd = cluster.slate();
    cmd.arg("--token-file").arg(&other_token).args(["attach", "demo", "--read-only", "--nbd-unix"]).arg(&sock);
    let mut granted = ProcessGuard::spawn("slate attach (granted)", &mut cmd).expect("spawn");
    assert!(wait_for_unix_socket(&sock, Duration::from_mins(1)), "the granted read-only attach did not come up");
    qemu_io_ok_with(&["-r"], &format!("nbd+unix:///demo?socket={}", sock.display()), &["read -P 0x5e 0 64k".into()]);
    assert!(granted.terminate().is_some_and(|s| s.success()), "the read-only attach did not stop cleanly");

    // ----- data plane -----
    // Volume B, with data written through its own attachment.
    let b = cluster.slate_json(&["volume", "create", "vol-b", "--size", "64M", "--tenant", &tenant.to_string()]);
    let b_id = b["id"].as_u64().expect("volume id");
    let host = cluster.slate_json(&["token", "list"]);
    let demo_host = host.as_array().expect("principals").iter().find(|p| p["name"] == "demo-host").expect("demo-host");
    cluster.slate_json(&[
        "grant",
        "create",
        "--principal",
        &demo_host["id"].to_string(),
        "--volume",
        "vol-b",
        "--access",
        "read_write",
    ]);
    let sock_b = cluster.scratch().join("b.sock");
    let mut cmd = cluster.slate();
    cmd.arg("--token-file").arg(cluster.host_token_file()).args(["attach", "vol-b", "--nbd-unix"]).arg(&sock_b);
    let mut attach_b = ProcessGuard::spawn("slate attach vol-b", &mut cmd).expect("spawn");
    assert!(wait_for_unix_socket(&sock_b, Duration::from_mins(1)), "vol-b's attach did not come up");
    qemu_io_ok(&format!("nbd+unix:///vol-b?socket={}", sock_b.display()), &["write -P 0xb0 0 1M".into()]);
    assert!(attach_b.terminate().is_some_and(|s| s.success()), "vol-b's attach did not stop cleanly");

    let view_b = cluster.volume_show("vol-b");
    let b_target = Target { volume: VolumeId(b_id), generation: Generation(view_b["generation"].as_u64().unwrap()) };
    let b_nodes: Vec<(u64, String)> = segments(&view_b)[0].replicas.iter().map(|r| (r.0, r.1.clone())).collect();
    let all_nodes: Vec<(u64, String)> = cluster.nodes().iter().map(|n| (n.id, n.addr.clone())).collect();

    let (a_att, a_token) = cluster.read_only_capability(demo["id"].as_u64().unwrap());
    let (b_att, b_token) = cluster.read_only_capability(b_id);
    let a_cap = SignedCapability::from_token(&a_token).expect("capability");
    let b_cap = SignedCapability::from_token(&b_token).expect("capability");
    eprintln!("A's capability: {:?}; B on nodes {b_nodes:?}", a_cap.claims);

    let dp = e2e_support::data_plane(&cluster);
    let rt = runtime();
    rt.block_on(async {
        let mut refused = 0;
        for (node, addr) in &all_nodes {
            let sa: SocketAddr = addr.parse().unwrap();
            let in_scope = a_cap.claims.nodes.iter().any(|n| n.0 == *node);
            match NodeClient::connect_with(&dp, sa, a_cap.clone()).await {
                Err(e) => {
                    assert!(!in_scope, "node-{node} refused A's capability: {e}");
                    assert_eq!(e.kind(), Some(ErrorKind::WrongNode), "node-{node} out of scope: {e}");
                    eprintln!("node-{node}: A's capability refused at hello: {e}");
                }
                Ok(c) => {
                    assert!(in_scope, "node-{node} accepted a capability that does not name it");
                    for req in [
                        Request::Read { target: b_target, start: BlockIndex(0), count: 1 },
                        Request::Allocated {
                            target: b_target,
                            range: slate_protocol::BlockRange { start: BlockIndex(0), count: 256 },
                        },
                        Request::WriteIntents { target: b_target },
                    ] {
                        let e = c.request(req.clone()).await.expect_err("B's blocks served to A's capability");
                        assert_eq!(e.kind(), Some(ErrorKind::WrongVolume), "node-{node}: {e}");
                        refused += 1;
                    }
                    // The session still serves A.
                    read_raw(&c, 0, 16).await.unwrap_or_else(|e| panic!("node-{node} no longer serves A: {e}"));
                    eprintln!("node-{node}: B's blocks refused to A's capability (WrongVolume)");
                }
            }
            // A capability edited to name B does not verify.
            let mut forged = a_cap.clone();
            forged.claims.volume = VolumeId(b_id);
            forged.claims.nodes = all_nodes.iter().map(|(n, _)| slate_protocol::NodeId(*n)).collect();
            let e = NodeClient::connect_with(&dp, sa, forged).await.expect_err("a forged capability was accepted");
            assert_eq!(e.kind(), Some(ErrorKind::Forged), "node-{node}: {e}");
        }
        assert!(refused > 0, "no node holding A was asked for B's blocks");
        // Positive control: B's own capability reads the block from B's replicas.
        for (node, addr) in &b_nodes {
            let c = NodeClient::connect_with(&dp, addr.parse().unwrap(), b_cap.clone()).await.expect("B's capability");
            match c.request(Request::Read { target: b_target, start: BlockIndex(0), count: 1 }).await {
                Ok(Reply::Data { written, .. }) => {
                    assert!(slate_protocol::message::bit(&written, 0), "node-{node}: B's block 0 is not written");
                }
                other => panic!("node-{node}: B's own capability could not read: {other:?}"),
            }
        }
    });
    cluster.detach(demo["id"].as_u64().unwrap(), a_att);
    cluster.detach(b_id, b_att);
}
