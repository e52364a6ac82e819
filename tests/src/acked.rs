//! An acknowledged-write checker: versioned 4 KiB writes over NBD at a fixed
//! queue depth, with a ledger of what the server acknowledged, and a read-back
//! that proves no acknowledged write was lost.
//!
//! Every write carries its identity in its bytes: a header (`SLATEACK`, the
//! block number, the block's version, the run's seed) and a fill derived from
//! all three, so reading a block back tells exactly which write is there, and
//! a torn or misplaced block is caught. The writer never has two writes to
//! one block in flight, so for every block the ledger knows the last
//! acknowledged version and the versions that were sent but never
//! acknowledged (failed, or in flight when the writer stopped or the server
//! died). [`Report::verify`] accepts, for each block, its last acknowledged
//! version or a later unacknowledged one; anything older, or anything else,
//! is a lost acknowledged write.
//!
//! It speaks NBD itself (fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple
//! replies) over the export's unix socket: one connection, one thread sending
//! writes as long as fewer than `queue_depth` are outstanding and one thread
//! reading replies. Tests start it, kill things, watch its counters
//! ([`AckedWriter::stats`]), stop it and verify:
//!
//! ```no_run
//! # use slate_tests::acked::{AckedWriter, AckedOptions};
//! # use std::path::Path;
//! let w = AckedWriter::start(Path::new("nbd.sock"), "demo", AckedOptions::new(0, 4096, 1)).unwrap();
//! std::thread::sleep(std::time::Duration::from_secs(5));
//! let report = w.stop();
//! let check = report.verify(Path::new("nbd.sock"), "demo").unwrap();
//! assert_eq!((report.failed, check.lost.len()), (0, 0));
//! ```

use crate::cluster::TestRng;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes per block.
pub const BLOCK: usize = 4096;
const HEADER_MAGIC: &[u8; 8] = b"SLATEACK";

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// What to write.
#[derive(Clone, Debug)]
pub struct AckedOptions {
    /// The first block of the range written.
    pub first_block: u64,
    /// How many blocks the range holds (writes pick blocks in it at random).
    pub blocks: u64,
    /// Writes outstanding at once.
    pub queue_depth: usize,
    /// Seeds the block choice and the data.
    pub seed: u64,
    /// At stop, how long to wait for the writes still outstanding.
    pub drain_timeout: Duration,
}

impl AckedOptions {
    /// QD32 over `blocks` blocks from `first_block`; 5 minutes to drain at stop.
    pub fn new(first_block: u64, blocks: u64, seed: u64) -> Self {
        Self { first_block, blocks, queue_depth: 32, seed, drain_timeout: Duration::from_mins(5) }
    }
}

/// Live counters of a running writer.
#[derive(Debug, Default)]
struct Shared {
    acked: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    max_latency_ms: AtomicU64,
    /// Longest time with writes outstanding and none completing.
    longest_stall_ms: AtomicU64,
    broken: AtomicBool,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Writes acknowledged (success replies).
    pub acked: u64,
    /// Writes answered with an error.
    pub failed: u64,
    /// Writes sent and not answered yet.
    pub in_flight: u64,
    /// The slowest acknowledged or failed write.
    pub max_latency: Duration,
    /// Longest time with writes outstanding and no reply at all.
    pub longest_stall: Duration,
    /// The connection broke (the server went away).
    pub broken: bool,
}

/// What happened to one block (versions start at 1; 0 means never acknowledged).
#[derive(Clone, Debug, Default)]
struct BlockLedger {
    /// Every version sent: when it was sent and, if so, when it was acknowledged.
    history: Vec<(u64, Instant, Option<Instant>)>,
    acked: u64,
    /// Versions sent but not acknowledged (failed, or outstanding at the end).
    unacked: Vec<u64>,
    last_sent: u64,
}

/// The ledger of a finished run.
#[derive(Debug)]
pub struct Report {
    pub opts: AckedOptions,
    pub acked: u64,
    pub failed: u64,
    /// Writes still outstanding when the writer gave up waiting (or the connection broke).
    pub unanswered: u64,
    pub max_latency: Duration,
    pub longest_stall: Duration,
    /// The connection error that ended the run, if any.
    pub connection_error: Option<String>,
    /// First few failures: (block, version, NBD error).
    pub failures: Vec<(u64, u64, u32)>,
    blocks: HashMap<u64, BlockLedger>,
}

/// The read-back of a [`Report`].
#[derive(Debug, Default)]
pub struct Verification {
    /// Blocks read and checked (every block the run wrote to).
    pub checked: u64,
    /// Blocks holding their last acknowledged version.
    pub at_acked: u64,
    /// Blocks holding a later, unacknowledged version (in flight at a crash, or failed).
    pub at_later_unacked: u64,
    /// Blocks that lost an acknowledged write: (block, last acknowledged version, what is there).
    pub lost: Vec<(u64, u64, String)>,
}

/// A running writer.
#[derive(Debug)]
pub struct AckedWriter {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Report>>,
    started: Instant,
}

impl AckedWriter {
    /// Connects to the export `name` on the unix socket and starts writing.
    pub fn start(socket: &Path, name: &str, opts: AckedOptions) -> io::Result<Self> {
        assert!(opts.blocks > 0 && opts.queue_depth > 0, "nothing to write");
        assert!(opts.queue_depth as u64 <= opts.blocks, "queue depth larger than the block range");
        let (stream, size) = connect(socket, name)?;
        let end = (opts.first_block + opts.blocks) * BLOCK as u64;
        if end > size {
            return Err(io::Error::other(format!("the range ends at byte {end}, the export has {size}")));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let (s2, sh2) = (Arc::clone(&stop), Arc::clone(&shared));
        let thread =
            std::thread::Builder::new().name("acked-writer".into()).spawn(move || drive(stream, opts, &s2, &sh2))?;
        Ok(Self { stop, shared, thread: Some(thread), started: Instant::now() })
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            acked: s.acked.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            max_latency: Duration::from_millis(s.max_latency_ms.load(Ordering::Relaxed)),
            longest_stall: Duration::from_millis(s.longest_stall_ms.load(Ordering::Relaxed)),
            broken: s.broken.load(Ordering::Relaxed),
        }
    }

    /// How long it has been running.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until `n` more writes are acknowledged than now; false if `timeout` passes first
    /// or the connection broke.
    pub fn wait_for_progress(&self, n: u64, timeout: Duration) -> bool {
        let target = self.stats().acked + n;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let s = self.stats();
            if s.acked >= target {
                return true;
            }
            if s.broken {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops sending, waits for the outstanding writes (up to the drain timeout) and returns the ledger.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().expect("stopped once").join().expect("the writer thread panicked")
    }
}

impl Drop for AckedWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The 4 KiB a write of `version` to `block` carries.
pub fn block_bytes(seed: u64, block: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(HEADER_MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&version.to_le_bytes());
    b[24..32].copy_from_slice(&seed.to_le_bytes());
    let mix = seed ^ block.rotate_left(21) ^ version.rotate_left(42) ^ 0x5eed_acce_55ed_b10c;
    TestRng::new(mix).fill(&mut b[32..]);
    b
}

/// What a block read back holds: `Ok(Some(version))` for an intact write of this run's seed,
/// `Ok(None)` for zeros, `Err(description)` for anything else.
pub fn decode_block(seed: u64, block: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    if data.len() != BLOCK || &data[..8] != HEADER_MAGIC {
        return Err("foreign data (no header)".into());
    }
    let field = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap_or([0; 8]));
    let (b, v, s) = (field(8), field(16), field(24));
    if b != block || s != seed {
        return Err(format!("a write meant for block {b} (seed {s})"));
    }
    if data != block_bytes(seed, block, v).as_slice() {
        return Err(format!("version {v} with a damaged body"));
    }
    Ok(Some(v))
}

impl Report {
    /// Blocks the run wrote to (acknowledged or not).
    pub fn blocks_touched(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// Reads every block the run wrote to through the export and checks it against the ledger.
    pub fn verify(&self, socket: &Path, name: &str) -> io::Result<Verification> {
        let mut out = Verification::default();
        self.read_touched(socket, name, |b, l, d| {
            out.checked += 1;
            self.check_block(b, l, d, &mut out);
        })?;
        Ok(out)
    }

    /// Checks a point-in-time copy (a snapshot served on `socket` as `name`) taken by a call
    /// that started at `started` and returned at `returned`: every block must hold a version
    /// at least the last one acknowledged before `started`, and none first sent after
    /// `returned`. Anything in between was in flight during the call and may be either.
    pub fn verify_point_in_time(
        &self,
        socket: &Path,
        name: &str,
        started: Instant,
        returned: Instant,
    ) -> io::Result<Verification> {
        let mut out = Verification::default();
        self.read_touched(socket, name, |b, l, d| {
            out.checked += 1;
            let lo = l.history.iter().filter(|h| h.2.is_some_and(|a| a < started)).map(|h| h.0).max().unwrap_or(0);
            let hi = l.history.iter().filter(|h| h.1 < returned).map(|h| h.0).max().unwrap_or(0);
            match decode_block(self.opts.seed, b, d) {
                Ok(found) => {
                    let v = found.unwrap_or(0);
                    if v < lo || v > hi {
                        let what = found.map_or_else(|| "zeros".to_owned(), |v| format!("version {v}"));
                        out.lost.push((b, lo, format!("{what}, outside [{lo}, {hi}]")));
                    } else if v == lo {
                        out.at_acked += 1;
                    } else {
                        out.at_later_unacked += 1;
                    }
                }
                Err(what) => out.lost.push((b, lo, what)),
            }
        })?;
        Ok(out)
    }

    /// Reads every block the run wrote to and hands it to `f` with its ledger.
    fn read_touched(&self, socket: &Path, name: &str, mut f: impl FnMut(u64, &BlockLedger, &[u8])) -> io::Result<()> {
        let (mut stream, _) = connect(socket, name)?;
        let chunk = 64u64;
        let (first, end) = (self.opts.first_block, self.opts.first_block + self.opts.blocks);
        let mut at = first;
        let mut handle = 1u64;
        while at < end {
            let n = chunk.min(end - at);
            if (at..at + n).any(|b| self.blocks.contains_key(&b)) {
                send_request(&mut stream, CMD_READ, handle, at * BLOCK as u64, (n as usize * BLOCK) as u32, None)?;
                let (h, err) = read_reply(&mut stream)?;
                if h != handle {
                    return Err(io::Error::other(format!("reply for handle {h}, expected {handle}")));
                }
                if err != 0 {
                    return Err(io::Error::other(format!("read of blocks {at}..{} failed: NBD error {err}", at + n)));
                }
                let mut data = vec![0u8; n as usize * BLOCK];
                stream.read_exact(&mut data)?;
                for (i, d) in data.chunks(BLOCK).enumerate() {
                    let b = at + i as u64;
                    if let Some(l) = self.blocks.get(&b) {
                        f(b, l, d);
                    }
                }
                handle += 1;
            }
            at += n;
        }
        let _ = send_request(&mut stream, CMD_DISC, handle, 0, 0, None);
        Ok(())
    }

    fn check_block(&self, block: u64, l: &BlockLedger, data: &[u8], out: &mut Verification) {
        match decode_block(self.opts.seed, block, data) {
            Ok(found) => {
                let v = found.unwrap_or(0);
                if v == l.acked {
                    out.at_acked += 1;
                } else if v > l.acked && l.unacked.contains(&v) {
                    out.at_later_unacked += 1;
                } else {
                    let what = found.map_or_else(|| "zeros".to_owned(), |v| format!("version {v}"));
                    out.lost.push((block, l.acked, what));
                }
            }
            Err(what) => out.lost.push((block, l.acked, what)),
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} acknowledged, {} failed, {} unanswered, {} blocks touched, slowest write {:.1} s, longest stall {:.1} s",
            self.acked,
            self.failed,
            self.unanswered,
            self.blocks.len(),
            self.max_latency.as_secs_f64(),
            self.longest_stall.as_secs_f64()
        )?;
        if let Some(e) = &self.connection_error {
            write!(f, ", connection error: {e}")?;
        }
        Ok(())
    }
}

// ----- the writer --------------------------------------------------------------------------------

fn drive(mut stream: UnixStream, opts: AckedOptions, stop: &AtomicBool, shared: &Shared) -> Report {
    let (tx, rx) = mpsc::channel::<io::Result<(u64, u32)>>();
    let reader = stream.try_clone().map(|mut r| {
        std::thread::spawn(move || loop {
            let reply = read_reply(&mut r);
            let end = reply.is_err();
            if tx.send(reply).is_err() || end {
                return;
            }
        })
    });
    let mut report = Report {
        opts: opts.clone(),
        acked: 0,
        failed: 0,
        unanswered: 0,
        max_latency: Duration::ZERO,
        longest_stall: Duration::ZERO,
        connection_error: None,
        failures: Vec::new(),
        blocks: HashMap::new(),
    };
    if let Err(e) = &reader {
        report.connection_error = Some(format!("cloning the socket: {e}"));
        return report;
    }
    let mut rng = TestRng::new(opts.seed);
    let mut in_flight: HashMap<u64, (u64, u64, Instant)> = HashMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let mut next_handle = 1u64;
    let mut last_reply = Instant::now();
    let mut stop_at: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping && stop_at.is_none() {
            stop_at = Some(Instant::now());
        }
        if report.connection_error.is_none() && !stopping {
            while in_flight.len() < opts.queue_depth {
                let block = loop {
                    let b = opts.first_block + rng.below(opts.blocks);
                    if !busy.contains(&b) {
                        break b;
                    }
                };
                let l = report.blocks.entry(block).or_default();
                l.last_sent += 1;
                let version = l.last_sent;
                let data = block_bytes(opts.seed, block, version);
                let handle = next_handle;
                next_handle += 1;
                if in_flight.is_empty() {
                    last_reply = Instant::now();
                }
                // Counted as sent before the bytes go out: a write cut in half by a crash may land.
                l.unacked.push(version);
                l.history.push((version, Instant::now(), None));
                in_flight.insert(handle, (block, version, Instant::now()));
                busy.insert(block);
                if let Err(e) =
                    send_request(&mut stream, CMD_WRITE, handle, block * BLOCK as u64, BLOCK as u32, Some(&data))
                {
                    report.connection_error = Some(format!("sending a write: {e}"));
                    break;
                }
            }
            shared.in_flight.store(in_flight.len() as u64, Ordering::Relaxed);
        }
        if in_flight.is_empty() && (stopping || report.connection_error.is_some()) {
            break;
        }
        if stop_at.is_some_and(|t| t.elapsed() > opts.drain_timeout) {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok((handle, err))) => {
                let Some((block, version, sent)) = in_flight.remove(&handle) else {
                    report.connection_error = Some(format!("a reply for unknown handle {handle}"));
                    break;
                };
                busy.remove(&block);
                last_reply = Instant::now();
                let latency = sent.elapsed();
                report.max_latency = report.max_latency.max(latency);
                shared.max_latency_ms.fetch_max(latency.as_millis() as u64, Ordering::Relaxed);
                let l = report.blocks.entry(block).or_default();
                if err == 0 {
                    if let Some(h) = l.history.iter_mut().find(|h| h.0 == version) {
                        h.2 = Some(Instant::now());
                    }
                    l.acked = version;
                    l.unacked.retain(|v| *v > version);
                    report.acked += 1;
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                } else {
                    report.failed += 1;
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    if report.failures.len() < 20 {
                        report.failures.push((block, version, err));
                    }
                }
                shared.in_flight.store(in_flight.len() as u64, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                report.connection_error = Some(format!("reading replies: {e}"));
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                report.connection_error = Some("the reply reader stopped".into());
                break;
            }
        }
        if !in_flight.is_empty() {
            let stall = last_reply.elapsed();
            report.longest_stall = report.longest_stall.max(stall);
            shared.longest_stall_ms.fetch_max(stall.as_millis() as u64, Ordering::Relaxed);
        }
    }
    report.unanswered = in_flight.len() as u64;
    if report.connection_error.is_some() {
        shared.broken.store(true, Ordering::Relaxed);
    } else if in_flight.is_empty() {
        let _ = send_request(&mut stream, CMD_DISC, next_handle, 0, 0, None);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Ok(r) = reader {
        let _ = r.join();
    }
    shared.in_flight.store(0, Ordering::Relaxed);
    report
}

// ----- NBD, the client side ----------------------------------------------------------------------

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`; returns the stream and the export's size.
fn connect(socket: &Path, name: &str) -> io::Result<(UnixStream, u64)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
        return Err(io::Error::other("not a newstyle NBD server"));
    }
    let flags = read_u16(&mut s)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::other("the NBD server is not fixed newstyle"));
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { u32::from(FLAG_NO_ZEROES) } else { 0 };
    let mut hello = Vec::new();
    hello.extend_from_slice(&cflags.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    hello.extend_from_slice(&(name.len() as u32).to_be_bytes());
    hello.extend_from_slice(name.as_bytes());
    s.write_all(&hello)?;
    let size = read_u64(&mut s)?;
    let _transmission_flags = read_u16(&mut s)?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    // Replies may take long while the cluster heals; the writer decides how long to wait.
    s.set_read_timeout(None)?;
    Ok((s, size))
}

fn send_request(
    s: &mut UnixStream,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
    data: Option<&[u8]>,
) -> io::Result<()> {
    let mut b = Vec::with_capacity(28 + data.map_or(0, <[u8]>::len));
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    if let Some(d) = data {
        b.extend_from_slice(d);
    }
    s.write_all(&b)
}

/// One simple reply header: (handle, error). The payload of a read follows it on the stream.
fn read_reply(s: &mut UnixStream) -> io::Result<(u64, u32)> {
    let magic = read_u32(s)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(io::Error::other(format!("unexpected reply magic {magic:#x}")));
    }
    let err = read_u32(s)?;
    let handle = read_u64(s)?;
    Ok((handle, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_decode_to_their_version() {
        let b = block_bytes(7, 42, 3);
        assert_eq!(decode_block(7, 42, &b), Ok(Some(3)));
        assert_eq!(decode_block(7, 42, &[0u8; BLOCK]), Ok(None));
        assert!(decode_block(7, 43, &b).is_err(), "a block written elsewhere is caught");
        assert!(decode_block(8, 42, &b).is_err(), "another run's block is caught");
        let mut torn = b.clone();
        torn[3000] ^= 1;
        assert!(decode_block(7, 42, &torn).is_err(), "a damaged body is caught");
        assert_ne!(block_bytes(7, 42, 3)[32..], block_bytes(7, 42, 4)[32..]);
    }

    #[test]
    fn ledger_accepts_acked_or_later_unacked_only() {
        let mut blocks = HashMap::new();
        blocks.insert(1, BlockLedger { history: Vec::new(), acked: 2, unacked: vec![3], last_sent: 3 });
        let r = Report {
            opts: AckedOptions::new(0, 8, 5),
            acked: 0,
            failed: 0,
            unanswered: 0,
            max_latency: Duration::ZERO,
            longest_stall: Duration::ZERO,
            connection_error: None,
            failures: Vec::new(),
            blocks,
        };
        let l = r.blocks[&1].clone();
        let mut out = Verification::default();
        for v in [2, 3, 1] {
            r.check_block(1, &l, &block_bytes(5, 1, v), &mut out);
        }
        r.check_block(1, &l, &[0u8; BLOCK], &mut out);
        assert_eq!((out.at_acked, out.at_later_unacked), (1, 1));
        assert_eq!(out.lost.len(), 2, "an older version and zeros are lost writes: {:?}", out.lost);
    }
}
