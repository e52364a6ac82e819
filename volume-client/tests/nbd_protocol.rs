//! Byte-level NBD protocol tests with a raw client: write ordering, protocol
//! errors for bad requests, garbage and truncated handshakes on TCP and unix
//! sockets while other clients keep being served, and graceful shutdown.

#[path = "nbd_support.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use slate::blockdev::{BlockDevice, DevError, DevFuture, Extent, MemDevice};
use slate::nbd::{ExportConfig, ServerConfig};
use support::{
    pattern, read_option_reply, send_option, tcp_stream, unix_stream, RawClient, Stream, TestServer, CMD_BLOCK_STATUS,
    CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, ENOSPC, ENOTSUP, EPERM, IHAVEOPT, NBDMAGIC,
    OPT_GO, REP_ACK,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

fn mem(size: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(size))
}

async fn standard_server(config: ServerConfig) -> (TestServer, Arc<MemDevice>) {
    support::init_tracing();
    let slow = Arc::new(MemDevice::new(16 * MIB).with_write_delay(Duration::from_millis(20)));
    let exports: Vec<(ExportConfig, Arc<dyn BlockDevice>)> = vec![
        (ExportConfig::new("vol"), mem(16 * MIB)),
        (ExportConfig::new("slow"), Arc::clone(&slow) as Arc<dyn BlockDevice>),
        (ExportConfig { read_only: true, ..ExportConfig::new("ro") }, mem(MIB)),
        (ExportConfig::new("nofast"), Arc::new(MemDevice::new(MIB).with_fast_zero(false))),
    ];
    (TestServer::start(exports, config).await, slow)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_pipelined_writes_apply_in_arrival_order() {
    let (srv, _) = standard_server(ServerConfig::default()).await;
    let mut c = RawClient::go(unix_stream(&srv.socket).await, "slow", true, false).await.unwrap();
    // The slow device delays writes at lower offsets longer, so without ordering
    // the second write would land first and be overwritten by the first.
    c.send(CMD_WRITE, 0, 1, 0, 8192, &[0xaa; 8192]).await;
    c.send(CMD_WRITE, 0, 2, 4096, 8192, &[0xbb; 8192]).await;
    for _ in 0..2 {
        assert_eq!(c.reply().await.unwrap().error, 0);
    }
    let r = c.read(0, 12288).await;
    assert_eq!(r.error, 0);
    assert!(r.data[..4096].iter().all(|x| *x == 0xaa));
    assert!(r.data[4096..].iter().all(|x| *x == 0xbb));

    // Eight unaligned 512-byte writes into one 4 KiB block, pipelined: each is a
    // read-modify-write of the same device block; none may be lost.
    for i in 0..8u64 {
        let off = MIB + i * 512;
        c.send(CMD_WRITE, 0, 10 + i, off, 512, &pattern(i as u8, off, 512)).await;
    }
    for _ in 0..8 {
        assert_eq!(c.reply().await.unwrap().error, 0);
    }
    let r = c.read(MIB, 4096).await;
    for i in 0..8u64 {
        let off = MIB + i * 512;
        assert_eq!(&r.data[(i * 512) as usize..((i + 1) * 512) as usize], &pattern(i as u8, off, 512)[..]);
    }

    // Unaligned read and write across block boundaries keep the neighbours.
    let w = pattern(7, 2 * MIB + 1000, 10_000);
    assert_eq!(c.write(2 * MIB + 1000, &w).await.error, 0);
    let r = c.read(2 * MIB, 12_000).await;
    assert!(r.data[..1000].iter().all(|x| *x == 0));
    assert_eq!(&r.data[1000..11_000], &w[..]);
    assert!(r.data[11_000..].iter().all(|x| *x == 0));
    c.disconnect().await;
    srv.stop().await;
}

async fn check_errors(mut c: RawClient, size: u64) {
    let structured = c.structured;
    let expect_err = |r: &support::Reply, code: u32, what: &str| {
        assert_eq!(r.error, code, "{what}: expected errno {code}, got {r:?}");
        if structured {
            assert!(r.chunks.contains(&0x8001), "{what}: error chunk expected");
        }
    };
    let r = c.read(size - 4096, 8192).await;
    expect_err(&r, EINVAL, "read past the end");
    let r = c.read(u64::MAX - 10, 4096).await;
    expect_err(&r, EINVAL, "read with offset overflow");
    let r = c.write(size - 512, &[1u8; 1024]).await;
    expect_err(&r, ENOSPC, "write past the end");
    // An oversized write: the payload is consumed, the error returned, the stream stays in sync.
    let big = vec![3u8; (32 << 20) + 4096];
    c.send(CMD_WRITE, 0, 5, 0, big.len() as u32, &big).await;
    expect_err(&c.reply().await.unwrap(), EINVAL, "write over the maximum block size");
    c.send(CMD_READ, 0, 6, 0, (32 << 20) + 1, &[]).await;
    expect_err(&c.reply().await.unwrap(), EINVAL, "read over the maximum block size");
    c.send(42, 0, 7, 0, 4096, &[]).await;
    expect_err(&c.reply().await.unwrap(), EINVAL, "unknown command");
    c.send(CMD_READ, 0x40, 8, 0, 4096, &[]).await;
    expect_err(&c.reply().await.unwrap(), EINVAL, "unknown command flag");
    c.send(CMD_FLUSH, 1 << 3, 9, 0, 0, &[]).await;
    expect_err(&c.reply().await.unwrap(), EINVAL, "flag not valid for flush");
    c.send(CMD_BLOCK_STATUS, 0, 10, 0, 4096, &[]).await;
    expect_err(&c.reply().await.unwrap(), EINVAL, "block status without a meta context");
    c.send(CMD_TRIM, 0, 11, size, 4096, &[]).await;
    expect_err(&c.reply().await.unwrap(), EINVAL, "trim past the end");
    c.send(CMD_WRITE_ZEROES, 0, 12, size - 4096, 8192, &[]).await;
    expect_err(&c.reply().await.unwrap(), ENOSPC, "write zeroes past the end");
    // After all that, the connection still works.
    let data = pattern(9, 4096, 4096);
    assert_eq!(c.write(4096, &data).await.error, 0);
    let r = c.read(4096, 4096).await;
    assert_eq!(r.error, 0);
    assert_eq!(r.data, data);
    c.send(CMD_FLUSH, 0, 13, 0, 0, &[]).await;
    assert_eq!(c.reply().await.unwrap().error, 0);
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_protocol_errors_and_the_connection_survives() {
    let (srv, _) = standard_server(ServerConfig::default()).await;
    for structured in [false, true] {
        let c = RawClient::go(unix_stream(&srv.socket).await, "vol", structured, false).await.unwrap();
        let size = c.size;
        assert_eq!(size, 16 * MIB);
        check_errors(c, size).await;
        let c = RawClient::go(tcp_stream(srv.tcp).await, "vol", structured, false).await.unwrap();
        check_errors(c, size).await;
    }
    // Read-only export: writes, trims and zeroes are refused with EPERM.
    let mut c = RawClient::go(unix_stream(&srv.socket).await, "ro", true, false).await.unwrap();
    assert_ne!(c.flags & 2, 0, "NBD_FLAG_READ_ONLY");
    assert_eq!(c.write(0, &[1u8; 4096]).await.error, EPERM);
    c.send(CMD_TRIM, 0, 3, 0, 4096, &[]).await;
    assert_eq!(c.reply().await.unwrap().error, EPERM);
    assert_eq!(c.read(0, 4096).await.error, 0);
    c.disconnect().await;
    // A device that cannot zero fast answers FAST_ZERO with ENOTSUP, plain zeroing works.
    let mut c = RawClient::go(unix_stream(&srv.socket).await, "nofast", true, false).await.unwrap();
    c.send(CMD_WRITE_ZEROES, 1 << 4, 4, 0, 65536, &[]).await;
    assert_eq!(c.reply().await.unwrap().error, ENOTSUP);
    c.send(CMD_WRITE_ZEROES, 0, 5, 0, 65536, &[]).await;
    assert_eq!(c.reply().await.unwrap().error, 0);
    c.disconnect().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_reports_holes_zeroes_and_data() {
    let (srv, _) = standard_server(ServerConfig::default()).await;
    let mut c = RawClient::go(tcp_stream(srv.tcp).await, "vol", true, true).await.unwrap();
    assert_eq!(c.write(MIB, &vec![5u8; 65536]).await.error, 0);
    c.send(CMD_WRITE_ZEROES, 1 << 1, 2, 2 * MIB, 65536, &[]).await; // NO_HOLE
    assert_eq!(c.reply().await.unwrap().error, 0);
    c.send(CMD_BLOCK_STATUS, 0, 3, 0, (4 * MIB) as u32, &[]).await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(
        r.status,
        vec![(MIB as u32, 3), (65536, 0), ((MIB - 65536) as u32, 3), (65536, 2), ((2 * MIB - 65536) as u32, 3)]
    );
    // Unaligned query, and REQ_ONE.
    c.send(CMD_BLOCK_STATUS, 1 << 3, 4, MIB + 100, 100_000, &[]).await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.status, vec![(65536 - 100, 0)]);
    c.send(CMD_BLOCK_STATUS, 0, 5, 16 * MIB - 4096, 8192, &[]).await;
    assert_eq!(c.reply().await.unwrap().error, EINVAL);
    c.disconnect().await;
    srv.stop().await;
}

/// A connection that misbehaves must be closed by the server (reads reach EOF).
async fn expect_closed(mut s: Box<dyn Stream>, what: &str) {
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut sink)).await.is_ok();
    assert!(closed, "{what}: the server did not close the connection");
}

async fn after_hello(mut s: Box<dyn Stream>) -> Box<dyn Stream> {
    assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    s.read_u16().await.unwrap();
    s
}

async fn misbehave<F, Fut>(connect: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Box<dyn Stream>>,
{
    // Garbage at once.
    let mut s = connect().await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    let _ = s.write_all(&garbage).await;
    expect_closed(s, "garbage").await;
    // Unknown client flags.
    let mut s = after_hello(connect().await).await;
    s.write_u32(0xffff_0000).await.unwrap();
    expect_closed(s, "bad client flags").await;
    // Bad option magic.
    let mut s = after_hello(connect().await).await;
    s.write_u32(1).await.unwrap();
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await.unwrap();
    expect_closed(s, "bad option magic").await;
    // Absurd option length.
    let mut s = after_hello(connect().await).await;
    s.write_u32(1).await.unwrap();
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u32(OPT_GO).await.unwrap();
    s.write_u32(0x4000_0000).await.unwrap();
    expect_closed(s, "huge option").await;
    // Truncated option header, then the client stops sending.
    let mut s = after_hello(connect().await).await;
    s.write_u32(1).await.unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
    s.shutdown().await.unwrap();
    expect_closed(s, "truncated option").await;
    // Silence: the handshake times out.
    let s = connect().await;
    expect_closed(s, "silent client").await;
    // Truncated GO payload (length says more than the option carries): NBD_REP_ERR_INVALID.
    let mut s = after_hello(connect().await).await;
    s.write_u32(1).await.unwrap();
    send_option(&mut s, OPT_GO, &[0, 0, 0, 200, b'v']).await.unwrap();
    let (rep, _) = read_option_reply(&mut s, OPT_GO).await.unwrap();
    assert_eq!(rep, (1 << 31) + 3, "NBD_REP_ERR_INVALID");
    // Unknown option: NBD_REP_ERR_UNSUP; unknown export: NBD_REP_ERR_UNKNOWN; the session goes on.
    send_option(&mut s, 99, b"whatever").await.unwrap();
    assert_eq!(read_option_reply(&mut s, 99).await.unwrap().0, (1 << 31) + 1);
    send_option(&mut s, OPT_GO, &[0, 0, 0, 4, b'n', b'o', b'n', b'e', 0, 0]).await.unwrap();
    assert_eq!(read_option_reply(&mut s, OPT_GO).await.unwrap().0, (1 << 31) + 6);
    send_option(&mut s, OPT_GO, &[0, 0, 0, 3, b'v', b'o', b'l', 0, 0]).await.unwrap();
    loop {
        let (rep, _) = read_option_reply(&mut s, OPT_GO).await.unwrap();
        if rep == REP_ACK {
            break;
        }
    }
    // Transmission phase, then a request with a bad magic: the server hangs up.
    s.write_all(&[0xde; 28]).await.unwrap();
    expect_closed(s, "bad request magic").await;
    // NBD_OPT_EXPORT_NAME of an unknown export: the server hangs up.
    let mut s = after_hello(connect().await).await;
    s.write_u32(1).await.unwrap();
    send_option(&mut s, 1, b"nope").await.unwrap();
    expect_closed(s, "unknown export name").await;
    // Truncated write payload in transmission, then EOF.
    let mut c = RawClient::go(connect().await, "vol", false, false).await.unwrap();
    let mut hdr = Vec::new();
    hdr.extend(support::REQUEST_MAGIC.to_be_bytes());
    hdr.extend(0u16.to_be_bytes());
    hdr.extend(CMD_WRITE.to_be_bytes());
    hdr.extend(1u64.to_be_bytes());
    hdr.extend(0u64.to_be_bytes());
    hdr.extend(65536u32.to_be_bytes());
    hdr.extend([1u8; 1000]);
    c.s.write_all(&hdr).await.unwrap();
    c.s.shutdown().await.unwrap();
    expect_closed(c.s, "truncated write payload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_handshakes_leave_other_clients_served() {
    let config = ServerConfig { handshake_timeout: Duration::from_secs(2), ..ServerConfig::default() };
    let (srv, _) = standard_server(config).await;
    let mut before_unix = RawClient::go(unix_stream(&srv.socket).await, "vol", true, false).await.unwrap();
    let mut before_tcp = RawClient::go(tcp_stream(srv.tcp).await, "vol", false, false).await.unwrap();
    let data = pattern(1, 0, 65536);
    assert_eq!(before_unix.write(0, &data).await.error, 0);

    let sock = srv.socket.clone();
    misbehave(|| unix_stream(&sock)).await;
    assert_eq!(before_unix.read(0, 65536).await.data, data);
    assert_eq!(before_tcp.read(0, 65536).await.data, data);
    let addr = srv.tcp;
    misbehave(|| tcp_stream(addr)).await;
    assert_eq!(before_unix.read(0, 65536).await.data, data);
    assert_eq!(before_tcp.read(0, 65536).await.data, data);

    let mut after = RawClient::go(tcp_stream(srv.tcp).await, "vol", true, false).await.unwrap();
    assert_eq!(after.read(0, 65536).await.data, data);
    after.disconnect().await;
    before_unix.disconnect().await;
    before_tcp.disconnect().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests_and_flushes() {
    let (srv, slow) = standard_server(ServerConfig::default()).await;
    let mut c = RawClient::go(unix_stream(&srv.socket).await, "slow", true, false).await.unwrap();
    for i in 0..4u64 {
        c.send(CMD_WRITE, 0, i, i * 65536, 65536, &pattern(i as u8, i * 65536, 65536)).await;
    }
    // Once the read (sent last, not delayed) is answered, the server has read
    // every request; the writes are still in flight on the slow device.
    c.send(CMD_READ, 0, 100, 8 * MIB, 4096, &[]).await;
    assert_eq!(c.reply().await.unwrap().cookie, 100);
    let flushes_before = slow.flush_count();
    let server = srv.server.clone();
    let stopping = tokio::spawn(async move { server.shutdown().await });
    let mut got = 0;
    while let Ok(r) = c.reply().await {
        assert_eq!(r.error, 0, "in-flight request failed at shutdown: {r:?}");
        got += 1;
        if got == 4 {
            break;
        }
    }
    assert_eq!(got, 4, "every in-flight request was answered");
    stopping.await.unwrap();
    assert!(slow.flush_count() > flushes_before, "shutdown flushes the exports");
    let snap = slow.snapshot();
    for i in 0..4u64 {
        let at = (i * 65536) as usize;
        assert_eq!(&snap[at..at + 65536], &pattern(i as u8, i * 65536, 65536)[..]);
    }
    // The listeners are gone: new clients cannot get an export.
    match tokio::net::UnixStream::connect(&srv.socket).await {
        Err(_) => {}
        Ok(s) => expect_closed(Box::new(s), "connection after shutdown").await,
    }
    srv.stop().await;
}

/// A device whose reads at offset 0 panic (a bug), and whose writes fail with an I/O error.
struct Faulty(MemDevice);

impl BlockDevice for Faulty {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn read(&self, offset: u64, len: u32) -> DevFuture<'_, Bytes> {
        assert!(offset != 0, "simulated bug in a device");
        self.0.read(offset, len)
    }
    fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> DevFuture<'_, ()> {
        Box::pin(async { Err(DevError::Io("simulated media error".into())) })
    }
    fn flush(&self) -> DevFuture<'_, ()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> DevFuture<'_, ()> {
        self.0.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DevFuture<'_, ()> {
        self.0.write_zeroes(offset, len, no_hole)
    }
    fn block_status(&self, offset: u64, len: u32) -> DevFuture<'_, Vec<Extent>> {
        self.0.block_status(offset, len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_errors_and_panics_fail_only_their_request() {
    support::init_tracing();
    let faulty: Arc<dyn BlockDevice> = Arc::new(Faulty(MemDevice::new(MIB)));
    let config = ServerConfig { max_connections: 2, ..ServerConfig::default() };
    let srv = TestServer::start(vec![(ExportConfig::new("faulty"), faulty)], config).await;
    let mut c = RawClient::go(unix_stream(&srv.socket).await, "faulty", true, false).await.unwrap();
    assert_eq!(c.write(4096, &[1u8; 4096]).await.error, 5, "EIO from a failed write");
    assert_eq!(c.read(0, 4096).await.error, 5, "EIO from a panicking read");
    assert_eq!(c.read(4096, 4096).await.error, 0, "the connection goes on");
    // Connection limit: the second is served, the third is closed at once.
    let mut second = RawClient::go(tcp_stream(srv.tcp).await, "faulty", false, false).await.unwrap();
    expect_closed(tcp_stream(srv.tcp).await, "connection over the limit").await;
    assert_eq!(second.read(8192, 4096).await.error, 0);
    second.disconnect().await;
    c.disconnect().await;
    srv.stop().await;
}
