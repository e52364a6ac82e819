//! The `slate` command line: `up` (the embedded default), `attach`, and the
//! management commands against slate-meta's API. Human output by default,
//! `--json` for scripts. With no flags, commands find the cluster through
//! `./slate-data/cluster.json` (or `--cluster PATH` / `SLATE_CLUSTER`).

pub mod attach;
pub mod backup;
pub mod certificate_page;
pub mod clone;
pub mod cluster;
pub mod commands;
pub mod erasure;
pub mod export;
pub mod flatten;
pub mod metactl;
pub mod open;
pub mod operations;
pub mod procs;
pub mod snapshot;
pub mod up;

use anyhow::Result;
use clap::{Parser, Subcommand};
use slate::api;
use std::path::PathBuf;

/// Slate: replicated, encrypted block volumes over NBD.
#[derive(Parser, Debug)]
#[command(name = "slate", version, about, propagate_version = true)]
pub struct Cli {
    /// The cluster file written by `slate up` (default: ./slate-data/cluster.json).
    #[arg(long, global = true, env = "SLATE_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// The management API of a metadata node (overrides the cluster file), e.g. https://127.0.0.1:7443.
    /// Repeat it, or separate addresses with commas, to name every metadata node: calls go to
    /// whichever answers (the leader first, once known).
    #[arg(long, global = true, env = "SLATE_API", value_delimiter = ',', action = clap::ArgAction::Append)]
    pub cluster_api: Vec<String>,
    /// CA certificate (PEM) to trust for the API (with --cluster-api).
    #[arg(long, global = true, env = "SLATE_CA")]
    pub ca: Option<PathBuf>,
    /// File holding the bearer token (with --cluster-api).
    #[arg(long, global = true, env = "SLATE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a local cluster (3 metadata, 3 storage nodes) serving a demo volume over NBD, until Ctrl-C.
    Up(up::UpArgs),
    /// Attach a volume and serve it over NBD until stopped.
    Attach(attach::AttachArgs),
    /// Detach a volume's attachment (when its client is gone).
    Detach {
        volume: String,
        /// The attachment id (default: every attachment of yours).
        #[arg(long)]
        attachment: Option<u64>,
    },
    /// Volumes.
    #[command(subcommand)]
    Volume(commands::VolumeCmd),
    /// Storage nodes.
    #[command(subcommand)]
    Node(commands::NodeCmd),
    /// Disks of the storage nodes.
    #[command(subcommand)]
    Disk(commands::DiskCmd),
    /// Tenants.
    #[command(subcommand)]
    Tenant(commands::TenantCmd),
    /// Principals and their API tokens.
    #[command(subcommand)]
    Token(commands::TokenCmd),
    /// Grants of volume access to principals.
    #[command(subcommand)]
    Grant(commands::GrantCmd),
    /// The audit chain.
    #[command(subcommand)]
    Audit(commands::AuditCmd),
    /// Erasure of deleted volumes: per-replica zeroing and per-voter key purge.
    #[command(subcommand)]
    Erasure(erasure::ErasureCmd),
    /// Crash-consistent snapshots of a volume.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Backups of snapshots to a directory or S3, incremental, verifiable.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// Restore a backup (and its chain) into a new volume.
    Restore(backup::RestoreArgs),
    /// Export a ready snapshot as a LUKS1 image (aes-xts-plain64) that qemu-img and cryptsetup
    /// open with the passphrase, under a fresh key of its own.
    Export(export::ExportArgs),
    /// Clone a ready snapshot, VOL@SNAP, into a new writable volume: nothing is copied, the
    /// clone shares the snapshot's blocks and key until written (`slate volume flatten` ends that).
    Clone(clone::CloneArgs),
    /// Scrub a storage node now: read every written block, check its crc32c, repair from a peer.
    Scrub {
        node: String,
        /// Block with a progress bar until the pass is done.
        #[arg(long)]
        wait: bool,
    },
    /// Erase certificates of decommissioned disks (offline).
    #[command(subcommand)]
    Certificate(operations::CertificateCmd),
    /// The metadata service's status.
    Status,
}

impl Cli {
    /// An API client from the flags or the cluster file.
    pub fn api(&self) -> Result<api::ApiClient> {
        if !self.cluster_api.is_empty() {
            let ca = self.ca.as_ref().ok_or_else(|| anyhow::anyhow!("--cluster-api needs --ca"))?;
            let tok = self.token_file.as_ref().ok_or_else(|| anyhow::anyhow!("--cluster-api needs --token-file"))?;
            return api::ApiClient::new(self.cluster_api.clone(), ca, tok);
        }
        let (_, file) = cluster::ClusterFile::locate(self.cluster.as_deref())?;
        let mut bases = vec![file.api.clone()];
        bases.extend(file.apis.iter().filter(|a| **a != file.api).cloned());
        let token = self.token_file.clone().unwrap_or(file.token_file);
        api::ApiClient::new(bases, &file.ca, &token)
    }
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_filter = if matches!(cli.cmd, Cmd::Attach(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Cmd::Up(args) = &cli.cmd {
        return up::run(args.clone());
    }
    if let Cmd::Certificate(c) = cli.cmd {
        // Offline: the cluster file, if there is one, only supplies the verifying key.
        let key = cluster::ClusterFile::locate(cli.cluster.as_deref()).ok().and_then(|(_, f)| f.verifying_key);
        return operations::certificate(c, key, cli.json);
    }
    let cluster_key = cluster::ClusterFile::locate(cli.cluster.as_deref()).ok().and_then(|(_, f)| f.verifying_key);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let api = cli.api()?;
        match cli.cmd {
            Cmd::Up(_) => unreachable!("handled above"),
            Cmd::Attach(args) => attach::run(api, args).await,
            Cmd::Backup(c) => backup::run(&api, c, cluster_key, cli.json).await,
            Cmd::Restore(args) => backup::restore(&api, args, cluster_key, cli.json).await,
            Cmd::Export(args) => export::run(api, args, cli.json).await,
            other => commands::run(&api, other, cli.json).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_api_is_repeatable_and_comma_separated() {
        let cli = Cli::try_parse_from([
            "slate",
            "--cluster-api",
            "https://127.0.0.1:1,https://127.0.0.1:2",
            "--cluster-api",
            "https://127.0.0.1:3",
            "attach",
            "demo",
        ])
        .expect("parses");
        assert_eq!(cli.cluster_api, ["https://127.0.0.1:1", "https://127.0.0.1:2", "https://127.0.0.1:3"]);
        // After the subcommand too (a global flag).
        let cli = Cli::try_parse_from(["slate", "status", "--cluster-api", "https://a:1,https://b:2"]).expect("parses");
        assert_eq!(cli.cluster_api, ["https://a:1", "https://b:2"]);
    }
}
