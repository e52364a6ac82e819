//! Only the attached host gets the volume over NBD:
//! * the unix socket is 0600 in slate up's 0700 directory, and slate up's TCP
//!   listener takes mutual TLS with the client credentials it wrote (qemu-io,
//!   nbdinfo), never plaintext;
//! * `slate attach --nbd-tcp` refuses to serve without mutual TLS unless
//!   `--insecure-plaintext` is given, which is recorded in the audit chain;
//! * with mutual TLS, qemu-io (tls-creds-x509) and libnbd (nbdinfo) with a client
//!   certificate from the trusted CA get in; without a certificate, with one from
//!   another CA, or without TLS at all, they are refused before anything is served.

use slate_tests::cluster::{qemu_io_ok, Cluster, UpOptions};
use slate_tests::free_addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`NAME-ca.pem`, `NAME-ca.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `OUT.pem` / `OUT.key` signed by CA `ca`, for a server or a client.
fn make_cert(dir: &Path, ca: &str, out: &str, server: bool) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{out}.key"),
            "-out",
            &format!("{out}.csr"),
            "-subj",
            &format!("/CN={out}"),
        ],
    );
    let ext = if server {
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    } else {
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    };
    std::fs::write(dir.join(format!("{out}.ext")), ext).expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{out}.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-out",
            &format!("{out}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{out}.ext"),
        ],
    );
}

/// A directory laid out as qemu's tls-creds-x509 and libnbd expect.
fn creds_dir(dir: &Path, name: &str, ca: &str, client: Option<&str>) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::copy(dir.join(format!("{ca}-ca.pem")), d.join("ca-cert.pem")).expect("ca");
    if let Some(c) = client {
        std::fs::copy(dir.join(format!("{c}.pem")), d.join("client-cert.pem")).expect("cert");
        std::fs::copy(dir.join(format!("{c}.key")), d.join("client-key.pem")).expect("key");
        std::fs::set_permissions(d.join("client-key.pem"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    d
}

fn qemu_io_tls(creds: &Path, port: u16, export: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.args(["60", "qemu-io", "--object"])
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display()))
        .arg("--image-opts");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port={port},file.export={export},file.tls-creds=tls0"
    ));
    c.output().expect("run qemu-io")
}

fn ok(o: &Output) -> bool {
    let text = String::from_utf8_lossy(&o.stdout).to_lowercase() + &String::from_utf8_lossy(&o.stderr).to_lowercase();
    o.status.success() && !text.contains("failed") && !text.contains("pattern verification")
}

#[test]
fn nbd_serves_only_the_attached_host() {
    let mut cluster =
        Cluster::start("slate-e2e-nbdauth", UpOptions { volume_size_bytes: 64 << 20, ..UpOptions::default() });
    assert_eq!(mode(cluster.dir()), 0o700, "slate up's directory");
    assert_eq!(mode(&cluster.nbd_socket()), 0o600, "the NBD unix socket");
    // slate up's own TCP listener: mutual TLS with the client credentials it wrote.
    let creds = cluster.volume().tls_creds_dir.clone().expect("slate up names its client credentials");
    assert_eq!(mode(&creds), 0o700);
    assert_eq!(mode(&creds.join("client-key.pem")), 0o600);
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        assert!(creds.join(f).exists(), "{f} missing from {}", creds.display());
    }
    let up_tcp = cluster.nbd_tcp();
    assert!(up_tcp.starts_with("nbds://"), "{up_tcp}");
    qemu_io_ok(&up_tcp, &["write -P 0x3c 0 1M".into(), "read -P 0x3c 0 1M".into()]);
    let o = Command::new("nbdinfo").arg("--size").arg(&up_tcp).output().expect("nbdinfo");
    assert!(o.status.success(), "nbdinfo with slate up's credentials: {}", String::from_utf8_lossy(&o.stderr));
    let plain = up_tcp.replacen("nbds://", "nbd://", 1);
    let plain = plain.split('?').next().unwrap_or_default().to_owned();
    let o = Command::new("nbdinfo").arg("--size").arg(&plain).output().expect("nbdinfo");
    assert!(!o.status.success(), "slate up's TCP listener served a client without TLS");
    let audit = cluster.slate_json(&["audit", "list"]).to_string();
    assert!(!audit.contains("nbd:insecure-plaintext-tcp"), "slate up served TCP in plaintext");

    // Refused before anything is attached.
    let tmp = cluster.scratch().join("pki");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    make_ca(&tmp, "good");
    make_ca(&tmp, "other");
    make_cert(&tmp, "good", "server", true);
    make_cert(&tmp, "good", "client", false);
    make_cert(&tmp, "other", "stranger", false);
    let (cert, key, ca) = (tmp.join("server.pem"), tmp.join("server.key"), tmp.join("good-ca.pem"));
    let tcp = free_addr();
    let addr = tcp.to_string();
    cluster.slate_refused(&["attach", "demo", "--nbd-tcp", &addr], "--tls-client-ca");
    cluster.slate_refused(
        &[
            "attach",
            "demo",
            "--nbd-tcp",
            &addr,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        "--tls-client-ca",
    );

    // A volume served over TCP with mutual TLS.
    let tenant = cluster.volume_show("demo")["tenant"].as_u64().expect("tenant").to_string();
    cluster.slate_json(&["volume", "create", "v2", "--size", "67108864", "--replicas", "2", "--tenant", &tenant]);
    let (mut guard, _sock) = cluster.attach_unix(
        "v2",
        &[
            "--nbd-tcp",
            &addr,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-client-ca",
            ca.to_str().unwrap(),
        ],
        "v2",
    );
    let good = creds_dir(&tmp, "good-creds", "good", Some("client"));
    let stranger = creds_dir(&tmp, "stranger-creds", "good", Some("stranger"));
    let anonymous = creds_dir(&tmp, "no-client-cert", "good", None);

    let o = qemu_io_tls(&good, tcp.port(), "v2", &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    assert!(
        ok(&o),
        "qemu-io with the client certificate: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let nbdinfo = |creds: &Path| {
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbds://{addr}/v2?tls-certificates={}", creds.display()))
            .output()
            .expect("run nbdinfo")
    };
    let o = nbdinfo(&good);
    assert!(o.status.success(), "libnbd with the client certificate: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "67108864");

    for (who, creds) in [("a certificate from another CA", &stranger), ("no client certificate", &anonymous)] {
        let o = qemu_io_tls(creds, tcp.port(), "v2", &["read -P 0x5a 0 1M"]);
        assert!(!ok(&o), "qemu-io with {who} was served");
        let o = nbdinfo(creds);
        assert!(!o.status.success(), "libnbd with {who} was served");
        eprintln!("refused as expected ({who}): {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(format!("nbd://{addr}/v2"))
        .output()
        .expect("qemu-io");
    assert!(!ok(&o), "qemu-io without TLS was served");
    // Acceptance 7: the certificate refusals were reported to slate-meta, with the source address.
    let r = cluster.wait_for_security_event("security.nbd-certificate-refused", "127.0.0.1", Duration::from_mins(1));
    eprintln!("audit: {r}");
    let series = "slate_meta_security_events_total{kind=\"nbd-certificate-refused\",source=\"127.0.0.1\"}";
    let n = cluster.meta_metric_sum(series);
    assert!(n >= 2.0, "{series} = {n}, fewer than the refused clients");
    guard.terminate();

    // --insecure-plaintext serves, and says so in the audit chain.
    cluster.slate_json(&["volume", "create", "v3", "--size", "67108864", "--replicas", "2", "--tenant", &tenant]);
    let plain = free_addr().to_string();
    let (mut guard, _sock) = cluster.attach_unix("v3", &["--nbd-tcp", &plain, "--insecure-plaintext"], "v3");
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 4k"])
        .arg(format!("nbd://{plain}/v3"))
        .output()
        .expect("qemu-io");
    assert!(ok(&o), "the insecure listener: {}", String::from_utf8_lossy(&o.stderr));
    let v3 = cluster.volume_show("v3")["id"].as_u64().expect("id");
    let audit = cluster.slate_json(&["audit", "list"]);
    assert!(
        audit["records"].as_array().into_iter().flatten().any(|r| r["object"]
            .as_str()
            .is_some_and(|o| o.contains(&format!("vol-{v3} ")) && o.contains("nbd:insecure-plaintext-tcp"))),
        "the insecure attach of v3 is not in the audit chain"
    );
    guard.terminate();
    cluster.stop();
}
