//! Scrub end to end with the real `slate up` cluster: data written through NBD
//! (qemu-io), bits flipped in several ciphertext blocks of ONE replica's disk
//! file behind the node's back, a scrub asked for through the management API;
//! the node's report must show exactly those blocks found and repaired, the
//! replicas must be identical again, and the data must read back through NBD.

mod e2e_support;

use e2e_support::{compare_replicas, segments};
use serde_json::Value;
use slate_tests::cluster::{qemu_io_ok, Cluster, UpOptions};
use slate_tests::disk::{fingerprint, for_each_block, nonzero_prints};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const FLIPS: usize = 5;

fn data_start(disk: &Path) -> u64 {
    slate_node::engine::read_geometry(disk).expect("read the disk's geometry").data_start_bytes
}

/// Offsets of the non-zero data blocks of `disk` (not the trailing superblock copy), by fingerprint.
fn data_blocks(disk: &Path) -> HashMap<u128, u64> {
    let len = std::fs::metadata(disk).expect("disk size").len();
    let mut out = HashMap::new();
    for_each_block(disk, data_start(disk), |off, b| {
        if off + 4096 < len && b.iter().any(|x| *x != 0) {
            out.insert(fingerprint(b), off);
        }
    });
    out
}

/// GET /v1/nodes/{id} with the operator token.
fn node_view(cluster: &Cluster, id: u64) -> Value {
    let (status, v) = cluster.api("GET", &format!("/v1/nodes/{id}"), None, &cluster.info().token_file);
    assert_eq!(status, 200, "GET /v1/nodes/{id}: {v}");
    v
}

/// Waits until node `id` has reported a finished scrub pass with `scrub_id` (any id if `None`).
fn wait_scrub(cluster: &Cluster, id: u64, scrub_id: Option<u64>, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = node_view(cluster, id);
        let r = &v["scrub"];
        if r["running"] == false && scrub_id.is_none_or(|s| r["scrub_id"].as_u64() == Some(s)) {
            return r.clone();
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("node {id} did not report a finished scrub {scrub_id:?}: {v:#}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn scrub_repairs_flipped_blocks_of_one_replica() {
    let cluster = Cluster::start("slate-e2e-scrub", UpOptions { volume_size_bytes: 64 * MIB, ..UpOptions::default() });
    let view = cluster.volume_show("demo");
    let segs = segments(&view);
    let replicas: Vec<u64> = segs[0].replicas.iter().map(|r| r.0).collect();
    assert!(replicas.len() >= 2, "the demo volume has {} replicas", replicas.len());
    let nodes = cluster.nodes();
    let disk_of = |id: u64| nodes.iter().find(|n| n.id == id).expect("node in cluster.json").data.clone();
    let (victim, peer) = (replicas[0], replicas[1]);
    // The node's first background pass (at start, on a disk with nothing of the demo
    // volume yet) must be over before we damage anything, so that only the requested
    // pass can find the damage.
    let first = wait_scrub(&cluster, victim, None, Duration::from_mins(1));
    eprintln!("first pass on node {victim}: {first}");

    let before: HashSet<u128> = nonzero_prints(&disk_of(victim), data_start(&disk_of(victim)));
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x3c 0 8M".to_owned(), "flush".to_owned()]);

    // Ciphertext blocks the write put on both replicas (same key and tweak: same bytes).
    let on_victim = data_blocks(&disk_of(victim));
    let on_peer: HashSet<u128> = data_blocks(&disk_of(peer)).into_keys().collect();
    let mut new: Vec<u64> =
        on_victim.iter().filter(|(p, _)| !before.contains(p) && on_peer.contains(p)).map(|(_, off)| *off).collect();
    new.sort_unstable();
    assert!(new.len() >= 2048, "8 MiB written but only {} new shared blocks on node {victim}", new.len());
    let step = new.len() / FLIPS;
    let flipped: Vec<u64> = (0..FLIPS).map(|i| new[i * step + step / 2]).collect();
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(disk_of(victim)).expect("open disk");
        for off in &flipped {
            let mut b = vec![0u8; 4096];
            f.read_exact_at(&mut b, *off).expect("read block");
            b[1234] ^= 0x20;
            f.write_all_at(&b, *off).expect("write block");
        }
        f.sync_all().expect("fsync disk");
    }
    eprintln!("flipped one bit in the blocks at {flipped:?} of node {victim}'s disk");

    // The operator's command, as a user runs it: blocks until the pass is done.
    let out = cluster
        .slate()
        .args(["--json", "scrub", &format!("node-{victim}"), "--wait"])
        .output()
        .expect("run slate scrub");
    assert!(out.status.success(), "slate scrub failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("slate scrub --json output");
    let id = r["scrub_id"].as_u64().expect("scrub id");
    assert!(id > 0 && r["running"] == false, "{r:#}");
    eprintln!("scrub {id} on node {victim}: {r}");
    assert_eq!(r["corrupt_found"].as_u64(), Some(FLIPS as u64), "{r:#}");
    assert_eq!(r["repaired"].as_u64(), Some(FLIPS as u64), "{r:#}");
    assert_eq!(r["unrepaired"].as_u64(), Some(0), "{r:#}");
    assert!(r["blocks_checked"].as_u64().unwrap_or(0) >= 2048, "{r:#}");

    // The replicas are identical again, and the data reads back through NBD.
    let cmp = compare_replicas(&cluster, "demo");
    assert!(cmp.differences.is_empty(), "replicas differ: {:?}", &cmp.differences[..cmp.differences.len().min(10)]);
    assert_eq!(cmp.written_bit_differences, 0);
    assert!(cmp.written_blocks >= 2048, "{cmp:?}");
    qemu_io_ok(&cluster.nbd_unix(), &["read -P 0x3c 0 8M".to_owned()]);
    // The repaired bytes are the peer's bytes: every flipped block is back as written.
    let after = data_blocks(&disk_of(victim));
    for off in &flipped {
        assert!(after.values().any(|o| o == off), "block at {off} is gone");
    }
    let fixed = after.iter().filter(|(p, o)| flipped.contains(o) && on_peer.contains(p)).count();
    assert_eq!(fixed, FLIPS, "the flipped blocks do not hold the peer's ciphertext again");
}
