//! Precise protocol checks through python3-libnbd (the reference NBD client
//! library): negotiated features and block sizes, structured replies, DF reads,
//! block status, FAST_ZERO, out-of-range and invalid requests (client-side
//! checks off, so the server must answer them), unaligned I/O, simple replies,
//! the old EXPORT_NAME path, option mode (LIST, INFO, LIST_META_CONTEXT), and
//! multi-conn.

#[path = "nbd_support.rs"]
mod support;

use std::sync::Arc;

use slate::blockdev::{BlockDevice, MemDevice};
use slate::nbd::{ExportConfig, ServerConfig};
use support::{python_ok, TestServer};

const MIB: u64 = 1 << 20;

const SCRIPT: &str = r#"
import errno, sys, nbd

uri_vol, uri_ro, uri_nofast, uri_list = sys.argv[1:5]
SIZE = 16 << 20

def expect_err(code, fn, *a):
    try:
        fn(*a)
    except nbd.Error as e:
        got = getattr(errno, e.errno) if isinstance(e.errno, str) else e.errno
        assert got == code, "%s: errno %s (%s), wanted %d" % (fn.__name__, e.errno, e.string, code)
        return
    raise AssertionError("%s%r should have failed with %d" % (fn.__name__, a, code))

# --- negotiated features
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri_vol)
assert h.get_protocol() == "newstyle-fixed", h.get_protocol()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
for f in ("can_multi_conn", "can_fast_zero", "can_df", "can_trim", "can_zero", "can_flush", "can_fua"):
    assert getattr(h, f)(), f
assert not h.is_read_only()
assert h.get_size() == SIZE
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20

# --- unaligned I/O keeps neighbours intact
data = bytes((i * 7 + 3) & 0xff for i in range(10000))
h.pwrite(data, 12345)
assert h.pread(10000, 12345) == data
assert h.pread(12345, 0) == bytes(12345)
assert h.pread(100, 22345) == bytes(100)

# --- FUA write, DF read: exactly one data chunk
h.pwrite(b"\x42" * 4096, 65536, nbd.CMD_FLAG_FUA)
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
got = h.pread_structured(4096, 65536, chunk, nbd.CMD_FLAG_DF)
assert got == b"\x42" * 4096
assert chunks == [(65536, 4096, nbd.READ_DATA)], chunks

# --- block status after trim / zero / write
h.trim(1 << 20, 1 << 20)
h.zero(1 << 20, 2 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.pwrite(b"x" * 8192, 3 << 20)
h.zero(65536, 4 << 20, nbd.CMD_FLAG_NO_HOLE)
ext = []
def status(meta, off, entries, err):
    assert meta == nbd.CONTEXT_BASE_ALLOCATION
    ext.extend(zip(entries[0::2], entries[1::2]))
    return 0
h.block_status(5 << 20, 0, status)
HOLE_ZERO, DATA, ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO, 0, nbd.STATE_ZERO
want = [(12288, HOLE_ZERO), (12288, DATA), (40960, HOLE_ZERO), (4096, DATA),
        ((3 << 20) - 69632, HOLE_ZERO), (8192, DATA), ((1 << 20) - 8192, HOLE_ZERO),
        (65536, ZERO), ((1 << 20) - 65536, HOLE_ZERO)]
assert ext == want, ext
assert h.pread(8192, 3 << 20) == b"x" * 8192
assert h.pread(65536, 4 << 20) == bytes(65536)

# --- requests the server must refuse (libnbd's own checks switched off)
h.set_strict_mode(0)
expect_err(errno.EINVAL, h.pread, 8192, SIZE - 4096)
expect_err(errno.EINVAL, h.pread, 1, SIZE)
expect_err(errno.ENOSPC, h.pwrite, b"a" * 8192, SIZE - 4096)
expect_err(errno.EINVAL, h.trim, 8192, SIZE - 4096)
expect_err(errno.ENOSPC, h.zero, 8192, SIZE - 4096)
expect_err(errno.EINVAL, h.pread, 4096, 0, nbd.CMD_FLAG_REQ_ONE)
expect_err(errno.EINVAL, h.pwrite, b"a", 0, nbd.CMD_FLAG_NO_HOLE)
expect_err(errno.EINVAL, h.pread, (32 << 20) + 1, 0)
assert h.pread(10000, 12345) == data
h.flush()
h.shutdown()

# --- read-only export
h = nbd.NBD()
h.connect_uri(uri_ro)
assert h.is_read_only()
h.set_strict_mode(0)
expect_err(errno.EPERM, h.pwrite, b"a" * 4096, 0)
expect_err(errno.EPERM, h.trim, 4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.shutdown()

# --- a device that cannot zero fast
h = nbd.NBD()
h.connect_uri(uri_nofast)
assert h.can_fast_zero()
expect_err(errno.ENOTSUP, h.zero, 65536, 0, nbd.CMD_FLAG_FAST_ZERO)
h.pwrite(b"q" * 4096, 0)
h.zero(65536, 0)
assert h.pread(4096, 0) == bytes(4096)
h.shutdown()

# --- simple replies only (no structured replies)
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri_vol)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert h.pread(10000, 12345) == data
h.set_strict_mode(0)
expect_err(errno.EINVAL, h.pread, 8192, SIZE - 4096)
assert h.pread(10000, 12345) == data
h.shutdown()

# --- old style: non-fixed newstyle, NBD_OPT_EXPORT_NAME, 124 zero bytes
h = nbd.NBD()
h.set_handshake_flags(0)
h.connect_uri(uri_vol)
assert h.get_protocol() == "newstyle", h.get_protocol()
assert h.get_size() == SIZE
assert h.pread(10000, 12345) == data
h.shutdown()

# --- option mode: LIST, INFO, LIST_META_CONTEXT, unknown export, ABORT
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(uri_list)
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
assert sorted(names) == ["nofast", "ro", "vol"], names
h.set_export_name("vol")
h.opt_info()
assert h.get_size() == SIZE
assert h.get_export_description() == "sixteen megabytes", h.get_export_description()
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert ctxs == ["base:allocation"], ctxs
h.set_export_name("missing")
try:
    h.opt_info()
    raise AssertionError("opt_info of a missing export succeeded")
except nbd.Error:
    pass
h.set_export_name("vol")
h.opt_go()
assert h.pread(10000, 12345) == data
h.shutdown()
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri_list)
h.opt_abort()

# --- STARTTLS offered by a client, refused by a server without TLS: plain text goes on
h = nbd.NBD()
h.set_tls(nbd.TLS_ALLOW)
h.connect_uri(uri_vol)
assert not h.get_tls_negotiated()
assert h.pread(10000, 12345) == data
h.shutdown()

# --- multi-conn: a write through one connection is seen by another after flush
a = nbd.NBD(); a.connect_uri(uri_vol)
b = nbd.NBD(); b.connect_uri(uri_vol)
a.pwrite(b"m" * 65536, 8 << 20)
a.flush()
assert b.pread(65536, 8 << 20) == b"m" * 65536
a.shutdown(); b.shutdown()
print("libnbd checks passed")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_protocol_checks() {
    support::init_tracing();
    let exports: Vec<(ExportConfig, Arc<dyn BlockDevice>)> = vec![
        (
            ExportConfig { description: "sixteen megabytes".into(), ..ExportConfig::new("vol") },
            Arc::new(MemDevice::new(16 * MIB)),
        ),
        (ExportConfig { read_only: true, ..ExportConfig::new("ro") }, Arc::new(MemDevice::new(MIB))),
        (ExportConfig::new("nofast"), Arc::new(MemDevice::new(MIB).with_fast_zero(false))),
    ];
    let srv = TestServer::start(exports, ServerConfig::default()).await;
    for (vol, ro, nofast) in [
        (srv.unix_uri("vol"), srv.unix_uri("ro"), srv.unix_uri("nofast")),
        (srv.tcp_uri("vol"), srv.tcp_uri("ro"), srv.tcp_uri("nofast")),
    ] {
        // Each pass starts from an empty "vol".
        srv.server.exports().remove("vol");
        srv.server
            .exports()
            .add(
                ExportConfig { description: "sixteen megabytes".into(), ..ExportConfig::new("vol") },
                Arc::new(MemDevice::new(16 * MIB)),
            )
            .unwrap();
        let list = if vol.starts_with("nbd+unix") {
            format!("nbd+unix:///?socket={}", srv.socket.display())
        } else {
            format!("nbd://127.0.0.1:{}/", srv.tcp.port())
        };
        let out = python_ok(srv.dir.path(), "libnbd_checks.py", SCRIPT, &[&vol, &ro, &nofast, &list]).await;
        assert!(out.contains("libnbd checks passed"), "{out}");
    }
    srv.stop().await;
}
