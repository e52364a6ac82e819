//! Figures, not checks (ignored; run by hand and read the output):
//! how long a freshly formatted disk file takes to become all free, and the tenant's
//! 4 KiB write IOPS while that happens vs once it has settled.
//!
//! ```text
//! cargo test --release -p slate-node --test engine_zeroing_figures -- --ignored --nocapture
//! ```
//! `SLATE_FIG_BYTES` (default 4 GiB) sizes the disk, `SLATE_FIG_QD` (default 1) is the
//! number of concurrent writers, `SLATE_FIG_RATE` the zeroing rate (default: the engine's).

use bytes::Bytes;
use slate_node::engine::{format, Engine, EngineHandle, EngineOptions, FormatOptions};
use slate_protocol::{BlockIndex, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const V: VolumeId = VolumeId(1);
/// The tenant writes 4 KiB blocks at random in the first 64 MiB of its volume.
const REGION_BLOCKS: u64 = 16384;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn writer(h: EngineHandle, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>, seed: u64) {
    let mut x = seed | 1;
    let data = vec![0x5au8; BLOCK_SIZE_BYTES];
    let crc = crc32c::crc32c(&data);
    let data = Bytes::from(data);
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        h.write(V, BlockIndex(x % REGION_BLOCKS), vec![crc], data.clone()).await.expect("write");
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand"]
async fn fresh_disk_zeroing_time_and_tenant_iops() {
    let bytes = env_u64("SLATE_FIG_BYTES", 4 << 30);
    let qd = env_u64("SLATE_FIG_QD", 1);
    let dir = slate_tests::scratch_dir("slate-fig-");
    let path = dir.path().join("disk");
    let t = Instant::now();
    let rep = format(&path, &FormatOptions { size_bytes: Some(bytes), node_id: NodeId(1), ..FormatOptions::default() })
        .expect("format");
    println!(
        "format: {:.2} s, {} extents of {} MiB",
        t.elapsed().as_secs_f64(),
        rep.extent_count,
        rep.extent_size_bytes >> 20
    );
    let mut opts = EngineOptions::default();
    opts.zero_rate_bytes_per_sec = env_u64("SLATE_FIG_RATE", opts.zero_rate_bytes_per_sec);
    let start = Instant::now();
    let (engine, h) = Engine::open(&path, opts).expect("open");
    h.assign_segment(V, SegmentIndex(0), 1 << 18).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let spawn_writers = |stop: &Arc<AtomicBool>, ops: &Arc<AtomicU64>| {
        (0..qd)
            .map(|i| tokio::spawn(writer(h.clone(), Arc::clone(stop), Arc::clone(ops), 0x9E37_79B9 * (i + 1))))
            .collect::<Vec<_>>()
    };
    let ws = spawn_writers(&stop, &ops);
    assert!(h.wait_zeroed(Duration::from_mins(30)).await.unwrap());
    let zero_time = start.elapsed();
    let during = ops.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in ws {
        w.await.unwrap();
    }
    let st = h.stats();
    println!(
        "all free after {:.2} s ({} extents free, {} owned); tenant QD{qd} 4K writes during: {:.0} IOPS",
        zero_time.as_secs_f64(),
        st.extents_free,
        st.extents_owned,
        during as f64 / zero_time.as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let ws = spawn_writers(&stop, &ops);
    let settled_for = Duration::from_secs(env_u64("SLATE_FIG_SETTLED_SECS", 10));
    let t = Instant::now();
    tokio::time::sleep(settled_for).await;
    stop.store(true, Ordering::Relaxed);
    let n = ops.load(Ordering::Relaxed);
    let took = t.elapsed();
    for w in ws {
        w.await.unwrap();
    }
    println!("tenant QD{qd} 4K writes settled: {:.0} IOPS", n as f64 / took.as_secs_f64());
    engine.shutdown().unwrap();
}
