//! The metadata journal: checksummed, sequence-numbered entries in a circular
//! region, one entry per group commit.
//!
//! An entry is a header (magic, crc32c, format nonce, lsn, payload length,
//! block count) followed by records, padded to whole 4 KiB blocks, and written
//! with O_DIRECT in the same io_uring batch as the data it describes, followed
//! by one fdatasync. Every record states an absolute result ("block 7 of
//! extent 3 is written with crc X", "extent 9 is free"), so replaying records
//! onto a page that already holds some of their effects gives the same
//! state: replay needs no per-page lsn comparisons.
//!
//! Replay starts at the checkpoint's tail and reads entries while each has the
//! next lsn, the format nonce and a good checksum; an entry that does not fit
//! before the end of the region is written at its start (the reader, on a bad
//! header, tries offset 0 once). The first bad entry ends replay: it is the
//! torn tail of a batch that was never acknowledged.

use super::layout::{BLOCK, MAGIC_JOURNAL};
use super::uring::{AlignedBuf, ALIGN};
use slate_protocol::wire::{Reader, Writer};
use slate_protocol::{Epoch, Generation, SegmentIndex, VolumeId};

pub const ENTRY_HEADER: usize = 32;

/// One metadata change. Records are absolute (idempotent when replayed in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A free (verified zero) extent now belongs to a segment layer at `slot`.
    Alloc {
        extent: u32,
        volume: VolumeId,
        segment: SegmentIndex,
        layer: u64,
        slot: u32,
    },
    /// An owned extent moves to another layer of the same segment (layer fold).
    Reown {
        extent: u32,
        layer: u64,
    },
    /// Lifecycle transition: Dirty (owner dropped), Zeroing, Free (verified), Failed.
    State {
        extent: u32,
        state: u8,
    },
    /// Blocks `offset..offset+crcs.len()` of the extent hold data with these crcs.
    Write {
        extent: u32,
        offset: u32,
        crcs: Vec<u32>,
    },
    /// Blocks read as unwritten (`zero = false`) or as zeros masking older layers (`zero = true`).
    Trim {
        extent: u32,
        offset: u32,
        count: u32,
        zero: bool,
    },
    Generation {
        volume: VolumeId,
        gen: Generation,
    },
    Assign {
        volume: VolumeId,
        segment: SegmentIndex,
        blocks: u64,
    },
    Release {
        volume: VolumeId,
        segment: SegmentIndex,
    },
    /// A snapshot: a new head layer with id `layer` starting after `base`.
    LayerCreate {
        volume: VolumeId,
        segment: SegmentIndex,
        layer: u64,
        base: Epoch,
    },
    /// A layer is being folded away (reads of its snapshot refused until done).
    LayerDeleting {
        volume: VolumeId,
        segment: SegmentIndex,
        layer: u64,
    },
    /// Fold done: layer `removed` is gone; layer `into` now starts after `base`.
    LayerMerged {
        volume: VolumeId,
        segment: SegmentIndex,
        removed: u64,
        into: u64,
        base: Epoch,
    },
    IntentSet {
        volume: VolumeId,
        region: u64,
    },
    IntentClear {
        volume: VolumeId,
        region: u64,
    },
}

mod tag {
    pub const ALLOC: u8 = 1;
    pub const REOWN: u8 = 2;
    pub const STATE: u8 = 3;
    pub const WRITE: u8 = 4;
    pub const TRIM: u8 = 5;
    pub const GENERATION: u8 = 6;
    pub const ASSIGN: u8 = 7;
    pub const RELEASE: u8 = 8;
    pub const LAYER_CREATE: u8 = 9;
    pub const LAYER_DELETING: u8 = 10;
    pub const LAYER_MERGED: u8 = 11;
    pub const INTENT_SET: u8 = 12;
    pub const INTENT_CLEAR: u8 = 13;
}

impl Record {
    /// Upper bound of the encoded size.
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::Write { crcs, .. } => 13 + crcs.len() * 4,
            _ => 40,
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        match self {
            Record::Alloc { extent, volume, segment, layer, slot } => {
                w.u8(tag::ALLOC);
                w.u32(*extent);
                w.u64(volume.0);
                w.u32(segment.0);
                w.u64(*layer);
                w.u32(*slot);
            }
            Record::Reown { extent, layer } => {
                w.u8(tag::REOWN);
                w.u32(*extent);
                w.u64(*layer);
            }
            Record::State { extent, state } => {
                w.u8(tag::STATE);
                w.u32(*extent);
                w.u8(*state);
            }
            Record::Write { extent, offset, crcs } => {
                w.u8(tag::WRITE);
                w.u32(*extent);
                w.u32(*offset);
                w.u32(crcs.len() as u32);
                for c in crcs {
                    w.u32(*c);
                }
            }
            Record::Trim { extent, offset, count, zero } => {
                w.u8(tag::TRIM);
                w.u32(*extent);
                w.u32(*offset);
                w.u32(*count);
                w.u8(u8::from(*zero));
            }
            Record::Generation { volume, gen } => {
                w.u8(tag::GENERATION);
                w.u64(volume.0);
                w.u64(gen.0);
            }
            Record::Assign { volume, segment, blocks } => {
                w.u8(tag::ASSIGN);
                w.u64(volume.0);
                w.u32(segment.0);
                w.u64(*blocks);
            }
            Record::Release { volume, segment } => {
                w.u8(tag::RELEASE);
                w.u64(volume.0);
                w.u32(segment.0);
            }
            Record::LayerCreate { volume, segment, layer, base } => {
                w.u8(tag::LAYER_CREATE);
                w.u64(volume.0);
                w.u32(segment.0);
                w.u64(*layer);
                w.u64(base.0);
            }
            Record::LayerDeleting { volume, segment, layer } => {
                w.u8(tag::LAYER_DELETING);
                w.u64(volume.0);
                w.u32(segment.0);
                w.u64(*layer);
            }
            Record::LayerMerged { volume, segment, removed, into, base } => {
                w.u8(tag::LAYER_MERGED);
                w.u64(volume.0);
                w.u32(segment.0);
                w.u64(*removed);
                w.u64(*into);
                w.u64(base.0);
            }
            Record::IntentSet { volume, region } => {
                w.u8(tag::INTENT_SET);
                w.u64(volume.0);
                w.u64(*region);
            }
            Record::IntentClear { volume, region } => {
                w.u8(tag::INTENT_CLEAR);
                w.u64(volume.0);
                w.u64(*region);
            }
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, slate_protocol::DecodeError> {
        let v = |r: &mut Reader<'_>| r.u64().map(VolumeId);
        let s = |r: &mut Reader<'_>| r.u32().map(SegmentIndex);
        Ok(match r.u8()? {
            tag::ALLOC => {
                Record::Alloc { extent: r.u32()?, volume: v(r)?, segment: s(r)?, layer: r.u64()?, slot: r.u32()? }
            }
            tag::REOWN => Record::Reown { extent: r.u32()?, layer: r.u64()? },
            tag::STATE => Record::State { extent: r.u32()?, state: r.u8()? },
            tag::WRITE => {
                let extent = r.u32()?;
                let offset = r.u32()?;
                let n = r.u32()? as usize;
                if n > r.remaining() / 4 {
                    return Err(slate_protocol::DecodeError::Truncated);
                }
                let mut crcs = Vec::with_capacity(n);
                for _ in 0..n {
                    crcs.push(r.u32()?);
                }
                Record::Write { extent, offset, crcs }
            }
            tag::TRIM => Record::Trim { extent: r.u32()?, offset: r.u32()?, count: r.u32()?, zero: r.bool()? },
            tag::GENERATION => Record::Generation { volume: v(r)?, gen: Generation(r.u64()?) },
            tag::ASSIGN => Record::Assign { volume: v(r)?, segment: s(r)?, blocks: r.u64()? },
            tag::RELEASE => Record::Release { volume: v(r)?, segment: s(r)? },
            tag::LAYER_CREATE => {
                Record::LayerCreate { volume: v(r)?, segment: s(r)?, layer: r.u64()?, base: Epoch(r.u64()?) }
            }
            tag::LAYER_DELETING => Record::LayerDeleting { volume: v(r)?, segment: s(r)?, layer: r.u64()? },
            tag::LAYER_MERGED => Record::LayerMerged {
                volume: v(r)?,
                segment: s(r)?,
                removed: r.u64()?,
                into: r.u64()?,
                base: Epoch(r.u64()?),
            },
            tag::INTENT_SET => Record::IntentSet { volume: v(r)?, region: r.u64()? },
            tag::INTENT_CLEAR => Record::IntentClear { volume: v(r)?, region: r.u64()? },
            k => return Err(slate_protocol::DecodeError::UnknownKind(k)),
        })
    }
}

/// Encodes one entry into whole blocks.
pub fn encode_entry(nonce: u64, lsn: u64, records: &[Record]) -> AlignedBuf {
    let mut w = Writer::with_capacity(records.iter().map(Record::encoded_len).sum());
    for r in records {
        r.encode(&mut w);
    }
    let payload = w.into_vec();
    let mut b = AlignedBuf::zeroed(ENTRY_HEADER + payload.len());
    let nblocks = (b.len() / ALIGN) as u32;
    b[0..4].copy_from_slice(&MAGIC_JOURNAL.to_le_bytes());
    b[8..16].copy_from_slice(&nonce.to_le_bytes());
    b[16..24].copy_from_slice(&lsn.to_le_bytes());
    b[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[28..32].copy_from_slice(&nblocks.to_le_bytes());
    b[ENTRY_HEADER..ENTRY_HEADER + payload.len()].copy_from_slice(&payload);
    let crc = crc32c::crc32c(&b[8..ENTRY_HEADER + payload.len()]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// From an entry's first block: its block count, if the header is for `lsn` of this format.
pub fn entry_blocks(first: &[u8], nonce: u64, lsn: u64) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes(first[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(first[o..o + 8].try_into().unwrap_or_default());
    if u32_at(0) != MAGIC_JOURNAL || u64_at(8) != nonce || u64_at(16) != lsn {
        return None;
    }
    let payload = u32_at(24) as usize;
    let nblocks = u64::from(u32_at(28));
    (nblocks == (ENTRY_HEADER + payload).div_ceil(ALIGN) as u64).then_some(nblocks)
}

/// Checks a whole entry and decodes its records. None if torn or corrupt.
pub fn decode_entry(b: &[u8]) -> Option<Vec<Record>> {
    let payload = u32::from_le_bytes(b.get(24..28)?.try_into().ok()?) as usize;
    let end = ENTRY_HEADER.checked_add(payload)?;
    if end > b.len() {
        return None;
    }
    let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    if crc32c::crc32c(&b[8..end]) != crc {
        return None;
    }
    let mut r = Reader::new(&b[ENTRY_HEADER..end]);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        out.push(Record::decode(&mut r).ok()?);
    }
    Some(out)
}

/// Write position and free space of the circular journal region.
#[derive(Debug, Clone)]
pub struct JournalRing {
    /// First block of the region on disk, and its size in blocks.
    pub start: u64,
    pub blocks: u64,
    /// Next write offset (blocks within the region) and the lsn it will carry.
    pub head: u64,
    pub next_lsn: u64,
    /// Offset and lsn of the oldest entry still needed (the checkpoint's tail).
    pub tail: u64,
    pub tail_lsn: u64,
}

impl JournalRing {
    /// Blocks between tail and head (including wrap waste).
    pub fn used(&self) -> u64 {
        if self.head >= self.tail {
            self.head - self.tail
        } else {
            self.blocks - self.tail + self.head
        }
    }

    /// Where an entry of `n` blocks would go, if it fits without reaching the tail.
    pub fn place(&self, n: u64) -> Option<u64> {
        if n >= self.blocks {
            return None;
        }
        let at = if self.head + n <= self.blocks { self.head } else { 0 };
        let used_after = if at == 0 && self.head != 0 {
            // Wrapping wastes the end of the region.
            if self.tail > self.head {
                return None;
            }
            self.blocks - self.tail + n
        } else {
            self.used() + n
        };
        (used_after < self.blocks).then_some(at)
    }

    /// Records that an entry of `n` blocks was placed at `at`.
    pub fn advance(&mut self, at: u64, n: u64) {
        self.head = at + n;
        if self.head == self.blocks {
            self.head = 0;
        }
        self.next_lsn += 1;
    }

    /// Byte offset on disk of region offset `at`.
    pub fn disk_offset(&self, at: u64) -> u64 {
        (self.start + at) * BLOCK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_torn() {
        let recs = vec![
            Record::Alloc { extent: 1, volume: VolumeId(2), segment: SegmentIndex(3), layer: 4, slot: 5 },
            Record::Write { extent: 1, offset: 7, crcs: vec![1, 2, 3] },
            Record::Trim { extent: 1, offset: 0, count: 9, zero: true },
            Record::LayerMerged { volume: VolumeId(1), segment: SegmentIndex(0), removed: 1, into: 2, base: Epoch(0) },
            Record::IntentSet { volume: VolumeId(1), region: 77 },
        ];
        let b = encode_entry(99, 5, &recs);
        assert_eq!(entry_blocks(&b, 99, 5), Some(1));
        assert_eq!(entry_blocks(&b, 99, 6), None);
        assert_eq!(decode_entry(&b).unwrap(), recs);
        let mut torn = AlignedBuf::copy_from(&b);
        torn[40] ^= 1;
        assert!(decode_entry(&torn).is_none());
    }

    #[test]
    fn ring_placement() {
        let mut j = JournalRing { start: 3, blocks: 10, head: 0, next_lsn: 1, tail: 0, tail_lsn: 1 };
        assert_eq!(j.place(4), Some(0));
        j.advance(0, 4);
        assert_eq!(j.place(5), Some(4));
        j.advance(4, 5);
        assert_eq!(j.used(), 9);
        assert_eq!(j.place(1), None);
        j.tail = 4;
        // 9 + 2 > 10: wraps to 0, wasting block 9; used after = 10 - 4 + 2 = 8.
        assert_eq!(j.place(2), Some(0));
        j.advance(0, 2);
        assert_eq!(j.used(), 8);
        assert_eq!(j.place(3), None);
    }
}
