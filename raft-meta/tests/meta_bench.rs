//! Metadata benchmark (ignored by default; prints figures):
//! `cargo test --release -p slate-meta --test meta_bench -- --ignored --nocapture`
//!
//! Three `slate-meta` processes on loopback. Measures volume create and
//! read-write attach: throughput with 16 calls in flight (spread over all three
//! nodes, so followers forward to the leader) and latency percentiles, and the
//! same one call at a time. Every call is a Raft commit with an fsync on a
//! majority, plus the audit record.

mod meta_common;

use meta_common::Cluster;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `per_mille`-th percentile (nearest rank), in milliseconds.
fn pct(sorted: &[Duration], per_mille: usize) -> f64 {
    let i = ((sorted.len() - 1) * per_mille).div_ceil(1000);
    sorted[i].as_secs_f64() * 1000.0
}

async fn run_phase<F, Fut>(name: &str, total: usize, inflight: usize, f: F) -> Vec<u64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (Duration, Option<u64>)> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let f = Arc::clone(&f);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return out;
                }
                out.push(f(i).await);
            }
        }));
    }
    let mut lat = Vec::new();
    let mut ids = Vec::new();
    for t in tasks {
        for (d, id) in t.await.unwrap() {
            lat.push(d);
            ids.extend(id);
        }
    }
    let wall = started.elapsed();
    lat.sort();
    println!(
        "{name:<34} {total:>5} ops  {:>8.1} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        total as f64 / wall.as_secs_f64(),
        pct(&lat, 500),
        pct(&lat, 990),
        pct(&lat, 1000)
    );
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with --ignored --nocapture (preferably --release)"]
async fn metadata_ops_per_second() {
    let c = Arc::new(Cluster::start(3).await);
    let tenant = c.tenant("bench").await;
    for i in 1..=3 {
        c.storage_node(&format!("n{i}"), &format!("z/r/h{i}")).await;
    }
    println!("slate-meta benchmark: 3 nodes on loopback, every call committed through Raft and audited");
    for (label, inflight, total, offset) in [("sequential", 1, 200, 0usize), ("16 in flight", 16, 800, 100_000)] {
        let c1 = Arc::clone(&c);
        let ids = run_phase(&format!("create volume ({label})"), total, inflight, move |i| {
            let c = Arc::clone(&c1);
            async move {
                let body = json!({"name": format!("b{}", i + offset), "size_bytes": 1u64 << 30, "replicas": 2, "tenant": tenant});
                let t = Instant::now();
                let (st, v) = c.op(i % 3, Method::POST, "/v1/volumes", Some(body)).await;
                assert_eq!(st, StatusCode::OK, "{v}");
                (t.elapsed(), v["id"].as_u64())
            }
        })
        .await;
        let ids = Arc::new(ids);
        let c2 = Arc::clone(&c);
        run_phase(&format!("attach read-write ({label})"), total, inflight, move |i| {
            let c = Arc::clone(&c2);
            let ids = Arc::clone(&ids);
            async move {
                let body = json!({"mode": "read_write", "host": "bench"});
                let t = Instant::now();
                let (st, v) = c.op(i % 3, Method::POST, &format!("/v1/volumes/{}/attach", ids[i]), Some(body)).await;
                assert_eq!(st, StatusCode::OK, "{v}");
                (t.elapsed(), None)
            }
        })
        .await;
    }
}
