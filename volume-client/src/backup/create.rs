//! Taking a backup: the snapshot's changed blocks, grouped into objects of at
//! most [`CHUNK_BLOCKS`] blocks, read from the nodes and sent to the target,
//! a few objects at a time (bounded memory: about `concurrency` MiB).
//!
//! Resuming: every few objects the list of objects done (in order) is saved in
//! the target as `progress/backup-ID.json`. A backup begun again after kill -9
//! gets the same id from slate-meta, plans the same objects (the changed blocks
//! of a snapshot never change), and skips those the progress file lists. Objects
//! are named by their hash, so one sent twice is the same object.

use super::reader::SnapshotReader;
use super::store::Store;
use super::Ordered;
use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use sha2::Digest;
use slate_protocol::backup::{Chunk, ChunkRange, Manifest, CHUNK_BLOCKS, FORMAT, STORED_BLOCK_BYTES};
use slate_protocol::{BlockRange, Epoch, BLOCK_SIZE_BYTES};
use std::sync::Arc;

/// What the manifest says of the backup besides its objects (from slate-meta's record).
#[derive(Debug, Clone)]
pub struct BackupHeader {
    pub backup: u64,
    pub volume: slate_protocol::backup::ManifestVolume,
    pub snapshot: slate_protocol::backup::ManifestSnapshot,
    pub key_fingerprint: String,
    pub parent: Option<slate_protocol::backup::ParentRef>,
    /// The parent's snapshot epoch: the base of the block difference (0 for a full backup).
    pub base_epoch: u64,
}

/// How the blocks of one object are read: pieces within one segment each.
type Plan = Vec<Vec<(u64, u32)>>;

/// Groups changed ranges into objects of at most [`CHUNK_BLOCKS`] blocks, never
/// letting a piece cross a segment boundary.
pub fn plan(ranges: &[BlockRange], segment_blocks: u64) -> Plan {
    let mut out: Plan = Vec::new();
    let mut cur: Vec<(u64, u32)> = Vec::new();
    let mut cur_blocks = 0u32;
    for r in ranges {
        let (mut start, end) = (r.start.0, r.start.0 + r.count);
        while start < end {
            let seg_end = (start / segment_blocks + 1) * segment_blocks;
            let room = CHUNK_BLOCKS - cur_blocks;
            let n = (end.min(seg_end) - start).min(u64::from(room)) as u32;
            cur.push((start, n));
            cur_blocks += n;
            start += u64::from(n);
            if cur_blocks == CHUNK_BLOCKS {
                out.push(std::mem::take(&mut cur));
                cur_blocks = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn progress_key(backup: u64) -> String {
    format!("progress/backup-{backup}.json")
}

/// Reads one object's blocks, stores the object (unless the target has it) and returns its entry.
async fn send_chunk(reader: &SnapshotReader, store: &Store, pieces: &[(u64, u32)]) -> Result<Chunk> {
    let mut crcs = BytesMut::new();
    let mut data = BytesMut::new();
    let mut ranges = Vec::with_capacity(pieces.len());
    for &(start, count) in pieces {
        let raw = reader.read(start, count).await?;
        let mut present = vec![0u8; (count as usize).div_ceil(8)];
        for i in 0..count as usize {
            if raw.written[i] {
                present[i / 8] |= 1 << (i % 8);
                crcs.put_u32_le(raw.crcs[i]);
                data.extend_from_slice(&raw.data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]);
            }
        }
        ranges.push(ChunkRange { start, count, present: hex::encode(present) });
    }
    crcs.extend_from_slice(&data);
    let object: Bytes = crcs.freeze();
    let sha = hex::encode(sha2::Sha256::digest(&object));
    let key = Manifest::object_key(&sha);
    if !store.exists(&key).await? {
        store.put(&key, object.clone()).await?;
    }
    Ok(Chunk { object: sha, bytes: object.len() as u64, ranges })
}

/// Runs a backup to its end and returns its (unsigned) manifest. `on_progress`
/// gets the blocks done and the total after each object.
pub async fn run(
    reader: Arc<SnapshotReader>,
    store: &Store,
    header: &BackupHeader,
    concurrency: usize,
    now_ms: u64,
    on_progress: impl Fn(u64, u64),
) -> Result<Manifest> {
    let ranges = reader.changed(Epoch(header.base_epoch)).await.context("listing the snapshot's changed blocks")?;
    let plan = plan(&ranges, reader.segment_blocks());
    let total: u64 = ranges.iter().map(|r| r.count).sum();
    // Objects a killed run of this backup already sent, if they are the ones planned now.
    let key = progress_key(header.backup);
    let mut done: Vec<Chunk> = match store.get(&key).await? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
        None => Vec::new(),
    };
    let same = |c: &Chunk, p: &Vec<(u64, u32)>| {
        c.ranges.len() == p.len() && c.ranges.iter().zip(p).all(|(r, (s, n))| r.start == *s && r.count == *n)
    };
    let keep = done.iter().zip(&plan).take_while(|(c, p)| same(c, p)).count();
    done.truncate(keep);
    let blocks_of = |p: &Vec<(u64, u32)>| p.iter().map(|(_, n)| u64::from(*n)).sum::<u64>();
    let mut blocks_done: u64 = plan[..keep].iter().map(blocks_of).sum();
    on_progress(blocks_done, total);
    let mut inflight: Ordered<(u64, Chunk)> = Ordered::new(concurrency);
    let mut next = keep;
    let mut since_save = 0;
    while next < plan.len() || !inflight.is_empty() {
        while next < plan.len() && inflight.has_room() {
            let (r, s, pieces) = (Arc::clone(&reader), store.clone(), plan[next].clone());
            let n = blocks_of(&pieces);
            inflight.push(async move { Ok((n, send_chunk(&r, &s, &pieces).await?)) });
            next += 1;
        }
        if let Some(res) = inflight.next().await {
            let (n, chunk) = res?;
            done.push(chunk);
            blocks_done += n;
            on_progress(blocks_done, total);
            since_save += 1;
            if since_save >= 16 {
                since_save = 0;
                store.put(&key, Bytes::from(serde_json::to_vec(&done)?)).await?;
            }
        }
    }
    let blocks_stored: u64 = done.iter().map(|c| c.bytes / STORED_BLOCK_BYTES).sum();
    let bytes_stored: u64 = done.iter().map(|c| c.bytes).sum();
    let manifest = Manifest {
        format: FORMAT.into(),
        backup: header.backup,
        volume: header.volume.clone(),
        snapshot: header.snapshot.clone(),
        key_fingerprint: header.key_fingerprint.clone(),
        parent: header.parent.clone(),
        block_size: BLOCK_SIZE_BYTES as u32,
        chunks: done,
        blocks_changed: total,
        blocks_stored,
        bytes_stored,
        created_ms: now_ms,
    };
    manifest.check().context("the manifest built does not check")?;
    Ok(manifest)
}

/// Forgets a finished backup's progress file.
pub async fn finish(store: &Store, backup: u64) -> Result<()> {
    store.delete(&progress_key(backup)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use slate_protocol::BlockIndex;

    fn r(start: u64, count: u64) -> BlockRange {
        BlockRange { start: BlockIndex(start), count }
    }

    #[test]
    fn the_plan_fills_objects_and_never_crosses_a_segment() {
        // Segments of 300 blocks: a range over the boundary is split there.
        let p = plan(&[r(0, 10), r(250, 100), r(600, 300)], 300);
        for pieces in &p {
            let n: u32 = pieces.iter().map(|(_, n)| n).sum();
            assert!(n <= CHUNK_BLOCKS);
            for (s, n) in pieces {
                assert_eq!(s / 300, (s + u64::from(*n) - 1) / 300, "piece {s}+{n} crosses a segment");
            }
        }
        let flat: Vec<(u64, u32)> = p.concat();
        let covered: u64 = flat.iter().map(|(_, n)| u64::from(*n)).sum();
        assert_eq!(covered, 410);
        assert_eq!(p[0].iter().map(|(_, n)| n).sum::<u32>(), CHUNK_BLOCKS, "objects are filled");
        assert!(plan(&[], 300).is_empty());
    }
}
