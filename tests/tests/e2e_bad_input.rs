//! Acceptance 7 (issue 5): bad input to the NBD server.
//!
//! A hand-rolled NBD client (raw bytes over TCP and the unix socket, so that
//! nothing is checked on the client side) sends garbage, truncated
//! handshakes, unknown and oversized options, malformed and out-of-range
//! requests and truncated request payloads. Each gets the protocol's answer
//! (an option error, an errno in the reply, or the connection closed where the
//! protocol says so), and a real client (`qemu-io`) on another connection is
//! served before, during and after; `slate attach` stays alive throughout, and
//! a write cut off mid-payload changes nothing.

use slate_tests::cluster::{pid_alive, qemu_io, qemu_io_ok, Cluster, TestRng, UpOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A raw NBD connection.
struct Raw {
    s: Box<dyn Stream>,
}

impl Raw {
    fn tcp(addr: &str) -> Self {
        let s = TcpStream::connect(addr).expect("connect tcp");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Self { s: Box::new(s) }
    }
    fn unix(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect unix");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Self { s: Box::new(s) }
    }
    fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }
    fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_exact(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_exact(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_exact(8).try_into().unwrap())
    }
    /// Reads the server's greeting; returns its handshake flags.
    fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC, "greeting magic");
        assert_eq!(self.u64(), IHAVEOPT, "newstyle magic");
        let flags = self.u16();
        assert!(flags & 1 != 0, "the server is not fixed newstyle");
        flags
    }
    /// Greeting plus client flags (fixed newstyle, no zeroes).
    fn opened(mut self) -> Self {
        self.greeting();
        self.send(&3u32.to_be_bytes()).unwrap();
        self
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend(opt.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        self.send(&b).unwrap();
    }
    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC, "option reply magic");
        let opt = self.u32();
        let ty = self.u32();
        let len = self.u32() as usize;
        assert!(len < 1 << 20, "option reply of {len} bytes");
        (opt, ty, self.read_exact(len))
    }
    /// NBD_OPT_GO for `name`: Ok(export size) or Err(error reply type).
    fn go(&mut self, name: &str) -> Result<u64, u32> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend(0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let mut size = None;
        loop {
            let (opt, ty, data) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match ty {
                REP_INFO if data.len() >= 12 && data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => return Ok(size.expect("NBD_INFO_EXPORT before the ack")),
                e if e & 0x8000_0000 != 0 => return Err(e),
                other => panic!("unexpected reply type {other:#x} to NBD_OPT_GO"),
            }
        }
    }
    fn request(&mut self, ty: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend(0u16.to_be_bytes());
        b.extend(ty.to_be_bytes());
        b.extend(handle.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        self.send(&b)
    }
    /// A simple reply: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let err = self.u32();
        (err, self.u64())
    }
    /// True when the server closes the connection (EOF or reset) within the read timeout.
    fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    return false
                }
                Err(_) => return true,
            }
        }
        false
    }
}

struct Checker<'a> {
    cluster: &'a Cluster,
    round: u8,
}

impl Checker<'_> {
    /// A real client on another connection is served (write and read back a fresh pattern).
    fn served(&mut self, after: &str) {
        self.round = self.round.wrapping_add(1).max(1);
        let p = self.round;
        let off = (u64::from(p) % 32) << 20;
        qemu_io_ok(
            &self.cluster.nbd_unix(),
            &[format!("write -P 0x{p:02x} {off} 64k"), format!("read -P 0x{p:02x} {off} 64k")],
        );
        let client = self.cluster.info().role("client")[0].pid;
        assert!(pid_alive(client), "slate attach died after: {after}");
        eprintln!("ok: {after}; qemu-io still served");
    }
}

fn tcp_addr(uri: &str) -> String {
    uri.trim_start_matches("nbds://").trim_start_matches("nbd://").split('/').next().expect("host:port").to_owned()
}

#[test]
fn nbd_server_survives_bad_input() {
    let cluster = Cluster::start("e2e-bad-input", UpOptions::default());
    let addr = tcp_addr(&cluster.nbd_tcp());
    let sock = cluster.nbd_socket();
    let mut rng = TestRng::new(0x5eed);
    let mut check = Checker { cluster: &cluster, round: 0 };
    check.served("start");

    // An idle connection that never finishes its handshake stays open in the background.
    let mut idle = Raw::tcp(&addr);
    idle.greeting();

    // ----- garbage -----
    let mut garbage = vec![0u8; 64 << 10];
    rng.fill(&mut garbage);
    for (name, mut c) in [("tcp", Raw::tcp(&addr)), ("unix", Raw::unix(&sock))] {
        c.greeting();
        let _ = c.send(&garbage);
        assert!(c.closed_by_server(), "{name}: garbage client flags did not end the connection");
    }
    check.served("garbage after the greeting");
    let mut c = Raw::tcp(&addr);
    let _ = c.send(&garbage); // before reading the greeting at all
    assert!(c.closed_by_server(), "garbage before the greeting did not end the connection");
    let mut c = Raw::tcp(&addr).opened();
    let _ = c.send(&garbage); // garbage where an option header belongs
    assert!(c.closed_by_server(), "garbage instead of an option did not end the connection");
    check.served("garbage before the greeting and instead of an option");

    // ----- truncated handshakes -----
    drop(Raw::tcp(&addr)); // connect, close
    let mut c = Raw::unix(&sock);
    c.greeting();
    c.send(&[0, 0]).unwrap(); // half the client flags
    drop(c);
    let mut c = Raw::tcp(&addr).opened();
    c.send(&IHAVEOPT.to_be_bytes()[..6]).unwrap(); // half an option header
    drop(c);
    let mut c = Raw::tcp(&addr).opened();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend(OPT_GO.to_be_bytes());
    b.extend(1000u32.to_be_bytes());
    b.extend([0u8; 10]); // 10 of the promised 1000 bytes
    c.send(&b).unwrap();
    drop(c);
    check.served("four truncated handshakes");

    // ----- over TCP nothing is served before mutual TLS -----
    let mut c = Raw::tcp(&addr).opened();
    assert_eq!(c.go("demo"), Err(REP_ERR_TLS_REQD), "NBD_OPT_GO over TCP without TLS");
    drop(c);

    // ----- option errors: the connection goes on (the same code serves both transports) -----
    let mut c = Raw::unix(&sock).opened();
    c.option(0x00de_ad00, b"what");
    let (opt, ty, _) = c.option_reply();
    assert_eq!(opt, 0x00de_ad00);
    assert!(ty & 0x8000_0000 != 0, "an unknown option got reply type {ty:#x}, not an error");
    assert_eq!(c.go("no-such-export"), Err(REP_ERR_UNKNOWN), "NBD_OPT_GO of an unknown export");
    let mut bad_go = 100u32.to_be_bytes().to_vec(); // name length beyond the option's data
    bad_go.extend(b"demo\0\0");
    c.option(OPT_GO, &bad_go);
    let (_, ty, _) = c.option_reply();
    assert!(ty & 0x8000_0000 != 0, "a malformed NBD_OPT_GO got reply type {ty:#x}");
    let size = c.go("demo").expect("NBD_OPT_GO of demo after the errors");
    eprintln!("export size {size} after three option errors on one connection");
    drop(c);
    // An option claiming 2 GiB of data: an error or a close, never an allocation of 2 GiB.
    let mut c = Raw::tcp(&addr).opened();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend(OPT_GO.to_be_bytes());
    b.extend(0x7fff_ffffu32.to_be_bytes());
    c.send(&b).unwrap();
    let _ = c.send(&[0u8; 4096]);
    drop(c);
    check.served("unknown, malformed and oversized options");

    // ----- transmission: out-of-range and malformed requests get errors -----
    let mut c = Raw::unix(&sock).opened();
    let size = c.go("demo").expect("go");
    let out_of_range = [EINVAL, ENOSPC, EOVERFLOW];
    let cases: Vec<(&str, u16, u64, u32, Vec<u8>)> = vec![
        ("read at the end", CMD_READ, size, 4096, vec![]),
        ("read across the end", CMD_READ, size - 4096, 8192, vec![]),
        ("read with offset+len overflowing", CMD_READ, u64::MAX - 1000, 4096, vec![]),
        ("read larger than the maximum", CMD_READ, 0, 64 << 20, vec![]),
        ("write beyond the end", CMD_WRITE, size + (1 << 20), 4096, vec![0xee; 4096]),
        ("write across the end", CMD_WRITE, size - 512, 4096, vec![0xee; 4096]),
        ("trim beyond the end", CMD_TRIM, size, 1 << 20, vec![]),
        ("write-zeroes beyond the end", CMD_WRITE_ZEROES, size - 4096, 1 << 20, vec![]),
        ("block status without a negotiated context", CMD_BLOCK_STATUS, 0, 4096, vec![]),
        ("unknown command", 0x77, 0, 4096, vec![]),
    ];
    for (i, (what, ty, off, len, payload)) in cases.iter().enumerate() {
        let handle = 0x1000 + i as u64;
        c.request(*ty, handle, *off, *len, payload).expect("send request");
        let (err, h) = c.reply();
        assert_eq!(h, handle, "{what}: reply for another handle");
        assert!(err != 0, "{what}: the server answered success");
        if *ty != CMD_BLOCK_STATUS && *ty != 0x77 {
            assert!(out_of_range.contains(&err), "{what}: errno {err}, expected EINVAL, ENOSPC or EOVERFLOW");
        }
        eprintln!("  {what}: errno {err}");
    }
    // The same connection still reads.
    c.request(CMD_READ, 0x2000, 0, 4096, &[]).unwrap();
    assert_eq!(c.reply(), (0, 0x2000), "a valid read after the errors");
    assert_eq!(c.read_exact(4096).len(), 4096);
    // A bad request magic ends the connection.
    c.send(&[0xba; 28]).unwrap();
    assert!(c.closed_by_server(), "a request with a bad magic did not end the connection");
    check.served("ten bad requests and a bad magic");

    // ----- truncated requests: a cut-off write changes nothing -----
    qemu_io_ok(&cluster.nbd_unix(), &["write -P 0x3c 100M 1M".into()]);
    let mut c = Raw::unix(&sock).opened();
    c.go("demo").expect("go");
    let mut part = REQUEST_MAGIC.to_be_bytes().to_vec();
    part.extend([0, 0, 0, 1, 0, 0]); // 10 of 28 header bytes
    c.send(&part).unwrap();
    drop(c);
    let mut c = Raw::unix(&sock).opened();
    c.go("demo").expect("go");
    c.request(CMD_WRITE, 7, 100 << 20, 1 << 20, &[0xc3; 4096]).unwrap(); // 4 KiB of a 1 MiB payload
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    qemu_io_ok(&cluster.nbd_tcp(), &["read -P 0x3c 100M 1M".into()]);
    check.served("a truncated request header and a write cut off mid-payload (which changed nothing)");

    // ----- a client stalled in the middle of a 32 MiB write over the region others write -----
    let mut stalled = Raw::unix(&sock).opened();
    stalled.go("demo").expect("go");
    stalled.request(CMD_WRITE, 9, 0, 32 << 20, &[0x99; 8192]).unwrap();
    let t = Instant::now();
    check.served("a client stalled mid-payload of an overlapping 32 MiB write (connection still open)");
    eprintln!("  served in {:.1} s while the stalled write was pending", t.elapsed().as_secs_f64());
    drop(stalled);

    // ----- many connections at once: 100 idle handshakes and 20 pipelining bad requests -----
    let idle_many: Vec<Raw> = (0..100)
        .map(|_| {
            let mut c = Raw::tcp(&addr);
            c.greeting();
            c
        })
        .collect();
    let mut busy: Vec<Raw> = (0..20).map(|_| Raw::unix(&sock).opened()).collect();
    for c in &mut busy {
        c.go("demo").expect("go");
        for h in 0..32u64 {
            c.request(CMD_READ, h, size + h * 4096, 4096, &[]).unwrap();
        }
    }
    check.served("100 idle handshakes and 640 pipelined out-of-range reads on 20 connections");
    for c in &mut busy {
        let mut handles: Vec<u64> = (0..32)
            .map(|_| {
                let (err, h) = c.reply();
                assert_eq!(err, EINVAL, "pipelined out-of-range read");
                h
            })
            .collect();
        handles.sort_unstable();
        assert_eq!(handles, (0..32).collect::<Vec<u64>>(), "a pipelined request got no reply");
    }
    drop(busy);
    drop(idle_many);

    // ----- a real client's out-of-range read -----
    let out = qemu_io(&cluster.nbd_unix(), &[format!("read {size} 4096")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() || text.contains("failed"), "qemu-io read past the end succeeded: {text}");
    eprintln!("qemu-io read past the end: {}", text.trim());
    check.served("qemu-io read past the end");

    // The idle half-handshake did not block anyone; it can still finish or has been timed out.
    drop(idle);
    qemu_io_ok(&cluster.nbd_tcp(), &["read -P 0x3c 100M 1M".into()]);
}
