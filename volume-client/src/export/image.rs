//! Writing an export image: a LUKS1 header area ([`super::luks`]) for a fresh
//! master key, then every byte of a block device encrypted under that key,
//! into `FILE.partial`, fsynced, then renamed to `FILE`.
//!
//! * **Fresh key.** The master key is made here from the OS's CSPRNG and is
//!   never the volume's key: the image must not hand out a key that also opens
//!   the volume's replicas, backups and the other snapshots. It lives only
//!   while the image is written (as the cipher's key schedule, zeroized on drop).
//! * **Every block.** LUKS has no holes: a never-written block is plaintext
//!   zeros, whose ciphertext is not zeros, so every block is read, encrypted
//!   and written, and the image is `2 MiB + size` bytes long, not sparse.
//! * **Bounded memory.** The device is read in chunks (`chunk_bytes`), at most
//!   `in_flight` at once; each is encrypted on the blocking pool and written at
//!   its place with a positional write, in order.
//! * **Never a complete-looking partial file.** The image is written to
//!   `FILE.partial` (created 0600, a stale one replaced), fsynced, renamed to
//!   `FILE`, and the directory fsynced. On error the partial file is removed; a
//!   killed process leaves only `FILE.partial`.

use super::luks::{self, LuksError, HEADER_AREA_BYTES};
use crate::blockdev::{BlockDevice, DevError};
use crate::crypto::{CryptoError, VolumeCipher, XtsKey, SECTOR_BYTES};
use bytes::BytesMut;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

/// How an image is written.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// PBKDF2-HMAC-SHA256 iterations of the key slot.
    pub iterations: u32,
    /// Bytes read, encrypted and written per step (a multiple of 4 KiB).
    pub chunk_bytes: u32,
    /// Chunks read and encrypted ahead of the one being written.
    pub in_flight: usize,
}

impl ImageOptions {
    /// 4 MiB chunks (one data-plane read each), four in flight: 32 MiB of buffers at most.
    pub fn new(iterations: u32) -> Self {
        Self { iterations, chunk_bytes: 4 << 20, in_flight: 4 }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ImageReport {
    /// The image file (after the rename).
    pub path: PathBuf,
    /// The device's bytes, i.e. the payload's length.
    pub payload_bytes: u64,
    /// The image's length: the header area and the payload.
    pub image_bytes: u64,
    /// The key slot's PBKDF2 iterations.
    pub iterations: u32,
    /// Time spent making the header (PBKDF2 of the key slot and the digest).
    pub header_time: Duration,
    /// Time spent reading, encrypting and writing the payload, fsync included.
    pub payload_time: Duration,
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading the device failed.
    #[error("reading bytes {offset}..{end} of the snapshot: {source}")]
    Read {
        offset: u64,
        end: u64,
        #[source]
        source: DevError,
    },
    /// The header could not be made.
    #[error("making the LUKS header: {0}")]
    Luks(#[from] LuksError),
    /// Encryption refused a buffer (never for whole 4 KiB blocks).
    #[error("encrypting: {0}")]
    Crypto(#[from] CryptoError),
    /// A worker task died.
    #[error("a worker task failed: {0}")]
    Task(String),
}

/// Where an image is written before it is complete: `FILE.partial`.
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::File { what, path: path.to_owned(), source }
}

fn task_err(e: tokio::task::JoinError) -> ImageError {
    ImageError::Task(e.to_string())
}

/// The read-ahead tasks; aborted if the writer stops early.
struct Ahead(VecDeque<JoinHandle<Result<BytesMut, ImageError>>>);

impl Drop for Ahead {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Creates `path` afresh, mode 0600 whatever the umask (a stale file of that name is replaced).
fn create_private(path: &Path) -> Result<File, ImageError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_err("removing the stale", path)(e)),
    }
    let file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(file_err("creating", path))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(file_err("setting the mode of", path))?;
    Ok(file)
}

/// Writes the LUKS1 image of `source` to `dest` (through `FILE.partial`), the
/// key slot opened by `passphrase`. `progress` is told the payload's length
/// and advanced as bytes are written. `dest` is replaced if it exists: the
/// caller decides whether that is allowed.
pub async fn write_image(
    source: Arc<dyn BlockDevice>,
    passphrase: Zeroizing<Vec<u8>>,
    dest: &Path,
    opts: &ImageOptions,
    progress: &indicatif::ProgressBar,
) -> Result<ImageReport, ImageError> {
    let partial = partial_path(dest);
    let result = write_partial(source, passphrase, dest, &partial, opts, progress).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

async fn write_partial(
    source: Arc<dyn BlockDevice>,
    passphrase: Zeroizing<Vec<u8>>,
    dest: &Path,
    partial: &Path,
    opts: &ImageOptions,
    progress: &indicatif::ProgressBar,
) -> Result<ImageReport, ImageError> {
    let file = Arc::new(create_private(partial)?);

    // The header: a fresh master key, sealed under the passphrase (CPU-bound PBKDF2).
    let t = Instant::now();
    let iterations = opts.iterations;
    let (cipher, area) = tokio::task::spawn_blocking(move || {
        let master = XtsKey::generate();
        let area = luks::format(&master, &passphrase, iterations)?;
        Ok::<_, ImageError>((Arc::new(VolumeCipher::new(&master)), area))
    })
    .await
    .map_err(task_err)??;
    let header_time = t.elapsed();
    let f = Arc::clone(&file);
    let path = partial.to_owned();
    tokio::task::spawn_blocking(move || f.write_all_at(&area, 0).map_err(file_err("writing the header to", &path)))
        .await
        .map_err(task_err)??;

    // The payload, in order, with a few chunks read and encrypted ahead.
    let t = Instant::now();
    let size = source.size_bytes();
    let chunk = u64::from(opts.chunk_bytes.max(source.block_size()));
    progress.set_length(size);
    let mut ahead = Ahead(VecDeque::new());
    let mut next = 0u64;
    let mut written = 0u64;
    loop {
        while ahead.0.len() < opts.in_flight.max(1) && next < size {
            let (at, len) = (next, chunk.min(size - next));
            let (src, cipher) = (Arc::clone(&source), Arc::clone(&cipher));
            ahead.0.push_back(tokio::spawn(async move {
                let data = src.read(at, len as u32).await.map_err(|source| ImageError::Read {
                    offset: at,
                    end: at + len,
                    source,
                })?;
                tokio::task::spawn_blocking(move || {
                    let mut buf = BytesMut::from(data);
                    cipher.encrypt_sectors(at / SECTOR_BYTES as u64, &mut buf)?;
                    Ok(buf)
                })
                .await
                .map_err(task_err)?
            }));
            next += len;
        }
        let Some(task) = ahead.0.pop_front() else { break };
        let buf = task.await.map_err(task_err)??;
        let (f, path) = (Arc::clone(&file), partial.to_owned());
        let at = HEADER_AREA_BYTES as u64 + written;
        let n = buf.len() as u64;
        tokio::task::spawn_blocking(move || f.write_all_at(&buf, at).map_err(file_err("writing", &path)))
            .await
            .map_err(task_err)??;
        written += n;
        progress.set_position(written);
    }

    // Durable, then visible under its name.
    let f = Arc::clone(&file);
    let path = partial.to_owned();
    tokio::task::spawn_blocking(move || f.sync_all().map_err(file_err("syncing", &path))).await.map_err(task_err)??;
    drop(file);
    std::fs::rename(partial, dest).map_err(file_err("renaming the finished image to", dest))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    File::open(&dir).and_then(|d| d.sync_all()).map_err(file_err("syncing the directory", &dir))?;
    Ok(ImageReport {
        path: dest.to_owned(),
        payload_bytes: written,
        image_bytes: HEADER_AREA_BYTES as u64 + written,
        iterations,
        header_time,
        payload_time: t.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::MemDevice;
    use bytes::Bytes;

    async fn device(size: u64) -> Arc<MemDevice> {
        let dev = Arc::new(MemDevice::new(size));
        // A pattern in the first and last MiB, the middle never written.
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        dev.write(0, Bytes::from(pattern.clone()), false).await.unwrap();
        dev.write(size - (1 << 20), Bytes::from(pattern), false).await.unwrap();
        dev
    }

    fn hidden() -> indicatif::ProgressBar {
        indicatif::ProgressBar::hidden()
    }

    #[tokio::test]
    async fn image_decrypts_to_the_device_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.luks");
        let size = 5 << 20;
        let dev = device(size).await;
        // Small, odd-sized chunks so that the last one is short and several are in flight.
        let opts = ImageOptions { iterations: luks::MIN_ITERATIONS, chunk_bytes: 3 << 12, in_flight: 3 };
        let report =
            write_image(dev.clone(), Zeroizing::new(b"open sesame".to_vec()), &dest, &opts, &hidden()).await.unwrap();
        assert_eq!(report.payload_bytes, size);
        assert_eq!(report.image_bytes, size + (2 << 20));
        assert!(!partial_path(&dest).exists());
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.len(), report.image_bytes);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let image = std::fs::read(&dest).unwrap();
        let (key, payload_at) = luks::unlock(&image, b"open sesame").unwrap();
        let mut payload = image[payload_at as usize..].to_vec();
        // Unwritten blocks are encrypted zeros, not zeros.
        assert!(payload[(2 << 20)..(2 << 20) + 4096].iter().any(|&b| b != 0));
        VolumeCipher::new(&key).decrypt_sectors(0, &mut payload).unwrap();
        assert!(payload == dev.snapshot(), "the image does not decrypt to the device");
        assert_eq!(luks::unlock(&image, b"open sesame!").unwrap_err(), LuksError::WrongPassphrase);
    }

    #[tokio::test]
    async fn every_export_has_its_own_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(2 << 20).await;
        let opts = ImageOptions::new(luks::MIN_ITERATIONS);
        let mut keys = Vec::new();
        for name in ["a.luks", "b.luks"] {
            let dest = dir.path().join(name);
            write_image(dev.clone(), Zeroizing::new(b"p".to_vec()), &dest, &opts, &hidden()).await.unwrap();
            let image = std::fs::read(&dest).unwrap();
            keys.push(luks::unlock(&image, b"p").unwrap().0.expose_bytes().to_vec());
        }
        assert_ne!(keys[0], keys[1]);
    }

    #[tokio::test]
    async fn a_failed_export_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.luks");
        // A stale partial file from a killed export is replaced, then removed on failure.
        std::fs::write(partial_path(&dest), b"stale").unwrap();
        let dev = device(2 << 20).await;
        let opts = ImageOptions::new(luks::MIN_ITERATIONS);
        let err = write_image(dev.clone(), Zeroizing::new(Vec::new()), &dest, &opts, &hidden()).await.unwrap_err();
        assert!(matches!(err, ImageError::Luks(LuksError::EmptyPassphrase)), "{err}");
        assert!(!dest.exists() && !partial_path(&dest).exists());
        // A destination in a missing directory fails with the path named.
        let nowhere = dir.path().join("missing").join("x.luks");
        let err = write_image(dev, Zeroizing::new(b"p".to_vec()), &nowhere, &opts, &hidden()).await.unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
