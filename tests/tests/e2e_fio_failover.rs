//! Acceptance 3 (issue 5): `fio --ioengine=nbd` random writes at QD32 with
//! crc32c verification while one `slate-node` process is killed with
//! `kill -9` (its PID from `cluster.json`).
//!
//! Checks: fio exits 0 with no I/O error and its verification pass reads back
//! every block it wrote; afterwards `slate volume show --json` shows every
//! segment back at R=2 in-sync copies in distinct failure domains, none on the
//! dead node; and the replicas are byte-identical (ciphertext, crcs), read
//! block by block from each node through the data plane with a read-only
//! capability.
//!
//! The volume uses 64 MiB segments so that its four segments are spread over
//! all three nodes and the victim holds several of them.

mod e2e_support;

use e2e_support::{compare_replicas, segments};
use serde_json::Value;
use slate_tests::cluster::{kill9, pid_alive, qemu_io_ok, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KILL_AFTER: Duration = Duration::from_secs(3);

/// True when every segment has `r` in-sync replicas in distinct domains, none on `dead`.
fn healed(view: &Value, r: usize, dead: u64) -> bool {
    segments(view).iter().all(|s| {
        let domains: BTreeSet<&str> = s.replicas.iter().map(|x| x.2.as_str()).collect();
        s.replicas.len() == r && domains.len() == r && s.replicas.iter().all(|x| x.3 == "in_sync" && x.0 != dead)
    })
}

fn placement(view: &Value) -> String {
    segments(view)
        .iter()
        .map(|s| {
            let reps: Vec<String> = s.replicas.iter().map(|r| format!("node-{}[{}]", r.0, r.3)).collect();
            format!("seg {}: {}", s.index, reps.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The fio job: random 16 KiB writes at QD32 over 160 MiB of the volume, each block's crc32c checked
/// at the end (the same seed every run, so `--verify_only` replays the same offsets).
fn fio_job(uri: &str, json: &std::path::Path) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=failover")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(["--rw=randwrite", "--bs=16k", "--iodepth=32", "--size=256M", "--io_size=160M"])
        .args(["--verify=crc32c", "--verify_fatal=1", "--output-format=json"])
        .arg(format!("--output={}", json.display()))
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    cmd
}

#[test]
fn fio_verify_survives_node_kill() {
    let opts = UpOptions { segment_blocks: Some(16384), ..UpOptions::default() };
    let cluster = Cluster::start("e2e-fio", opts);
    let view = cluster.volume_show("demo");
    eprintln!("placement before: {}", placement(&view));

    // The victim: the node holding the most segments.
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for s in segments(&view) {
        for r in &s.replicas {
            *per_node.entry(r.0).or_default() += 1;
        }
    }
    let (&victim, &held) = per_node.iter().max_by_key(|(_, n)| **n).expect("some replicas");
    let victim_pid = cluster.nodes().iter().find(|n| n.id == victim).expect("victim in cluster.json").pid;

    let fio_json = cluster.scratch().join("fio.json");
    let mut cmd = fio_job(&cluster.nbd_unix(), &fio_json);
    let started = Instant::now();
    let mut fio = ProcessGuard::spawn("fio", &mut cmd).expect("spawn fio");
    std::thread::sleep(KILL_AFTER);
    assert!(fio.is_alive(), "fio ended before the node was killed");
    eprintln!("kill -9 node-{victim} (pid {victim_pid}, {held} segments) at {:?}", started.elapsed());
    kill9(victim_pid);
    let deadline = Instant::now() + Duration::from_mins(10);
    while fio.is_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = fio.terminate();
    eprintln!("fio finished after {:?}: {status:?}", started.elapsed());
    assert!(!pid_alive(victim_pid), "the killed node is still alive");
    let text = std::fs::read_to_string(&fio_json).unwrap_or_default();
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("fio json ({e}): {text}"));
    let job = &report["jobs"][0];
    let wr = &job["write"];
    let rd = &job["read"];
    eprintln!(
        "fio: error {}, write {} MiB in {} ms ({:.0} IOPS, clat max {:.1} ms), verify read {} MiB ({:.0} IOPS)",
        job["error"],
        wr["io_bytes"].as_u64().unwrap_or(0) >> 20,
        wr["runtime"],
        wr["iops"].as_f64().unwrap_or(0.0),
        wr["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6,
        rd["io_bytes"].as_u64().unwrap_or(0) >> 20,
        rd["iops"].as_f64().unwrap_or(0.0),
    );
    if wr["runtime"].as_u64().unwrap_or(0) < KILL_AFTER.as_millis() as u64 {
        eprintln!("WARNING: the write phase ended before the kill; raise --io_size for this machine");
    }
    assert!(status.is_some_and(|s| s.success()), "fio failed: {status:?}");
    assert_eq!(job["error"].as_u64(), Some(0), "fio reported an I/O error");
    assert_eq!(wr["io_bytes"].as_u64(), Some(160 << 20), "fio did not write everything");
    assert_eq!(rd["io_bytes"].as_u64(), Some(160 << 20), "fio did not verify everything it wrote");

    // Back to R=2 in distinct domains, none on the dead node.
    let t = Instant::now();
    let deadline = t + Duration::from_mins(5);
    let mut last = String::new();
    let view = loop {
        let v = cluster.volume_show("demo");
        let p = placement(&v);
        if p != last {
            eprintln!("[{:>5.1} s] {p}", t.elapsed().as_secs_f64());
            last = p;
        }
        if healed(&v, 2, victim) {
            break v;
        }
        assert!(Instant::now() < deadline, "the volume did not heal within 5 minutes: {last}");
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("healed {:.1} s after fio ended; generation {}", t.elapsed().as_secs_f64(), view["generation"]);

    // Every replica holds the same bytes.
    let t = Instant::now();
    let cmp = compare_replicas(&cluster, "demo");
    eprintln!(
        "compared {} segments, {} blocks ({} written) in {:.1} s: {} differences, {} written-bit differences",
        cmp.segments,
        cmp.blocks_compared,
        cmp.written_blocks,
        t.elapsed().as_secs_f64(),
        cmp.differences.len(),
        cmp.written_bit_differences
    );
    assert!(cmp.written_blocks > 0, "no written block found on the replicas");
    assert!(cmp.differences.is_empty(), "replicas differ at {:?}", &cmp.differences[..cmp.differences.len().min(20)]);

    // After a restart (the killed node comes back, holding replicas it no longer owns), fio verifies
    // the same blocks again without writing.
    let mut cluster = cluster;
    cluster.restart();
    let after = cluster.volume_show("demo");
    eprintln!("placement after the restart: {}", placement(&after));
    assert!(healed(&after, 2, victim), "the restart changed the replica sets: {}", placement(&after));
    let json2 = cluster.scratch().join("fio-verify.json");
    let status = fio_job(&cluster.nbd_unix(), &json2).arg("--verify_only").status().expect("run fio");
    let text = std::fs::read_to_string(&json2).unwrap_or_default();
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("fio json ({e}): {text}"));
    let job = &report["jobs"][0];
    eprintln!(
        "fio --verify_only after the restart: error {}, read {} MiB",
        job["error"],
        job["read"]["io_bytes"].as_u64().unwrap_or(0) >> 20
    );
    assert!(status.success() && job["error"].as_u64() == Some(0), "fio --verify_only failed after the restart");
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(160 << 20), "fio did not verify everything after the restart");

    // The export still serves I/O.
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x6b 0 1M".into(), "read -P 0x6b 0 1M".into()]);
}
