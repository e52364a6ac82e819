//! `slate up`: the embedded default. Starts, as separate processes, three
//! metadata nodes and three storage nodes (each its own failure domain, each
//! with a file-backed disk) on 127.0.0.1 under one directory, creates a demo
//! tenant and volume, attaches it in a `slate attach` process that serves it
//! over NBD, writes `cluster.json`, and stays in the foreground until SIGINT
//! or SIGTERM, when it stops everything it started.
//!
//! Everything it creates is remembered in `DIR/up.json` (ports, node ids), so a
//! second `slate up` on the same directory brings back the same cluster and
//! the same data.

use super::cluster::{write_atomic, ClusterFile, ProcessInfo, VolumeInfo};
use super::metactl::{self, MetaLayout};
use super::procs::{self, Proc};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use slate_node::config::NodeConfig;
use slate_protocol::NodeId;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Options of `slate up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Directory holding every process's data, keys, logs and cluster.json.
    #[arg(long, default_value = "slate-data")]
    pub dir: PathBuf,
    /// Size of the demo volume (first start only), e.g. 1G, 512M.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub volume_size: u64,
    /// Size of each storage node's disk file (first start only).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub disk_size: u64,
    /// Extent size of the disks (first start only).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub extent_size: u64,
    /// Blocks per segment of the demo volume (first start only); the default is 1 GiB.
    #[arg(long)]
    pub segment_blocks: Option<u64>,
}

/// What `slate up` chose on first start and reuses afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpState {
    pub meta: Vec<MetaMember>,
    pub nodes: Vec<NodeMember>,
    pub nbd_tcp_port: u16,
    /// Where the client serves its metrics (0 in a state written before it did: none).
    #[serde(default)]
    pub client_metrics_port: u16,
    pub volume_size: u64,
    pub volume_name: String,
    /// Set once the demo tenant, principals and volume exist.
    #[serde(default)]
    pub provisioned: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetaMember {
    pub id: u64,
    pub api_port: u16,
    pub peer_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeMember {
    pub id: u64,
    pub port: u16,
    pub metrics_port: u16,
    pub failure_domain: String,
}

/// Parses sizes like `4096`, `64K`, `512M`, `1G`, `2T`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("up.json")
}

fn load_or_create_state(args: &UpArgs) -> Result<(UpState, bool)> {
    let p = state_path(&args.dir);
    if let Ok(text) = std::fs::read_to_string(&p) {
        let st: UpState = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", p.display()))?;
        return Ok((st, false));
    }
    if args.volume_size == 0 || !args.volume_size.is_multiple_of(4096) {
        bail!("--volume-size must be a positive multiple of 4096 bytes");
    }
    if args.disk_size < args.extent_size * 8 {
        bail!("--disk-size must hold at least 8 extents");
    }
    let mut meta = Vec::new();
    for id in 1..=3 {
        meta.push(MetaMember { id, api_port: procs::free_port()?, peer_port: procs::free_port()? });
    }
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        nodes.push(NodeMember {
            id,
            port: procs::free_port()?,
            metrics_port: procs::free_port()?,
            failure_domain: format!("zone-{id}/rack-1/host-{id}"),
        });
    }
    let st = UpState {
        meta,
        nodes,
        nbd_tcp_port: procs::free_port()?,
        client_metrics_port: procs::free_port()?,
        volume_size: args.volume_size,
        volume_name: "demo".into(),
        provisioned: false,
    };
    Ok((st, true))
}

fn save_state(dir: &Path, st: &UpState) -> Result<()> {
    write_atomic(&state_path(dir), serde_json::to_string_pretty(st)?.as_bytes(), 0o600)
}

fn self_cmd() -> Command {
    Command::new(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("slate")))
}

/// The demo volume's TCP listener's TLS material, issued by the cluster CA.
struct NbdTls {
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// Issues (once) a server certificate for 127.0.0.1 and a client certificate from
/// the cluster CA: the server's in `nbd-tls/`, the client's in `nbd-client/` laid
/// out as qemu's `tls-creds-x509` and libnbd expect. Keys are 0600, directories 0700.
fn nbd_tls(dir: &Path, layout: &MetaLayout) -> Result<NbdTls> {
    use slate_meta::tls::{write_private, LocalCa, LOCAL_CA_NAME};
    let (server_dir, client_dir) = (dir.join("nbd-tls"), nbd_client_dir(dir));
    let tls = NbdTls { server_cert: server_dir.join("server-cert.pem"), server_key: server_dir.join("server-key.pem") };
    let client_key = client_dir.join("client-key.pem");
    if tls.server_cert.exists() && tls.server_key.exists() && client_key.exists() {
        return Ok(tls);
    }
    for d in [&server_dir, &client_dir] {
        private_dir(d)?;
    }
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(layout.ca_key_path())
            .context("reading the cluster CA's key to issue NBD certificates")?,
    );
    let ca = LocalCa::from_key_pem(LOCAL_CA_NAME, &key_pem)?;
    let (cert, key) = ca.issue("slate up NBD server", &["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let (ccert, ckey) = ca.issue("slate up NBD client", &[])?;
    let (key, ckey) = (zeroize::Zeroizing::new(key), zeroize::Zeroizing::new(ckey));
    for f in [&tls.server_cert, &tls.server_key, &client_key] {
        let _ = std::fs::remove_file(f);
    }
    // Certificates too are 0600: the directory is the user's alone, and one rule
    // (no group or other bits anywhere under the cluster directory) is easy to check.
    write_private(&tls.server_cert, cert.as_bytes())?;
    write_private(&tls.server_key, key.as_bytes())?;
    let ca_pem = std::fs::read(layout.ca_path())?;
    let _ = std::fs::remove_file(client_dir.join("ca-cert.pem"));
    write_private(&client_dir.join("ca-cert.pem"), &ca_pem)?;
    let _ = std::fs::remove_file(client_dir.join("client-cert.pem"));
    write_private(&client_dir.join("client-cert.pem"), ccert.as_bytes())?;
    write_private(&client_key, ckey.as_bytes())?;
    Ok(tls)
}

/// Where `slate up` keeps the NBD client credentials it made.
fn nbd_client_dir(dir: &Path) -> PathBuf {
    dir.join("nbd-client")
}

/// Issues (once) storage node `id`'s data-plane certificate for 127.0.0.1 from
/// the cluster CA, into `<node dir>/tls/` (0700; the key 0600).
fn node_tls(id: u64, nd: &Path, layout: &MetaLayout) -> Result<slate_node::config::TlsFiles> {
    use slate_meta::tls::{write_private, LocalCa, LOCAL_CA_NAME};
    let tls_dir = nd.join("tls");
    let files = slate_node::config::TlsFiles {
        cert: tls_dir.join("cert.pem"),
        key: tls_dir.join("key.pem"),
        ca: layout.ca_path(),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    private_dir(&tls_dir)?;
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(layout.ca_key_path())
            .context("reading the cluster CA's key to issue node certificates")?,
    );
    let ca = LocalCa::from_key_pem(LOCAL_CA_NAME, &key_pem)?;
    let (cert, key) = ca.issue(&format!("slate storage node {id}"), &["127.0.0.1".to_owned()])?;
    let key = zeroize::Zeroizing::new(key);
    for f in [&files.cert, &files.key] {
        let _ = std::fs::remove_file(f);
    }
    write_private(&files.cert, cert.as_bytes())?;
    write_private(&files.key, key.as_bytes())?;
    Ok(files)
}

/// Creates `d` (and missing parents) 0700, whatever the umask.
fn private_dir(d: &Path) -> Result<()> {
    slate_meta::fsutil::create_private_dir(d).with_context(|| format!("creating {}", d.display()))
}

fn node_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}"))
}

/// Runs `slate up` until a signal.
pub fn run(args: UpArgs) -> Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    // Keys, tokens, disk images and the NBD socket live here: only this user gets in.
    // Everything below is created 0700 (directories) or 0600 (files) explicitly too.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&args.dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (0700)", args.dir.display()))?;
    }
    let dir = std::fs::canonicalize(&args.dir)?;
    // The lock first: a second `slate up` on a directory in use must change nothing.
    let _lock = DirLock::take(&dir)?;
    let cluster_json = dir.join("cluster.json");
    let _ = std::fs::remove_file(&cluster_json);
    let logs = dir.join("logs");
    private_dir(&logs)?;
    let (mut st, fresh) = load_or_create_state(&args)?;

    // Signals: from here on SIGINT/SIGTERM only set a flag; we stop children ourselves.
    let stop = signal_flag()?;
    let mut procs: Vec<Proc> = Vec::new();
    let result = (|| -> Result<()> {
        let layout = MetaLayout::new(&dir, &st);
        if fresh {
            eprintln!("slate up: creating a new cluster in {}", dir.display());
            metactl::init(&layout)?;
        } else {
            eprintln!("slate up: restarting the cluster in {}", dir.display());
        }
        save_state(&dir, &st)?;

        // Metadata service.
        for m in &st.meta {
            let mut cmd = self_cmd();
            cmd.arg("run-meta").args(metactl::serve_args(&layout, m.id)?);
            let p = Proc::spawn(&format!("slate-meta {}", m.id), cmd, &logs.join(format!("meta-{}.log", m.id)))?;
            procs.push(p);
        }
        for (i, m) in st.meta.iter().enumerate() {
            procs::wait_for_port(&format!("127.0.0.1:{}", m.api_port), Duration::from_secs(30), &mut procs[i])?;
        }
        let api = metactl::Api::connect(&layout)?;
        api.wait_for_leader(Duration::from_secs(30), &stop)?;
        eprintln!("slate up: metadata service is up (3 nodes)");

        // Storage nodes.
        let verifying_key = metactl::verifying_key_hex(&layout)?;
        for n in &st.nodes {
            let nd = node_dir(&dir, n.id);
            private_dir(&nd)?;
            let disk = nd.join("disk.img");
            if !disk.exists() {
                eprintln!("slate up: formatting {} ({} bytes)", disk.display(), args.disk_size);
                let out = self_cmd()
                    .arg("run-node")
                    .arg("format")
                    .arg(&disk)
                    .arg("--size")
                    .arg(args.disk_size.to_string())
                    .arg("--extent-size")
                    .arg(args.extent_size.to_string())
                    .arg("--node-id")
                    .arg(n.id.to_string())
                    .output()?;
                if !out.status.success() {
                    bail!("formatting {} failed: {}", disk.display(), String::from_utf8_lossy(&out.stderr));
                }
            }
            // Registered before it starts, so that it can have its own principal: its token
            // (0600, in its 0700 directory) is all it presents to the metadata service.
            api.register_node(n, args.disk_size)?;
            let token_file = nd.join("meta.token");
            api.ensure_node_token(n.id, &token_file)?;
            let cfg = node_config_toml(n, &disk, &nd, &verifying_key, &layout, &token_file)?;
            write_atomic(&nd.join("node.toml"), cfg.as_bytes(), 0o600)?;
            let mut cmd = self_cmd();
            cmd.arg("run-node").arg("serve").arg("--config").arg(nd.join("node.toml"));
            procs.push(Proc::spawn(&format!("slate-node {}", n.id), cmd, &logs.join(format!("node-{}.log", n.id)))?);
        }
        let n_meta = st.meta.len();
        for (i, n) in st.nodes.iter().enumerate() {
            // A node whose disk was decommissioned serves nothing, by design.
            if node_dir(&dir, n.id).join(slate_node::decommission::STATE_FILE).exists() {
                eprintln!("slate up: node-{} is decommissioned (its disk was erased); it serves nothing", n.id);
                continue;
            }
            procs::wait_for_port(&format!("127.0.0.1:{}", n.port), Duration::from_mins(1), &mut procs[n_meta + i])?;
        }
        eprintln!("slate up: 3 storage nodes are up");

        if !st.provisioned {
            api.provision_demo(&st, &layout, args.segment_blocks)?;
            st.provisioned = true;
            save_state(&dir, &st)?;
        }

        // The client: `slate attach` in its own process, serving NBD (TCP with mutual TLS).
        let tls = nbd_tls(&dir, &layout)?;
        let sock = dir.join("nbd.sock");
        let mut cmd = self_cmd();
        // Every metadata node: the client must ride through the loss of any one of them.
        for m in &st.meta {
            cmd.arg("--cluster-api").arg(layout.api_url(m.id));
        }
        cmd.arg("--ca")
            .arg(layout.ca_path())
            .arg("--token-file")
            .arg(layout.host_token_path())
            .arg("attach")
            .arg(&st.volume_name)
            .arg("--nbd-unix")
            .arg(&sock)
            .arg("--nbd-tcp")
            .arg(format!("127.0.0.1:{}", st.nbd_tcp_port))
            .arg("--tls-cert")
            .arg(&tls.server_cert)
            .arg("--tls-key")
            .arg(&tls.server_key)
            .arg("--tls-client-ca")
            .arg(layout.ca_path())
            .arg("--force");
        if st.client_metrics_port != 0 {
            cmd.arg("--metrics").arg(format!("127.0.0.1:{}", st.client_metrics_port));
        }
        procs.push(Proc::spawn("slate attach", cmd, &logs.join("client.log"))?);
        let last = procs.len() - 1;
        procs::wait_for_port(&format!("127.0.0.1:{}", st.nbd_tcp_port), Duration::from_mins(1), &mut procs[last])?;

        let file = cluster_file(&dir, &st, &layout, &procs);
        file.write(&cluster_json)?;
        print_ready(&file, &dir);

        // Foreground until a signal. A child that dies is reported once (the rest of the
        // cluster goes on: losing one storage node is what replication is for).
        let mut reported = std::collections::BTreeSet::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            for p in &mut procs {
                if let Err(e) = p.check_alive() {
                    if reported.insert(p.name.clone()) {
                        eprintln!("slate up: warning: {e}");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("slate up: stopping");
        Ok(())
    })();
    let _ = std::fs::remove_file(&cluster_json);
    // The client first (it flushes), then storage nodes, then the metadata service.
    let stopped = stop_in_order(&mut procs);
    for (name, clean) in stopped {
        if !clean {
            eprintln!("slate up: {name} did not exit cleanly");
        }
    }
    result
}

fn stop_in_order(procs: &mut Vec<Proc>) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    // Reverse start order, one role group at a time: client, nodes, metas.
    for role in ["slate attach", "slate-node", "slate-meta"] {
        let mut group: Vec<Proc> = Vec::new();
        let mut rest = Vec::new();
        for p in procs.drain(..) {
            if p.name.starts_with(role) {
                group.push(p);
            } else {
                rest.push(p);
            }
        }
        *procs = rest;
        out.extend(procs::stop_all(&mut group, Duration::from_secs(20)));
    }
    out
}

fn node_config_toml(
    n: &NodeMember,
    disk: &Path,
    nd: &Path,
    vk: &str,
    layout: &MetaLayout,
    token_file: &Path,
) -> Result<String> {
    let key = slate_protocol::capability::verifying_key_from_hex(vk)
        .context("the metadata service's verifying key is not a valid ed25519 key")?;
    let mut cfg = NodeConfig::new(NodeId(n.id), format!("127.0.0.1:{}", n.port).parse()?, disk.to_owned(), &key)
        .with_tls(node_tls(n.id, nd, layout)?);
    cfg.metrics_listen = Some(format!("127.0.0.1:{}", n.metrics_port).parse()?);
    cfg.admin_socket = Some(nd.join("admin.sock"));
    cfg.meta = Some(metactl::node_meta_link(layout, token_file));
    cfg.validate()?;
    Ok(cfg.to_toml())
}

fn cluster_file(dir: &Path, st: &UpState, layout: &MetaLayout, procs: &[Proc]) -> ClusterFile {
    let mut processes = Vec::new();
    for m in &st.meta {
        let p = procs.iter().find(|p| p.name == format!("slate-meta {}", m.id));
        processes.push(ProcessInfo {
            role: "meta".into(),
            id: m.id,
            pid: p.map_or(0, Proc::pid),
            addr: format!("127.0.0.1:{}", m.api_port),
            failure_domain: String::new(),
            data: layout.data_dir(m.id),
            metrics: None,
        });
    }
    for n in &st.nodes {
        let p = procs.iter().find(|p| p.name == format!("slate-node {}", n.id));
        processes.push(ProcessInfo {
            role: "node".into(),
            id: n.id,
            pid: p.map_or(0, Proc::pid),
            addr: format!("127.0.0.1:{}", n.port),
            failure_domain: n.failure_domain.clone(),
            data: node_dir(dir, n.id).join("disk.img"),
            metrics: Some(format!("127.0.0.1:{}", n.metrics_port)),
        });
    }
    if let Some(p) = procs.iter().find(|p| p.name == "slate attach") {
        processes.push(ProcessInfo {
            role: "client".into(),
            id: 1,
            pid: p.pid(),
            addr: format!("127.0.0.1:{}", st.nbd_tcp_port),
            failure_domain: String::new(),
            data: dir.join("nbd.sock"),
            metrics: (st.client_metrics_port != 0).then(|| format!("127.0.0.1:{}", st.client_metrics_port)),
        });
    }
    let sock = dir.join("nbd.sock");
    ClusterFile {
        ready: true,
        api: layout.api_url(st.meta[0].id),
        apis: st.meta.iter().map(|m| layout.api_url(m.id)).collect(),
        ca: layout.ca_path(),
        token_file: layout.operator_token_path(),
        processes,
        verifying_key: metactl::verifying_key_hex(layout).ok(),
        volumes: vec![VolumeInfo {
            name: st.volume_name.clone(),
            nbd_unix: format!("nbd+unix:///{}?socket={}", st.volume_name, sock.display()),
            nbd_tcp: format!(
                "nbds://127.0.0.1:{}/{}?tls-certificates={}",
                st.nbd_tcp_port,
                st.volume_name,
                nbd_client_dir(dir).display()
            ),
            tls_creds_dir: Some(nbd_client_dir(dir)),
        }],
    }
}

fn print_ready(file: &ClusterFile, dir: &Path) {
    let v = &file.volumes[0];
    println!("Slate is up: 3 metadata nodes, 3 storage nodes, volume {:?} (R=2, AES-256-XTS).", v.name);
    println!();
    println!("  NBD (unix): {}", v.nbd_unix);
    println!("  NBD (tcp):  {}", v.nbd_tcp);
    println!("  API:        {}", file.api);
    println!("  cluster:    {}", dir.join("cluster.json").display());
    println!();
    println!("Try:");
    println!("  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '{}'", v.nbd_unix);
    println!(
        "  qemu-system-x86_64 -m 1G -drive driver=nbd,server.type=unix,server.path={},export={},format=raw,if=virtio ...",
        dir.join("nbd.sock").display(),
        v.name
    );
    if let (Some(creds), Some(port)) = (&v.tls_creds_dir, file.processes.iter().find(|p| p.role == "client")) {
        let port = port.addr.rsplit(':').next().unwrap_or("");
        let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display());
        println!("Over TCP (mutual TLS; the client credentials are in {}):", creds.display());
        println!(
            "  qemu-io --object {obj} --image-opts -c 'read -P 0xab 0 1M' 'driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port={port},file.export={},file.tls-creds=tls0'",
            v.name
        );
        println!("  nbdinfo '{}'", v.nbd_tcp);
        println!(
            "  qemu-system-x86_64 -m 1G -object {obj} -drive driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={},tls-creds=tls0,format=raw,if=virtio ...",
            v.name
        );
    }
    println!("  slate volume list        (from {})", dir.parent().unwrap_or(dir).display());
    println!();
    println!("Press Ctrl-C to stop.");
}

/// Sets a flag on SIGINT or SIGTERM instead of dying.
fn signal_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, std::sync::Arc::clone(&flag))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, std::sync::Arc::clone(&flag))?;
    Ok(flag)
}

/// An exclusive lock on the directory, so two `slate up` never share it.
struct DirLock(#[allow(dead_code)] std::fs::File);

impl DirLock {
    fn take(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("up.lock"))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| anyhow::anyhow!("another `slate up` is already running on {}", dir.display()))?;
        Ok(Self(f))
    }
}
