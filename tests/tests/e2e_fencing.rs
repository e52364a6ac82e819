//! Acceptance 5 (issue 5): fencing end to end.
//!
//! `slate up`'s own client holds the demo volume read-write. A second
//! `slate attach demo --force` (the demo host's token) takes it over. Then:
//! - every write through the first client's NBD socket fails, in every
//!   segment (the volume has four 64 MiB segments over the three nodes, so
//!   every node is asked);
//! - nothing the first client wrote after the takeover is visible through the
//!   second: it reads what was there before, or what it wrote itself;
//! - the fenced client's failures did not make slate-meta move any replica
//!   (a fenced client must not report healthy nodes as failed);
//! - the replicas of every segment are byte-identical afterwards.

mod e2e_support;

use e2e_support::{compare_replicas, segments};
use serde_json::Value;
use slate_tests::cluster::{qemu_io, qemu_io_ok, wait_for_unix_socket, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::time::{Duration, Instant};

const SEGMENT_BYTES: u64 = 64 << 20;
const LEN: u64 = 256 << 10;

fn offsets() -> Vec<u64> {
    (0..4).flat_map(|s| [s * SEGMENT_BYTES + (1 << 20), s * SEGMENT_BYTES + (33 << 20)]).collect()
}

fn placement(view: &Value) -> Vec<(u64, Vec<u64>)> {
    segments(view).iter().map(|s| (s.index, s.replicas.iter().map(|r| r.0).collect())).collect()
}

/// Runs one write per offset through `uri` in one qemu-io; returns how many failed, and the output.
fn try_writes(uri: &str, pattern: u8, offs: &[u64]) -> (usize, String) {
    let cmds: Vec<String> = offs.iter().map(|o| format!("write -P 0x{pattern:02x} {o} {LEN}")).collect();
    let out = qemu_io(uri, &cmds);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let failed = text.lines().filter(|l| l.contains("write failed")).count();
    (failed, text)
}

#[test]
fn forced_attach_fences_the_first_client() {
    let opts = UpOptions { segment_blocks: Some(SEGMENT_BYTES / 4096), ..UpOptions::default() };
    let cluster = Cluster::start("e2e-fencing", opts);
    let first = cluster.nbd_unix();
    let offs = offsets();

    qemu_io_ok(&first, &offs.iter().map(|o| format!("write -P 0x11 {o} {LEN}")).collect::<Vec<_>>());
    let before = cluster.volume_show("demo");
    eprintln!("before the takeover: generation {}, placement {:?}", before["generation"], placement(&before));

    // The second client takes the volume over.
    let sock = cluster.scratch().join("second.sock");
    let log_path = cluster.scratch().join("second-attach.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut cmd = cluster.slate();
    cmd.arg("--token-file")
        .arg(cluster.host_token_file())
        .args(["attach", "demo", "--force", "--host", "second-host", "--nbd-unix"])
        .arg(&sock)
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    let t = Instant::now();
    let mut second = ProcessGuard::spawn("second slate attach", &mut cmd).expect("spawn slate attach");
    let ready = wait_for_unix_socket(&sock, Duration::from_mins(1));
    let second_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(ready && second.is_alive(), "the second attach did not come up:\n{}", second_log());
    eprintln!("second attach serving after {:.1} s", t.elapsed().as_secs_f64());
    let second_uri = format!("nbd+unix:///demo?socket={}", sock.display());

    let after = cluster.volume_show("demo");
    let atts: Vec<&Value> = after["attachments"].as_array().expect("attachments").iter().collect();
    eprintln!("after the takeover: generation {}, attachments {atts:?}", after["generation"]);
    assert!(after["generation"].as_u64() > before["generation"].as_u64(), "the generation did not move");
    let rw: Vec<&&Value> = atts.iter().filter(|a| a["mode"] == "read_write").collect();
    assert_eq!(rw.len(), 1, "exactly one read-write attachment after the takeover");
    assert_eq!(rw[0]["host"], "second-host");

    // Every write of the first client fails now, in every segment.
    let (failed, text) = try_writes(&first, 0x22, &offs);
    eprintln!("first client's writes after the takeover: {failed}/{} failed\n{}", offs.len(), text.trim());
    assert_eq!(failed, offs.len(), "a fenced client's write succeeded:\n{text}");

    // The second client sees the data from before the takeover only.
    qemu_io_ok(&second_uri, &offs.iter().map(|o| format!("read -P 0x11 {o} {LEN}")).collect::<Vec<_>>());

    // The second writes half the ranges; the first tries again; the second still sees its own data.
    let (mine, theirs): (Vec<u64>, Vec<u64>) = offs.iter().partition(|o| (*o >> 20) % 2 == 1);
    qemu_io_ok(&second_uri, &mine.iter().map(|o| format!("write -P 0x33 {o} {LEN}")).collect::<Vec<_>>());
    let (failed, text) = try_writes(&first, 0x44, &offs);
    assert_eq!(failed, offs.len(), "a fenced client's write succeeded:\n{text}");
    let mut reads: Vec<String> = mine.iter().map(|o| format!("read -P 0x33 {o} {LEN}")).collect();
    reads.extend(theirs.iter().map(|o| format!("read -P 0x11 {o} {LEN}")));
    qemu_io_ok(&second_uri, &reads);

    // What a read through the fenced client gives (informational: not part of the acceptance).
    let out = qemu_io(&first, &[format!("read -P 0x11 {} {LEN}", offs[0])]);
    eprintln!(
        "a read through the fenced client: {}",
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim()
    );

    // The fenced client's failures did not move any replica.
    let now = cluster.volume_show("demo");
    assert_eq!(placement(&now), placement(&before), "replicas moved after the fenced client's failed writes");

    let cmp = compare_replicas(&cluster, "demo");
    eprintln!(
        "replicas: {} blocks compared ({} written), {} differences",
        cmp.blocks_compared,
        cmp.written_blocks,
        cmp.differences.len()
    );
    assert!(cmp.differences.is_empty(), "replicas differ at {:?}", &cmp.differences[..cmp.differences.len().min(20)]);

    let status = second.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "the second attach did not stop cleanly: {status:?}\n{}",
        second_log()
    );

    // With the second client gone (detached), the first is still fenced.
    let (failed, text) = try_writes(&first, 0x55, &offs);
    assert_eq!(failed, offs.len(), "the fenced client wrote after the new holder detached:\n{text}");
    eprintln!("after the second detached: attachments {}", cluster.volume_show("demo")["attachments"]);
    let cmp = compare_replicas(&cluster, "demo");
    assert!(cmp.differences.is_empty(), "replicas differ at {:?}", &cmp.differences[..cmp.differences.len().min(20)]);
}
