//! Backups end to end, with real clients and a real S3 server:
//! * a 1 GiB volume, filled, snapshotted, backed up in full to a directory,
//!   1% changed, backed up incrementally: the increment is at most 2% of the
//!   full backup, the chain verifies and restores to exactly the snapshot;
//! * a full backup to S3 (moto's server) restores to the snapshot, and holds no plaintext;
//! * a backup killed with -9 resumes under the same id;
//! * after `volume delete`: verify still passes, restore says "key destroyed",
//!   no plaintext canary is anywhere in the targets, and the snapshot's extents
//!   on the nodes are verified zero;
//! * bad input: each refused with a clear error, nothing left half-made.

use serde_json::Value;
use slate_tests::cluster::{nbd_sha256, nbd_unix_uri, qemu_io_ok, Cluster, ProcessEntry, UpOptions};
use slate_tests::disk::{count_present, nonzero_prints};
use slate_tests::s3::S3Server;
use slate_tests::ProcessGuard;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CANARY: &[u8] = b"SLATE-PLAINTEXT-CANARY-7f3a9c";

fn data_start(node: &ProcessEntry) -> u64 {
    slate_node::engine::read_geometry(&node.data).expect("read the disk's geometry").data_start_bytes
}

/// `slate --json ARGS` with the S3 settings of `s3` (if any); panics unless it succeeds.
fn slate_json_s3(cluster: &Cluster, s3: Option<&S3Server>, args: &[&str]) -> Value {
    let out = run(cluster, s3, args, true);
    assert!(out.status.success(), "slate {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("slate {args:?}: no JSON ({e})"))
}

fn run(cluster: &Cluster, s3: Option<&S3Server>, args: &[&str], json: bool) -> Output {
    let mut cmd = cluster.slate();
    if json {
        cmd.arg("--json");
    }
    cmd.args(args);
    if let Some(s) = s3 {
        s.configure(&mut cmd);
    }
    cmd.output().expect("run slate")
}

/// Fills `len` bytes of the demo volume from a file of random data with a canary in every MiB.
fn fill(cluster: &Cluster, len: u64) {
    let file = cluster.scratch().join("fill.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).expect("fill file");
        let mut buf = vec![0u8; MIB as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..len / MIB {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            buf[..CANARY.len()].copy_from_slice(CANARY);
            f.write_all(&buf).expect("write the fill file");
        }
    }
    let out = Command::new("nbdcopy")
        .arg(&file)
        .arg(nbd_unix_uri("demo", &cluster.nbd_socket()))
        .output()
        .expect("run nbdcopy");
    assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&file).expect("remove the fill file");
}

/// Files under `dir` (recursively) that contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// Serves `spec` read-only (or the head, with `extra` empty) and returns its SHA-256.
fn sha_of(cluster: &Cluster, spec: &str, extra: &[&str], export: &str) -> String {
    let (mut guard, sock) = cluster.attach_unix(spec, extra, export);
    let sha = nbd_sha256(&nbd_unix_uri(export, &sock));
    guard.terminate();
    sha
}

#[test]
fn backups_round_trip_incrementally_to_a_directory_and_s3_and_die_with_their_volume() {
    let mut cluster = Cluster::start(
        "slate-e2e-backup",
        UpOptions {
            volume_size_bytes: 1 << 30,
            disk_size_bytes: 3072 * MIB,
            segment_blocks: Some(65_536),
            ..UpOptions::default()
        },
    );
    let dir = cluster.scratch().join("backups");
    let target = format!("file://{}", dir.display());

    // A full 1 GiB volume and its snapshot.
    let extents = |when: &str| {
        for n in cluster.nodes() {
            eprintln!("{when}, node {}: {}", n.id, n.extent_states());
        }
    };
    extents("at start");
    // Non-zero blocks that are no volume's (the superblock's second copy at the disk's end).
    let baseline: Vec<HashSet<u128>> = cluster.nodes().iter().map(|n| nonzero_prints(&n.data, data_start(n))).collect();
    fill(&cluster, 1 << 30);
    extents("after the fill");
    cluster.slate_ok(&["snapshot", "create", "demo", "s1"]);
    extents("after s1");

    // Full backup to the directory; kill -9 part way, then resume under the same id.
    let mut cmd = cluster.slate();
    cmd.args(["backup", "create", "demo@s1", "--to", &target, "--parallel", "2"]);
    let mut first = ProcessGuard::spawn("slate backup", &mut cmd).expect("spawn slate backup");
    let progress_dir = dir.join("progress");
    let t = Instant::now();
    while !progress_dir.read_dir().is_ok_and(|mut d| d.next().is_some()) && first.is_alive() {
        assert!(t.elapsed() < Duration::from_mins(5), "the backup saved no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill9();
    extents("after the killed backup");
    let full = slate_json_s3(&cluster, None, &["backup", "create", "demo@s1", "--to", &target]);
    extents("after the full backup");
    eprintln!("full backup of 1 GiB: {full}");
    assert_eq!(full["id"], 1, "the resumed backup kept its id");
    assert_eq!(full["blocks_stored"], 262_144, "every block of the full volume is in the backup");
    let full_mb_s = full["mb_per_s"].as_f64().unwrap_or(0.0);

    // 1% of the volume changed: 2,621 scattered 4 KiB blocks.
    let uri = nbd_unix_uri("demo", &cluster.nbd_socket());
    let cmds: Vec<String> =
        (0..2_621u64).map(|i| format!("write -P {} {} 4k", 1 + i % 250, (i * 100 + 7) * 4096)).collect();
    qemu_io_ok(&uri, &cmds);
    extents("after the 1% writes");
    let t = Instant::now();
    cluster.slate_ok(&["snapshot", "create", "demo", "s2"]);
    eprintln!("snapshot s2 taken in {:.2} s", t.elapsed().as_secs_f64());
    let inc = slate_json_s3(
        &cluster,
        None,
        &["backup", "create", "demo@s2", "--to", &target, "--incremental-from", "demo@s1"],
    );
    eprintln!("incremental backup of 1%: {inc}");
    let (inc_bytes, full_bytes) = (inc["bytes_stored"].as_f64().unwrap(), full["bytes_stored"].as_f64().unwrap());
    assert!(inc_bytes <= 0.02 * full_bytes, "the increment is {inc_bytes} bytes, the full backup {full_bytes}");
    assert_eq!(inc["blocks_stored"], 2_621);
    let inc_id = inc["id"].as_u64().expect("id");

    let listed = cluster.slate_json(&["backup", "list", "demo"]);
    let ids: Vec<u64> = listed.as_array().expect("list").iter().filter_map(|b| b["id"].as_u64()).collect();
    assert_eq!(ids, [1, inc_id]);
    let v = slate_json_s3(&cluster, None, &["backup", "verify", &inc_id.to_string()]);
    assert_eq!(v["verified"], true, "{v}");

    // The chain restores to exactly the snapshot.
    let snap_sha = sha_of(&cluster, "demo@s2", &["--read-only"], "s2");
    for n in cluster.nodes() {
        eprintln!("before the restore, node {}: {}", n.id, n.extent_states());
    }
    eprintln!("demo: {}", cluster.volume_show("demo"));
    // Restore, killed with -9 part way, then resumed.
    let mut cmd = cluster.slate();
    cmd.args(["restore", &inc_id.to_string(), "from-dir"]);
    let mut first = ProcessGuard::spawn("slate restore", &mut cmd).expect("spawn slate restore");
    let t = Instant::now();
    while !cluster.slate_json(&["volume", "list"]).to_string().contains("from-dir") && first.is_alive() {
        assert!(t.elapsed() < Duration::from_mins(2), "the restore created no volume");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(4));
    first.kill9();
    let t = Instant::now();
    let r = slate_json_s3(&cluster, None, &["restore", &inc_id.to_string(), "from-dir"]);
    eprintln!("resumed restore of the chain (1 GiB + 1%) in {:.1} s: {r}", t.elapsed().as_secs_f64());
    assert_eq!(sha_of(&cluster, "from-dir", &[], "from-dir"), snap_sha, "the directory chain restored differently");
    cluster.slate_ok(&["volume", "delete", "from-dir", "--wait"]);
    eprintln!(
        "MEASURED: full backup of 1 GiB {full_mb_s:.0} MB/s; incremental of 1% {:.0} MB/s, {:.2}% of the full size",
        inc["mb_per_s"].as_f64().unwrap_or(0.0),
        100.0 * inc_bytes / full_bytes
    );

    // Delete the volume: backups stay verifiable, become unrestorable; nothing in clear anywhere.
    let before: Vec<HashSet<u128>> = cluster
        .nodes()
        .iter()
        .zip(&baseline)
        .map(|(n, base)| nonzero_prints(&n.data, data_start(n)).difference(base).copied().collect())
        .collect();
    assert!(before.iter().any(|p| p.len() > 10_000), "the volume's blocks were not found on the disks");
    let out = cluster.run_slate(&["volume", "delete", "demo", "--force", "--wait"]);
    assert!(out.status.success(), "delete: {}", String::from_utf8_lossy(&out.stderr));
    let v = slate_json_s3(&cluster, None, &["backup", "verify", &inc_id.to_string()]);
    assert_eq!(v["verified"], true, "{v}");
    let err =
        String::from_utf8_lossy(&run(&cluster, None, &["restore", &inc_id.to_string(), "too-late"], false).stderr)
            .into_owned();
    assert!(err.contains("key destroyed"), "restore after delete: {err}");
    let vols = cluster.slate_json(&["volume", "list"]);
    assert!(!vols.to_string().contains("too-late"), "a refused restore left a volume: {vols}");
    assert!(files_containing(&dir, CANARY).is_empty(), "plaintext in the directory target");
    extents("after the delete");
    eprintln!("volumes left: {}", cluster.slate_json(&["volume", "list"]));
    // The volume's extents, snapshot layers included, are verified zero on every node.
    for (n, prints) in cluster.nodes().iter().zip(&before) {
        let left = count_present(&n.data, prints);
        assert_eq!(left, 0, "node {}: {left} blocks of the deleted volume and its snapshots are still on disk", n.id);
    }
    cluster.stop();
}

#[test]
fn backup_bad_input_is_refused_and_leaves_nothing_half_made() {
    let mut cluster =
        Cluster::start("slate-e2e-backup-bad", UpOptions { volume_size_bytes: 64 * MIB, ..UpOptions::default() });
    let dir = cluster.scratch().join("b");
    let target = format!("file://{}", dir.display());
    fill(&cluster, 8 * MIB);
    cluster.slate_ok(&["snapshot", "create", "demo", "s1"]);

    cluster.slate_refused(&["backup", "create", "demo@nope", "--to", &target], "no snapshot named");
    cluster.slate_refused(&["backup", "create", "demo@s1", "--to", "ftp://x"], "not a backup target");
    let mut cmd = cluster.slate();
    cmd.args(["backup", "create", "demo@s1", "--to", "s3://bkt/p", "--s3-endpoint", "http://127.0.0.1:9"])
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y");
    let out = cmd.output().expect("run slate");
    assert!(!out.status.success(), "a backup to an unreachable target succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reachable"), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.slate_refused(
        &["backup", "create", "demo@s1", "--to", &target, "--incremental-from", "demo@s1"],
        "the base of an incremental is missing",
    );
    assert!(
        cluster.slate_json(&["backup", "list", "demo"]).as_array().is_some_and(Vec::is_empty),
        "a refused backup was recorded"
    );

    // A full target: a 1 MiB tmpfs.
    let small = cluster.scratch().join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        let err = cluster.slate_refused(
            &["backup", "create", "demo@s1", "--to", &format!("file://{}", small.display())],
            "No space left",
        );
        eprintln!("full target: {err}");
        let _ = Command::new("umount").arg(&small).status();
    } else {
        eprintln!("WARNING: could not mount a tmpfs (not root?): the full-target case was not run");
    }

    let b = cluster.slate_json(&["backup", "create", "demo@s1", "--to", &target]);
    let id = b["id"].as_u64().expect("id").to_string();
    cluster.slate_refused(&["restore", &id, "demo"], "has a volume named");
    // A tampered object: verify and restore both refuse; the failed restore deletes its volume.
    let objects = dir.join("objects");
    let victim = std::fs::read_dir(&objects)
        .expect("objects")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).expect("dir").flatten())
        .next()
        .expect("an object")
        .path();
    let mut bytes = std::fs::read(&victim).expect("read object");
    let good = bytes.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, &bytes).expect("tamper");
    cluster.slate_refused(&["backup", "verify", &id], "SHA-256");
    cluster.slate_refused(&["restore", &id, "tampered"], "SHA-256");
    assert!(
        !cluster.slate_json(&["volume", "list"]).to_string().contains("tampered"),
        "a failed restore left its volume"
    );
    std::fs::write(&victim, &good[..good.len() - 4096]).expect("truncate");
    cluster.slate_refused(&["backup", "verify", &id], "SHA-256");
    std::fs::write(&victim, &good).expect("repair");
    // A truncated or edited manifest.
    let manifest = dir.join(format!("manifests/vol-{}/backup-{id}.json", cluster.volume_show("demo")["id"]));
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, &text[..text.len() / 2]).expect("truncate manifest");
    cluster.slate_refused(&["backup", "verify", &id], "does not verify");
    std::fs::write(&manifest, text.replacen("\"blocks_stored\": 2048", "\"blocks_stored\": 2047", 1))
        .expect("edit manifest");
    cluster.slate_refused(&["backup", "verify", &id], "does not verify");
    std::fs::write(&manifest, &text).expect("restore manifest");
    let v = cluster.slate_json(&["backup", "verify", &id]);
    assert_eq!(v["verified"], true);

    // The same snapshot to S3: verifies, restores to exactly the snapshot, holds no plaintext.
    let s3 = S3Server::start("slate-backups");
    eprintln!("moto_server pid {} at {}", s3.pid(), s3.endpoint());
    let b = slate_json_s3(&cluster, Some(&s3), &["backup", "create", "demo@s1", "--to", &s3.target("prod")]);
    let id = b["id"].as_u64().expect("id").to_string();
    let v = slate_json_s3(&cluster, Some(&s3), &["backup", "verify", &id]);
    assert_eq!(v["verified"], true, "{v}");
    slate_json_s3(&cluster, Some(&s3), &["restore", &id, "from-s3"]);
    let snap_sha = sha_of(&cluster, "demo@s1", &["--read-only"], "s1");
    assert_eq!(sha_of(&cluster, "from-s3", &[], "from-s3"), snap_sha, "the S3 backup restored differently");
    let (count, hits) = s3.objects_containing(CANARY);
    assert!(count >= 8, "the S3 target holds {count} objects");
    assert!(hits.is_empty(), "plaintext in the S3 target: {hits:?}");
    cluster.stop();
}
