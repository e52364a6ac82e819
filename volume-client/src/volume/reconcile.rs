//! Write-intent reconciliation when a volume is opened under a new generation.
//!
//! A client that crashed may have left writes half-way: on one replica and
//! not another. Each storage node records the regions it had writes in
//! flight for (its write intents). Before serving any I/O, the new attachment
//! asks every replica for its intents, takes the union, and for each region
//! makes every replica of the segment hold what one chosen in-sync replica
//! holds: written blocks are copied as ciphertext with their crcs, unwritten
//! ones are trimmed. Either version of a torn write is a valid outcome (the
//! write was never acknowledged); what must not happen is two replicas
//! returning different bytes for one block. Only then are the intents
//! cleared on each node.
//!
//! Nothing else runs on the volume meanwhile, so no range lock is needed. A
//! node that fails here is left out and handed to the actor as down, which
//! replaces and rebuilds it like any failed replica.
//!
//! This is only as good as the nodes' intent records: a region must stay
//! recorded on a node until every replica has the write. slate-node keeps
//! every intent, across its own crashes and clean stops, until a client clears
//! it: here, or while serving for regions that stayed quiet on healthy
//! segments (`intents.rs`) (lazy clearing after `intent_idle_clear_secs` is off by default,
//! because a client that died with a write on one replica and re-attaches
//! later would find no intent for that region).

use super::actor::{classify, Outcome};
use super::error::VolumeError;
use super::layout::{ReplicaRole, VolumeLayout};
use super::link::{LinkError, NodeLink};
use super::runs::{check_data, copy_requests, split};
use slate_protocol::message::{BlockRange, MAX_IO_BLOCKS, MAX_RANGES};
use slate_protocol::{BlockIndex, NodeId, Reply, Request, Target};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// What reconciliation did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Intent regions found (after merging those of all replicas).
    pub regions: usize,
    /// Blocks compared and made equal.
    pub blocks: u64,
    /// Nodes that failed during reconciliation.
    pub down: Vec<(NodeId, String)>,
}

async fn call(link: &Arc<dyn NodeLink>, req: &Request, timeout: Duration) -> Outcome {
    classify(tokio::time::timeout(timeout, link.start(req)).await.unwrap_or(Err(LinkError::Timeout)))
}

/// Reconciles every intent region of the volume across its replicas.
pub async fn reconcile<S: std::hash::BuildHasher>(
    layout: &VolumeLayout,
    links: &HashMap<NodeId, Arc<dyn NodeLink>, S>,
    timeout: Duration,
) -> Result<ReconcileReport, VolumeError> {
    let t = Target { volume: layout.volume, generation: layout.generation };
    let mut report = ReconcileReport::default();
    let is_down = |r: &ReconcileReport, n: NodeId| r.down.iter().any(|(d, _)| *d == n);

    // 1. Every node's intents.
    let mut per_node: Vec<(NodeId, Vec<BlockRange>)> = Vec::new();
    let mut nodes: Vec<NodeId> = links.keys().copied().collect();
    nodes.sort_unstable();
    for node in nodes {
        match call(&links[&node], &Request::WriteIntents { target: t }, timeout).await {
            Outcome::Ok(Reply::Ranges(r)) => per_node.push((node, r)),
            Outcome::Fatal(e) => return Err(e),
            other => report.down.push((node, format!("write intents: {other:?}"))),
        }
    }
    let volume_blocks = layout.volume_blocks();
    let mut spans: Vec<(u64, u64)> = per_node
        .iter()
        .flat_map(|(_, r)| r.iter())
        .map(|r| (r.start.0.min(volume_blocks), r.start.0.saturating_add(r.count).min(volume_blocks)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    report.regions = merged.len();
    if !merged.is_empty() {
        info!(volume = %t.volume, regions = merged.len(), "reconciling write intents left by the previous attachment");
    }

    // 2. Make every replica of each region equal to one in-sync replica.
    for (a, b) in merged {
        for piece in split(a, b - a, layout.segment_blocks, u64::from(MAX_IO_BLOCKS)) {
            let Some(set) = layout.segments.iter().find(|s| s.segment == piece.segment) else { continue };
            let start = BlockIndex(piece.start);
            let count = piece.count as usize;
            let read = Request::Read { target: t, start, count: piece.count as u32 };
            let mut good = None;
            let mut tried = Vec::new();
            for r in set.replicas.iter().filter(|r| r.role == ReplicaRole::InSync) {
                if is_down(&report, r.node) {
                    continue;
                }
                let Some(link) = links.get(&r.node) else { continue };
                tried.push(r.node);
                match call(link, &read, timeout).await {
                    Outcome::Ok(Reply::Data { written, crcs, data })
                        if check_data(count, &written, &crcs, &data).is_ok() =>
                    {
                        good = Some((r.node, written, crcs, data));
                        break;
                    }
                    Outcome::Ok(_) | Outcome::Corrupt(_) => {
                        warn!(node = %r.node, %start, "no good copy here; trying another replica");
                    }
                    Outcome::Fatal(e) => return Err(e),
                    Outcome::NodeDown(why) | Outcome::Retry(why) | Outcome::Failed(why) => {
                        report.down.push((r.node, why));
                    }
                }
            }
            let Some((source, written, crcs, data)) = good else {
                error!(volume = %t.volume, %start, count, tried = ?tried, "no replica holds a good copy of an intent region");
                continue;
            };
            for r in &set.replicas {
                if r.node == source || is_down(&report, r.node) {
                    continue;
                }
                let Some(link) = links.get(&r.node) else { continue };
                for req in copy_requests(t, start, &written, &crcs, &data, None, true) {
                    match call(link, &req, timeout).await {
                        Outcome::Ok(Reply::Done) => {}
                        Outcome::Fatal(e) => return Err(e),
                        other => {
                            report.down.push((r.node, format!("reconcile write: {other:?}")));
                            break;
                        }
                    }
                }
            }
            report.blocks += piece.count;
        }
    }

    // 3. Clear what each node reported (nodes that failed keep theirs: their replica is replaced anyway).
    for (node, ranges) in per_node {
        if ranges.is_empty() || is_down(&report, node) {
            continue;
        }
        for batch in ranges.chunks(MAX_RANGES) {
            match call(&links[&node], &Request::ClearIntents { target: t, ranges: batch.to_vec() }, timeout).await {
                Outcome::Ok(_) => {}
                Outcome::Fatal(e) => return Err(e),
                other => {
                    report.down.push((node, format!("clear intents: {other:?}")));
                    break;
                }
            }
        }
    }
    Ok(report)
}
