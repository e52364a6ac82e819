//! Pipelining against a real process: many requests in flight on one session,
//! replies matched by id; overlapping writes applied in the order they were
//! sent; more bytes in flight than the per-connection budget (the node stops
//! reading and resumes, nothing is lost); one bad request among good ones
//! fails only itself.

mod common;

use bytes::Bytes;
use common::{block_content, TestNode};
use rand::{Rng, SeedableRng};
use slate_dataplane::client::write_request;
use slate_protocol::{BlockIndex, ErrorKind, Reply, Request, Rights, BLOCK_SIZE_BYTES};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_pipelined_writes_apply_in_order() {
    let seed = slate_tests::seed_from_env("SLATE_PIPELINE_SEED");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = TestNode::start("pipeline", &[1]);
    let c = node.client(1, 1, Rights::READ_WRITE).await;
    let t = c.target();

    // 300 overlapping writes over 16 blocks, all sent before any reply is awaited.
    let blocks = 16u64;
    let mut replies = Vec::new();
    for seq in 1..=300u64 {
        let len = rng.gen_range(1..=6u64);
        let start = rng.gen_range(0..=blocks - len);
        let data: Vec<u8> = (start..start + len).flat_map(|b| block_content(b, seq)).collect();
        let mut req = write_request(t, BlockIndex(start), Bytes::from(data)).unwrap();
        // Every 50th write carries a wrong crc: it must fail alone.
        let bad = seq % 50 == 0;
        if bad {
            if let Request::Write { crcs, .. } = &mut req {
                crcs[0] ^= 0xdead;
            }
        }
        replies.push((bad, len, c.start(&req)));
        // Interleave reads that need not wait for anything.
        if seq % 7 == 0 {
            replies.push((false, 0, c.start(&Request::Read { target: t, start: BlockIndex(0), count: 4 })));
        }
    }
    for (bad, len, fut) in replies {
        let r = fut.await.expect("reply");
        match r {
            Reply::Data { .. } if len == 0 => {}
            Reply::Done if !bad => {}
            Reply::Error(e) if bad => assert_eq!(e.kind, ErrorKind::BadCrc),
            other => panic!("seed {seed}: unexpected reply {other:?} (bad crc: {bad})"),
        }
    }
    // What the node holds must be, per block, the last successful write sent to it.
    let back = c.read_blocks(BlockIndex(0), blocks as u32).await.unwrap();
    for b in 0..blocks {
        let got = &back[b as usize * BLOCK_SIZE_BYTES..(b as usize + 1) * BLOCK_SIZE_BYTES];
        match last_good_write(seed, b, blocks) {
            0 => assert!(got.iter().all(|x| *x == 0), "seed {seed}: blk-{b} was never written"),
            last => assert_eq!(got, &block_content(b, last)[..], "seed {seed}: blk-{b} should hold write {last}"),
        }
    }

    // More than the 64 MiB in-flight budget at once: 24 writes of 4 MiB over the same segment.
    let big: Vec<u8> = (0..1024u64).flat_map(|b| block_content(b, 9999)).collect();
    let big = write_request(t, BlockIndex(0), Bytes::from(big)).unwrap();
    let futs: Vec<_> = (0..24).map(|_| c.start(&big)).collect();
    for f in futs {
        assert!(matches!(f.await.expect("big write reply"), Reply::Done));
    }
    let back = c.read_blocks(BlockIndex(1000), 24).await.unwrap();
    assert_eq!(&back[..BLOCK_SIZE_BYTES], &block_content(1000, 9999)[..]);
    drop(c);
    assert!(node.terminate().unwrap().success());
}

/// Replays the seeded sequence of writes and returns the last good write of `block`.
fn last_good_write(seed: u64, block: u64, blocks: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut last = 0;
    for seq in 1..=300u64 {
        let len = rng.gen_range(1..=6u64);
        let start = rng.gen_range(0..=blocks - len);
        if seq % 50 != 0 && (start..start + len).contains(&block) {
            last = seq;
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_writes() {
    let mut node = TestNode::start("sigterm", &[1]);
    let c = node.client(1, 1, Rights::READ_WRITE).await;
    let t = c.target();
    let futs: Vec<_> = (0..64u64)
        .map(|b| c.start(&write_request(t, BlockIndex(b), Bytes::from(block_content(b, 1))).unwrap()))
        .collect();
    let status = node.terminate().expect("exit on SIGTERM");
    assert!(status.success(), "exit status {status}");
    let mut acked = Vec::new();
    for (b, f) in futs.into_iter().enumerate() {
        match f.await {
            Ok(Reply::Done) => acked.push(b as u64),
            Ok(other) => panic!("write got {other:?}"),
            Err(_) => {} // not read by the node before it stopped: never acknowledged
        }
    }
    eprintln!("{} of 64 writes acknowledged before the node stopped", acked.len());
    drop(c);
    node.restart();
    let c = node.client(1, 1, Rights::READ).await;
    for b in acked {
        assert_eq!(&c.read_blocks(BlockIndex(b), 1).await.unwrap()[..], &block_content(b, 1)[..], "blk-{b} lost");
    }
    drop(c);
    assert!(node.terminate().unwrap().success());
}
