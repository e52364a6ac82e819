//! Engine basics on a real file with O_DIRECT: format, write, read back, trim,
//! restart, fencing persistence and torn-write detection.

use bytes::Bytes;
use slate_node::engine::{format, Engine, EngineError, EngineHandle, EngineOptions, FormatOptions};
use slate_protocol::{BlockIndex, BlockRange, Generation, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::path::{Path, PathBuf};
use std::time::Duration;

const V: VolumeId = VolumeId(7);

/// A scratch directory on a real filesystem (O_DIRECT does not work on tmpfs).
fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::tempdir_in(base).expect("scratch dir")
}

fn opts() -> EngineOptions {
    EngineOptions { zero_rate_bytes_per_sec: u64::MAX, metadata_cache_bytes: 8 << 20, ..EngineOptions::default() }
}

fn fresh(path: &Path, size: u64) {
    format(
        path,
        &FormatOptions {
            extent_size_bytes: 1 << 20,
            journal_bytes: 4 << 20,
            node_id: NodeId(3),
            size_bytes: Some(size),
        },
    )
    .expect("format");
}

fn block(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK_SIZE_BYTES];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8;
    }
    v
}

async fn write(h: &EngineHandle, start: u64, seeds: &[u64]) -> Result<(), EngineError> {
    let mut data = Vec::new();
    let mut crcs = Vec::new();
    for s in seeds {
        let b = block(*s);
        crcs.push(crc32c::crc32c(&b));
        data.extend_from_slice(&b);
    }
    h.write(V, BlockIndex(start), crcs, Bytes::from(data)).await
}

#[tokio::test]
async fn write_read_trim_restart() {
    let dir = scratch();
    let path = dir.path().join("disk");
    fresh(&path, 64 << 20);
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    assert_eq!(h.node_id(), NodeId(3));
    h.assign_segment(V, SegmentIndex(0), 1024).await.unwrap();
    h.assign_segment(V, SegmentIndex(1), 1024).await.unwrap();
    assert_eq!(h.segments().len(), 2);
    write(&h, 10, &[1, 2, 3]).await.unwrap();
    // Across the segment boundary and an extent boundary.
    write(&h, 1022, &[4, 5, 6, 7]).await.unwrap();
    let r = h.read(V, BlockIndex(9), 5).await.unwrap();
    assert_eq!(r.written, vec![0b01110]);
    assert_eq!(&r.data[BLOCK_SIZE_BYTES..2 * BLOCK_SIZE_BYTES], &block(1)[..]);
    assert!(r.data[..BLOCK_SIZE_BYTES].iter().all(|b| *b == 0));
    assert_eq!(r.crcs[0], 0);
    let r = h.read(V, BlockIndex(1022), 4).await.unwrap();
    assert_eq!(&r.data[3 * BLOCK_SIZE_BYTES..], &block(7)[..]);
    h.trim(V, BlockRange { start: BlockIndex(11), count: 1 }).await.unwrap();
    let a = h.allocated(V, BlockRange { start: BlockIndex(8), count: 8 }).await.unwrap();
    assert_eq!(a, vec![0b0001_0100]);
    // Bad crc on arrival.
    let e = h.write(V, BlockIndex(0), vec![1], Bytes::from(block(9))).await.unwrap_err();
    assert!(matches!(e, EngineError::BadCrc { block: BlockIndex(0) }), "{e:?}");
    // Not assigned.
    let e = h.read(V, BlockIndex(5000), 1).await.unwrap_err();
    assert!(matches!(e, EngineError::NotAssigned), "{e:?}");
    engine.crash().unwrap();

    let (engine, h) = Engine::open(&path, opts()).unwrap();
    let r = h.read(V, BlockIndex(10), 3).await.unwrap();
    assert_eq!(r.written, vec![0b101]);
    assert_eq!(&r.data[..BLOCK_SIZE_BYTES], &block(1)[..]);
    assert_eq!(&r.data[2 * BLOCK_SIZE_BYTES..], &block(3)[..]);
    let r = h.read(V, BlockIndex(1022), 4).await.unwrap();
    assert_eq!(&r.data[..BLOCK_SIZE_BYTES], &block(4)[..]);
    engine.shutdown().unwrap();

    let (_engine, h) = Engine::open(&path, opts()).unwrap();
    let r = h.read(V, BlockIndex(1022), 4).await.unwrap();
    assert_eq!(&r.data[2 * BLOCK_SIZE_BYTES..3 * BLOCK_SIZE_BYTES], &block(6)[..]);
    assert!(h.wait_zeroed(Duration::from_secs(30)).await.unwrap());
    let st = h.stats();
    assert!(st.fsyncs > 0 && st.extents_owned >= 2, "{st:?}");
}

#[tokio::test]
async fn fencing_survives_restart() {
    let dir = scratch();
    let path = dir.path().join("disk");
    fresh(&path, 32 << 20);
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    h.check_generation(V, Generation(5)).await.unwrap();
    h.check_generation(V, Generation(5)).await.unwrap();
    let e = h.check_generation(V, Generation(4)).await.unwrap_err();
    assert!(matches!(e, EngineError::StaleGeneration { current: Generation(5) }), "{e:?}");
    h.check_generation(V, Generation(6)).await.unwrap();
    // Crash (no checkpoint): the raise must come back from the journal.
    engine.crash().unwrap();
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    let e = h.check_generation(V, Generation(5)).await.unwrap_err();
    assert!(matches!(e, EngineError::StaleGeneration { current: Generation(6) }), "{e:?}");
    assert_eq!(e.to_wire().kind, slate_protocol::ErrorKind::StaleGeneration);
    h.check_generation(VolumeId(8), Generation(1)).await.unwrap();
    engine.shutdown().unwrap();
    // And after a clean shutdown (from the checkpoint).
    let (_engine, h) = Engine::open(&path, opts()).unwrap();
    assert!(h.check_generation(V, Generation(5)).await.is_err());
    h.check_generation(V, Generation(6)).await.unwrap();
    assert!(h.check_generation(VolumeId(8), Generation(0)).await.is_err());
}

/// Finds where block `b` of the volume is on disk by searching for its content.
fn find(path: &Path, needle: &[u8]) -> Option<u64> {
    let data = std::fs::read(path).unwrap();
    data.chunks(BLOCK_SIZE_BYTES).position(|c| c == needle).map(|i| (i * BLOCK_SIZE_BYTES) as u64)
}

#[tokio::test]
async fn torn_write_reads_as_corrupt() {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    let path = dir.path().join("disk");
    fresh(&path, 32 << 20);
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    h.assign_segment(V, SegmentIndex(0), 4096).await.unwrap();
    write(&h, 100, &[41, 42, 43]).await.unwrap();
    engine.shutdown().unwrap();
    // Tear the middle block: half old, half new bytes, as a torn 4 KiB write would leave.
    let at = find(&path, &block(42)).expect("block on disk");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xAB; 2048], at + 2048).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (_engine, h) = Engine::open(&path, opts()).unwrap();
    let e = h.read(V, BlockIndex(100), 3).await.unwrap_err();
    assert!(matches!(e, EngineError::Corrupt { block: BlockIndex(101) }), "{e:?}");
    assert_eq!(e.to_wire().block, Some(BlockIndex(101)));
    // The neighbours still read; a rewrite repairs the block.
    assert_eq!(&h.read(V, BlockIndex(100), 1).await.unwrap().data[..], &block(41)[..]);
    write(&h, 101, &[44]).await.unwrap();
    assert_eq!(
        &h.read(V, BlockIndex(100), 3).await.unwrap().data[BLOCK_SIZE_BYTES..2 * BLOCK_SIZE_BYTES],
        &block(44)[..]
    );
    assert_eq!(h.stats().corrupt_reads, 1);
}

#[tokio::test]
async fn snapshots_layers_and_changed_blocks() {
    use slate_node::engine::HEAD_EPOCH;
    use slate_protocol::Epoch;
    let dir = scratch();
    let path = dir.path().join("disk");
    fresh(&path, 64 << 20);
    let (engine, h) = Engine::open(&path, opts()).unwrap();
    h.assign_segment(V, SegmentIndex(0), 1024).await.unwrap();
    write(&h, 0, &[1, 2, 3, 4]).await.unwrap();
    h.snapshot(V, Epoch(10)).await.unwrap();
    h.snapshot(V, Epoch(10)).await.unwrap(); // repeat: no-op
    write(&h, 1, &[12]).await.unwrap();
    h.trim(V, BlockRange { start: BlockIndex(2), count: 1 }).await.unwrap();
    write(&h, 300, &[13]).await.unwrap();
    // Head: 1, 12, zero, 4; snapshot 10: 1, 2, 3, 4.
    let r = h.read(V, BlockIndex(0), 4).await.unwrap();
    assert_eq!(r.written, vec![0b1011]);
    assert_eq!(&r.data[BLOCK_SIZE_BYTES..2 * BLOCK_SIZE_BYTES], &block(12)[..]);
    assert!(r.data[2 * BLOCK_SIZE_BYTES..3 * BLOCK_SIZE_BYTES].iter().all(|b| *b == 0));
    let s = h.read_at(V, Epoch(10), BlockIndex(0), 4).await.unwrap();
    assert_eq!(s.written, vec![0b1111]);
    assert_eq!(&s.data[2 * BLOCK_SIZE_BYTES..3 * BLOCK_SIZE_BYTES], &block(3)[..]);
    let ch = h.changed_blocks(V, SegmentIndex(0), Epoch(10), HEAD_EPOCH).await.unwrap();
    assert_eq!(
        ch,
        vec![BlockRange { start: BlockIndex(1), count: 2 }, BlockRange { start: BlockIndex(300), count: 1 }]
    );
    let ch = h.changed_blocks(V, SegmentIndex(0), Epoch(0), Epoch(10)).await.unwrap();
    assert_eq!(ch, vec![BlockRange { start: BlockIndex(0), count: 4 }]);
    assert!(matches!(h.snapshot(V, Epoch(5)).await, Err(EngineError::NoSuchLayer(_))));
    h.snapshot(V, Epoch(20)).await.unwrap();
    write(&h, 3, &[14]).await.unwrap();
    assert_eq!(h.layers(V, SegmentIndex(0)).await.unwrap(), vec![Epoch(10), Epoch(20)]);
    engine.crash().unwrap();

    let (engine, h) = Engine::open(&path, opts()).unwrap();
    let owned_before = h.stats().extents_owned;
    // Delete the oldest snapshot: its blocks fold into the layer of snapshot 20.
    h.delete_layer(V, SegmentIndex(0), Epoch(10)).await.unwrap();
    assert_eq!(h.layers(V, SegmentIndex(0)).await.unwrap(), vec![Epoch(20)]);
    assert!(h.stats().extents_owned < owned_before);
    let r = h.read(V, BlockIndex(0), 4).await.unwrap();
    assert_eq!(r.written, vec![0b1011]);
    assert_eq!(&r.data[..BLOCK_SIZE_BYTES], &block(1)[..]);
    assert_eq!(&r.data[3 * BLOCK_SIZE_BYTES..], &block(14)[..]);
    let s = h.read_at(V, Epoch(20), BlockIndex(0), 4).await.unwrap();
    assert_eq!(s.written, vec![0b1011]);
    assert_eq!(&s.data[3 * BLOCK_SIZE_BYTES..], &block(4)[..]);
    assert!(matches!(h.read_at(V, Epoch(10), BlockIndex(0), 1).await, Err(EngineError::NoSuchLayer(_))));
    let ch = h.changed_blocks(V, SegmentIndex(0), Epoch(0), Epoch(20)).await.unwrap();
    assert_eq!(
        ch,
        vec![BlockRange { start: BlockIndex(0), count: 4 }, BlockRange { start: BlockIndex(300), count: 1 }]
    );
    // Delete the last snapshot: the head absorbs it.
    h.delete_layer(V, SegmentIndex(0), Epoch(20)).await.unwrap();
    engine.crash().unwrap();
    let (_engine, h) = Engine::open(&path, opts()).unwrap();
    assert!(h.layers(V, SegmentIndex(0)).await.unwrap().is_empty());
    let r = h.read(V, BlockIndex(0), 4).await.unwrap();
    assert_eq!(r.written, vec![0b1011]);
    assert_eq!(&r.data[BLOCK_SIZE_BYTES..2 * BLOCK_SIZE_BYTES], &block(12)[..]);
    assert_eq!(&h.read(V, BlockIndex(300), 1).await.unwrap().data[..], &block(13)[..]);
}

#[tokio::test]
async fn write_intents_survive_crash_until_cleared() {
    let dir = scratch();
    let path = dir.path().join("disk");
    fresh(&path, 32 << 20);
    let o = EngineOptions { intent_region_blocks: 64, intent_idle_clear_secs: 1, ..opts() };
    let (engine, h) = Engine::open(&path, o.clone()).unwrap();
    h.assign_segment(V, SegmentIndex(0), 4096).await.unwrap();
    write(&h, 70, &[1]).await.unwrap();
    write(&h, 127, &[1, 2]).await.unwrap();
    let want = vec![BlockRange { start: BlockIndex(64), count: 128 }];
    assert_eq!(h.write_intents(V).await.unwrap(), want);
    engine.crash().unwrap();
    let (engine, h) = Engine::open(&path, o.clone()).unwrap();
    assert_eq!(h.write_intents(V).await.unwrap(), want);
    // Recovered intents are not cleared lazily...
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.write_intents(V).await.unwrap(), want);
    // ...only by the client.
    h.clear_intents(V, vec![BlockRange { start: BlockIndex(64), count: 64 }]).await.unwrap();
    assert_eq!(h.write_intents(V).await.unwrap(), vec![BlockRange { start: BlockIndex(128), count: 64 }]);
    // New intents of this run stay across a clean stop too: the node cannot know its
    // clients finished (only `clear_intents` says so).
    write(&h, 1000, &[3]).await.unwrap();
    assert_eq!(h.write_intents(V).await.unwrap().len(), 2);
    engine.shutdown().unwrap();
    let (engine, h) = Engine::open(&path, o).unwrap();
    let both = vec![BlockRange { start: BlockIndex(128), count: 64 }, BlockRange { start: BlockIndex(960), count: 64 }];
    assert_eq!(h.write_intents(V).await.unwrap(), both);
    // With lazy clearing on (here after 1 s), an idle intent of this run is cleared.
    write(&h, 2000, &[4]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    write(&h, 70, &[5]).await.unwrap();
    let now = h.write_intents(V).await.unwrap();
    assert!(!now.iter().any(|r| r.start == BlockIndex(1984)), "idle intent not cleared: {now:?}");
    engine.shutdown().unwrap();
}
