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

/// DEKs unwrapped for replies, per node (from `/v1/status`).
async fn dek_unwraps(c: &Cluster) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(c.status(i).await.map_or(0, |s| s["dek_unwraps"].as_u64().unwrap()));
    }
    out
}

async fn erasure(c: &Cluster, vol: u64) -> Value {
    c.op_ok(Method::GET, &format!("/v1/erasures/{vol}"), None).await
}

/// Acceptance 5 (issue 10): one metadata voter is down during a delete. The delete
/// reports "pending on node 3" until that voter rejoins and ratchets; then an old copy
/// of its data directory cannot unwrap the DEK, and `try-unwrap` reads the copy's Raft
/// log (the copy is taken after kill -9: its state file never saw the volume).
/// Also: the attach reply's DEK is unwrapped once, by the proposing node only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shred_pending_on_a_down_voter_and_old_copy_stays_dead() {
    let mut c = Cluster::start(3).await;
    let t = c.tenant("pend").await;
    for i in 1..=3 {
        c.storage_node(&format!("n{i}"), &format!("z/r/h{i}")).await;
    }
    let mk = |name: &str| json!({"name": name, "size_bytes": GIB, "replicas": 2, "tenant": t});
    let victim = c.op_ok(Method::POST, "/v1/volumes", Some(mk("victim"))).await["id"].as_u64().unwrap();
    c.wait_caught_up().await;

    // The DEK is unwrapped once, on the node that proposed the attach.
    let before = dek_unwraps(&c).await;
    let (st, v) = c
        .op(1, Method::POST, &format!("/v1/volumes/{victim}/attach"), Some(json!({"mode": "read_only", "host": "t"})))
        .await;
    assert!(st.is_success(), "{v}");
    let dek = v["dek_hex"].as_str().unwrap().to_string();
    c.wait_caught_up().await;
    let after = dek_unwraps(&c).await;
    eprintln!("dek unwraps per node: before {before:?}, after {after:?}");
    assert_eq!(after[1], before[1] + 1, "the proposer unwrapped the DEK");
    assert_eq!(after[0], before[0], "replica 0 unwrapped a DEK it did not hand out");
    assert_eq!(after[2], before[2], "replica 2 unwrapped a DEK it did not hand out");

    // Node 3 goes down hard; its copy has the volume only in its Raft log.
    c.kill9(2);
    let old = tempfile::tempdir().unwrap();
    let old_dir = old.path().join("data-2");
    copy_dir(&c.data_dir(2), &old_dir);
    let old_root = old.path().join("root.key.before");
    std::fs::copy(c.root_key_file(2), &old_root).unwrap();
    let in_state = dump_wrapped(&old_dir).iter().any(|w| w["kind"] == "volume" && w["id"] == victim);
    assert!(!in_state, "the copy's state file already holds the volume: the log would not be exercised");
    // Positive control: try-unwrap finds the key through the copy's Raft log.
    assert_eq!(try_unwrap(&old_dir, &old_root, &[], victim), Ok(fingerprint(&dek)));

    // Delete with node 3 down.
    let rep = c.op_ok(Method::DELETE, &format!("/v1/volumes/{victim}?force=true"), None).await;
    assert_eq!(rep["root_epoch"], 1);
    // Voters 1 and 2 report their purge; voter 3 cannot.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = erasure(&c, victim).await;
        let purged: Vec<u64> = e["meta_voters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["purged"] == true)
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        if purged == vec![1, 2] {
            assert_eq!(e["key_shred"], "pending on node 3", "{e}");
            assert_ne!(e["state"], "complete");
            eprintln!("with node 3 down: key_shred = {}", e["key_shred"]);
            break;
        }
        assert!(Instant::now() < deadline, "voters 1 and 2 did not report their purge: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Still pending a few seconds later: nothing completes without the voter.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(erasure(&c, victim).await["key_shred"], "pending on node 3");

    // Node 3 rejoins, catches up, ratchets its root key file and reports.
    c.spawn(2);
    c.wait_ready().await;
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let e = erasure(&c, victim).await;
        if e["key_shred"] == "done on every voter" {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 did not ratchet: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let s3 = c.status(2).await.unwrap();
    assert_eq!(s3["root_key_epoch"], 1, "{s3}");
    let text = std::fs::read_to_string(c.root_key_file(2)).unwrap();
    assert!(text.contains("epoch 1"), "node 3's root key file was not ratcheted");

    // The old copy of node 3's data directory is dead, log included.
    let current: Vec<PathBuf> = (0..3).map(|i| c.data_dir(i)).collect();
    let r = try_unwrap(&old_dir, &c.root_key_file(2), &current, victim);
    assert!(r.is_err(), "the old copy of node 3 still unwraps the victim's key: {r:?}");
    eprintln!("old copy after the shred: {}", r.unwrap_err());
}

/// `slate-meta rotate-root`: a fresh random root on every voter, tenant keys re-wrapped,
/// the old root file destroyed, volumes still open with the same DEK, and the old root
/// (even ratcheted forward) no longer opens anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_root_rekeys_every_voter_with_fresh_randomness() {
    let mut c = Cluster::start(3).await;
    let t = c.tenant("rot").await;
    for i in 1..=3 {
        c.storage_node(&format!("n{i}"), &format!("z/r/h{i}")).await;
    }
    let vol = c
        .op_ok(Method::POST, "/v1/volumes", Some(json!({"name": "v", "size_bytes": GIB, "replicas": 2, "tenant": t})))
        .await["id"]
        .as_u64()
        .unwrap();
    let dek = attach_dek(&c, vol).await;
    c.wait_caught_up().await;
    let old = tempfile::tempdir().unwrap();
    let old_roots: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = old.path().join(format!("root-{i}.key"));
            std::fs::copy(c.root_key_file(i), &p).unwrap();
            p
        })
        .collect();

    let out = Command::new(BIN)
        .args(["rotate-root", "--config"])
        .arg(c.node_dir(0).join("meta.toml"))
        .arg("--token-file")
        .arg(c.root().join("operator.token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "rotate-root: {}", String::from_utf8_lossy(&out.stderr));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["root_generation"], 1);
    assert_eq!(rep["root_epoch"], 1);
    c.wait_caught_up().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, old_root) in old_roots.iter().enumerate() {
        loop {
            let s = c.status(i).await.unwrap();
            if s["root_key_epoch"] == 1 && s["root_generation"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "node {i} did not rotate: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let now = std::fs::read_to_string(c.root_key_file(i)).unwrap();
        let before = std::fs::read_to_string(old_root).unwrap();
        assert_ne!(now, before, "node {i}'s root key file did not change");
        assert!(now.contains("epoch 1"));
    }
    // Every voter holds the same new root.
    let k0 = std::fs::read_to_string(c.root_key_file(0)).unwrap();
    for i in 1..3 {
        assert_eq!(std::fs::read_to_string(c.root_key_file(i)).unwrap(), k0, "node {i} holds another root");
    }
    // The volume's key is unchanged, and the old root (ratcheted to epoch 1) opens nothing now.
    assert_eq!(attach_dek(&c, vol).await, dek);
    c.stop_all();
    assert_eq!(try_unwrap(&c.data_dir(0), &c.root_key_file(0), &[], vol), Ok(fingerprint(&dek)));
    let r = try_unwrap(&c.data_dir(0), &old_roots[0], &[], vol);
    assert!(r.is_err(), "the pre-rotation root still opens the state: {r:?}");
    // A restart with the rotated key files works.
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_ready().await;
    assert_eq!(attach_dek(&c, vol).await, dek);
}
