//! Block arithmetic shared by the actor, the rebuild and the reconciliation:
//! cutting a range into requests a node accepts, checking a read reply, and
//! turning one replica's read reply into the requests that make another
//! replica return the same bytes.

use bytes::Bytes;
use slate_protocol::message::{bit, BlockRange, MAX_IO_BLOCKS};
use slate_protocol::{block_crc, BlockIndex, Request, SegmentIndex, Target, BLOCK_SIZE_BYTES};

/// A piece of a request that lies in one segment and fits one node request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub segment: SegmentIndex,
    pub start: u64,
    pub count: u64,
    /// Offset of the piece from the start of the whole request, in blocks.
    pub offset: u64,
}

/// Cuts `[start, start + count)` at segment boundaries and into pieces of at most `max` blocks.
pub fn split(start: u64, count: u64, segment_blocks: u64, max: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = start;
    let end = start + count;
    while pos < end {
        let seg_end = (pos / segment_blocks + 1) * segment_blocks;
        let n = (end.min(seg_end) - pos).min(max);
        let segment = SegmentIndex(u32::try_from(pos / segment_blocks).unwrap_or(u32::MAX));
        out.push(Piece { segment, start: pos, count: n, offset: pos - start });
        pos += n;
    }
    out
}

/// Maximal runs of equal bits in the first `n` bits of `bits`: (first, len, set).
pub fn bit_runs(bits: &[u8], n: usize) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for i in 0..n {
        let b = bit(bits, i);
        match out.last_mut() {
            Some(last) if last.2 == b => last.1 += 1,
            _ => out.push((i, 1, b)),
        }
    }
    out
}

/// Checks a read reply of `count` blocks: sizes, and every written block
/// against its crc (the node checked the stored crc already; this catches a
/// corruption in transit or in the node's memory). Returns the first bad
/// block's position, or `Err(None)` when the reply has the wrong shape.
pub fn check_data(count: usize, written: &[u8], crcs: &[u32], data: &[u8]) -> Result<(), Option<usize>> {
    if crcs.len() != count || data.len() != count * BLOCK_SIZE_BYTES || written.len() < count.div_ceil(8) {
        return Err(None);
    }
    for (i, (block, crc)) in data.chunks(BLOCK_SIZE_BYTES).zip(crcs).enumerate() {
        if bit(written, i) && block_crc(block) != *crc {
            return Err(Some(i));
        }
    }
    Ok(())
}

/// The requests that make a replica hold exactly what a read reply
/// (`written`, `crcs`, `data` for blocks from `start`) shows: writes for the
/// written runs (with their crcs, so the ciphertext is never re-encrypted)
/// and, when `trim_unwritten`, trims for the unwritten runs. Only blocks in
/// `only` (positions in the reply) are covered when it is given.
pub fn copy_requests(
    target: Target,
    start: BlockIndex,
    written: &[u8],
    crcs: &[u32],
    data: &Bytes,
    only: Option<std::ops::Range<usize>>,
    trim_unwritten: bool,
) -> Vec<Request> {
    let n = crcs.len();
    let only = only.unwrap_or(0..n);
    let mut out = Vec::new();
    for (first, len, set) in bit_runs(written, n) {
        let lo = first.max(only.start);
        let hi = (first + len).min(only.end);
        if lo >= hi {
            continue;
        }
        if set {
            let mut pos = lo;
            while pos < hi {
                let m = (hi - pos).min(MAX_IO_BLOCKS as usize);
                out.push(Request::Write {
                    target,
                    start: BlockIndex(start.0 + pos as u64),
                    fua: false,
                    crcs: crcs[pos..pos + m].to_vec(),
                    data: data.slice(pos * BLOCK_SIZE_BYTES..(pos + m) * BLOCK_SIZE_BYTES),
                });
                pos += m;
            }
        } else if trim_unwritten {
            out.push(Request::Trim {
                target,
                range: BlockRange { start: BlockIndex(start.0 + lo as u64), count: (hi - lo) as u64 },
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use slate_protocol::message::set_bit;
    use slate_protocol::{Generation, VolumeId};

    #[test]
    fn split_cuts_at_segments_and_size() {
        let p = split(6, 10, 8, 3);
        let got: Vec<_> = p.iter().map(|p| (p.segment.0, p.start, p.count, p.offset)).collect();
        assert_eq!(got, vec![(0, 6, 2, 0), (1, 8, 3, 2), (1, 11, 3, 5), (1, 14, 2, 8)]);
        assert!(split(5, 0, 8, 3).is_empty());
    }

    #[test]
    fn copy_requests_follow_the_written_bits() {
        let t = Target { volume: VolumeId(1), generation: Generation(1) };
        let mut written = Vec::new();
        for i in [0, 1, 4] {
            set_bit(&mut written, i);
        }
        let data = Bytes::from(vec![1u8; 6 * BLOCK_SIZE_BYTES]);
        let crcs: Vec<u32> =
            (0..6).map(|i| if [0, 1, 4].contains(&i) { block_crc(&data[..BLOCK_SIZE_BYTES]) } else { 0 }).collect();
        assert_eq!(check_data(6, &written, &crcs, &data), Ok(()));
        let reqs = copy_requests(t, BlockIndex(10), &written, &crcs, &data, None, true);
        let shape: Vec<String> = reqs
            .iter()
            .map(|r| match r {
                Request::Write { start, crcs, .. } => format!("w{}+{}", start.0, crcs.len()),
                Request::Trim { range, .. } => format!("t{}+{}", range.start.0, range.count),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(shape, vec!["w10+2", "t12+2", "w14+1", "t15+1"]);
        let only = copy_requests(t, BlockIndex(10), &written, &crcs, &data, Some(1..3), false);
        assert_eq!(only.len(), 1);
        let mut bad = data.to_vec();
        bad[4 * BLOCK_SIZE_BYTES] ^= 1;
        assert_eq!(check_data(6, &written, &crcs, &bad), Err(Some(4)));
        assert_eq!(check_data(5, &written, &crcs, &data), Err(None));
    }
}
