//! The drain mover with two real nodes (in this process, each with its own disk
//! file, engine and data-plane server on loopback): a copy makes the target's
//! segment identical to the source's (ciphertext, crcs, written bits; unwritten
//! blocks stay unwritten), a repeated copy over an earlier attempt converges to
//! the same result, and a copy under a generation older than one the target has
//! seen is refused.

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use slate_dataplane::client::NodeClient;
use slate_node::config::NodeConfig;
use slate_node::engine::{format, FormatOptions};
use slate_node::mover::Mover;
use slate_node::node::RunningNode;
use slate_protocol::message::BlockRange;
use slate_protocol::ops::CopyTask;
use slate_protocol::{
    BlockIndex, Capability, ErrorKind, Generation, NodeId, Request, Rights, SegmentIndex, SignedCapability, Target,
    VolumeId, BLOCK_SIZE_BYTES,
};

const SEG_BLOCKS: u64 = 1024;
const VOL: u64 = 7;

struct Node {
    _dir: tempfile::TempDir,
    node: RunningNode,
}

async fn start_node(id: u64, key: &SigningKey) -> Node {
    let dir = slate_tests::scratch_dir(&format!("slate-mover-{id}-"));
    let disk = dir.path().join("disk.img");
    let opts = FormatOptions {
        extent_size_bytes: 1 << 20,
        journal_bytes: 4 << 20,
        node_id: NodeId(id),
        size_bytes: Some(96 << 20),
    };
    format(&disk, &opts).expect("format");
    let cfg = NodeConfig::new(NodeId(id), "127.0.0.1:0".parse().unwrap(), disk, &key.verifying_key());
    let node = RunningNode::start(&cfg).await.expect("start node");
    Node { _dir: dir, node }
}

fn cap(key: &SigningKey, generation: u64, rights: Rights, nodes: &[u64]) -> SignedCapability {
    Capability {
        volume: VolumeId(VOL),
        generation: Generation(generation),
        rights,
        expires_unix_secs: slate_protocol::now_unix_secs() + 3600,
        nodes: nodes.iter().map(|n| NodeId(*n)).collect(),
        ..Default::default()
    }
    .sign(key)
}

fn all() -> Rights {
    Rights::READ_WRITE.union(Rights::ADMIN)
}

/// A block that names itself.
fn content(block: u64, seq: u64) -> Vec<u8> {
    let mut unit = [0u8; 32];
    unit[..8].copy_from_slice(&block.to_le_bytes());
    unit[8..16].copy_from_slice(&seq.to_le_bytes());
    unit[16..].copy_from_slice(b"-slate-mover-tst");
    unit.repeat(BLOCK_SIZE_BYTES / 32)
}

async fn write(c: &NodeClient, start: u64, count: u64, seq: u64) {
    let data: Vec<u8> = (start..start + count).flat_map(|b| content(b, seq)).collect();
    c.write_blocks(BlockIndex(start), Bytes::from(data)).await.expect("write");
}

fn task(id: u64, segment: u32, generation: u64, source: &Node, capability: &SignedCapability) -> CopyTask {
    CopyTask {
        id,
        volume: VOL,
        segment,
        segment_blocks: SEG_BLOCKS,
        first_block: u64::from(segment) * SEG_BLOCKS,
        blocks: SEG_BLOCKS,
        generation,
        source_node: 1,
        source_addr: source.node.addr.to_string(),
        capability: capability.to_token(),
    }
}

/// Reads a whole segment's head from a node's engine: (written bits, crcs, data).
async fn segment_image(n: &Node, segment: u64) -> (Vec<u8>, Vec<u32>, Bytes) {
    let r = n
        .node
        .engine()
        .read(VolumeId(VOL), BlockIndex(segment * SEG_BLOCKS), SEG_BLOCKS as u32)
        .await
        .expect("read segment");
    (r.written, r.crcs, r.data)
}

fn written_count(bits: &[u8]) -> u64 {
    bits.iter().map(|b| u64::from(b.count_ones())).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_makes_an_identical_replica_and_is_fenced() {
    let key = slate_protocol::capability::generate_signing_key();
    let source = start_node(1, &key).await;
    let target = start_node(2, &key).await;
    let gen = 3;
    let token = cap(&key, gen, all(), &[1, 2]);

    // The source holds segments 0 and 1 with written runs, holes and trimmed blocks.
    let src = NodeClient::connect(source.node.addr, token.clone()).await.expect("source session");
    let t = src.target();
    for seg in 0..2u32 {
        src.request(Request::AssignSegment { target: t, segment: SegmentIndex(seg), segment_blocks: SEG_BLOCKS })
            .await
            .expect("assign on the source");
    }
    write(&src, 0, 10, 1).await;
    write(&src, 100, 300, 1).await;
    write(&src, 1000, 24, 1).await;
    write(&src, 150, 20, 2).await; // overwritten
    src.trim(BlockRange { start: BlockIndex(200), count: 16 }).await.expect("trim");
    write(&src, SEG_BLOCKS + 5, 700, 1).await;
    let (src_bits, _, _) = segment_image(&source, 0).await;
    let expect0 = written_count(&src_bits);
    assert_eq!(expect0, 10 + 300 + 24 - 16);

    let mover = Mover::new(target.node.engine().clone(), NodeId(2), target.node.addr, 0);
    let mut seen = Vec::new();
    let n = mover.copy(&task(1, 0, gen, &source, &token), |d, t| seen.push((d, t))).await.expect("copy segment 0");
    assert_eq!(n, expect0);
    assert_eq!(seen.last(), Some(&(SEG_BLOCKS, SEG_BLOCKS)), "progress ends at the total");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "progress only grows: {seen:?}");
    // Rate-limited copy of the second segment (700 blocks at 8 MiB/s: ~0.35 s).
    let slow = Mover::new(target.node.engine().clone(), NodeId(2), target.node.addr, 8 << 20);
    let t0 = std::time::Instant::now();
    let n1 = slow.copy(&task(2, 1, gen, &source, &token), |_, _| {}).await.expect("copy segment 1");
    assert_eq!(n1, 700);
    assert!(t0.elapsed() >= std::time::Duration::from_millis(250), "the rate limit was not applied");

    for seg in 0..2 {
        let a = segment_image(&source, seg).await;
        let b = segment_image(&target, seg).await;
        assert_eq!(a.0, b.0, "written bits of segment {seg} differ");
        assert_eq!(a.1, b.1, "crcs of segment {seg} differ");
        assert!(a.2 == b.2, "data of segment {seg} differs");
    }

    // An earlier attempt left a block the source does not have: a new copy removes it.
    let dst = NodeClient::connect(target.node.addr, token.clone()).await.expect("target session");
    write(&dst, 205, 1, 9).await;
    write(&dst, 5, 1, 9).await;
    let n = mover.copy(&task(1, 0, gen, &source, &token), |_, _| {}).await.expect("copy again");
    assert_eq!(n, expect0);
    assert_eq!(segment_image(&source, 0).await, segment_image(&target, 0).await, "the repeated copy differs");
    drop(dst);

    // A client attaches at a newer generation on the target: the old copy is refused.
    let newer = NodeClient::connect(target.node.addr, cap(&key, gen + 1, Rights::READ_WRITE, &[2])).await.unwrap();
    let err = mover.copy(&task(1, 0, gen, &source, &token), |_, _| {}).await.expect_err("a stale copy must fail");
    assert!(format!("{err:#}").contains("StaleGeneration") || format!("{err:#}").contains("fenced"), "{err:#}");
    // And a request of the stale generation on an open session is refused too.
    let stale = Target { volume: VolumeId(VOL), generation: Generation(gen) };
    let r = newer.request(Request::Read { target: stale, start: BlockIndex(0), count: 1 }).await;
    assert!(matches!(r, Err(e) if e.kind() == Some(ErrorKind::StaleGeneration)));

    // A task whose capability does not match it is refused before anything is sent.
    let mut bad = task(3, 0, gen + 1, &source, &token);
    assert!(mover.copy(&bad, |_, _| {}).await.is_err());
    bad.capability = "zz".into();
    assert!(mover.copy(&bad, |_, _| {}).await.is_err());

    drop((src, newer));
    source.node.shutdown().await.unwrap();
    target.node.shutdown().await.unwrap();
}
