//! The engine's RAM for metadata stays bounded: per-block crcs and bitmaps are
//! paged through a cache of `metadata_cache_bytes`, however many extents are
//! written. A large sparse file with many small extents makes the on-disk
//! metadata far larger than the cache.

use bytes::Bytes;
use slate_node::engine::{format, Engine, EngineOptions, FormatOptions};
use slate_protocol::{BlockIndex, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::path::PathBuf;

const V: VolumeId = VolumeId(5);
const EXTENT_BLOCKS: u64 = 16; // 64 KiB extents: one metadata page each

fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::tempdir_in(base).expect("scratch dir")
}

fn block(i: u64) -> Vec<u8> {
    let mut v = vec![(i % 253) as u8; BLOCK_SIZE_BYTES];
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

#[tokio::test]
async fn metadata_cache_stays_within_its_bound() {
    let dir = scratch();
    let path = dir.path().join("disk");
    // Sparse: the file's size, not its blocks.
    std::fs::File::create(&path).unwrap().set_len(4 << 30).unwrap();
    let rep = format(
        &path,
        &FormatOptions {
            extent_size_bytes: EXTENT_BLOCKS * 4096,
            journal_bytes: 8 << 20,
            node_id: NodeId(1),
            size_bytes: None,
        },
    )
    .unwrap();
    assert!(rep.extent_count > 50_000, "{rep:?}");
    let cache_bytes = 6 << 20;
    let opts = EngineOptions {
        zero_rate_bytes_per_sec: 0, // zero on allocation only
        metadata_cache_bytes: cache_bytes,
        ..EngineOptions::default()
    };
    let (engine, h) = Engine::open(&path, opts.clone()).unwrap();
    let limit = h.stats().metadata_cache_limit_bytes;
    assert!(limit <= cache_bytes, "limit {limit} above the configured {cache_bytes}");
    h.assign_segment(V, SegmentIndex(0), 1 << 20).await.unwrap();
    // One block in each of 3500 extents: 3500 metadata pages, more than the cache holds.
    let extents = 3500u64;
    for i in 0..extents {
        let b = i * EXTENT_BLOCKS + i % EXTENT_BLOCKS;
        let data = block(b);
        h.write(V, BlockIndex(b), vec![crc32c::crc32c(&data)], Bytes::from(data)).await.unwrap();
    }
    let st = h.stats();
    assert!(st.metadata_page_evictions > 0, "{st:?}");
    assert!(st.metadata_cache_bytes_peak <= limit, "peak {} over limit {limit}", st.metadata_cache_bytes_peak);
    engine.crash().unwrap();
    // Replay and read-back also stay within the bound, and every block is there.
    let (_engine, h) = Engine::open(&path, opts).unwrap();
    for i in (0..extents).step_by(7) {
        let b = i * EXTENT_BLOCKS + i % EXTENT_BLOCKS;
        let r = h.read(V, BlockIndex(b), 1).await.unwrap();
        assert_eq!(&r.data[..], &block(b)[..], "block {b}");
    }
    let st = h.stats();
    assert!(st.metadata_cache_bytes_peak <= limit, "peak {} over limit {limit}", st.metadata_cache_bytes_peak);
    println!(
        "metadata cache: limit {limit} bytes, peak {} bytes, {} loads, {} evictions",
        st.metadata_cache_bytes_peak, st.metadata_page_loads, st.metadata_page_evictions
    );
}
