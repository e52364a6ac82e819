//! Disk engine micro benchmarks: 4 KiB random writes and reads at queue depth 1
//! and 32, 1 MiB sequential writes and reads, on a preallocated file opened with
//! O_DIRECT. Every write is durable when it returns (group commit: one
//! fdatasync per batch), so the fio equivalent is `ioengine=io_uring direct=1`
//! with `fdatasync=<queue depth>`.
//!
//! The file lives in `$SLATE_BENCH_DIR` (default /var/tmp; O_DIRECT needs a real
//! filesystem, not tmpfs) and is kept after the run as `slate-engine-bench.disk`
//! so that fio can be run on the same file; the data region's offset is printed.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use slate_node::engine::{format, Engine, EngineHandle, EngineOptions, FormatOptions};
use slate_protocol::{BlockIndex, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const V: VolumeId = VolumeId(1);
/// The benchmarked region of the volume: 1 GiB.
const REGION_BLOCKS: u64 = (1 << 30) / 4096;
const DISK_BYTES: u64 = 1536 << 20;

fn disk_path() -> PathBuf {
    let dir = std::env::var_os("SLATE_BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    dir.join("slate-engine-bench.disk")
}

fn payload(blocks: usize, seed: u64) -> (Vec<u32>, Bytes) {
    let mut data = vec![0u8; blocks * BLOCK_SIZE_BYTES];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    rng.fill(&mut data[..]);
    let crcs = data.chunks(BLOCK_SIZE_BYTES).map(crc32c::crc32c).collect();
    (crcs, Bytes::from(data))
}

/// Runs `total` operations keeping `depth` in flight; returns the elapsed time.
async fn run_depth<F, Fut>(depth: usize, total: u64, op: Arc<F>) -> Duration
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    if depth == 1 {
        for i in 0..total {
            op(i).await;
        }
        return start.elapsed();
    }
    let mut set = tokio::task::JoinSet::new();
    let mut issued = 0u64;
    while issued < total.min(depth as u64) {
        set.spawn(op(issued));
        issued += 1;
    }
    while set.join_next().await.is_some() {
        if issued < total {
            set.spawn(op(issued));
            issued += 1;
        }
    }
    start.elapsed()
}

fn bench_engine(c: &mut Criterion) {
    let path = disk_path();
    let rep = format(
        &path,
        &FormatOptions {
            extent_size_bytes: 4 << 20,
            journal_bytes: 64 << 20,
            node_id: NodeId(1),
            size_bytes: Some(DISK_BYTES),
        },
    )
    .expect("format bench disk");
    eprintln!(
        "bench disk {}: data region at byte {} ({} extents of 4 MiB)",
        path.display(),
        rep.data_start_bytes,
        rep.extent_count
    );
    // One client thread: requests and replies never hop between runtime workers, so
    // the figures are the engine's (the machine has 2 cores: client + engine thread).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let opts = EngineOptions { zero_rate_bytes_per_sec: u64::MAX, ..EngineOptions::default() };
    let (engine, h) = Engine::open(&path, opts).expect("open");
    let h: EngineHandle = h;
    rt.block_on(async {
        assert!(h.wait_zeroed(Duration::from_mins(10)).await.unwrap());
        h.assign_segment(V, SegmentIndex(0), REGION_BLOCKS).await.unwrap();
        // Fill the region so that reads hit data (1 MiB writes).
        let (crcs, data) = payload(256, 7);
        for i in 0..REGION_BLOCKS / 256 {
            h.write(V, BlockIndex(i * 256), crcs.clone(), data.clone()).await.unwrap();
        }
    });

    let mut g = c.benchmark_group("engine");
    g.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));
    let small = Arc::new(payload(1, 1));
    for depth in [1usize, 32] {
        g.throughput(Throughput::Bytes(4096));
        let (hh, p) = (h.clone(), small.clone());
        g.bench_function(format!("randwrite_4k_qd{depth}"), |b| {
            b.iter_custom(|iters| {
                let (hh, p) = (hh.clone(), p.clone());
                rt.block_on(run_depth(
                    depth,
                    iters,
                    Arc::new(move |i: u64| {
                        let (hh, p) = (hh.clone(), p.clone());
                        async move {
                            let blk = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % REGION_BLOCKS;
                            hh.write(V, BlockIndex(blk), p.0.clone(), p.1.clone()).await.unwrap();
                        }
                    }),
                ))
            });
        });
        let hh = h.clone();
        g.bench_function(format!("randread_4k_qd{depth}"), |b| {
            b.iter_custom(|iters| {
                let hh = hh.clone();
                rt.block_on(run_depth(
                    depth,
                    iters,
                    Arc::new(move |i: u64| {
                        let hh = hh.clone();
                        async move {
                            let blk = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % REGION_BLOCKS;
                            hh.read(V, BlockIndex(blk), 1).await.unwrap();
                        }
                    }),
                ))
            });
        });
    }
    let big = Arc::new(payload(256, 2));
    g.throughput(Throughput::Bytes(1 << 20));
    let (hh, p) = (h.clone(), big.clone());
    g.bench_function("seqwrite_1m_qd1", |b| {
        b.iter_custom(|iters| {
            let (hh, p) = (hh.clone(), p.clone());
            rt.block_on(run_depth(
                1,
                iters,
                Arc::new(move |i: u64| {
                    let (hh, p) = (hh.clone(), p.clone());
                    async move {
                        let blk = (i * 256) % REGION_BLOCKS;
                        hh.write(V, BlockIndex(blk), p.0.clone(), p.1.clone()).await.unwrap();
                    }
                }),
            ))
        });
    });
    let hh = h.clone();
    g.bench_function("seqread_1m_qd1", |b| {
        b.iter_custom(|iters| {
            let hh = hh.clone();
            rt.block_on(run_depth(
                1,
                iters,
                Arc::new(move |i: u64| {
                    let hh = hh.clone();
                    async move {
                        let blk = (i * 256) % REGION_BLOCKS;
                        hh.read(V, BlockIndex(blk), 256).await.unwrap();
                    }
                }),
            ))
        });
    });
    g.finish();
    let st = h.stats();
    eprintln!(
        "engine stats: writes {} batches {} fsyncs {} (writes per fsync {:.1}), journal {} bytes",
        st.writes,
        st.batches,
        st.fsyncs,
        st.writes as f64 / st.fsyncs.max(1) as f64,
        st.journal_bytes_written
    );
    drop(h);
    engine.shutdown().unwrap();
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);
