//! Issue 10, acceptance 3 and 7 (metadata side), with real `slate-meta` processes:
//!
//! * an idle cluster with heartbeating storage nodes and an attached client polling its
//!   layout appends no Raft entry;
//! * 10,000 requests with random tokens add no Raft entry and no audit record of their own
//!   (only the aggregated security records), each refused in well under 1 ms at p99
//!   (server-side histogram; client-side figures printed);
//! * afterwards the operator and host principals work, and a flood against a known token id
//!   does not lock out its holder;
//! * rate limits answer 429 with Retry-After, per source and per principal;
//! * every security event kind has its metric and an audit record naming its source.

mod meta_common;

use meta_common::Cluster;
use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// The text exposition of node `i`'s metrics.
async fn metrics(c: &Cluster, i: usize) -> String {
    c.client.get(format!("https://{}/metrics", c.api[i])).send().await.unwrap().text().await.unwrap()
}

/// The value of one sample (`name{labels}` exactly as exposed), or 0 when absent.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The smallest histogram bucket bound holding `q` of the observations.
fn quantile_bound(text: &str, histogram: &str, percent: u64) -> (f64, u64) {
    let count = sample(text, &format!("{histogram}_count"));
    let mut buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{histogram}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, v) = rest.split_once("\"} ")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, v.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let need = (count * percent).div_ceil(100);
    (buckets.iter().find(|(_, n)| *n >= need).map_or(f64::INFINITY, |b| b.0), count)
}

/// Commit index and audit record count as node `i` reports them (neither read proposes anything).
async fn index_and_audit(c: &Cluster, i: usize) -> (u64, u64) {
    let s = c.status(i).await.expect("status");
    let m = metrics(c, i).await;
    (
        s["commit_index"].as_u64().or_else(|| s["commit"].as_u64()).expect("commit index in status"),
        sample(&m, "slate_meta_audit_records"),
    )
}

/// POSTs a heartbeat for `node` to whichever member accepts it (followers answer 503).
async fn heartbeat(c: &Cluster, token: &str, node: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for i in 0..c.api.len() {
            let (st, v) = c.req(i, Method::POST, &format!("/v1/nodes/{node}/heartbeat"), None, Some(token)).await;
            if st.is_success() {
                return v;
            }
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "heartbeat: {v}");
        }
        assert!(Instant::now() < deadline, "no member accepted the heartbeat");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn random_token() -> String {
    let mut rng = rand::thread_rng();
    let secret: [u8; 32] = rng.gen();
    format!("slate_{}_{}", rng.gen_range(1u64..1 << 53), hex::encode(secret))
}

/// Sum of the counts of the `security.<kind>` audit records (asserting each names a source).
fn security_count(records: &[Value], kind: &str, source: &str) -> u64 {
    records
        .iter()
        .filter(|r| r["action"] == format!("security.{kind}") && r["client"] == source)
        .map(|r| {
            let object = r["object"].as_str().unwrap();
            object.split_whitespace().next().unwrap().trim_start_matches("count:").parse::<u64>().unwrap()
        })
        .sum()
}

/// Operator's view of the whole chain.
async fn audit(c: &Cluster) -> Vec<Value> {
    c.op_ok(Method::GET, "/v1/audit?limit=10000", None).await["records"].as_array().unwrap().clone()
}

/// Restarts every member with some `[guard]` settings changed (`key = value` lines).
async fn reconfigure(c: &mut Cluster, settings: &[(&str, u64)]) {
    c.stop_all();
    for i in 0..c.api.len() {
        let p = c.node_dir(i).join("meta.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let (head, guard) = text.split_once("[guard]\n").expect("a [guard] section");
        let guard: Vec<String> = guard
            .lines()
            .map(|l| {
                let key = l.split(" = ").next().unwrap_or_default();
                settings.iter().find(|(k, _)| *k == key).map_or_else(|| l.to_string(), |(k, v)| format!("{k} = {v}"))
            })
            .collect();
        std::fs::write(&p, format!("{head}[guard]\n{}\n", guard.join("\n"))).unwrap();
        c.spawn(i);
    }
    c.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_cluster_log_stays_still_and_a_flood_of_random_tokens_costs_nothing() {
    let mut c = Cluster::start(3).await;
    let tenant = c.tenant("t").await;
    let nodes = [
        c.storage_node("n1", "z/r1/h1").await,
        c.storage_node("n2", "z/r2/h2").await,
        c.storage_node("n3", "z/r3/h3").await,
    ];
    let (host, host_token) = c.principal("hv", "host", None).await;
    let mut node_tokens = Vec::new();
    for n in nodes {
        node_tokens.push((n, c.node_principal(&format!("node-{n}"), n).await.1));
    }
    let vol = c
        .op_ok(
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "v", "size_bytes": GIB, "replicas": 2, "tenant": tenant})),
        )
        .await["id"]
        .as_u64()
        .unwrap();
    c.op_ok(Method::POST, "/v1/grants", Some(json!({"principal": host, "volume": vol, "access": "read_write"}))).await;
    c.ok_as(
        &host_token,
        Method::POST,
        &format!("/v1/volumes/{vol}/attach"),
        Some(json!({"mode": "read_write", "host": "hv"})),
    )
    .await;

    // Background traffic as in a real cluster: every node heartbeats each second (with its
    // own node principal) and the attached client polls its layout every second (three times
    // as often as the real client).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, c2) = (std::sync::Arc::clone(&stop), (c.api.clone(), c.client.clone()));
        let (host_token, node_tokens) = (host_token.clone(), node_tokens.clone());
        tokio::spawn(async move {
            let (api, client) = c2;
            let mut polls = 0u64;
            let mut beats = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (n, node_token) in &node_tokens {
                    for a in &api {
                        let r = client
                            .post(format!("https://{a}/v1/nodes/{n}/heartbeat"))
                            .bearer_auth(node_token)
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status().is_success()) {
                            beats += 1;
                            break;
                        }
                    }
                }
                let r =
                    client.get(format!("https://{}/v1/volumes/{vol}", api[0])).bearer_auth(&host_token).send().await;
                assert!(r.unwrap().status().is_success(), "layout poll");
                polls += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            (beats, polls)
        })
    };
    let leader = c.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. Idle: the log does not grow.
    let quiet = Duration::from_secs(20);
    let (idle_index0, idle_audit0) = index_and_audit(&c, leader).await;
    tokio::time::sleep(quiet).await;
    let (idle_index1, idle_audit1) = index_and_audit(&c, leader).await;
    println!("idle {quiet:?} with heartbeats and layout polls: raft commit index {idle_index0} -> {idle_index1}, audit records {idle_audit0} -> {idle_audit1}");
    assert_eq!(idle_index1, idle_index0, "an idle cluster appends no Raft entry");
    assert_eq!(idle_audit1, idle_audit0);
    let idle_per_sec = (idle_index1 - idle_index0) as f64 / quiet.as_secs_f64();

    // 2. The flood: 10,000 random tokens over keep-alive connections, 4 at a time.
    let (flood_index0, flood_audit0) = index_and_audit(&c, leader).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, url) = (c.client.clone(), format!("https://{}/v1/volumes", c.api[leader]));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(2500);
            for _ in 0..2500 {
                let t = Instant::now();
                let r = client.get(&url).bearer_auth(random_token()).send().await.unwrap();
                let st = r.status();
                let _ = r.bytes().await;
                lat.push(t.elapsed());
                assert!(st == StatusCode::UNAUTHORIZED || st == StatusCode::TOO_MANY_REQUESTS, "refused: {st}");
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let flood = started.elapsed();
    let (flood_index1, flood_audit1) = index_and_audit(&c, leader).await;
    lat.sort();
    let pct = |percent: usize| lat[(lat.len() * percent / 100).min(lat.len() - 1)];
    let text = metrics(&c, leader).await;
    let (p99_bound, observed) = quantile_bound(&text, "slate_meta_auth_refusal_seconds", 99);
    let (p50_bound, _) = quantile_bound(&text, "slate_meta_auth_refusal_seconds", 50);
    println!(
        "flood of {} random tokens in {flood:?}: server-side refusal p50 <= {:.0} us, p99 <= {:.0} us ({observed} observed); client round trip p50 {:?} p99 {:?}",
        lat.len(),
        p50_bound * 1e6,
        p99_bound * 1e6,
        pct(50),
        pct(99)
    );
    println!(
        "flood: raft commit index {flood_index0} -> {flood_index1}, audit records {flood_audit0} -> {flood_audit1}"
    );
    assert_eq!(observed, 10_000, "every refusal was timed");
    // The figure (p99 well under 1 ms on an idle machine) is reported above; what is asserted is
    // only that no refusal waited on anything like a log write (a shared, loaded machine can
    // stretch an in-memory check past 1 ms, never to tens of milliseconds).
    assert!(p99_bound <= 0.025, "p99 of the server-side refusal took {p99_bound} s: it waited on something");
    assert!(pct(99) < Duration::from_millis(250), "generous client-side bound: {:?}", pct(99));
    // Same interval without the flood appended `idle_per_sec * flood` entries (zero); the flood
    // may add only the aggregated security records: one proposal per flush interval (10 s).
    let flushes = flood.as_secs() / 10 + 2;
    let extra = (flood_index1 - flood_index0) as f64 - idle_per_sec * flood.as_secs_f64();
    assert!(extra <= flushes as f64, "the flood appended {extra} entries (at most {flushes} flushes)");
    assert!(flood_audit1 - flood_audit0 <= 2 * flushes, "audit records: {flood_audit0} -> {flood_audit1}");

    // The metric counts every one, by kind and source; the audit has them aggregated.
    assert_eq!(sample(&text, "slate_meta_security_events_total{kind=\"unknown-token\",source=\"127.0.0.1\"}"), 10_000);
    assert!(sample(&text, "slate_meta_security_events_total{kind=\"lockout\",source=\"127.0.0.1\"}") >= 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let r = audit(&c).await;
        if security_count(&r, "unknown-token", "127.0.0.1") == 10_000 {
            break r;
        }
        assert!(Instant::now() < deadline, "aggregated records: {}", security_count(&r, "unknown-token", "127.0.0.1"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let aggregated = records.iter().filter(|r| r["action"] == "security.unknown-token").count();
    println!("10,000 refusals became {aggregated} audit record(s)");
    assert!(aggregated <= 4, "{aggregated} records for one source and kind");

    // 3. Afterwards the operator, the host and the nodes work, without lockout.
    let (st, v) = c.op(leader, Method::GET, "/v1/whoami", None).await;
    assert_eq!(st, StatusCode::OK, "operator: {v}");
    let (st, v) = c.req(leader, Method::GET, &format!("/v1/volumes/{vol}"), None, Some(&host_token)).await;
    assert_eq!(st, StatusCode::OK, "host: {v}");
    heartbeat(&c, &node_tokens[0].1, nodes[0]).await;

    // 4. A flood against known token ids (the host's and the operator's) cannot lock out their
    //    holders: wrong secrets are refused (401, then 429 while backed off), right ones pass.
    for holder in [host_token.clone(), c.token.clone()] {
        let id = holder.split('_').nth(1).unwrap().to_string();
        let mut limited = 0;
        for k in 0..300 {
            let wrong = format!("slate_{id}_{}", hex::encode(rand::thread_rng().gen::<[u8; 32]>()));
            let (st, _) = c.req(leader, Method::GET, "/v1/whoami", None, Some(&wrong)).await;
            assert!(st == StatusCode::UNAUTHORIZED || st == StatusCode::TOO_MANY_REQUESTS, "{st}");
            limited += u32::from(st == StatusCode::TOO_MANY_REQUESTS);
            if k % 50 == 0 {
                let (st, v) = c.req(leader, Method::GET, "/v1/whoami", None, Some(&holder)).await;
                assert_eq!(st, StatusCode::OK, "the holder passes during the flood: {v}");
            }
        }
        assert!(limited > 200, "the failing attempts were backed off ({limited})");
        for i in 0..3 {
            let (st, v) = c.req(i, Method::GET, "/v1/whoami", None, Some(&holder)).await;
            assert_eq!(st, StatusCode::OK, "the holder works on node {i}: {v}");
        }
    }
    let text = metrics(&c, leader).await;
    assert!(sample(&text, "slate_meta_security_events_total{kind=\"bad-secret\",source=\"127.0.0.1\"}") >= 600);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (beats, polls) = traffic.await.unwrap();
    println!("background: {beats} heartbeats, {polls} layout polls");
    assert!(beats > 60 && polls > 20);
    c.stop_all();
}

/// Node principals over the API: a node's token heartbeats for its node (in memory on the
/// leader) and reports security events; for another node, or anywhere else, it is refused 403
/// and the refusal is audited. A host token no longer heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_principals_heartbeat_for_their_own_node_only() {
    let mut c = Cluster::start(1).await;
    let tenant = c.tenant("t").await;
    let (n1, n2) = (c.storage_node("n1", "z/r1/h1").await, c.storage_node("n2", "z/r2/h2").await);
    let (p1, t1) = c.node_principal("node-1", n1).await;
    let (_, host_token) = c.principal("hv", "host", None).await;
    // Role `node` needs its node; the node must exist; only operators make one.
    let bad = [json!({"name": "x", "role": "node"}), json!({"name": "y", "role": "node", "node": 99})];
    for (body, want) in bad.into_iter().zip([StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND]) {
        let (st, v) = c.op(0, Method::POST, "/v1/principals", Some(body)).await;
        assert_eq!(st, want, "{v}");
    }
    let (st, v) = c
        .req(
            0,
            Method::POST,
            "/v1/principals",
            Some(json!({"name": "z", "role": "node", "node": n1})),
            Some(&host_token),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let leader = c.wait_ready().await;

    let beat = heartbeat(&c, &t1, n1).await;
    assert_eq!(beat["node"], n1, "{beat}");
    let (st, v) = c.req(leader, Method::GET, "/v1/whoami", None, Some(&t1)).await;
    assert_eq!((st, v["role"].as_str(), v["node"].as_u64()), (StatusCode::OK, Some("node"), Some(n1)), "{v}");
    let report = json!({"kind": "forged-capability", "source": "192.0.2.9:4000", "detail": "test"});
    let (st, v) = c.req(leader, Method::POST, "/v1/security-events", Some(report), Some(&t1)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");

    let refused = [
        (Method::POST, format!("/v1/nodes/{n2}/heartbeat"), None),
        (
            Method::POST,
            format!("/v1/nodes/{n2}/scrub-report"),
            Some(json!({"scrub_id": 0, "running": false,
            "started_ms": 0, "segments_done": 0, "segments_total": 0, "blocks_checked": 0, "corrupt_found": 0,
            "repaired": 0, "unrepaired": 0})),
        ),
        (Method::GET, "/v1/volumes".to_string(), None),
        (
            Method::POST,
            "/v1/volumes".to_string(),
            Some(json!({"name": "v", "size_bytes": GIB, "replicas": 2, "tenant": tenant})),
        ),
        (Method::GET, "/v1/audit".to_string(), None),
        (Method::GET, "/v1/nodes".to_string(), None),
        (Method::POST, format!("/v1/principals/{p1}/tokens"), Some(json!({}))),
    ];
    for (method, path, body) in refused {
        let (st, v) = c.req(leader, method.clone(), &path, body, Some(&t1)).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{method} {path}: {v}");
    }
    let (st, v) = c.req(leader, Method::POST, &format!("/v1/nodes/{n1}/heartbeat"), None, Some(&host_token)).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "a host heartbeat: {v}");

    // Every refusal is in the audit chain, under the node principal's name.
    let audit = c.op_ok(Method::GET, "/v1/audit?limit=10000", None).await;
    let records = audit["records"].as_array().cloned().unwrap_or_default();
    let denied: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["actor"].as_str().is_some_and(|a| a.starts_with(&format!("principal:{p1}(")))
                && r["result"].as_str().is_some_and(|s| s.starts_with("denied"))
        })
        .collect();
    assert_eq!(denied.len(), 7, "{denied:#?}");
    assert!(
        denied.iter().any(|r| r["action"] == "node.heartbeat" && r["object"] == format!("node:node-{n2}")),
        "{denied:#?}"
    );
    c.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_security_events_and_their_alarms() {
    let mut c = Cluster::start(3).await;
    let tenant = c.tenant("t").await;
    let (_, host_token) = c.principal("hv", "host", None).await;
    let (_, member_token) = c.principal("m", "tenant_member", Some(tenant)).await;
    let limits = [
        ("per_source_rps", 40),
        ("per_source_burst", 60),
        ("per_principal_rps", 5),
        ("per_principal_burst", 5),
        ("event_flush_ms", 500),
    ];
    reconfigure(&mut c, &limits).await;
    let leader = c.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Per principal: the host's burst runs out; the operator, another principal, is unaffected.
    let mut limited = None;
    for _ in 0..20 {
        let r =
            c.client.get(format!("https://{}/v1/whoami", c.api[leader])).bearer_auth(&host_token).send().await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            let body: Value = r.json().await.unwrap();
            limited = Some((retry, body));
            break;
        }
    }
    let (retry, body) = limited.expect("the per-principal limit answered 429");
    assert!(retry >= 1 && body["error"]["code"] == "rate_limited", "{retry} {body}");
    let (st, v) = c.op(leader, Method::GET, "/v1/whoami", None).await;
    assert_eq!(st, StatusCode::OK, "another principal is not limited: {v}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Security events reported by a storage node's (host) principal; a tenant member may not.
    for k in 0..30 {
        let (st, v) = c
            .req(
                leader,
                Method::POST,
                "/v1/security-events",
                Some(json!({"kind": "forged-capability", "source": "10.9.8.7:4444", "detail": format!("session {k}")})),
                Some(&host_token),
            )
            .await;
        if st == StatusCode::TOO_MANY_REQUESTS {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    }
    for kind in ["expired-capability", "capability-key-mismatch", "nbd-certificate-refused"] {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (st, v) = c
            .req(
                leader,
                Method::POST,
                "/v1/security-events",
                Some(json!({"kind": kind, "source": "192.0.2.5:1"})),
                Some(&host_token),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{kind}: {v}");
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (st, v) = c
        .req(
            leader,
            Method::POST,
            "/v1/security-events",
            Some(json!({"kind": "nope", "source": "192.0.2.5:1"})),
            Some(&host_token),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = c
        .req(
            leader,
            Method::POST,
            "/v1/security-events",
            Some(json!({"kind": "forged-capability", "source": "x"})),
            Some(&member_token),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = c
        .req(
            leader,
            Method::POST,
            "/v1/security-events",
            Some(json!({"kind": "forged-capability", "source": "10.0.0.1:1"})),
            Some(&member_token),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");

    // Per source: a burst of anonymous calls runs out the source's bucket.
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..100 {
        let r = c.client.get(format!("https://{}/v1/volumes", c.api[leader])).send().await.unwrap();
        *codes.entry(r.status().as_u16()).or_insert(0u32) += 1;
    }
    println!("100 anonymous calls: {codes:?}");
    assert!(codes.get(&429).copied().unwrap_or(0) > 0 && codes.get(&401).copied().unwrap_or(0) > 0);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every kind has its metric with its source ...
    let text = metrics(&c, leader).await;
    for (kind, source) in [
        ("missing-credential", "127.0.0.1"),
        ("rate-limited", "127.0.0.1"),
        ("lockout", "127.0.0.1"),
        ("forged-capability", "10.9.8.7"),
        ("expired-capability", "192.0.2.5"),
        ("capability-key-mismatch", "192.0.2.5"),
        ("nbd-certificate-refused", "192.0.2.5"),
    ] {
        let series = format!("slate_meta_security_events_total{{kind=\"{kind}\",source=\"{source}\"}}");
        assert!(sample(&text, &series) >= 1, "{series} missing");
    }
    // The shipped alert rules name only series this node exports.
    let rules =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/slate-alerts.yml")).unwrap();
    let mut named = 0;
    for word in rules.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')) {
        if let Some(name) = word.strip_prefix("slate_meta_") {
            let base = name.trim_end_matches("_bucket");
            assert!(
                text.contains(&format!("\nslate_meta_{base}")),
                "alert rules use slate_meta_{name}, which is not exported"
            );
            named += 1;
        }
    }
    assert!(named >= 8, "the rules reference the security metrics");
    let forged = sample(&text, "slate_meta_security_events_total{kind=\"forged-capability\",source=\"10.9.8.7\"}");
    // ... and its audit record naming the source, aggregated with a count.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = audit(&c).await;
        let ok = security_count(&records, "forged-capability", "10.9.8.7") == forged
            && security_count(&records, "nbd-certificate-refused", "192.0.2.5") == 1
            && security_count(&records, "rate-limited", "127.0.0.1") >= 1
            && security_count(&records, "missing-credential", "127.0.0.1") >= 1
            && security_count(&records, "lockout", "127.0.0.1") >= 1;
        if ok {
            let r = records.iter().find(|r| r["action"] == "security.forged-capability").unwrap();
            assert!(r["actor"].as_str().unwrap().contains("(hv)"), "the reporter is named: {r}");
            assert!(records
                .iter()
                .any(|r| r["action"] == "security.report" && r["result"].as_str().unwrap().starts_with("denied")));
            break;
        }
        assert!(Instant::now() < deadline, "security records missing");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.stop_all();
}

/// The shipped alert rules are valid: `promtool check rules` when it is installed (Debian:
/// `prometheus`), else a YAML parse.
#[test]
fn alert_rules_are_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/slate-alerts.yml");
    if let Ok(out) = std::process::Command::new("promtool").args(["check", "rules", path]).output() {
        println!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(out.status.success(), "promtool: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); print(sum(len(g['rules']) for g in d['groups']))",
            path,
        ])
        .output()
        .expect("neither promtool nor python3 is available to check the alert rules");
    assert!(out.status.success(), "YAML: {}", String::from_utf8_lossy(&out.stderr));
    let rules: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(rules >= 8, "{rules} rules");
}
