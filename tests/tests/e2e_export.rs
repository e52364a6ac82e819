//! Portable export (issue 9, acceptance 6): `slate export VOL@SNAP` writes a
//! LUKS1 image that qemu-img opens with the passphrase, that compares
//! identical with the snapshot served over NBD (`slate attach VOL@SNAP
//! --read-only`), whose header cryptsetup reads and whose key slot it opens
//! with the passphrase and with nothing else; bad input is refused without
//! changing anything; and a stopped or killed export never leaves a file
//! under the final name.

use serde_json::Value;
use slate_tests::cluster::{nbd_unix_uri, qemu_io_ok, run_ok, Cluster, UpOptions};
use slate_tests::ProcessGuard;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PASSPHRASE: &[u8] = b"correct horse battery staple";

/// Writes `bytes` to `path`, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create the passphrase file");
    std::io::Write::write_all(&mut f, bytes).expect("write the passphrase file");
}

/// `--object secret,... --image-opts driver=luks,...`: `image` opened as LUKS with the passphrase in `pass`.
fn luks_opts(pass: &Path, image: &Path) -> [String; 4] {
    [
        "--object".into(),
        format!("secret,id=sec0,file={}", pass.display()),
        "--image-opts".into(),
        format!("driver=luks,key-secret=sec0,file.filename={}", image.display()),
    ]
}

/// `qemu-io -r` with `-c` commands on `image` opened as LUKS with the passphrase in `pass`.
fn qemu_io_luks(pass: &Path, image: &Path, cmds: &[String]) -> (bool, String) {
    let [obj, secret, image_opts, spec] = luks_opts(pass, image);
    let mut c = Command::new("qemu-io");
    c.args([obj, secret, image_opts, "-r".into()]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(spec).stdin(Stdio::null()).output().expect("run qemu-io");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && !text.contains("fail") && !text.contains("ismatch");
    (ok, text)
}

/// `slate export SPEC --to TO --passphrase-file PASS --pbkdf-iterations 1000 EXTRA... --json`.
fn export_args<'a>(spec: &'a str, to: &'a Path, pass: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--json",
        "export",
        spec,
        "--to",
        to.to_str().expect("utf-8 path"),
        "--passphrase-file",
        pass.to_str().expect("utf-8 path"),
        "--pbkdf-iterations",
        "1000",
    ];
    v.extend_from_slice(extra);
    v
}

fn partial(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", p.display()))
}

#[test]
fn export_opens_with_the_passphrase_and_equals_the_snapshot() {
    let mut cluster = Cluster::start("slate-e2e-export", UpOptions::default());
    let size = UpOptions::default().volume_size_bytes;
    let demo = cluster.nbd_unix();
    // A known pattern at the start, in the middle and in the last block; the rest is never written.
    let last = size - 4096;
    qemu_io_ok(
        &demo,
        &["write -P 0x5a 0 4M".into(), "write -P 0xc3 100M 3M".into(), format!("write -P 0x11 {last} 4k")],
    );
    cluster.slate_ok(&["snapshot", "create", "demo", "s1"]);
    // The head moves on; the export is of the snapshot.
    qemu_io_ok(&demo, &["write -P 0x77 0 1M".into()]);

    let scratch = cluster.scratch().to_owned();
    let pass = scratch.join("passphrase");
    write_private(&pass, PASSPHRASE);
    let image = scratch.join("demo-s1.luks");
    let out = cluster.slate_ok(&export_args("demo@s1", &image, &pass, &[]));
    let report: Value = serde_json::from_str(&out).expect("export prints JSON");
    eprintln!(
        "export of {} MiB: {:.1} MB/s ({:.2} s; header {:.2} s)",
        size >> 20,
        report["mb_per_s"].as_f64().unwrap_or_default(),
        report["seconds"].as_f64().unwrap_or_default(),
        report["header_seconds"].as_f64().unwrap_or_default()
    );
    assert_eq!(report["bytes"], size, "{report}");
    assert_eq!(report["format"], "luks1");
    assert_eq!(report["cipher"], "aes-xts-plain64");
    assert_eq!(report["key_bits"], 512);

    // A private, complete file: 0600, the 2 MiB header and every byte of the volume.
    let meta = std::fs::metadata(&image).expect("the image exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "image mode");
    assert_eq!(meta.len(), size + (2 << 20));
    assert!(!partial(&image).exists(), "a .partial file is left");
    let raw = std::fs::read(&image).expect("read the image");
    assert!(!raw.chunks_exact(4096).any(|w| w == [0x5au8; 4096]), "plaintext in the image");
    drop(raw);

    // qemu-img opens it with the passphrase: the volume's size, and the snapshot's bytes over NBD.
    let mut info = Command::new("qemu-img");
    info.args(["info", "--output=json"]).args(luks_opts(&pass, &image));
    let info: Value = serde_json::from_str(&run_ok(&mut info)).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], size, "{info}");
    assert_eq!(info["format"], "luks", "{info}");
    let (mut snap, sock) = cluster.attach_unix("demo@s1", &["--read-only"], "s1");
    let nbd = format!("driver=nbd,server.type=unix,server.path={},export=s1", sock.display());
    let mut cmp = Command::new("qemu-img");
    cmp.arg("compare").args(luks_opts(&pass, &image)).arg(&nbd);
    let text = run_ok(&mut cmp);
    assert!(text.contains("identical"), "{text}");
    eprintln!("qemu-img compare (LUKS image vs the snapshot over NBD): {}", text.trim());
    snap.terminate();
    // And the content is the snapshot's pattern, not the head's (compare alone would pass on two empty images).
    let reads = [
        "read -P 0x5a 0 4M".to_owned(),
        "read -P 0 4M 96M".into(),
        "read -P 0xc3 100M 3M".into(),
        format!("read -P 0x11 {last} 4k"),
    ];
    let (ok, text) = qemu_io_luks(&pass, &image, &reads);
    assert!(ok, "qemu-io on the image: {text}");
    qemu_io_ok(&demo, &["read -P 0x77 0 1M".into()]);

    // A wrong passphrase opens nothing.
    let wrong = scratch.join("wrong");
    write_private(&wrong, b"correct horse battery stapler");
    let (ok, text) = qemu_io_luks(&wrong, &image, &["read 0 4k".into()]);
    assert!(!ok && text.contains("Invalid password"), "wrong passphrase: {text}");

    // cryptsetup reads the header and opens the key slot with the passphrase only (no
    // device-mapper needed for that).
    let dump = run_ok(Command::new("cryptsetup").arg("luksDump").arg(&image));
    for want in ["Version:       \t1", "Cipher name:   \taes", "xts-plain64", "sha256", "MK bits:       \t512"] {
        assert!(dump.contains(want), "luksDump lacks {want:?}:\n{dump}");
    }
    assert!(dump.contains("Key Slot 0: ENABLED") && dump.contains("Key Slot 1: DISABLED"), "{dump}");
    run_ok(Command::new("cryptsetup").args(["open", "--test-passphrase", "--key-file"]).arg(&pass).arg(&image));
    let no = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&wrong)
        .arg(&image)
        .stdin(Stdio::null())
        .output()
        .expect("run cryptsetup");
    assert!(!no.status.success(), "cryptsetup opened the key slot with a wrong passphrase");

    // The export detached its read-only attachment.
    let atts = cluster.volume_show("demo")["attachments"].as_array().cloned().unwrap_or_default();
    assert_eq!(atts.len(), 1, "attachments left: {atts:?}");
    cluster.stop();
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut cluster = Cluster::start("slate-e2e-export-bad", UpOptions::default());
    let scratch = cluster.scratch().to_owned();
    let tenant = cluster.volume_show("demo")["tenant"].as_u64().expect("tenant").to_string();
    cluster.slate_ok(&["volume", "create", "small", "--size", &(16u64 << 20).to_string(), "--tenant", &tenant]);
    let (mut rw, sock) = cluster.attach_unix("small", &[], "small");
    qemu_io_ok(&nbd_unix_uri("small", &sock), &["write -P 0x42 0 1M".into()]);
    cluster.slate_ok(&["snapshot", "create", "small", "s1"]);
    // A snapshot that stays pending: the volume's read-write client is gone but still attached.
    rw.kill9();
    cluster.slate_ok(&["snapshot", "create", "small", "pending", "--no-wait"]);

    let pass = scratch.join("passphrase");
    write_private(&pass, PASSPHRASE);
    let to = scratch.join("small.luks");
    let attachments = || cluster.volume_show("small")["attachments"].as_array().map_or(0, Vec::len);
    let before = attachments();

    cluster.slate_refused(&export_args("small", &to, &pass, &[]), "names no snapshot");
    cluster.slate_refused(&export_args("small@nosuch", &to, &pass, &[]), "no snapshot named \"nosuch\"");
    cluster.slate_refused(&export_args("nosuch@s1", &to, &pass, &[]), "no volume named");
    cluster.slate_refused(&export_args("small@pending", &to, &pass, &[]), "not ready");
    cluster.slate_refused(&export_args("small@s1", &to, &scratch.join("none"), &[]), "passphrase file");
    let empty = scratch.join("empty");
    write_private(&empty, b"");
    cluster.slate_refused(&export_args("small@s1", &to, &empty, &[]), "empty");
    cluster.slate_refused(&export_args("small@s1", &scratch.join("no/dir/x.luks"), &pass, &[]), "does not exist");
    let mut few = export_args("small@s1", &to, &pass, &[]);
    few[8] = "10";
    cluster.slate_refused(&few, "invalid value '10'");
    assert!(!to.exists() && !partial(&to).exists(), "a refused export left a file");

    // An existing file is kept, unless --force replaces it.
    std::fs::write(&to, b"precious").expect("write a file");
    cluster.slate_refused(&export_args("small@s1", &to, &pass, &[]), "already exists");
    assert_eq!(std::fs::read(&to).expect("read"), b"precious");
    assert_eq!(attachments(), before, "a refused export left an attachment");
    cluster.slate_ok(&export_args("small@s1", &to, &pass, &["--force"]));
    assert_eq!(std::fs::metadata(&to).expect("image").len(), (16 << 20) + (2 << 20));
    let (ok, text) = qemu_io_luks(&pass, &to, &["read -P 0x42 0 1M".into(), "read -P 0 1M 15M".into()]);
    assert!(ok, "qemu-io on the replaced image: {text}");
    assert_eq!(attachments(), before, "the export left its attachment");
    cluster.stop();
}

/// Starts `slate export demo@s0 --to TO` in the background and waits until its partial file holds payload.
fn start_export(cluster: &Cluster, to: &Path, pass: &Path) -> ProcessGuard {
    let mut cmd = cluster.slate();
    cmd.args(&export_args("demo@s0", to, pass, &[])[1..]).stdout(Stdio::null()).stderr(Stdio::inherit());
    let mut p = ProcessGuard::spawn("slate export", &mut cmd).expect("spawn slate export");
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let len = std::fs::metadata(partial(to)).map_or(0, |m| m.len());
        if len > (2 << 20) + (8 << 20) {
            return p;
        }
        assert!(p.is_alive() && !to.exists(), "the export ended before it could be stopped");
        assert!(Instant::now() < deadline, "the export wrote no payload within a minute");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_stopped_export_leaves_no_complete_file() {
    let mut cluster = Cluster::start("slate-e2e-export-stop", UpOptions::default());
    cluster.slate_ok(&["snapshot", "create", "demo", "s0"]);
    let scratch = cluster.scratch().to_owned();
    let pass = scratch.join("passphrase");
    write_private(&pass, PASSPHRASE);
    let to = scratch.join("demo-s0.luks");
    let attachments = || cluster.volume_show("demo")["attachments"].as_array().map_or(0, Vec::len);
    let before = attachments();

    // SIGTERM: the partial file is removed and the attachment released.
    let mut p = start_export(&cluster, &to, &pass);
    let status = p.terminate().expect("slate export exits on SIGTERM");
    assert!(!status.success(), "an interrupted export reported success");
    assert!(!to.exists() && !partial(&to).exists(), "an interrupted export left a file");
    assert_eq!(attachments(), before, "an interrupted export left its attachment");

    // kill -9: only FILE.partial is left, never a file under the final name.
    let mut p = start_export(&cluster, &to, &pass);
    p.kill9();
    assert!(!to.exists(), "a killed export left a file under the final name");
    assert!(partial(&to).exists());
    // Running it again replaces the stale partial file and completes.
    cluster.slate_ok(&export_args("demo@s0", &to, &pass, &[]));
    assert!(!partial(&to).exists());
    let (ok, text) = qemu_io_luks(&pass, &to, &["read -P 0 0 256M".into()]);
    assert!(ok, "qemu-io on the image: {text}");
    cluster.stop();
}
