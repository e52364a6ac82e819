//! Property test of the disk engine against an in-memory model.
//!
//! Random sequences of writes, reads, trims, flushes, snapshots, snapshot reads,
//! layer deletes, clean restarts and crashes run against a real engine on a real
//! O_DIRECT file. A crash leaves writes in flight: they are spawned and the engine
//! is stopped without a checkpoint, sometimes through a failpoint that stops it in
//! a precise crash window (data written but not journaled, journaled but not
//! synced, synced but not acknowledged). Then the same file is reopened.
//!
//! The model keeps, per block, the set of values a read may return: exactly one
//! for every acknowledged write; for a write that was never acknowledged, the old
//! value, the new value, or a reported torn block (`Corrupt`), never anything
//! else. A read narrows the set to what it saw, so later reads must agree.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use slate_node::engine::{format, Engine, EngineError, EngineHandle, EngineOptions, FormatOptions};
use slate_protocol::{BlockIndex, BlockRange, Epoch, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const V: VolumeId = VolumeId(1);
const SEG_BLOCKS: u64 = 64;
const SEGMENTS: u32 = 2;
const BLOCKS: u64 = SEG_BLOCKS * SEGMENTS as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    Zero,
    Data(u32),
    Corrupt,
}

type Cell = BTreeSet<Val>;

#[derive(Clone, Debug)]
enum Op {
    Write { start: u64, len: u64, seed: u32 },
    Read { start: u64, len: u64 },
    Trim { start: u64, len: u64 },
    Flush,
    Snapshot,
    ReadSnapshot { pick: usize, start: u64, len: u64 },
    DeleteLayer { pick: usize },
    Restart,
    Crash { writes: Vec<(u64, u64, u32)>, window: u8 },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..BLOCKS, 1..=8u64).prop_map(|(s, l)| (s, l.min(BLOCKS - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<u32>()).prop_map(|((start, len), seed)| Op::Write { start, len, seed }),
        4 => range().prop_map(|(start, len)| Op::Read { start, len }),
        2 => range().prop_map(|(start, len)| Op::Trim { start, len }),
        1 => Just(Op::Flush),
        2 => Just(Op::Snapshot),
        2 => (any::<usize>(), range()).prop_map(|(pick, (start, len))| Op::ReadSnapshot { pick, start, len }),
        1 => any::<usize>().prop_map(|pick| Op::DeleteLayer { pick }),
        1 => Just(Op::Restart),
        2 => (proptest::collection::vec((range(), any::<u32>()).prop_map(|((s, l), d)| (s, l, d)), 0..4), 0..4u8)
            .prop_map(|(writes, window)| Op::Crash { writes, window }),
    ]
}

fn pattern(seed: u32, block: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK_SIZE_BYTES];
    let mut x = u64::from(seed) ^ (block << 32) ^ 0x9E37_79B9_7F4A_7C15;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    v
}

fn write_args(start: u64, len: u64, seed: u32) -> (Vec<u32>, Bytes) {
    let mut data = Vec::with_capacity(len as usize * BLOCK_SIZE_BYTES);
    let mut crcs = Vec::new();
    for b in start..start + len {
        let p = pattern(seed, b);
        crcs.push(crc32c::crc32c(&p));
        data.extend_from_slice(&p);
    }
    (crcs, Bytes::from(data))
}

fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::tempdir_in(base).expect("scratch dir")
}

fn opts() -> EngineOptions {
    EngineOptions {
        zero_rate_bytes_per_sec: u64::MAX,
        metadata_cache_bytes: 1 << 20, // the minimum: exercises eviction
        intent_region_blocks: 16,
        ..EngineOptions::default()
    }
}

struct Model {
    head: Vec<Cell>,
    /// (epoch, frozen image)
    snaps: Vec<(Epoch, Vec<Cell>)>,
    next_epoch: u64,
}

fn known(v: Val) -> Cell {
    std::iter::once(v).collect()
}

/// Checks a read result against the cells and narrows them to what was seen.
fn check_read(
    cells: &mut [Cell],
    start: u64,
    len: u64,
    r: Result<slate_node::engine::ReadResult, EngineError>,
    narrow: bool,
) -> Result<(), TestCaseError> {
    match r {
        Ok(r) => {
            for i in 0..len as usize {
                let b = start + i as u64;
                let written = r.written[i / 8] >> (i % 8) & 1 == 1;
                let data = &r.data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
                let seen = if written {
                    let cands: Vec<Val> = cells[b as usize]
                        .iter()
                        .copied()
                        .filter(|v| matches!(v, Val::Data(s) if pattern(*s, b) == data))
                        .collect();
                    prop_assert!(
                        !cands.is_empty(),
                        "block {b}: read data matches no allowed value {:?}",
                        cells[b as usize]
                    );
                    cands[0]
                } else {
                    prop_assert!(data.iter().all(|x| *x == 0), "block {b}: unwritten block not zero");
                    Val::Zero
                };
                prop_assert!(
                    cells[b as usize].contains(&seen),
                    "block {b}: read {seen:?}, allowed {:?}",
                    cells[b as usize]
                );
                if narrow {
                    cells[b as usize] = known(seen);
                }
            }
        }
        Err(EngineError::Corrupt { block }) => {
            let b = block.0;
            prop_assert!(b >= start && b < start + len, "corrupt block {b} outside the read");
            prop_assert!(
                cells[b as usize].contains(&Val::Corrupt),
                "block {b} reported corrupt, allowed {:?}",
                cells[b as usize]
            );
            if narrow {
                cells[b as usize] = known(Val::Corrupt);
            }
        }
        Err(e) => prop_assert!(false, "read failed: {e}"),
    }
    Ok(())
}

async fn setup(h: &EngineHandle) {
    for s in 0..SEGMENTS {
        h.assign_segment(V, SegmentIndex(s), SEG_BLOCKS).await.expect("assign");
    }
}

#[allow(clippy::many_single_char_names)]
async fn run_case(path: &Path, ops: Vec<Op>) -> Result<(), TestCaseError> {
    format(
        path,
        &FormatOptions {
            extent_size_bytes: 64 << 10,
            journal_bytes: 1 << 20,
            node_id: NodeId(1),
            size_bytes: Some(24 << 20),
        },
    )
    .expect("format");
    let (mut engine, mut h) = Engine::open(path, opts()).expect("open");
    setup(&h).await;
    let mut m = Model { head: vec![known(Val::Zero); BLOCKS as usize], snaps: Vec::new(), next_epoch: 1 };
    for op in ops {
        match op {
            Op::Write { start, len, seed } => {
                let (crcs, data) = write_args(start, len, seed);
                h.write(V, BlockIndex(start), crcs, data)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
                for b in start..start + len {
                    m.head[b as usize] = known(Val::Data(seed));
                }
            }
            Op::Read { start, len } => {
                let r = h.read(V, BlockIndex(start), len as u32).await;
                check_read(&mut m.head, start, len, r, true)?;
            }
            Op::Trim { start, len } => {
                h.trim(V, BlockRange { start: BlockIndex(start), count: len })
                    .await
                    .map_err(|e| TestCaseError::fail(format!("trim: {e}")))?;
                for b in start..start + len {
                    m.head[b as usize] = known(Val::Zero);
                }
            }
            Op::Flush => h.flush(V).await.map_err(|e| TestCaseError::fail(format!("flush: {e}")))?,
            Op::Snapshot => {
                let e = Epoch(m.next_epoch * 10);
                m.next_epoch += 1;
                h.snapshot(V, e).await.map_err(|e| TestCaseError::fail(format!("snapshot: {e}")))?;
                m.snaps.push((e, m.head.clone()));
            }
            Op::ReadSnapshot { pick, start, len } => {
                if m.snaps.is_empty() {
                    continue;
                }
                let i = pick % m.snaps.len();
                let e = m.snaps[i].0;
                let r = h.read_at(V, e, BlockIndex(start), len as u32).await;
                check_read(&mut m.snaps[i].1, start, len, r, false)?;
            }
            Op::DeleteLayer { pick } => {
                if m.snaps.is_empty() {
                    continue;
                }
                let i = pick % m.snaps.len();
                let e = m.snaps.remove(i).0;
                for s in 0..SEGMENTS {
                    h.delete_layer(V, SegmentIndex(s), e)
                        .await
                        .map_err(|e| TestCaseError::fail(format!("delete layer: {e}")))?;
                }
            }
            Op::Restart => {
                drop(h);
                engine.shutdown().map_err(|e| TestCaseError::fail(format!("shutdown: {e}")))?;
                (engine, h) = Engine::open(path, opts()).map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
            }
            Op::Crash { writes, window } => {
                let fp = match window {
                    1 => Some("after_data_write_before_journal"),
                    2 => Some("after_journal_before_fsync"),
                    3 => Some("before_ack"),
                    _ => None,
                };
                if let Some(name) = fp {
                    fail::cfg(name, "1*return").expect("failpoint");
                }
                let mut tasks = Vec::new();
                for &(start, len, seed) in &writes {
                    let h2 = h.clone();
                    let (crcs, data) = write_args(start, len, seed);
                    tasks.push(tokio::spawn(async move { h2.write(V, BlockIndex(start), crcs, data).await }));
                }
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
                let mut results = Vec::new();
                if fp.is_some() && !writes.is_empty() {
                    // Let the engine reach the failpoint (it stops itself there).
                    for t in tasks.drain(..) {
                        results.push(matches!(t.await, Ok(Ok(()))));
                    }
                }
                drop(h);
                engine.crash().map_err(|e| TestCaseError::fail(format!("crash: {e}")))?;
                if let Some(name) = fp {
                    fail::remove(name);
                }
                for t in tasks {
                    results.push(matches!(t.await, Ok(Ok(()))));
                }
                let acked = results;
                // Per block: fold the in-flight writes in order.
                for b in 0..BLOCKS {
                    let covering: Vec<(u32, bool)> = writes
                        .iter()
                        .zip(&acked)
                        .filter(|((s, l, _), _)| b >= *s && b < s + l)
                        .map(|((_, _, seed), a)| (*seed, *a))
                        .collect();
                    if covering.is_empty() {
                        continue;
                    }
                    let last_acked = covering.iter().rposition(|(_, a)| *a);
                    let mut cell: Cell = match last_acked {
                        Some(i) => known(Val::Data(covering[i].0)),
                        None => m.head[b as usize].clone(),
                    };
                    let later = &covering[last_acked.map_or(0, |i| i + 1)..];
                    for (seed, _) in later {
                        cell.insert(Val::Data(*seed));
                    }
                    if !later.is_empty() {
                        cell.insert(Val::Corrupt);
                    }
                    m.head[b as usize] = cell;
                }
                (engine, h) = Engine::open(path, opts()).map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
            }
        }
    }
    // Everything must still read as the model says, head and every snapshot.
    let r = h.read(V, BlockIndex(0), BLOCKS as u32).await;
    if let Err(EngineError::Corrupt { .. }) = r {
        for b in 0..BLOCKS {
            let r = h.read(V, BlockIndex(b), 1).await;
            check_read(&mut m.head, b, 1, r, true)?;
        }
    } else {
        check_read(&mut m.head, 0, BLOCKS, r, true)?;
    }
    for (e, img) in &mut m.snaps {
        for b in 0..BLOCKS {
            let r = h.read_at(V, *e, BlockIndex(b), 1).await;
            check_read(img, b, 1, r, false)?;
        }
    }
    drop(h);
    engine.shutdown().map_err(|e| TestCaseError::fail(format!("final shutdown: {e}")))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/engine_model.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = scratch();
        let path = dir.path().join("disk");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run_case(&path, ops))?;
    }
}
