//! The volume client rides through the loss of the metadata leader.
//!
//! (a) Versioned 4 KiB writes at QD32 on the demo volume; `kill -9` of the
//!     slate-meta leader; 6 s later `kill -9` of a storage node holding
//!     replicas of the volume; 20 s more of writes. The client must find the
//!     new leader for its replacement requests: no write fails, no
//!     acknowledged write is lost, and the replacement shows in
//!     `slate volume show` within 10 s of the node kill.
//! (b) With a 60 s capability TTL (set before the attach), `kill -9` of the
//!     leader only, and writes for longer than the renewal point (2/3 of the
//!     TTL) and the first capability's expiry: the renewal goes to a surviving
//!     metadata node; no write fails, none is lost.
//!
//! `slate up` does not restart a process that died, so what is killed stays dead.

mod e2e_support;

use e2e_support::segments;
use serde_json::{json, Value};
use slate_tests::acked::{AckedOptions, AckedWriter, Report};
use slate_tests::cluster::{kill9, Cluster, UpOptions};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The two tests each run a whole cluster; one at a time on a busy machine.
static SERIAL: Mutex<()> = Mutex::new(());

const SEGMENT_BLOCKS: u64 = 16384; // 64 MiB: the 256 MiB volume's four segments spread over the three nodes

fn opts() -> UpOptions {
    UpOptions { segment_blocks: Some(SEGMENT_BLOCKS), ..UpOptions::default() }
}

/// `slate --json volume show demo` through the CLI (every API in cluster.json); `None` while it fails.
fn try_show(cluster: &Cluster) -> Option<Value> {
    let out = cluster.slate().args(["--json", "volume", "show", "demo"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
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

/// Segment index -> epoch.
fn epochs(view: &Value) -> BTreeMap<u64, u64> {
    view["segments"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| Some((s["index"].as_u64()?, s["epoch"].as_u64().unwrap_or(0)))).collect())
        .unwrap_or_default()
}

fn start_writer(cluster: &Cluster, seed: u64) -> AckedWriter {
    let blocks = slate_tests::cluster::UpOptions::default().volume_size_bytes / 4096;
    let w = AckedWriter::start(&cluster.nbd_socket(), &cluster.volume().name, AckedOptions::new(0, blocks, seed))
        .expect("start the acked writer");
    assert!(w.wait_for_progress(500, Duration::from_mins(1)), "the writer made no progress: {:?}", w.stats());
    w
}

/// Stops the writer, reads every block back and asserts nothing failed and nothing was lost.
fn finish(cluster: &Cluster, w: AckedWriter) -> Report {
    let report = w.stop();
    eprintln!("writer: {report}");
    let t = Instant::now();
    let check = report.verify(&cluster.nbd_socket(), &cluster.volume().name).expect("read back");
    eprintln!(
        "read back {} blocks in {:.1} s: {} at their last acknowledged version, {} at a later unacknowledged one, {} lost",
        check.checked,
        t.elapsed().as_secs_f64(),
        check.at_acked,
        check.at_later_unacked,
        check.lost.len()
    );
    assert!(report.connection_error.is_none(), "the NBD connection broke: {report}");
    assert_eq!(report.failed, 0, "writes failed: {:?}", report.failures);
    assert_eq!(report.unanswered, 0, "writes never answered");
    assert!(check.lost.is_empty(), "acknowledged writes lost: {:?}", &check.lost[..check.lost.len().min(20)]);
    assert_eq!(check.checked, report.blocks_touched());
    report
}

/// Sleeps `d` while printing the writer's progress every 5 s; fails early if it broke.
fn write_for(w: &AckedWriter, d: Duration, what: &str) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(5).min(end.saturating_duration_since(Instant::now())));
        let s = w.stats();
        eprintln!(
            "[{:>5.1} s] {what}: {} acked, {} failed, {} in flight, longest stall {:.1} s",
            w.elapsed().as_secs_f64(),
            s.acked,
            s.failed,
            s.in_flight,
            s.longest_stall.as_secs_f64()
        );
        assert!(!s.broken, "the NBD connection broke");
        assert_eq!(s.failed, 0, "a write failed");
    }
}

#[test]
fn meta_leader_then_node_killed_under_qd32_writes() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cluster = Cluster::start("e2e-meta-failover-a", opts());
    // The case: the leader is the API `slate attach` was given first (and talks to). Which node
    // wins an election is chance; a few restarts make that case likely, and the test runs either way.
    for _ in 0..6 {
        let l = cluster.meta_leader();
        if cluster.info().api.ends_with(&l.addr) {
            break;
        }
        eprintln!("the leader is meta-{}, not the client's first API {}; restarting", l.id, cluster.info().api);
        cluster.restart();
    }
    let seed = slate_tests::seed_from_env("SLATE_META_FAILOVER_SEED");
    let before = cluster.volume_show("demo");
    eprintln!("placement: {}", placement(&before));

    let w = start_writer(&cluster, seed);
    let leader = cluster.meta_leader();
    eprintln!(
        "[{:>5.1} s] kill -9 the metadata leader meta-{} (pid {}; the client's first API: {})",
        w.elapsed().as_secs_f64(),
        leader.id,
        leader.pid,
        cluster.info().api.ends_with(&leader.addr)
    );
    kill9(leader.pid);
    write_for(&w, Duration::from_secs(6), "leader dead");

    // The victim: the storage node holding the most segments of the volume.
    let mut held: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in segments(&before) {
        for r in &s.replicas {
            held.entry(r.0).or_default().push(s.index);
        }
    }
    let (&victim, victim_segs) = held.iter().max_by_key(|(_, s)| s.len()).expect("replicas");
    let victim_segs = victim_segs.clone();
    let pid = cluster.nodes().iter().find(|n| n.id == victim).expect("victim in cluster.json").pid;
    let epochs_before = epochs(&before);
    eprintln!("[{:>5.1} s] kill -9 node-{victim} (pid {pid}, segments {victim_segs:?})", w.elapsed().as_secs_f64());
    let killed = Instant::now();
    kill9(pid);

    // The replacement: every segment the victim held gets a new epoch without it.
    let mut replaced_after = None;
    let mut last = String::new();
    while killed.elapsed() < Duration::from_secs(20) {
        if let Some(v) = try_show(&cluster) {
            let p = placement(&v);
            if p != last {
                eprintln!("[{:>5.1} s after the node kill] {p}", killed.elapsed().as_secs_f64());
                last = p;
            }
            let now = epochs(&v);
            let done = segments(&v)
                .iter()
                .filter(|s| victim_segs.contains(&s.index))
                .all(|s| !s.replicas.iter().any(|r| r.0 == victim) && now[&s.index] > epochs_before[&s.index]);
            if done && replaced_after.is_none() {
                replaced_after = Some(killed.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let replaced_after = replaced_after.unwrap_or_else(|| panic!("node-{victim} was not replaced within 20 s: {last}"));
    eprintln!("replacement visible {:.1} s after the node kill", replaced_after.as_secs_f64());

    let rest = Duration::from_secs(20).saturating_sub(killed.elapsed());
    write_for(&w, rest, "node and leader dead");
    let report = finish(&cluster, w);
    eprintln!(
        "result: {} acknowledged writes, {} failed, 0 lost; replacement after {:.1} s; slowest write {:.1} s",
        report.acked,
        report.failed,
        replaced_after.as_secs_f64(),
        report.max_latency.as_secs_f64()
    );
    assert!(
        replaced_after <= Duration::from_secs(10),
        "the replacement started {:.1} s after the node kill (limit 10 s)",
        replaced_after.as_secs_f64()
    );
}

#[test]
fn capability_renewal_survives_meta_leader_kill() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cluster = Cluster::start("e2e-meta-failover-b", opts());
    // A short capability lifetime, then a fresh attach so that the client holds a 60 s capability.
    let (status, body) = cluster.api(
        "PATCH",
        "/v1/settings",
        Some(&json!({"capability_ttl_secs": 60})),
        &cluster.info().token_file.clone(),
    );
    assert_eq!(status, 200, "PATCH /v1/settings refused: {body}");
    cluster.restart();
    let attached = Instant::now();
    let seed = slate_tests::seed_from_env("SLATE_META_FAILOVER_SEED");
    let w = start_writer(&cluster, seed);
    let leader = cluster.meta_leader();
    eprintln!(
        "[{:>5.1} s] kill -9 the metadata leader meta-{} (pid {}); capability renewal due ~40 s after the attach",
        w.elapsed().as_secs_f64(),
        leader.id,
        leader.pid
    );
    kill9(leader.pid);
    // Past the renewal point (40 s) and the first capability's expiry (60 s), with margin.
    let until = Duration::from_secs(80).saturating_sub(attached.elapsed()).max(Duration::from_secs(50));
    write_for(&w, until, "leader dead");
    let log = std::fs::read_to_string(cluster.dir().join("logs").join("client.log")).unwrap_or_default();
    let renewals = log.lines().filter(|l| l.contains("capability renewed")).count();
    let failures = log.lines().filter(|l| l.contains("capability renewal failed")).count();
    eprintln!("client log: {renewals} renewal(s), {failures} failed renewal attempt(s)");
    let report = finish(&cluster, w);
    eprintln!(
        "result: {} acknowledged writes over {:.0} s after the leader kill, {} failed, 0 lost",
        report.acked,
        until.as_secs_f64(),
        report.failed
    );
    assert!(renewals >= 1, "the client never renewed its capability");
}
