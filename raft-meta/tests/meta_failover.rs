//! Three `slate-meta` processes take a stream of tenant, volume and attach
//! calls; the leader is killed with SIGKILL mid-stream; a new leader takes
//! over, and after all three are restarted every acknowledged create is there.

mod meta_common;

use meta_common::Cluster;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Sends to running nodes in turn until one answers something other than 503 (or the deadline passes).
async fn send(c: &Cluster, start: &mut usize, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        *start = (*start + 1) % c.api.len();
        if !c.running(*start) {
            continue;
        }
        let (st, v) = c.op(*start, method.clone(), path, Some(body.clone())).await;
        if st != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            return (st, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_leader_kill_and_full_restart() {
    let mut c = Cluster::start(3).await;
    for i in 1..=3 {
        c.storage_node(&format!("n{i}"), &format!("z/r/h{i}")).await;
    }
    let mut tenants: Vec<(u64, String)> = Vec::new();
    let mut volumes: Vec<(u64, String)> = Vec::new();
    let mut attachments: Vec<(u64, u64, u64)> = Vec::new();
    let mut next = 0usize;
    let mut killed = None;
    for i in 0..40 {
        if i == 15 {
            let leader = c.wait_ready().await;
            c.kill9(leader);
            killed = Some(leader);
        }
        if i % 5 == 0 {
            let name = format!("tenant-{i}");
            let (st, v) = send(&c, &mut next, Method::POST, "/v1/tenants", json!({"name": name})).await;
            if st == StatusCode::OK {
                tenants.push((v["id"].as_u64().unwrap(), name));
            }
        }
        let Some((tenant, _)) = tenants.last().cloned() else { continue };
        let name = format!("vol-{i}");
        let (st, v) = send(
            &c,
            &mut next,
            Method::POST,
            "/v1/volumes",
            json!({"name": name, "size_bytes": 1u64 << 30, "replicas": 2, "tenant": tenant}),
        )
        .await;
        if st != StatusCode::OK {
            // Only an ambiguous outcome (the node died mid-call, then the retry found the name taken) is allowed.
            assert!(st == StatusCode::CONFLICT || st == StatusCode::SERVICE_UNAVAILABLE, "{st}: {v}");
            continue;
        }
        let vol = v["id"].as_u64().unwrap();
        volumes.push((vol, name));
        let (st, v) = send(
            &c,
            &mut next,
            Method::POST,
            &format!("/v1/volumes/{vol}/attach"),
            json!({"mode": "read_write", "host": format!("hv-{i}")}),
        )
        .await;
        if st == StatusCode::OK {
            attachments.push((
                vol,
                v["attachment"]["id"].as_u64().unwrap(),
                v["attachment"]["generation"].as_u64().unwrap(),
            ));
        }
    }
    assert!(killed.is_some());
    assert!(volumes.len() >= 30, "most of the stream was acknowledged: {}", volumes.len());
    assert!(!attachments.is_empty());

    // Bring the killed node back, then restart the whole cluster.
    c.spawn(killed.unwrap());
    c.wait_ready().await;
    c.stop_all();
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_ready().await;

    for (id, name) in &tenants {
        let v = c.op_ok(Method::GET, &format!("/v1/tenants/{id}"), None).await;
        assert_eq!(&v["name"], name);
    }
    for (id, name) in &volumes {
        let v = c.op_ok(Method::GET, &format!("/v1/volumes/{id}"), None).await;
        assert_eq!(&v["name"], name);
    }
    for (vol, att, generation) in &attachments {
        let v = c.op_ok(Method::GET, &format!("/v1/volumes/{vol}"), None).await;
        let a = v["attachments"].as_array().unwrap().iter().find(|a| a["id"] == *att).cloned();
        let a = a.unwrap_or_else(|| panic!("attachment {att} of vol {vol} lost: {v}"));
        assert_eq!(a["generation"], *generation);
    }
    // Every node answers the same (reads go through the log, so any node will do).
    c.wait_caught_up().await;
    let lists: Vec<Value> = volume_lists(&c).await;
    assert!(lists.windows(2).all(|w| w[0] == w[1]), "nodes disagree after restart");
    let rep = c.op_ok(Method::GET, "/v1/audit/verify", None).await;
    assert_eq!(rep["ok"], true);
}

async fn volume_lists(c: &Cluster) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..3 {
        let (st, v) = c.op(i, Method::GET, "/v1/volumes", None).await;
        assert_eq!(st, StatusCode::OK);
        // Compare what is stored (the DEK age in each reply depends on the call's time).
        let projected: Vec<Value> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|v| json!([v["id"], v["name"], v["generation"], v["segments"], v["attachments"]]))
            .collect();
        out.push(Value::Array(projected));
    }
    out
}
