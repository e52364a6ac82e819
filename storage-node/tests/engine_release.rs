//! `release_segment` and `delete_layer` report the extents they freed, and
//! `extent_states` follows them through zeroing to free.

use bytes::Bytes;
use slate_node::engine::{format, Engine, EngineHandle, EngineOptions, ExtentPhase, FormatOptions};
use slate_protocol::{BlockIndex, Epoch, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::path::Path;
use std::time::Duration;

const V: VolumeId = VolumeId(5);
const EXTENT: u64 = 256 << 10;
const EXTENT_BLOCKS: u64 = EXTENT / BLOCK_SIZE_BYTES as u64;

fn opts(rate: u64) -> EngineOptions {
    EngineOptions { zero_rate_bytes_per_sec: rate, metadata_cache_bytes: 4 << 20, ..EngineOptions::default() }
}

fn fmt(path: &Path) {
    format(
        path,
        &FormatOptions {
            extent_size_bytes: EXTENT,
            journal_bytes: 1 << 20,
            node_id: NodeId(2),
            size_bytes: Some(16 << 20),
        },
    )
    .expect("format");
}

async fn write(h: &EngineHandle, start: u64, seed: u8) {
    let data = vec![seed; BLOCK_SIZE_BYTES];
    let crc = crc32c::crc32c(&data);
    h.write(V, BlockIndex(start), vec![crc], Bytes::from(data)).await.expect("write");
}

#[tokio::test]
async fn release_reports_extents_and_states_follow_them_to_free() {
    let dir = slate_tests::scratch_dir("slate-release-");
    let path = dir.path().join("disk");
    fmt(&path);
    // No background zeroing: allocations zero on the spot, released extents stay dirty.
    let (engine, h) = Engine::open(&path, opts(0)).expect("open");
    h.assign_segment(V, SegmentIndex(0), 16 * EXTENT_BLOCKS).await.unwrap();
    h.assign_segment(V, SegmentIndex(1), 16 * EXTENT_BLOCKS).await.unwrap();
    for slot in [0, 3, 7] {
        write(&h, slot * EXTENT_BLOCKS + 1, 1).await;
    }
    h.snapshot(V, Epoch(4)).await.unwrap();
    // Two more head extents: one shadowing slot 3, one new slot.
    write(&h, 3 * EXTENT_BLOCKS, 2).await;
    write(&h, 9 * EXTENT_BLOCKS, 2).await;
    // Segment 1 is kept.
    write(&h, 16 * EXTENT_BLOCKS, 3).await;
    assert_eq!(h.stats().extents_owned, 6);

    let mut freed = h.release_segment(V, SegmentIndex(0)).await.unwrap();
    freed.sort_unstable();
    freed.dedup();
    assert_eq!(freed.len(), 5, "all layers' extents: {freed:?}");
    let phases = h.extent_states(freed.clone()).await.unwrap();
    assert!(phases.iter().all(|p| *p == ExtentPhase::Dirty), "{phases:?}");
    // Idempotent: a second release frees nothing and is not an error.
    assert!(h.release_segment(V, SegmentIndex(0)).await.unwrap().is_empty());
    assert!(h.release_segment(V, SegmentIndex(9)).await.unwrap().is_empty());
    let total = h.stats().extents_total as u32;
    assert_eq!(
        h.extent_states(vec![total, u32::MAX]).await.unwrap(),
        vec![ExtentPhase::OutOfRange, ExtentPhase::OutOfRange]
    );
    engine.shutdown().unwrap();

    // After a restart (the release is durable) the zeroer takes them to free.
    let (engine, h) = Engine::open(&path, opts(u64::MAX)).expect("reopen");
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    let phases = h.extent_states(freed.clone()).await.unwrap();
    assert!(phases.iter().all(|p| *p == ExtentPhase::Free), "{phases:?}");
    assert_eq!(h.stats().extents_owned, 1);
    let json = serde_json::to_string(&phases[..1]).unwrap();
    assert_eq!(json, r#"["free"]"#);
    engine.shutdown().unwrap();
}

#[tokio::test]
async fn delete_layer_reports_the_extents_it_released() {
    let dir = slate_tests::scratch_dir("slate-release-");
    let path = dir.path().join("disk");
    fmt(&path);
    let (engine, h) = Engine::open(&path, opts(u64::MAX)).expect("open");
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    h.assign_segment(V, SegmentIndex(0), 16 * EXTENT_BLOCKS).await.unwrap();
    write(&h, 0, 1).await;
    write(&h, 5 * EXTENT_BLOCKS, 1).await;
    h.snapshot(V, Epoch(1)).await.unwrap();
    write(&h, 1, 2).await; // slot 0 shared with the head: its old extent is freed by the fold
    let before = h.stats().extents_owned;
    let freed = h.delete_layer(V, SegmentIndex(0), Epoch(1)).await.unwrap();
    assert_eq!(freed.len(), 1, "{freed:?}");
    assert_eq!(h.stats().extents_owned, before - 1);
    let phase = h.extent_states(freed.clone()).await.unwrap()[0];
    assert_ne!(phase, ExtentPhase::Owned);
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    assert_eq!(h.extent_states(freed).await.unwrap(), vec![ExtentPhase::Free]);
    engine.shutdown().unwrap();
}
