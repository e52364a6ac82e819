//! Acceptance 4 (issue 5): no plaintext at rest or in flight; and (issue 10)
//! the data plane carries TLS records only.
//!
//! The whole demo volume is filled with a known text (with `nbdcopy`, over
//! NBD), flushed and read back (so we know the plaintext really went through
//! the system). Meanwhile `tcpdump` captures the data-plane traffic on the
//! storage nodes' ports. Then: no storage node's disk file, no file under the
//! cluster's directory and no byte of the capture holds the text. The capture
//! must hold at least two copies' worth of bytes (both replicas' writes), so an
//! empty or truncated capture cannot make the test pass. `grep` is checked to
//! find the text in the source file, so a broken scan cannot either.

use slate_tests::cluster::{run_ok, sha256_file, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CANARY: &[u8] = b"SLATE-PLAINTEXT-CANARY-0123456789";
/// What is searched for: a part of the canary (so a match split across two writes of the pattern still counts).
const NEEDLE: &str = "PLAINTEXT-CANARY-01234";

/// True when `grep` finds the needle in `path` (recursively for a directory); lists the matching files.
fn grep(path: &Path) -> (bool, String) {
    let out = Command::new("grep")
        .args(["-r", "-l", "-F", "--binary-files=binary", NEEDLE])
        .arg(path)
        .output()
        .expect("run grep");
    match out.status.code() {
        Some(0) => (true, String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(1) => (false, String::new()),
        _ => panic!("grep over {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr)),
    }
}

#[test]
fn no_plaintext_at_rest_or_in_flight() {
    let opts = UpOptions::default();
    let size = opts.volume_size_bytes;
    let cluster = Cluster::start("e2e-plaintext", opts);
    let work = cluster.scratch().to_path_buf();

    // The plaintext image: the canary repeated over the whole volume.
    let src = work.join("canary.img");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create canary image"));
        let line: Vec<u8> = CANARY.iter().copied().cycle().take(1 << 20).collect();
        for _ in 0..size >> 20 {
            f.write_all(&line).expect("write canary image");
        }
        f.flush().expect("flush");
    }
    assert!(grep(&src).0, "grep does not find the canary in its own source file");

    // Capture the data plane: every storage node's port on loopback.
    let ports: Vec<String> =
        cluster.nodes().iter().map(|n| n.addr.rsplit(':').next().expect("port").to_owned()).collect();
    let filter = ports.iter().map(|p| format!("tcp port {p}")).collect::<Vec<_>>().join(" or ");
    let pcap = work.join("data-plane.pcap");
    let tcpdump_log = work.join("tcpdump.log");
    let log = std::fs::File::create(&tcpdump_log).expect("tcpdump log");
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-i", "lo", "-U", "-n", "-B", "65536", "-s", "0", "-w"])
        .arg(&pcap)
        .arg(&filter)
        .stdout(Stdio::null())
        .stderr(log);
    let mut tcpdump = ProcessGuard::spawn("tcpdump", &mut cmd).expect("spawn tcpdump (run as root)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&tcpdump_log).unwrap_or_default().contains("listening on") {
        assert!(tcpdump.is_alive(), "tcpdump exited: {}", std::fs::read_to_string(&tcpdump_log).unwrap_or_default());
        assert!(Instant::now() < deadline, "tcpdump did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("capturing on lo: {filter}");

    // Fill the volume with the canary, flush, and read it back.
    let t = Instant::now();
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&src).arg(cluster.nbd_unix()));
    eprintln!("filled {} MiB with the canary in {:.1} s", size >> 20, t.elapsed().as_secs_f64());
    let back = work.join("back.img");
    run_ok(Command::new("nbdcopy").arg(cluster.nbd_tcp()).arg(&back));
    assert_eq!(sha256_file(&back), sha256_file(&src), "the volume does not return the canary it was given");
    let _ = std::fs::remove_file(&back);

    let status = tcpdump.terminate();
    let tlog = std::fs::read_to_string(&tcpdump_log).unwrap_or_default();
    eprintln!("tcpdump: {status:?}; {}", tlog.lines().filter(|l| l.contains("packets")).collect::<Vec<_>>().join("; "));
    let captured = std::fs::metadata(&pcap).map_or(0, |m| m.len());
    eprintln!("capture: {} MiB", captured >> 20);
    assert!(
        captured >= 2 * size,
        "the capture holds {captured} bytes, less than two copies of the {size} bytes written: it missed traffic"
    );

    // In flight: every byte on the data plane is inside a TLS record (issue 10), and the
    // application data records carry at least both replicas' writes.
    let streams = slate_tests::pcap::tcp_streams(&pcap).expect("the capture reassembles");
    let mut app_bytes = 0;
    for ((from, to), bytes) in &streams {
        let st = slate_tests::pcap::tls_records_only(bytes)
            .unwrap_or_else(|e| panic!("{from} -> {to} carries something other than TLS records: {e}"));
        app_bytes += st.application_bytes;
    }
    eprintln!(
        "{} TCP directions on the data plane, all TLS records; {} MiB of application data",
        streams.len(),
        app_bytes >> 20
    );
    assert!(streams.len() >= 4, "the capture holds {} directions, fewer than two connections", streams.len());
    assert!(app_bytes >= 2 * size, "TLS application data {app_bytes} is less than two copies of {size} bytes");
    let t = Instant::now();
    let (found, _) = grep(&pcap);
    eprintln!("scanned the capture in {:.1} s", t.elapsed().as_secs_f64());
    assert!(!found, "plaintext found in the data-plane capture {}", pcap.display());

    // At rest, after a clean stop: each node's disk file, then everything under the cluster's
    // directory (metadata, logs, ...).
    let nodes = cluster.nodes();
    let mut cluster = cluster;
    cluster.stop();
    for n in nodes {
        let len = std::fs::metadata(&n.data).map(|m| m.len()).expect("node disk file");
        let t = Instant::now();
        let (found, _) = grep(&n.data);
        eprintln!(
            "scanned node-{} disk {} ({} MiB) in {:.1} s",
            n.id,
            n.data.display(),
            len >> 20,
            t.elapsed().as_secs_f64()
        );
        assert!(!found, "plaintext found on node-{}'s disk {}", n.id, n.data.display());
    }
    let (found, files) = grep(cluster.dir());
    assert!(!found, "plaintext found under the cluster directory in: {files}");
    let _ = std::fs::remove_file(&pcap);
}
