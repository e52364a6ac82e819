//! Periodic write-intent clearing against real `slate-node` processes.
//!
//! The nodes record every region a write touches until a client clears it.
//! While it serves, the client clears the regions of healthy segments that
//! had no write during a whole interval; a region written continuously stays
//! recorded, and so does every region written while a replica was failed,
//! being replaced or rebuilding (its replicas might differ: the next attach
//! reconciles it).

mod volume_common;

use slate::volume::{AttachInfo, Volume, VolumeConfig, VolumeLayout};
use slate_protocol::NodeId;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_common::*;

const GRAIN: u64 = 256;

fn config() -> VolumeConfig {
    VolumeConfig { intent_clear_interval: Duration::from_secs(1), ..test_config() }
}

/// Is the region holding `grain` recorded on `node`?
fn recorded(all: &BTreeMap<NodeId, Vec<slate_protocol::message::BlockRange>>, node: u64, grain: u64) -> bool {
    let b = grain * GRAIN;
    all.get(&NodeId(node)).is_some_and(|rs| rs.iter().any(|r| r.start.0 <= b && b < r.start.0 + r.count))
}

/// Polls the nodes' intents until `done` holds (panics after `limit`).
async fn wait_intents(
    cluster: &Cluster,
    layout: &VolumeLayout,
    limit: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<NodeId, Vec<slate_protocol::message::BlockRange>>) -> bool,
) -> BTreeMap<NodeId, Vec<slate_protocol::message::BlockRange>> {
    let t = Instant::now();
    loop {
        let all = intents(cluster, layout).await;
        if done(&all) {
            eprintln!("{what} after {:.1} s", t.elapsed().as_secs_f64());
            return all;
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}: {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn write(vol: &Volume, block: u64, version: u64) {
    vol.write_blocks(block, &block_text(block, version), false).await.expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_regions_are_cleared_hot_and_degraded_ones_stay() {
    init_logging();
    let mut cluster = Cluster::start(3, &[&[1, 2]]);
    let layout = cluster.layout(1);
    let control = cluster.control(&layout, &[3]);
    let info: AttachInfo = serde_json::from_str(&cluster.attach_json(&layout)).expect("attach json");
    let vol = Arc::new(
        Volume::attach(info, control.clone(), slate_dataplane::tls::Connector::plaintext(), config())
            .await
            .expect("attach"),
    );

    // Grain 2 is written all the time; grain 0 once.
    let stop = Arc::new(AtomicBool::new(false));
    let hot = {
        let (vol, stop) = (Arc::clone(&vol), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut k = 1;
            while !stop.load(Ordering::Relaxed) {
                write(&vol, 2 * GRAIN + k % GRAIN, k).await;
                k += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    write(&vol, 5, 1).await;
    let all = intents(&cluster, &layout).await;
    assert!(recorded(&all, 1, 0) && recorded(&all, 2, 0), "the write is recorded on both replicas: {all:?}");

    // Grain 0 goes quiet and is cleared on both nodes; grain 2 stays recorded meanwhile.
    let all = wait_intents(&cluster, &layout, Duration::from_secs(30), "quiet region cleared", |a| {
        !recorded(a, 1, 0) && !recorded(a, 2, 0)
    })
    .await;
    assert!(recorded(&all, 1, 2) && recorded(&all, 2, 2), "a region written continuously stays recorded: {all:?}");
    stop.store(true, Ordering::Relaxed);
    hot.await.expect("hot writer");
    wait_intents(&cluster, &layout, Duration::from_secs(30), "every region cleared once quiet", |a| {
        a.values().all(Vec::is_empty)
    })
    .await;
    let status = vol.status().await.expect("status");
    assert!(status.counters.intent_clear_rounds >= 2, "{:?}", status.counters);

    // A replica dies: what is written while it is replaced and rebuilt stays recorded.
    cluster.node(2).kill9();
    for k in 0..20 {
        write(&vol, GRAIN + k, 2).await;
    }
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        let s = vol.status().await.expect("status");
        if s.all_in_sync() && s.segments[0].replicas.iter().any(|m| m.node == NodeId(3)) {
            break;
        }
        assert!(Instant::now() < deadline, "the spare was not rebuilt: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healed: VolumeLayout = control.layout.lock().expect("layout").clone();
    // Written after the heal, grain 3 is cleared again on both live replicas; grain 1 is not.
    write(&vol, 3 * GRAIN, 3).await;
    let all = wait_intents(&cluster, &healed, Duration::from_secs(30), "region written after the heal cleared", |a| {
        !recorded(a, 1, 3) && !recorded(a, 3, 3)
    })
    .await;
    assert!(recorded(&all, 1, 1), "a region written while a replica was missing stays recorded: {all:?}");
    assert!(recorded(&all, 3, 1), "...on the rebuilt replica too: {all:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = intents(&cluster, &healed).await;
    assert!(recorded(&all, 1, 1) && recorded(&all, 3, 1), "the degraded region stays recorded: {all:?}");
    // Everything reads back.
    for k in 0..20 {
        assert_eq!(&vol.read_blocks(GRAIN + k, 1).await.expect("read")[..], &block_text(GRAIN + k, 2)[..]);
    }
    assert_eq!(&vol.read_blocks(5, 1).await.expect("read")[..], &block_text(5, 1)[..]);
    vol.close().await;
}
