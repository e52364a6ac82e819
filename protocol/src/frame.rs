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

/// The same frame as [`encode_request`], in two parts to send one after the other: a
/// write's data, which ends the frame, is the second part and is not copied (a write to
/// two replicas shares one buffer); for any other request the second part is empty.
pub fn encode_request_parts(id: u64, req: &Request) -> (Bytes, Bytes) {
    let Request::Write { target, start, fua, crcs, data } = req else { return (encode_request(id, req), Bytes::new()) };
    let head = Request::Write { target: *target, start: *start, fua: *fua, crcs: crcs.clone(), data: Bytes::new() };
    let mut w = writer_for(crcs.len() * 4);
    head.encode(id, &mut w);
    let v = w.as_mut_vec();
    let payload_len = v.len() - FRAME_HEADER_BYTES + data.len();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&v[FRAME_HEADER_BYTES..]), data);
    v[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    v[4..8].copy_from_slice(&crc.to_le_bytes());
    (Bytes::from(w.into_vec()), data.clone())
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

#[cfg(test)]
mod parts_tests {
    use super::*;

    #[test]
    fn a_frame_in_parts_is_the_same_frame() {
        let data = Bytes::from((0..2 * BLOCK_SIZE_BYTES).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let crcs = data.chunks(BLOCK_SIZE_BYTES).map(crc32c::crc32c).collect();
        let target = crate::Target { volume: crate::VolumeId(3), generation: crate::Generation(2) };
        let write = Request::Write { target, start: crate::BlockIndex(9), fua: true, crcs, data: data.clone() };
        let (head, body) = encode_request_parts(42, &write);
        assert_eq!([&head[..], &body[..]].concat(), encode_request(42, &write).to_vec());
        assert_eq!(body.as_ptr(), data.as_ptr(), "the data is shared, not copied");
        let flush = Request::Flush { target };
        let (head, body) = encode_request_parts(43, &flush);
        assert_eq!(head, encode_request(43, &flush));
        assert!(body.is_empty());
    }
}
