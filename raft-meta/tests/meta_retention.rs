//! Bounded logs on real `slate-meta` processes: with a small audit budget the replicated
//! audit chain stays bounded across thousands of calls and verifies from its anchor
//! (online and offline, and a tampered kept record or anchor is caught offline); with a
//! small snapshot interval and log file size the Raft log directory stays bounded too.

mod meta_common;

use meta_common::{Cluster, BIN};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const CALLS: usize = 4000;
const WORKERS: usize = 8;
const AUDIT_MAX: u64 = 100;
const SNAPSHOT_EVERY: u64 = 200;
const LOG_FILE_BYTES: u64 = 64 << 10;
const LOG_PURGE_BYTES: u64 = 256 << 10;

fn dir_bytes(dir: &Path) -> u64 {
    Cluster::files_under(dir).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

fn audit_verify(data_dir: &Path) -> (Option<i32>, Value) {
    let out = Command::new(BIN).args(["audit-verify", "--data-dir"]).arg(data_dir).output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_and_raft_logs_stay_bounded_and_verify_from_the_anchor() {
    let tune = |toml: &str| {
        let mut out = String::new();
        for line in toml.lines() {
            let line = match line.split(" = ").next() {
                Some("log_file_bytes") => format!("log_file_bytes = {LOG_FILE_BYTES}"),
                Some("log_purge_bytes") => format!("log_purge_bytes = {LOG_PURGE_BYTES}"),
                _ => line.to_string(),
            };
            out.push_str(&line);
            out.push('\n');
        }
        assert!(out.contains(&format!("log_purge_bytes = {LOG_PURGE_BYTES}")), "meta.toml names the Raft log sizes");
        out
    };
    let mut c = Cluster::start_edited(3, SNAPSHOT_EVERY, tune).await;
    let s = c.op_ok(Method::PATCH, "/v1/settings", Some(json!({"audit_max_records": AUDIT_MAX}))).await;
    assert_eq!(s["audit_max_records"], AUDIT_MAX, "{s}");

    // Thousands of audited calls (each one Raft entry and one audit record), spread over the nodes.
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (client, token, api) = (c.client.clone(), c.token.clone(), c.api.clone());
        tasks.spawn(async move {
            for k in 0..CALLS / WORKERS {
                let url = format!("https://{}/v1/whoami", api[(w + k) % api.len()]);
                let r = client.get(&url).bearer_auth(&token).send().await.unwrap();
                assert!(r.status().is_success(), "call {k} of worker {w}: {}", r.status());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // Some state changes among them, named so they can be found.
    for i in 0..10 {
        c.tenant(&format!("kept-{i}")).await;
    }

    let page = c.op_ok(Method::GET, "/v1/audit?limit=10000", None).await;
    let records = page["records"].as_array().unwrap();
    let anchor = &page["anchor"];
    println!("kept {} records, anchor {anchor}", records.len());
    assert!(records.len() as u64 <= AUDIT_MAX, "{} records kept", records.len());
    let anchor_seq = anchor["seq"].as_u64().expect("the chain is anchored");
    assert!(anchor_seq as usize >= CALLS - AUDIT_MAX as usize, "anchor at {anchor_seq}");
    assert_eq!(records[0]["seq"].as_u64(), Some(anchor_seq + 1));
    assert_eq!(records[0]["prev_hash"], anchor["hash"]);
    assert!(records.iter().any(|r| r["action"] == "audit.pruned" && r["actor"] == "system"));
    assert!(records.iter().any(|r| r["action"] == "tenant.create" && r["object"].as_str().unwrap().contains("kept-9")));
    let rep = c.op_ok(Method::GET, "/v1/audit/verify", None).await;
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(rep["anchor"]["seq"], anchor_seq);

    c.wait_caught_up().await;
    let applied = c.status(0).await.unwrap()["applied_index"].as_u64().unwrap();
    assert!(applied as usize > CALLS, "applied index {applied}");
    c.stop_all();

    let mut audits = Vec::new();
    for i in 0..3 {
        let data = c.data_dir(i);
        // The Raft log: snapshots every SNAPSHOT_EVERY entries compact it, and files past the
        // purge threshold are deleted, so it stays near the threshold plus a file or two
        // although far more was appended (the same run without purging leaves ~1.07 MB).
        let raft_log = dir_bytes(&data.join("raft/raft-log"));
        let raft_all = dir_bytes(&data.join("raft"));
        let state = std::fs::metadata(data.join("state/state.json")).unwrap().len();
        println!("node {i}: raft-log {raft_log} B, raft {raft_all} B, state.json {state} B");
        assert!(raft_log < LOG_PURGE_BYTES + 4 * LOG_FILE_BYTES, "node {i}: raft-log holds {raft_log} B");
        // The state (and so each snapshot) holds at most AUDIT_MAX records.
        assert!(state < 256 << 10, "node {i}: state.json is {state} B");
        let (code, report) = audit_verify(&data);
        assert_eq!(code, Some(0), "node {i}: {report}");
        assert!(report["anchor"]["seq"].as_u64().unwrap() >= anchor_seq, "node {i}: {report}");
        let st: Value = serde_json::from_slice(&std::fs::read(data.join("state/state.json")).unwrap()).unwrap();
        audits.push(st["audit"].clone());
    }
    // Every replica pruned exactly the same records.
    assert_eq!(audits[0], audits[1]);
    assert_eq!(audits[0], audits[2]);

    // Offline verify still names a tampered kept record...
    let path = c.data_dir(0).join("state/state.json");
    let original = std::fs::read(&path).unwrap();
    let mut st: Value = serde_json::from_slice(&original).unwrap();
    let victim = st["audit"]["records"][5]["seq"].as_u64().unwrap();
    st["audit"]["records"][5]["client"] = json!("10.9.9.9:1");
    std::fs::write(&path, serde_json::to_vec(&st).unwrap()).unwrap();
    let (code, report) = audit_verify(&c.data_dir(0));
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_broken"], victim, "{report}");
    // ...and a tampered anchor breaks the chain at the first kept record.
    let mut st: Value = serde_json::from_slice(&original).unwrap();
    let first = st["audit"]["records"][0]["seq"].as_u64().unwrap();
    st["audit"]["anchor"]["hash"] = json!("ab".repeat(32));
    std::fs::write(&path, serde_json::to_vec(&st).unwrap()).unwrap();
    let (code, report) = audit_verify(&c.data_dir(0));
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_broken"], first, "{report}");
}
