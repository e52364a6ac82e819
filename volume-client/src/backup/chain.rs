//! Loading a backup's signed manifest and its chain, and checking a chain
//! without restoring it (`slate backup verify`).
//!
//! A manifest must carry the cluster's signature (the verifying key is pinned
//! when known), be byte-for-byte its canonical rendering, and check
//! structurally. Each incremental names its parent by id and by the SHA-256 of
//! the parent's manifest, so a parent replaced by another backup breaks the
//! chain. Verifying reads every object of the chain and checks its hash, its
//! length and every block's crc. None of this needs the volume key: a chain of
//! a deleted volume still verifies, it just cannot be decrypted any more.

use super::store::Store;
use super::Ordered;
use anyhow::{anyhow, bail, Context, Result};
use slate_protocol::backup::Manifest;
use slate_protocol::certificate::{verify_signed, BACKUP_MANIFEST};

/// A manifest whose signature checked.
#[derive(Debug, Clone)]
pub struct SignedManifest {
    pub manifest: Manifest,
    /// SHA-256 of the manifest body (what the signature and a child's parent link cover).
    pub sha256: String,
    pub verifying_key: String,
}

/// Loads and checks the manifest of backup `backup` of volume `volume`.
pub async fn load_manifest(
    store: &Store,
    volume: u64,
    backup: u64,
    verifying_key: Option<&str>,
) -> Result<SignedManifest> {
    let key = Manifest::manifest_key(volume, backup);
    let bytes = store
        .get(&key)
        .await?
        .ok_or_else(|| anyhow!("backup {backup}: its manifest {key} is missing from {}", store.url()))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| anyhow!("backup {backup}: the manifest is not text"))?;
    let v = verify_signed(BACKUP_MANIFEST, text, verifying_key)
        .map_err(|e| anyhow!("backup {backup}: the manifest does not verify: {e}"))?;
    let manifest: Manifest =
        serde_json::from_value(v.body).map_err(|e| anyhow!("backup {backup}: the manifest is malformed: {e}"))?;
    manifest.check().map_err(|e| anyhow!("backup {backup}: {e}"))?;
    if manifest.backup != backup || manifest.volume.id != volume {
        bail!("backup {backup}: the manifest at {key} is that of backup {}", manifest.backup);
    }
    Ok(SignedManifest { manifest, sha256: v.sha256, verifying_key: v.verifying_key })
}

/// The chain ending at `backup`, oldest (the full backup) first; every link checked.
pub async fn load_chain(
    store: &Store,
    volume: u64,
    backup: u64,
    verifying_key: Option<&str>,
) -> Result<Vec<SignedManifest>> {
    let mut chain = vec![load_manifest(store, volume, backup, verifying_key).await?];
    while let Some(p) = chain.last().and_then(|m| m.manifest.parent.clone()) {
        let child = chain.last().map(|m| m.manifest.backup).unwrap_or_default();
        if chain.len() > 10_000 {
            bail!("backup {backup}: the chain is longer than 10,000 backups (a loop?)");
        }
        let parent = load_manifest(store, volume, p.backup, verifying_key)
            .await
            .with_context(|| format!("backup {child} is an incremental of backup {}, which", p.backup))?;
        if parent.sha256 != p.manifest_sha256 {
            bail!("the chain is broken: backup {child} was taken on a backup {} with another manifest", p.backup);
        }
        let last = &chain[chain.len() - 1].manifest;
        if parent.manifest.key_fingerprint != last.key_fingerprint
            || parent.manifest.snapshot.epoch >= last.snapshot.epoch
        {
            bail!("the chain is broken: backup {} cannot be the base of backup {child}", p.backup);
        }
        chain.push(parent);
    }
    chain.reverse();
    Ok(chain)
}

/// What a verification read.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub manifests: usize,
    pub objects: u64,
    pub blocks: u64,
    pub bytes: u64,
}

/// Reads every object of `chain` and checks it; `on_progress(objects done, objects)`.
pub async fn verify_objects(
    store: &Store,
    chain: &[SignedManifest],
    window: usize,
    on_progress: impl Fn(u64, u64),
) -> Result<VerifyReport> {
    let total: u64 = chain.iter().map(|m| m.manifest.chunks.len() as u64).sum();
    let mut report = VerifyReport { manifests: chain.len(), ..VerifyReport::default() };
    let mut tasks: Ordered<(u64, u64)> = Ordered::new(window);
    let mut items = chain.iter().flat_map(|m| m.manifest.chunks.iter().map(move |c| (m.manifest.backup, c.clone())));
    loop {
        while tasks.has_room() {
            let Some((backup, chunk)) = items.next() else { break };
            let store = store.clone();
            tasks.push(async move {
                let key = Manifest::object_key(&chunk.object);
                let bytes = store.get(&key).await?.ok_or_else(|| {
                    anyhow!("backup {backup}: object {} is missing from {}", chunk.object, store.url())
                })?;
                let blocks = chunk.open(&bytes).map_err(|e| anyhow!("backup {backup}: {e}"))?;
                Ok((blocks.iter().filter(|(_, d)| d.is_some()).count() as u64, bytes.len() as u64))
            });
        }
        let Some(r) = tasks.next().await else { break };
        let (blocks, bytes) = r?;
        report.objects += 1;
        report.blocks += blocks;
        report.bytes += bytes;
        on_progress(report.objects, total);
    }
    Ok(report)
}
