//! Length-prefixed, checksummed frames.
//!
//! ```text
//! +-----------------+------------------------+---------------------+
//! | len: u32 LE     | crc32c(payload): u32 LE| payload (len bytes) |
//! +-----------------+------------------------+---------------------+
//! ```
//!
//! `len` is bounded by [`MAX_FRAME_PAYLOAD`]: a peer announcing more is cut
//! off before anything is buffered. A crc mismatch means the byte stream can
//! no longer be trusted and the connection is closed.

use crate::ids::BLOCK_SIZE_BYTES;
use crate::message::{Reply, Request, MAX_IO_BLOCKS};
use crate::wire::Writer;
use bytes::{Buf, Bytes, BytesMut};

/// Bytes in a frame header.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Largest payload: the largest write (data and crcs) plus room for its header.
pub const MAX_FRAME_PAYLOAD: usize = MAX_IO_BLOCKS as usize * (BLOCK_SIZE_BYTES + 4) + 1024;

/// Why a byte stream could not be cut into frames. Either is fatal for the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_PAYLOAD}")]
    TooLarge(usize),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("empty frame")]
    Empty,
}

fn finish_frame(mut w: Writer) -> Bytes {
    let v = w.as_mut_vec();
    let payload_len = v.len() - FRAME_HEADER_BYTES;
    let crc = crc32c::crc32c(&v[FRAME_HEADER_BYTES..]);
    v[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    v[4..8].copy_from_slice(&crc.to_le_bytes());
    Bytes::from(w.into_vec())
}

fn writer_for(extra: usize) -> Writer {
    let mut w = Writer::with_capacity(FRAME_HEADER_BYTES + 64 + extra);
    w.bytes(&[0; FRAME_HEADER_BYTES]);
    w
}

/// A whole frame (header and payload) carrying `req`.
pub fn encode_request(id: u64, req: &Request) -> Bytes {
    let extra = match req {
        Request::Write { data, crcs, .. } => data.len() + crcs.len() * 4,
        _ => 0,
    };
    let mut w = writer_for(extra);
    req.encode(id, &mut w);
    finish_frame(w)
}

/// A whole frame (header and payload) carrying `reply`.
pub fn encode_reply(id: u64, reply: &Reply) -> Bytes {
    let extra = match reply {
        Reply::Data { data, crcs, .. } => data.len() + crcs.len() * 5,
        _ => 0,
    };
    let mut w = writer_for(extra);
    reply.encode(id, &mut w);
    finish_frame(w)
}

/// Takes one complete frame's payload off the front of `buf`, if it holds one.
/// Returns `Ok(None)` when more bytes are needed.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if buf.len() < FRAME_HEADER_BYTES + len {
        buf.reserve(FRAME_HEADER_BYTES + len - buf.len());
        return Ok(None);
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    buf.advance(FRAME_HEADER_BYTES);
    let payload = buf.split_to(len).freeze();
    if crc32c::crc32c(&payload) != crc {
        return Err(FrameError::BadChecksum);
    }
    Ok(Some(payload))
}
