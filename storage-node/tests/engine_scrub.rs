//! Scrub finds exactly the blocks whose bytes were damaged on the disk (in any layer),
//! repair rewrites them, and a repair that lost a race with a newer write does nothing.
#![allow(clippy::trivially_copy_pass_by_ref)] // tags are byte-string literals

use bytes::Bytes;
use slate_node::engine::{
    format, CorruptBlock, Engine, EngineError, EngineHandle, EngineOptions, FormatOptions, HEAD_EPOCH,
};
use slate_protocol::{BlockIndex, Epoch, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

const V: VolumeId = VolumeId(3);
const SEG_BLOCKS: u64 = 1024;

fn opts() -> EngineOptions {
    EngineOptions { zero_rate_bytes_per_sec: u64::MAX, metadata_cache_bytes: 4 << 20, ..EngineOptions::default() }
}

/// A block that names itself: `tag`, the block number, repeated.
fn stamped(tag: &[u8; 8], block: u64) -> Vec<u8> {
    let mut unit = [0u8; 32];
    unit[..8].copy_from_slice(tag);
    unit[8..16].copy_from_slice(&block.to_le_bytes());
    unit[16..].copy_from_slice(b"-slate-scrubbed-");
    unit.repeat(BLOCK_SIZE_BYTES / 32)
}

async fn write(h: &EngineHandle, tag: &[u8; 8], start: u64, count: u64) {
    let mut data = Vec::new();
    let mut crcs = Vec::new();
    for b in start..start + count {
        let blk = stamped(tag, b);
        crcs.push(crc32c::crc32c(&blk));
        data.extend_from_slice(&blk);
    }
    h.write(V, BlockIndex(start), crcs, Bytes::from(data)).await.expect("write");
}

/// Flips one bit in the middle of the on-disk copy of `stamped(tag, block)`.
fn damage(path: &Path, tag: &[u8; 8], block: u64) {
    let want = stamped(tag, block);
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE_BYTES];
    let mut at = 0u64;
    loop {
        f.seek(SeekFrom::Start(at)).unwrap();
        assert!(f.read_exact(&mut buf).is_ok(), "block {block} of {tag:?} not found on the disk");
        if buf == want {
            break;
        }
        at += BLOCK_SIZE_BYTES as u64;
    }
    buf[1000] ^= 0x10;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

async fn scrub_all(h: &EngineHandle, max_blocks: u32) -> (u64, Vec<CorruptBlock>) {
    let mut cursor = 0;
    let mut checked = 0;
    let mut corrupt = Vec::new();
    loop {
        let c = h.scrub(V, SegmentIndex(0), cursor, max_blocks).await.expect("scrub");
        checked += c.blocks_checked;
        corrupt.extend(c.corrupt);
        match c.next_cursor {
            Some(n) => {
                assert!(n > cursor, "cursor moves forward");
                cursor = n;
            }
            None => return (checked, corrupt),
        }
    }
}

fn crc(tag: &[u8; 8], block: u64) -> u32 {
    crc32c::crc32c(&stamped(tag, block))
}

#[tokio::test]
async fn scrub_finds_damaged_blocks_in_every_layer_and_repair_fixes_them() {
    let dir = slate_tests::scratch_dir("slate-scrub-");
    let path = dir.path().join("disk");
    format(
        &path,
        &FormatOptions {
            extent_size_bytes: 256 << 10,
            journal_bytes: 1 << 20,
            node_id: NodeId(1),
            size_bytes: Some(16 << 20),
        },
    )
    .unwrap();
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    h.assign_segment(V, SegmentIndex(0), SEG_BLOCKS).await.unwrap();
    write(&h, b"OLDDATA!", 0, 200).await;
    h.snapshot(V, Epoch(5)).await.unwrap();
    write(&h, b"NEWDATA!", 100, 50).await;
    let (checked, corrupt) = scrub_all(&h, 16).await;
    assert_eq!((checked, corrupt.len()), (250, 0));
    engine.shutdown().unwrap();

    damage(&path, b"OLDDATA!", 10); // snapshot layer, still visible through the head
    damage(&path, b"OLDDATA!", 120); // snapshot layer, shadowed by the head
    damage(&path, b"NEWDATA!", 130); // head

    let (engine, h) = Engine::open(&path, opts()).unwrap();
    assert!(matches!(h.read(V, BlockIndex(10), 1).await, Err(EngineError::Corrupt { .. })));
    let (checked, mut corrupt) = scrub_all(&h, 7).await;
    corrupt.sort_by_key(|c| c.block);
    assert_eq!(checked, 250);
    assert_eq!(
        corrupt,
        vec![
            CorruptBlock { epoch: Epoch(5), block: BlockIndex(10), stored_crc: crc(b"OLDDATA!", 10) },
            CorruptBlock { epoch: Epoch(5), block: BlockIndex(120), stored_crc: crc(b"OLDDATA!", 120) },
            CorruptBlock { epoch: HEAD_EPOCH, block: BlockIndex(130), stored_crc: crc(b"NEWDATA!", 130) },
        ]
    );
    // One big step finds the same.
    let (_, again) = scrub_all(&h, 4096).await;
    assert_eq!(again.len(), 3);

    // Repair with the good copy's data (what a peer replica would send).
    for c in &corrupt {
        let tag = if c.epoch == HEAD_EPOCH { b"NEWDATA!" } else { b"OLDDATA!" };
        let good = stamped(tag, c.block.0);
        let gcrc = crc32c::crc32c(&good);
        // A wrong crc for the new data is refused before anything is touched.
        let bad = h.repair_block(V, c.epoch, c.block, c.stored_crc, Bytes::from(good.clone()), gcrc ^ 1).await;
        assert!(matches!(bad, Err(EngineError::BadCrc { .. })), "{bad:?}");
        assert!(h.repair_block(V, c.epoch, c.block, c.stored_crc, Bytes::from(good), gcrc).await.unwrap());
    }
    let (checked, corrupt) = scrub_all(&h, 16).await;
    assert_eq!((checked, corrupt.len()), (250, 0));
    assert_eq!(&h.read(V, BlockIndex(10), 1).await.unwrap().data[..], &stamped(b"OLDDATA!", 10)[..]);
    assert_eq!(&h.read_at(V, Epoch(5), BlockIndex(120), 1).await.unwrap().data[..], &stamped(b"OLDDATA!", 120)[..]);
    assert_eq!(&h.read(V, BlockIndex(130), 1).await.unwrap().data[..], &stamped(b"NEWDATA!", 130)[..]);
    // Repairing a healthy block does nothing.
    let good = stamped(b"NEWDATA!", 131);
    let c = crc32c::crc32c(&good);
    assert!(!h.repair_block(V, HEAD_EPOCH, BlockIndex(131), c, Bytes::from(good), c).await.unwrap());
    assert_eq!(h.stats().repaired_blocks, 3);
    engine.shutdown().unwrap();

    // A repair that races a newer client write of the block must not undo it.
    damage(&path, b"NEWDATA!", 140);
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    let (_, corrupt) = scrub_all(&h, 64).await;
    assert_eq!(corrupt.len(), 1);
    let found = corrupt[0];
    assert_eq!((found.epoch, found.block), (HEAD_EPOCH, BlockIndex(140)));
    write(&h, b"NEWER!!!", 140, 1).await;
    let stale = stamped(b"NEWDATA!", 140);
    let scrc = crc32c::crc32c(&stale);
    assert!(!h.repair_block(V, HEAD_EPOCH, found.block, found.stored_crc, Bytes::from(stale), scrc).await.unwrap());
    assert_eq!(&h.read(V, BlockIndex(140), 1).await.unwrap().data[..], &stamped(b"NEWER!!!", 140)[..]);
    // Unknown layer or segment: clear errors.
    let any = Bytes::from(vec![0u8; BLOCK_SIZE_BYTES]);
    let zc = crc32c::crc32c(&any);
    assert!(matches!(
        h.repair_block(V, Epoch(77), BlockIndex(1), 0, any.clone(), zc).await,
        Err(EngineError::NoSuchLayer(_))
    ));
    assert!(matches!(
        h.repair_block(V, HEAD_EPOCH, BlockIndex(SEG_BLOCKS + 1), 0, any, zc).await,
        Err(EngineError::NotAssigned)
    ));
    assert!(matches!(h.scrub(V, SegmentIndex(4), 0, 8).await, Err(EngineError::NotAssigned)));
    let (checked, corrupt) = scrub_all(&h, 1000).await;
    assert_eq!((checked, corrupt.len()), (250, 0));
    engine.shutdown().unwrap();
}

/// Scrub steps interleave with a stream of tenant writes to the same blocks: no write
/// is torn under a scrub read (no false corruption), and both make progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_runs_alongside_tenant_writes_without_false_alarms() {
    let dir = slate_tests::scratch_dir("slate-scrub-");
    let path = dir.path().join("disk");
    format(
        &path,
        &FormatOptions {
            extent_size_bytes: 256 << 10,
            journal_bytes: 4 << 20,
            node_id: NodeId(1),
            size_bytes: Some(16 << 20),
        },
    )
    .unwrap();
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    h.assign_segment(V, SegmentIndex(0), SEG_BLOCKS).await.unwrap();
    write(&h, b"BASELINE", 0, 256).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (h, stop) = (h.clone(), std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut x = 12345u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let start = (x >> 33) % 250;
                let tag: &[u8; 8] = if n.is_multiple_of(2) { b"EVENEVEN" } else { b"ODD-ODD-" };
                write(&h, tag, start, 1 + (x >> 20) % 6).await;
                n += 1;
            }
            n
        })
    };
    let mut passes = 0;
    let mut checked = 0;
    while passes < 20 {
        let (c, corrupt) = scrub_all(&h, 8).await;
        assert!(corrupt.is_empty(), "false alarm: {corrupt:?}");
        checked += c;
        passes += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 0 && checked >= 20 * 256, "writes {writes}, checked {checked}");
    engine.shutdown().unwrap();
}
