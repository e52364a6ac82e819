//! Online growth through the whole stack: `slate up` serves the demo volume
//! (attached read-write); `slate volume resize demo --size 384MiB` places two
//! new segments in slate-meta; the running `slate attach` picks the new layout
//! up by polling, and a fresh NBD connection (qemu-io, nbdinfo) sees the new
//! size, writes and reads past the old end, and finds the data written before
//! the growth intact. No reattach.

use slate_tests::cluster::{qemu_io_ok, run_ok, Cluster, UpOptions};
use std::process::Command;
use std::time::{Duration, Instant};

const SEGMENT_BLOCKS: u64 = 16384; // 64 MiB segments: the 256 MiB demo volume has four
const OLD: u64 = 256 << 20;
const NEW: u64 = 384 << 20;

fn nbd_size(uri: &str) -> u64 {
    let out = run_ok(Command::new("nbdinfo").args(["--size", uri]));
    out.trim().parse().unwrap_or_else(|_| panic!("nbdinfo --size printed {out:?}"))
}

#[test]
fn a_served_volume_grows_without_reattach() {
    let cluster =
        Cluster::start("slate-e2e-grow", UpOptions { segment_blocks: Some(SEGMENT_BLOCKS), ..UpOptions::default() });
    let uri = cluster.nbd_unix();
    assert_eq!(nbd_size(&uri), OLD);
    qemu_io_ok(&uri, &["write -P 0x5a 0 1M".into(), format!("write -P 0x6b {} 1M", OLD - (1 << 20))]);

    let out = cluster.slate().args(["volume", "resize", "demo", "--size", "384MiB"]).output().expect("run slate");
    assert!(out.status.success(), "slate volume resize: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cluster.volume_show("demo")["size_bytes"].as_u64(), Some(NEW));

    // The attachment polls the layout every few seconds; new connections then see the new size.
    let deadline = Instant::now() + Duration::from_mins(1);
    while nbd_size(&uri) != NEW {
        assert!(Instant::now() < deadline, "the served volume never grew to {NEW}");
        std::thread::sleep(Duration::from_millis(500));
    }
    qemu_io_ok(
        &uri,
        &[
            format!("write -P 0x7c {} 2M", OLD - (1 << 20)),
            format!("write -P 0x8d {} 1M", NEW - (1 << 20)),
            "read -P 0x5a 0 1M".into(),
            format!("read -P 0x7c {} 2M", OLD - (1 << 20)),
            format!("read -P 0x8d {} 1M", NEW - (1 << 20)),
            format!("read -P 0 {} 1M", OLD + (32 << 20)),
        ],
    );
    // Shrinking stays refused, and the served size stays.
    let out = cluster.slate().args(["volume", "resize", "demo", "--size", "256MiB"]).output().expect("run slate");
    assert!(!out.status.success(), "a shrink was accepted");
    assert_eq!(nbd_size(&uri), NEW);
}
