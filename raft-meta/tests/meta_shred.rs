//! Crypto-shred acceptance test with three real `slate-meta` processes:
//! after a volume delete (and, separately, a tenant delete), no file under any
//! node's data directory holds the DEK or its wrapped form, and a copy of a
//! data directory taken before the delete cannot be unwrapped with the keys
//! that remain after it.

mod meta_common;

use meta_common::{Cluster, BIN};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

fn dump_wrapped(dir: &Path) -> Vec<Value> {
    let out = Command::new(BIN).args(["dump-wrapped", "--data-dir"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wrapped_of(list: &[Value], kind: &str, id: u64) -> String {
    list.iter().find(|v| v["kind"] == kind && v["id"] == id).unwrap()["wrapped_hex"].as_str().unwrap().to_string()
}

/// Runs `try-unwrap`; `Ok(fingerprint)` or `Err(reason)`.
fn try_unwrap(data_dir: &Path, root_key: &Path, keys_from: &[PathBuf], volume: u64) -> Result<String, String> {
    let mut cmd = Command::new(BIN);
    cmd.args(["try-unwrap", "--data-dir"]).arg(data_dir).arg("--root-key-file").arg(root_key);
    for k in keys_from {
        cmd.arg("--keys-from").arg(k);
    }
    let out = cmd.args(["--volume", &volume.to_string()]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("try-unwrap: {}", String::from_utf8_lossy(&out.stderr)));
    if v["unwrapped"] == true {
        assert!(out.status.success());
        Ok(v["dek_sha256"].as_str().unwrap().to_string())
    } else {
        assert_eq!(out.status.code(), Some(2));
        Err(v["reason"].as_str().unwrap().to_string())
    }
}

/// The byte strings that must vanish: hex and raw forms of each secret.
fn needles(hexes: &[&str]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for h in hexes {
        out.push(h.as_bytes().to_vec());
        out.push(hex::decode(h).unwrap());
    }
    out
}

fn found_anywhere(c: &Cluster, needles: &[Vec<u8>]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for i in 0..3 {
        for n in needles {
            hits.extend(Cluster::files_containing(&c.data_dir(i), n));
        }
    }
    hits
}

/// Polls until none of `needles` is in any data directory (purging runs right after apply).
async fn assert_gone(c: &Cluster, needles: &[Vec<u8>], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hits = found_anywhere(c, needles);
        if hits.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} still present in {hits:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn attach_dek(c: &Cluster, vol: u64) -> String {
    let v = c
        .op_ok(Method::POST, &format!("/v1/volumes/{vol}/attach"), Some(json!({"mode": "read_only", "host": "t"})))
        .await;
    v["dek_hex"].as_str().unwrap().to_string()
}

fn fingerprint(dek_hex: &str) -> String {
    hex::encode(Sha256::digest(hex::decode(dek_hex).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crypto_shred_of_volume_and_tenant() {
    let mut c = Cluster::start(3).await;
    let t1 = c.tenant("shred-a").await;
    let t2 = c.tenant("shred-b").await;
    for i in 1..=3 {
        c.storage_node(&format!("n{i}"), &format!("z/r/h{i}")).await;
    }
    let mk = |name: &str, t: u64| json!({"name": name, "size_bytes": GIB, "replicas": 2, "tenant": t});
    let victim = c.op_ok(Method::POST, "/v1/volumes", Some(mk("victim", t1))).await["id"].as_u64().unwrap();
    let keep = c.op_ok(Method::POST, "/v1/volumes", Some(mk("keep", t1))).await["id"].as_u64().unwrap();
    let doomed = c.op_ok(Method::POST, "/v1/volumes", Some(mk("doomed", t2))).await["id"].as_u64().unwrap();
    let dek_victim = attach_dek(&c, victim).await;
    let dek_keep = attach_dek(&c, keep).await;
    let dek_doomed = attach_dek(&c, doomed).await;
    c.wait_caught_up().await;

    // Stop cleanly so every node's state file is current, then keep copies of the data
    // directories (and, as a positive control only, of one root key file) from before the deletes.
    c.stop_all();
    let old = tempfile::tempdir().unwrap();
    for i in 0..3 {
        copy_dir(&c.data_dir(i), &old.path().join(format!("data-{i}")));
    }
    let old_root = old.path().join("root.key.before");
    std::fs::copy(c.root_key_file(0), &old_root).unwrap();
    let wrapped = dump_wrapped(&c.data_dir(0));
    let w_victim = wrapped_of(&wrapped, "volume", victim);
    let w_doomed = wrapped_of(&wrapped, "volume", doomed);
    let w_tenant2 = wrapped_of(&wrapped, "tenant", t2);
    // Positive controls: the scan finds the wrapped key before the delete on every node, and the
    // offline unwrap works with the keys of that time.
    for i in 0..3 {
        assert!(!Cluster::files_containing(&c.data_dir(i), w_victim.as_bytes()).is_empty(), "node {i}");
    }
    assert_eq!(try_unwrap(&old.path().join("data-0"), &old_root, &[], victim), Ok(fingerprint(&dek_victim)));
    // The plaintext DEK is never at rest, not even before the delete.
    assert!(found_anywhere(&c, &needles(&[&dek_victim, &dek_keep, &dek_doomed])).is_empty());

    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_ready().await;

    // --- volume delete ---
    let rep = c.op_ok(Method::DELETE, &format!("/v1/volumes/{victim}?force=true"), None).await;
    assert_eq!(rep["root_epoch"], 1);
    c.wait_caught_up().await;
    assert_gone(&c, &needles(&[&w_victim, &dek_victim]), "the victim's DEK or wrapped DEK").await;
    let current: Vec<PathBuf> = (0..3).map(|i| c.data_dir(i)).collect();
    for i in 0..3 {
        let r = try_unwrap(&old.path().join(format!("data-{i}")), &c.root_key_file(i), &current, victim);
        assert!(r.is_err(), "old copy {i} still unwraps the victim's key: {r:?}");
    }
    // The survivor of the same tenant is re-wrapped, not lost.
    assert_eq!(attach_dek(&c, keep).await, dek_keep);

    // --- tenant delete ---
    let rep = c.op_ok(Method::DELETE, &format!("/v1/tenants/{t2}"), None).await;
    assert_eq!(rep["root_epoch"], 2);
    assert_eq!(rep["volumes_shredded"], 1);
    c.wait_caught_up().await;
    assert_gone(&c, &needles(&[&w_doomed, &w_tenant2, &dek_doomed]), "tenant 2's keys").await;
    for i in 0..3 {
        let r = try_unwrap(&old.path().join(format!("data-{i}")), &c.root_key_file(i), &current, doomed);
        assert!(r.is_err(), "old copy {i} still unwraps tenant 2's volume key: {r:?}");
    }
    let (st, _) = c.op(0, Method::GET, &format!("/v1/volumes/{doomed}"), None).await;
    assert_eq!(st.as_u16(), 404);
    // Every shred is audited.
    let page = c.op_ok(Method::GET, "/v1/audit?limit=10000", None).await;
    let recs = page["records"].as_array().unwrap();
    assert!(recs.iter().any(|r| r["action"] == "volume.delete" && r["result"] == "ok"));
    assert!(recs.iter().any(|r| r["action"] == "tenant.delete" && r["result"] == "ok"));
    // A restart after the shreds comes back with the ratcheted keys.
    c.stop_all();
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_ready().await;
    assert_eq!(attach_dek(&c, keep).await, dek_keep);
}
