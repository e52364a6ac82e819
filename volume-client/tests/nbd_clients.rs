//! The NBD server against real clients: qemu-io, qemu-img, nbdinfo, nbdcopy and
//! fio's nbd engine, over a unix socket and over TCP, with in-memory and
//! file-backed devices.

#[path = "nbd_support.rs"]
mod support;

use std::sync::Arc;

use slate::blockdev::{BlockDevice, FileDevice, MemDevice};
use slate::nbd::{ExportConfig, ServerConfig};
use support::{run, run_ok, TestServer};

const MIB: u64 = 1 << 20;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run qemu-io commands against `uri`; fail on a non-zero exit or a failed verification.
async fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args: Vec<&str> = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run_ok("qemu-io", &args).await;
    let text = stdout(&out);
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io reported a failure:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_patterns_over_unix_and_tcp() {
    support::init_tracing();
    let dev = Arc::new(MemDevice::new(64 * MIB));
    let srv = TestServer::start(
        vec![
            (ExportConfig::new("vol"), Arc::clone(&dev) as Arc<dyn BlockDevice>),
            (ExportConfig::new("other"), Arc::new(MemDevice::new(8 * MIB))),
        ],
        ServerConfig::default(),
    )
    .await;
    let unix = srv.unix_uri("vol");
    let tcp = srv.tcp_uri("vol");
    qemu_io(&unix, &["write -P 0xab 0 64k".into(), "read -P 0xab 0 64k".into()]).await;
    // Many offsets, aligned and not, on both transports.
    let mut cmds = Vec::new();
    for (i, (off, len)) in
        [(1u64 << 20, 4096u64), (3 << 20, 1 << 20), (10_000_123, 777), (33 << 20, 65536 + 512)].iter().enumerate()
    {
        let p = 0x10 + i;
        cmds.push(format!("write -P {p:#x} {off} {len}"));
        cmds.push(format!("read -P {p:#x} {off} {len}"));
    }
    qemu_io(&tcp, &cmds).await;
    // Read back over the other transport, and check the neighbours of the unaligned write.
    qemu_io(
        &unix,
        &[
            "read -P 0xab 0 64k".into(),
            "read -P 0x12 10000123 777".into(),
            "read -P 0x0 9999000 1123".into(),
            "read -P 0x0 10000900 100".into(),
            "read -P 0x13 34603008 66048".into(),
        ],
    )
    .await;
    // The device holds exactly what was written.
    let snap = dev.snapshot();
    assert!(snap[..65536].iter().all(|b| *b == 0xab));
    assert!(snap[10_000_123..10_000_900].iter().all(|b| *b == 0x12));
    assert_eq!(snap[10_000_122], 0);
    assert_eq!(snap[10_000_900], 0);
    // The other export is untouched.
    qemu_io(&srv.unix_uri("other"), &["read -P 0 0 8M".into()]).await;
    // A wrong pattern is detected (the check above is not vacuous).
    let out = run("qemu-io", &["-f", "raw", &unix, "-c", "read -P 0xcd 0 4k"]).await;
    assert!(stdout(&out).contains("Pattern verification failed") || !out.status.success());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_nbdcopy_round_trip() {
    support::init_tracing();
    let work = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let dev = FileDevice::create(&work.path().join("backing.img"), size).unwrap();
    let srv = TestServer::start(vec![(ExportConfig::new("vol"), Arc::new(dev))], ServerConfig::default()).await;
    let src = work.path().join("src.img");
    // Random data with a zero hole in the middle, so sparse handling is exercised too.
    let mut data = vec![0u8; size as usize];
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for (i, b) in data.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if !(16 * MIB as usize..24 * MIB as usize).contains(&i) {
            *b = x as u8;
        }
    }
    std::fs::write(&src, &data).unwrap();
    let src_s = src.to_str().unwrap();
    let unix = srv.unix_uri("vol");
    let tcp = srv.tcp_uri("vol");

    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &unix]).await;
    let back = work.path().join("back.img");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &tcp, back.to_str().unwrap()]).await;
    let sums = stdout(&run_ok("sha256sum", &[src_s, back.to_str().unwrap()]).await);
    let lines: Vec<&str> = sums.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(lines[0], lines[1], "qemu-img round trip checksums differ:\n{sums}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &unix]).await;

    // nbdcopy: overwrite the export with other data, then copy it back out.
    for b in &mut data {
        *b = b.wrapping_add(1);
    }
    std::fs::write(&src, &data).unwrap();
    run_ok("nbdcopy", &[src_s, &tcp]).await;
    let back2 = work.path().join("back2.img");
    run_ok("nbdcopy", &[&unix, back2.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(&back2).unwrap(), data, "nbdcopy round trip differs");
    srv.stop().await;
}

/// Parse `nbdinfo --map` output into (offset, length, type) triples.
fn parse_map(text: &str) -> Vec<(u64, u64, u32)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_maps_allocation_after_trim_and_zeroes() {
    support::init_tracing();
    let work = tempfile::tempdir().unwrap();
    let file_dev = FileDevice::create(&work.path().join("f.img"), 16 * MIB).unwrap();
    let srv = TestServer::start(
        vec![
            (
                ExportConfig { description: "in memory".into(), ..ExportConfig::new("alpha") },
                Arc::new(MemDevice::new(16 * MIB)),
            ),
            (ExportConfig::new("beta"), Arc::new(file_dev)),
        ],
        ServerConfig::default(),
    )
    .await;
    let list = stdout(&run_ok("nbdinfo", &["--list", &format!("nbd+unix:///?socket={}", srv.socket.display())]).await);
    assert!(list.contains("alpha") && list.contains("beta"), "nbdinfo --list:\n{list}");
    let info = stdout(&run_ok("nbdinfo", &[&srv.tcp_uri("alpha")]).await);
    for want in [
        "export-size: 16777216",
        "description: in memory",
        "can_multi_conn: true",
        "can_fast_zero: true",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "base:allocation",
    ] {
        assert!(info.contains(want), "nbdinfo lacks {want:?}:\n{info}");
    }
    for name in ["alpha", "beta"] {
        let uri = srv.unix_uri(name);
        // Data at 0..4M; trim 1M..2M; zero (allocated) 2M..3M; zero with unmap 3M..3.5M.
        qemu_io(
            &uri,
            &[
                "write -P 0x11 0 4M".into(),
                "discard 1M 1M".into(),
                "write -z 2M 1M".into(),
                "write -z -u 3M 512k".into(),
            ],
        )
        .await;
        let map = parse_map(&stdout(&run_ok("nbdinfo", &["--map", &uri]).await));
        let type_at = |off: u64| map.iter().find(|(o, l, _)| *o <= off && off < o + l).map(|e| e.2);
        assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 16 * MIB, "{name}: map covers the export: {map:?}");
        assert_eq!(type_at(0), Some(0), "{name}: written data is allocated: {map:?}");
        assert_eq!(type_at(MIB + 4096), Some(3), "{name}: trimmed range is a hole: {map:?}");
        assert_eq!(type_at(3 * MIB + 4096), Some(3), "{name}: unmapped zeroes are a hole: {map:?}");
        assert_eq!(type_at(3 * MIB + 600 * 1024), Some(0), "{name}: data after the zeroes: {map:?}");
        assert_eq!(type_at(8 * MIB), Some(3), "{name}: never written is a hole: {map:?}");
        if name == "alpha" {
            // The memory device keeps NO_HOLE zeroes allocated.
            assert_eq!(type_at(2 * MIB + 4096), Some(2), "{name}: allocated zeroes: {map:?}");
        } else {
            let t = type_at(2 * MIB + 4096).unwrap();
            assert!(t == 0 || t == 2 || t == 3, "{name}: zeroed range: {map:?}");
        }
        qemu_io(&uri, &["read -P 0 1M 1M".into(), "read -P 0 2M 1536k".into(), "read -P 0x11 3584k 512k".into()]).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_at_qd32_and_unaligned() {
    support::init_tracing();
    let work = tempfile::tempdir().unwrap();
    let file_dev = FileDevice::create(&work.path().join("f.img"), 32 * MIB).unwrap();
    let srv = TestServer::start(
        vec![
            (ExportConfig::new("mem"), Arc::new(MemDevice::new(32 * MIB))),
            (ExportConfig::new("file"), Arc::new(file_dev)),
        ],
        ServerConfig::default(),
    )
    .await;
    for (name, uri) in [("mem", srv.unix_uri("mem")), ("file", srv.tcp_uri("file"))] {
        let out = run_ok(
            "fio",
            &[
                "--name=qd32",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=terse",
            ],
        )
        .await;
        check_fio(name, &out);
        // Sub-block sizes at 512-byte alignment: concurrent read-modify-write of shared blocks.
        let out = run_ok(
            "fio",
            &[
                "--name=unaligned",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bsrange=512-12k",
                "--blockalign=512",
                "--iodepth=16",
                "--size=8M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=terse",
            ],
        )
        .await;
        check_fio(name, &out);
    }
    srv.stop().await;
}

/// fio's terse output (v3): field 5 is the job's error, field 48 the KiB written.
fn check_fio(name: &str, out: &std::process::Output) {
    let text = stdout(out);
    println!("fio {name}: {text}");
    let line = text.lines().find(|l| l.starts_with("3;")).expect("terse line");
    let f: Vec<&str> = line.split(';').collect();
    assert_eq!(f[4], "0", "{name}: fio reported an error: {line}");
    let written_kib: u64 = f[47].parse().expect("write KiB");
    assert!(written_kib > 0, "{name}: fio wrote nothing: {line}");
    let read_kib: u64 = f[6].parse().expect("read KiB");
    assert!(read_kib > 0, "{name}: fio verified nothing: {line}");
}
