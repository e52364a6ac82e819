//! Secure erasure end to end: a deleted volume leaves nothing on any disk.
//!
//! `slate up` runs the cluster; each test creates its own volume, attaches it
//! with `slate attach`, writes through NBD (qemu-io), and fingerprints every
//! 4 KiB block of every node's disk file before and after, so it knows which
//! ciphertext blocks the volume put on disk. After `slate volume delete --wait`
//! none of those blocks may remain anywhere, the erasure record must say
//! "complete", and the freed extents must be allocated again by a new volume.
//! The same holds when a node is down during the delete and comes back, and for
//! a replica replaced after a node failure once that node restarts.

use serde_json::Value;
use slate_tests::cluster::{kill9, nbd_unix_uri, qemu_io_ok, Cluster, ProcessEntry, UpOptions};
use slate_tests::disk::{count_present, nonzero_prints};
use slate_tests::ProcessGuard;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn start() -> Cluster {
    Cluster::start("slate-e2e-erasure", UpOptions { volume_size_bytes: 64 * MIB, ..UpOptions::default() })
}

/// Where a node's data extents start on its disk file.
fn data_start(node: &ProcessEntry) -> u64 {
    slate_node::engine::read_geometry(&node.data).expect("read the disk's geometry").data_start_bytes
}

/// Fingerprints of every non-zero data block, per node.
fn prints(cluster: &Cluster) -> Vec<HashSet<u128>> {
    cluster.nodes().iter().map(|n| nonzero_prints(&n.data, data_start(n))).collect()
}

/// Creates volume `name` (R=2) in the demo volume's tenant and returns its id.
fn create_volume(cluster: &Cluster, name: &str, size: u64) -> u64 {
    let tenant = cluster.volume_show("demo")["tenant"].as_u64().expect("demo tenant");
    let v = cluster.slate_json(&[
        "volume",
        "create",
        name,
        "--size",
        &size.to_string(),
        "--replicas",
        "2",
        "--tenant",
        &tenant.to_string(),
    ]);
    v["id"].as_u64().expect("volume id")
}

/// `slate attach NAME` on a unix socket in the scratch directory; returns the guard and the NBD URI.
fn attach(cluster: &Cluster, name: &str) -> (ProcessGuard, String) {
    let (p, sock) = cluster.attach_unix(name, &["--host", "e2e-erasure"], name);
    (p, nbd_unix_uri(name, &sock))
}

/// Writes `mib` MiB of a pattern from offset 0 (ciphertext differs per block anyway).
fn write(uri: &str, mib: u64, pattern: u8) {
    let cmds: Vec<String> = (0..mib / 4).map(|i| format!("write -P {pattern} {}M 4M", i * 4)).collect();
    qemu_io_ok(uri, &cmds);
}

/// Runs `slate volume delete ID --wait`, bounded, and returns the final erasure record.
fn delete_and_wait(cluster: &Cluster, id: u64, timeout: Duration) -> Value {
    let t = Instant::now();
    let del = cluster.slate_json(&["volume", "delete", &id.to_string()]);
    eprintln!("deleted vol-{id}: {del}");
    let v = delete_and_wait_existing(cluster, id, timeout);
    eprintln!("vol-{id} erased in {:.1} s", t.elapsed().as_secs_f64());
    v
}

fn assert_complete(v: &Value) {
    assert_eq!(v["state"], "complete", "{v:#}");
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    assert_eq!(n("replicas_erased"), n("replicas_total"), "{v:#}");
    assert!(n("extents_released") > 0, "no extent was released: {v:#}");
    assert_eq!(n("extents_verified") + n("extents_failed"), n("extents_released"), "{v:#}");
    assert!(
        v["meta_voters"].as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|m| m["purged"] == true)),
        "{v:#}"
    );
}

/// Released extent ids per node name.
fn released_extents(v: &Value) -> HashSet<(String, u64)> {
    v["releases"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| {
            let node = r["node_name"].as_str().unwrap_or_default().to_owned();
            r["extents"].as_array().into_iter().flatten().filter_map(Value::as_u64).map(move |e| (node.clone(), e))
        })
        .collect()
}

fn left_on(disk: &Path, written: &HashSet<u128>) -> usize {
    count_present(disk, written)
}

#[test]
fn delete_leaves_nothing_and_extents_are_reused() {
    let mut cluster = start();
    let id = create_volume(&cluster, "scratch", 128 * MIB);
    let before = prints(&cluster);
    let (mut att, uri) = attach(&cluster, "scratch");
    write(&uri, 64, 0x5a);
    att.terminate();
    let after = prints(&cluster);
    let written: HashSet<u128> =
        after.iter().zip(&before).flat_map(|(a, b)| a.difference(b).copied().collect::<Vec<_>>()).collect();
    eprintln!("the volume put {} distinct ciphertext blocks on disk", written.len());
    assert!(written.len() >= 16_384, "64 MiB written but only {} new blocks found", written.len());

    let v = delete_and_wait(&cluster, id, Duration::from_mins(3));
    assert_complete(&v);
    for n in cluster.nodes() {
        let left = left_on(&n.data, &written);
        assert_eq!(left, 0, "{left} of the deleted volume's blocks are still on node {}'s disk", n.id);
    }
    let shown = cluster.slate_json(&["volume", "show", "scratch", "--deleted"]);
    assert_eq!(shown["state"], "complete");
    let audit = cluster.slate_json(&["audit", "list"]);
    assert!(
        audit["records"].as_array().into_iter().flatten().any(|r| r["action"] == "volume.erased"
            && r["object"].as_str().is_some_and(|o| o.contains(&format!("vol-{id}(")))),
        "no volume.erased record in the audit chain"
    );

    // The verified extents go back to the free pool and a new volume takes them.
    let id2 = create_volume(&cluster, "scratch2", 128 * MIB);
    let (mut att, uri) = attach(&cluster, "scratch2");
    write(&uri, 64, 0x33);
    att.terminate();
    let v2 = delete_and_wait(&cluster, id2, Duration::from_mins(3));
    assert_complete(&v2);
    let reused: Vec<_> = released_extents(&v).intersection(&released_extents(&v2)).cloned().collect();
    eprintln!("{} extents of the first volume were allocated again to the second", reused.len());
    assert!(!reused.is_empty(), "no freed extent was reused");
    cluster.stop();
}

/// The node of a volume's first replica, from `volume show`.
fn replica_node(cluster: &Cluster, name: &str) -> ProcessEntry {
    let v = cluster.volume_show(name);
    let node = v["segments"][0]["replicas"][0]["node"].as_u64().expect("replica node");
    cluster.nodes().into_iter().find(|n| n.id == node).expect("node process")
}

#[test]
fn node_down_during_delete_erases_when_it_returns() {
    let mut cluster = start();
    let id = create_volume(&cluster, "scratch", 64 * MIB);
    let victim = replica_node(&cluster, "scratch");
    let before = nonzero_prints(&victim.data, data_start(&victim));
    let (mut att, uri) = attach(&cluster, "scratch");
    write(&uri, 32, 0x77);
    att.terminate();
    let written: HashSet<u128> =
        nonzero_prints(&victim.data, data_start(&victim)).difference(&before).copied().collect();
    assert!(written.len() >= 8192, "only {} new blocks on the victim", written.len());

    kill9(victim.pid);
    let _ = cluster.slate_json(&["volume", "delete", "scratch"]);
    // The live replica is erased; the dead node's stays pending, visibly.
    let t = Instant::now();
    let v = loop {
        let v = cluster.slate_json(&["erasure", "show", &id.to_string()]);
        let mine: Vec<&Value> =
            v["releases"].as_array().into_iter().flatten().filter(|r| r["node"] == victim.id).collect();
        let others_done = v["releases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["node"] != victim.id)
            .all(|r| r["state"] == "erased");
        if others_done {
            assert!(!mine.is_empty() && mine.iter().all(|r| r["state"] == "pending"), "{v:#}");
            break v;
        }
        assert!(t.elapsed() < Duration::from_mins(3), "the live replicas were not erased: {v:#}");
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(v["state"], "erasing");
    assert!(left_on(&victim.data, &written) > 0, "the dead node's disk changed while it was dead");

    // The node comes back: it releases before serving, then its zeroer verifies.
    let mut node = cluster.restart_node(&victim);
    let v = delete_and_wait_existing(&cluster, id, Duration::from_mins(3));
    assert_complete(&v);
    let left = left_on(&victim.data, &written);
    assert_eq!(left, 0, "{left} of the deleted volume's blocks are still on the returned node's disk");
    node.terminate();
    cluster.stop();
}

/// `slate erasure show ID --wait` for a volume already deleted.
fn delete_and_wait_existing(cluster: &Cluster, id: u64, timeout: Duration) -> Value {
    let out = cluster
        .slate()
        .args(["--json", "erasure", "show", &id.to_string(), "--wait", "--timeout"])
        .arg(timeout.as_secs().to_string())
        .output()
        .expect("run slate erasure show --wait");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "erasure of vol-{id} not complete: {}\n{v:#}", String::from_utf8_lossy(&out.stderr));
    v
}

#[test]
fn replaced_replica_is_erased_when_its_node_restarts() {
    let mut cluster = start();
    let _id = create_volume(&cluster, "scratch", 64 * MIB);
    let victim = replica_node(&cluster, "scratch");
    let before = nonzero_prints(&victim.data, data_start(&victim));
    let (mut att, uri) = attach(&cluster, "scratch");
    write(&uri, 32, 0x11);
    let written: HashSet<u128> =
        nonzero_prints(&victim.data, data_start(&victim)).difference(&before).copied().collect();
    assert!(written.len() >= 8192, "only {} new blocks on the victim", written.len());

    // Kill the node under the attachment; the next writes report it and a new replica is rebuilt.
    kill9(victim.pid);
    write(&uri, 8, 0x22);
    let t = Instant::now();
    loop {
        let v = cluster.volume_show("scratch");
        let reps: Vec<&Value> = v["segments"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["replicas"].as_array().into_iter().flatten())
            .collect();
        if reps.iter().all(|r| r["node"] != victim.id && r["state"] == "in_sync") {
            break;
        }
        assert!(t.elapsed() < Duration::from_mins(3), "no rebuilt replica: {v:#}");
        std::thread::sleep(Duration::from_secs(1));
    }
    // A new attachment (a new generation) before the node returns.
    att.terminate();
    let (mut att, uri) = attach(&cluster, "scratch");
    write(&uri, 4, 0x44);

    let mut node = cluster.restart_node(&victim);
    let t = Instant::now();
    loop {
        let rel = cluster.slate_json(&["erasure", "releases", "--node", &victim.id.to_string()]);
        let mine: Vec<&Value> =
            rel.as_array().into_iter().flatten().filter(|r| r["reason"] == "replica_replaced").collect();
        if !mine.is_empty() && mine.iter().all(|r| r["state"] == "erased") {
            assert!(mine.iter().map(|r| r["extents_verified"].as_u64().unwrap_or(0)).sum::<u64>() > 0, "{rel:#}");
            break;
        }
        assert!(t.elapsed() < Duration::from_mins(3), "the replaced replica was not erased: {rel:#}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let left = left_on(&victim.data, &written);
    assert_eq!(left, 0, "{left} blocks of the replaced replica are still on the restarted node's disk");
    // The volume still reads what was written.
    qemu_io_ok(&uri, &["read -P 0x44 0 4M".into(), "read -P 0x22 4M 4M".into(), "read -P 0x11 8M 24M".into()]);
    att.terminate();
    node.terminate();
    cluster.stop();
}
