//! Snapshots: crash-consistent while the volume is written, readable over NBD
//! (`slate attach VOL@SNAP --read-only`), and erased through the release queue
//! when deleted.

use serde_json::Value;
use slate_tests::acked::{AckedOptions, AckedWriter};
use slate_tests::cluster::{nbd_unix_uri, qemu_io_ok, qemu_io_ok_with, Cluster, UpOptions};
use std::time::{Duration, Instant};

#[test]
fn snapshot_of_a_running_volume_is_crash_consistent() {
    let mut cluster = Cluster::start("slate-e2e-snap", UpOptions::default());
    let w = AckedWriter::start(&cluster.nbd_socket(), "demo", AckedOptions::new(0, 16_384, 21))
        .expect("start the acked writer");
    assert!(w.wait_for_progress(3_000, Duration::from_mins(2)), "no write progress");
    let started = Instant::now();
    let out = cluster.slate_ok(&["--json", "snapshot", "create", "demo", "s1"]);
    let returned = Instant::now();
    let snap: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(snap["state"], "ready", "{snap}");
    eprintln!("snapshot taken under QD32 writes in {:.2} s", (returned - started).as_secs_f64());
    assert!(w.wait_for_progress(3_000, Duration::from_mins(2)), "no write progress after the snapshot");
    let report = w.stop();
    assert_eq!(report.failed, 0, "writes failed: {:?}", report.failures);

    cluster.slate_refused(&["snapshot", "create", "demo", "s1"], "s1");
    let (mut snap_att, sock) = cluster.attach_unix("demo@s1", &["--read-only"], "s1");
    let check = report.verify_point_in_time(&sock, "s1", started, returned).expect("read the snapshot");
    eprintln!(
        "snapshot: {} blocks checked, {} at the version acknowledged before the call, {} at one in flight during it, {} wrong",
        check.checked,
        check.at_acked,
        check.at_later_unacked,
        check.lost.len()
    );
    assert!(check.lost.is_empty(), "the snapshot is not a point in time: {:?}", &check.lost[..check.lost.len().min(5)]);
    assert_eq!(check.checked, report.blocks_touched());
    let head = report.verify(&cluster.nbd_socket(), "demo").expect("read the head");
    assert!(head.lost.is_empty(), "acknowledged writes lost on the head: {:?}", &head.lost[..head.lost.len().min(5)]);
    snap_att.terminate();
    cluster.stop();
}

#[test]
fn detached_snapshot_reads_back_and_its_deletion_is_erased() {
    let mut cluster = Cluster::start("slate-e2e-snap-cold", UpOptions::default());
    let tenant = cluster.volume_show("demo")["tenant"].as_u64().expect("tenant").to_string();
    cluster.slate_ok(&["volume", "create", "cold", "--size", &(64u64 << 20).to_string(), "--tenant", &tenant]);
    let (mut a, sock) = cluster.attach_unix("cold", &[], "cold");
    qemu_io_ok(&nbd_unix_uri("cold", &sock), &["write -P 0x11 0 16M".into()]);
    a.terminate();
    let t = Instant::now();
    cluster.slate_ok(&["snapshot", "create", "cold", "s1"]);
    eprintln!("detached snapshot frozen by its nodes in {:.2} s", t.elapsed().as_secs_f64());
    let (mut a, sock) = cluster.attach_unix("cold", &[], "cold");
    qemu_io_ok(&nbd_unix_uri("cold", &sock), &["write -P 0x22 0 8M".into()]);
    qemu_io_ok(&nbd_unix_uri("cold", &sock), &["read -P 0x22 0 8M".into(), "read -P 0x11 8M 8M".into()]);

    // The snapshot reads as it was, while the head is attached read-write.
    let (mut s, ssock) = cluster.attach_unix("cold@s1", &["--read-only"], "s1");
    qemu_io_ok_with(&["-r"], &nbd_unix_uri("s1", &ssock), &["read -P 0x11 0 16M".into(), "read -P 0 16M 48M".into()]);
    s.terminate();
    cluster.slate_refused(&["attach", "cold@s1", "--nbd-unix", "/nonexistent/x.sock"], "read-only");
    cluster.slate_refused(&["attach", "cold@nosuch", "--read-only", "--nbd-unix", "/nonexistent/x.sock"], "nosuch");

    // Deleting the snapshot folds its layer; what it alone held is released and zeroed.
    cluster.slate_ok(&["snapshot", "delete", "cold", "s1"]);
    let t = Instant::now();
    loop {
        let rel: Value = serde_json::from_str(&cluster.slate_ok(&["--json", "erasure", "releases"])).expect("json");
        let mine: Vec<&Value> =
            rel.as_array().into_iter().flatten().filter(|r| r["reason"] == "snapshot_deleted").collect();
        if !mine.is_empty() && mine.iter().all(|r| r["state"] == "erased") {
            let freed: u64 = mine.iter().map(|r| r["extents_released"].as_u64().unwrap_or(0)).sum();
            eprintln!("snapshot deletion: {} releases erased, {freed} extents freed and verified", mine.len());
            assert!(freed > 0, "the overwritten 8 MiB of the old layer freed no extent: {rel:#}");
            break;
        }
        assert!(t.elapsed() < Duration::from_mins(2), "snapshot layer releases not erased: {rel:#}");
        std::thread::sleep(Duration::from_secs(1));
    }
    qemu_io_ok(&nbd_unix_uri("cold", &sock), &["read -P 0x22 0 8M".into(), "read -P 0x11 8M 8M".into()]);
    a.terminate();
    cluster.stop();
}
