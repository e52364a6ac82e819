//! Crash test with a real process: `slate-node serve` takes pipelined writes
//! from a test client and is killed with SIGKILL at a random moment; after a
//! restart every acknowledged write reads back intact, and a block whose write
//! was in flight reads as its last acknowledged value, as one of the in-flight
//! values, or is reported `Corrupt` (torn) — never as garbage presented as good.
//!
//! Seeded: the seed is printed; `SLATE_CRASH_SEED=<n>` replays it and
//! `SLATE_CRASH_ROUNDS=<n>` changes the number of kill rounds.

mod common;

use bytes::Bytes;
use common::{block_content, decode_block, Seen, TestNode};
use rand::{Rng, SeedableRng};
use slate_dataplane::client::{write_request, ClientError};
use slate_protocol::{BlockIndex, ErrorKind, Reply, Request, Rights};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WORKING_BLOCKS: u64 = 256;
const QUEUE_DEPTH: usize = 32;
const MAX_WRITE_BLOCKS: u64 = 8;

/// Per block: every sequence number sent to it, and the highest acknowledged.
#[derive(Default, Debug)]
struct History {
    issued: HashMap<u64, BTreeSet<u64>>,
    acked: HashMap<u64, u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let seed = slate_tests::seed_from_env("SLATE_CRASH_SEED");
    let rounds: usize = std::env::var("SLATE_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = TestNode::start("crash", &[1]);
    let mut next_seq: u64 = 1;
    // What each block holds for sure after the last verification (seq, or none = zeros).
    let mut base: HashMap<u64, Option<u64>> = HashMap::new();

    for round in 0..rounds {
        let client = node.client(1, 1, Rights::READ_WRITE).await;
        let history = Arc::new(Mutex::new(History::default()));
        for (b, s) in &base {
            if let Some(s) = s {
                let mut h = history.lock().unwrap();
                h.issued.entry(*b).or_default().insert(*s);
                h.acked.insert(*b, *s);
            }
        }
        let kill_after = Duration::from_millis(rng.gen_range(30..400));
        let permits = Arc::new(tokio::sync::Semaphore::new(QUEUE_DEPTH));
        let mut tasks = tokio::task::JoinSet::new();
        let started = tokio::time::Instant::now();
        let mut acked_count = 0usize;
        let mut sent = 0usize;
        // Issue writes in order until the kill time; then kill -9 while writes are in flight.
        while started.elapsed() < kill_after {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let len = rng.gen_range(1..=MAX_WRITE_BLOCKS);
            let start = rng.gen_range(0..=WORKING_BLOCKS - len);
            let seq = next_seq;
            next_seq += 1;
            let mut data = Vec::with_capacity((len as usize) * slate_protocol::BLOCK_SIZE_BYTES);
            {
                let mut h = history.lock().unwrap();
                for b in start..start + len {
                    data.extend_from_slice(&block_content(b, seq));
                    h.issued.entry(b).or_default().insert(seq);
                }
            }
            let req = write_request(client.target(), BlockIndex(start), Bytes::from(data)).unwrap();
            let reply = client.start(&req);
            sent += 1;
            let history = history.clone();
            tasks.spawn(async move {
                let r = reply.await;
                drop(permit);
                match r {
                    Ok(Reply::Done) => {
                        let mut h = history.lock().unwrap();
                        for b in start..start + len {
                            let a = h.acked.entry(b).or_insert(seq);
                            *a = (*a).max(seq);
                        }
                        true
                    }
                    Ok(Reply::Error(e)) if e.kind == ErrorKind::NoSpace => false,
                    Ok(other) => panic!("write {seq} got {other:?}"),
                    Err(ClientError::Closed(_)) => false,
                    Err(e) => panic!("write {seq} failed: {e}"),
                }
            });
            // Collect finished tasks as we go so that the set stays small.
            while let Some(done) = tasks.try_join_next() {
                acked_count += usize::from(done.unwrap());
            }
        }
        node.kill9();
        while let Some(done) = tasks.join_next().await {
            acked_count += usize::from(done.unwrap());
        }
        drop(client);
        eprintln!("round {round}: killed after {kill_after:?}: {sent} writes sent, {acked_count} acknowledged");

        node.restart();
        let client = node.client(1, 1, Rights::READ_WRITE).await;
        let h = std::mem::take(&mut *history.lock().unwrap());
        let mut torn = Vec::new();
        let (mut in_flight_new, mut in_flight_old) = (0, 0);
        for b in 0..WORKING_BLOCKS {
            let issued = h.issued.get(&b);
            let acked = h.acked.get(&b).copied();
            let in_flight = issued.is_some_and(|s| s.iter().any(|x| Some(*x) > acked));
            match client.read_blocks(BlockIndex(b), 1).await {
                Ok(bytes) => {
                    let seen = decode_block(b, &bytes);
                    match seen {
                        Seen::Garbage => {
                            panic!("seed {seed} round {round}: blk-{b} holds garbage presented as good data")
                        }
                        Seen::Zeros => assert!(
                            acked.is_none(),
                            "seed {seed} round {round}: blk-{b} lost acknowledged write {acked:?} (reads as zeros)"
                        ),
                        Seen::Seq(s) => {
                            assert!(
                                issued.is_some_and(|i| i.contains(&s)),
                                "seed {seed} round {round}: blk-{b} holds seq {s} that was never sent to it"
                            );
                            assert!(
                                Some(s) >= acked,
                                "seed {seed} round {round}: blk-{b} reads seq {s}, older than acknowledged {acked:?}"
                            );
                            if Some(s) > acked {
                                in_flight_new += 1;
                            } else if in_flight {
                                in_flight_old += 1;
                            }
                        }
                    }
                    base.insert(b, if let Seen::Seq(s) = seen { Some(s) } else { None });
                }
                Err(ClientError::Remote(e)) if e.kind == ErrorKind::Corrupt => {
                    assert!(in_flight, "seed {seed} round {round}: blk-{b} is corrupt but had no write in flight");
                    torn.push(b);
                }
                Err(e) => panic!("seed {seed} round {round}: reading blk-{b}: {e}"),
            }
        }
        eprintln!(
            "round {round}: verified {WORKING_BLOCKS} blocks: {in_flight_new} show an in-flight write, \
             {in_flight_old} kept the old value, {} torn (reported Corrupt)",
            torn.len()
        );
        // Repair torn blocks the way a client would (rewrite them) before the next round.
        for b in torn {
            let seq = next_seq;
            next_seq += 1;
            client.write_blocks(BlockIndex(b), Bytes::from(block_content(b, seq))).await.expect("rewrite torn block");
            base.insert(b, Some(seq));
        }
        // A flush round-trips cleanly after recovery.
        client.request(Request::Flush { target: client.target() }).await.expect("flush after restart");
    }

    let status = node.terminate().expect("node exits on SIGTERM");
    assert!(status.success(), "node exit status after SIGTERM: {status}");
}
