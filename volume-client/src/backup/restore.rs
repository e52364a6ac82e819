//! Writing a backup chain into a volume (`slate restore`).
//!
//! The volume was created by slate-meta under a fresh key of its own; slate-meta
//! hands the restorer the backed-up volume's key, with which each block is
//! decrypted (its XTS tweak is its block index) before the volume engine
//! encrypts it again under the new key. Plaintext lives only in the buffers of
//! the objects being written, which are zeroed after use. The chain
//! is applied oldest first; within one manifest the objects cover disjoint
//! blocks and are written a few at a time, and a manifest is finished before the
//! next begins, so a block changed by a later incremental ends with its later
//! value. A block an incremental lists as changed but not present was trimmed at
//! that snapshot: it is trimmed here too. Every object is checked (hash, length,
//! crcs) before any of its blocks is written.
//!
//! Progress is (manifests done, objects of the next manifest done), recorded in
//! slate-meta by the caller; a restore resumed after kill -9 starts there (writing
//! an object twice is harmless).

use super::chain::SignedManifest;
use super::store::Store;
use super::Ordered;
use crate::crypto::VolumeCipher;
use crate::volume::Volume;
use anyhow::{anyhow, Context, Result};
use slate_protocol::backup::{Chunk, Manifest};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Where a restore stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub manifests: u64,
    pub chunks: u64,
}

/// Fetches, checks, decrypts (with the backed-up volume's key) and writes one object's blocks.
async fn apply_chunk(
    volume: &Volume,
    source: &VolumeCipher,
    store: &Store,
    backup: u64,
    chunk: &Chunk,
    trims: bool,
) -> Result<u64> {
    let key = Manifest::object_key(&chunk.object);
    let bytes = store
        .get(&key)
        .await?
        .ok_or_else(|| anyhow!("backup {backup}: object {} is missing from {}", chunk.object, store.url()))?;
    let blocks = chunk.open(&bytes).map_err(|e| anyhow!("backup {backup}: {e}"))?;
    let mut written = 0u64;
    let mut i = 0;
    while i < blocks.len() {
        let (start, first) = blocks[i];
        let mut j = i + 1;
        while j < blocks.len() && blocks[j].0 == blocks[j - 1].0 + 1 && blocks[j].1.is_some() == first.is_some() {
            j += 1;
        }
        let count = (j - i) as u64;
        if first.is_some() {
            let mut run = Zeroizing::new(Vec::with_capacity(count as usize * slate_protocol::BLOCK_SIZE_BYTES));
            for (_, d) in &blocks[i..j] {
                run.extend_from_slice(d.unwrap_or_default());
            }
            source.decrypt_blocks(start, &mut run).map_err(|e| anyhow!("decrypting blocks {start}+{count}: {e}"))?;
            volume.write_blocks(start, &run, false).await.with_context(|| format!("writing blocks {start}+{count}"))?;
            written += count;
        } else if trims {
            volume.trim_blocks(start, count, true).await.with_context(|| format!("zeroing blocks {start}+{count}"))?;
        }
        i = j;
    }
    Ok(written)
}

/// Applies `chain` from `from`; `on_progress(position, blocks written)` after each object, in order.
pub async fn apply(
    volume: Arc<Volume>,
    source: Arc<VolumeCipher>,
    store: &Store,
    chain: &[SignedManifest],
    from: Position,
    window: usize,
    mut on_progress: impl FnMut(Position, u64),
) -> Result<Position> {
    let mut pos = from;
    for (mi, m) in chain.iter().enumerate().skip(from.manifests as usize) {
        let backup = m.manifest.backup;
        let skip = if mi as u64 == from.manifests { from.chunks as usize } else { 0 };
        // A fresh volume reads zeros: trims matter only for incrementals.
        let trims = mi > 0;
        let mut tasks: Ordered<u64> = Ordered::new(window);
        let mut items = m.manifest.chunks.iter().skip(skip).cloned();
        pos = Position { manifests: mi as u64, chunks: skip as u64 };
        loop {
            while tasks.has_room() {
                let Some(chunk) = items.next() else { break };
                let (v, k, s) = (Arc::clone(&volume), Arc::clone(&source), store.clone());
                tasks.push(async move { apply_chunk(&v, &k, &s, backup, &chunk, trims).await });
            }
            let Some(r) = tasks.next().await else { break };
            let n = r?;
            pos.chunks += 1;
            on_progress(pos, n);
        }
        pos = Position { manifests: mi as u64 + 1, chunks: 0 };
        on_progress(pos, 0);
    }
    Ok(pos)
}
