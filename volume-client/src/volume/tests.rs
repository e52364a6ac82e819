//! Engine tests over in-memory nodes ([`super::fake`]): ordering, failover,
//! rebuild, repair, reconciliation and fencing, each driven deterministically
//! enough to check the invariants rather than timings.

use super::fake::{layout, FakeConnector, FakeControl, FakeNode};
use super::*;
use bytes::Bytes;
use slate_protocol::SegmentIndex;
use slate_protocol::{Capability, Generation, Rights};

const SEG: u64 = 64;

fn key() -> Dek {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = i as u8;
    }
    Dek::new(k)
}

fn info(l: &VolumeLayout, nodes: &[u64]) -> AttachInfo {
    info_with(l, nodes, Rights::READ_WRITE, u64::MAX, &slate_protocol::capability::generate_signing_key())
}

fn info_with(
    l: &VolumeLayout,
    nodes: &[u64],
    rights: Rights,
    expires_unix_secs: u64,
    signing: &ed25519_dalek::SigningKey,
) -> AttachInfo {
    let capability = Capability {
        volume: l.volume,
        generation: l.generation,
        rights,
        expires_unix_secs,
        nodes: nodes.iter().map(|n| NodeId(*n)).collect(),
        ..Default::default()
    }
    .sign(signing);
    AttachInfo { layout: l.clone(), capability, dek: key() }
}

fn cfg() -> VolumeConfig {
    VolumeConfig {
        request_timeout: Duration::from_millis(500),
        retry_delay: Duration::from_millis(5),
        stall_timeout: Duration::from_secs(30),
        rebuild_chunk_blocks: 8,
        ..VolumeConfig::default()
    }
}

fn pattern(block: u64, version: u8) -> Vec<u8> {
    let mut v = vec![version; BLOCK_SIZE_BYTES];
    v[..8].copy_from_slice(&block.to_le_bytes());
    v
}

struct Rig {
    nodes: Vec<Arc<FakeNode>>,
    control: Arc<FakeControl>,
    connector: Arc<FakeConnector>,
    layout: VolumeLayout,
    all: Vec<u64>,
}

impl Rig {
    fn new(placement: &[&[u64]], spares: &[u64], control_delay: Duration) -> Self {
        let mut all: Vec<u64> =
            placement.iter().flat_map(|p| p.iter().copied()).chain(spares.iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        let nodes: Vec<Arc<FakeNode>> = all.iter().map(|n| FakeNode::new(*n)).collect();
        let layout = layout(SEG, placement, 1);
        let control = FakeControl::new(layout.clone(), spares, control_delay);
        let connector = FakeConnector::new(&nodes);
        Self { nodes, control, connector, layout, all }
    }

    fn node(&self, id: u64) -> &Arc<FakeNode> {
        self.nodes.iter().find(|n| n.id == NodeId(id)).expect("node")
    }

    async fn open(&self) -> Result<Volume, VolumeError> {
        self.open_gen(self.layout.generation.0).await
    }

    async fn open_gen(&self, generation: u64) -> Result<Volume, VolumeError> {
        let mut l = self.control.layout.lock().unwrap().clone();
        l.generation = Generation(generation);
        Volume::open(info(&l, &self.all), self.control.clone(), self.connector.clone(), cfg()).await
    }

    /// Every in-set replica of every segment holds the same bytes for every block.
    fn assert_replicas_identical(&self, status: &VolumeStatus) {
        for s in &status.segments {
            let first = self.layout.segment_start(s.segment).0;
            let members: Vec<&Arc<FakeNode>> = s.replicas.iter().map(|m| self.node(m.node.0)).collect();
            for b in first..first + SEG {
                let a = members[0].block(b);
                for m in &members[1..] {
                    assert_eq!(m.block(b), a, "block {b} differs between {} and {}", members[0].id, m.id);
                }
            }
        }
    }
}

async fn wait_in_sync(v: &Volume) -> VolumeStatus {
    for _ in 0..2000 {
        let s = v.status().await.unwrap();
        if s.all_in_sync() && s.segments.iter().all(|s| s.replicas.len() >= 2) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("replicas never got back in sync: {:?}", v.status().await);
}

#[tokio::test]
async fn round_trip_through_replicas_and_ciphertext_at_rest() {
    let rig = Rig::new(&[&[1, 2, 3], &[2, 3, 1]], &[], Duration::ZERO);
    let v = rig.open().await.unwrap();
    let data: Vec<u8> = (0..10).flat_map(|b| pattern(60 + b, 0xAB)).collect();
    v.write_blocks(60, &data, false).await.unwrap(); // crosses the segment boundary at 64
    for _ in 0..3 {
        assert_eq!(&v.read_blocks(60, 10).await.unwrap()[..], &data[..]);
    }
    // Unwritten blocks read as zeros; the replicas hold ciphertext only.
    assert!(v.read_blocks(0, 4).await.unwrap().iter().all(|b| *b == 0));
    let s = v.status().await.unwrap();
    rig.assert_replicas_identical(&s);
    for n in &rig.nodes {
        for (b, (d, _)) in &n.lock().blocks {
            assert_ne!(&d[..], &pattern(*b, 0xAB)[..], "plaintext at rest on {}", n.id);
            assert!(!d.windows(16).any(|w| w.iter().all(|x| *x == 0xAB)));
        }
    }
    // Reads spread over replicas.
    let served: Vec<u64> = rig.nodes.iter().map(|n| n.lock().requests).collect();
    assert!(served.iter().all(|r| *r > 0), "{served:?}");
    // Trim, zeroes and block status.
    v.trim_blocks(61, 2, false).await.unwrap();
    v.trim_blocks(66, 1, true).await.unwrap();
    let bits = v.allocated_blocks(58, 12).await.unwrap();
    let expect: Vec<bool> = (58..70).map(|b| (60..70).contains(&b) && !(61..63).contains(&b) && b != 66).collect();
    assert_eq!(bits, expect);
    assert!(v.read_blocks(61, 2).await.unwrap().iter().all(|b| *b == 0));
    // Out of range.
    assert_eq!(v.read_blocks(127, 2).await.unwrap_err(), VolumeError::OutOfRange);
    assert_eq!(v.write_blocks(128, &pattern(0, 1), false).await.unwrap_err(), VolumeError::OutOfRange);
    v.flush_all().await.unwrap();
    v.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_reach_every_replica_in_the_same_order() {
    let rig = Rig::new(&[&[1, 2, 3]], &[], Duration::ZERO);
    for n in &rig.nodes {
        n.lock().max_delay_us = 3000; // reorders requests that are in flight together
    }
    let v = Arc::new(rig.open().await.unwrap());
    let mut tasks = Vec::new();
    for k in 0..64u8 {
        let v = Arc::clone(&v);
        // Overlapping ranges of 1..4 blocks within blocks 0..8.
        let start = u64::from(k % 6);
        let len = 1 + u64::from(k % 3);
        tasks.push(tokio::spawn(async move {
            let data: Vec<u8> = (start..start + len).flat_map(|b| pattern(b, k)).collect();
            v.write_blocks(start, &data, false).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = v.status().await.unwrap();
    rig.assert_replicas_identical(&s);
    let got = v.read_blocks(0, 8).await.unwrap();
    for b in 0..8usize {
        let blk = &got[b * BLOCK_SIZE_BYTES..(b + 1) * BLOCK_SIZE_BYTES];
        assert_eq!(&blk[..8], &(b as u64).to_le_bytes(), "block {b} holds another block's data");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_fails_no_write_and_is_rebuilt() {
    let rig = Rig::new(&[&[1, 2], &[2, 1]], &[3], Duration::from_millis(20));
    let v = Arc::new(rig.open().await.unwrap());
    for b in 0..2 * SEG {
        v.write_blocks(b, &pattern(b, 1), false).await.unwrap();
    }
    let killer = {
        let n2 = Arc::clone(rig.node(2));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            n2.lock().dead = true;
        })
    };
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let v = Arc::clone(&v);
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let b = (w * 17 + i * 5) % (2 * SEG);
                v.write_blocks(b, &pattern(b, 2 + (i % 200) as u8), false).await?;
            }
            Ok::<_, VolumeError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("no write fails because one node died");
    }
    killer.await.unwrap();
    let s = wait_in_sync(&v).await;
    for seg in &s.segments {
        let nodes: Vec<NodeId> = seg.replicas.iter().map(|m| m.node).collect();
        assert!(nodes.contains(&NodeId(3)) && !nodes.contains(&NodeId(2)), "{nodes:?}");
    }
    rig.assert_replicas_identical(&s);
    assert_eq!(rig.control.rebuilt_reports.lock().unwrap().len(), 2);
    assert_eq!(s.counters.rebuilds_done, 2);
    // Every block reads back as the last value written to it, from either replica.
    for _ in 0..2 {
        let all = v.read_blocks(0, 2 * SEG).await.unwrap();
        for b in 0..2 * SEG as usize {
            assert_eq!(&all[b * BLOCK_SIZE_BYTES..b * BLOCK_SIZE_BYTES + 8], &(b as u64).to_le_bytes());
        }
    }
}

#[tokio::test]
async fn with_one_copy_left_a_write_waits_for_the_replacement() {
    let rig = Rig::new(&[&[1, 2]], &[3], Duration::from_millis(100));
    let v = rig.open().await.unwrap();
    rig.node(2).lock().dead = true;
    v.write_blocks(5, &pattern(5, 9), false).await.unwrap();
    // Acknowledged only once the replacement (which joined after the failure) held it too.
    assert!(rig.node(3).block(5).is_some() && rig.node(1).block(5).is_some(), "acknowledged with one copy");
    assert_eq!(rig.control.failed_reports.lock().unwrap().as_slice(), &[(SegmentIndex(0), NodeId(2))]);
    let s = wait_in_sync(&v).await;
    rig.assert_replicas_identical(&s);
}

#[tokio::test]
async fn a_hung_node_times_out_and_is_replaced() {
    let rig = Rig::new(&[&[1, 2]], &[3], Duration::ZERO);
    let v = rig.open().await.unwrap();
    v.write_blocks(0, &pattern(0, 1), false).await.unwrap();
    rig.node(1).lock().hung = true;
    v.write_blocks(1, &pattern(1, 1), false).await.unwrap();
    for _ in 0..4 {
        assert_eq!(&v.read_blocks(0, 1).await.unwrap()[..], &pattern(0, 1)[..]);
    }
    let s = wait_in_sync(&v).await;
    assert!(s.segments[0].replicas.iter().all(|m| m.node != NodeId(1)));
    rig.assert_replicas_identical(&s);
}

#[tokio::test]
async fn a_corrupt_block_is_read_elsewhere_and_repaired() {
    let rig = Rig::new(&[&[1, 2]], &[], Duration::ZERO);
    let v = rig.open().await.unwrap();
    let data: Vec<u8> = (0..4).flat_map(|b| pattern(b, 7)).collect();
    v.write_blocks(0, &data, false).await.unwrap();
    rig.node(1).lock().corrupt.insert(2);
    rig.node(2).lock().corrupt.insert(3);
    for _ in 0..4 {
        assert_eq!(&v.read_blocks(0, 4).await.unwrap()[..], &data[..]);
    }
    v.flush_all().await.unwrap();
    assert!(rig.node(1).lock().corrupt.is_empty() && rig.node(2).lock().corrupt.is_empty(), "repaired");
    let s = v.status().await.unwrap();
    assert!(s.counters.repairs >= 2);
    assert_eq!(s.counters.node_failures, 0, "a corrupt block is repaired, not a reason to drop the replica");
    rig.assert_replicas_identical(&s);
    // Both copies bad: the read fails, the volume keeps serving.
    rig.node(1).lock().corrupt.insert(0);
    rig.node(2).lock().corrupt.insert(0);
    assert!(matches!(v.read_blocks(0, 1).await, Err(VolumeError::Io(_))));
    assert_eq!(&v.read_blocks(1, 1).await.unwrap()[..], &pattern(1, 7)[..]);
}

#[tokio::test]
async fn stale_generation_fences_for_good() {
    let rig = Rig::new(&[&[1, 2], &[2, 1]], &[3], Duration::ZERO);
    let v = rig.open().await.unwrap();
    v.write_blocks(0, &pattern(0, 1), false).await.unwrap();
    // A newer attachment shows itself to node 1 only.
    rig.node(1).lock().highest = Generation(5);
    let before: u64 = rig.nodes.iter().map(|n| n.lock().requests).sum();
    assert_eq!(v.write_blocks(0, &pattern(0, 2), false).await.unwrap_err(), VolumeError::Fenced);
    let after_fence: u64 = rig.nodes.iter().map(|n| n.lock().requests).sum();
    assert!(after_fence - before <= 2, "the write was not retried elsewhere");
    assert_eq!(v.read_blocks(SEG, 1).await.unwrap_err(), VolumeError::Fenced);
    assert_eq!(v.write_blocks(SEG, &pattern(SEG, 2), false).await.unwrap_err(), VolumeError::Fenced);
    assert_eq!(v.flush_all().await.unwrap_err(), VolumeError::Fenced);
    let total: u64 = rig.nodes.iter().map(|n| n.lock().requests).sum();
    assert_eq!(total, after_fence, "nothing is sent once fenced");
    assert!(rig.control.failed_reports.lock().unwrap().is_empty(), "fencing is not a node failure");
    let s = v.status().await.unwrap();
    assert!(s.fenced);
    // Opening under an old generation is refused outright.
    assert_eq!(rig.open_gen(1).await.unwrap_err(), VolumeError::Fenced);
}

#[tokio::test]
async fn write_intents_are_reconciled_after_a_client_crash() {
    let rig = Rig::new(&[&[1, 2]], &[], Duration::ZERO);
    let v = rig.open().await.unwrap();
    v.write_blocks(0, &(0..8).flat_map(|b| pattern(b, 1)).collect::<Vec<_>>(), false).await.unwrap();
    rig.node(1).lock().intents.clear();
    rig.node(2).lock().intents.clear();
    // Node 2 swallows writes: the next ones land on node 1 only, then the client "crashes".
    rig.node(2).lock().black_hole_writes = true;
    let v = Arc::new(v);
    let writer = {
        let v = Arc::clone(&v);
        tokio::spawn(
            async move { v.write_blocks(2, &(2..5).flat_map(|b| pattern(b, 2)).collect::<Vec<_>>(), false).await },
        )
    };
    while rig.node(2).lock().intents.is_empty() || rig.node(1).block(2) == rig.node(2).block(2) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    writer.abort();
    drop(v);
    assert_ne!(rig.node(1).block(3), rig.node(2).block(3), "the replicas disagree after the crash");
    rig.node(2).lock().black_hole_writes = false;

    let v2 = rig.open_gen(2).await.unwrap();
    let s = v2.status().await.unwrap();
    rig.assert_replicas_identical(&s);
    assert!(s.counters.blocks_reconciled >= 3);
    assert!(rig.node(1).lock().intents.is_empty() && rig.node(2).lock().intents.is_empty(), "intents cleared");
    let a = v2.read_blocks(2, 3).await.unwrap();
    let b = v2.read_blocks(2, 3).await.unwrap();
    assert_eq!(a, b);
    assert!(
        a == (2..5).flat_map(|b| pattern(b, 2)).collect::<Vec<_>>()
            || a == (2..5).flat_map(|b| pattern(b, 1)).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_races_concurrent_writes_without_losing_any() {
    let rig = Rig::new(&[&[1, 2]], &[3], Duration::ZERO);
    for n in &rig.nodes {
        n.lock().max_delay_us = 500;
    }
    let v = Arc::new(rig.open().await.unwrap());
    for b in 0..SEG {
        v.write_blocks(b, &pattern(b, 1), false).await.unwrap();
    }
    rig.node(1).lock().dead = true;
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let v = Arc::clone(&v);
        tasks.push(tokio::spawn(async move {
            for i in 0..60u64 {
                let b = (w * 13 + i * 7) % SEG;
                v.write_blocks(b, &pattern(b, 10 + (i % 100) as u8), false).await?;
                if i % 10 == 0 {
                    v.trim_blocks((b + 3) % SEG, 1, false).await?;
                }
            }
            Ok::<_, VolumeError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = wait_in_sync(&v).await;
    rig.assert_replicas_identical(&s);
    let (done, total) = s.rebuild_progress();
    assert_eq!((done, total), (0, 0), "no rebuild left");
}

#[tokio::test]
async fn bad_attach_info_is_refused() {
    let rig = Rig::new(&[&[1, 2]], &[], Duration::ZERO);
    let mut i = info(&rig.layout, &rig.all);
    i.dek = Dek::new([7; 64]);
    assert!(matches!(
        Volume::open(i, rig.control.clone(), rig.connector.clone(), cfg()).await,
        Err(VolumeError::Layout(_))
    ));
    let mut l = rig.layout.clone();
    l.segments[0].replicas.pop();
    assert!(matches!(
        Volume::open(info(&l, &rig.all), rig.control.clone(), rig.connector.clone(), cfg()).await,
        Err(VolumeError::Layout(_))
    ));
    // Every replica of a segment down: no data to serve.
    rig.node(1).lock().dead = true;
    rig.node(2).lock().dead = true;
    assert!(matches!(rig.open().await, Err(VolumeError::Io(_))));
}

#[tokio::test]
async fn the_capability_is_renewed_before_it_expires() {
    let rig = Rig::new(&[&[1, 2]], &[], Duration::ZERO);
    let signing = slate_protocol::capability::generate_signing_key();
    let nodes: Vec<NodeId> = rig.all.iter().map(|n| NodeId(*n)).collect();
    *rig.control.renew.lock().unwrap() = Some((signing.clone(), nodes, 3));
    let expires = slate_protocol::now_unix_secs() + 3;
    let i = info_with(&rig.layout, &rig.all, Rights::READ_WRITE, expires, &signing);
    let v = Volume::open(i, rig.control.clone(), rig.connector.clone(), cfg()).await.unwrap();
    // Keep writing well past the first capability's expiry.
    let mut k = 0u64;
    while slate_protocol::now_unix_secs() < expires + 3 {
        v.write_blocks(k % SEG, &pattern(k % SEG, 1), false).await.expect("writes go on across renewals");
        k += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = v.status().await.unwrap();
    assert!(s.counters.capability_renewals >= 1, "{:?}", s.counters);
    assert_eq!(s.counters.node_failures, 0);
}

#[tokio::test]
async fn without_renewal_an_expired_capability_stops_the_volume() {
    let rig = Rig::new(&[&[1, 2]], &[], Duration::ZERO);
    let signing = slate_protocol::capability::generate_signing_key();
    let expires = slate_protocol::now_unix_secs() + 2;
    let i = info_with(&rig.layout, &rig.all, Rights::READ_WRITE, expires, &signing);
    let v = Volume::open(i, rig.control.clone(), rig.connector.clone(), cfg()).await.unwrap();
    v.write_blocks(0, &pattern(0, 1), false).await.unwrap();
    while slate_protocol::now_unix_secs() < expires {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(v.write_blocks(0, &pattern(0, 2), false).await, Err(VolumeError::Denied(_))));
    assert!(matches!(v.read_blocks(0, 1).await, Err(VolumeError::Denied(_))));
    assert!(rig.control.failed_reports.lock().unwrap().is_empty(), "an expired capability is not a node failure");
}

#[tokio::test]
async fn a_read_only_attachment_reads_but_never_writes() {
    let rig = Rig::new(&[&[1, 2]], &[3], Duration::ZERO);
    let rw = rig.open().await.unwrap();
    rw.write_blocks(0, &pattern(0, 4), false).await.unwrap();
    rw.close().await;
    let signing = slate_protocol::capability::generate_signing_key();
    let i = info_with(&rig.layout, &rig.all, Rights::READ, u64::MAX, &signing);
    let ro = Volume::open(i, rig.control.clone(), rig.connector.clone(), cfg()).await.unwrap();
    assert_eq!(ro.write_blocks(0, &pattern(0, 5), false).await.unwrap_err(), VolumeError::ReadOnly);
    assert_eq!(ro.trim_blocks(0, 1, false).await.unwrap_err(), VolumeError::ReadOnly);
    rig.node(1).lock().corrupt.insert(0);
    for _ in 0..3 {
        assert_eq!(&ro.read_blocks(0, 1).await.unwrap()[..], &pattern(0, 4)[..]);
    }
    let s = ro.status().await.unwrap();
    assert_eq!(s.counters.repairs, 0, "a read-only attachment does not write repairs");
    assert!(rig.node(1).lock().corrupt.contains(&0));
}

#[tokio::test]
async fn a_rebuild_cut_short_by_a_crash_starts_over_at_the_next_attach() {
    let rig = Rig::new(&[&[1, 2]], &[], Duration::ZERO);
    let v = rig.open().await.unwrap();
    for b in 0..SEG / 2 {
        v.write_blocks(b, &pattern(b, 1), false).await.unwrap();
    }
    v.trim_blocks(3, 2, false).await.unwrap();
    v.close().await;
    // The metadata service lists node 3 as a rebuilding member: half-filled, with stale blocks.
    {
        let mut l = rig.control.layout.lock().unwrap();
        l.segments[0].replicas.push(super::layout::ReplicaInfo {
            node: NodeId(3),
            addr: "fake:3".into(),
            role: ReplicaRole::Rebuilding,
        });
    }
    let n3 = FakeNode::new(3);
    rig.connector.nodes.lock().unwrap().insert(NodeId(3), Arc::clone(&n3));
    {
        let n1 = rig.node(1).lock();
        let mut st = n3.lock();
        for b in 0..10 {
            if let Some(e) = n1.blocks.get(&b) {
                st.blocks.insert(b, e.clone());
            }
        }
        let junk = Bytes::from(vec![9u8; BLOCK_SIZE_BYTES]);
        for b in [3, 4, 40, 50] {
            st.blocks.insert(b, (junk.clone(), slate_protocol::block_crc(&junk)));
        }
    }
    let mut all = rig.all.clone();
    all.push(3);
    let l = rig.control.layout.lock().unwrap().clone();
    let v = Volume::open(info(&l, &all), rig.control.clone(), rig.connector.clone(), cfg()).await.unwrap();
    let s = wait_in_sync(&v).await;
    assert_eq!(s.segments[0].replicas.len(), 3);
    for b in 0..SEG {
        assert_eq!(n3.block(b), rig.node(1).block(b), "block {b}");
    }
    assert_eq!(rig.control.rebuilt_reports.lock().unwrap().as_slice(), &[(SegmentIndex(0), NodeId(3))]);
}

#[tokio::test]
async fn an_unreachable_replacement_is_replaced_in_turn() {
    let rig = Rig::new(&[&[1, 2]], &[3, 4], Duration::ZERO);
    rig.node(3).lock().dead = true;
    let v = rig.open().await.unwrap();
    rig.node(2).lock().dead = true;
    v.write_blocks(0, &pattern(0, 1), false).await.unwrap();
    let s = wait_in_sync(&v).await;
    let nodes: Vec<NodeId> = s.segments[0].replicas.iter().map(|m| m.node).collect();
    assert_eq!(nodes, vec![NodeId(1), NodeId(4)]);
    let reports = rig.control.failed_reports.lock().unwrap().clone();
    assert_eq!(reports, vec![(SegmentIndex(0), NodeId(2)), (SegmentIndex(0), NodeId(3))]);
    rig.assert_replicas_identical(&s);
}

#[tokio::test]
async fn reads_in_flight_on_a_node_that_dies_are_served_by_the_survivor() {
    let rig = Rig::new(&[&[1, 2]], &[3], Duration::ZERO);
    let v = Arc::new(rig.open().await.unwrap());
    for b in 0..8 {
        v.write_blocks(b, &pattern(b, 6), false).await.unwrap();
    }
    rig.node(1).lock().max_delay_us = 50_000;
    rig.node(2).lock().max_delay_us = 50_000;
    let reads: Vec<_> = (0..8u64)
        .map(|b| {
            let v = Arc::clone(&v);
            tokio::spawn(async move { v.read_blocks(b, 1).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    rig.node(1).lock().dead = true;
    for (b, r) in reads.into_iter().enumerate() {
        let got = r.await.unwrap().expect("a read in flight on the dead node goes to the survivor");
        assert_eq!(&got[..], &pattern(b as u64, 6)[..]);
    }
}

fn poll_cfg() -> VolumeConfig {
    VolumeConfig { layout_poll_interval: Duration::from_millis(20), ..cfg() }
}

/// Changes segment `seg`'s set in the fake control plane, as a drain does, and bumps its epoch.
fn change_set(rig: &Rig, seg: usize, f: impl FnOnce(&mut Vec<super::layout::ReplicaInfo>)) {
    let mut l = rig.control.layout.lock().unwrap();
    let s = &mut l.segments[seg];
    f(&mut s.replicas);
    s.epoch = s.epoch.next();
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..4000 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn members(v: &Volume, seg: usize) -> Vec<(NodeId, ReplicaRole)> {
    v.status().await.unwrap().segments[seg].replicas.iter().map(|m| (m.node, m.role)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_elsewhere_is_rebuilt_and_a_removed_one_gets_nothing_more() {
    let rig = Rig::new(&[&[1, 2], &[1, 2]], &[3], Duration::ZERO);
    for n in &rig.nodes {
        n.lock().max_delay_us = 300;
    }
    let l = rig.control.layout.lock().unwrap().clone();
    let v = Arc::new(
        Volume::open(info(&l, &rig.all), rig.control.clone(), rig.connector.clone(), poll_cfg()).await.unwrap(),
    );
    for b in 0..2 * SEG {
        v.write_blocks(b, &pattern(b, 1), false).await.unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let (v, stop) = (Arc::clone(&v), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            // Writer w owns the blocks b with b % 6 == w, so the last version of each is known.
            let mut model = std::collections::HashMap::new();
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || k < 50 {
                k += 1;
                let b = w + 6 * ((k * 7 + w) % (2 * SEG / 6));
                let version = 2 + (k % 250) as u8;
                v.write_blocks(b, &pattern(b, version), false).await?;
                model.insert(b, version);
                tokio::task::yield_now().await;
            }
            Ok::<_, VolumeError>(model)
        }));
    }
    // The drain adds node 3 to segment 0 as rebuilding; the client rebuilds it and marks it in sync.
    tokio::time::sleep(Duration::from_millis(30)).await;
    change_set(&rig, 0, |r| {
        r.push(super::layout::ReplicaInfo { node: NodeId(3), addr: "fake:3".into(), role: ReplicaRole::Rebuilding });
    });
    wait_for("node 3 marked in sync", || {
        rig.control.rebuilt_reports.lock().unwrap().contains(&(SegmentIndex(0), NodeId(3)))
    })
    .await;
    // Then it removes node 1 from segment 0.
    change_set(&rig, 0, |r| r.retain(|x| x.node != NodeId(1)));
    for _ in 0..4000 {
        if members(&v, 0).await == vec![(NodeId(2), ReplicaRole::InSync), (NodeId(3), ReplicaRole::InSync)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(members(&v, 0).await, vec![(NodeId(2), ReplicaRole::InSync), (NodeId(3), ReplicaRole::InSync)]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut model = std::collections::HashMap::new();
    for t in tasks {
        model.extend(t.await.unwrap().expect("no write fails during the move"));
    }
    let s = v.status().await.unwrap();
    assert_eq!(s.counters.node_failures, 0, "{:?}", s.counters);
    assert_eq!(s.counters.layout_changes, 2);
    assert!(rig.control.failed_reports.lock().unwrap().is_empty());
    rig.assert_replicas_identical(&s);
    for b in 0..2 * SEG {
        let want = model.get(&b).map_or_else(|| pattern(b, 1), |ver| pattern(b, *ver));
        assert!(v.read_blocks(b, 1).await.unwrap()[..] == want[..], "block {b}");
    }
    // Node 1 keeps segment 1 and lost segment 0: none of segment 0's writes reach it any more.
    let before: Vec<Option<Bytes>> = (0..SEG).map(|b| rig.node(1).block(b)).collect();
    for b in 0..SEG {
        v.write_blocks(b, &pattern(b, 255), false).await.unwrap();
        assert!(v.read_blocks(b, 1).await.unwrap()[..] == pattern(b, 255)[..], "block {b}");
    }
    let after: Vec<Option<Bytes>> = (0..SEG).map(|b| rig.node(1).block(b)).collect();
    assert!(before == after, "the removed replica received a write");
    // Node 1 still holds segment 1 (reads rotate over both members).
    v.write_blocks(SEG, &pattern(SEG, 254), false).await.unwrap();
    assert!(rig.node(1).block(SEG) == rig.node(2).block(SEG));
    v.close().await;
}

#[tokio::test]
async fn a_polled_layout_older_than_the_clients_own_replacement_is_ignored() {
    let rig = Rig::new(&[&[1, 2]], &[3], Duration::ZERO);
    let l = rig.control.layout.lock().unwrap().clone();
    let v = Volume::open(info(&l, &rig.all), rig.control.clone(), rig.connector.clone(), poll_cfg()).await.unwrap();
    let stale = l.clone();
    rig.node(2).lock().dead = true;
    v.write_blocks(0, &pattern(0, 1), false).await.unwrap();
    let s = wait_in_sync(&v).await;
    let epoch = s.segments[0].epoch;
    assert_eq!(members(&v, 0).await, vec![(NodeId(1), ReplicaRole::InSync), (NodeId(3), ReplicaRole::InSync)]);
    // A poll reply from before the report (node 2 still in the set, older epoch) changes nothing.
    *rig.control.layout.lock().unwrap() = stale;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let s = v.status().await.unwrap();
    assert_eq!(s.segments[0].epoch, epoch);
    assert_eq!(members(&v, 0).await, vec![(NodeId(1), ReplicaRole::InSync), (NodeId(3), ReplicaRole::InSync)]);
    assert_eq!(s.counters.layout_changes, 0);
    v.write_blocks(1, &pattern(1, 2), false).await.unwrap();
    assert_eq!(rig.node(3).block(1), rig.node(1).block(1));
    assert!(rig.node(2).block(1).is_none());
}

#[tokio::test]
async fn a_write_in_flight_to_a_removed_replica_completes_without_it() {
    let rig = Rig::new(&[&[1, 2, 3]], &[], Duration::ZERO);
    let l = rig.control.layout.lock().unwrap().clone();
    let v = Arc::new(
        Volume::open(info(&l, &rig.all), rig.control.clone(), rig.connector.clone(), poll_cfg()).await.unwrap(),
    );
    // Node 1 swallows writes (no reply); the write waits for it...
    rig.node(1).lock().black_hole_writes = true;
    let w = {
        let v = Arc::clone(&v);
        tokio::spawn(async move { v.write_blocks(5, &pattern(5, 9), false).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!w.is_finished());
    // ...until the metadata service removes node 1: the write completes on 2 and 3, nothing fails.
    change_set(&rig, 0, |r| r.retain(|x| x.node != NodeId(1)));
    tokio::time::timeout(Duration::from_millis(400), w)
        .await
        .expect("write completes without node 1")
        .unwrap()
        .unwrap();
    // The swallowed request times out later; that is no failure of node 1.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = v.status().await.unwrap();
    assert_eq!(s.counters.node_failures, 0);
    assert!(rig.control.failed_reports.lock().unwrap().is_empty());
    assert_eq!(rig.node(2).block(5), rig.node(3).block(5));
    assert_eq!(&v.read_blocks(5, 1).await.unwrap()[..], &pattern(5, 9)[..]);
}

#[tokio::test]
async fn a_grown_layout_is_adopted_and_a_smaller_one_never() {
    let rig = Rig::new(&[&[1, 2]], &[3, 4], Duration::ZERO);
    // A growth renews the capability first (its scope names the segment count).
    let nodes: Vec<NodeId> = rig.all.iter().map(|n| NodeId(*n)).collect();
    *rig.control.renew.lock().unwrap() = Some((slate_protocol::capability::generate_signing_key(), nodes, 600));
    let l = rig.control.layout.lock().unwrap().clone();
    let v = Volume::open(info(&l, &rig.all), rig.control.clone(), rig.connector.clone(), poll_cfg()).await.unwrap();
    v.write_blocks(SEG - 1, &pattern(SEG - 1, 1), false).await.unwrap();
    assert_eq!(v.write_blocks(SEG, &pattern(SEG, 1), false).await, Err(VolumeError::OutOfRange));
    // Grown elsewhere: a second segment on nodes 3 and 4.
    {
        let mut l = rig.control.layout.lock().unwrap();
        l.size_bytes *= 2;
        let replicas = [3, 4]
            .iter()
            .map(|n| super::layout::ReplicaInfo {
                node: NodeId(*n),
                addr: format!("fake:{n}"),
                role: ReplicaRole::InSync,
            })
            .collect();
        l.segments.push(SegmentReplicas { segment: SegmentIndex(1), epoch: Epoch(1), replicas });
    }
    wait_for("the growth", || v.size_now() == 2 * SEG * 4096).await;
    assert_eq!(crate::blockdev::BlockDevice::size_bytes(&v), 2 * SEG * 4096);
    v.write_blocks(SEG, &pattern(SEG, 2), false).await.unwrap();
    v.write_blocks(2 * SEG - 1, &pattern(2 * SEG - 1, 2), false).await.unwrap();
    assert!(rig.node(3).block(SEG).is_some() && rig.node(3).block(SEG) == rig.node(4).block(SEG));
    assert!(rig.node(1).block(SEG).is_none());
    assert_eq!(&v.read_blocks(SEG, 1).await.unwrap()[..], &pattern(SEG, 2)[..]);
    assert_eq!(&v.read_blocks(SEG - 1, 1).await.unwrap()[..], &pattern(SEG - 1, 1)[..]);
    let s = v.status().await.unwrap();
    assert_eq!((s.size_bytes, s.segments.len(), s.counters.growths), (2 * SEG * 4096, 2, 1));
    assert!(s.counters.capability_renewals >= 1, "the growth renewed the capability: {:?}", s.counters);
    // A layout with the old size (a stale reply) never shrinks the volume.
    {
        let mut l = rig.control.layout.lock().unwrap();
        l.size_bytes /= 2;
        l.segments.pop();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(v.size_now(), 2 * SEG * 4096);
    assert_eq!(&v.read_blocks(2 * SEG - 1, 1).await.unwrap()[..], &pattern(2 * SEG - 1, 2)[..]);
    v.close().await;
}
