//! An operator drains a storage node under load, then decommissions its disk.
//!
//! The `slate up` cluster serves the demo volume (attached) while versioned
//! 4 KiB writes run at QD32 through NBD. `slate node drain node-N --wait`
//! moves every replica off node N; halfway, the metadata leader is killed with
//! kill -9. A second, detached volume on node N is moved by the nodes' own
//! mover. Afterwards: no write failed, no acknowledged write is lost, node N
//! holds nothing, every segment has R in-sync replicas in distinct domains,
//! and the moved replicas were released and zeroed. Then `slate disk
//! decommission --wait --certificate-out` overwrites and verifies the whole
//! disk file (every byte reads zero), the certificate verifies offline, a copy
//! with one byte changed does not, and its hash is in the audit chain. Bad
//! requests on the way are refused and change nothing.

use serde_json::Value;
use slate_tests::acked::{AckedOptions, AckedWriter};
use slate_tests::cluster::{kill9, nbd_unix_uri, qemu_io_ok, Cluster, ProcessEntry, UpOptions};
use slate_tests::disk::all_zero;
use slate_tests::ProcessGuard;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const SEGMENT_BLOCKS: u64 = 16384; // 64 MiB segments: the 256 MiB demo volume has four

/// Every segment of a volume: R in-sync replicas on distinct nodes and domains, none on `gone`.
fn check_placement(cluster: &Cluster, name: &str, gone: u64) {
    let v = cluster.volume_show(name);
    let r = v["replicas"].as_u64().unwrap_or(2) as usize;
    for s in v["segments"].as_array().expect("segments") {
        let reps = s["replicas"].as_array().expect("replicas");
        let nodes: BTreeSet<u64> = reps.iter().filter_map(|r| r["node"].as_u64()).collect();
        let domains: BTreeSet<&str> = reps.iter().filter_map(|r| r["failure_domain"].as_str()).collect();
        assert_eq!(reps.len(), r, "segment {} of {name}: {s}", s["index"]);
        assert!(reps.iter().all(|r| r["state"] == "in_sync"), "segment {} of {name} not in sync: {s}", s["index"]);
        assert_eq!((nodes.len(), domains.len()), (r, r), "segment {} of {name}: {s}", s["index"]);
        assert!(!nodes.contains(&gone), "segment {} of {name} still on node {gone}: {s}", s["index"]);
    }
}

fn attach(cluster: &Cluster, name: &str) -> (ProcessGuard, String) {
    let (p, sock) = cluster.attach_unix(name, &[], name);
    (p, nbd_unix_uri(name, &sock))
}

#[test]
fn drain_under_load_then_decommission_with_certificate() {
    let mut cluster =
        Cluster::start("slate-e2e-drain", UpOptions { segment_blocks: Some(SEGMENT_BLOCKS), ..UpOptions::default() });
    let nodes = cluster.nodes();
    let demo = cluster.volume_show("demo");
    // Drain the node holding the most demo replicas.
    let count = |n: u64| {
        demo["segments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["replicas"].as_array().into_iter().flatten().any(|r| r["node"] == n))
            .count()
    };
    let victim: ProcessEntry = nodes.iter().max_by_key(|n| count(n.id)).cloned().expect("a node");
    let vname = format!("node-{}", victim.id);
    eprintln!("draining {vname}, which holds {} of demo's segments", count(victim.id));

    // A detached volume with data, placed on the victim too (3 nodes, R=2: most segments are).
    let tenant = demo["tenant"].as_u64().expect("tenant").to_string();
    cluster.slate_json(&["volume", "create", "cold", "--size", &(128u64 << 20).to_string(), "--tenant", &tenant]);
    let (mut att, uri) = attach(&cluster, "cold");
    let cmds: Vec<String> = (0..8).map(|i| format!("write -P {} {}M 16M", 0x30 + i, i * 16)).collect();
    qemu_io_ok(&uri, &cmds);
    att.terminate();

    // Bad input first: each refused, nothing changed.
    cluster.slate_refused(&["node", "drain", "node-9"], "no storage node");
    cluster.slate_refused(&["disk", "decommission", &vname], "still holds");
    let before = cluster.slate_json(&["node", "list"]);

    let w = AckedWriter::start(&cluster.nbd_socket(), "demo", AckedOptions::new(0, 65_536, 8))
        .expect("start the acked writer");
    assert!(w.wait_for_progress(2_000, Duration::from_mins(2)), "no write progress before the drain");
    let t = Instant::now();
    let mut drain = cluster.slate();
    drain.args(["node", "drain", &vname, "--wait"]);
    let log = std::fs::File::create(cluster.scratch().join("drain.log")).expect("log");
    drain.stdout(log.try_clone().expect("dup")).stderr(log);
    let mut drainer = ProcessGuard::spawn("slate node drain", &mut drain).expect("spawn drain");
    // A second drain of the same node is refused while the first runs.
    std::thread::sleep(Duration::from_secs(2));
    cluster.slate_refused(&["node", "drain", &vname], "already being drained");
    // Draining a second node would leave R=2 segments one domain: refused.
    let other = nodes.iter().find(|n| n.id != victim.id).expect("other node");
    cluster.slate_refused(&["node", "drain", &format!("node-{}", other.id)], "would leave no node");

    // Halfway: kill the metadata leader.
    loop {
        let d = cluster.slate_json(&["node", "show", &vname]);
        if d["drain"]["replicas_moved"].as_u64().unwrap_or(0) >= 1 || t.elapsed() > Duration::from_mins(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let leader = cluster.meta_leader();
    eprintln!("killing the metadata leader (meta {}) {:.1} s into the drain", leader.id, t.elapsed().as_secs_f64());
    kill9(leader.pid);

    let deadline = Instant::now() + Duration::from_mins(6);
    while drainer.is_alive() {
        assert!(
            Instant::now() < deadline,
            "the drain did not finish: {}",
            std::fs::read_to_string(cluster.scratch().join("drain.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = drainer.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "slate node drain --wait failed: {}",
        std::fs::read_to_string(cluster.scratch().join("drain.log")).unwrap_or_default()
    );
    eprintln!("drained in {:.1} s", t.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    let report = w.stop();
    let check = report.verify(&cluster.nbd_socket(), "demo").expect("read back");
    eprintln!(
        "{} writes acknowledged, {} failed; {} blocks checked, {} lost",
        report.acked,
        report.failed,
        check.checked,
        check.lost.len()
    );
    assert!(report.connection_error.is_none(), "the NBD connection broke: {:?}", report.connection_error);
    assert_eq!(report.failed, 0, "writes failed: {:?}", report.failures);
    assert!(check.lost.is_empty(), "acknowledged writes lost: {:?}", &check.lost[..check.lost.len().min(5)]);

    let show = cluster.slate_json(&["node", "show", &vname]);
    assert_eq!(show["replicas"], 0, "{show:#}");
    assert_eq!(show["drain"]["state"], "complete", "{show:#}");
    check_placement(&cluster, "demo", victim.id);
    check_placement(&cluster, "cold", victim.id);
    let (mut att, uri) = attach(&cluster, "cold");
    let cmds: Vec<String> = (0..8).map(|i| format!("read -P {} {}M 16M", 0x30 + i, i * 16)).collect();
    qemu_io_ok(&uri, &cmds);
    att.terminate();
    // The moved replicas were released and verified zero.
    let t = Instant::now();
    loop {
        let rel = cluster.slate_json(&["erasure", "releases", "--node", &victim.id.to_string()]);
        let moved: Vec<&Value> =
            rel.as_array().into_iter().flatten().filter(|r| r["reason"] == "replica_moved").collect();
        if !moved.is_empty() && moved.iter().all(|r| r["state"] == "erased") {
            break;
        }
        assert!(t.elapsed() < Duration::from_mins(2), "moved replicas not erased: {rel:#}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = before;

    // Decommission the drained disk.
    let cert = cluster.scratch().join("erase-certificate.json");
    let out = cluster.run_slate(&[
        "disk",
        "decommission",
        &vname,
        "--wait",
        "--certificate-out",
        cert.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "decommission failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(all_zero(&victim.data), "the decommissioned disk file is not all zero");
    let ok = cluster.run_slate(&["certificate", "verify", cert.to_str().expect("path")]);
    assert!(ok.status.success(), "certificate does not verify: {}", String::from_utf8_lossy(&ok.stderr));
    eprintln!("{}", String::from_utf8_lossy(&ok.stdout));
    let text = std::fs::read_to_string(&cert).expect("certificate");
    let doc: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(doc["certificate"]["verification"]["result"], "pass");
    assert_eq!(
        doc["certificate"]["verification"]["bytes_checked"],
        std::fs::metadata(&victim.data).expect("disk").len()
    );
    // One byte changed (a digit of the byte count): refused.
    let bad = cluster.scratch().join("tampered.json");
    let pos = text.find("\"bytes_checked\": ").expect("field") + "\"bytes_checked\": ".len();
    let mut b = text.clone().into_bytes();
    b[pos] = if b[pos] == b'9' { b'8' } else { b[pos] + 1 };
    std::fs::write(&bad, &b).expect("write tampered copy");
    let no = cluster.run_slate(&["certificate", "verify", bad.to_str().expect("path")]);
    assert!(!no.status.success(), "a tampered certificate verified");
    // Its hash is in the audit chain.
    let sha = doc["sha256"].as_str().expect("sha256");
    let audit = cluster.slate_json(&["audit", "list"]);
    assert!(
        audit["records"].as_array().into_iter().flatten().any(|r| r["action"] == "disk.decommission_report"
            && r["object"].as_str().is_some_and(|o| o.contains(sha))),
        "the certificate's hash is not in the audit chain"
    );
    let html = cluster.scratch().join("certificate.html");
    let r = cluster.run_slate(&[
        "certificate",
        "render",
        cert.to_str().expect("path"),
        "--html",
        html.to_str().expect("path"),
    ]);
    assert!(r.status.success() && std::fs::metadata(&html).is_ok_and(|m| m.len() > 1000), "render failed");
    cluster.slate_refused(&["disk", "decommission", &vname], "already decommissioned");
    if let Ok(keep) = std::env::var("SLATE_KEEP_CERTIFICATE") {
        let _ = std::fs::copy(&cert, format!("{keep}.json"));
        let _ = std::fs::copy(&html, format!("{keep}.html"));
    }
    cluster.stop();
}

/// A decommission survives kill -9 of the node doing it: the restarted node resumes the
/// erase from its persisted resume point without opening the disk, and the result is the
/// same: every byte zero, a certificate that verifies.
#[test]
fn decommission_resumes_after_kill9_of_its_node() {
    let mut cluster = Cluster::start(
        "slate-e2e-decom",
        UpOptions { segment_blocks: Some(SEGMENT_BLOCKS), disk_size_bytes: 1536 << 20, ..UpOptions::default() },
    );
    let victim = cluster.nodes().into_iter().next().expect("a node");
    let vname = format!("node-{}", victim.id);
    let out = cluster.run_slate(&["node", "drain", &vname, "--wait"]);
    assert!(out.status.success(), "drain failed: {}", String::from_utf8_lossy(&out.stderr));
    let out = cluster.run_slate(&["disk", "decommission", &vname]);
    assert!(out.status.success(), "decommission refused: {}", String::from_utf8_lossy(&out.stderr));
    // Wait until the erase is part way (a resume point, no result), then kill the node.
    let state_file = victim.data.parent().expect("node dir").join("decommission.json");
    let t = Instant::now();
    let st = loop {
        if let Ok(st) = std::fs::read(&state_file).map(|b| serde_json::from_slice::<Value>(&b).unwrap_or_default()) {
            if st["resume_from"].as_u64().unwrap_or(0) > 0 && st["result"].is_null() {
                break st;
            }
            assert!(st["result"].is_null(), "the erase finished before it could be interrupted: {st}");
        }
        assert!(t.elapsed() < Duration::from_mins(3), "the decommission did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    kill9(victim.pid);
    eprintln!(
        "killed node {} at resume point {} of {}",
        victim.id,
        st["resume_from"],
        2 * std::fs::metadata(&victim.data).expect("disk").len()
    );
    let shown = cluster.slate_json(&["disk", "show", &vname]);
    assert_eq!(shown["state"], "decommissioning", "{shown:#}");
    let mut node = cluster.restart_node(&victim);
    let cert = cluster.scratch().join("resumed-certificate.json");
    let t = Instant::now();
    loop {
        let d = cluster.slate_json(&["disk", "show", &vname]);
        if d["state"] == "decommissioned" {
            break;
        }
        assert!(t.elapsed() < Duration::from_mins(3), "the resumed decommission did not finish: {d:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = cluster.run_slate(&["disk", "certificate", &vname, "--out", cert.to_str().expect("path")]);
    assert!(out.status.success(), "no certificate: {}", String::from_utf8_lossy(&out.stderr));
    let ok = cluster.run_slate(&["certificate", "verify", cert.to_str().expect("path")]);
    assert!(ok.status.success(), "certificate does not verify: {}", String::from_utf8_lossy(&ok.stderr));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&cert).expect("cert")).expect("json");
    assert_eq!(doc["certificate"]["verification"]["mismatched_bytes"], 0);
    assert_eq!(
        doc["certificate"]["verification"]["bytes_checked"],
        std::fs::metadata(&victim.data).expect("disk").len()
    );
    node.terminate();
    assert!(all_zero(&victim.data), "the decommissioned disk file is not all zero");
    cluster.stop();
}
