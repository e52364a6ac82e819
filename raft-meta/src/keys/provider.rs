//! Where the root key lives: behind [`RootKeyProvider`], so a KMS or HSM can
//! replace the defaults (a file, or an environment variable).
//!
//! The provider must be able to *replace* the root key durably, because every
//! crypto-shred ratchets it and the old value must stop existing. The file
//! provider writes the new key to a temporary file, fsyncs it, renames it over
//! the old one, fsyncs the directory, and then overwrites the old inode (still
//! open) with zeros, so the old key is neither reachable by name nor left in the
//! old file's blocks where the filesystem rewrites in place. (Flash remapping can
//! still keep a stale copy; that is why the file must live outside the data
//! directory and why a KMS is the production answer.)

use super::{KeyError, RootKey, ROOT_KEY_BYTES};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const HEADER: &str = "slate-root-key v1";

/// A store for the root key.
pub trait RootKeyProvider: Send + Sync + fmt::Debug {
    /// The current root key.
    fn load(&self) -> Result<RootKey, KeyError>;
    /// Durably replaces the stored root key by `key` and destroys the old one.
    fn store(&self, key: &RootKey) -> Result<(), KeyError>;
    /// A human description (never the key).
    fn describe(&self) -> String;
}

/// Parses the text form `epoch N` / `key HEX` (the file body, or an env value
/// `N:HEX`).
fn parse_key(epoch: &str, key_hex: &str) -> Result<RootKey, KeyError> {
    let epoch: u64 = epoch.trim().parse().map_err(|_| KeyError::Store("root key epoch is not a number".into()))?;
    let mut key = Zeroizing::new([0u8; ROOT_KEY_BYTES]);
    hex::decode_to_slice(key_hex.trim(), key.as_mut())
        .map_err(|_| KeyError::Store(format!("root key must be {ROOT_KEY_BYTES} bytes of hex")))?;
    Ok(RootKey::from_parts(epoch, key))
}

fn render(key: &RootKey) -> Zeroizing<String> {
    let key_hex = Zeroizing::new(hex::encode(key.secret()));
    let mut text = Zeroizing::new(String::with_capacity(HEADER.len() + key_hex.len() + 64));
    let _ = std::fmt::Write::write_fmt(&mut *text, format_args!("{HEADER}\nepoch {}\nkey ", key.epoch()));
    text.push_str(&key_hex);
    text.push('\n');
    text
}

/// The root key in a file (mode 0600), outside the data directory.
#[derive(Debug, Clone)]
pub struct FileRootKeyProvider {
    path: PathBuf,
}

impl FileRootKeyProvider {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Creates the file with a fresh key at epoch 0; refuses to overwrite.
    pub fn create_new(&self) -> Result<(), KeyError> {
        if self.path.exists() {
            return Err(KeyError::Store(format!("{} already exists", self.path.display())));
        }
        self.store(&RootKey::generate())
    }

    /// Writes a given key (used by `init` to give every node the same key).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl RootKeyProvider for FileRootKeyProvider {
    fn load(&self) -> Result<RootKey, KeyError> {
        let mut text = Zeroizing::new(String::new());
        File::open(&self.path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| KeyError::Store(format!("reading {}: {e}", self.path.display())))?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(KeyError::Store(format!("{} is not a slate root key file", self.path.display())));
        }
        let epoch = lines.next().and_then(|l| l.strip_prefix("epoch "));
        let key = lines.next().and_then(|l| l.strip_prefix("key "));
        match (epoch, key) {
            (Some(e), Some(k)) => parse_key(e, k),
            _ => Err(KeyError::Store(format!("{} is truncated", self.path.display()))),
        }
    }

    fn store(&self, key: &RootKey) -> Result<(), KeyError> {
        let err = |what: &str, e: std::io::Error| KeyError::Store(format!("{what} {}: {e}", self.path.display()));
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("tmp");
        let body = render(key);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err("creating temp for", e))?;
            f.write_all(body.as_bytes()).map_err(|e| err("writing", e))?;
            f.sync_all().map_err(|e| err("syncing", e))?;
        }
        // Keep the old inode open so its bytes can be overwritten after the rename.
        let old = OpenOptions::new().read(true).write(true).open(&self.path).ok();
        fs::rename(&tmp, &self.path).map_err(|e| err("renaming over", e))?;
        fsync_dir(dir).map_err(|e| err("syncing directory of", e))?;
        if let Some(mut old) = old {
            if let Ok(meta) = old.metadata() {
                let zeros = vec![0u8; usize::try_from(meta.len()).unwrap_or(0).min(4096)];
                let _ = old.seek(SeekFrom::Start(0)).and_then(|_| old.write_all(&zeros)).and_then(|()| old.sync_all());
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// The root key in an environment variable, as `EPOCH:HEX` or just `HEX`
/// (epoch 0). Read-only: it cannot be ratcheted, so a shred with this
/// provider rotates tenant keys and purges the log, but an old copy of the
/// data directory stays unwrappable with the unchanged root key. Use it for
/// tests and for setups where an outer KMS handles rotation.
#[derive(Debug, Clone)]
pub struct EnvRootKeyProvider {
    var: String,
}

impl EnvRootKeyProvider {
    pub fn new(var: impl Into<String>) -> Self {
        Self { var: var.into() }
    }
}

impl RootKeyProvider for EnvRootKeyProvider {
    fn load(&self) -> Result<RootKey, KeyError> {
        let v = Zeroizing::new(
            std::env::var(&self.var)
                .map_err(|_| KeyError::Store(format!("environment variable {} not set", self.var)))?,
        );
        match v.split_once(':') {
            Some((e, k)) => parse_key(e, k),
            None => parse_key("0", &v),
        }
    }

    fn store(&self, _key: &RootKey) -> Result<(), KeyError> {
        Err(KeyError::Store(format!("root key from environment variable {} is read-only; cannot ratchet", self.var)))
    }

    fn describe(&self) -> String {
        format!("environment variable {}", self.var)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = FileRootKeyProvider::new(dir.path().join("root.key"));
        p.create_new().unwrap();
        assert!(p.create_new().is_err());
        let k0 = p.load().unwrap();
        let k1 = k0.ratchet();
        p.store(&k1).unwrap();
        let back = p.load().unwrap();
        assert_eq!(back.epoch(), 1);
        assert_eq!(back.secret(), k1.secret());
        let text = fs::read_to_string(p.path()).unwrap();
        assert!(!text.contains(&hex::encode(k0.secret())));
    }
}
