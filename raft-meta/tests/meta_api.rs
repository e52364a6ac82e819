//! Management API acceptance tests against real `slate-meta` processes:
//! attach races and fencing, placement, access control, audit chain, bad input.

#![allow(clippy::many_single_char_names)]

mod meta_common;

use meta_common::{Cluster, BIN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use slate_protocol::capability::verifying_key_from_hex;
use slate_protocol::{NodeId, SignedCapability};
use std::process::Command;
use std::time::Duration;

const GIB: u64 = 1 << 30;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

async fn three_domains(c: &Cluster) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(c.storage_node(&format!("n{i}"), &format!("zone-a/rack-{i}/host-{i}")).await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attach_race_exactly_one_wins_and_takeover_fences() {
    let c = Cluster::start(3).await;
    let t = c.tenant("acme").await;
    three_domains(&c).await;
    let v = c
        .op_ok(Method::POST, "/v1/volumes", Some(json!({"name": "v", "size_bytes": GIB, "replicas": 2, "tenant": t})))
        .await;
    let vol = v["id"].as_u64().unwrap();
    let (h1, t1) = c.principal("host1", "host", None).await;
    let (h2, t2) = c.principal("host2", "host", None).await;
    for h in [h1, h2] {
        c.op_ok(Method::POST, "/v1/grants", Some(json!({"principal": h, "volume": vol, "access": "read_write"}))).await;
    }
    let path = format!("/v1/volumes/{vol}/attach");
    let mut generation = 0;
    for round in 0..100 {
        let a = c.req(0, Method::POST, &path, Some(json!({"mode": "read_write", "host": "hv1"})), Some(&t1));
        let b = c.req(1, Method::POST, &path, Some(json!({"mode": "read_write", "host": "hv2"})), Some(&t2));
        let ((sa, va), (sb, vb)) = tokio::join!(a, b);
        let winners = [sa, sb].iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(winners, 1, "round {round}: {sa} {va} / {sb} {vb}");
        let (win, lose, win_token) = if sa == StatusCode::OK { (&va, &vb, &t1) } else { (&vb, &va, &t2) };
        assert_eq!(code(lose), "conflict", "round {round}: loser got {lose}");
        let g = win["attachment"]["generation"].as_u64().unwrap();
        assert_eq!(g, generation + 1, "every read-write attach bumps the generation once");
        generation = g;
        let aid = win["attachment"]["id"].as_u64().unwrap();
        let (st, body) = c
            .req(
                2,
                Method::POST,
                &format!("/v1/volumes/{vol}/detach"),
                Some(json!({"attachment": aid})),
                Some(win_token),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }

    // Forced takeover: the new holder gets a newer generation; the old attachment is gone.
    let (st, first) =
        c.req(0, Method::POST, &path, Some(json!({"mode": "read_write", "host": "hv1"})), Some(&t1)).await;
    assert_eq!(st, StatusCode::OK);
    let g1 = first["attachment"]["generation"].as_u64().unwrap();
    let (st, refused) =
        c.req(1, Method::POST, &path, Some(json!({"mode": "read_write", "host": "hv2"})), Some(&t2)).await;
    assert_eq!(st, StatusCode::CONFLICT, "{refused}");
    let (st, taken) = c
        .req(1, Method::POST, &path, Some(json!({"mode": "read_write", "host": "hv2", "force": true})), Some(&t2))
        .await;
    assert_eq!(st, StatusCode::OK, "{taken}");
    let g2 = taken["attachment"]["generation"].as_u64().unwrap();
    assert_eq!(g2, g1 + 1);
    let show = c.op_ok(Method::GET, &format!("/v1/volumes/{vol}"), None).await;
    let atts = show["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 1);
    assert_eq!(atts[0]["principal"], h2);
    // The capability verifies under the cluster key, for the new generation, on the volume's nodes.
    let vk = verifying_key_from_hex(taken["verifying_key_hex"].as_str().unwrap()).unwrap();
    let cap = SignedCapability::from_token(taken["capability"]["token"].as_str().unwrap()).unwrap();
    let node = NodeId(taken["capability"]["nodes"][0].as_u64().unwrap());
    let claims = cap.verify(&vk, node, now_ms() / 1000).unwrap();
    assert_eq!(claims.generation.0, g2);
    assert_eq!(claims.volume.0, vol);
    assert_eq!(taken["dek_hex"].as_str().unwrap().len(), 128);
    // The old holder cannot detach the new holder's attachment.
    let aid = taken["attachment"]["id"].as_u64().unwrap();
    let (st, _) =
        c.req(0, Method::POST, &format!("/v1/volumes/{vol}/detach"), Some(json!({"attachment": aid})), Some(&t1)).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_distinct_domains_or_clear_error() {
    let c = Cluster::start(3).await;
    let t = c.tenant("acme").await;
    c.storage_node("n1", "zone-a/rack-1/host-1").await;
    let (st, v) = c
        .op(0, Method::POST, "/v1/volumes", Some(json!({"name": "v", "size_bytes": GIB, "replicas": 2, "tenant": t})))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("distinct failure domains") && msg.contains("only 1"), "{msg}");
    c.storage_node("n2", "zone-a/rack-2/host-2").await;
    c.storage_node("n3", "zone-a/rack-3/host-3").await;
    // Small segments so that one volume has many of them.
    c.op_ok(Method::PATCH, "/v1/settings", Some(json!({"segment_blocks": 256}))).await;
    let v = c
        .op_ok(
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "v", "size_bytes": 96u64 << 20, "replicas": 2, "tenant": t})),
        )
        .await;
    let segs = v["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 96);
    let mut per_node = std::collections::BTreeMap::new();
    for s in segs {
        let reps = s["replicas"].as_array().unwrap();
        assert_eq!(reps.len(), 2);
        assert_ne!(reps[0]["failure_domain"], reps[1]["failure_domain"], "{s}");
        for r in reps {
            *per_node.entry(r["node"].as_u64().unwrap()).or_insert(0u64) += 1;
        }
    }
    let (min, max) = (per_node.values().min().unwrap(), per_node.values().max().unwrap());
    assert!(max - min <= 2, "balanced by free space: {per_node:?}");
    // R = 3 fits exactly; R = 4 does not; rack level with all hosts in one zone works, zone level does not.
    let (st, _) = c
        .op(
            0,
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "r3", "size_bytes": 8u64 << 20, "replicas": 3, "tenant": t})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = c
        .op(
            0,
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "r4", "size_bytes": 8u64 << 20, "replicas": 4, "tenant": t})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (st, v) = c
        .op(
            0,
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "z", "size_bytes": 8u64 << 20, "replicas": 2, "tenant": t, "failure_domain_level": "zone"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("Zone"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_are_isolated_and_refusals_are_audited() {
    let c = Cluster::start(3).await;
    let a = c.tenant("tenant-a").await;
    let b = c.tenant("tenant-b").await;
    three_domains(&c).await;
    let (_, ta) = c.principal("alice", "tenant_admin", Some(a)).await;
    let (_, tb) = c.principal("bob", "tenant_admin", Some(b)).await;
    let create = |name: &str| json!({"name": name, "size_bytes": GIB, "replicas": 2});
    let va = c.ok_as(&ta, Method::POST, "/v1/volumes", Some(create("va"))).await["id"].as_u64().unwrap();
    let vb = c.ok_as(&tb, Method::POST, "/v1/volumes", Some(create("vb"))).await["id"].as_u64().unwrap();

    let list = c.ok_as(&ta, Method::GET, "/v1/volumes", None).await;
    let ids: Vec<u64> = list.as_array().unwrap().iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![va], "alice lists only her tenant's volumes");
    let attempts = [
        (Method::GET, format!("/v1/volumes/{vb}"), None),
        (
            Method::POST,
            format!("/v1/volumes/{vb}/attach"),
            Some(json!({"mode": "read_write", "host": "x", "force": true})),
        ),
        (Method::POST, format!("/v1/volumes/{vb}/snapshots"), Some(json!({"name": "s"}))),
        (Method::GET, format!("/v1/volumes/{vb}/snapshots"), None),
        (Method::DELETE, format!("/v1/volumes/{vb}?force=true"), None),
        (Method::GET, format!("/v1/audit?tenant={b}"), None),
        (
            Method::POST,
            "/v1/volumes".to_string(),
            Some(json!({"name": "x", "size_bytes": GIB, "replicas": 2, "tenant": b})),
        ),
    ];
    for (m, p, body) in &attempts {
        let (st, v) = c.req(0, m.clone(), p, body.clone(), Some(&ta)).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{m} {p}: {v}");
    }
    assert_eq!(c.ok_as(&tb, Method::GET, &format!("/v1/volumes/{vb}"), None).await["id"], vb, "bob's volume is intact");

    // Alice's audit records are all tenant a's, and include her refusals.
    let page = c.ok_as(&ta, Method::GET, "/v1/audit", None).await;
    let recs = page["records"].as_array().unwrap();
    assert!(recs.iter().all(|r| r["tenant"] == a), "alice sees only tenant a's records");
    let denied = recs.iter().filter(|r| r["result"].as_str().unwrap().starts_with("denied")).count();
    assert!(denied >= attempts.len(), "alice's refusals are audited: {denied}");

    // Time-bounded accounts and tokens.
    let now = now_ms();
    let v = c
        .op_ok(
            Method::POST,
            "/v1/principals",
            Some(json!({"name": "later", "role": "tenant_member", "tenant": a, "not_before_ms": now + 3_600_000})),
        )
        .await;
    let (st, body) = c.req(0, Method::GET, "/v1/volumes", None, v["token"].as_str()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("not valid yet"));
    let v = c
        .op_ok(
            Method::POST,
            "/v1/principals",
            Some(
                json!({"name": "gone", "role": "tenant_member", "tenant": a, "not_after_ms": now.saturating_sub(1000)}),
            ),
        )
        .await;
    let (st, body) = c.req(1, Method::GET, "/v1/volumes", None, v["token"].as_str()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"));
    let (carol, tc) = c.principal("carol", "tenant_member", Some(a)).await;
    let expired = c
        .op_ok(
            Method::POST,
            &format!("/v1/principals/{carol}/tokens"),
            Some(json!({"expires_ms": now.saturating_sub(1)})),
        )
        .await;
    let (st, body) = c.req(2, Method::GET, "/v1/volumes", None, expired["token"].as_str()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("token has expired"));

    // Failures against carol's token id never lock carol out: a correct secret always passes.
    // Past the free failures, wrong secrets get 429 with Retry-After (backoff for the failing
    // source and token id), and her own token still works (design/api-security.md).
    let tid = tc.split('_').nth(1).unwrap();
    let wrong = format!("slate_{tid}_{}", "ab".repeat(32));
    for _ in 0..5 {
        let (st, _) = c.req(0, Method::GET, "/v1/volumes", None, Some(&wrong)).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
    let (st, body) = c.req(0, Method::GET, "/v1/volumes", None, Some(&tc)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let mut limited = 0;
    for _ in 0..10 {
        let (st, body) = c.req(0, Method::GET, "/v1/volumes", None, Some(&wrong)).await;
        assert!(st == StatusCode::UNAUTHORIZED || st == StatusCode::TOO_MANY_REQUESTS, "{st}: {body}");
        if st == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(code(&body), "rate_limited");
            limited += 1;
        }
    }
    assert!(limited > 0, "failures past the free ones are backed off");
    let (st, body) = c.req(0, Method::GET, "/v1/volumes", None, Some(&tc)).await;
    assert_eq!(st, StatusCode::OK, "carol is not locked out by someone else's failures: {body}");

    // No token and a garbage token are refused too.
    // (This source is in backoff by now, so 429 is as good a refusal as 401.)
    let (st, _) = c.req(0, Method::GET, "/v1/volumes", None, None).await;
    assert!(st == StatusCode::UNAUTHORIZED || st == StatusCode::TOO_MANY_REQUESTS, "{st}");
    let (st, _) = c.req(0, Method::GET, "/v1/volumes", None, Some("garbage")).await;
    assert!(st == StatusCode::UNAUTHORIZED || st == StatusCode::TOO_MANY_REQUESTS, "{st}");

    // Refusals of calls with a valid credential are in the chain, one record each; refused
    // credentials are in it too, aggregated per source and kind with a count (flushed every
    // event_flush_ms, 10 s by default).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let page = loop {
        let page = c.op_ok(Method::GET, "/v1/audit?limit=10000", None).await;
        let recs = page["records"].as_array().unwrap();
        let kinds: Vec<&str> = recs.iter().filter_map(|r| r["action"].as_str()).collect();
        let want = ["security.expired-credential", "security.bad-secret", "security.missing-credential"];
        if want.iter().all(|w| kinds.contains(w)) && kinds.contains(&"security.malformed-credential") {
            break page;
        }
        assert!(std::time::Instant::now() < deadline, "security events not audited: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let recs = page["records"].as_array().unwrap();
    let denied: Vec<&Value> = recs.iter().filter(|r| r["result"].as_str().unwrap().starts_with("denied")).collect();
    let has = |action: &str, what: &str| {
        denied.iter().any(|r| r["action"] == action && r["result"].as_str().unwrap().contains(what))
    };
    assert!(has("volume.show", "may not see"));
    assert!(has("volume.attach", "may not attach"));
    assert!(has("snapshot.create", "may not snapshot"));
    assert!(has("volume.delete", "may not manage"));
    assert!(has("audit.list", "not yours"));
    let security = |kind: &str| -> u64 {
        recs.iter()
            .filter(|r| r["action"] == format!("security.{kind}"))
            .map(|r| {
                assert!(r["client"].as_str().unwrap().starts_with("127.0.0.1"), "source address recorded: {r}");
                let object = r["object"].as_str().unwrap();
                object.split_whitespace().next().unwrap().trim_start_matches("count:").parse::<u64>().unwrap()
            })
            .sum()
    };
    assert_eq!(security("expired-credential"), 3, "not valid yet, account expired, token expired");
    assert!(security("bad-secret") >= 15, "every wrong secret is counted");
    assert!(security("lockout") >= 1, "the backoff is an event too");
    assert_eq!(security("missing-credential"), 1);
    assert_eq!(security("malformed-credential"), 1);
    assert!(
        !recs.iter().any(|r| r["action"] == "volume.list" && r["result"].as_str().unwrap().contains("bad credentials")),
        "no record per refused credential"
    );
    // No secret appears in the audit records.
    let text = serde_json::to_string(&page).unwrap();
    assert!(!text.contains(&tc) && !text.contains(&ta) && !text.contains(&tb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_chain_verifies_and_names_an_altered_record() {
    let mut c = Cluster::start(3).await;
    let marker = "audited-tenant-qqq";
    c.tenant(marker).await;
    c.tenant("other").await;
    three_domains(&c).await;
    let rep = c.op_ok(Method::GET, "/v1/audit/verify", None).await;
    assert_eq!(rep["ok"], true, "{rep}");
    c.wait_caught_up().await;
    c.stop_all();
    for i in 0..3 {
        let out = Command::new(BIN).args(["audit-verify", "--data-dir"]).arg(c.data_dir(i)).output().unwrap();
        assert!(out.status.success(), "node {i}: {}", String::from_utf8_lossy(&out.stdout));
    }
    // Flip one byte inside the record that names the marker tenant (a letter, so the JSON stays valid).
    let path = c.data_dir(0).join("state/state.json");
    let mut bytes = std::fs::read(&path).unwrap();
    let state: Value = serde_json::from_slice(&bytes).unwrap();
    let seq = state["audit"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["object"].as_str().unwrap().contains(marker))
        .unwrap()["seq"]
        .as_u64()
        .unwrap();
    let audit_at = bytes.windows(8).position(|w| w == b"\"audit\":").unwrap();
    let rel = bytes[audit_at..].windows(marker.len()).position(|w| w == marker.as_bytes()).unwrap();
    let at = audit_at + rel + marker.len() - 1; // the last 'q'
    bytes[at] = b'r';
    std::fs::write(&path, &bytes).unwrap();
    let out = Command::new(BIN).args(["audit-verify", "--data-dir"]).arg(c.data_dir(0)).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["first_broken"], seq, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let c = Cluster::start(3).await;
    let t = c.tenant("acme").await;
    three_domains(&c).await;
    let vols_before = c.op_ok(Method::GET, "/v1/volumes", None).await;
    let tenants_before = c.op_ok(Method::GET, "/v1/tenants", None).await;
    let url = format!("https://{}/v1/volumes", c.api[0]);
    let send = |body: Vec<u8>, ctype: &'static str| {
        c.client.post(&url).bearer_auth(&c.token).header("content-type", ctype).body(body).send()
    };
    let mut cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("malformed JSON", b"{\"name\": \"v\", ".to_vec(), "application/json", 400, "invalid JSON"),
        ("not an object", b"[1,2,3]".to_vec(), "application/json", 400, "invalid JSON"),
        ("wrong content type", b"{}".to_vec(), "text/plain", 415, "Content-Type"),
        ("oversized", vec![b' '; 200 * 1024], "application/json", 413, "length limit"),
    ];
    let bodies = [
        (
            "unknown field",
            json!({"name": "v", "size_bytes": GIB, "replicas": 2, "tenant": t, "colour": "red"}),
            "unknown field",
        ),
        ("unaligned size", json!({"name": "v", "size_bytes": GIB + 1, "replicas": 2, "tenant": t}), "multiple of"),
        ("tiny size", json!({"name": "v", "size_bytes": 4096, "replicas": 2, "tenant": t}), "between"),
        ("huge size", json!({"name": "v", "size_bytes": 64u64 << 40, "replicas": 2, "tenant": t}), "between"),
        ("negative size", json!({"name": "v", "size_bytes": -1, "replicas": 2, "tenant": t}), "invalid JSON"),
        ("R = 1", json!({"name": "v", "size_bytes": GIB, "replicas": 1, "tenant": t}), "at least 2 copies"),
        ("R = 0", json!({"name": "v", "size_bytes": GIB, "replicas": 0, "tenant": t}), "replicas must be"),
        ("bad name", json!({"name": "a b/c", "size_bytes": GIB, "replicas": 2, "tenant": t}), "volume name"),
        (
            "bad qos",
            json!({"name": "v", "size_bytes": GIB, "replicas": 2, "tenant": t, "qos": {"iops_limit": 0}}),
            "iops",
        ),
    ];
    let rendered: Vec<(String, Vec<u8>, &str)> =
        bodies.iter().map(|(n, b, m)| ((*n).to_string(), serde_json::to_vec(b).unwrap(), *m)).collect();
    for (n, b, m) in &rendered {
        cases.push((n.as_str(), b.clone(), "application/json", 400, m));
    }
    for (name, body, ctype, status, needle) in cases {
        let resp = send(body, ctype).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{name}: no error body: {v}"));
        assert!(v["error"]["code"].is_string(), "{name}: {v}");
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    // Other endpoints: bad path, bad query, unknown endpoint, resize shrink.
    for (m, p, b, status) in [
        (Method::GET, "/v1/volumes/not-a-number".to_string(), None, 400),
        (Method::GET, "/v1/audit?limit=x".to_string(), None, 400),
        (Method::GET, "/v1/volumes?bogus=1".to_string(), None, 400),
        (Method::GET, "/v1/nothing-here".to_string(), None, 404),
        (
            Method::POST,
            "/v1/nodes".to_string(),
            Some(json!({"name": "n9", "addr": "nowhere", "failure_domain": "a/b/c", "disks": []})),
            400,
        ),
        (Method::PATCH, "/v1/settings".to_string(), Some(json!({"segment_blocks": 3})), 400),
    ] {
        let (st, v) = c.op(1, m.clone(), &p, b).await;
        assert_eq!(st.as_u16(), status, "{m} {p}: {v}");
        assert!(v["error"]["message"].is_string(), "{m} {p}: {v}");
    }
    assert_eq!(c.op_ok(Method::GET, "/v1/volumes", None).await, vols_before, "no volume was created");
    assert_eq!(c.op_ok(Method::GET, "/v1/tenants", None).await, tenants_before);
    // The service still works.
    let (st, _) = c
        .op(2, Method::POST, "/v1/volumes", Some(json!({"name": "ok", "size_bytes": GIB, "replicas": 2, "tenant": t})))
        .await;
    assert_eq!(st, StatusCode::OK);
    // OpenAPI is served and lists the endpoints.
    let (st, doc) = c.req(0, Method::GET, "/openapi.json", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(doc["paths"]["/v1/volumes/{id}/attach"]["post"].is_object());
    // Metrics are served.
    let text = c.client.get(format!("https://{}/metrics", c.api[0])).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("slate_meta_raft_term") && text.contains("slate_meta_volumes"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_storage_node_is_marked_down_and_its_replicas_replaced() {
    let c = Cluster::start(3).await;
    let t = c.tenant("acme").await;
    let nodes = three_domains(&c).await;
    let spare = c.storage_node("n4", "zone-a/rack-4/host-4").await;
    c.op_ok(Method::PATCH, "/v1/settings", Some(json!({"heartbeat_timeout_ms": 1000}))).await;
    // Place the volume before the spare can take anything: drain it first, then reactivate.
    c.op_ok(Method::POST, &format!("/v1/nodes/{spare}/state"), Some(json!({"state": "draining"}))).await;
    let v = c
        .op_ok(Method::POST, "/v1/volumes", Some(json!({"name": "v", "size_bytes": GIB, "replicas": 3, "tenant": t})))
        .await;
    let vol = v["id"].as_u64().unwrap();
    c.op_ok(Method::POST, &format!("/v1/nodes/{spare}/state"), Some(json!({"state": "active"}))).await;
    let victim = nodes[0];
    // Keep every node but the victim alive until the leader's sweep (every 5 s) has acted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        for n in nodes.iter().skip(1).chain([&spare]) {
            c.op_ok(Method::POST, &format!("/v1/nodes/{n}/heartbeat"), None).await;
        }
        let node = c.op_ok(Method::GET, &format!("/v1/nodes/{victim}"), None).await;
        let seg = c.op_ok(Method::GET, &format!("/v1/volumes/{vol}"), None).await["segments"][0].clone();
        let holders: Vec<u64> =
            seg["replicas"].as_array().unwrap().iter().map(|r| r["node"].as_u64().unwrap()).collect();
        if node["state"] == "down" && !holders.contains(&victim) {
            assert!(holders.contains(&spare), "{seg}");
            assert!(seg["epoch"].as_u64().unwrap() >= 2);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "victim not replaced: {node} {seg}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let page = c.op_ok(Method::GET, "/v1/audit?limit=10000", None).await;
    let recs = page["records"].as_array().unwrap();
    assert!(recs.iter().any(|r| r["action"] == "node.down" && r["object"] == format!("node:node-{victim}")));
    assert!(recs.iter().any(|r| r["action"] == "segment.re_replicate"));
    // A heartbeat brings it back.
    c.op_ok(Method::POST, &format!("/v1/nodes/{victim}/heartbeat"), None).await;
    assert_eq!(c.op_ok(Method::GET, &format!("/v1/nodes/{victim}"), None).await["state"], "active");
}
