//! Newtypes for every address and unit Slate talks about.
//!
//! A block index is not a byte offset, a segment is not an extent, a
//! generation is not an epoch. Each gets its own type so that the compiler
//! catches a mix-up, and every conversion between them is a named function
//! here rather than an `as` cast in a caller.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Size of one block: the unit of I/O, of encryption and of checksums.
pub const BLOCK_SIZE_BYTES: usize = 4096;
/// `BLOCK_SIZE_BYTES` as a `u64`, for offset arithmetic.
pub const BLOCK_SIZE_BYTES_U64: u64 = BLOCK_SIZE_BYTES as u64;
/// Default segment size: 1 GiB of volume address space, the unit of placement.
pub const DEFAULT_SEGMENT_BLOCKS: u64 = (1 << 30) / BLOCK_SIZE_BYTES_U64;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw value, for encoding.
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// A volume, assigned by the metadata service; never reused.
    VolumeId(u64), "vol-"
);
id_newtype!(
    /// A segment of a volume: a fixed range of its blocks, the unit of placement.
    SegmentIndex(u32), "seg-"
);
id_newtype!(
    /// A block's number within its volume (not within a segment, not a byte offset).
    BlockIndex(u64), "blk-"
);
id_newtype!(
    /// An extent's number on one disk: the unit of physical allocation and erasure.
    ExtentId(u32), "ext-"
);
id_newtype!(
    /// A physical disk, unique in the cluster.
    DiskId(u64), "disk-"
);
id_newtype!(
    /// A storage or metadata node, unique in the cluster.
    NodeId(u64), "node-"
);
id_newtype!(
    /// Bumped by the metadata service at every read-write attach; nodes refuse older ones.
    Generation(u64), "gen-"
);
id_newtype!(
    /// A snapshot layer of a segment: writes go to the newest epoch's layer.
    Epoch(u64), "epoch-"
);

impl Generation {
    /// The next generation (used by the metadata service on attach).
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl Epoch {
    /// The next epoch (used when a snapshot freezes the current layer).
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

/// How a volume's address space is cut into segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentGeometry {
    /// Blocks per segment; every segment but the last of a volume is full.
    pub segment_blocks: u64,
}

impl Default for SegmentGeometry {
    fn default() -> Self {
        Self { segment_blocks: DEFAULT_SEGMENT_BLOCKS }
    }
}

impl SegmentGeometry {
    /// The segment that holds `block`.
    pub fn segment_of(self, block: BlockIndex) -> SegmentIndex {
        SegmentIndex(u32::try_from(block.0 / self.segment_blocks).unwrap_or(u32::MAX))
    }

    /// `block`'s position within its segment.
    pub fn offset_in_segment(self, block: BlockIndex) -> u64 {
        block.0 % self.segment_blocks
    }

    /// The first block of `segment`.
    pub fn first_block(self, segment: SegmentIndex) -> BlockIndex {
        BlockIndex(u64::from(segment.0) * self.segment_blocks)
    }

    /// Number of segments needed for a volume of `volume_blocks` blocks.
    pub fn segment_count(self, volume_blocks: u64) -> u32 {
        u32::try_from(volume_blocks.div_ceil(self.segment_blocks)).unwrap_or(u32::MAX)
    }
}

impl BlockIndex {
    /// The block containing byte `offset` of the volume, if it is block-aligned.
    pub fn from_byte_offset(offset_bytes: u64) -> Option<Self> {
        offset_bytes.is_multiple_of(BLOCK_SIZE_BYTES_U64).then_some(Self(offset_bytes / BLOCK_SIZE_BYTES_U64))
    }

    /// The byte offset of this block in the volume.
    pub fn byte_offset(self) -> u64 {
        self.0 * BLOCK_SIZE_BYTES_U64
    }

    /// `self + n` blocks, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Self> {
        self.0.checked_add(n).map(Self)
    }
}

/// Number of whole blocks in `bytes`, if `bytes` is a multiple of the block size.
pub fn blocks_in_bytes(bytes: u64) -> Option<u64> {
    bytes.is_multiple_of(BLOCK_SIZE_BYTES_U64).then_some(bytes / BLOCK_SIZE_BYTES_U64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_round_trips() {
        let g = SegmentGeometry { segment_blocks: 1024 };
        let b = BlockIndex(5 * 1024 + 7);
        assert_eq!(g.segment_of(b), SegmentIndex(5));
        assert_eq!(g.offset_in_segment(b), 7);
        assert_eq!(g.first_block(SegmentIndex(5)), BlockIndex(5 * 1024));
        assert_eq!(g.segment_count(1025), 2);
        assert_eq!(BlockIndex::from_byte_offset(8192), Some(BlockIndex(2)));
        assert_eq!(BlockIndex::from_byte_offset(8193), None);
    }
}
