//! The `slate-meta` command line (also embedded as `slate run-meta`).
//!
//! * `init` makes a local cluster's keys, CA, certificates and configs, and the
//!   first operator's token (written to a 0600 file, never printed);
//! * `serve` runs one node until SIGTERM or SIGINT;
//! * `audit-verify`, `try-unwrap` and `dump-wrapped` work offline on a data
//!   directory (for operators, and for the crypto-shred and audit tests).

use crate::api::format_token;
use crate::config::{Config, Peer, RaftTuning};
use crate::fsutil::{create_private_dir, write_private_file};
use crate::keys::{generate_token_secret, hash_secret, FileRootKeyProvider, RootKey, RootKeyProvider};
use crate::machine;
use crate::tls::{write_private, LocalCa};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "slate-meta", version, about = "Slate's Raft metadata service")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a local cluster: CA, node certificates, root and signing keys, configs, operator token.
    Init {
        /// Directory to create everything in (must not exist or be empty).
        #[arg(long)]
        dir: PathBuf,
        /// Number of metadata nodes (3 or 5 for a real cluster).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Address every node listens on.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// API ports, one per node (default: 7443, 7444, ...).
        #[arg(long, value_delimiter = ',')]
        api_ports: Vec<u16>,
        /// Raft ports, one per node (default: 7100, 7101, ...).
        #[arg(long, value_delimiter = ',')]
        raft_ports: Vec<u16>,
        /// Raft tick in milliseconds (tests use shorter ticks).
        #[arg(long, default_value_t = 100)]
        tick_ms: u64,
        /// Take a Raft snapshot and compact the log every this many entries.
        #[arg(long, default_value_t = 10_000)]
        snapshot_every: u64,
    },
    /// Run one metadata node.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Walk the audit chain stored in a data directory; exit 1 and name the first broken record if it is broken.
    AuditVerify {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Try to recover a volume's key from a (possibly old) data directory with the given root key file,
    /// also using the tenant keys held by the states in `--keys-from` directories. Prints only a fingerprint.
    TryUnwrap {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        root_key_file: PathBuf,
        #[arg(long)]
        keys_from: Vec<PathBuf>,
        #[arg(long)]
        volume: u64,
    },
    /// Re-key the root with fresh randomness: every voter re-wraps every tenant key under a new
    /// random root, stores it over its root key file and purges its Raft log past the rotation.
    RotateRoot {
        /// A node's `meta.toml` (its API address and CA are used).
        #[arg(long)]
        config: PathBuf,
        /// The operator's token file.
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Print the wrapped (never plaintext) keys stored in a data directory, as JSON (for tests).
    #[command(hide = true)]
    DumpWrapped {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// The `slate-meta` binary: parse `std::env::args`, run, return the exit code.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Same as [`main`] with explicit arguments (the first is the program name), so that another
/// binary (`slate run-meta ...`) can embed the metadata service.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,raft=warn,raft_engine=warn")),
        )
        .with_writer(std::io::stderr)
        .try_init()
        .ok();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("slate-meta: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Init { dir, nodes, host, api_ports, raft_ports, tick_ms, snapshot_every } => {
            init(&dir, nodes, host, &api_ports, &raft_ports, tick_ms, snapshot_every)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve { config } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                // Register the handlers first, so a signal during startup is not lost (nor fatal).
                let shutdown = shutdown_signal()?;
                crate::service::run(cfg, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::AuditVerify { data_dir } => {
            let report = machine::verify_audit_file(&data_dir)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Cmd::TryUnwrap { data_dir, root_key_file, keys_from, volume } => {
            match machine::try_unwrap_dek(&data_dir, &root_key_file, &keys_from, volume)? {
                Ok(fp) => {
                    println!("{}", serde_json::json!({"unwrapped": true, "dek_sha256": fp}));
                    Ok(ExitCode::SUCCESS)
                }
                Err(why) => {
                    println!("{}", serde_json::json!({"unwrapped": false, "reason": why}));
                    Ok(ExitCode::from(2))
                }
            }
        }
        Cmd::RotateRoot { config, token_file } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let reply = rt.block_on(rotate_root(&cfg, &token_file))?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DumpWrapped { data_dir } => {
            let list: Vec<serde_json::Value> = machine::dump_wrapped(&data_dir)?
                .into_iter()
                .map(|(kind, id, hex)| serde_json::json!({"kind": kind, "id": id, "wrapped_hex": hex}))
                .collect();
            println!("{}", serde_json::to_string(&list)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `slate-meta rotate-root`: one API call to the node of `cfg` (which proposes it).
async fn rotate_root(cfg: &Config, token_file: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    let token = zeroize::Zeroizing::new(
        std::fs::read_to_string(token_file).with_context(|| format!("reading {}", token_file.display()))?,
    );
    let mut b = reqwest::Client::builder().use_rustls_tls().timeout(std::time::Duration::from_mins(1));
    if let Some(ca) = &cfg.ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        b = b.tls_built_in_root_certs(false).add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let mut addr = cfg.api_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let resp = b
        .build()?
        .post(format!("https://{addr}/v1/cluster/rotate-root"))
        .bearer_auth(token.trim())
        .send()
        .await
        .with_context(|| format!("calling {addr}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    anyhow::ensure!(status.is_success(), "rotate-root refused ({status}): {}", body["error"]);
    Ok(body)
}

/// Resolves at the first SIGTERM or SIGINT; the handlers are installed when this is called.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

fn ports(given: &[u16], base: u16, n: u64, what: &str) -> anyhow::Result<Vec<u16>> {
    if given.is_empty() {
        return Ok((0..n).map(|i| base + i as u16).collect());
    }
    anyhow::ensure!(given.len() as u64 == n, "--{what} needs {n} ports, got {}", given.len());
    Ok(given.to_vec())
}

fn init(
    dir: &Path,
    nodes: u64,
    host: IpAddr,
    api_ports: &[u16],
    raft_ports: &[u16],
    tick_ms: u64,
    snapshot_every: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!((1..=7).contains(&nodes), "--nodes must be 1 to 7");
    if dir.exists() {
        anyhow::ensure!(
            std::fs::read_dir(dir)?.next().is_none(),
            "{} exists and is not empty; refusing to overwrite keys",
            dir.display()
        );
    }
    // Keys, tokens and every node's data: owner only (docs/design/keys.md, file modes).
    create_private_dir(dir)?;
    let dir = dir.canonicalize()?;
    let api = ports(api_ports, 7443, nodes, "api-ports")?;
    let raft = ports(raft_ports, 7100, nodes, "raft-ports")?;
    let peers: Vec<Peer> = (0..nodes)
        .map(|i| Peer {
            id: i + 1,
            raft_addr: SocketAddr::new(host, raft[i as usize]),
            api_addr: SocketAddr::new(host, api[i as usize]),
        })
        .collect();

    let ca = LocalCa::generate(crate::tls::LOCAL_CA_NAME)?;
    write_private_file(&dir.join("ca.crt"), ca.cert_pem().as_bytes())?;
    write_private(&dir.join("ca.key"), ca.key_pem().as_bytes())?;

    let root = RootKey::generate();
    let signing = slate_protocol::capability::generate_signing_key();
    let signing_hex = zeroize::Zeroizing::new(hex::encode(signing.to_bytes()));
    write_private_file(
        &dir.join("verifying.key"),
        format!("{}\n", hex::encode(signing.verifying_key().as_bytes())).as_bytes(),
    )?;

    // The first operator token, under a random public id that the bootstrap gives it (so that
    // no token id is guessable, this one included).
    let secret = generate_token_secret();
    let token_id = crate::api::random_token_id();
    let token = format_token(token_id, &secret);
    write_private(&dir.join("operator.token"), format!("{}\n", token.as_str()).as_bytes())?;
    let hash = hex::encode(hash_secret(secret.as_ref()));

    for p in &peers {
        let nd = dir.join(format!("node-{}", p.id));
        let keys = nd.join("keys");
        let tlsd = nd.join("tls");
        create_private_dir(&keys)?;
        create_private_dir(&tlsd)?;
        create_private_dir(&nd.join("data"))?;
        // Same root key on every node; each node's copy ratchets on its own as shreds apply.
        FileRootKeyProvider::new(keys.join("root.key")).store(&root)?;
        write_private(&keys.join("signing.key"), format!("{}\n", signing_hex.as_str()).as_bytes())?;
        write_private_file(&keys.join("bootstrap.sha256"), format!("{hash} {token_id}\n").as_bytes())?;
        let (cert, key) = ca.issue(&format!("slate-meta-{}", p.id), &[host.to_string(), "localhost".to_string()])?;
        write_private_file(&tlsd.join("node.crt"), cert.as_bytes())?;
        write_private(&tlsd.join("node.key"), key.as_bytes())?;
        let cfg = Config {
            node_id: p.id,
            api_addr: p.api_addr,
            raft_addr: p.raft_addr,
            peers: peers.clone(),
            join: false,
            data_dir: nd.join("data"),
            root_key_file: Some(keys.join("root.key")),
            root_key_env: None,
            insecure_test_root_key: false,
            signing_key_file: keys.join("signing.key"),
            tls_cert: tlsd.join("node.crt"),
            tls_key: tlsd.join("node.key"),
            ca_cert: Some(dir.join("ca.crt")),
            bootstrap_token_hash_file: Some(keys.join("bootstrap.sha256")),
            max_body_bytes: 64 * 1024,
            sweep_interval_ms: 5_000,
            raft: RaftTuning { tick_ms, snapshot_every_entries: snapshot_every, ..RaftTuning::default() },
            guard: crate::config::GuardConfig::default(),
        };
        cfg.validate()?;
        write_private_file(&nd.join("meta.toml"), toml::to_string(&cfg).context("encoding config")?.as_bytes())?;
    }
    println!("created a {nodes}-node slate-meta cluster in {}", dir.display());
    println!("  CA certificate:  {}", dir.join("ca.crt").display());
    println!("  operator token:  {} (mode 0600)", dir.join("operator.token").display());
    println!("  verifying key:   {} (for storage nodes)", dir.join("verifying.key").display());
    for p in &peers {
        println!(
            "  node {}: slate-meta serve --config {}   (API https://{})",
            p.id,
            dir.join(format!("node-{}", p.id)).join("meta.toml").display(),
            p.api_addr
        );
    }
    Ok(())
}
