//! Clones (issue 9, acceptance 4): a clone reads as its parent's snapshot, takes
//! no disk space until written, and writes to it and to its parent do not reach
//! each other; `slate volume flatten` copies what it still reads from the
//! parent, resumes after kill -9, and detaches it, so the snapshot can go. A
//! deleted parent's segments stay (and keep serving the clone) until its last
//! clone is flattened, then are erased like any deleted volume's.

use serde_json::Value;
use slate_tests::cluster::{nbd_unix_uri, qemu_io_ok, qemu_io_ok_with, run_ok, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Extents owned on the storage nodes' disks, summed over the nodes, and their size in bytes
/// (from each node's `/metrics`: `slate_node_extents{state=...}` and `slate_node_capacity_bytes`).
fn owned_extents(cluster: &Cluster) -> (u64, u64) {
    let text = std::fs::read_to_string(cluster.cluster_json_path()).expect("cluster.json");
    let info: Value = serde_json::from_str(&text).expect("cluster.json is JSON");
    let (mut owned, mut extent_bytes) = (0, 0);
    for p in info["processes"].as_array().into_iter().flatten().filter(|p| p["role"] == "node") {
        let addr = p["metrics"].as_str().expect("a node's metrics address in cluster.json");
        let m = run_ok(Command::new("curl").args(["-sS", "--max-time", "10"]).arg(format!("http://{addr}/metrics")));
        let metric = |name: &str| -> u64 {
            m.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
        };
        owned += metric("slate_node_extents{state=\"owned\"}");
        let all = metric("slate_node_extents{");
        extent_bytes = metric("slate_node_capacity_bytes") / all.max(1);
    }
    (owned, extent_bytes)
}

fn compare(a: &str, b: &str) -> String {
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]))
}

/// `slate volume flatten` started in the background (log in the scratch directory).
fn spawn_flatten(cluster: &Cluster, clone: &str, extra: &[&str]) -> ProcessGuard {
    let log = std::fs::File::create(cluster.scratch().join(format!("flatten-{clone}.log"))).expect("flatten log");
    let mut cmd = cluster.slate();
    cmd.args(["volume", "flatten", clone]).args(extra).stdout(log.try_clone().expect("dup")).stderr(log);
    ProcessGuard::spawn("slate volume flatten", &mut cmd).expect("spawn slate volume flatten")
}

#[test]
fn a_clone_reads_as_its_snapshot_until_written_and_flattens_resumably() {
    let mut cluster = Cluster::start("slate-e2e-clone", UpOptions::default());
    let demo = cluster.nbd_unix();
    // 128 MiB of the 256 MiB demo volume hold data.
    qemu_io_ok(&demo, &["write -P 0x11 0 64M".into(), "write -P 0x22 128M 64M".into()]);
    cluster.slate_ok(&["snapshot", "create", "demo", "s1"]);
    // The head moves on after the snapshot: the clone must read the snapshot, not the head.
    qemu_io_ok(&demo, &["write -P 0x55 0 4M".into()]);

    let (before, extent) = owned_extents(&cluster);
    cluster.slate_refused(&["clone", "demo@nosuch", "c1"], "no snapshot named \"nosuch\"");
    cluster.slate_refused(&["clone", "demo", "c1"], "names no snapshot");
    let t = Instant::now();
    let c1 = cluster.slate_json(&["clone", "demo@s1", "c1"]);
    let took = t.elapsed();
    cluster.slate_refused(&["clone", "demo@s1", "c1"], "has a volume named \"c1\"");
    let (after_clone, _) = owned_extents(&cluster);
    let shown = cluster.volume_show("c1");
    assert_eq!(shown["parent"]["volume_name"], "demo", "{shown:#}");
    assert_eq!(shown["parent"]["snapshot_name"], "s1");
    let snaps = cluster.slate_json(&["snapshot", "list", "demo"]);
    assert_eq!(shown["parent"]["epoch"], snaps[0]["epoch"], "the clone reads the snapshot's epoch");
    assert_eq!(cluster.volume_show("demo")["clones"][0]["name"], "c1");
    cluster.slate_refused(&["snapshot", "delete", "demo", "s1"], "c1 (vol-");

    // The clone reads exactly as the snapshot.
    let (mut c1_att, c1_sock) = cluster.attach_unix("c1", &[], "c1");
    let (mut s1_att, s1_sock) = cluster.attach_unix("demo@s1", &["--read-only"], "s1");
    let (c1_uri, s1_uri) = (nbd_unix_uri("c1", &c1_sock), nbd_unix_uri("s1", &s1_sock));
    let t = Instant::now();
    let out = compare(&c1_uri, &s1_uri);
    assert!(out.contains("identical"), "{out}");
    eprintln!("qemu-img compare of the clone and demo@s1 (256 MiB): identical in {:.1} s", t.elapsed().as_secs_f64());
    let (after_read, _) = owned_extents(&cluster);
    eprintln!(
        "clone space before any write: {} extent(s) ({} bytes) on the nodes' disks right after `slate clone` \
         (made in {:.2} s) and {} ({} bytes) after attaching it and reading all of it, for a parent holding \
         128 MiB x 2 replicas; slate-meta reserves {} bytes per replica for it in placement ({} id {})",
        after_clone - before,
        (after_clone - before) * extent,
        took.as_secs_f64(),
        after_read - before,
        (after_read - before) * extent,
        c1["size_bytes"],
        c1["name"],
        c1["id"],
    );
    assert_eq!(after_clone, before, "making a clone allocated space on the nodes");
    assert_eq!(after_read, before, "reading a clone allocated space on the nodes");

    // Writes to the clone do not reach the parent, and the reverse.
    qemu_io_ok(&c1_uri, &["write -P 0x33 32M 4M".into()]);
    let (after_write, _) = owned_extents(&cluster);
    eprintln!(
        "after a 4 MiB write to the clone: {} extent(s) ({} MiB) on the nodes (its 2 replicas)",
        after_write - before,
        (after_write - before) * extent / MIB
    );
    qemu_io_ok(&demo, &["write -P 0x44 140M 4M".into()]);
    qemu_io_ok(&demo, &["read -P 0x55 0 4M".into(), "read -P 0x11 4M 60M".into(), "read -P 0x44 140M 4M".into()]);
    qemu_io_ok_with(&["-r"], &s1_uri, &["read -P 0x11 0 64M".into(), "read -P 0x22 128M 64M".into()]);
    let c1_reads: Vec<String> = vec![
        "read -P 0x11 0 32M".into(),
        "read -P 0x33 32M 4M".into(),
        "read -P 0x11 36M 28M".into(),
        "read -P 0 64M 64M".into(),
        "read -P 0x22 128M 64M".into(),
        "read -P 0 192M 64M".into(),
    ];
    qemu_io_ok(&c1_uri, &c1_reads);
    // A trim on the clone does not let the parent show through again.
    qemu_io_ok(&c1_uri, &["discard 60M 4M".into(), "read -P 0 60M 4M".into()]);
    qemu_io_ok(&c1_uri, &["write -P 0x11 60M 4M".into()]);
    s1_att.terminate();

    // Flatten: refused while the clone is attached; killed half way, then resumed.
    cluster.slate_refused(&["volume", "flatten", "c1"], "--force");
    c1_att.terminate();
    let mut f = spawn_flatten(&cluster, "c1", &["--step", "1M"]);
    let t = Instant::now();
    loop {
        let (now, _) = owned_extents(&cluster);
        if now > after_write + 4 {
            break; // the copy is writing into the clone
        }
        assert!(f.is_alive() && t.elapsed() < Duration::from_mins(2), "the flatten never started copying");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(f.is_alive(), "the flatten finished before it could be killed");
    f.kill9();
    eprintln!("killed the flatten with SIGKILL after {:.1} s", t.elapsed().as_secs_f64());
    // Its attachment is left behind: a plain rerun is refused, naming the way out.
    cluster.slate_refused(&["volume", "flatten", "c1"], "--force");
    let report = cluster.slate_json(&["volume", "flatten", "c1", "--force"]);
    eprintln!("flatten resumed: {report}");
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    assert_eq!(n("own_bytes") + n("copied_bytes"), 128 * MIB, "every block the parent holds is in the clone");
    assert!(n("own_bytes") > 8 * MIB, "the rerun found the first run's copies and copied them not again: {report}");
    assert!(n("copied_bytes") > 0, "the kill left nothing to copy: {report}");
    let shown = cluster.volume_show("c1");
    assert!(shown.get("parent").is_none_or(Value::is_null), "still a clone: {shown:#}");
    assert!(cluster.slate_ok(&["volume", "flatten", "c1"]).contains("reads no parent"));

    // The snapshot can go now, and the clone still reads right.
    cluster.slate_ok(&["snapshot", "delete", "demo", "s1"]);
    let (mut c1_att, c1_sock) = cluster.attach_unix("c1", &[], "c1");
    qemu_io_ok(&nbd_unix_uri("c1", &c1_sock), &c1_reads);
    c1_att.terminate();
    qemu_io_ok(&demo, &["read -P 0x55 0 4M".into(), "read -P 0x44 140M 4M".into()]);
    assert!(cluster.slate_ok(&["audit", "verify"]).contains("verified"));
    cluster.stop();
}

#[test]
fn a_deleted_parent_serves_its_clone_until_flattened_then_is_erased() {
    let mut cluster = Cluster::start("slate-e2e-clone-parent", UpOptions::default());
    let tenant = cluster.volume_show("demo")["tenant"].as_u64().expect("tenant").to_string();
    cluster.slate_ok(&["volume", "create", "base", "--size", "64M", "--tenant", &tenant]);
    let (mut a, sock) = cluster.attach_unix("base", &[], "base");
    qemu_io_ok(&nbd_unix_uri("base", &sock), &["write -P 0x61 0 16M".into()]);
    a.terminate();
    cluster.slate_ok(&["snapshot", "create", "base", "gold"]);
    // A clone in another tenant (an operator may), larger than its parent.
    let other = cluster.slate_json(&["tenant", "create", "other"]);
    let other = other["id"].as_u64().expect("tenant id").to_string();
    cluster.slate_ok(&["clone", "base@gold", "web", "--tenant", &other, "--size", "96M"]);
    let base_id = cluster.volume_show("base")["id"].as_u64().expect("id");

    cluster.slate_ok(&["volume", "delete", "base"]);
    let shown = cluster.volume_show("web");
    assert_eq!(shown["parent"]["deleted"], true, "{shown:#}");
    let erasure = cluster.slate_json(&["volume", "show", &base_id.to_string(), "--deleted"]);
    assert_eq!(erasure["state"], "kept_for_clones", "{erasure:#}");
    // The name is free again; the clone still reads the deleted parent's snapshot.
    cluster.slate_ok(&["volume", "create", "base", "--size", "8M", "--tenant", &tenant]);
    let (mut w, wsock) = cluster.attach_unix("web", &[], "web");
    let web = nbd_unix_uri("web", &wsock);
    qemu_io_ok(&web, &["read -P 0x61 0 16M".into(), "read -P 0 16M 80M".into()]);
    qemu_io_ok(&web, &["write -P 0x62 4M 1M".into()]);
    w.terminate();

    let report = cluster.slate_json(&["volume", "flatten", "web"]);
    assert_eq!(report["copied_bytes"].as_u64(), Some(15 * MIB), "{report}");
    let (mut w, wsock) = cluster.attach_unix("web", &[], "web");
    let web = nbd_unix_uri("web", &wsock);
    qemu_io_ok(
        &web,
        &[
            "read -P 0x61 0 4M".into(),
            "read -P 0x62 4M 1M".into(),
            "read -P 0x61 5M 11M".into(),
            "read -P 0 16M 80M".into(),
        ],
    );
    w.terminate();
    // The parent's segments are released now, zeroed and verified.
    let t = Instant::now();
    loop {
        let e = cluster.slate_json(&["volume", "show", &base_id.to_string(), "--deleted"]);
        let (total, erased) = (e["replicas_total"].as_u64().unwrap_or(0), e["replicas_erased"].as_u64().unwrap_or(0));
        if total > 0 && total == erased {
            eprintln!(
                "the deleted parent's {total} replica(s) erased {:.1} s after the flatten",
                t.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_mins(3), "the parent's releases were not erased: {e:#}");
        std::thread::sleep(Duration::from_secs(1));
    }
    cluster.stop();
}
