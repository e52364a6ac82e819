//! Beyond the numbered acceptance items, the "re-attach after a crash"
//! rule, end to end: the `slate attach` client is killed with `kill -9` while
//! fio has 32 writes in flight; `slate up` is restarted on the same directory
//! (its client attaches under a new generation and reconciles the regions the
//! nodes recorded as in flight). Then every replica returns the same bytes for
//! every block, and data acknowledged before the crash is intact.

mod e2e_support;

use e2e_support::compare_replicas;
use slate_tests::cluster::{kill9, pid_alive, qemu_io_ok, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn client_kill9_then_reattach_reconciles_replicas() {
    let opts = UpOptions { segment_blocks: Some(16384), ..UpOptions::default() };
    let mut cluster = Cluster::start("e2e-client-crash", opts);
    let before = cluster.volume_show("demo");

    // Acknowledged data in the first half, which fio never touches.
    let keep: Vec<String> = (0..16).map(|i| format!("write -P 0x{:02x} {} 1M", 0x40 + i, i * (8 << 20))).collect();
    qemu_io_ok(&cluster.nbd_unix(), &keep);

    // fio hammers the second half; the client dies under it.
    let mut cmd = Command::new("fio");
    cmd.arg("--name=crash")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", cluster.nbd_unix()))
        .args(["--rw=randwrite", "--bsrange=4k-64k", "--iodepth=32", "--offset=128M", "--size=128M"])
        .args(["--time_based", "--runtime=60", "--norandommap", "--output-format=terse"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut fio = ProcessGuard::spawn("fio", &mut cmd).expect("spawn fio");
    std::thread::sleep(Duration::from_secs(3));
    assert!(fio.is_alive(), "fio ended early");
    let client = cluster.info().role("client")[0].pid;
    eprintln!("kill -9 slate attach (pid {client}) under fio");
    kill9(client);
    let t = Instant::now();
    while fio.is_alive() && t.elapsed() < Duration::from_mins(1) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = fio.terminate();
    eprintln!("fio ended {:.1} s after the kill: {status:?} (an error is expected)", t.elapsed().as_secs_f64());
    assert!(!pid_alive(client));

    let t = Instant::now();
    cluster.restart();
    eprintln!("restarted (re-attach and reconcile) in {:.1} s", t.elapsed().as_secs_f64());
    let after = cluster.volume_show("demo");
    eprintln!("generation {} -> {}", before["generation"], after["generation"]);
    assert!(after["generation"].as_u64() > before["generation"].as_u64(), "the re-attach did not bump the generation");

    let reads: Vec<String> = (0..16).map(|i| format!("read -P 0x{:02x} {} 1M", 0x40 + i, i * (8 << 20))).collect();
    qemu_io_ok(&cluster.nbd_unix(), &reads);

    let t = Instant::now();
    let cmp = compare_replicas(&cluster, "demo");
    eprintln!(
        "compared {} blocks ({} written) in {:.1} s: {} differences, {} written-bit differences",
        cmp.blocks_compared,
        cmp.written_blocks,
        t.elapsed().as_secs_f64(),
        cmp.differences.len(),
        cmp.written_bit_differences
    );
    assert!(cmp.differences.is_empty(), "replicas differ at {:?}", &cmp.differences[..cmp.differences.len().min(20)]);
}
