//! NBD over TLS (NBD_OPT_STARTTLS, rustls): certificates made with rcgen, real
//! GnuTLS clients (libnbd, nbdinfo, qemu-io) with client certificates, and
//! refusal of plain-text and certificate-less clients.

#[path = "nbd_support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use slate::blockdev::MemDevice;
use slate::nbd::{tls::server_config_from_pem, ExportConfig, ServerConfig};
use support::{python_ok, read_option_reply, run_ok, send_option, tcp_stream, unix_stream, TestServer, OPT_GO};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPT_STARTTLS: u32 = 5;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// PEM texts of the test PKI.
#[allow(clippy::struct_field_names)]
struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

fn make_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "slate test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "slate-client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    cp.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let client_cert = cp.signed_by(&client_key, &ca_cert, &ca_key).unwrap();

    Pki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// A GnuTLS-style credentials directory (what libnbd and qemu read).
fn write_client_dir(dir: &Path, pki: &Pki, with_client_cert: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &pki.ca_pem).unwrap();
    if with_client_cert {
        std::fs::write(dir.join("client-cert.pem"), &pki.client_cert_pem).unwrap();
        std::fs::write(dir.join("client-key.pem"), &pki.client_key_pem).unwrap();
    }
}

const SCRIPT: &str = r#"
import sys, nbd
tcp_uri, unix_path, certs, nocert = sys.argv[1:5]

h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(certs)
h.connect_uri(tcp_uri)
assert h.get_tls_negotiated()
h.pwrite(b"T" * 65536, 0)
h.flush()
assert h.pread(65536, 0) == b"T" * 65536
h.shutdown()

h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(certs)
h.set_export_name("vol")
h.connect_unix(unix_path)
assert h.get_tls_negotiated()
assert h.pread(65536, 0) == b"T" * 65536
h.shutdown()

# Plain text is refused by a server that requires TLS.
h = nbd.NBD()
h.set_tls(nbd.TLS_DISABLE)
try:
    h.connect_uri(tcp_uri.replace("nbds://", "nbd://"))
    raise AssertionError("plain-text client was served")
except nbd.Error:
    pass

# So is a client without a certificate.
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(nocert)
try:
    h.connect_uri(tcp_uri)
    h.pread(4096, 0)
    raise AssertionError("client without a certificate was served")
except nbd.Error:
    pass
print("tls checks passed")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_and_refusals() {
    support::init_tracing();
    let pki = make_pki();
    let tls = server_config_from_pem(
        pki.server_cert_pem.as_bytes(),
        pki.server_key_pem.as_bytes(),
        Some(pki.ca_pem.as_bytes()),
    )
    .unwrap();
    let dev = Arc::new(MemDevice::new(8 << 20));
    let srv = TestServer::start(
        vec![(ExportConfig::new("vol"), Arc::clone(&dev) as _)],
        ServerConfig { tls: Some(tls), ..ServerConfig::default() },
    )
    .await;
    let certs = srv.dir.path().join("certs");
    let nocert = srv.dir.path().join("nocert");
    write_client_dir(&certs, &pki, true);
    write_client_dir(&nocert, &pki, false);

    // A raw plain-text client: options are refused with TLS_REQD, EXPORT_NAME hangs up.
    let mut s = tcp_stream(srv.tcp).await;
    s.read_u64().await.unwrap();
    s.read_u64().await.unwrap();
    s.read_u16().await.unwrap();
    s.write_u32(1).await.unwrap();
    send_option(&mut s, OPT_GO, &[0, 0, 0, 3, b'v', b'o', b'l', 0, 0]).await.unwrap();
    assert_eq!(read_option_reply(&mut s, OPT_GO).await.unwrap().0, REP_ERR_TLS_REQD);
    send_option(&mut s, OPT_STARTTLS, b"junk").await.unwrap();
    assert_eq!(read_option_reply(&mut s, OPT_STARTTLS).await.unwrap().0, (1 << 31) + 3);
    send_option(&mut s, 1, b"vol").await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "no export data without TLS");
    // STARTTLS accepted, then garbage instead of a TLS ClientHello: only that connection dies.
    let mut s = unix_stream(&srv.socket).await;
    s.read_u64().await.unwrap();
    s.read_u64().await.unwrap();
    s.read_u16().await.unwrap();
    s.write_u32(1).await.unwrap();
    send_option(&mut s, OPT_STARTTLS, &[]).await.unwrap();
    assert_eq!(read_option_reply(&mut s, OPT_STARTTLS).await.unwrap().0, 1);
    s.write_all(&[0x55; 512]).await.unwrap();
    let _ = s.read_to_end(&mut rest).await;

    let tcp_uri = format!("nbds://localhost:{}/vol", srv.tcp.port());
    let out = python_ok(
        srv.dir.path(),
        "tls_checks.py",
        SCRIPT,
        &[&tcp_uri, srv.socket.to_str().unwrap(), certs.to_str().unwrap(), nocert.to_str().unwrap()],
    )
    .await;
    assert!(out.contains("tls checks passed"), "{out}");

    let info = run_ok("nbdinfo", &[&format!("{tcp_uri}?tls-certificates={}", certs.display())]).await;
    assert!(String::from_utf8_lossy(&info.stdout).contains("export-size: 8388608"));

    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", certs.display());
    let image = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={},export=vol,tls-creds=tls0",
        srv.tcp.port()
    );
    let out = run_ok(
        "qemu-io",
        &["--object", &object, "--image-opts", &image, "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("fail"), "{text}");
    assert!(dev.snapshot()[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0x5a));
    srv.stop().await;
}
