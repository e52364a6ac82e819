//! Tight file modes (issue 10, "Keys and files"): after `slate up` has created a
//! cluster, attached the demo volume and written to it, no file anywhere under the
//! cluster directory has a group or other permission bit, and no directory does
//! either. There are no exceptions: public material (CA and node certificates, the
//! capability verifying key) is 0600 too, since it lives in the owner's 0700 tree
//! and one rule is easier to keep than a list (docs/design/keys.md, "File modes").
//!
//! The test sets no umask of its own: under the usual 022, any file created by the
//! default mode would show up here as 0644 or 0755.

use slate_tests::cluster::{qemu_io_ok, Cluster, UpOptions};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let e = e.expect("dir entry");
        let Ok(m) = std::fs::symlink_metadata(e.path()) else { continue }; // removed meanwhile
        let is_dir = m.is_dir();
        out.push((e.path(), m));
        if is_dir {
            walk(&e.path(), out);
        }
    }
}

fn ext(name: &str, want: &str) -> bool {
    Path::new(name).extension().is_some_and(|e| e == want)
}

fn umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()
}

#[test]
fn nothing_under_the_cluster_directory_is_open_to_group_or_others() {
    let mask = umask();
    eprintln!("umask of the test process: {}", mask.map_or_else(|| "unknown".to_owned(), |m| format!("{m:03o}")));
    if mask.is_some_and(|m| m & 0o077 == 0o077) {
        eprintln!("warning: the umask already denies group and other bits; this run proves less than under 022");
    }
    let cluster = Cluster::start("e2e-file-modes", UpOptions::default());
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x5c 0 1M".into(), "read -P 0x5c 0 1M".into()]);
    // A second write after a metadata call, so the Raft log and the state have moved on.
    let _ = cluster.volume_show("demo");
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x5d 4M 64k".into()]);

    // `slate status` shows every metadata node's root key epoch (0: no shred yet).
    let status = cluster.slate_json(&["status"]);
    let metas = status["meta_nodes"].as_array().unwrap_or_else(|| panic!("no meta_nodes in {status}"));
    assert_eq!(metas.len(), 3, "{status}");
    for m in metas {
        assert_eq!(m["root_key_epoch"], 0, "{m}");
        assert_eq!(m["root_generation"], 0, "{m}");
    }

    let root = cluster.dir().to_path_buf();
    let mut entries = vec![(root.clone(), std::fs::symlink_metadata(&root).expect("cluster dir"))];
    walk(&root, &mut entries);

    // Positive controls: the walk really covers the files that matter.
    let names: Vec<String> =
        entries.iter().map(|(p, _)| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    let has = |pred: &dyn Fn(&str) -> bool| names.iter().any(|n| pred(n));
    for (what, ok) in [
        ("a disk image (disk.img)", has(&|n| n == "disk.img")),
        ("a root key file (root.key)", has(&|n| n == "root.key")),
        ("a metadata snapshot (snap-*.bin)", has(&|n| n.starts_with("snap-"))),
        ("a Raft log file (*.raftlog)", has(&|n| ext(n, "raftlog"))),
        ("the operator token", has(&|n| ext(n, "token"))),
        ("cluster.json", has(&|n| n == "cluster.json")),
        ("a process log (*.log)", has(&|n| ext(n, "log"))),
        ("a private key (*key.pem)", has(&|n| n.ends_with("key.pem"))),
    ] {
        assert!(ok, "the walk of {} found no {what}; names seen: {names:?}", root.display());
    }
    assert!(
        entries.iter().any(|(_, m)| m.file_type().is_socket()),
        "the walk found no unix socket (NBD, admin) under {}",
        root.display()
    );

    let mut open = Vec::new();
    for (path, m) in &entries {
        let mode = m.permissions().mode() & 0o7777;
        if m.file_type().is_symlink() {
            // A symlink's own mode is always 0777 and means nothing; its target is walked if inside.
            continue;
        }
        if mode & 0o077 != 0 {
            let kind = if m.is_dir() {
                "directory"
            } else if m.file_type().is_socket() {
                "socket"
            } else {
                "file"
            };
            open.push(format!("{kind} {:o} {}", mode, path.strip_prefix(&root).unwrap_or(path).display()));
        }
    }
    eprintln!("checked {} entries under {}", entries.len(), root.display());
    assert!(open.is_empty(), "entries open to group or others (mode shown in octal):\n{}", open.join("\n"));
}
