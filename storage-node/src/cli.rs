//! The `slate-node` command line: format a disk, serve it, run a demo, make keys, and local admin.
//!
//! It lives in the library so that other binaries can embed it as a
//! subcommand (`slate node ...` runs exactly this): take [`Command`] into a
//! clap parser and call [`run`]. `src/main.rs` is only [`main`].
//!
//! ```text
//! slate-node format PATH [--size BYTES] [--extent-size BYTES] [--journal-size BYTES] [--node-id N]
//! slate-node serve --config node.toml
//! slate-node demo [--dir DIR]
//! slate-node keygen --out KEYFILE
//! slate-node admin --config node.toml assign --volume V --segment S --segment-blocks N
//! slate-node admin --config node.toml release --volume V --segment S
//! slate-node admin --config node.toml segments
//! ```
//!
//! Sizes accept suffixes (`64MiB`, `1G`, `4k`; binary multiples). Logs go to
//! stderr; `RUST_LOG` filters them (default `info`).

use crate::admin::{self, AdminRequest};
use crate::config::NodeConfig;
use crate::engine::{self, FormatOptions};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use slate_protocol::{NodeId, SegmentIndex, VolumeId};
use std::path::{Path, PathBuf};

/// The `slate-node` arguments.
#[derive(Parser, Debug)]
#[command(name = "slate-node", version, about = "Slate storage node: disk engine and data-plane server")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

/// One `slate-node` command.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Format a disk (block device or file) for Slate. Destroys what is on it.
    Format {
        /// The block device or file.
        path: PathBuf,
        /// Create (or extend) the file to this size, preallocated.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Extent size: the unit of allocation and erasure.
        #[arg(long, value_parser = parse_size)]
        extent_size: Option<u64>,
        /// Size of the metadata journal.
        #[arg(long, value_parser = parse_size)]
        journal_size: Option<u64>,
        /// The node this disk belongs to.
        #[arg(long, default_value_t = 1)]
        node_id: u64,
    },
    /// Serve the disk named in the config on the data plane until SIGTERM or SIGINT.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Format a temporary disk, start a node, write and read back blocks over the data plane.
    Demo {
        /// Where to put the disk file (default: a new temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Make a capability signing key: the secret goes to a 0600 file, the verifying key hex to stdout.
    Keygen {
        /// The file to create for the secret key (hex). It must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Local administration of a running node through its admin socket.
    Admin {
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        cmd: AdminCmd,
    },
}

/// A local admin command.
#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Give this node a replica of a segment (durable; idempotent).
    Assign {
        #[arg(long)]
        volume: u64,
        #[arg(long)]
        segment: u32,
        #[arg(long)]
        segment_blocks: u64,
    },
    /// Take a segment away: its extents go to verified zeroing.
    Release {
        #[arg(long)]
        volume: u64,
        #[arg(long)]
        segment: u32,
    },
    /// List the segments this node holds.
    Segments,
}

/// Parses `4096`, `4k`, `64MiB`, `1G`, ... (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} overflows"))
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default`). Safe to call twice.
pub fn init_logs(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// The `slate-node` binary: parse, set up logs, run, exit 1 with the error chain on failure.
pub fn main() {
    main_from(std::env::args_os());
}

/// Same as [`main`] with explicit arguments (the first is the program name), so that
/// another binary (`slate run-node ...`) can embed the storage node.
pub fn main_from<I, T>(args: I)
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    // The demo prints its own story; its logs stay quiet unless RUST_LOG asks for them.
    init_logs(if matches!(cli.cmd, Command::Demo { .. }) { "warn" } else { "info" });
    if let Err(e) = run(cli.cmd) {
        eprintln!("slate-node: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Runs one command (blocking; starts its own async runtime where needed).
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Format { path, size, extent_size, journal_size, node_id } => {
            let mut opts = FormatOptions { node_id: NodeId(node_id), size_bytes: size, ..FormatOptions::default() };
            if let Some(e) = extent_size {
                opts.extent_size_bytes = e;
            }
            if let Some(j) = journal_size {
                opts.journal_bytes = j;
            }
            let report = engine::format(&path, &opts).with_context(|| format!("formatting {}", path.display()))?;
            println!(
                "formatted {} for {}: {} extents of {} KiB ({} MiB of extent space); extents are zeroed and verified before first use",
                path.display(),
                NodeId(node_id),
                report.extent_count,
                report.extent_size_bytes >> 10,
                report.capacity_bytes >> 20
            );
            Ok(())
        }
        Command::Serve { config } => {
            let cfg = NodeConfig::load(&config)?;
            runtime()?.block_on(serve(cfg, &config))
        }
        Command::Demo { dir } => runtime()?.block_on(crate::demo::run(dir.as_deref())),
        Command::Keygen { out } => keygen(&out),
        Command::Admin { config, cmd } => {
            let cfg = NodeConfig::load(&config)?;
            let Some(sock) = cfg.admin_socket.clone() else {
                bail!(
                    "{} has no admin_socket; add `admin_socket = \"/path/to.sock\"` and restart the node",
                    config.display()
                );
            };
            let req = match cmd {
                AdminCmd::Assign { volume, segment, segment_blocks } => {
                    AdminRequest::Assign { volume: VolumeId(volume), segment: SegmentIndex(segment), segment_blocks }
                }
                AdminCmd::Release { volume, segment } => {
                    AdminRequest::Release { volume: VolumeId(volume), segment: SegmentIndex(segment) }
                }
                AdminCmd::Segments => AdminRequest::Segments,
            };
            let reply = runtime()?
                .block_on(admin::call(&sock, &req))
                .with_context(|| format!("talking to the node at {}", sock.display()))?;
            if !reply.ok {
                bail!("node refused: {}", reply.error.unwrap_or_default());
            }
            match reply.segments {
                Some(segs) => {
                    for s in segs {
                        println!("{} {} segment_blocks={}", s.volume, s.segment, s.segment_blocks);
                    }
                }
                None => println!("ok"),
            }
            Ok(())
        }
    }
}

async fn serve(cfg: NodeConfig, config_path: &Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (connector, holder) = crate::config::node_connector(&cfg)?;
    let meta = match &cfg.meta {
        Some(link) => Some(crate::heartbeat::MetaClient::new(cfg.node_id, link)?.with_holder(holder)),
        None => None,
    };
    let state_file = crate::decommission::state_path(config_path);
    // A decommission under way (or done) here: the disk is no engine's any more.
    if let Some(st) = crate::decommission::load(&state_file)? {
        let Some(m) = &meta else { anyhow::bail!("{} exists but the node has no [meta] link", state_file.display()) };
        let task = slate_protocol::ops::DecommissionTask { disk: st.disk, disk_name: String::new() };
        tokio::select! {
            r = crate::decommission::run(m, &task, &st.device, &state_file) => r?,
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
        let which = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        tracing::info!(signal = which, "stopping (decommissioned)");
        return Ok(());
    }
    let node = crate::node::RunningNode::start_with(&cfg, meta.as_ref()).await?;
    let stop_heartbeat = tokio_util::sync::CancellationToken::new();
    let (decommission_tx, mut decommission_rx) = tokio::sync::watch::channel(None);
    let heartbeat = meta.clone().map(|m| {
        let work = crate::work::Dispatcher {
            releaser: crate::release::Releaser::new(node.engine().clone()),
            mover: crate::mover::Mover::new(
                node.engine().clone(),
                cfg.node_id,
                node.addr,
                cfg.drain_rate_bytes_per_sec,
            )
            .with_metrics(node.metrics().clone())
            .with_connector(connector.clone()),
            scrubber: crate::scrub::Scrubber::new(
                node.engine().clone(),
                cfg.node_id,
                m.clone(),
                crate::scrub::ScrubOptions {
                    rate_bytes_per_sec: cfg.scrub_rate_bytes_per_sec,
                    state_path: Some(crate::scrub::state_path(config_path)),
                    metrics: Some(node.metrics().clone()),
                    connector: connector.clone(),
                },
            ),
            decommission: decommission_tx,
            fencer: node.fencer(),
        };
        crate::heartbeat::spawn(m, work, stop_heartbeat.clone())
    });
    let decommission = async {
        loop {
            if decommission_rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Some(t) = decommission_rx.borrow_and_update().clone() {
                return t;
            }
        }
    };
    let stop_reason = tokio::select! {
        _ = term.recv() => Err("SIGTERM"),
        _ = int.recv() => Err("SIGINT"),
        t = decommission => Ok(t),
    };
    stop_heartbeat.cancel();
    if let Some(h) = heartbeat {
        let _ = h.await;
    }
    match stop_reason {
        Err(which) => {
            tracing::info!(signal = which, "stopping");
            node.shutdown().await
        }
        Ok(task) => {
            tracing::info!(disk = task.disk, "decommission asked: stopping service and closing the disk");
            node.shutdown().await?;
            let m = meta.as_ref().expect("work comes from slate-meta");
            tokio::select! {
                r = crate::decommission::run(m, &task, &cfg.disks[0], &state_file) => r?,
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
            let which = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
            tracing::info!(signal = which, "stopping (decommissioned)");
            Ok(())
        }
    }
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = slate_protocol::capability::generate_signing_key();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
    let mut secret = hex::encode(key.to_bytes());
    secret.push('\n');
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    zeroize::Zeroize::zeroize(&mut secret);
    println!("{}", hex::encode(key.verifying_key().as_bytes()));
    eprintln!("secret signing key written to {} (mode 0600); the line above is the verifying key", out.display());
    Ok(())
}
