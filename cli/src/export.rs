//! `slate export VOL@SNAP --to FILE --passphrase-file P`: a ready snapshot as a
//! LUKS1 image (`aes-xts-plain64`, 512-bit key, SHA-256) that standard tools
//! open with the passphrase, e.g.
//! `qemu-img convert --object secret,id=s,file=P --image-opts driver=luks,key-secret=s,file.filename=FILE out.raw`.
//!
//! Everything that can be checked before the snapshot is attached is checked
//! first, and a refusal changes nothing: the spec names a snapshot, `FILE`
//! does not exist (unless `--force`), its directory does, the passphrase file
//! is readable and not empty. Then the snapshot is attached read-only (a
//! missing or not-ready snapshot is refused there, before any attachment is
//! made), its size is checked against the free space, and
//! [`slate::export::image`] writes the image. The attachment is closed and
//! detached on every way out, SIGINT and SIGTERM included (which also remove
//! `FILE.partial`). The passphrase is read into zeroized memory and never
//! printed or logged.

use super::attach::{open_volume, shutdown_signal, CONTROL_PATIENCE};
use super::open;
use anyhow::{bail, Context, Result};
use serde_json::json;
use slate::api::ApiClient;
use slate::export::image::{self, partial_path, ImageOptions};
use slate::export::luks;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

/// The longest passphrase file read (cryptsetup's default key file limit).
const MAX_PASSPHRASE_BYTES: u64 = 8 << 20;
/// The default key slot work: PBKDF2 for about this long on this machine...
const DEFAULT_KDF_TIME: Duration = Duration::from_secs(1);
/// ...and never fewer iterations than this.
const DEFAULT_MIN_ITERATIONS: u32 = 100_000;

/// Options of `slate export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The snapshot to export, as VOLUME@SNAPSHOT (it must be ready).
    pub snapshot: String,
    /// The image file to write (written as FILE.partial, renamed when complete).
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// A file holding the passphrase that opens the image: its bytes exactly (a trailing
    /// newline is part of it), as QEMU's secret object and cryptsetup --key-file read them.
    #[arg(long, value_name = "P")]
    pub passphrase_file: PathBuf,
    /// PBKDF2-SHA256 iterations of the key slot (default: what takes about 1 s here, at
    /// least 100000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(i64::from(luks::MIN_ITERATIONS)..))]
    pub pbkdf_iterations: Option<u32>,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// This host's name, recorded with the read-only attachment.
    #[arg(long, default_value = "localhost")]
    pub host: String,
}

/// Refuses a destination that exists (without `force`), is a directory, or
/// whose directory does not exist; returns that directory.
fn check_destination(to: &Path, force: bool) -> Result<PathBuf> {
    match std::fs::symlink_metadata(to) {
        Ok(m) if m.is_dir() => bail!("{} is a directory: give the path of the image file to write", to.display()),
        Ok(_) if !force => bail!("{} already exists: not overwriting it (add --force to replace it)", to.display()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("checking {}: {e}", to.display()),
    }
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!("the directory {} of {} does not exist", dir.display(), to.display());
    }
    Ok(dir)
}

/// Reads the passphrase file into zeroized memory; refuses an unreadable,
/// oversized or empty (or all-whitespace) one.
fn read_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let what = || format!("reading the passphrase file {}", path.display());
    let file = std::fs::File::open(path).with_context(what)?;
    let meta = file.metadata().with_context(what)?;
    if !meta.is_file() {
        bail!("the passphrase file {} is not a regular file", path.display());
    }
    // Capacity up front, so that no reallocation leaves a copy of the passphrase behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len().min(MAX_PASSPHRASE_BYTES) as usize + 1));
    file.take(MAX_PASSPHRASE_BYTES + 1).read_to_end(&mut buf).with_context(what)?;
    if buf.len() as u64 > MAX_PASSPHRASE_BYTES {
        bail!("the passphrase file {} is over {} MiB: not a passphrase", path.display(), MAX_PASSPHRASE_BYTES >> 20);
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        bail!("the passphrase file {} is empty: the image needs a passphrase", path.display());
    }
    Ok(buf)
}

/// Bytes free for an unprivileged writer in `dir`'s filesystem.
fn free_bytes(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir).with_context(|| format!("checking the free space in {}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn progress_bar(json_out: bool) -> indicatif::ProgressBar {
    if json_out || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// Exports a snapshot; detaches on every way out.
pub async fn run(api: ApiClient, args: ExportArgs, json_out: bool) -> Result<()> {
    let (volume_spec, snapshot) = open::split_snapshot_spec(&args.snapshot)?;
    let Some(snapshot) = snapshot else {
        bail!(
            "{} names no snapshot: export VOLUME@SNAPSHOT (take one with `slate snapshot create {} NAME`)",
            args.snapshot,
            args.snapshot
        );
    };
    let dir = check_destination(&args.to, args.force)?;
    let passphrase = read_passphrase(&args.passphrase_file)?;
    if passphrase.ends_with(b"\n") && !json_out {
        eprintln!(
            "note: the passphrase file ends with a newline, which is part of the passphrase \
             (QEMU's secret object and cryptsetup --key-file read it the same way)"
        );
    }
    let iterations = match args.pbkdf_iterations {
        Some(n) => n,
        None => tokio::task::spawn_blocking(|| luks::iterations_for(DEFAULT_KDF_TIME, DEFAULT_MIN_ITERATIONS))
            .await
            .context("measuring PBKDF2")?,
    };

    // From here on every control-plane call rides through an election.
    let quick_api = api.clone();
    let api = api.patient(CONTROL_PATIENCE);
    let opened = open::attach(&api, volume_spec, Some(snapshot), true, &args.host, false)
        .await
        .with_context(|| format!("attaching {} read-only", args.snapshot))?;
    let (id, attachment) = (opened.id, opened.attachment);
    let result = export_attached(api.clone(), quick_api, opened, &args, &dir, passphrase, iterations, json_out).await;
    if let Err(e) = open::detach(&api, id, attachment).await {
        eprintln!("slate: warning: detaching the export's read-only attachment {attachment}: {e:#}");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn export_attached(
    api: ApiClient,
    quick_api: ApiClient,
    opened: open::Attached,
    args: &ExportArgs,
    dir: &Path,
    passphrase: Zeroizing<Vec<u8>>,
    iterations: u32,
    json_out: bool,
) -> Result<()> {
    let (id, name) = (opened.id, opened.name.clone());
    let snapshot = opened.snapshot.clone().context("the attachment reads no snapshot")?;
    let need = opened.layout.size_bytes + luks::HEADER_AREA_BYTES as u64;
    let free = free_bytes(dir)?;
    if free < need {
        bail!(
            "{} needs {} MiB but {} has {} MiB free",
            args.to.display(),
            need.div_ceil(1 << 20),
            dir.display(),
            free >> 20
        );
    }
    let volume = open_volume(&quick_api, &api, opened).await.context("opening the snapshot on its storage nodes")?;

    let bar = progress_bar(json_out);
    bar.set_message(format!("{name}@{} -> {}", snapshot.name, args.to.display()));
    let opts = ImageOptions::new(iterations);
    let written = tokio::select! {
        r = image::write_image(volume.clone(), passphrase, &args.to, &opts, &bar) => r.map_err(anyhow::Error::from),
        () = shutdown_signal() => {
            let _ = std::fs::remove_file(partial_path(&args.to));
            Err(anyhow::anyhow!("interrupted: no image written"))
        }
    };
    bar.finish_and_clear();
    volume.close().await;
    let report = written.with_context(|| format!("exporting {name}@{} to {}", snapshot.name, args.to.display()))?;

    let secs = report.payload_time.as_secs_f64();
    let mb_s = report.payload_bytes as f64 / 1e6 / secs.max(1e-9);
    let out = json!({
        "path": report.path,
        "volume": name,
        "volume_id": id,
        "snapshot": snapshot.name,
        "snapshot_id": snapshot.id,
        "bytes": report.payload_bytes,
        "image_bytes": report.image_bytes,
        "format": "luks1",
        "cipher": format!("{}-{}", luks::CIPHER_NAME, luks::CIPHER_MODE),
        "key_bits": luks::KEY_BYTES * 8,
        "hash": luks::HASH_SPEC,
        "pbkdf2_iterations": report.iterations,
        "header_seconds": report.header_time.as_secs_f64(),
        "seconds": secs,
        "mb_per_s": mb_s,
    });
    super::commands::print(json_out, &out, |_| {
        format!(
            "exported {name}@{} to {}: {} MiB in {secs:.1} s ({mb_s:.0} MB/s)\n\
             LUKS1, aes-xts-plain64, 512-bit key, sha256; one key slot, {} PBKDF2 iterations\n",
            snapshot.name,
            report.path.display(),
            report.payload_bytes >> 20,
            report.iterations,
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn destination_must_be_new_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("x.luks");
        assert_eq!(check_destination(&to, false).unwrap(), dir.path());
        std::fs::write(&to, b"old").unwrap();
        let err = check_destination(&to, false).unwrap_err().to_string();
        assert!(err.contains("already exists") && err.contains("--force"), "{err}");
        assert!(check_destination(&to, true).is_ok());
        assert!(check_destination(dir.path(), true).unwrap_err().to_string().contains("directory"));
        let err = check_destination(&dir.path().join("no/such/x.luks"), false).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert_eq!(check_destination(Path::new("x.luks"), false).unwrap(), Path::new("."));
    }

    #[test]
    fn passphrase_files_are_read_exactly_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        std::fs::write(&p, b"s3cret\n").unwrap();
        assert_eq!(read_passphrase(&p).unwrap().as_slice(), b"s3cret\n");
        std::fs::write(&p, b"").unwrap();
        assert!(read_passphrase(&p).unwrap_err().to_string().contains("empty"));
        std::fs::write(&p, b" \n\t").unwrap();
        assert!(read_passphrase(&p).unwrap_err().to_string().contains("empty"));
        let missing = read_passphrase(&dir.path().join("none")).unwrap_err();
        assert!(format!("{missing:#}").contains("passphrase file"), "{missing:#}");
        assert!(read_passphrase(dir.path()).is_err());
        let mut big = std::fs::File::create(&p).unwrap();
        big.write_all(&vec![b'x'; (MAX_PASSPHRASE_BYTES + 1) as usize]).unwrap();
        assert!(read_passphrase(&p).unwrap_err().to_string().contains("not a passphrase"));
    }

    #[test]
    fn iterations_below_the_floor_are_refused_by_the_parser() {
        use clap::Parser;
        let parse = |n: &str| {
            super::super::Cli::try_parse_from([
                "slate",
                "export",
                "v@s",
                "--to",
                "x",
                "--passphrase-file",
                "p",
                "--pbkdf-iterations",
                n,
            ])
        };
        assert!(parse("999").is_err());
        assert!(parse("1000").is_ok());
    }
}
