//! The `slate` binary as a user runs it: the client's commands, and the
//! storage node and metadata service it runs itself for `slate up`.
//!
//! Being an integration test of this package, it also makes `cargo test` build
//! `target/<profile>/slate`, the binary the cluster tests in `tests/` drive.

use std::process::{Command, Output};

fn slate(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("a scratch directory");
    Command::new(env!("CARGO_BIN_EXE_slate"))
        .args(args)
        .current_dir(dir.path())
        .env_remove("SLATE_CLUSTER")
        .env_remove("SLATE_API")
        .env_remove("SLATE_CA")
        .env_remove("SLATE_TOKEN_FILE")
        .output()
        .expect("run slate")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_lists_the_client_commands() {
    let out = slate(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = stdout(&out);
    for cmd in ["up", "attach", "volume", "snapshot", "backup", "restore", "export", "clone", "status"] {
        assert!(help.lines().any(|l| l.trim_start().starts_with(cmd)), "`{cmd}` missing from:\n{help}");
    }
}

#[test]
fn runs_the_node_and_the_metadata_service() {
    let node = slate(&["run-node", "--help"]);
    assert!(node.status.success(), "{node:?}");
    assert!(stdout(&node).contains("storage node"), "{}", stdout(&node));
    let meta = slate(&["run-meta", "--help"]);
    assert!(meta.status.success(), "{meta:?}");
    assert!(stdout(&meta).contains("metadata service"), "{}", stdout(&meta));
}

#[test]
fn without_a_cluster_says_how_to_start_one() {
    let out = slate(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("slate: no cluster found"), "{err}");
    assert!(err.contains("slate up"), "{err}");
}
