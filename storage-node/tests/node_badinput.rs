//! Bad input over TCP against a real process: random bytes, truncated frames,
//! oversized and empty frames, bad checksums, undecodable payloads and
//! bit-flipped valid requests. Each attack connection gets error replies (which
//! must themselves be well-formed frames) or a closed connection; meanwhile a
//! good session on another volume keeps writing and reading back correctly, and
//! the process is alive and serving at the end.
//!
//! Seeded: `SLATE_BADINPUT_SEED=<n>` replays a run.

mod common;

use bytes::{Bytes, BytesMut};
use common::{block_content, TestNode};
use rand::{Rng, SeedableRng};
use slate_protocol::message::BlockRange;
use slate_protocol::{
    decode_frame, encode_request, BlockIndex, Epoch, Generation, Reply, Request, Rights, SegmentIndex, Target,
    VolumeId, PROTOCOL_VERSION,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ATTACKS: usize = 200;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// A valid request of a random kind for the attacker's volume.
fn some_request(rng: &mut impl Rng, t: Target) -> Request {
    let range = BlockRange { start: BlockIndex(rng.gen_range(0..2048)), count: rng.gen_range(1..64) };
    match rng.gen_range(0..12) {
        0 => {
            let n = rng.gen_range(1..4u64);
            let data: Vec<u8> = (0..n).flat_map(|b| block_content(b, 7)).collect();
            slate_dataplane::client::write_request(t, range.start, Bytes::from(data)).unwrap()
        }
        1 => Request::Read { target: t, start: range.start, count: rng.gen_range(1..16) },
        2 => Request::Flush { target: t },
        3 => Request::Trim { target: t, range },
        4 => Request::WriteZeroes { target: t, range },
        5 => Request::Snapshot { target: t, epoch: Epoch(rng.gen_range(0..5)) },
        6 => Request::ChangedBlocks { target: t, segment: SegmentIndex(0), from: Epoch(0), to: Epoch(u64::MAX) },
        7 => Request::DeleteLayer { target: t, segment: SegmentIndex(0), epoch: Epoch(rng.gen_range(0..5)) },
        8 => Request::WriteIntents { target: t },
        9 => Request::ClearIntents { target: t, ranges: vec![range] },
        10 => Request::Allocated { target: t, range },
        _ => Request::ReleaseSegment { target: t, segment: SegmentIndex(rng.gen_range(1..4)) },
    }
}

/// Sends `bytes`, then reads until the node closes or goes quiet; every frame received must decode as a reply.
async fn attack(addr: std::net::SocketAddr, bytes: Vec<u8>, close_write: bool) -> usize {
    let Ok(mut s) = TcpStream::connect(addr).await else { panic!("node stopped accepting connections") };
    // The node may close before reading everything: a failed write is a fine outcome.
    let _ = s.write_all(&bytes).await;
    if close_write {
        let _ = s.shutdown().await;
    }
    let mut buf = BytesMut::new();
    let mut replies = 0;
    loop {
        match decode_frame(&mut buf) {
            Ok(Some(p)) => {
                Reply::decode(&p).unwrap_or_else(|e| panic!("node sent an undecodable reply: {e}"));
                replies += 1;
                continue;
            }
            Ok(None) => {}
            Err(e) => panic!("node sent a malformed frame: {e}"),
        }
        match tokio::time::timeout(Duration::from_millis(250), s.read_buf(&mut buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => return replies,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_never_hurts_other_sessions() {
    let seed = slate_tests::seed_from_env("SLATE_BADINPUT_SEED");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = TestNode::start("badinput", &[1, 2]);
    let addr = node.addr();

    // The good session: volume 1, write-then-verify in a loop for the whole test.
    let good = node.client(1, 1, Rights::READ_WRITE).await;
    for b in 0..64 {
        good.write_blocks(BlockIndex(b), Bytes::from(block_content(b, 0))).await.expect("prefill");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let good_task = {
        let (stop, rounds, good) = (stop.clone(), rounds.clone(), good.clone());
        tokio::spawn(async move {
            let mut i = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let b = i % 64;
                good.write_blocks(BlockIndex(b), Bytes::from(block_content(b, i))).await.expect("good write");
                let back = good.read_blocks(BlockIndex(b), 1).await.expect("good read");
                assert_eq!(&back[..], &block_content(b, i)[..], "good session read back wrong data");
                rounds.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };

    // The attacker holds a valid capability for volume 2 (with admin), so its
    // decoded requests reach the engine and its mutations stay on volume 2.
    let cap = node.cap(2, 1, Rights::READ_WRITE.union(Rights::ADMIN));
    let t = Target { volume: VolumeId(2), generation: Generation(1) };
    let hello = encode_request(1, &Request::Hello { version: PROTOCOL_VERSION, capability: cap }).to_vec();
    let mut replies = 0;
    for i in 0..ATTACKS {
        let kind = rng.gen_range(0..9);
        let bytes: Vec<u8> = match kind {
            // Random bytes.
            0 => (0..rng.gen_range(0..4096)).map(|_| rng.gen()).collect(),
            // A hello cut short.
            1 => hello[..rng.gen_range(0..hello.len())].to_vec(),
            // A header announcing an oversized frame.
            2 => {
                let mut v =
                    ((slate_protocol::MAX_FRAME_PAYLOAD + 1 + rng.gen_range(0..1000)) as u32).to_le_bytes().to_vec();
                v.extend_from_slice(&[0; 64]);
                v
            }
            // An empty frame.
            3 => vec![0; 8],
            // A valid hello, then a frame with a bad checksum.
            4 => {
                let mut v = hello.clone();
                let mut f = encode_request(2, &some_request(&mut rng, t)).to_vec();
                f[4] ^= 0xff;
                v.extend_from_slice(&f);
                v
            }
            // A well-framed random payload, with or without a hello first.
            5 => {
                let mut v = if rng.gen() { hello.clone() } else { Vec::new() };
                let payload: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
                v.extend_from_slice(&frame(&payload));
                v
            }
            // A hello, then valid requests with bits flipped in the payload (crc recomputed).
            6 | 7 => {
                let mut v = hello.clone();
                for id in 2..rng.gen_range(3..12) {
                    let f = encode_request(id, &some_request(&mut rng, t));
                    let mut payload = f[8..].to_vec();
                    for _ in 0..rng.gen_range(1..4) {
                        let at = rng.gen_range(0..payload.len());
                        payload[at] ^= 1 << rng.gen_range(0..8);
                    }
                    if rng.gen_range(0..4) == 0 {
                        payload.truncate(rng.gen_range(0..payload.len()));
                        if payload.is_empty() {
                            payload.push(0);
                        }
                    }
                    v.extend_from_slice(&frame(&payload));
                }
                v
            }
            // A hello, valid requests, then a frame cut in the middle.
            _ => {
                let mut v = hello.clone();
                let f = encode_request(2, &some_request(&mut rng, t));
                v.extend_from_slice(&f);
                let g = encode_request(3, &some_request(&mut rng, t));
                v.extend_from_slice(&g[..rng.gen_range(0..g.len())]);
                v
            }
        };
        replies += attack(addr, bytes, rng.gen_range(0..4) != 0).await;
        assert!(node.is_alive(), "seed {seed}: node died at attack {i} (kind {kind})");
    }
    eprintln!("{ATTACKS} attack connections, {replies} well-formed replies received");

    stop.store(true, Ordering::Relaxed);
    good_task.await.expect("good session kept working");
    let done = rounds.load(Ordering::Relaxed);
    eprintln!("good session completed {done} write+read rounds during the attacks");
    assert!(done > 0);
    // Still serving: a new session works, metrics are served, and it stops cleanly.
    let fresh = node.client(1, 1, Rights::READ).await;
    fresh.read_blocks(BlockIndex(0), 64).await.expect("read after attacks");
    let m = common::scrape(node.cfg.metrics_listen.unwrap());
    assert!(m.contains("slate_node_malformed_frames_total"));
    drop((good, fresh));
    assert!(node.is_alive(), "seed {seed}: node died");
    assert!(node.terminate().expect("exit on SIGTERM").success());
}
