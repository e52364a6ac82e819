//! Backup manifests and data objects: the format the CLI writes to a backup
//! target and reads back, and that slate-meta checks before it signs a manifest.
//!
//! A backup is a set of **data objects** and one **manifest**.
//! * A data object holds up to [`CHUNK_BLOCKS`] blocks exactly as the storage
//!   nodes store them: AES-XTS ciphertext under the volume key, each with its
//!   crc32c. Layout: the crcs of its blocks (u32 little-endian, in order), then
//!   the blocks. Objects are named by the SHA-256 of their bytes, so a retried
//!   or resumed backup rewrites nothing it already sent.
//! * The manifest lists, per object, the block ranges it covers and which of
//!   their blocks are present. A range's block that is not present was
//!   unwritten (or trimmed) at the snapshot: it restores as zeros. A full
//!   backup covers every block written in the volume up to its snapshot; an
//!   incremental covers the blocks changed since its parent's snapshot and names
//!   the parent by id and manifest hash, so a chain can be checked link by link.
//!
//! The manifest is signed by the cluster (see [`crate::certificate`],
//! [`crate::certificate::BACKUP_MANIFEST`]); the manifest's hash covers every
//! object's hash, and each object's bytes cover its blocks' crcs.

use crate::BLOCK_SIZE_BYTES;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The manifest format this code writes and reads.
pub const FORMAT: &str = "slate-backup/1";
/// Most blocks held by one data object (1 MiB of data).
pub const CHUNK_BLOCKS: u32 = 256;
/// Bytes one stored block takes in an object: its crc and its ciphertext.
pub const STORED_BLOCK_BYTES: u64 = 4 + BLOCK_SIZE_BYTES as u64;

/// Why a manifest or an object is not what it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupFormatError {
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("object {object}: {why}")]
    Object { object: String, why: String },
}

/// The volume a backup was taken of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVolume {
    pub id: u64,
    pub name: String,
    pub tenant: u64,
    pub size_bytes: u64,
}

/// The snapshot a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSnapshot {
    pub id: u64,
    pub name: String,
    pub epoch: u64,
}

/// The backup an incremental applies on top of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub backup: u64,
    /// SHA-256 of the parent's signed manifest body.
    pub manifest_sha256: String,
}

/// Blocks `start .. start + count`, all changed at this backup's snapshot;
/// `present` (hex, one bit per block, least significant bit first) tells which
/// hold data in the object (the others restore as zeros).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRange {
    pub start: u64,
    pub count: u32,
    pub present: String,
}

/// One data object and the ranges it covers, in block order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// SHA-256 (hex) of the object's bytes; also its name.
    pub object: String,
    pub bytes: u64,
    pub ranges: Vec<ChunkRange>,
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The backup's id in the cluster that took it.
    pub backup: u64,
    pub volume: ManifestVolume,
    pub snapshot: ManifestSnapshot,
    /// SHA-256 of the volume key: restore checks it is the key it re-wraps.
    pub key_fingerprint: String,
    pub parent: Option<ParentRef>,
    pub block_size: u32,
    pub chunks: Vec<Chunk>,
    /// Blocks the ranges cover (changed since the parent; written, for a full backup).
    pub blocks_changed: u64,
    /// Blocks held in objects.
    pub blocks_stored: u64,
    /// Bytes of all objects.
    pub bytes_stored: u64,
    pub created_ms: u64,
}

/// An object's blocks in order: the block index and its ciphertext, or `None`
/// for a block that restores as zeros.
pub type ObjectBlocks<'a> = Vec<(u64, Option<&'a [u8]>)>;

/// Bit `i` of a least-significant-bit-first bitmap.
pub fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

impl ChunkRange {
    /// The present bitmap, decoded and checked against `count`.
    pub fn present_bits(&self) -> Result<Vec<u8>, BackupFormatError> {
        let bits = hex::decode(&self.present)
            .map_err(|_| BackupFormatError::Manifest(format!("range at {}: present is not hex", self.start)))?;
        if bits.len() != (self.count as usize).div_ceil(8) {
            return Err(BackupFormatError::Manifest(format!("range at {}: present has the wrong length", self.start)));
        }
        Ok(bits)
    }

    /// Blocks of the range present in the object.
    pub fn present_count(&self) -> Result<u64, BackupFormatError> {
        let bits = self.present_bits()?;
        Ok((0..self.count as usize).filter(|i| bit(&bits, *i)).count() as u64)
    }
}

impl Chunk {
    /// Blocks present in the object.
    pub fn stored_blocks(&self) -> Result<u64, BackupFormatError> {
        self.ranges.iter().map(ChunkRange::present_count).sum()
    }

    /// Checks an object's bytes against this entry (hash, length, every block's
    /// crc) and returns its blocks in order: `(block index, Some(ciphertext))`
    /// for a present block, `(block index, None)` for one that restores as zeros.
    pub fn open<'a>(&self, bytes: &'a [u8]) -> Result<ObjectBlocks<'a>, BackupFormatError> {
        let bad = |why: String| BackupFormatError::Object { object: self.object.clone(), why };
        if hex::encode(sha2::Sha256::digest(bytes)) != self.object {
            return Err(bad("its SHA-256 does not match the manifest (changed or truncated)".into()));
        }
        let n = self.stored_blocks()?;
        if bytes.len() as u64 != n * STORED_BLOCK_BYTES || self.bytes != bytes.len() as u64 {
            return Err(bad(format!("{} bytes, the manifest says {} blocks", bytes.len(), n)));
        }
        let (crcs, data) = bytes.split_at(n as usize * 4);
        let mut out = Vec::new();
        let mut k = 0usize;
        for r in &self.ranges {
            let bits = r.present_bits()?;
            for i in 0..r.count as usize {
                let block = r.start + i as u64;
                if bit(&bits, i) {
                    let b = &data[k * BLOCK_SIZE_BYTES..(k + 1) * BLOCK_SIZE_BYTES];
                    let crc = u32::from_le_bytes(crcs[k * 4..k * 4 + 4].try_into().expect("4 bytes"));
                    if crate::block_crc(b) != crc {
                        return Err(bad(format!("block {block} fails its crc")));
                    }
                    out.push((block, Some(b)));
                    k += 1;
                } else {
                    out.push((block, None));
                }
            }
        }
        Ok(out)
    }
}

impl Manifest {
    /// Checks the manifest's own structure: format, ranges in order, inside the
    /// volume, no overlap, objects not over [`CHUNK_BLOCKS`], totals that add up.
    pub fn check(&self) -> Result<(), BackupFormatError> {
        let bad = |s: String| Err(BackupFormatError::Manifest(s));
        if self.format != FORMAT {
            return bad(format!("format {:?}, this slate reads {FORMAT:?}", self.format));
        }
        if self.block_size as usize != BLOCK_SIZE_BYTES {
            return bad(format!("block size {}", self.block_size));
        }
        let blocks = self.volume.size_bytes / BLOCK_SIZE_BYTES as u64;
        let (mut next, mut changed, mut stored, mut bytes) = (0u64, 0u64, 0u64, 0u64);
        for c in &self.chunks {
            if c.object.len() != 64 || hex::decode(&c.object).is_err() {
                return bad(format!("object name {:?} is not a SHA-256", c.object));
            }
            let n = c.stored_blocks()?;
            if n > u64::from(CHUNK_BLOCKS) || c.bytes != n * STORED_BLOCK_BYTES {
                return bad(format!("object {} holds {n} blocks in {} bytes", c.object, c.bytes));
            }
            for r in &c.ranges {
                let end = r.start.checked_add(u64::from(r.count));
                if r.count == 0 || r.start < next || end.is_none_or(|e| e > blocks) {
                    return bad(format!("range {}+{} is out of order or outside the volume", r.start, r.count));
                }
                next = r.start + u64::from(r.count);
                changed += u64::from(r.count);
            }
            stored += n;
            bytes += c.bytes;
        }
        if (changed, stored, bytes) != (self.blocks_changed, self.blocks_stored, self.bytes_stored) {
            return bad("the totals do not add up".into());
        }
        Ok(())
    }

    /// The name of an object in a target.
    pub fn object_key(object: &str) -> String {
        format!("objects/{}/{object}", &object[..2.min(object.len())])
    }

    /// The name of backup `backup`'s manifest of volume `volume` in a target.
    pub fn manifest_key(volume: u64, backup: u64) -> String {
        format!("manifests/vol-{volume}/backup-{backup}.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut o: Vec<u8> = blocks.iter().flat_map(|b| crate::block_crc(b).to_le_bytes()).collect();
        for b in blocks {
            o.extend_from_slice(b);
        }
        o
    }

    fn sample() -> (Manifest, Vec<u8>) {
        let blocks = vec![vec![1u8; BLOCK_SIZE_BYTES], vec![2u8; BLOCK_SIZE_BYTES]];
        let o = object(&blocks);
        let chunk = Chunk {
            object: hex::encode(sha2::Sha256::digest(&o)),
            bytes: o.len() as u64,
            // Blocks 10 and 12 present, 11 trimmed.
            ranges: vec![ChunkRange { start: 10, count: 3, present: "05".into() }],
        };
        let m = Manifest {
            format: FORMAT.into(),
            backup: 1,
            volume: ManifestVolume { id: 1, name: "v".into(), tenant: 0, size_bytes: 1 << 20 },
            snapshot: ManifestSnapshot { id: 1, name: "s".into(), epoch: 1 },
            key_fingerprint: "00".into(),
            parent: None,
            block_size: BLOCK_SIZE_BYTES as u32,
            chunks: vec![chunk],
            blocks_changed: 3,
            blocks_stored: 2,
            bytes_stored: o.len() as u64,
            created_ms: 0,
        };
        (m, o)
    }

    #[test]
    fn an_object_opens_to_its_blocks_and_holes() {
        let (m, o) = sample();
        m.check().unwrap();
        let blocks = m.chunks[0].open(&o).unwrap();
        assert_eq!(
            blocks.iter().map(|(b, d)| (*b, d.map(|d| d[0]))).collect::<Vec<_>>(),
            [(10, Some(1)), (11, None), (12, Some(2))]
        );
    }

    #[test]
    fn a_changed_or_short_object_is_refused() {
        let (m, o) = sample();
        let mut flipped = o.clone();
        flipped[100] ^= 1;
        assert!(m.chunks[0].open(&flipped).unwrap_err().to_string().contains("SHA-256"));
        assert!(m.chunks[0].open(&o[..o.len() - 1]).is_err());
        // A crc that lies is caught even when the hash was recomputed.
        let mut lying = o;
        lying[0] ^= 1;
        let mut m2 = m.clone();
        m2.chunks[0].object = hex::encode(sha2::Sha256::digest(&lying));
        assert!(m2.chunks[0].open(&lying).unwrap_err().to_string().contains("crc"));
    }

    #[test]
    fn bad_manifests_are_refused() {
        let (m, _) = sample();
        let mut out_of_volume = m.clone();
        out_of_volume.chunks[0].ranges[0].start = 256;
        assert!(out_of_volume.check().is_err());
        let mut totals = m.clone();
        totals.blocks_stored = 3;
        assert!(totals.check().is_err());
        let mut fmt = m;
        fmt.format = "other".into();
        assert!(fmt.check().is_err());
    }
}
