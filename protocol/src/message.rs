//! Data-plane messages: the versioned request and reply enums.
//!
//! A session opens with [`Request::Hello`] carrying a signed capability; every
//! later request names its volume and generation so that the node can check
//! both against the session's capability and against the highest generation it
//! has persisted for the volume (fencing). Requests carry an id chosen by the
//! client; replies echo it, so requests can be pipelined and answered out of
//! order.

use crate::capability::SignedCapability;
use crate::ids::{BlockIndex, Epoch, Generation, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use crate::wire::{bytes_at, DecodeError, Reader, Writer};
use bytes::Bytes;
use std::fmt;

/// The data-plane protocol version carried in the hello.
pub const PROTOCOL_VERSION: u16 = 2;
/// Most blocks one read or write may carry (4 MiB).
pub const MAX_IO_BLOCKS: u32 = 1024;
/// Most blocks one trim or write-zeroes may cover (one default segment).
pub const MAX_RANGE_BLOCKS: u32 = 1 << 18;
/// Most ranges in one ranges reply.
pub const MAX_RANGES: usize = 1 << 16;
/// Longest error detail carried on the wire.
pub const MAX_ERROR_DETAIL: usize = 512;

/// A run of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockRange {
    pub start: BlockIndex,
    pub count: u64,
}

/// Which volume and attachment a request acts for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub volume: VolumeId,
    pub generation: Generation,
}

/// A request from a client (or the metadata service) to a storage node.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    /// Opens a session. Must be the first frame; nothing else is accepted before it.
    Hello { version: u16, capability: SignedCapability },
    /// Writes whole blocks: `data` is `crcs.len()` blocks of ciphertext; `crcs[i]`
    /// is the crc32c of block i as computed by the client.
    Write { target: Target, start: BlockIndex, fua: bool, crcs: Vec<u32>, data: Bytes },
    /// Reads `count` blocks.
    Read { target: Target, start: BlockIndex, count: u32 },
    /// Reads `count` blocks as they were when the volume was frozen at `epoch`:
    /// through the layers frozen at or before it, never the newer ones. Same
    /// reply as [`Request::Read`]. `Epoch(u64::MAX)` names the head, so it reads like `Read`.
    ReadAt { target: Target, epoch: Epoch, start: BlockIndex, count: u32 },
    /// Makes every acknowledged write of the volume durable (writes are durable
    /// when acknowledged already; flush is a barrier for clients that want one).
    Flush { target: Target },
    /// Unmaps blocks: they read as unwritten (zeros) afterwards.
    Trim { target: Target, range: BlockRange },
    /// Same visible result as trim: the blocks read as zeros.
    WriteZeroes { target: Target, range: BlockRange },
    /// Freezes the current layer of every segment of the volume on this node at
    /// `epoch`; later writes go to a new layer.
    Snapshot { target: Target, epoch: Epoch },
    /// Blocks of `segment` written in layers after `from` up to and including `to`.
    ChangedBlocks { target: Target, segment: SegmentIndex, from: Epoch, to: Epoch },
    /// Deletes the layer frozen at `epoch`; its extents go to dirty, then zeroing.
    DeleteLayer { target: Target, segment: SegmentIndex, epoch: Epoch },
    /// Lists regions with writes in flight that were not known to complete.
    WriteIntents { target: Target },
    /// Clears write-intent records once the client has reconciled them.
    ClearIntents { target: Target, ranges: Vec<BlockRange> },
    /// Tells the node it holds a replica of `segment` (admin right).
    AssignSegment { target: Target, segment: SegmentIndex, segment_blocks: u64 },
    /// Tells the node it no longer holds `segment`; its extents go to zeroing (admin right).
    ReleaseSegment { target: Target, segment: SegmentIndex },
    /// Which blocks of a range are written (for block status and rebuild).
    Allocated { target: Target, range: BlockRange },
}

/// A reply, echoing the request id.
#[derive(Clone, PartialEq, Eq)]
pub enum Reply {
    /// The session is open.
    HelloOk { version: u16, node: NodeId },
    /// The request was done (and, for writes, is durable).
    Done,
    /// Read data: `written` has one bit per block (LSB first); unwritten blocks are
    /// zeros in `data` and have crc 0; the client returns plaintext zeros for them.
    Data { written: Vec<u8>, crcs: Vec<u32>, data: Bytes },
    /// A list of block ranges (changed blocks, write intents).
    Ranges(Vec<BlockRange>),
    /// A bitmap, one bit per block of the asked range (LSB first).
    Bitmap(Vec<u8>),
    /// The request failed; nothing was changed unless the kind says so.
    Error(WireError),
}

/// Typed error kinds that cross the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    /// The frame or message is malformed.
    Malformed = 1,
    /// A request other than hello came before the session was opened, or hello twice.
    NoSession = 2,
    /// Protocol version not supported.
    Version = 3,
    /// Capability signature does not verify.
    Forged = 4,
    /// Capability expired.
    Expired = 5,
    /// Capability not valid on this node.
    WrongNode = 6,
    /// Request names a volume other than the session's.
    WrongVolume = 7,
    /// The capability lacks the right for this request.
    NoRight = 8,
    /// A newer generation of the volume has been seen: the sender is fenced.
    StaleGeneration = 9,
    /// Blocks out of the volume's or segment's range on this node.
    OutOfRange = 10,
    /// This node holds no replica of the segment.
    NotAssigned = 11,
    /// A block's crc does not match its data on arrival.
    BadCrc = 12,
    /// Stored data does not match its crc (torn or corrupted); `detail` names the block.
    Corrupt = 13,
    /// The node has no verified-zero extent to allocate.
    NoSpace = 14,
    /// A disk I/O error.
    Io = 15,
    /// Too many bytes in flight or request too large.
    TooLarge = 16,
    /// Unknown epoch or layer.
    NoSuchLayer = 17,
    /// Anything else.
    Internal = 18,
    /// The capability is bound to another client's TLS certificate than this session's.
    NotHolder = 19,
    /// The capability's not-before time has not come yet.
    NotYetValid = 20,
}

impl ErrorKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Malformed,
            2 => Self::NoSession,
            3 => Self::Version,
            4 => Self::Forged,
            5 => Self::Expired,
            6 => Self::WrongNode,
            7 => Self::WrongVolume,
            8 => Self::NoRight,
            9 => Self::StaleGeneration,
            10 => Self::OutOfRange,
            11 => Self::NotAssigned,
            12 => Self::BadCrc,
            13 => Self::Corrupt,
            14 => Self::NoSpace,
            15 => Self::Io,
            16 => Self::TooLarge,
            17 => Self::NoSuchLayer,
            18 => Self::Internal,
            19 => Self::NotHolder,
            20 => Self::NotYetValid,
            _ => return None,
        })
    }
}

/// An error reply: a kind to match on, the block it concerns if any, and a detail for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    pub kind: ErrorKind,
    /// The first block the error concerns (e.g. the corrupt block), if any.
    pub block: Option<BlockIndex>,
    pub detail: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self { kind, block: None, detail: detail.into() }
    }
    pub fn at(kind: ErrorKind, block: BlockIndex, detail: impl Into<String>) -> Self {
        Self { kind, block: Some(block), detail: detail.into() }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)?;
        if let Some(b) = self.block {
            write!(f, " (at {b})")?;
        }
        Ok(())
    }
}

impl std::error::Error for WireError {}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WRITE: u8 = 0x02;
    pub const READ: u8 = 0x03;
    pub const FLUSH: u8 = 0x04;
    pub const TRIM: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x06;
    pub const SNAPSHOT: u8 = 0x07;
    pub const CHANGED: u8 = 0x08;
    pub const DELETE_LAYER: u8 = 0x09;
    pub const INTENTS: u8 = 0x0a;
    pub const CLEAR_INTENTS: u8 = 0x0b;
    pub const ASSIGN: u8 = 0x0c;
    pub const RELEASE: u8 = 0x0d;
    pub const ALLOCATED: u8 = 0x0e;
    pub const READ_AT: u8 = 0x0f;

    pub const R_HELLO_OK: u8 = 0x81;
    pub const R_DONE: u8 = 0x82;
    pub const R_DATA: u8 = 0x83;
    pub const R_RANGES: u8 = 0x84;
    pub const R_BITMAP: u8 = 0x85;
    pub const R_ERROR: u8 = 0xff;
}

fn put_target(w: &mut Writer, t: Target) {
    w.u64(t.volume.0);
    w.u64(t.generation.0);
}
fn get_target(r: &mut Reader<'_>) -> Result<Target, DecodeError> {
    Ok(Target { volume: VolumeId(r.u64()?), generation: Generation(r.u64()?) })
}
fn put_range(w: &mut Writer, range: BlockRange) {
    w.u64(range.start.0);
    w.u64(range.count);
}
fn get_range(r: &mut Reader<'_>, max_count: u64) -> Result<BlockRange, DecodeError> {
    let start = BlockIndex(r.u64()?);
    let count = r.u64()?;
    if count > max_count {
        return Err(DecodeError::Invalid("range length"));
    }
    start.checked_add(count).ok_or(DecodeError::Invalid("range overflows"))?;
    Ok(BlockRange { start, count })
}
/// A read's `start: u64 | count: u32`, bounded like every read.
fn get_read_range(r: &mut Reader<'_>) -> Result<(BlockIndex, u32), DecodeError> {
    let start = BlockIndex(r.u64()?);
    let count = r.u32()?;
    if count == 0 || count > MAX_IO_BLOCKS {
        return Err(DecodeError::Invalid("read block count"));
    }
    start.checked_add(u64::from(count)).ok_or(DecodeError::Invalid("range overflows"))?;
    Ok((start, count))
}
fn put_ranges(w: &mut Writer, ranges: &[BlockRange]) {
    w.u32(ranges.len() as u32);
    for r in ranges {
        put_range(w, *r);
    }
}
fn get_ranges(r: &mut Reader<'_>) -> Result<Vec<BlockRange>, DecodeError> {
    let n = r.u32()? as usize;
    if n > MAX_RANGES || n * 16 > r.remaining() {
        return Err(DecodeError::Invalid("range count"));
    }
    (0..n).map(|_| get_range(r, u64::MAX / 2)).collect()
}

impl Request {
    /// The message kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => kind::HELLO,
            Self::Write { .. } => kind::WRITE,
            Self::Read { .. } => kind::READ,
            Self::Flush { .. } => kind::FLUSH,
            Self::Trim { .. } => kind::TRIM,
            Self::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Self::Snapshot { .. } => kind::SNAPSHOT,
            Self::ChangedBlocks { .. } => kind::CHANGED,
            Self::DeleteLayer { .. } => kind::DELETE_LAYER,
            Self::WriteIntents { .. } => kind::INTENTS,
            Self::ClearIntents { .. } => kind::CLEAR_INTENTS,
            Self::AssignSegment { .. } => kind::ASSIGN,
            Self::ReleaseSegment { .. } => kind::RELEASE,
            Self::Allocated { .. } => kind::ALLOCATED,
            Self::ReadAt { .. } => kind::READ_AT,
        }
    }

    /// The volume and generation a request acts for (`None` for hello).
    pub fn target(&self) -> Option<Target> {
        match self {
            Self::Hello { .. } => None,
            Self::Write { target, .. }
            | Self::Read { target, .. }
            | Self::ReadAt { target, .. }
            | Self::Flush { target }
            | Self::Trim { target, .. }
            | Self::WriteZeroes { target, .. }
            | Self::Snapshot { target, .. }
            | Self::ChangedBlocks { target, .. }
            | Self::DeleteLayer { target, .. }
            | Self::WriteIntents { target }
            | Self::ClearIntents { target, .. }
            | Self::AssignSegment { target, .. }
            | Self::ReleaseSegment { target, .. }
            | Self::Allocated { target, .. } => Some(*target),
        }
    }

    /// Encodes the message body (kind, id, fields) into `w`.
    pub fn encode(&self, id: u64, w: &mut Writer) {
        w.u8(self.kind());
        w.u64(id);
        match self {
            Self::Hello { version, capability } => {
                w.u16(*version);
                capability.encode(w);
            }
            Self::Write { target, start, fua, crcs, data } => {
                put_target(w, *target);
                w.u64(start.0);
                w.u8(u8::from(*fua));
                w.u32(crcs.len() as u32);
                for c in crcs {
                    w.u32(*c);
                }
                w.bytes(data);
            }
            Self::Read { target, start, count } => {
                put_target(w, *target);
                w.u64(start.0);
                w.u32(*count);
            }
            Self::ReadAt { target, epoch, start, count } => {
                put_target(w, *target);
                w.u64(epoch.0);
                w.u64(start.0);
                w.u32(*count);
            }
            Self::Flush { target } | Self::WriteIntents { target } => put_target(w, *target),
            Self::Trim { target, range } | Self::WriteZeroes { target, range } | Self::Allocated { target, range } => {
                put_target(w, *target);
                put_range(w, *range);
            }
            Self::Snapshot { target, epoch } => {
                put_target(w, *target);
                w.u64(epoch.0);
            }
            Self::ChangedBlocks { target, segment, from, to } => {
                put_target(w, *target);
                w.u32(segment.0);
                w.u64(from.0);
                w.u64(to.0);
            }
            Self::DeleteLayer { target, segment, epoch } => {
                put_target(w, *target);
                w.u32(segment.0);
                w.u64(epoch.0);
            }
            Self::ClearIntents { target, ranges } => {
                put_target(w, *target);
                put_ranges(w, ranges);
            }
            Self::AssignSegment { target, segment, segment_blocks } => {
                put_target(w, *target);
                w.u32(segment.0);
                w.u64(*segment_blocks);
            }
            Self::ReleaseSegment { target, segment } => {
                put_target(w, *target);
                w.u32(segment.0);
            }
        }
    }

    /// Decodes a frame payload into (id, request). Write data is sliced from
    /// `payload` without copying.
    pub fn decode(payload: &Bytes) -> Result<(u64, Self), DecodeError> {
        let mut r = Reader::new(payload);
        let k = r.u8()?;
        let id = r.u64()?;
        let req = match k {
            kind::HELLO => {
                let version = r.u16()?;
                let capability = SignedCapability::decode(&mut r)?;
                Self::Hello { version, capability }
            }
            kind::WRITE => {
                let target = get_target(&mut r)?;
                let start = BlockIndex(r.u64()?);
                let fua = r.bool()?;
                let n = r.u32()?;
                if n == 0 || n > MAX_IO_BLOCKS {
                    return Err(DecodeError::Invalid("write block count"));
                }
                start.checked_add(u64::from(n)).ok_or(DecodeError::Invalid("range overflows"))?;
                let mut crcs = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    crcs.push(r.u32()?);
                }
                let data = bytes_at(payload, &mut r, n as usize * BLOCK_SIZE_BYTES)?;
                Self::Write { target, start, fua, crcs, data }
            }
            kind::READ => {
                let target = get_target(&mut r)?;
                let (start, count) = get_read_range(&mut r)?;
                Self::Read { target, start, count }
            }
            kind::READ_AT => {
                let target = get_target(&mut r)?;
                let epoch = Epoch(r.u64()?);
                let (start, count) = get_read_range(&mut r)?;
                Self::ReadAt { target, epoch, start, count }
            }
            kind::FLUSH => Self::Flush { target: get_target(&mut r)? },
            kind::INTENTS => Self::WriteIntents { target: get_target(&mut r)? },
            kind::TRIM => {
                Self::Trim { target: get_target(&mut r)?, range: get_range(&mut r, MAX_RANGE_BLOCKS.into())? }
            }
            kind::WRITE_ZEROES => {
                Self::WriteZeroes { target: get_target(&mut r)?, range: get_range(&mut r, MAX_RANGE_BLOCKS.into())? }
            }
            kind::ALLOCATED => {
                Self::Allocated { target: get_target(&mut r)?, range: get_range(&mut r, MAX_RANGE_BLOCKS.into())? }
            }
            kind::SNAPSHOT => Self::Snapshot { target: get_target(&mut r)?, epoch: Epoch(r.u64()?) },
            kind::CHANGED => Self::ChangedBlocks {
                target: get_target(&mut r)?,
                segment: SegmentIndex(r.u32()?),
                from: Epoch(r.u64()?),
                to: Epoch(r.u64()?),
            },
            kind::DELETE_LAYER => Self::DeleteLayer {
                target: get_target(&mut r)?,
                segment: SegmentIndex(r.u32()?),
                epoch: Epoch(r.u64()?),
            },
            kind::CLEAR_INTENTS => Self::ClearIntents { target: get_target(&mut r)?, ranges: get_ranges(&mut r)? },
            kind::ASSIGN => {
                let target = get_target(&mut r)?;
                let segment = SegmentIndex(r.u32()?);
                let segment_blocks = r.u64()?;
                if segment_blocks == 0 || segment_blocks > u64::from(MAX_RANGE_BLOCKS) * 16 {
                    return Err(DecodeError::Invalid("segment size"));
                }
                Self::AssignSegment { target, segment, segment_blocks }
            }
            kind::RELEASE => Self::ReleaseSegment { target: get_target(&mut r)?, segment: SegmentIndex(r.u32()?) },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok((id, req))
    }
}

impl Reply {
    /// Encodes the reply body (kind, id, fields) into `w`.
    pub fn encode(&self, id: u64, w: &mut Writer) {
        match self {
            Self::HelloOk { version, node } => {
                w.u8(kind::R_HELLO_OK);
                w.u64(id);
                w.u16(*version);
                w.u64(node.0);
            }
            Self::Done => {
                w.u8(kind::R_DONE);
                w.u64(id);
            }
            Self::Data { written, crcs, data } => {
                w.u8(kind::R_DATA);
                w.u64(id);
                w.u32(crcs.len() as u32);
                w.bytes(written);
                for c in crcs {
                    w.u32(*c);
                }
                w.bytes(data);
            }
            Self::Ranges(ranges) => {
                w.u8(kind::R_RANGES);
                w.u64(id);
                put_ranges(w, ranges);
            }
            Self::Bitmap(bits) => {
                w.u8(kind::R_BITMAP);
                w.u64(id);
                w.blob(bits);
            }
            Self::Error(e) => {
                w.u8(kind::R_ERROR);
                w.u64(id);
                w.u8(e.kind as u8);
                match e.block {
                    Some(b) => {
                        w.u8(1);
                        w.u64(b.0);
                    }
                    None => w.u8(0),
                }
                w.str_bounded(&e.detail, MAX_ERROR_DETAIL);
            }
        }
    }

    /// Decodes a frame payload into (id, reply).
    pub fn decode(payload: &Bytes) -> Result<(u64, Self), DecodeError> {
        let mut r = Reader::new(payload);
        let k = r.u8()?;
        let id = r.u64()?;
        let reply = match k {
            kind::R_HELLO_OK => Self::HelloOk { version: r.u16()?, node: NodeId(r.u64()?) },
            kind::R_DONE => Self::Done,
            kind::R_DATA => {
                let n = r.u32()?;
                if n > MAX_IO_BLOCKS {
                    return Err(DecodeError::Invalid("read block count"));
                }
                let n = n as usize;
                let written = r.take(n.div_ceil(8))?.to_vec();
                let mut crcs = Vec::with_capacity(n);
                for _ in 0..n {
                    crcs.push(r.u32()?);
                }
                let data = bytes_at(payload, &mut r, n * BLOCK_SIZE_BYTES)?;
                Self::Data { written, crcs, data }
            }
            kind::R_RANGES => Self::Ranges(get_ranges(&mut r)?),
            kind::R_BITMAP => Self::Bitmap(r.blob(MAX_RANGE_BLOCKS as usize / 8)?.to_vec()),
            kind::R_ERROR => {
                let kind = ErrorKind::from_u8(r.u8()?).ok_or(DecodeError::Invalid("error kind"))?;
                let block = if r.bool()? { Some(BlockIndex(r.u64()?)) } else { None };
                let detail = r.string()?;
                Self::Error(WireError { kind, block, detail })
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok((id, reply))
    }
}

/// Tests bit `i` of an LSB-first bitmap.
pub fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Sets bit `i` of an LSB-first bitmap (grows it as needed).
pub fn set_bit(bits: &mut Vec<u8>, i: usize) {
    if bits.len() <= i / 8 {
        bits.resize(i / 8 + 1, 0);
    }
    bits[i / 8] |= 1 << (i % 8);
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write { target, start, fua, crcs, .. } => f
                .debug_struct("Write")
                .field("target", target)
                .field("start", start)
                .field("blocks", &crcs.len())
                .field("fua", fua)
                .finish(),
            Self::Hello { version, capability } => {
                f.debug_struct("Hello").field("version", version).field("capability", capability).finish()
            }
            Self::Read { target, start, count } => {
                f.debug_struct("Read").field("target", target).field("start", start).field("count", count).finish()
            }
            Self::ReadAt { target, epoch, start, count } => f
                .debug_struct("ReadAt")
                .field("target", target)
                .field("epoch", epoch)
                .field("start", start)
                .field("count", count)
                .finish(),
            other => write!(f, "Request(kind={:#04x}, target={:?})", other.kind(), other.target()),
        }
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HelloOk { version, node } => write!(f, "HelloOk(v{version}, {node})"),
            Self::Done => write!(f, "Done"),
            Self::Data { crcs, .. } => write!(f, "Data({} blocks)", crcs.len()),
            Self::Ranges(r) => write!(f, "Ranges({r:?})"),
            Self::Bitmap(b) => write!(f, "Bitmap({} bytes)", b.len()),
            Self::Error(e) => write!(f, "Error({e})"),
        }
    }
}
