//! The volume engine against real `slate-node` processes on 127.0.0.1:
//! replication round trips, ciphertext at rest, kill -9 of a node during
//! writes with rebuild onto a spare, on-disk corruption repaired by a read,
//! write intents reconciled after a client killed with -9, and fencing.

mod volume_common;

use bytes::Bytes;
use slate::blockdev::{BlockDevice, DevError};
use slate::crypto::{VolumeCipher, XtsKey};
use slate::volume::{AttachInfo, Volume, VolumeError, VolumeLayout};
use slate_protocol::{BlockIndex, ErrorKind, NodeId, Rights, Target, BLOCK_SIZE_BYTES};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_common::*;

async fn attach(cluster: &Cluster, layout: &VolumeLayout, spares: &[u64]) -> (Volume, Arc<TestControl>) {
    let control = cluster.control(layout, spares);
    let info: AttachInfo = serde_json::from_str(&cluster.attach_json(layout)).expect("attach json parses");
    let vol = Volume::attach(info, control.clone(), slate_dataplane::tls::Connector::plaintext(), test_config())
        .await
        .expect("attach");
    (vol, control)
}

fn cipher() -> VolumeCipher {
    VolumeCipher::new(&XtsKey::from_bytes(&test_key_bytes()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_replicas_and_no_plaintext_at_rest() {
    init_logging();
    let mut cluster = Cluster::start(3, &[&[1, 2, 3], &[2, 3]]);
    let layout = cluster.layout(1);
    let (vol, _control) = attach(&cluster, &layout, &[]).await;
    let blocks = 2 * SEGMENT_BLOCKS;
    // Runs of 61 blocks so that one run crosses the segment boundary.
    let mut b = 0;
    while b < blocks {
        let n = 61.min(blocks - b);
        let data: Vec<u8> = (b..b + n).flat_map(|x| block_text(x, 1)).collect();
        vol.write(b * BLOCK_SIZE_BYTES as u64, Bytes::from(data), false).await.unwrap();
        b += n;
    }
    for start in (0..blocks).step_by(256) {
        let got = vol.read(start * BLOCK_SIZE_BYTES as u64, 256 * BLOCK_SIZE_BYTES as u32).await.unwrap();
        for i in 0..256 {
            let at = i as usize * BLOCK_SIZE_BYTES;
            assert_eq!(&got[at..at + BLOCK_SIZE_BYTES], &block_text(start + i, 1)[..], "block {}", start + i);
        }
    }
    // Trim and write-zeroes read back as zeros and show as holes.
    vol.trim(10 * 4096, 4 * 4096).await.unwrap();
    vol.write_zeroes(1030 * 4096, 2 * 4096, false).await.unwrap();
    assert!(vol.read(10 * 4096, 4 * 4096).await.unwrap().iter().all(|x| *x == 0));
    assert!(vol.read(1030 * 4096, 2 * 4096).await.unwrap().iter().all(|x| *x == 0));
    let ext = vol.block_status(0, 16 * 4096).await.unwrap();
    assert_eq!(
        ext.iter().map(|e| (e.len / 4096, e.allocated)).collect::<Vec<_>>(),
        vec![(10, true), (4, false), (2, true)]
    );
    assert_eq!(vol.read(blocks * 4096, 4096).await.unwrap_err(), DevError::OutOfRange);
    vol.flush().await.unwrap();
    assert_replicas_identical(&cluster, &layout).await;
    let status = vol.status().await.unwrap();
    assert!(status.all_in_sync() && !status.fenced);
    vol.close().await;

    // Stop the nodes cleanly so that everything is on the disk files, then scan them.
    for n in &mut cluster.nodes {
        n.stop();
    }
    for n in &cluster.nodes {
        let disk = read_file(&n.disk);
        assert!(find_all(&disk, b"SLATE-PLAINTEXT").is_empty(), "plaintext on {}'s disk", n.id);
        assert!(find_all(&disk, b"quick brown fox").is_empty(), "plaintext on {}'s disk", n.id);
    }
    // The ciphertext is there (the scan would have seen plaintext had it been stored).
    let mut ct = block_text(5, 1);
    cipher().encrypt_blocks(5, &mut ct).unwrap();
    assert_eq!(find_all(&read_file(&cluster.nodes[0].disk), &ct[..64]).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_node_during_writes_fails_no_write_and_the_spare_is_rebuilt() {
    init_logging();
    let mut cluster = Cluster::start(4, &[&[1, 2], &[2, 3]]);
    let layout = cluster.layout(1);
    let (vol, control) = attach(&cluster, &layout, &[4]).await;
    let vol = Arc::new(vol);
    let blocks = 2 * SEGMENT_BLOCKS;
    for start in (0..blocks).step_by(128) {
        let data: Vec<u8> = (start..start + 128).flat_map(|x| block_text(x, 0)).collect();
        vol.write_blocks(start, &data, false).await.unwrap();
    }
    let done = Arc::new(AtomicU64::new(0));
    const WRITERS: u64 = 8;
    const WRITES: u64 = 150;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let vol = Arc::clone(&vol);
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            // Writer w owns the blocks b with b % WRITERS == w, so the final content is known.
            let mut model = HashMap::new();
            for k in 1..=WRITES {
                let b = w + WRITERS * ((k * 37 + w * 11) % (blocks / WRITERS));
                let n = 1 + (k % 3);
                let run: Vec<u64> = (0..n).map(|i| b + i * WRITERS).filter(|x| *x < blocks).collect();
                for x in &run {
                    vol.write_blocks(*x, &block_text(*x, k), k % 5 == 0).await?;
                    model.insert(*x, k);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, VolumeError>(model)
        }));
    }
    // kill -9 node 2 (a replica of both segments) once the writers are well under way.
    let deadline = Instant::now() + Duration::from_mins(2);
    while done.load(Ordering::Relaxed) < WRITERS * WRITES / 4 {
        assert!(Instant::now() < deadline, "writers made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.node(2).kill9();
    let mut model = HashMap::new();
    for t in tasks {
        model.extend(t.await.unwrap().expect("no write fails because one node died"));
    }

    // The spare replaces node 2 in both segments and is rebuilt.
    let deadline = Instant::now() + Duration::from_mins(3);
    let status = loop {
        let s = vol.status().await.unwrap();
        if s.all_in_sync() && s.segments.iter().all(|seg| seg.replicas.len() == 2) {
            break s;
        }
        let (d, t) = s.rebuild_progress();
        assert!(Instant::now() < deadline, "rebuild did not finish: {d}/{t} blocks");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for seg in &status.segments {
        let nodes: Vec<NodeId> = seg.replicas.iter().map(|m| m.node).collect();
        assert!(nodes.contains(&NodeId(4)) && !nodes.contains(&NodeId(2)), "{nodes:?}");
    }
    assert_eq!(status.counters.rebuilds_done, 2);
    assert_eq!(control.rebuilt.lock().unwrap().len(), 2);
    let new_layout = control.layout.lock().unwrap().clone();
    assert_replicas_identical(&cluster, &new_layout).await;
    // Every block reads back as the last write to it (twice: reads alternate between replicas).
    for _ in 0..2 {
        for start in (0..blocks).step_by(256) {
            let got = vol.read_blocks(start, 256).await.unwrap();
            for i in 0..256 {
                let x = start + i;
                let want = block_text(x, model.get(&x).copied().unwrap_or(0));
                assert_eq!(&got[i as usize * BLOCK_SIZE_BYTES..][..BLOCK_SIZE_BYTES], &want[..], "block {x}");
            }
        }
    }
    vol.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_corrupted_on_disk_is_read_from_the_other_replica_and_repaired() {
    init_logging();
    let cluster = Cluster::start(2, &[&[1, 2]]);
    let layout = cluster.layout(1);
    let (vol, _control) = attach(&cluster, &layout, &[]).await;
    let data: Vec<u8> = (96..104).flat_map(|x| block_text(x, 3)).collect();
    vol.write_blocks(96, &data, false).await.unwrap();
    vol.flush_all().await.unwrap();

    // Find block 100's ciphertext in node 1's disk file and flip a byte of it.
    let mut ct = block_text(100, 3);
    cipher().encrypt_blocks(100, &mut ct).unwrap();
    let disk = read_file(&cluster.nodes[0].disk);
    let at = find_all(&disk, &ct);
    assert_eq!(at.len(), 1, "the block's ciphertext is on node 1's disk once");
    drop(disk);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&cluster.nodes[0].disk).unwrap();
        f.seek(SeekFrom::Start(at[0] as u64 + 1000)).unwrap();
        f.write_all(&[ct[1000] ^ 0x5a]).unwrap();
        f.sync_all().unwrap();
    }
    let t = Target { volume: VOLUME, generation: layout.generation };
    let n1 = cluster.session(NodeId(1), 1).await;
    let err = n1.request(slate_protocol::Request::Read { target: t, start: BlockIndex(100), count: 1 }).await;
    assert_eq!(err.unwrap_err().kind(), Some(ErrorKind::Corrupt), "node 1 detects the corruption");

    // Reads alternate between replicas: every one returns the data, and node 1 gets repaired.
    for _ in 0..4 {
        assert_eq!(&vol.read_blocks(96, 8).await.unwrap()[..], &data[..]);
    }
    let status = vol.status().await.unwrap();
    assert!(status.counters.repairs >= 1, "{:?}", status.counters);
    assert_eq!(status.counters.node_failures, 0);
    assert_replicas_identical(&cluster, &layout).await;
    vol.close().await;
}

/// The writer that the crash test runs in a child process and kills with -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by write_intents_are_reconciled_after_a_client_is_killed"]
async fn crash_child_writer() {
    let Ok(path) = std::env::var("SLATE_VOLUME_CHILD_ATTACH") else { return };
    let info: AttachInfo = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let control = Arc::new(NoControl);
    let vol = Arc::new(
        Volume::attach(info, control, slate_dataplane::tls::Connector::plaintext(), test_config()).await.unwrap(),
    );
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let vol = Arc::clone(&vol);
        tasks.push(tokio::spawn(async move {
            for k in 1.. {
                let b = (w * 61 + k * 17) % SEGMENT_BLOCKS;
                let n = 1 + (k % 8).min(SEGMENT_BLOCKS - b - 1);
                let data: Vec<u8> = (b..b + n).flat_map(|x| block_text(x, k)).collect();
                vol.write_blocks(b, &data, false).await.unwrap();
                if w == 0 {
                    println!("WROTE {k}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[derive(Debug)]
struct NoControl;

#[async_trait::async_trait]
impl slate::volume::ControlPlane for NoControl {
    async fn report_failed_replica(
        &self,
        _: slate_protocol::VolumeId,
        _: slate_protocol::SegmentIndex,
        _: NodeId,
    ) -> Result<slate::volume::ReplicaUpdate, slate::volume::ControlError> {
        Err(slate::volume::ControlError("no replacements in this test".into()))
    }
    async fn refresh_layout(&self, _: slate_protocol::VolumeId) -> Result<VolumeLayout, slate::volume::ControlError> {
        Err(slate::volume::ControlError("not supported".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_intents_are_reconciled_after_a_client_is_killed() {
    init_logging();
    let cluster = Cluster::start(3, &[&[1, 2, 3]]);
    let layout = cluster.layout(1);
    let dir = tempfile::tempdir().unwrap();
    let attach_path = dir.path().join("attach.json");
    std::fs::write(&attach_path, cluster.attach_json(&layout)).unwrap();

    // A client process writes at full speed; kill -9 it mid-stream.
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["crash_child_writer", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SLATE_VOLUME_CHILD_ATTACH", &attach_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    let mut child = KillOnDrop(cmd.stdin(Stdio::null()).spawn().expect("spawn child client"));
    let stdout = child.0.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut wrote = 0;
    while wrote < 40 {
        let line = lines.next().expect("child output").unwrap();
        if let Some(k) = line.strip_prefix("WROTE ") {
            wrote = k.parse().unwrap();
        }
    }
    child.kill9();
    drop(lines);

    // Make the crash window visible for sure: a write of the dead client that reached node 1 only.
    let n1 = cluster.session(NodeId(1), 1).await;
    let mut torn = block_text(7, 999_999);
    cipher().encrypt_blocks(7, &mut torn).unwrap();
    n1.write_blocks(BlockIndex(7), Bytes::from(torn)).await.unwrap();
    let before = intents(&cluster, &layout).await;
    assert!(!before[&NodeId(1)].is_empty(), "node 1 records the region of its last writes");

    // A new attachment reconciles before it serves.
    let layout2 = cluster.layout(2);
    let (vol, _control) = attach(&cluster, &layout2, &[]).await;
    let status = vol.status().await.unwrap();
    assert!(status.counters.blocks_reconciled > 0);
    assert_replicas_identical(&cluster, &layout2).await;
    assert!(intents(&cluster, &layout2).await.values().all(Vec::is_empty), "intents cleared");
    // Every block reads the same from every replica, and each is a whole version of itself.
    for _ in 0..3 {
        let got = vol.read_blocks(0, SEGMENT_BLOCKS).await.unwrap();
        for x in 0..SEGMENT_BLOCKS {
            let blk = &got[x as usize * BLOCK_SIZE_BYTES..][..BLOCK_SIZE_BYTES];
            let ok = blk.iter().all(|c| *c == 0) || blk.starts_with(format!("SLATE-PLAINTEXT block={x:08}").as_bytes());
            assert!(ok, "block {x} is torn or misplaced");
        }
    }
    vol.close().await;
}

/// A client process that is killed with -9 (a crash) when the test is done with it.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_attachment_fences_the_old_one_for_good() {
    init_logging();
    let cluster = Cluster::start(2, &[&[1, 2]]);
    let layout1 = cluster.layout(1);
    let (old, _c1) = attach(&cluster, &layout1, &[]).await;
    old.write_blocks(0, &block_text(0, 1), false).await.unwrap();

    let layout2 = cluster.layout(2);
    let (new, _c2) = attach(&cluster, &layout2, &[]).await;
    assert_eq!(old.write_blocks(0, &block_text(0, 2), false).await.unwrap_err(), VolumeError::Fenced);
    assert_eq!(old.read(0, 4096).await.unwrap_err(), DevError::Fenced);
    assert_eq!(old.write(4096, Bytes::from(block_text(1, 2)), false).await.unwrap_err(), DevError::Fenced);
    assert_eq!(DevError::Fenced.nbd_errno(), slate::blockdev::errno::EPERM);
    assert!(old.status().await.unwrap().fenced);

    new.write_blocks(0, &block_text(0, 3), false).await.unwrap();
    assert_eq!(&new.read_blocks(0, 2).await.unwrap()[..4096], &block_text(0, 3)[..]);
    assert!(new.read_blocks(1, 1).await.unwrap().iter().all(|c| *c == 0), "the fenced write landed nowhere");
    assert_replicas_identical(&cluster, &layout2).await;
    // The old generation cannot come back.
    let info = cluster.attach_info(&layout1);
    let again = Volume::attach(
        info,
        cluster.control(&layout1, &[]),
        slate_dataplane::tls::Connector::plaintext(),
        test_config(),
    )
    .await;
    assert_eq!(again.unwrap_err(), VolumeError::Fenced);
    // Sanity: a capability for the old generation is refused by the nodes directly too.
    let addr = cluster.addr_of(NodeId(1)).parse().unwrap();
    let r = slate_dataplane::client::NodeClient::connect(addr, cluster.capability(1, Rights::READ_WRITE)).await;
    assert_eq!(r.unwrap_err().kind(), Some(ErrorKind::StaleGeneration));
    new.close().await;
    old.close().await;
}

/// Throughput figures over two replicas on loopback (run with `--ignored --nocapture`,
/// preferably with `--release`). Prints; asserts nothing about speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn measure_throughput() {
    let cluster = Cluster::start(2, &[&[1, 2], &[1, 2]]);
    let layout = cluster.layout(1);
    let (vol, _control) = attach(&cluster, &layout, &[]).await;
    let vol = Arc::new(vol);
    let blocks = 2 * SEGMENT_BLOCKS;

    async fn run(vol: &Arc<Volume>, qd: u64, ops: u64, blocks_per_op: u64, span: u64, write: bool) -> Duration {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for q in 0..qd {
            let vol = Arc::clone(vol);
            tasks.push(tokio::spawn(async move {
                let data = vec![0x5au8; (blocks_per_op as usize) * BLOCK_SIZE_BYTES];
                for i in 0..ops / qd {
                    let slot = (q * 7919 + i * 104_729) % (span / blocks_per_op);
                    let b = slot * blocks_per_op;
                    if write {
                        vol.write_blocks(b, &data, false).await.unwrap();
                    } else {
                        vol.read_blocks(b, blocks_per_op).await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        t0.elapsed()
    }
    let seq_ops = 64;
    let d = run(&vol, 4, seq_ops, 256, blocks, true).await;
    let mib = (seq_ops * 256 * 4096) as f64 / (1 << 20) as f64;
    println!("write 1 MiB x QD4: {:.1} MiB/s", mib / d.as_secs_f64());
    let d = run(&vol, 4, seq_ops, 256, blocks, false).await;
    println!("read 1 MiB x QD4: {:.1} MiB/s", mib / d.as_secs_f64());
    let small_ops = 4096;
    let d = run(&vol, 32, small_ops, 1, blocks, true).await;
    println!("write 4 KiB random QD32: {:.0} IOPS", small_ops as f64 / d.as_secs_f64());
    let d = run(&vol, 32, small_ops, 1, blocks, false).await;
    println!("read 4 KiB random QD32: {:.0} IOPS", small_ops as f64 / d.as_secs_f64());
    vol.close().await;
}
