//! Access test with a real process: a capability for volume A cannot read or
//! write volume B's blocks; forged (another key, altered claims, altered
//! signature), expired and wrong-node capabilities are refused at hello; a
//! read-only capability cannot write; a capability that expires during a
//! session stops working; requests without a session are refused; and each
//! refused request fails only itself.

mod common;

use bytes::Bytes;
use common::{block_content, cap_with, kind_of, TestNode, NODE, SEGMENT_BLOCKS};
use slate_dataplane::client::NodeClient;
use slate_protocol::message::BlockRange;
use slate_protocol::{
    decode_frame, encode_request, BlockIndex, Epoch, ErrorKind, Generation, NodeId, Reply, Request, Rights, Target,
    VolumeId, PROTOCOL_VERSION,
};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn other_volume(t: Target) -> Target {
    Target { volume: VolumeId(2), generation: t.generation }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::many_single_char_names)]
async fn capabilities_are_enforced() {
    let mut node = TestNode::start("access", &[1, 2]);
    let a = node.client(1, 1, Rights::READ_WRITE).await;
    let b = node.client(2, 1, Rights::READ_WRITE).await;
    b.write_blocks(BlockIndex(0), Bytes::from(block_content(0, 22))).await.expect("B writes its own volume");

    // A's session cannot touch B's volume, whatever the request.
    let ta = a.target();
    let wrong = |r: Request| a.request(r);
    let write_b =
        slate_dataplane::client::write_request(other_volume(ta), BlockIndex(0), Bytes::from(block_content(0, 1)));
    assert_eq!(kind_of(wrong(write_b.unwrap()).await), ErrorKind::WrongVolume);
    let read_b = Request::Read { target: other_volume(ta), start: BlockIndex(0), count: 1 };
    assert_eq!(kind_of(wrong(read_b).await), ErrorKind::WrongVolume);
    let trim_b = Request::Trim { target: other_volume(ta), range: BlockRange { start: BlockIndex(0), count: 1 } };
    assert_eq!(kind_of(wrong(trim_b).await), ErrorKind::WrongVolume);
    assert_eq!(kind_of(wrong(Request::WriteIntents { target: other_volume(ta) }).await), ErrorKind::WrongVolume);
    // Same block numbers on A's own volume hold nothing of B's.
    assert!(a.read_blocks(BlockIndex(0), 1).await.unwrap().iter().all(|x| *x == 0));
    assert_eq!(&b.read_blocks(BlockIndex(0), 1).await.unwrap()[..], &block_content(0, 22)[..]);

    // Forged: signed by another key; claims altered after signing; signature altered.
    let stranger = slate_protocol::capability::generate_signing_key();
    let forged = cap_with(&stranger, 2, 1, Rights::READ_WRITE, 3600, vec![NODE]);
    assert_eq!(kind_of(NodeClient::connect(node.addr(), forged).await), ErrorKind::Forged);
    let mut altered = node.cap(1, 1, Rights::READ);
    altered.claims.volume = VolumeId(2);
    assert_eq!(kind_of(NodeClient::connect(node.addr(), altered).await), ErrorKind::Forged);
    let mut altered = node.cap(1, 1, Rights::READ);
    altered.claims.rights = Rights::READ_WRITE.union(Rights::ADMIN);
    assert_eq!(kind_of(NodeClient::connect(node.addr(), altered).await), ErrorKind::Forged);
    let mut altered = node.cap(2, 1, Rights::READ);
    altered.signature[17] ^= 0x40;
    assert_eq!(kind_of(NodeClient::connect(node.addr(), altered).await), ErrorKind::Forged);
    // Expired, and not valid on this node.
    // Nodes allow CLOCK_SKEW_SECS either side of the validity window.
    let skew = i64::try_from(slate_protocol::capability::CLOCK_SKEW_SECS).expect("a small skew");
    let expired = cap_with(&node.key, 1, 1, Rights::READ, -skew - 1, vec![NODE]);
    assert_eq!(kind_of(NodeClient::connect(node.addr(), expired).await), ErrorKind::Expired);
    let late = cap_with(&node.key, 1, 1, Rights::READ, -skew + 30, vec![NODE]);
    NodeClient::connect(node.addr(), late).await.expect("expired less than the skew allowance ago");
    let mut early = node.cap(1, 1, Rights::READ).claims;
    early.not_before_unix_secs = slate_protocol::now_unix_secs() + 2 * slate_protocol::capability::CLOCK_SKEW_SECS;
    let early = early.sign(&node.key);
    assert_eq!(kind_of(NodeClient::connect(node.addr(), early).await), ErrorKind::NotYetValid);
    let elsewhere = cap_with(&node.key, 1, 1, Rights::READ, 3600, vec![NodeId(2), NodeId(3)]);
    assert_eq!(kind_of(NodeClient::connect(node.addr(), elsewhere).await), ErrorKind::WrongNode);

    // Read-only: reads work, writes and other mutations do not; no admin without the right.
    let ro = node.client(2, 1, Rights::READ).await;
    assert_eq!(&ro.read_blocks(BlockIndex(0), 1).await.unwrap()[..], &block_content(0, 22)[..]);
    assert_eq!(kind_of(ro.write_blocks(BlockIndex(0), Bytes::from(block_content(0, 9))).await), ErrorKind::NoRight);
    let t = ro.target();
    let range = BlockRange { start: BlockIndex(0), count: 1 };
    assert_eq!(kind_of(ro.request(Request::Trim { target: t, range }).await), ErrorKind::NoRight);
    assert_eq!(kind_of(ro.request(Request::WriteZeroes { target: t, range }).await), ErrorKind::NoRight);
    assert_eq!(kind_of(ro.request(Request::Flush { target: t }).await), ErrorKind::NoRight);
    assert_eq!(kind_of(ro.request(Request::Snapshot { target: t, epoch: Epoch(1) }).await), ErrorKind::NoRight);
    let assign = Request::AssignSegment { target: t, segment: slate_protocol::SegmentIndex(1), segment_blocks: 64 };
    assert_eq!(kind_of(a.request(assign).await), ErrorKind::WrongVolume);
    let assign = Request::AssignSegment { target: ta, segment: slate_protocol::SegmentIndex(1), segment_blocks: 64 };
    assert_eq!(kind_of(a.request(assign).await), ErrorKind::NoRight);
    assert_eq!(&ro.read_blocks(BlockIndex(0), 1).await.unwrap()[..], &block_content(0, 22)[..], "nothing changed");

    // Range and crc errors fail only their own request.
    let beyond = a.read_blocks(BlockIndex(SEGMENT_BLOCKS * 4), 1).await;
    assert!(matches!(kind_of(beyond), ErrorKind::NotAssigned | ErrorKind::OutOfRange));
    let mut bad = slate_dataplane::client::write_request(ta, BlockIndex(3), Bytes::from(block_content(3, 1))).unwrap();
    if let Request::Write { crcs, .. } = &mut bad {
        crcs[0] ^= 1;
    }
    assert_eq!(kind_of(a.request(bad).await), ErrorKind::BadCrc);
    assert!(a.read_blocks(BlockIndex(3), 1).await.unwrap().iter().all(|x| *x == 0), "a bad-crc write changes nothing");
    // A second hello on a session fails only itself.
    let hello = Request::Hello { version: PROTOCOL_VERSION, capability: node.cap(1, 1, Rights::READ) };
    assert_eq!(kind_of(a.request(hello).await), ErrorKind::NoSession);
    a.write_blocks(BlockIndex(3), Bytes::from(block_content(3, 2))).await.expect("session still works");

    // A capability that expires during the session stops working.
    let short = cap_with(&node.key, 1, 1, Rights::READ, 2 - skew, vec![NODE]);
    let s = NodeClient::connect(node.addr(), short).await.expect("short-lived session");
    s.read_blocks(BlockIndex(3), 1).await.expect("read before expiry");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(kind_of(s.read_blocks(BlockIndex(3), 1).await), ErrorKind::Expired);

    // Requests before a hello, and a hello with another protocol version, are refused.
    let mut raw = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    let read = Request::Read { target: ta, start: BlockIndex(0), count: 1 };
    raw.write_all(&encode_request(7, &read)).await.unwrap();
    assert_eq!(raw_reply(&mut raw).await, Some((7, ErrorKind::NoSession)));
    let mut raw = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    let hello = Request::Hello { version: PROTOCOL_VERSION + 1, capability: node.cap(1, 1, Rights::READ) };
    raw.write_all(&encode_request(1, &hello)).await.unwrap();
    assert_eq!(raw_reply(&mut raw).await, Some((1, ErrorKind::Version)));

    // Generation in a request may not exceed the capability's.
    let ahead = Target { volume: VolumeId(1), generation: Generation(2) };
    let r = a.request(Request::Read { target: ahead, start: BlockIndex(0), count: 1 }).await;
    assert_eq!(kind_of(r), ErrorKind::NoRight);

    assert!(node.is_alive());
    drop((a, b, ro, s));
    assert!(node.terminate().expect("exit on SIGTERM").success());
}

/// Reads one reply frame and expects the connection to close after it.
async fn raw_reply(s: &mut tokio::net::TcpStream) -> Option<(u64, ErrorKind)> {
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Some(p) = decode_frame(&mut buf).unwrap() {
            let (id, reply) = Reply::decode(&p).unwrap();
            let Reply::Error(e) = reply else { panic!("expected an error, got {reply:?}") };
            let mut rest = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
            assert!(matches!(n, Ok(Ok(0) | Err(_))), "connection stays open after a refused hello");
            return Some((id, e.kind));
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
    }
}
