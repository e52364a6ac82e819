//! Whole-device erase: every byte of a used disk reads zero afterwards, a stopped erase
//! resumes from its resume point (in either phase), and a disk an engine holds is refused.

use bytes::Bytes;
use slate_node::engine::{format, Engine, EngineOptions, FormatOptions};
use slate_node::erase::{
    erase_device, erase_device_with, DeviceKind, EraseError, EraseOptions, ErasePhase, EraseProgress, EraseReport,
};
use slate_protocol::{BlockIndex, NodeId, SegmentIndex, VolumeId, BLOCK_SIZE_BYTES};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const V: VolumeId = VolumeId(8);
const TAG: &[u8] = b"ERASE-ME-PLEASE!";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Formats `dev`, writes a recognisable pattern through an engine, shuts it down.
async fn used_disk(dev: &Path, size: Option<u64>) {
    format(
        dev,
        &FormatOptions { extent_size_bytes: 1 << 20, journal_bytes: 1 << 20, node_id: NodeId(4), size_bytes: size },
    )
    .expect("format");
    let (engine, h) =
        Engine::open(dev, EngineOptions { zero_rate_bytes_per_sec: u64::MAX, ..EngineOptions::default() })
            .expect("open");
    assert!(h.wait_zeroed(Duration::from_mins(2)).await.unwrap());
    h.assign_segment(V, SegmentIndex(0), 8192).await.unwrap();
    let block = TAG.repeat(BLOCK_SIZE_BYTES / TAG.len());
    for start in [0u64, 300, 2000, 5000] {
        let n = 64;
        let data: Vec<u8> = block.repeat(n);
        let crcs = vec![crc32c::crc32c(&block); n];
        h.write(V, BlockIndex(start), crcs, Bytes::from(data)).await.expect("write");
    }
    engine.shutdown().unwrap();
}

fn all_zero(path: &Path) -> bool {
    std::fs::read(path).unwrap().iter().all(|b| *b == 0)
}

fn check_report(r: &EraseReport, path: &Path, size: u64) {
    assert_eq!(r.device, path);
    assert_eq!(r.size_bytes, size);
    assert_eq!(r.mismatched_bytes, 0, "{r:?}");
    assert_eq!(r.first_mismatch_offset, None);
    assert!(r.finished_ms >= r.started_ms && r.started_ms > 1_600_000_000_000);
    assert_eq!(r.tool, "slate-node");
    assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    assert!(!r.technique.is_empty());
    let json = serde_json::to_value(r).unwrap();
    assert!(json.get("identity").is_some() && json.get("method").is_some(), "{json}");
}

#[tokio::test]
async fn erase_zeroes_every_byte_of_a_used_disk_file() {
    let dir = slate_tests::scratch_dir("slate-erase-");
    let path = dir.path().join("disk");
    // A size that is not a multiple of 4 KiB: the tail is erased too.
    let size = (48 << 20) + 1536;
    used_disk(&path, Some(size)).await;
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(raw.len() as u64, size);
    assert!(contains(&raw, TAG));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0xAB; 1536], size - 1536).unwrap();
        })
        .unwrap();

    let mut reports: Vec<EraseProgress> = Vec::new();
    let r = erase_device(&path, 0, &mut |p| {
        reports.push(p.clone());
        true
    })
    .expect("erase");
    check_report(&r, &path, size);
    assert_eq!((r.bytes_written, r.bytes_verified, r.resumed_from), (size, size, 0));
    assert_eq!(r.kind, DeviceKind::File);
    assert!(r.method.starts_with("zero-range"), "{}", r.method);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(r.identity.st_ino, Some(std::os::unix::fs::MetadataExt::ino(&meta)));
    assert_eq!(reports.first().map(|p| p.phase), Some(ErasePhase::Overwrite));
    assert_eq!(reports.last().map(|p| p.resume_from), Some(2 * size));
    assert!(all_zero(&path), "a non-zero byte survived the erase");
    // The engine no longer finds a disk there.
    assert!(Engine::open(&path, EngineOptions::default()).is_err());
}

#[tokio::test]
async fn a_stopped_erase_resumes_in_either_phase() {
    let dir = slate_tests::scratch_dir("slate-erase-");
    let path = dir.path().join("disk");
    let size: u64 = 40 << 20;
    used_disk(&path, Some(size)).await;
    let opts = EraseOptions { chunk_bytes: 4 << 20, overwrite_only: true };

    // Stop part way through phase 1, before the chunk holding the last of the pattern.
    let raw = std::fs::read(&path).unwrap();
    let last = raw.windows(TAG.len()).rposition(|w| w == TAG).expect("pattern on the disk") as u64;
    let stop_at = last / opts.chunk_bytes * opts.chunk_bytes;
    assert!(stop_at > 0);
    let err = erase_device_with(&path, &opts, 0, &mut |p| p.resume_from < stop_at).unwrap_err();
    let EraseError::Stopped { resume_from } = err else { panic!("{err:?}") };
    assert_eq!(resume_from, stop_at);
    let raw = std::fs::read(&path).unwrap();
    assert!(raw[..stop_at as usize].iter().all(|b| *b == 0));
    assert!(contains(&raw[stop_at as usize..], TAG), "the rest is not erased yet");

    // Resume, and stop again part way through phase 2.
    let stop_at = size + 3 * opts.chunk_bytes;
    let err = erase_device_with(&path, &opts, resume_from, &mut |p| p.resume_from < stop_at).unwrap_err();
    let EraseError::Stopped { resume_from } = err else { panic!("{err:?}") };
    assert_eq!(resume_from, stop_at);
    assert!(all_zero(&path));

    // Finish.
    let mut phases = Vec::new();
    let r = erase_device_with(&path, &opts, resume_from, &mut |p| {
        phases.push(p.phase);
        true
    })
    .expect("resume");
    check_report(&r, &path, size);
    assert!(phases.iter().all(|p| *p == ErasePhase::Verify));
    assert_eq!((r.bytes_written, r.bytes_verified, r.resumed_from), (0, size - 3 * opts.chunk_bytes, resume_from));
    assert_eq!(r.method, "overwrite");
    // Out of range resume points are refused.
    assert!(matches!(erase_device(&path, 2 * size + 1, &mut |_| true), Err(EraseError::Invalid(_))));
}

#[tokio::test]
async fn erase_refuses_a_disk_an_engine_holds() {
    let dir = slate_tests::scratch_dir("slate-erase-");
    let path = dir.path().join("disk");
    used_disk(&path, Some(16 << 20)).await;
    let (engine, _h) = Engine::open(&path, EngineOptions::default()).expect("open");
    let r = erase_device(&path, 0, &mut |_| true);
    assert!(matches!(r, Err(EraseError::InUse(_))), "{r:?}");
    engine.shutdown().unwrap();
    assert!(contains(&std::fs::read(&path).unwrap(), TAG), "nothing was touched");
    assert!(erase_device(&path, 0, &mut |_| true).is_ok());
}

/// The same on a loop device (BLKZEROOUT), when this machine lets us make one.
#[tokio::test]
async fn erase_a_loop_device() {
    let dir = slate_tests::scratch_dir("slate-erase-");
    let backing = dir.path().join("backing");
    slate_tests::disk_file(&backing, 32 << 20).unwrap();
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
    used_disk(&dev, None).await;
    let r = erase_device(&dev, 0, &mut |_| true).expect("erase");
    check_report(&r, &dev, 32 << 20);
    assert_eq!(r.kind, DeviceKind::BlockDevice);
    assert_eq!(r.method, "blkzeroout");
    assert!(r.identity.dev.is_some());
    let backing_name = backing.file_name().unwrap().to_string_lossy().into_owned();
    assert!(r.identity.backing_file.as_deref().is_some_and(|b| b.ends_with(&backing_name)), "{:?}", r.identity);
    drop(guard);
    assert!(all_zero(&backing));
}
