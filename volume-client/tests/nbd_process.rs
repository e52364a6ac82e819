//! The NBD server as its own process: it serves a file-backed export on a unix
//! socket and TCP, real clients write through it, and SIGTERM makes it stop
//! accepting, finish, flush and exit 0 even with a client still connected.
//!
//! The server process is this test binary run again with `SLATE_NBD_CHILD_DIR`
//! set, which turns `child_server_entry_point` into the server's `main`.

#[path = "nbd_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use slate::blockdev::FileDevice;
use slate::nbd::{ExportConfig, ExportRegistry, NbdServer, ServerConfig};
use support::{run_ok, tcp_stream, RawClient};
use tokio::signal::unix::{signal, SignalKind};

const CHILD_ENV: &str = "SLATE_NBD_CHILD_DIR";

#[test]
fn child_server_entry_point() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let dir = PathBuf::from(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate()).unwrap();
        let mut int = signal(SignalKind::interrupt()).unwrap();
        let dev = FileDevice::open(&dir.join("disk.img")).unwrap();
        let exports = ExportRegistry::new();
        exports.add(ExportConfig::new("disk"), Arc::new(dev)).unwrap();
        let config = ServerConfig { shutdown_grace: Duration::from_secs(10), ..ServerConfig::default() };
        let server = NbdServer::new(exports, config).unwrap();
        let unix = tokio::net::UnixListener::bind(dir.join("nbd.sock")).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        std::fs::write(dir.join("port.tmp"), tcp.local_addr().unwrap().port().to_string()).unwrap();
        std::fs::rename(dir.join("port.tmp"), dir.join("port")).unwrap();
        let (s1, s2) = (server.clone(), server.clone());
        let u = tokio::spawn(async move { s1.serve_unix(unix).await });
        let t = tokio::spawn(async move { s2.serve_tcp(tcp).await });
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        server.shutdown().await;
        u.await.unwrap().unwrap();
        t.await.unwrap().unwrap();
        std::fs::write(dir.join("stopped"), "ok").unwrap();
    });
}

async fn wait_for(path: &Path) {
    for _ in 0..300 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} did not appear", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_process_serves_clients_and_exits_cleanly_on_sigterm() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_server_entry_point", "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("port")).await;
    let port: u16 = std::fs::read_to_string(dir.path().join("port")).unwrap().trim().parse().unwrap();
    let unix_uri = format!("nbd+unix:///disk?socket={}", dir.path().join("nbd.sock").display());
    let tcp_uri = format!("nbd://127.0.0.1:{port}/disk");

    run_ok("qemu-io", &["-f", "raw", &unix_uri, "-c", "write -P 0x3c 0 1M", "-c", "write -P 0x3d 5000 3000"]).await;
    run_ok("qemu-io", &["-f", "raw", &tcp_uri, "-c", "read -P 0x3c 0 5000", "-c", "read -P 0x3d 5000 3000"]).await;
    run_ok(
        "fio",
        &[
            "--name=proc",
            "--ioengine=nbd",
            &format!("--uri={tcp_uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--offset=8M",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    )
    .await;

    // A client that stays connected must not keep the server from stopping.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut idle = RawClient::go(tcp_stream(addr).await, "disk", true, false).await.unwrap();
    assert_eq!(idle.read(0, 4096).await.data, vec![0x3c; 4096]);

    let pid = child.id().unwrap().to_string();
    run_ok("kill", &["-TERM", &pid]).await;
    let status = tokio::time::timeout(Duration::from_mins(1), child.wait()).await.expect("server exits").unwrap();
    assert!(status.success(), "server exited with {status}");
    assert!(dir.path().join("stopped").exists(), "server went through its shutdown path");
    assert!(idle.reply().await.is_err(), "the idle connection was closed");

    let bytes = std::fs::read(&disk).unwrap();
    assert!(bytes[..5000].iter().all(|b| *b == 0x3c));
    assert!(bytes[5000..8000].iter().all(|b| *b == 0x3d));
    assert!(bytes[8000..1 << 20].iter().all(|b| *b == 0x3c));
}
