//! Verified zeroing: data of freed extents is overwritten before anyone else can
//! get the extent, and allocation never hands out an extent that was not zeroed
//! and verified, also when the engine dies in the middle of zeroing.
//!
//! The disk is scanned raw (the file, or the file behind a loop device) for the
//! tenant's byte pattern.

use bytes::Bytes;
use slate_node::engine::{format, Engine, EngineHandle, EngineOptions, FormatOptions, FormatReport};
use slate_protocol::{BlockIndex, Epoch, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const V: VolumeId = VolumeId(42);

/// Failpoints are process-wide: the tests of this file run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const EXTENT: u64 = 256 << 10;

fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::tempdir_in(base).expect("scratch dir")
}

/// A block made of a recognisable 32-byte marker: `tag` and the block number, repeated.
fn stamped(tag: &[u8; 16], block: u64) -> Vec<u8> {
    let mut unit = [0u8; 32];
    unit[..16].copy_from_slice(tag);
    unit[16..24].copy_from_slice(&block.to_le_bytes());
    unit[24..].copy_from_slice(b"|slate|\n");
    unit.repeat(BLOCK_SIZE_BYTES / 32)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn write_stamped(h: &EngineHandle, tag: &[u8; 16], start: u64, count: u64) {
    try_write_stamped(h, tag, start, count).await.expect("write");
}

async fn try_write_stamped(
    h: &EngineHandle,
    tag: &[u8; 16],
    start: u64,
    count: u64,
) -> Result<(), slate_node::engine::EngineError> {
    let mut data = Vec::new();
    let mut crcs = Vec::new();
    for b in start..start + count {
        let blk = stamped(tag, b);
        crcs.push(crc32c::crc32c(&blk));
        data.extend_from_slice(&blk);
    }
    h.write(V, BlockIndex(start), crcs, Bytes::from(data)).await
}

fn fmt(path: &Path, size: Option<u64>) -> FormatReport {
    format(
        path,
        &FormatOptions { extent_size_bytes: EXTENT, journal_bytes: 1 << 20, node_id: NodeId(9), size_bytes: size },
    )
    .expect("format")
}

fn opts(rate: u64) -> EngineOptions {
    EngineOptions { zero_rate_bytes_per_sec: rate, metadata_cache_bytes: 4 << 20, ..EngineOptions::default() }
}

/// How the engine is expected to have zeroed: by the disk's own primitive or by writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Offload,
    Writes,
}

fn check_method(h: &EngineHandle, expect: Expect) {
    let st = h.stats();
    assert!(st.bytes_zeroed_total > 0, "{st:?}");
    match expect {
        Expect::Offload => assert_eq!(st.bytes_zeroed_offload_total, st.bytes_zeroed_total, "{st:?}"),
        Expect::Writes => assert_eq!(st.bytes_zeroed_offload_total, 0, "{st:?}"),
    }
}

/// Writes two generations of a pattern, deletes the snapshot that held the first and
/// releases the segment; after zeroing, no byte sequence of either is on the disk.
async fn pattern_gone_after_free(dev: &Path, backing: &Path, o: EngineOptions, expect: Expect) {
    let (engine, h) = Engine::open(dev, o.clone()).expect("open");
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap(), "initial zeroing");
    check_method(&h, expect);
    h.assign_segment(V, SegmentIndex(0), 4096).await.unwrap();
    let old = b"TENANT-A-OLD-DAT";
    let new = b"TENANT-A-NEW-DAT";
    write_stamped(&h, old, 0, 200).await;
    h.snapshot(V, Epoch(1)).await.unwrap();
    write_stamped(&h, new, 0, 200).await;
    engine.shutdown().unwrap();
    let raw = std::fs::read(backing).unwrap();
    assert!(contains(&raw, &old[..]) && contains(&raw, &new[..]), "pattern written to the disk");

    let (engine, h) = Engine::open(dev, o.clone()).expect("reopen");
    // The snapshot's layer is fully shadowed by the head: its extents go to zeroing.
    h.delete_layer(V, SegmentIndex(0), Epoch(1)).await.unwrap();
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    engine.shutdown().unwrap();
    let raw = std::fs::read(backing).unwrap();
    assert!(!contains(&raw, &old[..]), "old pattern survives the layer delete");
    assert!(contains(&raw, &new[..]));

    let (engine, h) = Engine::open(dev, o).expect("reopen");
    h.release_segment(V, SegmentIndex(0)).await.unwrap();
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    check_method(&h, expect);
    let st = h.stats();
    assert_eq!(st.extents_owned, 0, "{st:?}");
    assert_eq!(st.extents_free, st.extents_total, "{st:?}");
    engine.shutdown().unwrap();
    let raw = std::fs::read(backing).unwrap();
    assert!(!contains(&raw, &old[..]) && !contains(&raw, &new[..]), "pattern survives release");
}

#[tokio::test]
async fn freed_extents_are_zeroed_on_a_file() {
    let _serial = SERIAL.lock().await;
    let dir = scratch();
    let path = dir.path().join("disk");
    fmt(&path, Some(16 << 20));
    // A regular file on ext4 / xfs: fallocate(FALLOC_FL_ZERO_RANGE).
    pattern_gone_after_free(&path, &path, opts(64 << 20), Expect::Offload).await;
}

#[tokio::test]
async fn freed_extents_are_zeroed_by_writes_when_asked() {
    let _serial = SERIAL.lock().await;
    let dir = scratch();
    let path = dir.path().join("disk");
    fmt(&path, Some(16 << 20));
    let o = EngineOptions { zero_with_writes: true, ..opts(64 << 20) };
    pattern_gone_after_free(&path, &path, o, Expect::Writes).await;
}

/// The same on a loop device, when this machine lets us make one (root, loop driver).
#[tokio::test]
async fn freed_extents_are_zeroed_on_a_loop_device() {
    let _serial = SERIAL.lock().await;
    let dir = scratch();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing).unwrap().set_len(16 << 20).unwrap();
    let out = Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(&backing).output();
    let dev = match out {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => {
            eprintln!("skipping loop device test: losetup: {}", String::from_utf8_lossy(&o.stderr).trim());
            return;
        }
        Err(e) => {
            eprintln!("skipping loop device test: losetup: {e}");
            return;
        }
    };
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let guard = Detach(dev.clone());
    fmt(&dev, None);
    // BLKZEROOUT (offloaded to the backing file by the loop driver where it advertises
    // write-zeroes, else the kernel writes zero pages: either way not our writes).
    pattern_gone_after_free(&dev, &dev, opts(64 << 20), Expect::Offload).await;
    drop(guard);
    let raw = std::fs::read(&backing).unwrap();
    assert!(!contains(&raw, b"TENANT-A-OLD-DAT") && !contains(&raw, b"TENANT-A-NEW-DAT"));
}

/// Fills the whole file with a previous tenant's data before formatting.
fn fill_with_old_tenant(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = Vec::with_capacity(1 << 20);
    let mut b = 0u64;
    while b * (BLOCK_SIZE_BYTES as u64) < size {
        buf.extend_from_slice(&stamped(b"PREVIOUS-TENANT!", b));
        b += 1;
        if buf.len() >= 1 << 20 {
            f.write_all(&buf).unwrap();
            buf.clear();
        }
    }
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

/// Every extent that holds a block of `tag` holds nothing but `tag` blocks and zeros.
fn check_allocated_extents_clean(path: &Path, rep: &FormatReport, tag: &[u8; 16]) -> usize {
    let raw = std::fs::read(path).unwrap();
    let data = &raw[rep.data_start_bytes as usize..];
    let mut extents = 0;
    for ext in data.chunks(EXTENT as usize).take(rep.extent_count as usize) {
        let ours = ext.chunks(BLOCK_SIZE_BYTES).filter(|b| b.starts_with(tag)).count();
        if ours == 0 {
            continue;
        }
        extents += 1;
        for (i, blk) in ext.chunks(BLOCK_SIZE_BYTES).enumerate() {
            assert!(
                blk.starts_with(tag) || blk.iter().all(|x| *x == 0),
                "allocated extent holds a block (#{i}) that is neither ours nor zero: not verified zero"
            );
        }
    }
    extents
}

#[tokio::test]
async fn allocation_takes_only_verified_extents_even_across_a_crash_mid_zeroing() {
    let _serial = SERIAL.lock().await;
    let dir = scratch();
    let path = dir.path().join("disk");
    let size = 8 << 20;
    fill_with_old_tenant(&path, size);
    let rep = fmt(&path, None);
    // No background zeroing: every allocation has to zero an extent itself.
    let (engine, h) = Engine::open(&path, opts(0)).expect("open");
    assert_eq!(h.stats().extents_dirty, rep.extent_count, "a fresh disk starts dirty");
    assert_eq!(h.stats().extents_free, 0);
    h.assign_segment(V, SegmentIndex(0), 1 << 16).await.unwrap();
    // Die half way through zeroing the first extent.
    fail::cfg("mid_zeroing", "1*return").unwrap();
    let h2 = h.clone();
    let w = tokio::spawn(async move { try_write_stamped(&h2, b"NEW-TENANT-DATA!", 0, 1).await });
    assert!(w.await.unwrap().is_err(), "the write cannot complete: the engine died mid-zeroing");
    engine.crash().unwrap();
    fail::remove("mid_zeroing");
    // The interrupted extent is half zero, half the previous tenant's.
    let raw = std::fs::read(&path).unwrap();
    let first = &raw[rep.data_start_bytes as usize..(rep.data_start_bytes + EXTENT) as usize];
    assert!(first[..EXTENT as usize / 2].iter().all(|b| *b == 0));
    assert!(contains(&first[EXTENT as usize / 2..], b"PREVIOUS-TENANT!"));

    // After restart it is zeroed again from the start before anyone gets it; likewise
    // after a crash between writing zeros and verifying them.
    let (engine, h) = Engine::open(&path, opts(0)).expect("reopen");
    fail::cfg("after_zeroing_before_verify", "1*return").unwrap();
    let h2 = h.clone();
    let w = tokio::spawn(async move { try_write_stamped(&h2, b"NEW-TENANT-DATA!", 0, 1).await });
    assert!(w.await.unwrap().is_err());
    engine.crash().unwrap();
    fail::remove("after_zeroing_before_verify");

    let (engine, h) = Engine::open(&path, opts(0)).expect("reopen");
    for seg_block in [0u64, 70, 200, 1000, 5000] {
        write_stamped(&h, b"NEW-TENANT-DATA!", seg_block, 3).await;
    }
    let st = h.stats();
    assert!(st.extents_owned >= 4, "{st:?}");
    assert_eq!(st.extents_free + st.extents_owned + st.extents_dirty + st.extents_zeroing, rep.extent_count);
    // Unwritten blocks of allocated extents read as zeros (never the previous tenant).
    let r = h.read(V, BlockIndex(0), 64).await.unwrap();
    assert!(!contains(&r.data, b"PREVIOUS-TENANT!"));
    engine.shutdown().unwrap();
    let n = check_allocated_extents_clean(&path, &rep, b"NEW-TENANT-DATA!");
    assert!(n >= 4, "found {n} allocated extents");
    // The previous tenant's data is still in the extents nobody was given.
    assert!(contains(&std::fs::read(&path).unwrap(), b"PREVIOUS-TENANT!"));
}
