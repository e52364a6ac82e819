//! Shared setup for the node process tests: a formatted disk file, a config,
//! a signing key, and a `slate-node serve` process that can be killed and
//! restarted on the same disk and port.
#![allow(dead_code)] // each test binary uses a different subset

use ed25519_dalek::SigningKey;
use slate_dataplane::client::{ClientError, NodeClient};
use slate_node::config::{NodeConfig, StaticAssignment};
use slate_protocol::{
    Capability, ErrorKind, Generation, NodeId, Rights, SegmentIndex, SignedCapability, VolumeId, BLOCK_SIZE_BYTES,
};
use slate_tests::{free_addr, scratch_dir, wait_for_port, ProcessGuard};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

pub const NODE: NodeId = NodeId(1);
pub const DISK_BYTES: u64 = 96 << 20;
pub const SEGMENT_BLOCKS: u64 = 1024;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slate-node"))
}

/// A node under test: its files and (when running) its process.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub config_path: PathBuf,
    pub cfg: NodeConfig,
    pub key: SigningKey,
    pub proc: Option<ProcessGuard>,
}

impl TestNode {
    /// Formats a disk with the binary, writes a config holding `volumes` (segment 0 each), starts the node.
    pub fn start(name: &str, volumes: &[u64]) -> Self {
        let dir = scratch_dir(&format!("slate-{name}-"));
        let disk = dir.path().join("disk.img");
        let out = Command::new(bin())
            .args(["format", disk.to_str().unwrap(), "--size", &DISK_BYTES.to_string()])
            .args(["--extent-size", "1MiB", "--journal-size", "4MiB", "--node-id", "1"])
            .output()
            .expect("run slate-node format");
        assert!(out.status.success(), "format failed: {}", String::from_utf8_lossy(&out.stderr));
        let key = slate_protocol::capability::generate_signing_key();
        let mut cfg = NodeConfig::new(NODE, free_addr(), disk.clone(), &key.verifying_key());
        cfg.metrics_listen = Some(free_addr());
        cfg.admin_socket = Some(dir.path().join("admin.sock"));
        for v in volumes {
            cfg.assignments.push(StaticAssignment {
                volume: VolumeId(*v),
                segment: SegmentIndex(0),
                segment_blocks: SEGMENT_BLOCKS,
            });
        }
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, cfg.to_toml()).unwrap();
        let mut node = Self { dir, disk, config_path, cfg, key, proc: None };
        node.restart();
        node
    }

    /// Starts (again) the node process on the same disk and ports.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "node already running");
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config", self.config_path.to_str().unwrap()]);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut p = ProcessGuard::spawn("slate-node", &mut cmd).expect("spawn slate-node");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !wait_for_port(self.cfg.listen, Duration::from_millis(200)) {
            assert!(p.is_alive(), "slate-node exited during start");
            assert!(Instant::now() < deadline, "slate-node did not start listening");
        }
        self.proc = Some(p);
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM and the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.proc.take().and_then(|mut p| p.terminate())
    }

    pub fn is_alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(ProcessGuard::is_alive)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.cfg.listen
    }

    /// A capability for `volume` signed with the node's configured key.
    pub fn cap(&self, volume: u64, generation: u64, rights: Rights) -> SignedCapability {
        cap_with(&self.key, volume, generation, rights, 3600, vec![NODE])
    }

    pub async fn client(&self, volume: u64, generation: u64, rights: Rights) -> NodeClient {
        NodeClient::connect(self.addr(), self.cap(volume, generation, rights)).await.expect("session")
    }
}

/// A capability with every field chosen by the caller.
pub fn cap_with(
    key: &SigningKey,
    volume: u64,
    generation: u64,
    rights: Rights,
    valid_secs: i64,
    nodes: Vec<NodeId>,
) -> SignedCapability {
    let now = slate_protocol::now_unix_secs();
    let expires = if valid_secs >= 0 { now + valid_secs.unsigned_abs() } else { now - valid_secs.unsigned_abs() };
    Capability {
        volume: VolumeId(volume),
        generation: Generation(generation),
        rights,
        expires_unix_secs: expires,
        nodes,
        ..Default::default()
    }
    .sign(key)
}

/// The error kind of a result, or a panic with context if it succeeded or failed otherwise.
pub fn kind_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorKind {
    match r {
        Err(ClientError::Remote(e)) => e.kind,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// One block whose content names itself: (block, seq) and bytes derived from them.
pub fn block_content(block: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK_SIZE_BYTES);
    v.extend_from_slice(b"SLT1");
    v.extend_from_slice(&block.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    while v.len() < BLOCK_SIZE_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes()[..4]);
    }
    v.truncate(BLOCK_SIZE_BYTES);
    v
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// All zeros: never written (or trimmed).
    Zeros,
    /// An intact `block_content(block, seq)`.
    Seq(u64),
    /// Anything else.
    Garbage,
}

/// Classifies a block's bytes.
pub fn decode_block(block: u64, bytes: &[u8]) -> Seen {
    if bytes.iter().all(|b| *b == 0) {
        return Seen::Zeros;
    }
    if bytes.len() != BLOCK_SIZE_BYTES || &bytes[..4] != b"SLT1" {
        return Seen::Garbage;
    }
    let b = u64::from_le_bytes(bytes[4..12].try_into().unwrap());
    let seq = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
    if b == block && block_content(block, seq) == bytes {
        Seen::Seq(seq)
    } else {
        Seen::Garbage
    }
}

/// Fetches `/metrics` over plain HTTP.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "bad metrics response: {}", &out[..out.len().min(200)]);
    out
}
