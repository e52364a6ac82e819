//! Acceptance 4 (issue 10): revoking a grant fences the live attachment.
//!
//! A host principal with a read-write grant attaches a fresh volume through the
//! real `slate attach` and writes through its NBD socket. The operator deletes
//! the grant. Within a bounded time (storage nodes learn the fence with their
//! next heartbeat reply, every 2 s), the holder's next write fails, in every
//! segment, while the attachment is gone from slate-meta and its capability can
//! no longer be refreshed. A positive control writes first and is seen to work.

use serde_json::Value;
use slate_tests::cluster::{nbd_unix_uri, qemu_io, qemu_io_ok, Cluster, UpOptions};
use std::time::{Duration, Instant};

const SEGMENT_BYTES: u64 = 16 << 20;
/// Nodes heartbeat every 2 s; the fence must land well within this.
const BOUND: Duration = Duration::from_secs(20);

/// One write per segment; how many failed, and the output.
fn try_writes(uri: &str, pattern: u8) -> (usize, usize, String) {
    let cmds: Vec<String> = (0..4).map(|s| format!("write -P 0x{pattern:02x} {} 64k", s * SEGMENT_BYTES)).collect();
    let out = qemu_io(uri, &cmds);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (text.lines().filter(|l| l.contains("write failed")).count(), cmds.len(), text)
}

#[test]
fn revoking_a_grant_fences_the_live_attachment() {
    let opts = UpOptions { segment_blocks: Some(SEGMENT_BYTES / 4096), ..UpOptions::default() };
    let cluster = Cluster::start("e2e-revocation", opts);
    let tenant = cluster.volume_show("demo")["tenant"].as_u64().expect("tenant");
    let vol = cluster.slate_json(&["volume", "create", "rev", "--size", "64M", "--tenant", &tenant.to_string()]);
    let vol_id = vol["id"].as_u64().expect("volume id");
    let (principal, token) = cluster.host_principal("revoked-host", tenant);
    let grant = cluster.slate_json(&[
        "grant",
        "create",
        "--principal",
        &principal.to_string(),
        "--volume",
        "rev",
        "--access",
        "read_write",
    ]);
    let grant_id = grant["id"].as_u64().expect("grant id");

    // The host attaches through the real CLI and writes (positive control).
    let sock = cluster.scratch().join("rev.sock");
    let mut cmd = cluster.slate();
    cmd.arg("--token-file").arg(&token).args(["attach", "rev", "--export-name", "rev", "--nbd-unix"]).arg(&sock);
    let log_path = cluster.scratch().join("attach-rev.log");
    let log = std::fs::File::create(&log_path).expect("log");
    cmd.stdout(log.try_clone().expect("dup")).stderr(log);
    let mut attach = slate_tests::ProcessGuard::spawn("slate attach rev", &mut cmd).expect("spawn");
    assert!(
        slate_tests::cluster::wait_for_unix_socket(&sock, Duration::from_mins(2)) && attach.is_alive(),
        "slate attach rev did not come up:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let uri = nbd_unix_uri("rev", &sock);
    let (failed, n, text) = try_writes(&uri, 0x11);
    assert_eq!(failed, 0, "the granted host could not write ({n} writes):\n{text}");
    qemu_io_ok(&uri, &["read -P 0x11 0 64k".into()]);
    let before = cluster.volume_show("rev");
    let gen_before = before["generation"].as_u64().expect("generation");
    assert_eq!(before["attachments"].as_array().map(Vec::len), Some(1));
    let aid = before["attachments"][0]["id"].as_u64().expect("attachment id");

    // Revoke the grant.
    let revoked = cluster.slate_json(&["grant", "delete", &grant_id.to_string()]);
    eprintln!("grant delete: {revoked}");
    let t = Instant::now();
    let after = cluster.volume_show("rev");
    assert!(after["attachments"].as_array().is_none_or(Vec::is_empty), "the attachment survived: {after}");
    assert!(after["generation"].as_u64() > Some(gen_before), "the generation did not move: {after}");

    // Within the bound, every write of the holder fails.
    let mut last = String::new();
    loop {
        let (failed, n, text) = try_writes(&uri, 0x22);
        if failed == n {
            eprintln!("fenced after {:.1} s: all {n} writes failed", t.elapsed().as_secs_f64());
            break;
        }
        last = text;
        assert!(t.elapsed() < BOUND, "still writing {:?} after the revocation:\n{last}", t.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = last;
    // And again a moment later: the fence holds.
    std::thread::sleep(Duration::from_secs(3));
    let (failed, n, text) = try_writes(&uri, 0x33);
    assert_eq!(failed, n, "a revoked holder wrote:\n{text}");

    // Its capability no longer renews: the attachment is gone in slate-meta.
    let (status, body): (u16, Value) =
        cluster.api("POST", &format!("/v1/volumes/{vol_id}/attachments/{aid}/capability"), None, &token);
    assert!(status >= 400, "a revoked attachment's capability was renewed: {status} {body}");
    // The revocation is in the audit chain.
    let audit = cluster.slate_json(&["audit", "list"]);
    let rec = audit["records"].as_array().or(audit.as_array()).expect("records").iter().any(|r| {
        r["action"] == "grant.delete" && r["object"].as_str().is_some_and(|o| o.contains("fenced generation"))
    });
    assert!(rec, "no audit record of the fence");
    let _ = attach.terminate();
}
