//! The scrubber with two real nodes (in this process, each with its own disk
//! file, engine and data-plane server on loopback) and a stub in place of
//! slate-meta: bits flipped in blocks of one node's disk file are found, exactly
//! those, and repaired from the other node, after which both replicas are
//! identical; a corrupt block of a snapshot layer is found and counted as
//! unrepaired; reports and metrics say so; a finished request is not run again
//! after a restart (the resume file).

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use slate_dataplane::client::NodeClient;
use slate_node::config::NodeConfig;
use slate_node::engine::{format, read_geometry, FormatOptions};
use slate_node::node::RunningNode;
use slate_node::scrub::{ScrubLink, ScrubOptions, Scrubber};
use slate_protocol::ops::{PeerReplica, RepairSource, ScrubReport, ScrubRequest};
use slate_protocol::{
    BlockIndex, Capability, Epoch, Generation, NodeId, Request, Rights, SegmentIndex, SignedCapability, VolumeId,
    BLOCK_SIZE_BYTES,
};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SEG_BLOCKS: u64 = 1024;
const VOL: u64 = 9;
const GEN: u64 = 2;

struct Node {
    dir: tempfile::TempDir,
    node: RunningNode,
}

async fn start_node(id: u64, key: &SigningKey) -> Node {
    let dir = slate_tests::scratch_dir(&format!("slate-scrub-{id}-"));
    let disk = dir.path().join("disk.img");
    let opts = FormatOptions {
        extent_size_bytes: 1 << 20,
        journal_bytes: 4 << 20,
        node_id: NodeId(id),
        size_bytes: Some(64 << 20),
    };
    format(&disk, &opts).expect("format");
    let cfg = NodeConfig::new(NodeId(id), "127.0.0.1:0".parse().unwrap(), disk, &key.verifying_key());
    let node = RunningNode::start(&cfg).await.expect("start node");
    Node { dir, node }
}

fn cap(key: &SigningKey, rights: Rights, nodes: &[u64]) -> SignedCapability {
    Capability {
        volume: VolumeId(VOL),
        generation: Generation(GEN),
        rights,
        expires_unix_secs: slate_protocol::now_unix_secs() + 3600,
        nodes: nodes.iter().map(|n| NodeId(*n)).collect(),
        ..Default::default()
    }
    .sign(key)
}

/// A block that names itself (so it can be found on the disk file).
fn content(block: u64, seq: u64) -> Vec<u8> {
    let mut unit = [0u8; 32];
    unit[..8].copy_from_slice(&block.to_le_bytes());
    unit[8..16].copy_from_slice(&seq.to_le_bytes());
    unit[16..].copy_from_slice(b"-slate-scrub-tst");
    unit.repeat(BLOCK_SIZE_BYTES / 32)
}

async fn write(c: &NodeClient, start: u64, count: u64, seq: u64) {
    let data: Vec<u8> = (start..start + count).flat_map(|b| content(b, seq)).collect();
    c.write_blocks(BlockIndex(start), Bytes::from(data)).await.expect("write");
}

/// Flips one bit of the on-disk copy of `content(block, seq)` (plain write + fsync;
/// the engine reads with O_DIRECT, which sees it).
fn damage(disk: &Path, block: u64, seq: u64) {
    let want = content(block, seq);
    let start = read_geometry(disk).expect("geometry").data_start_bytes;
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(disk).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE_BYTES];
    let mut at = start;
    loop {
        f.seek(SeekFrom::Start(at)).unwrap();
        assert!(f.read_exact(&mut buf).is_ok(), "block {block} seq {seq} not found on {}", disk.display());
        if buf == want {
            break;
        }
        at += BLOCK_SIZE_BYTES as u64;
    }
    buf[777] ^= 0x04;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

/// slate-meta's part: the other node as the repair source, and the reports kept.
struct Stub {
    peer: PeerReplica,
    capability: String,
    reports: Mutex<Vec<ScrubReport>>,
    asked: Mutex<Vec<(u64, u32)>>,
}

impl ScrubLink for Stub {
    fn repair_source(
        &self,
        volume: u64,
        segment: u32,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<RepairSource>> + Send + '_>> {
        self.asked.lock().unwrap().push((volume, segment));
        let src = RepairSource {
            volume,
            segment,
            generation: GEN,
            peers: vec![self.peer.clone()],
            capability: self.capability.clone(),
        };
        Box::pin(async move { Ok(src) })
    }

    fn report<'a>(&'a self, report: &'a ScrubReport) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>> {
        self.reports.lock().unwrap().push(report.clone());
        Box::pin(async { Ok(()) })
    }
}

impl Stub {
    async fn wait_finished(&self, scrub_id: u64) -> ScrubReport {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let done =
                self.reports.lock().unwrap().iter().rev().find(|r| r.scrub_id == scrub_id && !r.running).cloned();
            if let Some(r) = done {
                return r;
            }
            assert!(Instant::now() < deadline, "scrub {scrub_id} did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn head(n: &Node) -> slate_node::engine::ReadResult {
    n.node.engine().read(VolumeId(VOL), BlockIndex(0), SEG_BLOCKS as u32).await.expect("read head")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_and_repairs_exactly_the_flipped_blocks() {
    let key = slate_protocol::capability::generate_signing_key();
    let a = start_node(1, &key).await;
    let b = start_node(2, &key).await;
    let rw = cap(&key, Rights::READ_WRITE.union(Rights::ADMIN), &[1, 2]);

    // The same writes on both replicas, a snapshot at epoch 5, then newer writes.
    for n in [&a, &b] {
        let c = NodeClient::connect(n.node.addr, rw.clone()).await.expect("session");
        let t = c.target();
        c.request(Request::AssignSegment { target: t, segment: SegmentIndex(0), segment_blocks: SEG_BLOCKS })
            .await
            .expect("assign");
        write(&c, 0, 50, 1).await;
        c.request(Request::Snapshot { target: t, epoch: Epoch(5) }).await.expect("snapshot");
        write(&c, 100, 200, 1).await;
        write(&c, 600, 100, 1).await;
        write(&c, 10, 5, 2).await;
    }
    let before_b = head(&b).await;
    assert_eq!(head(&a).await, before_b);

    // Flip bits in three head blocks and one block only the snapshot layer holds, on node 1.
    let disk_a = a.dir.path().join("disk.img");
    for (block, seq) in [(150, 1), (12, 2), (650, 1)] {
        damage(&disk_a, block, seq);
    }
    damage(&disk_a, 11, 1); // block 11's snapshot version; the head has seq 2
    assert!(a.node.engine().read(VolumeId(VOL), BlockIndex(150), 1).await.is_err(), "the flip is not visible");

    let stub = Arc::new(Stub {
        peer: PeerReplica { node: 2, addr: b.node.addr.to_string() },
        capability: cap(&key, Rights::READ, &[2]).to_token(),
        reports: Mutex::default(),
        asked: Mutex::default(),
    });
    let state = a.dir.path().join(slate_node::scrub::STATE_FILE);
    let opts = ScrubOptions {
        rate_bytes_per_sec: 0,
        state_path: Some(state.clone()),
        metrics: Some(a.node.metrics().clone()),
        connector: slate_dataplane::tls::Connector::plaintext(),
    };
    let scrubber = Scrubber::with_link(a.node.engine().clone(), NodeId(1), stub.clone(), opts.clone());
    scrubber.offer(None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(stub.reports.lock().unwrap().is_empty(), "rate 0 must not start a background pass");
    scrubber.offer(Some(&ScrubRequest { id: 1 }));
    let r = stub.wait_finished(1).await;
    eprintln!("{r:?}");
    // Written blocks in every layer: 50 in the snapshot layer, 305 in the head.
    assert_eq!(r.blocks_checked, 355, "{r:?}");
    assert_eq!((r.corrupt_found, r.repaired, r.unrepaired), (4, 3, 1), "{r:?}");
    assert_eq!((r.segments_done, r.segments_total), (1, 1), "{r:?}");
    assert!(r.finished_ms.is_some());
    assert_eq!(*stub.asked.lock().unwrap(), vec![(VOL, 0)], "one repair-source question per segment and pass");

    // The heads are identical again (ciphertext, crcs, written bits).
    assert_eq!(head(&a).await, before_b);
    assert_eq!(head(&b).await, before_b);
    let m = a.node.metrics().render();
    for line in [
        "slate_node_scrub_blocks_checked_total 355",
        "slate_node_scrub_corrupt_found_total 4",
        "slate_node_scrub_repaired_total 3",
        "slate_node_scrub_unrepaired_total 1",
    ] {
        assert!(m.contains(line), "metrics lack {line:?}");
    }

    // The same request again does nothing; a new pass finds only the snapshot block.
    scrubber.offer(Some(&ScrubRequest { id: 1 }));
    let again = scrubber.scrub_now(7).await.expect("pass");
    assert_eq!((again.corrupt_found, again.repaired, again.unrepaired), (1, 0, 1), "{again:?}");

    // A new scrubber (a restarted node) reads the resume file: request 1 is done, 2 runs.
    let before = stub.reports.lock().unwrap().len();
    let restarted = Scrubber::with_link(a.node.engine().clone(), NodeId(1), stub.clone(), opts);
    restarted.offer(Some(&ScrubRequest { id: 1 }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stub.reports.lock().unwrap().len(), before, "a finished request ran again after a restart");
    restarted.offer(Some(&ScrubRequest { id: 2 }));
    let r2 = stub.wait_finished(2).await;
    assert_eq!(r2.corrupt_found, 1, "{r2:?}");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["last_request"], 2, "{saved}");

    drop((scrubber, restarted));
    a.node.shutdown().await.unwrap();
    b.node.shutdown().await.unwrap();
}
