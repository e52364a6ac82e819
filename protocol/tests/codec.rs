//! Pins the handshake bytes and fuzzes the decoders with random and truncated input.

use bytes::{Bytes, BytesMut};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use slate_protocol::message::MAX_IO_BLOCKS;
use slate_protocol::*;

fn fixed_hello() -> Request {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let cap = Capability {
        volume: VolumeId(1),
        generation: Generation(2),
        rights: Rights::READ_WRITE,
        expires_unix_secs: 1_700_000_000,
        nodes: vec![NodeId(3)],
        not_before_unix_secs: 1_699_990_000,
        size_blocks: 262_144,
        segments: 1,
        holder: Holder([5; 32]),
    }
    .sign(&key);
    Request::Hello { version: PROTOCOL_VERSION, capability: cap }
}

#[test]
fn handshake_bytes_are_pinned() {
    let frame = encode_request(42, &fixed_hello());
    let hex = hex::encode(&frame);
    // A change here is a wire-protocol change: bump PROTOCOL_VERSION and say so.
    assert_eq!(hex, PINNED_HELLO, "handshake bytes changed");
    let mut buf = BytesMut::from(&frame[..]);
    let payload = decode_frame(&mut buf).unwrap().unwrap();
    let (id, req) = Request::decode(&payload).unwrap();
    assert_eq!(id, 42);
    assert_eq!(req, fixed_hello());
}

const PINNED_HELLO: &str = include_str!("pinned_hello.hex");

#[test]
fn every_message_round_trips() {
    let t = Target { volume: VolumeId(9), generation: Generation(4) };
    let data = Bytes::from(vec![0xabu8; 8192]);
    let reqs = vec![
        fixed_hello(),
        Request::Write { target: t, start: BlockIndex(5), fua: true, crcs: vec![1, 2], data: data.clone() },
        Request::Read { target: t, start: BlockIndex(5), count: 2 },
        Request::ReadAt { target: t, epoch: Epoch(7), start: BlockIndex(5), count: 2 },
        Request::ReadAt { target: t, epoch: Epoch(u64::MAX), start: BlockIndex(0), count: MAX_IO_BLOCKS },
        Request::Flush { target: t },
        Request::Trim { target: t, range: BlockRange { start: BlockIndex(1), count: 3 } },
        Request::WriteZeroes { target: t, range: BlockRange { start: BlockIndex(1), count: 3 } },
        Request::Snapshot { target: t, epoch: Epoch(3) },
        Request::ChangedBlocks { target: t, segment: SegmentIndex(1), from: Epoch(1), to: Epoch(2) },
        Request::DeleteLayer { target: t, segment: SegmentIndex(1), epoch: Epoch(1) },
        Request::WriteIntents { target: t },
        Request::ClearIntents { target: t, ranges: vec![BlockRange { start: BlockIndex(1), count: 3 }] },
        Request::AssignSegment { target: t, segment: SegmentIndex(2), segment_blocks: 1024 },
        Request::ReleaseSegment { target: t, segment: SegmentIndex(2) },
        Request::Allocated { target: t, range: BlockRange { start: BlockIndex(0), count: 64 } },
    ];
    for (i, r) in reqs.into_iter().enumerate() {
        let mut buf = BytesMut::from(&encode_request(i as u64, &r)[..]);
        let p = decode_frame(&mut buf).unwrap().unwrap();
        assert_eq!(Request::decode(&p).unwrap(), (i as u64, r));
        assert!(buf.is_empty());
    }
    let replies = vec![
        Reply::HelloOk { version: 1, node: NodeId(2) },
        Reply::Done,
        Reply::Data { written: vec![0b10], crcs: vec![0, 5], data },
        Reply::Ranges(vec![BlockRange { start: BlockIndex(3), count: 4 }]),
        Reply::Bitmap(vec![1, 2, 3]),
        Reply::Error(WireError::at(ErrorKind::Corrupt, BlockIndex(3), "torn")),
    ];
    for (i, r) in replies.into_iter().enumerate() {
        let mut buf = BytesMut::from(&encode_reply(i as u64, &r)[..]);
        let p = decode_frame(&mut buf).unwrap().unwrap();
        assert_eq!(Reply::decode(&p).unwrap(), (i as u64, r));
    }
}

#[test]
fn read_bytes_are_unchanged_and_read_at_has_its_own_kind() {
    let t = Target { volume: VolumeId(9), generation: Generation(4) };
    let read = encode_request(1, &Request::Read { target: t, start: BlockIndex(5), count: 2 });
    // kind | id | volume | generation | start | count: the layout `Read` always had.
    let mut want = vec![0x03];
    want.extend(1u64.to_le_bytes());
    want.extend(9u64.to_le_bytes());
    want.extend(4u64.to_le_bytes());
    want.extend(5u64.to_le_bytes());
    want.extend(2u32.to_le_bytes());
    assert_eq!(&read[8..], &want[..]);
    let at = Request::ReadAt { target: t, epoch: Epoch(7), start: BlockIndex(5), count: 2 };
    assert_eq!(at.kind(), 0x0f);
    assert_eq!(at.target(), Some(t));
    let frame = encode_request(1, &at);
    let mut want = vec![0x0f];
    want.extend(1u64.to_le_bytes());
    want.extend(9u64.to_le_bytes());
    want.extend(4u64.to_le_bytes());
    want.extend(7u64.to_le_bytes());
    want.extend(5u64.to_le_bytes());
    want.extend(2u32.to_le_bytes());
    assert_eq!(&frame[8..], &want[..]);
}

#[test]
fn read_at_bounds_are_checked() {
    let t = Target { volume: VolumeId(9), generation: Generation(4) };
    let decode = |req: &Request| Request::decode(&encode_request(1, req).slice(8..));
    for count in [0, MAX_IO_BLOCKS + 1, u32::MAX] {
        let r = Request::ReadAt { target: t, epoch: Epoch(1), start: BlockIndex(0), count };
        assert!(decode(&r).is_err(), "count {count} must be refused");
    }
    let r = Request::ReadAt { target: t, epoch: Epoch(1), start: BlockIndex(u64::MAX - 1), count: 2 };
    assert!(decode(&r).is_err(), "a range past the end of the address space must be refused");
    let r = Request::ReadAt { target: t, epoch: Epoch(1), start: BlockIndex(u64::MAX - 2), count: 2 };
    assert!(decode(&r).is_ok());
    // Truncated anywhere, or with a trailing byte, it is refused.
    let payload =
        encode_request(1, &Request::ReadAt { target: t, epoch: Epoch(1), start: BlockIndex(3), count: 1 }).slice(8..);
    for cut in 0..payload.len() {
        assert!(Request::decode(&payload.slice(..cut)).is_err(), "cut at {cut}");
    }
    let mut long = payload.to_vec();
    long.push(0);
    assert!(Request::decode(&Bytes::from(long)).is_err());
}

#[test]
fn oversized_and_corrupt_frames_are_refused() {
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0][..]);
    assert!(matches!(decode_frame(&mut buf), Err(FrameError::TooLarge(_))));
    let mut frame = encode_request(1, &fixed_hello()).to_vec();
    let last = frame.len() - 1;
    frame[last] ^= 1;
    let mut buf = BytesMut::from(&frame[..]);
    assert_eq!(decode_frame(&mut buf), Err(FrameError::BadChecksum));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let b = Bytes::from(bytes.clone());
        let _ = Request::decode(&b);
        let _ = Reply::decode(&b);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(p)) = decode_frame(&mut buf) {
            let _ = Request::decode(&p);
        }
    }

    #[test]
    fn truncated_and_mutated_frames_never_panic(cut in 0usize..600, flip in 0usize..600, val in any::<u8>()) {
        let t = Target { volume: VolumeId(9), generation: Generation(4) };
        let reqs = [
            fixed_hello(),
            Request::Write { target: t, start: BlockIndex(5), fua: false, crcs: vec![1], data: Bytes::from(vec![1u8; 4096]) },
            Request::ClearIntents { target: t, ranges: vec![BlockRange { start: BlockIndex(1), count: 3 }] },
            Request::ReadAt { target: t, epoch: Epoch(2), start: BlockIndex(5), count: 4 },
        ];
        for r in &reqs {
            let frame = encode_request(1, r);
            let payload = frame.slice(8..);
            let cut = cut.min(payload.len());
            let _ = Request::decode(&payload.slice(..cut));
            let mut m = payload.to_vec();
            let i = flip % m.len();
            m[i] = val;
            let _ = Request::decode(&Bytes::from(m));
        }
    }
}
