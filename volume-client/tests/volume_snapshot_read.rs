//! Reading a volume as it was at a snapshot, against real `slate-node`
//! processes: pattern A is written, every node holding the volume freezes it
//! at epoch E, pattern B overwrites part of it (and trims and fills some
//! more). A volume engine configured to read at E (`VolumeConfig::read_epoch`,
//! `ReadAt` on the wire) sees A everywhere and zeros where nothing was
//! written before E; a head reader sees B where it was written.

mod volume_common;

use slate::blockdev::BlockDevice;
use slate::volume::{AttachInfo, Dek, Volume, VolumeConfig, VolumeLayout};
use slate_protocol::{BlockIndex, Epoch, NodeId, Reply, Request, Rights, Target, BLOCK_SIZE_BYTES};
use std::sync::Arc;
use volume_common::*;

const E: Epoch = Epoch(5);
/// Blocks written with pattern A (the rest of the volume is never written before E).
const A_END: u64 = 1500;
/// Blocks overwritten with pattern B after the snapshot (crosses the segment boundary at 1024).
const B: std::ops::Range<u64> = 500..1200;
/// Blocks first written after the snapshot.
const LATE: std::ops::Range<u64> = 1700..1800;
/// Blocks of A trimmed at the head after the snapshot.
const TRIMMED: std::ops::Range<u64> = 100..110;

fn snapshot_reader(
    cluster: &Cluster,
    layout: &VolumeLayout,
    rights: Rights,
    epoch: Epoch,
) -> (AttachInfo, VolumeConfig) {
    let info = AttachInfo {
        layout: layout.clone(),
        capability: cluster.capability(layout.generation.0, rights),
        dek: Dek::new(test_key_bytes()),
    };
    (info, VolumeConfig { read_epoch: Some(epoch), ..test_config() })
}

async fn read_all(vol: &Volume, blocks: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks as usize * BLOCK_SIZE_BYTES);
    for start in (0..blocks).step_by(300) {
        let n = 300.min(blocks - start);
        out.extend_from_slice(&vol.read_blocks(start, n).await.expect("read"));
    }
    out
}

fn block(all: &[u8], b: u64) -> &[u8] {
    &all[b as usize * BLOCK_SIZE_BYTES..(b as usize + 1) * BLOCK_SIZE_BYTES]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_at_a_snapshot_epoch_sees_the_frozen_data_and_the_head_sees_the_new() {
    init_logging();
    let cluster = Cluster::start(3, &[&[1, 2], &[2, 3]]);
    let layout = cluster.layout(1);
    let blocks = 2 * SEGMENT_BLOCKS;
    let control = cluster.control(&layout, &[]);
    let head = Volume::attach(
        cluster.attach_info(&layout),
        control.clone(),
        slate_dataplane::tls::Connector::plaintext(),
        test_config(),
    )
    .await
    .expect("attach");

    // Pattern A.
    for start in (0..A_END).step_by(250) {
        let n = 250.min(A_END - start);
        let data: Vec<u8> = (start..start + n).flat_map(|x| block_text(x, 1)).collect();
        head.write_blocks(start, &data, false).await.unwrap();
    }

    // Freeze the volume at E on every node holding it (as the metadata service will).
    let target = Target { volume: VOLUME, generation: layout.generation };
    for node in 1..=3 {
        let s = cluster.session(NodeId(node), 1).await;
        let r = s.request(Request::Snapshot { target, epoch: E }).await.expect("snapshot");
        assert!(matches!(r, Reply::Done), "node {node}: {r:?}");
    }

    // Pattern B over part of A, a late write where nothing was, a trim of some of A.
    let data: Vec<u8> = B.flat_map(|x| block_text(x, 2)).collect();
    head.write_blocks(B.start, &data, false).await.unwrap();
    let data: Vec<u8> = LATE.flat_map(|x| block_text(x, 2)).collect();
    head.write_blocks(LATE.start, &data, false).await.unwrap();
    head.trim_blocks(TRIMMED.start, TRIMMED.end - TRIMMED.start, false).await.unwrap();

    // The head reads B where it was written, A elsewhere.
    let now = read_all(&head, blocks).await;
    for b in 0..blocks {
        let want = if B.contains(&b) || LATE.contains(&b) {
            block_text(b, 2)
        } else if TRIMMED.contains(&b) || b >= A_END {
            vec![0; BLOCK_SIZE_BYTES]
        } else {
            block_text(b, 1)
        };
        assert_eq!(block(&now, b), &want[..], "head block {b}");
    }

    // A reader at E reads A everywhere A was written and zeros everywhere else.
    let (info, cfg) = snapshot_reader(&cluster, &layout, Rights::READ, E);
    let snap = Arc::new(
        Volume::attach(info, control.clone(), slate_dataplane::tls::Connector::plaintext(), cfg)
            .await
            .expect("attach at E"),
    );
    let then = read_all(&snap, blocks).await;
    for b in 0..blocks {
        let want = if b < A_END { block_text(b, 1) } else { vec![0; BLOCK_SIZE_BYTES] };
        assert_eq!(block(&then, b), &want[..], "block {b} at {E}");
    }
    // Both replicas of every segment serve the snapshot (reads rotate between them).
    for _ in 0..4 {
        let got = snap.read_blocks(B.start, 1).await.unwrap();
        assert_eq!(&got[..], &block_text(B.start, 1)[..]);
        let got = snap.read_blocks(SEGMENT_BLOCKS + 10, 1).await.unwrap();
        assert_eq!(&got[..], &block_text(SEGMENT_BLOCKS + 10, 1)[..]);
    }

    // Block status at E follows E's layers, not the head's.
    let bs = 4096u64;
    let ext = snap.block_status(TRIMMED.start * bs, 10 * bs as u32).await.unwrap();
    assert!(ext.iter().all(|e| e.allocated), "trimmed at the head, written at E: {ext:?}");
    let ext = snap.block_status(LATE.start * bs, 10 * bs as u32).await.unwrap();
    assert!(ext.iter().all(|e| !e.allocated && e.zero), "written after E only: {ext:?}");
    let ext = head.block_status(TRIMMED.start * bs, 10 * bs as u32).await.unwrap();
    assert!(ext.iter().all(|e| !e.allocated), "the head sees the trim: {ext:?}");
    // A long block-status request is answered for a prefix, never wrongly.
    let ext = snap.block_status(0, (blocks * bs) as u32).await.unwrap();
    let covered: u64 = ext.iter().map(|e| u64::from(e.len)).sum();
    assert!(covered > 0 && covered <= blocks * bs);
    assert!(ext[0].allocated);

    // Nothing can be written through the snapshot reader.
    assert!(snap.write_blocks(0, &block_text(0, 9), false).await.is_err());
    assert!(snap.trim_blocks(0, 1, false).await.is_err());
    assert!(snap.trim_blocks(0, 1, true).await.is_err());
    let again = read_all(&snap, blocks).await;
    assert!(again == then, "the snapshot changed");
    let now_again = read_all(&head, blocks).await;
    assert!(now_again == now, "the head changed through the snapshot reader");
    snap.close().await;

    // A snapshot is only ever read: a capability that grants writes is refused.
    let (info, cfg) = snapshot_reader(&cluster, &layout, Rights::READ_WRITE, E);
    let err = Volume::attach(info, control.clone(), slate_dataplane::tls::Connector::plaintext(), cfg)
        .await
        .expect_err("read-write at an epoch");
    assert!(err.to_string().contains("read-only"), "{err}");

    // An epoch no node froze fails the read (EIO) and nothing else.
    let (info, cfg) = snapshot_reader(&cluster, &layout, Rights::READ, Epoch(6));
    let none = Volume::attach(info, control.clone(), slate_dataplane::tls::Connector::plaintext(), cfg)
        .await
        .expect("attach at an unknown epoch");
    assert!(none.read_blocks(0, 1).await.is_err());
    none.close().await;
    let got = head.read_blocks(0, 1).await.unwrap();
    assert_eq!(&got[..], &block_text(0, 1)[..]);

    // The raw protocol: ReadAt at E of a block overwritten since returns A's ciphertext, Read returns B's.
    let s = cluster.session(NodeId(1), 1).await;
    let at = s.read_blocks_at(E, BlockIndex(B.start), 1).await.unwrap();
    let head_bytes = s.read_blocks(BlockIndex(B.start), 1).await.unwrap();
    assert_ne!(at, head_bytes);
    let err = s.read_blocks_at(Epoch(6), BlockIndex(0), 1).await.unwrap_err();
    assert_eq!(err.kind(), Some(slate_protocol::ErrorKind::NoSuchLayer), "{err}");
    let err = s.read_blocks_at(E, BlockIndex(blocks + 5), 1).await.unwrap_err();
    assert!(err.kind().is_some(), "{err}");
    head.close().await;
}
