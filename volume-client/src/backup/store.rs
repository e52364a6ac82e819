//! Where backups are kept: a directory (`file:///DIR`) or an S3-compatible
//! bucket (`s3://BUCKET[/PREFIX]`, with `--s3-endpoint` and the usual `AWS_*`
//! credentials). Both hold named objects; a backup never overwrites an object
//! with other bytes (data objects are named by their hash).
//!
//! The directory store writes each object to a temporary file (mode 0600: it
//! is tenant data, if encrypted), fsyncs it, renames it into place and fsyncs
//! the directory, so an object that exists is whole, even after kill -9 or a
//! power loss. S3 has the same property per PUT.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A backup target.
#[derive(Debug, Clone)]
pub enum Target {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Target {
    /// Parses `file:///DIR` or `s3://BUCKET[/PREFIX]`.
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') || path.len() < 2 {
                bail!("{url:?}: a directory target is file:///ABSOLUTE/DIR");
            }
            return Ok(Self::Dir(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() || bucket.contains('@') {
                bail!("{url:?}: an S3 target is s3://BUCKET[/PREFIX]");
            }
            return Ok(Self::S3 { bucket: bucket.to_owned(), prefix: prefix.trim_matches('/').to_owned() });
        }
        bail!("{url:?} is not a backup target: use file:///DIR or s3://BUCKET[/PREFIX]")
    }
}

/// Options for reaching an S3 target.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// e.g. `http://127.0.0.1:9000`; default: AWS.
    pub endpoint: Option<String>,
}

/// A place holding named objects.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Inner,
    url: String,
}

#[derive(Debug, Clone)]
enum Inner {
    Dir(PathBuf),
    S3 { store: Arc<dyn ObjectStore>, prefix: String },
}

impl Store {
    /// Opens a target; a directory is created (0700) if missing.
    pub fn open(url: &str, s3: &S3Options) -> Result<Self> {
        let inner = match Target::parse(url)? {
            Target::Dir(dir) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .with_context(|| format!("creating the backup directory {}", dir.display()))?;
                Inner::Dir(dir)
            }
            Target::S3 { bucket, prefix } => {
                // Fail in seconds, not minutes, when the endpoint is down.
                let retry = object_store::RetryConfig {
                    max_retries: 3,
                    retry_timeout: std::time::Duration::from_secs(20),
                    ..object_store::RetryConfig::default()
                };
                let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket).with_retry(retry);
                if let Some(ep) = &s3.endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                    b = b.with_region("us-east-1");
                }
                let store = b.build().with_context(|| format!("configuring S3 for {url}"))?;
                Inner::S3 { store: Arc::new(store), prefix }
            }
        };
        Ok(Self { inner, url: url.to_owned() })
    }

    /// The target's URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn s3_path(prefix: &str, key: &str) -> ObjPath {
        if prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{prefix}/{key}"))
        }
    }

    fn file(dir: &Path, key: &str) -> PathBuf {
        dir.join(key)
    }

    /// Stores `bytes` under `key`, durably (replacing what was there).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        match &self.inner {
            Inner::Dir(dir) => {
                let path = Self::file(dir, key);
                tokio::task::spawn_blocking(move || write_file(&path, &bytes))
                    .await
                    .context("writer task")?
                    .with_context(|| format!("writing {key} to {}", self.url))
            }
            Inner::S3 { store, prefix } => {
                store
                    .put(&Self::s3_path(prefix, key), PutPayload::from_bytes(bytes))
                    .await
                    .with_context(|| format!("uploading {key} to {}", self.url))?;
                Ok(())
            }
        }
    }

    /// The bytes of `key`; `None` if there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match &self.inner {
            Inner::Dir(dir) => {
                let path = Self::file(dir, key);
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
                }
            }
            Inner::S3 { store, prefix } => match store.get(&Self::s3_path(prefix, key)).await {
                Ok(r) => Ok(Some(r.bytes().await.with_context(|| format!("downloading {key} from {}", self.url))?)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e).with_context(|| format!("downloading {key} from {}", self.url)),
            },
        }
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match &self.inner {
            Inner::Dir(dir) => Ok(tokio::fs::try_exists(Self::file(dir, key)).await.unwrap_or(false)),
            Inner::S3 { store, prefix } => match store.head(&Self::s3_path(prefix, key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e).with_context(|| format!("looking up {key} in {}", self.url)),
            },
        }
    }

    /// Removes `key` (no error if it is missing).
    pub async fn delete(&self, key: &str) -> Result<()> {
        match &self.inner {
            Inner::Dir(dir) => match tokio::fs::remove_file(Self::file(dir, key)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
            Inner::S3 { store, prefix } => match store.delete(&Self::s3_path(prefix, key)).await {
                Err(e) if !matches!(e, object_store::Error::NotFound { .. }) => Err(e.into()),
                _ => Ok(()),
            },
        }
    }
}

/// Writes a file whole or not at all: temporary file (0600), fsync, rename, fsync of the directory.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per write: two tasks may store the same object (same bytes) at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.partial", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn targets_parse_or_are_refused_clearly() {
        assert!(matches!(Target::parse("file:///var/b").unwrap(), Target::Dir(p) if p == Path::new("/var/b")));
        match Target::parse("s3://bkt/a/b/").unwrap() {
            Target::S3 { bucket, prefix } => assert_eq!((bucket.as_str(), prefix.as_str()), ("bkt", "a/b")),
            Target::Dir(_) => panic!("not s3"),
        }
        for bad in ["/var/b", "file://rel", "s3://", "http://x", "s3://user@bkt"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_directory_store_writes_whole_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/t", dir.path().display());
        let s = Store::open(&url, &S3Options::default()).unwrap();
        assert!(!s.exists("objects/ab/x").await.unwrap());
        assert_eq!(s.get("objects/ab/x").await.unwrap(), None);
        s.put("objects/ab/x", Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(s.get("objects/ab/x").await.unwrap().as_deref(), Some(&b"hello"[..]));
        let mode = std::fs::metadata(dir.path().join("t/objects/ab/x")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("t/objects/ab")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
        s.delete("objects/ab/x").await.unwrap();
        s.delete("objects/ab/x").await.unwrap();
        assert!(!s.exists("objects/ab/x").await.unwrap());
    }
}
