//! Shared helpers for the NBD tests: an in-process server on a unix socket and
//! a TCP port, a minimal raw NBD client for byte-precise protocol checks, and
//! runners for the real client tools (qemu-io, qemu-img, nbdinfo, nbdcopy, fio,
//! python3-libnbd). Included by the `nbd_*` tests with `#[path]`; compiled on
//! its own it is an empty test crate.
#![allow(dead_code, missing_debug_implementations)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use slate::blockdev::BlockDevice;
use slate::nbd::{ExportConfig, ExportRegistry, NbdServer, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EPERM: u32 = 1;
pub const ENOTSUP: u32 = 95;

/// Set `RUST_LOG=slate=debug` to see the server's log in test output.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// An in-process NBD server listening on a unix socket and on 127.0.0.1.
pub struct TestServer {
    pub server: NbdServer,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    tasks: Vec<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    pub async fn start(exports: Vec<(ExportConfig, Arc<dyn BlockDevice>)>, config: ServerConfig) -> Self {
        let registry = ExportRegistry::new();
        for (cfg, dev) in exports {
            registry.add(cfg, dev).expect("add export");
        }
        let server = NbdServer::new(registry, config).expect("server config");
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let unix = UnixListener::bind(&socket).expect("bind unix socket");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let addr = tcp.local_addr().expect("tcp addr");
        let s1 = server.clone();
        let s2 = server.clone();
        let tasks = vec![
            tokio::spawn(async move { s1.serve_unix(unix).await }),
            tokio::spawn(async move { s2.serve_tcp(tcp).await }),
        ];
        Self { server, dir, socket, tcp: addr, tasks }
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.tcp.port())
    }

    pub async fn stop(self) {
        self.server.shutdown().await;
        for t in self.tasks {
            t.await.expect("listener task").expect("listener result");
        }
    }
}

/// Run a command to completion; panic with its output if it fails.
pub async fn run_ok(program: &str, args: &[&str]) -> Output {
    let out = run(program, args).await;
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command to completion (at most 5 minutes).
pub async fn run(program: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(program).args(args).kill_on_drop(true).output();
    let Ok(result) = tokio::time::timeout(Duration::from_mins(5), child).await else {
        panic!("{program} {args:?} did not finish in 5 minutes");
    };
    match result {
        Ok(out) => out,
        Err(e) => panic!("cannot run {program}: {e} (is it installed? see .ci/run / apt-get install)"),
    }
}

/// Run a python3-libnbd script (given as source) with arguments; panic on failure.
pub async fn python_ok(dir: &Path, name: &str, source: &str, args: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, source).expect("write script");
    let mut all = vec![path.to_str().expect("utf8 path")];
    all.extend_from_slice(args);
    let out = run_ok("/usr/bin/python3", &all).await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What one reply carried.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
    /// Block status descriptors (length, flags) from a structured reply.
    pub status: Vec<(u32, u32)>,
    pub chunks: Vec<u16>,
}

/// A minimal NBD client over any stream, for byte-precise protocol tests.
pub struct RawClient {
    pub s: Box<dyn Stream>,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pending: HashMap<u64, (u16, u32)>,
}

pub async fn unix_stream(path: &Path) -> Box<dyn Stream> {
    Box::new(UnixStream::connect(path).await.expect("connect unix"))
}

pub async fn tcp_stream(addr: SocketAddr) -> Box<dyn Stream> {
    Box::new(TcpStream::connect(addr).await.expect("connect tcp"))
}

async fn read_u32(s: &mut Box<dyn Stream>) -> io::Result<u32> {
    s.read_u32().await
}

impl RawClient {
    /// Fixed newstyle handshake ending in NBD_OPT_GO for `export`.
    pub async fn go(mut s: Box<dyn Stream>, export: &str, structured: bool, meta: bool) -> io::Result<Self> {
        assert_eq!(s.read_u64().await?, NBDMAGIC);
        assert_eq!(s.read_u64().await?, IHAVEOPT);
        let hflags = s.read_u16().await?;
        assert_eq!(hflags & 1, 1, "fixed newstyle");
        s.write_u32(1 | 2).await?; // fixed newstyle, no zeroes
        if structured {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[]).await?;
            let (rep, _) = read_option_reply(&mut s, OPT_STRUCTURED_REPLY).await?;
            assert_eq!(rep, REP_ACK);
        }
        if meta {
            let mut d = Vec::new();
            d.extend((export.len() as u32).to_be_bytes());
            d.extend(export.as_bytes());
            d.extend(1u32.to_be_bytes());
            d.extend(15u32.to_be_bytes());
            d.extend(b"base:allocation");
            send_option(&mut s, OPT_SET_META_CONTEXT, &d).await?;
            loop {
                let (rep, _) = read_option_reply(&mut s, OPT_SET_META_CONTEXT).await?;
                if rep == REP_ACK {
                    break;
                }
                assert_eq!(rep, 4, "meta context reply");
            }
        }
        let mut d = Vec::new();
        d.extend((export.len() as u32).to_be_bytes());
        d.extend(export.as_bytes());
        d.extend(0u16.to_be_bytes());
        send_option(&mut s, OPT_GO, &d).await?;
        let mut size = 0;
        let mut flags = 0;
        loop {
            let (rep, data) = read_option_reply(&mut s, OPT_GO).await?;
            match rep {
                REP_ACK => break,
                REP_INFO => {
                    if u16::from_be_bytes([data[0], data[1]]) == 0 {
                        size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        flags = u16::from_be_bytes([data[10], data[11]]);
                    }
                }
                other => {
                    return Err(io::Error::other(format!(
                        "NBD_OPT_GO refused: {other:#x} {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
            }
        }
        Ok(Self { s, size, flags, structured, pending: HashMap::new() })
    }

    /// Send one request (with its payload for writes).
    pub async fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend(REQUEST_MAGIC.to_be_bytes());
        b.extend(flags.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        self.s.write_all(&b).await.expect("send request");
        self.pending.insert(cookie, (kind, len));
    }

    /// Read the next complete reply (all chunks of a structured reply).
    pub async fn reply(&mut self) -> io::Result<Reply> {
        let magic = read_u32(&mut self.s).await?;
        let mut r = Reply::default();
        if magic == SIMPLE_REPLY_MAGIC {
            r.error = self.s.read_u32().await?;
            r.cookie = self.s.read_u64().await?;
            let (kind, len) = self.pending.remove(&r.cookie).expect("reply to a pending request");
            if kind == CMD_READ && r.error == 0 {
                r.data = vec![0; len as usize];
                self.s.read_exact(&mut r.data).await?;
            }
            return Ok(r);
        }
        let mut magic = magic;
        loop {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
            let flags = self.s.read_u16().await?;
            let kind = self.s.read_u16().await?;
            r.cookie = self.s.read_u64().await?;
            let len = self.s.read_u32().await?;
            let mut payload = vec![0; len as usize];
            self.s.read_exact(&mut payload).await?;
            r.chunks.push(kind);
            match kind {
                1 => r.data.extend_from_slice(&payload[8..]),
                5 => {
                    for d in payload[4..].chunks(8) {
                        r.status.push((
                            u32::from_be_bytes(d[0..4].try_into().unwrap()),
                            u32::from_be_bytes(d[4..8].try_into().unwrap()),
                        ));
                    }
                }
                k if k & 0x8000 != 0 => r.error = u32::from_be_bytes(payload[0..4].try_into().unwrap()),
                _ => {}
            }
            if flags & 1 != 0 {
                break;
            }
            magic = read_u32(&mut self.s).await?;
        }
        self.pending.remove(&r.cookie);
        Ok(r)
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Reply {
        self.send(CMD_WRITE, 0, 1, offset, data.len() as u32, data).await;
        self.reply().await.expect("write reply")
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Reply {
        self.send(CMD_READ, 0, 2, offset, len, &[]).await;
        self.reply().await.expect("read reply")
    }

    pub async fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 99, 0, 0, &[]).await;
        let mut rest = Vec::new();
        // The server closes the connection after DISC.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.s.read_to_end(&mut rest)).await;
    }
}

pub async fn send_option(s: &mut Box<dyn Stream>, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::new();
    b.extend(IHAVEOPT.to_be_bytes());
    b.extend(opt.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    s.write_all(&b).await
}

pub async fn read_option_reply(s: &mut Box<dyn Stream>, opt: u32) -> io::Result<(u32, Vec<u8>)> {
    assert_eq!(s.read_u64().await?, OPT_REPLY_MAGIC);
    assert_eq!(s.read_u32().await?, opt);
    let rep = s.read_u32().await?;
    let len = s.read_u32().await?;
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await?;
    Ok((rep, data))
}

/// A deterministic pattern: byte i of the export holds `pattern_byte(seed, i)`.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(seed, offset + i)).collect()
}

pub fn pattern_byte(seed: u8, at: u64) -> u8 {
    let x = at.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed).wrapping_mul(0x0100_0000_01b3);
    (x >> 29) as u8
}
