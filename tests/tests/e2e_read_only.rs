//! A read-only attachment (`slate attach --read-only`, with a read-only grant)
//! served next to the read-write one: it reads what the writer wrote, refuses
//! writes with EPERM, and keeps serving after an NBD FLUSH (which the protocol
//! allows on a read-only export, and which libnbd and the kernel client send),
//! on that connection and on others. It stops cleanly on SIGTERM.

use slate_tests::cluster::{qemu_io, qemu_io_ok, qemu_io_ok_with, run_ok, wait_for_unix_socket, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::process::Command;
use std::time::Duration;

const PY_FLUSH_THEN_READ: &str = r"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.is_read_only(), 'the export is not read-only'
assert bytes(h.pread(65536, 0)) == b'\x77' * 65536, 'read before the flush'
h.flush()
assert bytes(h.pread(65536, 0)) == b'\x77' * 65536, 'read after the flush'
h2 = nbd.NBD()
h2.connect_uri(sys.argv[1])
assert bytes(h2.pread(65536, 0)) == b'\x77' * 65536, 'read on another connection after the flush'
print('flush on a read-only export: ok')
";

#[test]
fn read_only_attachment_serves_reads_and_survives_flush() {
    let cluster = Cluster::start("e2e-read-only", UpOptions::default());
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x77 0 64k".into(), "flush".into()]);

    let sock = cluster.scratch().join("ro.sock");
    let log_path = cluster.scratch().join("ro-attach.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut cmd = cluster.slate();
    cmd.arg("--token-file")
        .arg(cluster.host_token_file())
        .args(["attach", "demo", "--read-only", "--host", "reader", "--nbd-unix"])
        .arg(&sock)
        .stdout(log.try_clone().expect("dup"))
        .stderr(log);
    let mut ro = ProcessGuard::spawn("slate attach --read-only", &mut cmd).expect("spawn");
    assert!(wait_for_unix_socket(&sock, Duration::from_mins(1)), "the read-only attach did not come up");
    let uri = format!("nbd+unix:///demo?socket={}", sock.display());

    qemu_io_ok_with(&["-r"], &uri, &["read -P 0x77 0 64k".into()]);
    // A write through a read-only export is refused (qemu-io without -r opens it read-write and fails,
    // or the write gets EPERM).
    let out = qemu_io(&uri, &["write -P 0x11 0 4k".into()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() || text.contains("failed"), "a write through a read-only export succeeded: {text}");

    let out = run_ok(Command::new("/usr/bin/python3").arg("-c").arg(PY_FLUSH_THEN_READ).arg(&uri));
    eprint!("{out}");
    qemu_io_ok_with(&["-r"], &uri, &["read -P 0x77 0 64k".into()]);

    let status = ro.terminate();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "the read-only attach did not stop cleanly: {status:?}\n{text}");
    assert!(!text.contains("ERROR"), "the read-only attach logged an error:\n{text}");
    // The writer was not disturbed.
    qemu_io_ok(&cluster.nbd_unix(), &["read -P 0x77 0 64k".into()]);
}
