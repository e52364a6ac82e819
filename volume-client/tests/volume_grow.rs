//! Online growth against real `slate-node` processes: the control plane
//! grows the volume (as `slate volume resize` does: a larger size, new
//! segments placed on other nodes) while writers are busy; the attached
//! client picks the new layout up by polling, gets a capability that covers
//! the new nodes, assigns them their segments and serves the new end, and
//! every write made before, during and after the growth reads back. A fresh
//! NBD connection is told the new size.

#[path = "nbd_support.rs"]
mod nbd_support;
mod volume_common;

use nbd_support::{unix_stream, RawClient, TestServer};
use slate::blockdev::BlockDevice;
use slate::nbd::{ExportConfig, ServerConfig};
use slate::volume::{AttachInfo, Dek, Volume, VolumeConfig, VolumeError};
use slate_protocol::{Capability, NodeId, Rights, SegmentIndex, BLOCK_SIZE_BYTES};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_common::*;

const BS: u64 = BLOCK_SIZE_BYTES as u64;

fn poll_config() -> VolumeConfig {
    VolumeConfig { layout_poll_interval: Duration::from_millis(100), ..test_config() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_grows_under_writes_and_serves_its_new_end() {
    init_logging();
    let cluster = Cluster::start(4, &[&[1, 2], &[1, 2]]);
    // One and a half segments: segment 1 is short and grows in place.
    let old_blocks = SEGMENT_BLOCKS + SEGMENT_BLOCKS / 2;
    let mut layout = cluster.layout(1);
    layout.size_bytes = old_blocks * BS;
    let control = cluster.control(&layout, &[]);
    // The attach capability covers nodes 1 and 2 only: the new segments' nodes need a renewed one.
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
    assert_eq!(vol.size_now(), old_blocks * BS);
    assert_eq!(
        vol.write_blocks(old_blocks, &block_text(old_blocks, 1), false).await,
        Err(VolumeError::OutOfRange),
        "the old end is enforced before the growth"
    );

    // An NBD export of the volume: a connection made now sees the old size.
    let dev: Arc<dyn BlockDevice> = Arc::clone(&vol) as Arc<dyn BlockDevice>;
    let server = TestServer::start(vec![(ExportConfig::new("vol"), dev)], ServerConfig::default()).await;
    let before = RawClient::go(unix_stream(&server.socket).await, "vol", true, false).await.expect("NBD go");
    assert_eq!(before.size, old_blocks * BS);
    before.disconnect().await;

    for start in (0..old_blocks).step_by(128) {
        let data: Vec<u8> = (start..start + 128).flat_map(|x| block_text(x, 0)).collect();
        vol.write_blocks(start, &data, false).await.unwrap();
    }

    // Eight writers over the old range (but its last 64 blocks, written past
    // the old end below) run through the growth.
    const WRITERS: u64 = 8;
    let writer_blocks = old_blocks - 64;
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
                let b = w + WRITERS * ((k * 37 + w * 11) % (writer_blocks / WRITERS));
                vol.write_blocks(b, &block_text(b, k), k.is_multiple_of(7)).await?;
                model.insert(b, k);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, VolumeError>(model)
        }));
    }
    wait_for_more(&done, 100).await;

    // Grow to three and a half segments: segments 2 and 3 go to nodes 3 and 4.
    let new_blocks = 3 * SEGMENT_BLOCKS + SEGMENT_BLOCKS / 2;
    let new_nodes: Vec<(NodeId, String)> = [3, 4].iter().map(|n| (NodeId(*n), cluster.addr_of(NodeId(*n)))).collect();
    control.grow(new_blocks * BS, &new_nodes);
    let deadline = Instant::now() + Duration::from_mins(1);
    while vol.size_now() != new_blocks * BS {
        assert!(Instant::now() < deadline, "the growth was never adopted: {:?}", vol.status().await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(vol.size_bytes(), new_blocks * BS);
    let status = vol.status().await.unwrap();
    assert_eq!(status.size_bytes, new_blocks * BS);
    assert_eq!(status.segments.len(), 4);
    assert_eq!(status.counters.growths, 1);
    assert!(*control.renewals.lock().unwrap() >= 1, "nodes 3 and 4 needed a capability that covers them");
    let mut assigned = control.assigned.lock().unwrap().clone();
    assigned.sort();
    assert_eq!(
        assigned,
        vec![
            (SegmentIndex(2), NodeId(3)),
            (SegmentIndex(2), NodeId(4)),
            (SegmentIndex(3), NodeId(3)),
            (SegmentIndex(3), NodeId(4)),
        ]
    );
    wait_for_more(&done, 100).await;

    // Writes past the old end while the writers go on: across the old end (in
    // the segment that grew in place), across the new segments' boundary, and
    // the very last block.
    let runs = [(old_blocks - 8, 64), (2 * SEGMENT_BLOCKS - 16, 64), (new_blocks - 1, 1)];
    for (start, count) in runs {
        let data: Vec<u8> = (start..start + count).flat_map(|x| block_text(x, 1_000_000)).collect();
        vol.write_blocks(start, &data, true).await.unwrap_or_else(|e| panic!("write at {start}: {e}"));
    }
    assert_eq!(
        vol.write_blocks(new_blocks, &block_text(new_blocks, 1), false).await,
        Err(VolumeError::OutOfRange),
        "the new end is enforced"
    );
    wait_for_more(&done, 100).await;
    stop.store(true, Ordering::Relaxed);
    let mut model = HashMap::new();
    for t in tasks {
        model.extend(t.await.unwrap().expect("no write fails while the volume grows"));
    }
    for (start, count) in runs {
        for x in start..start + count {
            model.insert(x, 1_000_000);
        }
    }

    // Every acknowledged write reads back, twice (reads alternate between replicas);
    // never-written blocks past the old end read as zeros.
    for _ in 0..2 {
        for start in (0..new_blocks).step_by(256) {
            let count = 256.min(new_blocks - start);
            let got = vol.read_blocks(start, count).await.unwrap();
            for i in 0..count {
                let x = start + i;
                let want = match model.get(&x) {
                    Some(v) => block_text(x, *v),
                    None if x < old_blocks => block_text(x, 0),
                    None => vec![0u8; BLOCK_SIZE_BYTES],
                };
                assert!(got[i as usize * BLOCK_SIZE_BYTES..][..BLOCK_SIZE_BYTES] == want[..], "block {x}");
            }
        }
    }
    let status = vol.status().await.unwrap();
    assert_eq!(status.counters.node_failures, 0, "{:?}", status.counters);
    assert!(control.failed.lock().unwrap().is_empty(), "no replica was reported failed");
    let final_layout = control.layout.lock().unwrap().clone();
    assert_replicas_identical(&cluster, &final_layout).await;

    // A fresh NBD connection is told the new size and reads the new end.
    let mut after = RawClient::go(unix_stream(&server.socket).await, "vol", true, false).await.expect("NBD go");
    assert_eq!(after.size, new_blocks * BS);
    let last = after.read((new_blocks - 1) * BS, BLOCK_SIZE_BYTES as u32).await;
    assert_eq!(last.error, 0);
    assert!(last.data == block_text(new_blocks - 1, 1_000_000), "the last block over NBD");
    after.disconnect().await;
    server.stop().await;
    vol.close().await;
}
