//! `slate up` and the CLI around it, as the issue describes them for users:
//! - management commands find the cluster with no flags from the directory
//!   above `slate-data` (and through `SLATE_CLUSTER`);
//! - a second `slate up` on a running directory is refused and leaves the
//!   running cluster (and its `cluster.json`) alone;
//! - with the metadata service down to one of three nodes (two killed with
//!   `kill -9`), a management command fails within seconds with a clear error
//!   and never hangs, while the data plane (which never passes through the
//!   metadata service) keeps serving the attached volume;
//! - Ctrl-C (SIGINT) stops every process `slate up` started, and removes
//!   `cluster.json`; the CLI then says no cluster is running.

use rustix::process::Signal;
use slate_tests::cluster::{kill9, qemu_io_ok, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` with a deadline (a hang detector, not a timing check); returns (success, stdout+stderr).
fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let out_path = std::env::temp_dir().join(format!("e2e-up-{}-{}.out", std::process::id(), rand_suffix()));
    let f = std::fs::File::create(&out_path).expect("output file");
    cmd.stdout(f.try_clone().expect("dup")).stderr(f);
    let mut p = ProcessGuard::spawn("cli", cmd).expect("spawn");
    let t = Instant::now();
    while p.is_alive() && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let hung = p.is_alive();
    let status = p.terminate();
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    assert!(!hung, "{cmd:?} was still running after {limit:?}:\n{text}");
    (status.is_some_and(|s| s.success()), text)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[test]
fn slate_up_cli_discovery_quorum_loss_and_sigint() {
    let mut cluster = Cluster::start("e2e-up", UpOptions::default());
    let slate = Cluster::slate_bin();
    let above = cluster.dir().parent().expect("parent").to_path_buf();

    // No flags: ./slate-data/cluster.json.
    let out = Command::new(&slate).args(["--json", "volume", "list"]).current_dir(&above).output().expect("run");
    assert!(out.status.success(), "slate volume list with no flags: {}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(list.as_array().is_some_and(|a| a.iter().any(|v| v["name"] == "demo")), "no demo volume in {list}");
    // SLATE_CLUSTER from anywhere.
    let out = Command::new(&slate)
        .args(["node", "list"])
        .env("SLATE_CLUSTER", cluster.cluster_json_path())
        .current_dir("/")
        .output()
        .expect("run");
    assert!(out.status.success(), "slate node list with SLATE_CLUSTER: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("slate node list:\n{}", String::from_utf8_lossy(&out.stdout));

    // Quorum loss: two of three metadata nodes killed.
    let metas = cluster.info().role("meta").into_iter().cloned().collect::<Vec<_>>();
    for m in &metas[..2] {
        eprintln!("kill -9 slate-meta {} (pid {})", m.id, m.pid);
        kill9(m.pid);
    }
    let t = Instant::now();
    let (ok, text) = run_bounded(cluster.slate().args(["volume", "list"]), Duration::from_mins(1));
    eprintln!("volume list without quorum: failed={} after {:.1} s: {}", !ok, t.elapsed().as_secs_f64(), text.trim());
    assert!(!ok, "a management command succeeded without a metadata quorum");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("quorum") || lower.contains("unavailable") || lower.contains("not running"),
        "unclear error without quorum: {text}"
    );
    // The data plane does not need the metadata service.
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x22 1M 1M".into(), "read -P 0x22 1M 1M".into()]);
    qemu_io_ok(&cluster.nbd_tcp(), &["read -P 0x22 1M 1M".into()]);
    // The data path's stage histograms saw those requests, on the client and on the nodes.
    let client = cluster.process_metric_sum("client", "slate_client_stage_seconds_count{stage=\"client_total\"}");
    let encrypt = cluster.process_metric_sum("client", "slate_client_stage_seconds_count{stage=\"encrypt\"}");
    let node = cluster.process_metric_sum("node", "slate_node_stage_seconds_count{stage=\"node_total\"}");
    eprintln!("stage counts: client_total {client}, encrypt {encrypt}, node_total {node}");
    assert!(client >= 2.0 && encrypt >= 1.0, "the client's stage histograms missed the NBD requests");
    assert!(node >= 2.0, "the nodes' stage histograms missed the replica writes");

    // Ctrl-C stops everything and removes cluster.json.
    let t = Instant::now();
    cluster.stop_with(Signal::INT);
    eprintln!("stopped by SIGINT in {:.1} s", t.elapsed().as_secs_f64());
    let (ok, text) = run_bounded(
        Command::new(&slate).args(["volume", "list"]).current_dir(&above).stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    assert!(!ok, "slate volume list succeeded with no cluster running");
    eprintln!("with no cluster: {}", text.trim());
    assert!(text.contains("slate up"), "the error does not say how to start a cluster: {text}");
}

#[test]
fn second_slate_up_is_refused_and_changes_nothing() {
    let cluster = Cluster::start("e2e-up-twice", UpOptions::default());
    let slate = Cluster::slate_bin();
    // A second `slate up` on the same directory is refused and changes nothing.
    let before = std::fs::read_to_string(cluster.cluster_json_path()).expect("cluster.json");
    let (ok, text) = run_bounded(
        Command::new(&slate).arg("up").arg("--dir").arg(cluster.dir()).stdin(Stdio::null()),
        Duration::from_mins(1),
    );
    eprintln!("second slate up: {}", text.trim());
    assert!(!ok, "a second slate up on a running directory succeeded");
    assert!(text.contains("already running"), "unclear refusal: {text}");
    let after = std::fs::read_to_string(cluster.cluster_json_path()).unwrap_or_default();
    assert_eq!(after, before, "a refused second slate up removed or changed the running cluster's cluster.json");
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x21 0 1M".into(), "read -P 0x21 0 1M".into()]);
}
