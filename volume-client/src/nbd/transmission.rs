//! The NBD transmission phase: pipelined requests, one reply writer.
//!
//! One reader (the connection task) decodes requests in arrival order,
//! validates them, takes their bytes from the connection's in-flight budget,
//! registers mutating requests with the export's [`WriteOrder`] (so overlapping
//! writes run in arrival order, and read-modify-write of partial blocks is
//! serialized), and spawns each request as its own task. Replies go through a
//! channel to one writer task, which owns the socket's write half, so a reply
//! is never interleaved with another and replies leave in completion order.
//!
//! A malformed request that still lets the stream stay in sync gets the error
//! the protocol names (`EINVAL`, `ENOSPC`, `EPERM`, `ENOTSUP`); a request whose
//! framing is broken (bad magic) ends this connection only. The budget bounds
//! memory per connection: the reader waits for budget before it reads a write's
//! payload, which pushes back on the client through TCP.
//!
//! [`WriteOrder`]: super::order::WriteOrder

use std::io;
use std::sync::Arc;
use std::time::Instant;

use slate_protocol::stages::Stage;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::export::Export;
use super::handshake::Negotiated;
use super::proto::{
    chunk_header, error_chunk, simple_reply, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    META_BASE_ALLOCATION_ID, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REQUEST_HEADER_BYTES, REQUEST_MAGIC, STATE_HOLE, STATE_ZERO,
};
use super::ServerCtx;
use crate::blockdev::{errno, BlockDevice, DevError};

/// Longest range one `NBD_CMD_BLOCK_STATUS` answers (the server may answer less than asked).
const MAX_STATUS_BYTES: u64 = 1 << 30;
/// Most descriptors in one block status reply.
const MAX_STATUS_DESCRIPTORS: usize = 4096;
/// Budget every request takes at least, so that empty requests are bounded too.
const MIN_REQUEST_WEIGHT: u32 = 4096;

/// One reply on its way to the writer; the permit returns the request's budget once written.
struct Out {
    head: BytesMut,
    data: Option<Bytes>,
    _permit: Option<OwnedSemaphorePermit>,
    /// When the request's header was parsed, and when its reply was queued (stage timings).
    times: Option<(Instant, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    /// When the header was parsed.
    t0: Instant,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Per-connection state shared by the reader and the request tasks.
struct Conn {
    export: Arc<Export>,
    structured: bool,
    base_allocation: bool,
    tx: mpsc::UnboundedSender<Out>,
}

impl Conn {
    fn dev(&self) -> &dyn BlockDevice {
        &*self.export.device
    }

    fn send(&self, out: Out) {
        // The writer may be gone (client vanished); the reply has nowhere to go.
        let _ = self.tx.send(out);
    }

    fn reply_ok(&self, req: &Request, permit: Option<OwnedSemaphorePermit>) {
        self.send(Out {
            head: simple_reply(req.cookie, 0),
            data: None,
            _permit: permit,
            times: Some((req.t0, Instant::now())),
        });
    }

    fn reply_err(&self, req: &Request, code: u32, msg: &str, permit: Option<OwnedSemaphorePermit>) {
        debug!(cookie = req.cookie, kind = req.kind, code, msg, "NBD request failed");
        let head = if self.structured { error_chunk(req.cookie, code, msg) } else { simple_reply(req.cookie, code) };
        self.send(Out { head, data: None, _permit: permit, times: Some((req.t0, Instant::now())) });
    }

    fn reply_dev(&self, req: &Request, r: Result<(), DevError>, permit: Option<OwnedSemaphorePermit>) {
        match r {
            Ok(()) => self.reply_ok(req, permit),
            Err(e) => self.reply_err(req, e.nbd_errno(), &e.to_string(), permit),
        }
    }

    fn reply_read(&self, req: &Request, data: Bytes, permit: Option<OwnedSemaphorePermit>) {
        if !self.structured {
            self.send(Out {
                head: simple_reply(req.cookie, 0),
                data: Some(data),
                _permit: permit,
                times: Some((req.t0, Instant::now())),
            });
            return;
        }
        let mut head = BytesMut::with_capacity(28);
        if data.is_empty() {
            chunk_header(&mut head, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
            self.send(Out { head, data: None, _permit: permit, times: Some((req.t0, Instant::now())) });
            return;
        }
        chunk_header(&mut head, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u32);
        head.put_u64(req.offset);
        self.send(Out { head, data: Some(data), _permit: permit, times: Some((req.t0, Instant::now())) });
    }

    fn reply_status(&self, req: &Request, descs: &[(u32, u32)], permit: Option<OwnedSemaphorePermit>) {
        let len = 4 + 8 * descs.len();
        let mut head = BytesMut::with_capacity(20 + len);
        chunk_header(&mut head, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len as u32);
        head.put_u32(META_BASE_ALLOCATION_ID);
        for (l, f) in descs {
            head.put_u32(*l);
            head.put_u32(*f);
        }
        self.send(Out { head, data: None, _permit: permit, times: Some((req.t0, Instant::now())) });
    }
}

/// How a request task ended; turned into the reply by [`spawn_request`].
enum Done {
    Unit(Result<(), DevError>),
    Data(Result<Bytes, DevError>),
    Status(Result<Vec<(u32, u32)>, DevError>),
}

/// Answers `EIO` for a request whose task panicked, so the client is not left waiting.
struct PanicReply<'a> {
    conn: &'a Conn,
    req: Request,
    armed: bool,
}

impl Drop for PanicReply<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.reply_err(&self.req, errno::EIO, "internal error", None);
        }
    }
}

/// Run one request in its own task and send its reply (an `EIO` reply if it panics).
fn spawn_request<F, Fut>(conn: &Arc<Conn>, req: Request, permit: Option<OwnedSemaphorePermit>, work: F)
where
    F: FnOnce(Arc<Conn>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Done> + Send + 'static,
{
    let conn = Arc::clone(conn);
    tokio::spawn(async move {
        let mut guard = PanicReply { conn: &conn, req, armed: true };
        let done = work(Arc::clone(&conn)).await;
        guard.armed = false;
        drop(guard);
        match done {
            Done::Unit(r) => conn.reply_dev(&req, r, permit),
            Done::Data(Ok(data)) => conn.reply_read(&req, data, permit),
            Done::Status(Ok(descs)) => conn.reply_status(&req, &descs, permit),
            Done::Data(Err(e)) | Done::Status(Err(e)) => {
                conn.reply_err(&req, e.nbd_errno(), &e.to_string(), permit);
            }
        }
    });
}

enum Flow {
    Continue,
    Stop,
}

/// Serve the transmission phase of one connection until the client leaves,
/// breaks the protocol, or the server shuts down.
pub(crate) async fn serve(neg: Negotiated, ctx: Arc<ServerCtx>, peer: &str) {
    let Negotiated { stream, export, structured, base_allocation, tls } = neg;
    debug!(peer, export = %export.config.name, structured, base_allocation, tls, "NBD transmission phase");
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let (tx, rx) = mpsc::unbounded_channel();
    let dead = CancellationToken::new();
    let writer = tokio::spawn(write_replies(wr, rx, dead.clone(), ctx.force_close.clone()));
    let budget = Arc::new(Semaphore::new(ctx.config.max_inflight_bytes as usize));
    let conn = Arc::new(Conn { export, structured, base_allocation, tx });

    loop {
        let mut hdr = [0u8; REQUEST_HEADER_BYTES];
        tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => break,
            () = dead.cancelled() => break,
            r = rd.read_exact(&mut hdr) => {
                if let Err(e) = r {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        debug!(peer, error = %e, "NBD connection read failed");
                    }
                    break;
                }
            }
        }
        let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            warn!(peer, magic, "bad NBD request magic; closing the connection");
            break;
        }
        let req = Request {
            t0: Instant::now(),
            flags: u16::from_be_bytes(hdr[4..6].try_into().expect("2 bytes")),
            kind: u16::from_be_bytes(hdr[6..8].try_into().expect("2 bytes")),
            cookie: u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(hdr[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(hdr[24..28].try_into().expect("4 bytes")),
        };
        // A client stalling in the middle of a write payload must not hold up a forced close.
        let handled = tokio::select! {
            r = handle(&conn, &ctx, &budget, &mut rd, req) => r,
            () = ctx.force_close.cancelled() => Ok(Flow::Stop),
        };
        match handled {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => break,
            Err(e) => {
                debug!(peer, error = %e, "NBD connection ended while reading a request");
                break;
            }
        }
    }
    // Outstanding requests still hold clones of the connection (and so of the
    // reply channel); the writer finishes once they have all replied.
    drop(conn);
    if writer.await.is_err() {
        warn!(peer, "NBD reply writer panicked");
    }
    debug!(peer, "NBD connection closed");
}

async fn acquire(budget: &Arc<Semaphore>, ctx: &ServerCtx, len: u32) -> Option<OwnedSemaphorePermit> {
    let weight = len.max(MIN_REQUEST_WEIGHT).min(ctx.config.max_inflight_bytes);
    tokio::select! {
        biased;
        () = ctx.force_close.cancelled() => None,
        p = Arc::clone(budget).acquire_many_owned(weight) => p.ok(),
    }
}

/// Read and drop `len` payload bytes that the server will not use.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied == u64::from(len) {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

fn range_end(offset: u64, len: u64, size: u64) -> Option<u64> {
    offset.checked_add(len).filter(|end| *end <= size)
}

fn aligned(offset: u64, end: u64, bs: u64) -> (u64, u64) {
    (offset / bs * bs, end.div_ceil(bs) * bs)
}

#[allow(clippy::too_many_lines)]
async fn handle<R: AsyncBufRead + Unpin>(
    conn: &Arc<Conn>,
    ctx: &ServerCtx,
    budget: &Arc<Semaphore>,
    rd: &mut R,
    req: Request,
) -> io::Result<Flow> {
    let size = conn.dev().size_bytes();
    let bs = u64::from(conn.dev().block_size());
    let read_only = conn.export.config.read_only;
    let max_request = ctx.config.max_request_bytes;
    match req.kind {
        CMD_DISC => return Ok(Flow::Stop),
        CMD_WRITE => {
            if req.len > max_request {
                discard(rd, req.len).await?;
                conn.reply_err(&req, errno::EINVAL, "write larger than the maximum block size", None);
                return Ok(Flow::Continue);
            }
            let Some(permit) = acquire(budget, ctx, req.len).await else { return Ok(Flow::Stop) };
            let len = req.len as usize;
            let mut payload = BytesMut::with_capacity(len);
            let mut take = rd.take(u64::from(req.len));
            while payload.len() < len {
                if take.read_buf(&mut payload).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Stage::NbdReceive.since(req.t0);
            if req.flags & !CMD_FLAG_FUA != 0 {
                conn.reply_err(&req, errno::EINVAL, "unsupported flags for NBD_CMD_WRITE", Some(permit));
            } else if read_only {
                conn.reply_err(&req, errno::EPERM, "export is read-only", Some(permit));
            } else if let Some(end) = range_end(req.offset, u64::from(req.len), size) {
                let (a0, a1) = aligned(req.offset, end, bs);
                let (guard, deps) = conn.export.order.register(a0, a1);
                spawn_request(conn, req, Some(permit), move |conn| async move {
                    deps.wait().await;
                    let r = write_bytes(conn.dev(), req.offset, payload.freeze(), req.flags & CMD_FLAG_FUA != 0).await;
                    drop(guard);
                    Done::Unit(r)
                });
            } else {
                conn.reply_err(&req, errno::ENOSPC, "write beyond the end of the export", Some(permit));
            }
        }
        CMD_READ => {
            let mut allowed = CMD_FLAG_FUA;
            if conn.structured {
                allowed |= CMD_FLAG_DF;
            }
            if req.flags & !allowed != 0 {
                conn.reply_err(&req, errno::EINVAL, "unsupported flags for NBD_CMD_READ", None);
            } else if req.len > max_request {
                conn.reply_err(&req, errno::EINVAL, "read larger than the maximum block size", None);
            } else if range_end(req.offset, u64::from(req.len), size).is_none() {
                conn.reply_err(&req, errno::EINVAL, "read beyond the end of the export", None);
            } else {
                let Some(permit) = acquire(budget, ctx, req.len).await else { return Ok(Flow::Stop) };
                spawn_request(conn, req, Some(permit), move |conn| async move {
                    Done::Data(read_bytes(conn.dev(), req.offset, req.len).await)
                });
            }
        }
        CMD_FLUSH => {
            if req.flags & !CMD_FLAG_FUA != 0 {
                conn.reply_err(&req, errno::EINVAL, "unsupported flags for NBD_CMD_FLUSH", None);
            } else {
                let Some(permit) = acquire(budget, ctx, 0).await else { return Ok(Flow::Stop) };
                spawn_request(conn, req, Some(permit), |conn| async move { Done::Unit(conn.dev().flush().await) });
            }
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            let trim = req.kind == CMD_TRIM;
            let allowed = if trim { CMD_FLAG_FUA } else { CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO };
            let end = range_end(req.offset, u64::from(req.len), size);
            if req.flags & !allowed != 0 {
                conn.reply_err(&req, errno::EINVAL, "unsupported command flags", None);
            } else if read_only {
                conn.reply_err(&req, errno::EPERM, "export is read-only", None);
            } else if end.is_none() && trim {
                conn.reply_err(&req, errno::EINVAL, "trim beyond the end of the export", None);
            } else if end.is_none() {
                conn.reply_err(&req, errno::ENOSPC, "write zeroes beyond the end of the export", None);
            } else if !trim && req.flags & CMD_FLAG_FAST_ZERO != 0 && !conn.dev().can_fast_zero() {
                conn.reply_err(&req, errno::ENOTSUP, "the device cannot zero fast", None);
            } else if let Some(end) = end {
                let Some(permit) = acquire(budget, ctx, 0).await else { return Ok(Flow::Stop) };
                let (a0, a1) = aligned(req.offset, end, bs);
                let (guard, deps) = conn.export.order.register(a0, a1);
                spawn_request(conn, req, Some(permit), move |conn| async move {
                    deps.wait().await;
                    let fua = req.flags & CMD_FLAG_FUA != 0;
                    let r = if trim {
                        trim_bytes(conn.dev(), req.offset, end, fua).await
                    } else {
                        zero_bytes(conn.dev(), req.offset, end, req.flags & CMD_FLAG_NO_HOLE != 0, fua).await
                    };
                    drop(guard);
                    Done::Unit(r)
                });
            }
        }
        CMD_BLOCK_STATUS => {
            if !conn.structured || !conn.base_allocation {
                conn.reply_err(&req, errno::EINVAL, "no metadata context was negotiated", None);
            } else if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) != 0 {
                conn.reply_err(&req, errno::EINVAL, "unsupported flags for NBD_CMD_BLOCK_STATUS", None);
            } else if req.len == 0 || range_end(req.offset, u64::from(req.len), size).is_none() {
                conn.reply_err(&req, errno::EINVAL, "block status range empty or beyond the end", None);
            } else {
                let Some(permit) = acquire(budget, ctx, 0).await else { return Ok(Flow::Stop) };
                spawn_request(conn, req, Some(permit), move |conn| async move {
                    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                    Done::Status(block_status(conn.dev(), req.offset, req.len, one).await)
                });
            }
        }
        _ => conn.reply_err(&req, errno::EINVAL, "unknown command", None),
    }
    Ok(Flow::Continue)
}

/// Read any byte range: whole device blocks are read and the range cut out of them.
async fn read_bytes(dev: &dyn BlockDevice, offset: u64, len: u32) -> Result<Bytes, DevError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let bs = u64::from(dev.block_size());
    let end = offset + u64::from(len);
    let (a0, a1) = aligned(offset, end, bs);
    if a0 == offset && a1 == end {
        return dev.read(offset, len).await;
    }
    let whole = dev.read(a0, u32::try_from(a1 - a0).map_err(|_| DevError::OutOfRange)?).await?;
    Ok(whole.slice((offset - a0) as usize..(end - a0) as usize))
}

/// Write any byte range; partial blocks at the edges are read, patched and written whole.
/// The caller holds the aligned range in the export's write order.
async fn write_bytes(dev: &dyn BlockDevice, offset: u64, data: Bytes, fua: bool) -> Result<(), DevError> {
    if data.is_empty() {
        return Ok(());
    }
    let bs = u64::from(dev.block_size());
    let end = offset + data.len() as u64;
    let (a0, a1) = aligned(offset, end, bs);
    if a0 == offset && a1 == end {
        return dev.write(offset, data, fua).await;
    }
    let mut buf = BytesMut::zeroed((a1 - a0) as usize);
    let bsz = bs as usize;
    if offset != a0 {
        let head = dev.read(a0, bs as u32).await?;
        buf[..bsz].copy_from_slice(&head);
    }
    let tail_done = offset != a0 && a1 - a0 == bs;
    if end != a1 && !tail_done {
        let tail = dev.read(a1 - bs, bs as u32).await?;
        let at = (a1 - bs - a0) as usize;
        buf[at..at + bsz].copy_from_slice(&tail);
    }
    buf[(offset - a0) as usize..(end - a0) as usize].copy_from_slice(&data);
    dev.write(a0, buf.freeze(), fua).await
}

/// Zero `offset..end`: whole blocks through the device's `write_zeroes`, partial edges by read-modify-write.
async fn zero_bytes(dev: &dyn BlockDevice, offset: u64, end: u64, no_hole: bool, fua: bool) -> Result<(), DevError> {
    if end > offset {
        let bs = u64::from(dev.block_size());
        let inner_start = offset.div_ceil(bs) * bs;
        let inner_end = end / bs * bs;
        if inner_start >= inner_end {
            write_bytes(dev, offset, Bytes::from(vec![0u8; (end - offset) as usize]), false).await?;
        } else {
            if offset < inner_start {
                write_bytes(dev, offset, Bytes::from(vec![0u8; (inner_start - offset) as usize]), false).await?;
            }
            dev.write_zeroes(inner_start, inner_end - inner_start, no_hole).await?;
            if inner_end < end {
                write_bytes(dev, inner_end, Bytes::from(vec![0u8; (end - inner_end) as usize]), false).await?;
            }
        }
    }
    if fua {
        dev.flush().await?;
    }
    Ok(())
}

/// Trim the whole blocks inside `offset..end` (trim is advisory: partial edges are left alone).
async fn trim_bytes(dev: &dyn BlockDevice, offset: u64, end: u64, fua: bool) -> Result<(), DevError> {
    let bs = u64::from(dev.block_size());
    let inner_start = offset.div_ceil(bs) * bs;
    let inner_end = end / bs * bs;
    if inner_start < inner_end {
        dev.trim(inner_start, inner_end - inner_start).await?;
        if fua {
            dev.flush().await?;
        }
    }
    Ok(())
}

/// `base:allocation` descriptors (length, flags) for `offset..offset+len`, clipped to the request.
async fn block_status(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, DevError> {
    let bs = u64::from(dev.block_size());
    let size = dev.size_bytes();
    let len = u64::from(len).min(size - offset).min(MAX_STATUS_BYTES);
    let end = offset + len;
    let (a0, a1) = aligned(offset, end, bs);
    let extents = dev.block_status(a0, u32::try_from(a1 - a0).map_err(|_| DevError::OutOfRange)?).await?;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = a0;
    for e in extents {
        let start = pos.max(offset);
        pos += u64::from(e.len);
        let stop = pos.min(end);
        if stop > start {
            let mut flags = 0;
            if !e.allocated {
                flags |= STATE_HOLE;
            }
            if e.zero {
                flags |= STATE_ZERO;
            }
            let piece = (stop - start) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += piece,
                _ => out.push((piece, flags)),
            }
        }
        if pos >= end || out.len() >= MAX_STATUS_DESCRIPTORS {
            break;
        }
    }
    if out.is_empty() {
        // Nothing known: status 0 ("allocated, content unknown") is always safe.
        out.push((len as u32, 0));
    }
    if req_one {
        out.truncate(1);
    }
    Ok(out)
}

/// The single writer of a connection's replies. Flushes whenever the queue runs dry.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    dead: CancellationToken,
    force_close: CancellationToken,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let work = async {
        loop {
            let out = match rx.try_recv() {
                Ok(out) => out,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    w.flush().await?;
                    match rx.recv().await {
                        Some(out) => out,
                        None => break,
                    }
                }
            };
            w.write_all(&out.head).await?;
            if let Some(data) = &out.data {
                w.write_all(data).await?;
            }
            if let Some((t0, queued)) = out.times {
                // Written to the socket buffer; the flush below follows at once when the queue is dry.
                Stage::NbdReply.since(queued);
                Stage::ClientTotal.since(t0);
            }
        }
        w.flush().await?;
        w.shutdown().await
    };
    let r: io::Result<()> = tokio::select! {
        r = work => r,
        () = force_close.cancelled() => Err(io::Error::other("forced close at shutdown")),
    };
    if let Err(e) = r {
        debug!(error = %e, "NBD reply writer stopped");
    }
    dead.cancel();
}
