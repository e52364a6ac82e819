//! Issue 10: storage nodes speak to slate-meta with their own principals, not the operator's
//! (or a host's) token. On a whole `slate up` cluster:
//! - each node's `[meta] token_file` is its own node principal's token, 0600 in its 0700 dir;
//! - with those tokens the nodes' heartbeats keep them active under a short timeout, and the
//!   releases of a deleted volume are reported until its erasure completes;
//! - a node token is refused (403, audited) on `/v1/volumes`, the audit, and another node's
//!   heartbeat; a host token no longer heartbeats;
//! - `slate node token` writes a fresh node principal's token to a 0600 file, never to stdout.

use slate_tests::cluster::{Cluster, UpOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn storage_nodes_run_on_their_own_principals_limited_to_their_node() {
    let c = Cluster::start("e2e-nodeprin", UpOptions::default());
    let nodes = c.nodes();
    assert_eq!(nodes.len(), 3);
    let operator = c.info().token_file.clone();
    let operator_token = std::fs::read_to_string(&operator).unwrap();

    // 1. Each node's token file: its own, 0600 in a 0700 directory, named in its config.
    let principals = c.slate_json(&["token", "list"]);
    let mut token_of = std::collections::BTreeMap::new();
    for n in &nodes {
        let dir = n.data.parent().expect("node dir");
        let token_file = dir.join("meta.token");
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        assert_eq!(mode(&token_file), 0o600, "{}", token_file.display());
        let token = std::fs::read_to_string(&token_file).unwrap();
        assert_ne!(token.trim(), operator_token.trim(), "node {} holds the operator token", n.id);
        let config = std::fs::read_to_string(dir.join("node.toml")).unwrap();
        assert!(config.contains(&format!("token_file = \"{}\"", token_file.display())), "{config}");
        let p = principals
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == format!("node-{}", n.id))
            .unwrap_or_else(|| panic!("no principal for node {}: {principals:#}", n.id));
        assert_eq!((p["role"].as_str(), p["node"].as_u64()), (Some("node"), Some(n.id)), "{p}");
        token_of.insert(n.id, (p["id"].as_u64().unwrap(), token_file));
    }
    let node_principal_ids: Vec<u64> = token_of.values().map(|(id, _)| *id).collect();
    let denied_by_nodes = || {
        let audit = c.slate_json(&["audit", "list"]);
        audit["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                // `security.*` records are events the nodes reported (accepted), not refusals.
                r["result"].as_str().is_some_and(|s| s.starts_with("denied"))
                    && !r["action"].as_str().is_some_and(|a| a.starts_with("security."))
                    && node_principal_ids
                        .iter()
                        .any(|id| r["actor"].as_str().is_some_and(|a| a.starts_with(&format!("principal:{id}("))))
            })
            .map(|r| format!("{} {} {} {}", r["actor"], r["action"], r["object"], r["result"]))
            .collect::<Vec<String>>()
    };

    // 2. Heartbeats with node tokens keep every node active under a 4 s timeout.
    let (st, v) = c.api("PATCH", "/v1/settings", Some(&serde_json::json!({"heartbeat_timeout_ms": 4000})), &operator);
    assert_eq!(st, 200, "{v}");
    std::thread::sleep(Duration::from_secs(12));
    let list = c.slate_json(&["node", "list"]);
    for n in list.as_array().unwrap() {
        assert_eq!(n["state"], "active", "node heartbeats with its own principal: {list:#}");
    }
    let (st, v) = c.api("PATCH", "/v1/settings", Some(&serde_json::json!({"heartbeat_timeout_ms": 30000})), &operator);
    assert_eq!(st, 200, "{v}");

    // 3. A deleted volume's releases are reported by the nodes until its erasure completes.
    let tenant = c.slate_json(&["tenant", "list"])[0]["id"].as_u64().expect("demo tenant");
    let vol = c.slate_json(&["volume", "create", "gone", "--size", "16M", "--tenant", &tenant.to_string()]);
    let vid = vol["id"].as_u64().expect("volume id");
    c.slate_ok(&["volume", "delete", "gone"]);
    wait_until("the deleted volume's erasure completes", Duration::from_mins(3), || {
        let (st, v) = c.api("GET", &format!("/v1/erasures/{vid}"), None, &operator);
        st == 200 && v["state"] == "complete"
    });
    let denied = denied_by_nodes();
    assert!(denied.is_empty(), "the nodes' own traffic was refused: {denied:#?}");

    // 4. A node token elsewhere: refused, and each refusal is audited.
    let (a, b) = (nodes[0].id, nodes[1].id);
    let a_token = &token_of[&a].1;
    let refused = [
        ("GET", "/v1/volumes".to_string()),
        ("GET", format!("/v1/volumes/{vid}")),
        ("GET", "/v1/audit".to_string()),
        ("POST", format!("/v1/nodes/{b}/heartbeat")),
        ("GET", format!("/v1/nodes/{b}")),
    ];
    for (method, path) in &refused {
        let (st, v) = c.api(method, path, None, a_token);
        assert_eq!(st, 403, "node {a}'s token on {method} {path}: {v}");
    }
    assert_eq!(denied_by_nodes().len(), refused.len());
    let (st, v) = c.api("POST", &format!("/v1/nodes/{a}/heartbeat"), None, &c.host_token_file());
    assert_eq!(st, 403, "a host heartbeat: {v}");

    // 5. `slate node token`: a fresh node principal, its token only in the 0600 file.
    let out_file = c.scratch().join("extra-node.token");
    let out = c
        .slate()
        .args(["--json", "node", "token", &b.to_string(), "--name", "extra-node", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = std::fs::read_to_string(&out_file).unwrap();
    assert!(token.trim().starts_with("slate_"), "the file holds a token");
    assert_eq!(mode(&out_file), 0o600);
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!printed.contains(token.trim()), "the token was printed");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["node"], b);
    let (st, v) = c.api("GET", "/v1/whoami", None, &out_file);
    assert_eq!((st, v["role"].as_str(), v["node"].as_u64()), (200, Some("node"), Some(b)), "{v}");
    let (st, v) = c.api("POST", &format!("/v1/nodes/{a}/heartbeat"), None, &out_file);
    assert_eq!(st, 403, "node {b}'s new token on node {a}'s heartbeat: {v}");
}
