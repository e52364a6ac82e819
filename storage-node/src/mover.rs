//! The drain mover: copies a segment replica from a source node onto this node
//! for a volume no client holds read-write (see `CopyTask`).
//!
//! slate-meta adds this node to the segment as a rebuilding replica and hands it
//! a [`CopyTask`] with a capability (read, write and admin on the volume at the
//! task's generation, valid on the source and on this node). The mover reads the
//! segment's head from the source in runs of up to 4 MiB (ciphertext, stored
//! crcs and written bits) and writes only the written blocks, with the same
//! crcs, to ITS OWN data-plane server: so the server's generation fencing applies
//! to the mover like to any client. A client that attaches the volume meanwhile
//! raises the generation, the node refuses the mover's next write, the mover
//! reports `Failed`, and the client's own rebuild takes over.
//!
//! A copy is idempotent: one killed with the node starts again from the first
//! block when the task is offered again. If this node already held the segment
//! (an earlier attempt), blocks written here but unwritten on the source are
//! trimmed, so the result is the source's head whatever happened before.
//!
//! Limits: the source's snapshot layers are not copied (the data plane has no
//! read of a past epoch), only the head as clients see it; a block corrupt on
//! the source fails the copy (the source's scrub repairs it, then a retry works).

use crate::engine::EngineHandle;
use crate::heartbeat::MetaClient;
use crate::metrics::{Metrics, ResultLabels};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use slate_protocol::message::{bit, BlockRange, MAX_IO_BLOCKS};
use slate_protocol::ops::{CopyTask, MoveReport};
use slate_protocol::{
    BlockIndex, Generation, NodeId, Reply, Request, SegmentIndex, SignedCapability, Target, VolumeId,
    BLOCK_SIZE_BYTES_U64,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

use slate_dataplane::client::{check_data, NodeClient};

/// How often a running copy reports its progress.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// A copy that failed is not started again for this long, even if offered again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Runs copy tasks, at most one at a time per move id.
#[derive(Clone, Debug)]
pub struct Mover {
    engine: EngineHandle,
    node: NodeId,
    /// This node's own data-plane address (the copy writes through it, so that the
    /// server's generation fencing applies to the mover like to any client).
    self_addr: SocketAddr,
    /// Copy rate limit, bytes per second (0: unlimited).
    rate_bytes_per_sec: u64,
    metrics: Option<Arc<Metrics>>,
    /// How copies reach the source node and this one (TLS as this node).
    connector: slate_dataplane::tls::Connector,
    tasks: Arc<Mutex<HashMap<u64, TaskState>>>,
}

#[derive(Clone, Copy, Debug)]
enum TaskState {
    Running,
    /// Reported `Copied` and accepted: never run again while slate-meta still lists it.
    Done,
    /// Failed at this time: retried once `RETRY_AFTER` has passed.
    Failed(Instant),
}

impl Mover {
    pub fn new(engine: EngineHandle, node: NodeId, self_addr: SocketAddr, rate_bytes_per_sec: u64) -> Self {
        let connector = slate_dataplane::tls::Connector::plaintext();
        Self { engine, node, self_addr, rate_bytes_per_sec, metrics: None, connector, tasks: Arc::default() }
    }

    /// Dials nodes through `connector` (a node with TLS: as itself).
    #[must_use]
    pub fn with_connector(mut self, connector: slate_dataplane::tls::Connector) -> Self {
        self.connector = connector;
        self
    }

    /// Counts copies and copied blocks in the node's metrics.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Starts the copies of `tasks` that are not running yet. Returns at once.
    pub fn offer(&self, meta: &MetaClient, tasks: &[CopyTask]) {
        let mut state = self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget what slate-meta no longer lists (a running copy keeps its entry).
        state.retain(|id, s| matches!(s, TaskState::Running) || tasks.iter().any(|t| t.id == *id));
        for t in tasks {
            let start = match state.get(&t.id) {
                None => true,
                Some(TaskState::Running | TaskState::Done) => false,
                Some(TaskState::Failed(at)) => at.elapsed() >= RETRY_AFTER,
            };
            if !start {
                continue;
            }
            state.insert(t.id, TaskState::Running);
            let (me, meta, task) = (self.clone(), meta.clone(), t.clone());
            tokio::spawn(async move {
                let end = me.run(&meta, &task).await;
                me.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(task.id, end);
            });
        }
    }

    /// One task: copy with progress reports, then the final report.
    async fn run(&self, meta: &MetaClient, task: &CopyTask) -> TaskState {
        let path = format!("/v1/nodes/{}/moves/{}", meta.node().0, task.id);
        info!(
            node = %self.node,
            id = task.id,
            volume = task.volume,
            segment = task.segment,
            source = task.source_node,
            blocks = task.blocks,
            "drain copy starting"
        );
        let (tx, mut rx) = watch::channel((0u64, task.blocks));
        let copy = self.copy(task, move |done, total| {
            let _ = tx.send((done, total));
        });
        tokio::pin!(copy);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                r = &mut copy => break r,
                _ = tick.tick() => {
                    if rx.has_changed().unwrap_or(false) {
                        let (done_blocks, total_blocks) = *rx.borrow_and_update();
                        let report = MoveReport::Progress { done_blocks, total_blocks };
                        if let Err(e) = post(meta, &path, &report).await {
                            tracing::debug!(id = task.id, error = %format!("{e:#}"), "progress report failed");
                        }
                    }
                }
            }
        };
        let (report, end) = match result {
            Ok(blocks_copied) => {
                info!(id = task.id, blocks_copied, "drain copy done");
                self.count("copied");
                (MoveReport::Copied { blocks_copied, generation: task.generation }, TaskState::Done)
            }
            Err(e) => {
                let message: String = format!("{e:#}").chars().take(400).collect();
                warn!(id = task.id, error = %message, "drain copy failed");
                self.count("failed");
                (MoveReport::Failed { message }, TaskState::Failed(Instant::now()))
            }
        };
        // The final report matters: retry it a few times before giving up (the task is
        // then offered again and the copy, being idempotent, simply runs again).
        for attempt in 0..5u32 {
            match post(meta, &path, &report).await {
                Ok(()) => return end,
                Err(e) if e.downcast_ref::<crate::heartbeat::Refused>().is_some() => {
                    warn!(id = task.id, error = %format!("{e:#}"), "slate-meta refused the move report");
                    return TaskState::Failed(Instant::now());
                }
                Err(e) => {
                    tracing::debug!(id = task.id, attempt, error = %format!("{e:#}"), "move report failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        TaskState::Failed(Instant::now())
    }

    fn count(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.mover_copies.get_or_create(&ResultLabels { result }).inc();
        }
    }

    /// Copies the task's segment from its source onto this node through this node's own
    /// data-plane server; `progress(done_blocks, total_blocks)` after every run. Returns
    /// the number of blocks written here. Refused (an error) when the task's generation
    /// is older than one this node has seen for the volume, or when it goes stale meanwhile.
    pub async fn copy(&self, task: &CopyTask, mut progress: impl FnMut(u64, u64)) -> Result<u64> {
        let volume = VolumeId(task.volume);
        let segment = SegmentIndex(task.segment);
        let cap = SignedCapability::from_token(&task.capability).map_err(|e| anyhow!("the task's capability: {e}"))?;
        if cap.claims.volume != volume || cap.claims.generation != Generation(task.generation) {
            bail!(
                "the capability is for {} {} but the task for {volume} {}",
                cap.claims.volume,
                cap.claims.generation,
                Generation(task.generation)
            );
        }
        let seg_start = u64::from(task.segment).checked_mul(task.segment_blocks);
        if task.segment_blocks == 0
            || task.blocks == 0
            || task.blocks > task.segment_blocks
            || seg_start != Some(task.first_block)
            || task.first_block.checked_add(task.blocks).is_none()
        {
            bail!(
                "bad copy geometry: segment {} of {} blocks, blocks {}..+{}",
                task.segment,
                task.segment_blocks,
                task.first_block,
                task.blocks
            );
        }
        let source = resolve(&task.source_addr).await?;
        let held_before = self.engine.segments().iter().any(|(v, s, _)| *v == volume && *s == segment);

        let src = NodeClient::connect_with(&self.connector, source, cap.clone())
            .await
            .with_context(|| format!("opening a session on the source node {}", task.source_node))?;
        let dst = NodeClient::connect_with(&self.connector, self.self_addr, cap)
            .await
            .context("opening a session on this node")?;
        let target = Target { volume, generation: Generation(task.generation) };
        dst.request(Request::AssignSegment { target, segment, segment_blocks: task.segment_blocks })
            .await
            .context("assigning the segment here")?;

        let end = task.first_block + task.blocks;
        let read_at = |start: u64| {
            let count = u32::try_from((end - start).min(u64::from(MAX_IO_BLOCKS))).unwrap_or(MAX_IO_BLOCKS);
            (count, src.start(&Request::Read { target, start: BlockIndex(start), count }))
        };
        let mut pacer = Pacer::new(self.rate_bytes_per_sec);
        let mut copied = 0u64;
        let mut at = task.first_block;
        let mut next = Some(read_at(at));
        while let Some((count, pending)) = next.take() {
            let reply = pending.await.with_context(|| format!("reading {volume} at {at} from the source"))?;
            let after = at + u64::from(count);
            // Keep the next read in flight while this run is written.
            if after < end {
                next = Some(read_at(after));
            }
            let (written, crcs, data) = match reply {
                Reply::Data { written, crcs, data } => (written, crcs, data),
                Reply::Error(e) => bail!("the source refused the read at {}: {e}", BlockIndex(at)),
                other => bail!("unexpected read reply from the source: {other:?}"),
            };
            check_data(BlockIndex(at), count, &written, &crcs, &data)?;
            let n = copy_run(&dst, target, at, count, &written, &crcs, &data, held_before).await?;
            copied += n;
            if let Some(m) = &self.metrics {
                m.mover_blocks_copied.inc_by(n);
            }
            at = after;
            progress(at - task.first_block, task.blocks);
            pacer.pay(n * BLOCK_SIZE_BYTES_U64 + 4096).await;
        }
        dst.flush().await.context("flushing the copy")?;
        Ok(copied)
    }
}

/// Writes the written blocks of one read run to `dst` (and, if the segment was held
/// here before, trims blocks written here that the source does not have). Returns the
/// number of blocks written.
#[allow(clippy::too_many_arguments)]
async fn copy_run(
    dst: &NodeClient,
    target: Target,
    start: u64,
    count: u32,
    written: &[u8],
    crcs: &[u32],
    data: &Bytes,
    held_before: bool,
) -> Result<u64> {
    let n = count as usize;
    let bs = BLOCK_SIZE_BYTES_U64 as usize;
    let mut writes = Vec::new();
    let mut holes = Vec::new();
    let mut i = 0usize;
    while i < n {
        let w = bit(written, i);
        let mut j = i + 1;
        while j < n && bit(written, j) == w {
            j += 1;
        }
        if w {
            let req = Request::Write {
                target,
                start: BlockIndex(start + i as u64),
                fua: false,
                crcs: crcs[i..j].to_vec(),
                data: data.slice(i * bs..j * bs),
            };
            writes.push(dst.start(&req));
        } else {
            holes.push((i, j));
        }
        i = j;
    }
    for w in writes {
        match w.await? {
            Reply::Done => {}
            Reply::Error(e) => bail!("this node refused the copy's write: {e}"),
            other => bail!("unexpected write reply: {other:?}"),
        }
    }
    let blocks = (0..n).filter(|i| bit(written, *i)).count() as u64;
    if held_before && !holes.is_empty() {
        let range = BlockRange { start: BlockIndex(start), count: u64::from(count) };
        let here = match dst.request(Request::Allocated { target, range }).await? {
            Reply::Bitmap(b) => b,
            other => bail!("unexpected allocated reply: {other:?}"),
        };
        for (i, j) in holes {
            if (i..j).any(|k| bit(&here, k)) {
                let range = BlockRange { start: BlockIndex(start + i as u64), count: (j - i) as u64 };
                dst.request(Request::Trim { target, range }).await.context("trimming a block the source lacks")?;
            }
        }
    }
    Ok(blocks)
}

async fn post(meta: &MetaClient, path: &str, report: &MoveReport) -> Result<()> {
    meta.post(path, Some(&serde_json::to_value(report)?)).await.map(drop)
}

/// Resolves `host:port` (or an IP address and port).
pub(crate) async fn resolve(addr: &str) -> Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

/// Paces work to a byte rate: each payment pushes the next allowed time forward by
/// `bytes / rate`; a caller that fell behind gets at most one second of burst.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: u64,
    next: tokio::time::Instant,
}

impl Pacer {
    /// `rate` bytes per second; 0: unlimited.
    pub(crate) fn new(rate: u64) -> Self {
        Self { rate, next: tokio::time::Instant::now() }
    }

    /// Accounts `bytes` of work and sleeps until the rate allows more.
    pub(crate) async fn pay(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        self.next = self.next.max(floor) + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
    }
}
