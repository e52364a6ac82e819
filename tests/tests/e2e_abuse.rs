//! Issue 10 acceptance 3 and 7 on a whole `slate up` cluster (metadata side):
//! - with real storage nodes heartbeating and the demo volume attached (its client polling the
//!   layout), the metadata Raft log does not grow;
//! - refused credentials and an event reported by a host show up in
//!   `slate audit list --security` with their source address, aggregated with a count.

use slate_tests::cluster::{Cluster, UpOptions};
use std::time::{Duration, Instant};

fn commit_index(c: &Cluster) -> u64 {
    let leader = c.meta_leader();
    c.meta_status(&leader.addr).expect("leader status")["commit_index"].as_u64().expect("commit_index")
}

#[test]
fn idle_log_is_still_and_security_events_are_listed_with_their_source() {
    let c = Cluster::start("e2e-abuse", UpOptions::default());
    // The log stops growing: within a few 20 s windows (a fresh cluster still registers,
    // attaches and reports its first zeroing; a loaded machine may delay a heartbeat past
    // the timeout once), one window passes with no entry at all. Heartbeats (every 2 s from
    // 3 nodes) and the client's layout polls (every few seconds) would fill every window.
    std::thread::sleep(Duration::from_secs(6));
    let mut windows = 0;
    loop {
        let before = commit_index(&c);
        std::thread::sleep(Duration::from_secs(20));
        let after = commit_index(&c);
        eprintln!("idle slate up cluster over 20 s: raft commit index {before} -> {after}");
        if after == before {
            break;
        }
        let audit = c.slate_json(&["audit", "list"]);
        let last: Vec<String> = audit["records"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .take(3)
            .map(|r| format!("{} {} {}", r["action"], r["object"], r["result"]))
            .collect();
        eprintln!("  appended meanwhile (latest audit records): {last:?}");
        windows += 1;
        assert!(windows < 4, "heartbeats and layout polls keep appending Raft entries");
    }

    // Refused credentials from this host (a random token), and a host-reported event.
    let bad = c.scratch().join("random.token");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&bad).unwrap();
        let secret: String = (0..64).map(|i| char::from(b"0123456789abcdef"[(i * 7 + 3) % 16])).collect();
        std::io::Write::write_all(&mut f, format!("slate_123456789_{secret}\n").as_bytes()).unwrap();
    }
    for _ in 0..12 {
        let (status, body) = c.api("GET", "/v1/volumes", None, &bad);
        assert!(status == 401 || status == 429, "{status}: {body}");
    }
    let report =
        serde_json::json!({"kind": "nbd-certificate-refused", "source": "203.0.113.9:5555", "detail": "unknown CA"});
    let (status, body) = c.api("POST", "/v1/security-events", Some(&report), &c.host_token_file());
    assert_eq!(status, 202, "{body}");

    // Flushed into the audit within one interval (10 s by default).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let v = c.slate_json(&["audit", "list", "--security"]);
        let records = v.as_array().expect("a list");
        let find = |action: &str, source: &str| {
            records
                .iter()
                .find(|r| r["action"] == action && r["client"].as_str().is_some_and(|s| s.starts_with(source)))
        };
        if let (Some(refused), Some(nbd)) =
            (find("security.unknown-token", "127.0.0.1"), find("security.nbd-certificate-refused", "203.0.113.9"))
        {
            assert!(refused["object"].as_str().unwrap().starts_with("count:"), "{refused}");
            assert!(nbd["result"].as_str().unwrap().contains("unknown CA"), "{nbd}");
            assert!(records.iter().all(|r| r["action"].as_str().unwrap().starts_with("security.")));
            break;
        }
        assert!(Instant::now() < deadline, "security events not listed: {v}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let text = c.slate_ok(&["audit", "list", "--security"]);
    eprintln!("{text}");
    assert!(text.contains("SOURCE") && text.contains("203.0.113.9") && text.contains("security.unknown-token"));
}
