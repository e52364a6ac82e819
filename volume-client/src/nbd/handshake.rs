//! The NBD handshake: fixed newstyle negotiation up to the transmission phase.
//!
//! One function drives one connection's option haggling as a loop over
//! options: read a header, read its (bounded) payload, answer. Anything that is
//! not a well-formed option ends only this connection; a well-formed option we
//! do not know gets `NBD_REP_ERR_UNSUP`, as the protocol asks. When TLS is
//! configured the server runs in FORCEDTLS mode: every option but `STARTTLS`
//! and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until TLS is up, and the
//! options negotiated before TLS are forgotten after it.
//!
//! The handshake reads the socket unbuffered, so no byte meant for the TLS
//! layer is ever swallowed by a buffer of the plain-text layer.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::export::Export;
use super::proto::{
    option_reply, FLAG_CAN_MULTI_CONN, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES, FLAG_READ_ONLY, FLAG_SEND_DF, FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_OPTION_BYTES,
    MAX_STRING_BYTES, META_BASE_ALLOCATION, META_BASE_ALLOCATION_ID, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_INVALID, REP_ERR_SHUTDOWN, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT,
    REP_SERVER,
};
use super::{BoxStream, ServerCtx};

/// What the handshake agreed on, and the (possibly TLS-wrapped) stream.
pub(crate) struct Negotiated {
    pub stream: BoxStream,
    pub export: Arc<Export>,
    pub structured: bool,
    pub base_allocation: bool,
    pub tls: bool,
}

fn proto_err(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

async fn read_exact(stream: &mut BoxStream, buf: &mut [u8], limit: Duration) -> io::Result<()> {
    match tokio::time::timeout(limit, stream.read_exact(buf)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out")),
    }
}

async fn send(stream: &mut BoxStream, data: &[u8], limit: Duration) -> io::Result<()> {
    match tokio::time::timeout(limit, async {
        stream.write_all(data).await?;
        stream.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "handshake write timed out")),
    }
}

/// Transmission flags for `export` given what was negotiated.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.config.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if export.config.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// A cursor over an option payload that refuses to read past its end.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    /// A length-prefixed (u32) string of at most 4096 bytes.
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING_BYTES {
            return None;
        }
        std::str::from_utf8(self.bytes(n)?).ok()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

enum Reply {
    /// Send these bytes and go on haggling.
    Send(BytesMut),
    /// Send these bytes, then enter transmission with this export.
    Go(BytesMut, Arc<Export>),
}

struct State {
    structured: bool,
    /// The export `SET_META_CONTEXT` named, and whether it selected `base:allocation`.
    meta: Option<(Arc<Export>, bool)>,
    tls: bool,
}

/// Drive the handshake. `Ok(None)`: the client ended it (or was refused) cleanly.
pub(crate) async fn negotiate(mut stream: BoxStream, ctx: &ServerCtx) -> io::Result<Option<Negotiated>> {
    let limit = ctx.config.handshake_timeout;
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    send(&mut stream, &hello, limit).await?;

    let mut cflags = [0u8; 4];
    read_exact(&mut stream, &mut cflags, limit).await?;
    let cflags = u32::from_be_bytes(cflags);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(proto_err("unknown client flags"));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    if ctx.tls.is_some() && cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(proto_err("TLS is required but the client does not speak fixed newstyle"));
    }

    let mut st = State { structured: false, meta: None, tls: false };
    loop {
        let mut hdr = [0u8; 16];
        read_exact(&mut stream, &mut hdr, limit).await?;
        let magic = u64::from_be_bytes(hdr[0..8].try_into().expect("8 bytes"));
        let opt = u32::from_be_bytes(hdr[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(hdr[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            return Err(proto_err("bad option magic"));
        }
        if len > MAX_OPTION_BYTES {
            return Err(proto_err("option payload too large"));
        }
        let mut data = vec![0u8; len as usize];
        read_exact(&mut stream, &mut data, limit).await?;
        debug!(option = opt, len, "NBD option");

        if opt == OPT_ABORT {
            // The client may already be gone; an error sending the ACK does not matter.
            let _ = send(&mut stream, &option_reply(opt, REP_ACK, &[]), limit).await;
            let _ = stream.shutdown().await;
            return Ok(None);
        }
        if ctx.shutdown.is_cancelled() {
            if opt == OPT_EXPORT_NAME {
                return Ok(None);
            }
            send(&mut stream, &option_reply(opt, REP_ERR_SHUTDOWN, b"server is shutting down"), limit).await?;
            continue;
        }
        if ctx.tls.is_some() && !st.tls && opt != OPT_STARTTLS {
            if opt == OPT_EXPORT_NAME {
                debug!("client asked for an export without TLS; closing");
                return Ok(None);
            }
            send(&mut stream, &option_reply(opt, REP_ERR_TLS_REQD, b"TLS is required"), limit).await?;
            continue;
        }
        if opt == OPT_STARTTLS {
            let Some(acceptor) = ctx.tls.clone() else {
                send(&mut stream, &option_reply(opt, REP_ERR_UNSUP, b"TLS is not configured"), limit).await?;
                continue;
            };
            if st.tls || !data.is_empty() {
                send(&mut stream, &option_reply(opt, REP_ERR_INVALID, b"TLS already active or bad payload"), limit)
                    .await?;
                continue;
            }
            send(&mut stream, &option_reply(opt, REP_ACK, &[]), limit).await?;
            let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                // A refused certificate (or none) is a security event: PermissionDenied says so.
                Ok(Err(e)) => {
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("TLS handshake refused: {e}")))
                }
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
            };
            stream = Box::new(tls);
            // Whatever was negotiated in plain text does not carry over.
            st = State { structured: false, meta: None, tls: true };
            continue;
        }
        if opt == OPT_EXPORT_NAME {
            let Ok(name) = std::str::from_utf8(&data) else {
                return Ok(None);
            };
            let Some(export) = ctx.exports.get(name) else {
                debug!(export = name, "unknown export requested with NBD_OPT_EXPORT_NAME; closing");
                return Ok(None);
            };
            let mut b = BytesMut::with_capacity(134);
            b.put_u64(export.device.size_bytes());
            b.put_u16(transmission_flags(&export, st.structured));
            if !no_zeroes {
                b.put_bytes(0, 124);
            }
            send(&mut stream, &b, limit).await?;
            return Ok(Some(finish(stream, export, &st)));
        }
        match handle_option(opt, &data, &mut st, ctx) {
            Reply::Send(b) => send(&mut stream, &b, limit).await?,
            Reply::Go(b, export) => {
                send(&mut stream, &b, limit).await?;
                return Ok(Some(finish(stream, export, &st)));
            }
        }
    }
}

fn finish(stream: BoxStream, export: Arc<Export>, st: &State) -> Negotiated {
    let base_allocation = match &st.meta {
        Some((e, base)) => *base && Arc::ptr_eq(e, &export),
        None => false,
    };
    Negotiated { stream, export, structured: st.structured, base_allocation, tls: st.tls }
}

fn handle_option(opt: u32, data: &[u8], st: &mut State, ctx: &ServerCtx) -> Reply {
    let invalid = |msg: &str| Reply::Send(option_reply(opt, REP_ERR_INVALID, msg.as_bytes()));
    match opt {
        OPT_LIST => {
            if !data.is_empty() {
                return invalid("NBD_OPT_LIST takes no data");
            }
            let mut out = BytesMut::new();
            for e in ctx.exports.list() {
                let mut d = BytesMut::with_capacity(4 + e.config.name.len());
                d.put_u32(e.config.name.len() as u32);
                d.put_slice(e.config.name.as_bytes());
                out.extend_from_slice(&option_reply(opt, REP_SERVER, &d));
            }
            out.extend_from_slice(&option_reply(opt, REP_ACK, &[]));
            Reply::Send(out)
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return invalid("NBD_OPT_STRUCTURED_REPLY takes no data");
            }
            st.structured = true;
            Reply::Send(option_reply(opt, REP_ACK, &[]))
        }
        OPT_INFO | OPT_GO => info_or_go(opt, data, st, ctx),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(opt, data, st, ctx),
        _ => Reply::Send(option_reply(opt, REP_ERR_UNSUP, b"option not supported")),
    }
}

fn info_or_go(opt: u32, data: &[u8], st: &State, ctx: &ServerCtx) -> Reply {
    let invalid = || Reply::Send(option_reply(opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO payload"));
    let mut p = Payload(data);
    let Some(name) = p.string() else { return invalid() };
    let Some(n) = p.u16() else { return invalid() };
    let mut wanted = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let Some(t) = p.u16() else { return invalid() };
        wanted.push(t);
    }
    if !p.is_empty() {
        return invalid();
    }
    let Some(export) = ctx.exports.get(name) else {
        return Reply::Send(option_reply(opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes()));
    };
    let mut out = BytesMut::new();
    let mut info = BytesMut::with_capacity(12);
    info.put_u16(INFO_EXPORT);
    info.put_u64(export.device.size_bytes());
    info.put_u16(transmission_flags(&export, st.structured));
    out.extend_from_slice(&option_reply(opt, REP_INFO, &info));
    // Always tell the block size: the minimum is 1 because this server turns
    // unaligned requests into read-modify-write of whole device blocks.
    let mut bs = BytesMut::with_capacity(14);
    bs.put_u16(INFO_BLOCK_SIZE);
    bs.put_u32(1);
    bs.put_u32(export.device.block_size().max(4096));
    bs.put_u32(ctx.config.max_request_bytes);
    out.extend_from_slice(&option_reply(opt, REP_INFO, &bs));
    if wanted.contains(&INFO_NAME) {
        let mut d = BytesMut::new();
        d.put_u16(INFO_NAME);
        d.put_slice(export.config.name.as_bytes());
        out.extend_from_slice(&option_reply(opt, REP_INFO, &d));
    }
    if wanted.contains(&INFO_DESCRIPTION) && !export.config.description.is_empty() {
        let desc = &export.config.description;
        let mut d = BytesMut::new();
        d.put_u16(INFO_DESCRIPTION);
        d.put_slice(&desc.as_bytes()[..desc.len().min(MAX_STRING_BYTES)]);
        out.extend_from_slice(&option_reply(opt, REP_INFO, &d));
    }
    out.extend_from_slice(&option_reply(opt, REP_ACK, &[]));
    if opt == OPT_GO {
        Reply::Go(out, export)
    } else {
        Reply::Send(out)
    }
}

fn meta_context(opt: u32, data: &[u8], st: &mut State, ctx: &ServerCtx) -> Reply {
    debug!(data = ?String::from_utf8_lossy(data), "meta context");
    let invalid = |msg: &str| Reply::Send(option_reply(opt, REP_ERR_INVALID, msg.as_bytes()));
    if !st.structured {
        return invalid("structured replies must be negotiated first");
    }
    let mut p = Payload(data);
    let Some(name) = p.string() else { return invalid("malformed meta context payload") };
    let Some(n) = p.u32() else { return invalid("malformed meta context payload") };
    let mut queries = Vec::new();
    for _ in 0..n {
        let Some(q) = p.string() else { return invalid("malformed meta context query") };
        queries.push(q);
    }
    if !p.is_empty() {
        return invalid("trailing bytes after meta context queries");
    }
    let Some(export) = ctx.exports.get(name) else {
        return Reply::Send(option_reply(opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes()));
    };
    let mut ctx_reply = BytesMut::new();
    let selected = if opt == OPT_LIST_META_CONTEXT {
        // An empty list asks for everything; "base:" asks for the whole namespace.
        let any = queries.is_empty() || queries.iter().any(|q| *q == "base:" || *q == META_BASE_ALLOCATION);
        // Listing gives no ids (the protocol reserves 0 there).
        ctx_reply.put_u32(0);
        any
    } else {
        let base = queries.contains(&META_BASE_ALLOCATION);
        ctx_reply.put_u32(META_BASE_ALLOCATION_ID);
        st.meta = Some((export, base));
        base
    };
    let mut out = BytesMut::new();
    if selected {
        ctx_reply.put_slice(META_BASE_ALLOCATION.as_bytes());
        out.extend_from_slice(&option_reply(opt, REP_META_CONTEXT, &ctx_reply));
    }
    out.extend_from_slice(&option_reply(opt, REP_ACK, &[]));
    Reply::Send(out)
}
