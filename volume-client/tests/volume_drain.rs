//! A replica moved while the volume is attached and busy, against real
//! `slate-node` processes: the control plane adds a third node to a
//! segment's set as rebuilding (as `slate node drain` does), the client
//! picks the change up by polling, assigns and rebuilds the new replica and
//! marks it in sync; then the drained node is removed from the set and gets
//! no more of that segment's writes, while it keeps serving its others.

mod volume_common;

use slate::volume::{AttachInfo, Dek, ReplicaInfo, ReplicaRole, Volume, VolumeConfig, VolumeError};
use slate_protocol::{Capability, NodeId, Rights, SegmentIndex, BLOCK_SIZE_BYTES};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_common::*;

fn poll_config() -> VolumeConfig {
    VolumeConfig { layout_poll_interval: Duration::from_millis(100), ..test_config() }
}

async fn members(vol: &Volume, seg: usize) -> Vec<(NodeId, ReplicaRole)> {
    vol.status().await.unwrap().segments[seg].replicas.iter().map(|m| (m.node, m.role)).collect()
}

async fn wait_members(vol: &Volume, seg: usize, want: &[(u64, ReplicaRole)]) {
    let want: Vec<(NodeId, ReplicaRole)> = want.iter().map(|(n, r)| (NodeId(*n), *r)).collect();
    let deadline = Instant::now() + Duration::from_mins(1);
    while members(vol, seg).await != want {
        assert!(Instant::now() < deadline, "segment {seg} never became {want:?}: {:?}", members(vol, seg).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_moves_to_a_new_node_under_writes_and_every_write_survives() {
    init_logging();
    let cluster = Cluster::start(3, &[&[1, 2], &[1, 2]]);
    let layout = cluster.layout(1);
    let control = cluster.control(&layout, &[]);
    // The attach capability covers nodes 1 and 2 only: reaching node 3 needs a renewed one.
    let capability = Capability {
        volume: VOLUME,
        generation: layout.generation,
        rights: Rights::READ_WRITE.union(Rights::ADMIN),
        expires_unix_secs: slate_protocol::now_unix_secs() + 3600,
        nodes: vec![NodeId(1), NodeId(2)],
        ..Default::default()
    }
    .sign(&cluster.key);
    let info = AttachInfo { layout: layout.clone(), capability, dek: Dek::new(test_key_bytes()) };
    let vol = Arc::new(
        Volume::attach(info, control.clone(), slate_dataplane::tls::Connector::plaintext(), poll_config())
            .await
            .expect("attach"),
    );
    let blocks = 2 * SEGMENT_BLOCKS;
    for start in (0..blocks).step_by(128) {
        let data: Vec<u8> = (start..start + 128).flat_map(|x| block_text(x, 0)).collect();
        vol.write_blocks(start, &data, false).await.unwrap();
    }

    // Eight writers (queue depth 8) run through the whole move.
    const WRITERS: u64 = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (vol, stop, done) = (Arc::clone(&vol), Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            // Writer w owns the blocks b with b % WRITERS == w, so the final content is known.
            let mut model = HashMap::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let b = w + WRITERS * ((k * 37 + w * 11) % (blocks / WRITERS));
                let run: Vec<u64> = (0..=k % 3).map(|i| b + i * WRITERS).filter(|x| *x < blocks).collect();
                for x in &run {
                    vol.write_blocks(*x, &block_text(*x, k), k.is_multiple_of(7)).await?;
                    model.insert(*x, k);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, VolumeError>(model)
        }));
    }
    wait_for_more(&done, 100).await;

    // Step 1 of a drain of node 1: node 3 joins segment 0 as rebuilding.
    let addr3 = cluster.addr_of(NodeId(3));
    control.change_set(0, |r| r.push(ReplicaInfo { node: NodeId(3), addr: addr3, role: ReplicaRole::Rebuilding }));
    let deadline = Instant::now() + Duration::from_mins(2);
    while !control.rebuilt.lock().unwrap().contains(&(SegmentIndex(0), NodeId(3))) {
        assert!(Instant::now() < deadline, "node 3 was never rebuilt: {:?}", vol.status().await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(control.assigned.lock().unwrap().as_slice(), &[(SegmentIndex(0), NodeId(3))]);
    assert!(*control.renewals.lock().unwrap() >= 1, "node 3 needed a capability that covers it");
    let progress = control.progress.lock().unwrap().clone();
    assert!(!progress.is_empty(), "rebuild progress was reported");
    assert!(progress.iter().all(|p| p.0 == SegmentIndex(0) && p.1 == NodeId(3) && p.2 < p.3 && p.3 == SEGMENT_BLOCKS));
    wait_for_more(&done, 100).await;

    // Step 2: node 1 leaves segment 0 (it keeps segment 1).
    control.change_set(0, |r| r.retain(|x| x.node != NodeId(1)));
    wait_members(&vol, 0, &[(2, ReplicaRole::InSync), (3, ReplicaRole::InSync)]).await;
    wait_for_more(&done, 200).await;
    stop.store(true, Ordering::Relaxed);
    let mut model = HashMap::new();
    for t in tasks {
        model.extend(t.await.unwrap().expect("no write fails while a replica moves"));
    }

    let status = vol.status().await.unwrap();
    assert_eq!(status.counters.node_failures, 0, "{:?}", status.counters);
    assert_eq!(status.counters.layout_changes, 2);
    assert!(control.failed.lock().unwrap().is_empty(), "no replica was reported failed");
    assert_eq!(members(&vol, 1).await, vec![(NodeId(1), ReplicaRole::InSync), (NodeId(2), ReplicaRole::InSync)]);
    let final_layout = control.layout.lock().unwrap().clone();
    // Segment 0 on nodes 2 and 3, segment 1 on nodes 1 and 2: byte-identical ciphertext and crcs.
    assert_replicas_identical(&cluster, &final_layout).await;
    // Every acknowledged write reads back (twice: reads alternate between replicas).
    for _ in 0..2 {
        for start in (0..blocks).step_by(256) {
            let got = vol.read_blocks(start, 256).await.unwrap();
            for i in 0..256 {
                let x = start + i;
                let want = block_text(x, model.get(&x).copied().unwrap_or(0));
                assert!(got[i as usize * BLOCK_SIZE_BYTES..][..BLOCK_SIZE_BYTES] == want[..], "block {x}");
            }
        }
    }
    vol.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_replica_receives_no_more_writes() {
    init_logging();
    let cluster = Cluster::start(3, &[&[1, 2, 3], &[1, 2]]);
    let layout = cluster.layout(1);
    let control = cluster.control(&layout, &[]);
    let info = cluster.attach_info(&layout);
    let vol = Volume::attach(info, control.clone(), slate_dataplane::tls::Connector::plaintext(), poll_config())
        .await
        .expect("attach");
    let data: Vec<u8> = (0..64).flat_map(|x| block_text(x, 1)).collect();
    vol.write_blocks(0, &data, false).await.unwrap();

    control.change_set(0, |r| r.retain(|x| x.node != NodeId(1)));
    wait_members(&vol, 0, &[(2, ReplicaRole::InSync), (3, ReplicaRole::InSync)]).await;

    let n1 = cluster.session(NodeId(1), 1).await;
    let before = raw_blocks(&n1, 1, 0, 64).await;
    let data: Vec<u8> = (0..64).flat_map(|x| block_text(x, 2)).collect();
    vol.write_blocks(0, &data, true).await.unwrap();
    vol.trim_blocks(60, 4, false).await.unwrap();
    vol.flush_all().await.unwrap();
    assert!(raw_blocks(&n1, 1, 0, 64).await == before, "node 1 received a write after it left segment 0");
    assert_eq!(&vol.read_blocks(0, 60).await.unwrap()[..], &data[..60 * BLOCK_SIZE_BYTES]);
    let now = control.layout.lock().unwrap().clone();
    assert_replicas_identical(&cluster, &now).await;

    // Node 1 still holds segment 1 and gets its writes.
    let b = SEGMENT_BLOCKS + 5;
    vol.write_blocks(b, &block_text(b, 3), false).await.unwrap();
    let on1 = raw_blocks(&n1, 1, b, 1).await;
    assert!(on1[0].written);
    let n2 = cluster.session(NodeId(2), 1).await;
    assert!(raw_blocks(&n2, 1, b, 1).await == on1);
    assert_eq!(vol.status().await.unwrap().counters.node_failures, 0);
    vol.close().await;
}
