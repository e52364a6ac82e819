//! A storage node dies while the volume is idle; the next I/O is a read.
//!
//! Acceptance 3 covers a node killed under writes. Here the client learns of
//! the death from a read instead: every read must still succeed (from the
//! surviving replica: "no NBD request fails because one node died"), and the
//! volume must then heal to R=2 in distinct domains with identical replicas.

mod e2e_support;

use e2e_support::{compare_replicas, segments};
use slate_tests::cluster::{kill9, qemu_io, Cluster, UpOptions};
use std::time::{Duration, Instant};

const SEGMENT_BYTES: u64 = 64 << 20;

#[test]
fn reads_survive_a_node_that_died_while_idle() {
    let opts = UpOptions { segment_blocks: Some(SEGMENT_BYTES / 4096), ..UpOptions::default() };
    let cluster = Cluster::start("e2e-idle-failover", opts);
    let writes: Vec<String> =
        (0..4u64).map(|s| format!("write -P 0x{:02x} {} 4M", 0x31 + s, s * SEGMENT_BYTES)).collect();
    let reads: Vec<String> =
        (0..4u64).map(|s| format!("read -P 0x{:02x} {} 4M", 0x31 + s, s * SEGMENT_BYTES)).collect();
    slate_tests::cluster::qemu_io_ok(&cluster.nbd_unix(), &writes);

    // The victim is segment 0's first replica: a fresh replica set hands out reads from its first member,
    // so the first read below goes to the dead node.
    let view = cluster.volume_show("demo");
    let victim = segments(&view)[0].replicas[0].0;
    let pid = cluster.nodes().iter().find(|n| n.id == victim).expect("victim").pid;
    eprintln!("kill -9 node-{victim} (pid {pid}) while the volume is idle");
    kill9(pid);
    std::thread::sleep(Duration::from_secs(1));

    // Each read on its own qemu-io, so that one failure does not hide the others.
    let mut failed = Vec::new();
    for r in &reads {
        let out = qemu_io(&cluster.nbd_unix(), std::slice::from_ref(r));
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("failed") {
            failed.push(format!("{r}: {}", text.trim()));
        }
    }
    assert!(failed.is_empty(), "reads failed after a replica died: {failed:?}");

    let t = Instant::now();
    loop {
        let v = cluster.volume_show("demo");
        let ok = segments(&v).iter().all(|s| {
            let domains: std::collections::BTreeSet<&str> = s.replicas.iter().map(|r| r.2.as_str()).collect();
            s.replicas.len() == 2 && domains.len() == 2 && s.replicas.iter().all(|r| r.3 == "in_sync" && r.0 != victim)
        });
        if ok {
            break;
        }
        assert!(t.elapsed() < Duration::from_mins(3), "the volume did not heal: {}", v["segments"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("healed {:.1} s after the reads", t.elapsed().as_secs_f64());
    let cmp = compare_replicas(&cluster, "demo");
    assert!(cmp.differences.is_empty(), "replicas differ at {:?}", &cmp.differences[..cmp.differences.len().min(20)]);
}
