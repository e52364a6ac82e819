//! A snapshot frozen while the volume is busy, against real `slate-node`
//! processes: the control plane lists a pending snapshot, the read-write
//! client holds new writes, waits for the ones in flight, freezes every node
//! at the snapshot's epoch, reports it and resumes. Afterwards each node's
//! disk is opened with the storage engine and read at that epoch: every
//! block holds a version acknowledged no earlier than the last one
//! acknowledged before the freeze began, and no later than the last one sent
//! before the report, and every replica holds the same bytes.

mod volume_common;

use async_trait::async_trait;
use slate::crypto::{VolumeCipher, XtsKey};
use slate::volume::{
    ControlError, ControlPlane, PendingSnapshot, ReplicaUpdate, SegmentReplicas, Volume, VolumeConfig, VolumeError,
    VolumeLayout, VolumeState,
};
use slate_node::engine::{Engine, EngineOptions};
use slate_protocol::message::bit;
use slate_protocol::BLOCK_SIZE_BYTES;
use slate_protocol::{BlockIndex, Epoch, Generation, NodeId, Rights, SegmentIndex, SignedCapability, VolumeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use volume_common::*;

/// The test control plane plus a list of pending snapshots and the reports received.
#[derive(Debug)]
struct SnapControl {
    inner: Arc<TestControl>,
    pending: Mutex<Vec<PendingSnapshot>>,
    /// Every report as it arrived: (snapshot, when, accepted).
    reports: Mutex<Vec<(u64, Instant, bool)>>,
    /// Reports to refuse before accepting one (a metadata service that is briefly away).
    refuse_reports: AtomicU64,
}

impl SnapControl {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ControlPlane for SnapControl {
    async fn report_failed_replica(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
    ) -> Result<ReplicaUpdate, ControlError> {
        self.inner.report_failed_replica(volume, segment, node).await
    }

    async fn report_rebuilt(&self, volume: VolumeId, segment: SegmentIndex, node: NodeId) -> Result<(), ControlError> {
        self.inner.report_rebuilt(volume, segment, node).await
    }

    async fn renew_capability(
        &self,
        volume: VolumeId,
        generation: Generation,
    ) -> Result<SignedCapability, ControlError> {
        self.inner.renew_capability(volume, generation).await
    }

    async fn refresh_layout(&self, volume: VolumeId) -> Result<VolumeLayout, ControlError> {
        self.inner.refresh_layout(volume).await
    }

    async fn refresh_state(&self, volume: VolumeId) -> Result<VolumeState, ControlError> {
        let layout = self.inner.refresh_layout(volume).await?;
        Ok(VolumeState { layout, pending_snapshots: Self::lock(&self.pending).clone() })
    }

    async fn assign_replicas(
        &self,
        volume: VolumeId,
        set: &SegmentReplicas,
        capability: &SignedCapability,
    ) -> Result<(), ControlError> {
        self.inner.assign_replicas(volume, set, capability).await
    }

    async fn report_snapshot_frozen(&self, _volume: VolumeId, snapshot: u64) -> Result<(), ControlError> {
        let now = Instant::now();
        let refuse = self.refuse_reports.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        Self::lock(&self.reports).push((snapshot, now, !refuse));
        if refuse {
            return Err(ControlError("the metadata service is away".into()));
        }
        Self::lock(&self.pending).retain(|p| p.id != snapshot);
        Ok(())
    }
}

/// One write as a writer saw it.
#[derive(Debug, Clone, Copy)]
struct WriteRecord {
    block: u64,
    version: u64,
    sent: Instant,
    acked: Instant,
}

/// The version a block of plaintext names (see `block_text`).
fn version_of(block: u64, plain: &[u8]) -> u64 {
    let text = std::str::from_utf8(&plain[..80]).expect("plaintext");
    let want = format!("block={block:08} version=");
    let at = text.find(&want).unwrap_or_else(|| panic!("block {block} holds something else: {text:?}"));
    text[at + want.len()..at + want.len() + 6].parse().expect("version digits")
}

/// Reads every block of `segment` at `epoch` from a stopped node's disk, with the engine itself.
async fn read_at_epoch(disk: &std::path::Path, segment: u32, epoch: Epoch) -> Vec<(bool, Vec<u8>)> {
    let (engine, handle) = Engine::open(disk, EngineOptions::default()).expect("open the node's disk");
    let first = u64::from(segment) * SEGMENT_BLOCKS;
    let mut out = Vec::new();
    for start in (first..first + SEGMENT_BLOCKS).step_by(256) {
        let r = handle.read_at(VOLUME, epoch, BlockIndex(start), 256).await.expect("read at the epoch");
        for i in 0..256 {
            out.push((bit(&r.written, i), r.data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES].to_vec()));
        }
    }
    drop(handle);
    engine.shutdown().expect("engine shutdown");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_frozen_under_writes_holds_exactly_the_writes_around_the_freeze() {
    init_logging();
    // Segment 0 on three nodes, the others on two; every node holds two segments or more.
    let placement: [&[u64]; 3] = [&[1, 2, 3], &[2, 3], &[1, 3]];
    let mut cluster = Cluster::start(3, &placement);
    let layout = cluster.layout(1);
    let control = Arc::new(SnapControl {
        inner: cluster.control(&layout, &[]),
        pending: Mutex::default(),
        reports: Mutex::default(),
        refuse_reports: AtomicU64::new(1),
    });
    let cfg = VolumeConfig { layout_poll_interval: Duration::from_millis(100), ..test_config() };
    // Freezing needs the admin right, as slate-meta grants a read-write attachment.
    let mut info = cluster.attach_info(&layout);
    info.capability = cluster.capability(1, Rights::READ_WRITE.union(Rights::ADMIN));
    let vol = Arc::new(
        Volume::attach(
            info,
            Arc::clone(&control) as Arc<dyn ControlPlane>,
            slate_dataplane::tls::Connector::plaintext(),
            cfg,
        )
        .await
        .expect("attach"),
    );
    let blocks = SEGMENT_BLOCKS * placement.len() as u64;
    for start in (0..blocks).step_by(256) {
        let data: Vec<u8> = (start..start + 256).flat_map(|x| block_text(x, 0)).collect();
        vol.write_blocks(start, &data, false).await.unwrap();
    }

    // 24 writers (queue depth 24), each owning the blocks b with b % WRITERS == w.
    const WRITERS: u64 = 24;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (vol, stop, done) = (Arc::clone(&vol), Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut log = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                // A small hot set (more writes per block around the freeze) and the whole range.
                let span = if k.is_multiple_of(4) { blocks / WRITERS } else { 8 };
                let block = w + WRITERS * ((k * 7 + w * 5) % span);
                let sent = Instant::now();
                vol.write_blocks(block, &block_text(block, k), k.is_multiple_of(5)).await?;
                log.push(WriteRecord { block, version: k, sent, acked: Instant::now() });
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, VolumeError>(log)
        }));
    }
    wait_for_more(&done, 500).await;

    // The metadata service records snapshot 1 at epoch 5; its first report is refused.
    let epoch = Epoch(5);
    let began = Instant::now();
    SnapControl::lock(&control.pending).push(PendingSnapshot { id: 1, epoch });
    let deadline = Instant::now() + Duration::from_mins(1);
    while !SnapControl::lock(&control.reports).iter().any(|r| r.0 == 1 && r.2) {
        assert!(Instant::now() < deadline, "the snapshot was never reported: {:?}", vol.status().await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reports = SnapControl::lock(&control.reports).clone();
    assert!(reports.len() >= 2 && !reports[0].2, "the refused report was made again: {reports:?}");
    let reported = reports[0].1;
    wait_for_more(&done, 500).await;

    // A snapshot at an older epoch than one already frozen: the nodes refuse it; writes go on.
    SnapControl::lock(&control.pending).push(PendingSnapshot { id: 2, epoch: Epoch(3) });
    let deadline = Instant::now() + Duration::from_mins(1);
    while vol.status().await.unwrap().counters.freeze_failures == 0 {
        assert!(Instant::now() < deadline, "the refused freeze was never seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for_more(&done, 300).await;
    stop.store(true, Ordering::Relaxed);
    let mut logs: Vec<WriteRecord> = Vec::new();
    for t in tasks {
        logs.extend(t.await.unwrap().expect("no write fails around a freeze"));
    }
    let status = vol.status().await.unwrap();
    assert_eq!(status.counters.snapshots_frozen, 1, "{:?}", status.counters);
    assert_eq!(status.counters.node_failures, 0, "{:?}", status.counters);
    assert!(SnapControl::lock(&control.reports).iter().all(|r| r.0 == 1), "snapshot 2 was never frozen");
    let held_across = logs.iter().filter(|s| s.sent < reported && s.acked > reported && s.sent > began).count();
    eprintln!("{} writes; {held_across} sent during the freeze and acknowledged after its report", logs.len());
    vol.close().await;

    // Per block: the newest version acknowledged before the freeze began, and the newest sent before the report.
    let mut bounds: HashMap<u64, (u64, u64)> = (0..blocks).map(|b| (b, (0, 0))).collect();
    for s in &logs {
        let (lo, hi) = bounds.get_mut(&s.block).expect("block");
        if s.acked < began {
            *lo = (*lo).max(s.version);
        }
        if s.sent < reported {
            *hi = (*hi).max(s.version);
        }
    }

    for n in [1, 2, 3] {
        cluster.node(n).stop();
    }
    let key = XtsKey::from_bytes(&test_key_bytes()).unwrap();
    let cipher = VolumeCipher::new(&key);
    let mut checked = 0u64;
    for (seg, nodes) in placement.iter().enumerate() {
        let mut copies: BTreeMap<u64, Vec<(bool, Vec<u8>)>> = BTreeMap::new();
        for n in *nodes {
            let disk = cluster.node(*n).disk.clone();
            copies.insert(*n, read_at_epoch(&disk, seg as u32, epoch).await);
        }
        let (first_node, first) = copies.iter().next().unwrap();
        for (n, other) in &copies {
            for (i, (x, y)) in first.iter().zip(other).enumerate() {
                assert!(x == y, "seg-{seg} block {i} differs at {epoch:?} between node {first_node} and node {n}");
            }
        }
        for (i, (written, data)) in first.iter().enumerate() {
            let block = seg as u64 * SEGMENT_BLOCKS + i as u64;
            assert!(written, "block {block} is not in the snapshot");
            let mut plain = data.clone();
            cipher.decrypt_blocks(block, &mut plain).unwrap();
            let v = version_of(block, &plain);
            let (lo, hi) = bounds[&block];
            assert!(lo <= v && v <= hi, "block {block} holds version {v} at {epoch:?}; acknowledged before the freeze: {lo}, sent before the report: {hi}");
            checked += 1;
        }
    }
    assert_eq!(checked, blocks);
}
