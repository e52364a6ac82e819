//! The `slate-node` binary's other faces, as an operator uses them: the
//! metrics endpoint serves the expected metric names, `keygen` keeps the secret
//! off stdout, `admin` assigns a segment to a running node, SIGINT stops it
//! cleanly, and `demo` runs end to end.

mod common;

use bytes::Bytes;
use common::{bin, block_content, kind_of, scrape, TestNode};
use slate_protocol::{BlockIndex, ErrorKind, Rights};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_expected_names() {
    let mut node = TestNode::start("metrics", &[1]);
    let c = node.client(1, 1, Rights::READ_WRITE).await;
    c.write_blocks(BlockIndex(0), Bytes::from(block_content(0, 1))).await.unwrap();
    c.read_blocks(BlockIndex(0), 1).await.unwrap();
    let _ =
        slate_dataplane::client::NodeClient::connect(node.addr(), node.cap(1, 1, Rights::READ).clone()).await.unwrap();
    let stranger = slate_protocol::capability::generate_signing_key();
    let forged = common::cap_with(&stranger, 1, 1, Rights::READ, 60, vec![common::NODE]);
    assert_eq!(kind_of(slate_dataplane::client::NodeClient::connect(node.addr(), forged).await), ErrorKind::Forged);

    let text = scrape(node.cfg.metrics_listen.unwrap());
    for name in [
        "slate_node_requests_total{op=\"Write\",result=\"Ok\"}",
        "slate_node_requests_total{op=\"Read\",result=\"Ok\"}",
        "slate_node_request_bytes_total{op=\"Write\"}",
        "slate_node_request_duration_seconds_bucket{",
        "slate_node_errors_total{kind=\"Forged\"}",
        "slate_node_sessions_active",
        "slate_node_sessions_opened_total",
        "slate_node_sessions_refused_total{kind=\"Forged\"}",
        "slate_node_connections_active",
        "slate_node_malformed_frames_total",
        "slate_node_extents{state=\"free\"}",
        "slate_node_extents{state=\"owned\"}",
        "slate_node_extents{state=\"dirty\"}",
        "slate_node_extents{state=\"zeroing\"}",
        "slate_node_capacity_bytes",
        "slate_node_zeroed_bytes_total",
        "slate_node_zero_rate_limit_bytes_per_second",
        "slate_node_disk_ops_total{direction=\"write\"}",
        "slate_node_disk_bytes_total{direction=\"read\"}",
        "slate_node_fsyncs_total",
    ] {
        assert!(text.contains(name), "metric {name} missing from:\n{text}");
    }
    drop(c);
    // SIGINT stops the node cleanly, like SIGTERM.
    let status = node.proc.take().unwrap().interrupt().expect("exit on SIGINT");
    assert!(status.success(), "exit status after SIGINT: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_socket_assigns_segments() {
    let mut node = TestNode::start("admin", &[1]);
    let c = node.client(1, 1, Rights::READ_WRITE).await;
    let in_seg1 = BlockIndex(common::SEGMENT_BLOCKS + 5);
    assert_eq!(
        kind_of(c.write_blocks(in_seg1, Bytes::from(block_content(in_seg1.0, 1))).await),
        ErrorKind::NotAssigned
    );
    let cfg = node.config_path.to_str().unwrap().to_owned();
    let out = Command::new(bin())
        .args(["admin", "--config", &cfg, "assign", "--volume", "1", "--segment", "1", "--segment-blocks"])
        .arg(common::SEGMENT_BLOCKS.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "admin assign: {}", String::from_utf8_lossy(&out.stderr));
    c.write_blocks(in_seg1, Bytes::from(block_content(in_seg1.0, 1))).await.expect("write to the new segment");
    let out = Command::new(bin()).args(["admin", "--config", &cfg, "segments"]).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("vol-1 seg-1"), "segments listing: {listing}");
    let out = Command::new(bin())
        .args(["admin", "--config", &cfg, "assign", "--volume", "1", "--segment", "2", "--segment-blocks", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a zero-sized segment is refused");
    drop(c);
    assert!(node.terminate().unwrap().success());
}

#[test]
fn keygen_keeps_the_secret_off_stdout() {
    use std::os::unix::fs::PermissionsExt;
    let dir = slate_tests::scratch_dir("slate-keygen-");
    let path = dir.path().join("signing.key");
    let out = Command::new(bin()).args(["keygen", "--out", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let verifying = stdout.trim();
    assert_eq!(verifying.len(), 64);
    assert!(slate_protocol::capability::verifying_key_from_hex(verifying).is_some());
    let secret = std::fs::read_to_string(&path).unwrap();
    assert_eq!(secret.trim().len(), 64);
    assert!(!stdout.contains(secret.trim()) && !String::from_utf8_lossy(&out.stderr).contains(secret.trim()));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let bytes: [u8; 32] = hex::decode(secret.trim()).unwrap().try_into().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&bytes);
    assert_eq!(hex::encode(key.verifying_key().as_bytes()), verifying);
    // It never overwrites an existing key.
    assert!(!Command::new(bin()).args(["keygen", "--out", path.to_str().unwrap()]).status().unwrap().success());
}

#[test]
fn demo_runs_end_to_end() {
    let dir = slate_tests::scratch_dir("slate-demo-");
    let out = Command::new(bin()).args(["demo", "--dir", dir.path().to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("read them back: identical"), "{stdout}");
    assert!(stdout.contains("node stopped cleanly"), "{stdout}");
}
