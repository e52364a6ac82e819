//! The scrubber: reads every written block, checks its crc32c, and repairs a
//! mismatch from a peer replica; in the background, rate-limited, and at once
//! when an operator asks (`slate scrub NODE`).
//!
//! One worker task per node runs every pass, so at most one pass reads the disk
//! at a time. A pass walks the segments the engine holds in (volume, segment)
//! order with [`EngineHandle::scrub`] (one engine step of at most
//! [`STEP_BLOCKS`] blocks at a time, so tenant I/O waits at most one step). For
//! each corrupt block of a segment's head it asks slate-meta where the segment's
//! in-sync peers are (`POST /v1/nodes/{node}/repair-source`, once per segment and
//! pass), reads the block from a peer, accepts the copy only if it hashes to the
//! crc stored here (what was written here), and rewrites it with
//! [`EngineHandle::repair_block`], which writes only if the block is still the
//! same corrupt one. Corrupt blocks of snapshot layers are counted as unrepaired:
//! the data plane has no read of a past epoch.
//!
//! * **Background passes** run at `scrub_rate_bytes_per_sec` (0: none), one after
//!   another with [`BACKGROUND_PAUSE`] between the end of one and the start of the next.
//! * **Requested passes** (`ScrubRequest { id }`, ids increase) run once per new id,
//!   at once and at least at [`REQUESTED_MIN_RATE`]; a background pass in progress
//!   pauses for it. A finished requested pass counts as a background pass too.
//! * **Reports**: [`ScrubReport`] to `POST /v1/nodes/{node}/scrub-report` every
//!   [`REPORT_INTERVAL`] while a pass runs and once at its end (`running: false`).
//! * **Resume**: the pass's position (volume, segment, cursor) and counts are
//!   saved to `scrub.json` beside the node's config every report and when a pass
//!   pauses or ends, with the last requested id done; after a restart an
//!   interrupted pass continues where it was and a request already done is not run again.

use crate::engine::{CorruptBlock, EngineError, EngineHandle, HEAD_EPOCH};
use crate::heartbeat::MetaClient;
use crate::metrics::Metrics;
use crate::mover::Pacer;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use slate_protocol::ops::{RepairSource, RepairSourceRequest, ScrubReport, ScrubRequest};
use slate_protocol::{
    Generation, NodeId, Reply, Request, SegmentIndex, SignedCapability, Target, VolumeId, BLOCK_SIZE_BYTES_U64,
};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use slate_dataplane::client::NodeClient;

/// Name of the resume file in the node's configuration directory.
pub const STATE_FILE: &str = "scrub.json";
/// Blocks one engine scrub step reads at most.
pub const STEP_BLOCKS: u32 = 256;
/// How often a running pass reports (and saves its position).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// Quiet time between the end of one background pass and the start of the next.
pub const BACKGROUND_PAUSE: Duration = Duration::from_hours(1);
/// A requested pass runs at least this fast (bytes per second).
pub const REQUESTED_MIN_RATE: u64 = 256 << 20;

/// The resume file's path for a node configured by `config`.
pub fn state_path(config: &Path) -> PathBuf {
    config.parent().unwrap_or_else(|| Path::new(".")).join(STATE_FILE)
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the scrubber finds good copies and sends its reports: slate-meta in a
/// cluster ([`MetaClient`]), a stub in tests.
pub trait ScrubLink: Send + Sync + 'static {
    /// The in-sync peers of a segment and a read capability for them.
    fn repair_source(&self, volume: u64, segment: u32) -> BoxFuture<'_, Result<RepairSource>>;
    /// Records a pass's progress or result.
    fn report<'a>(&'a self, report: &'a ScrubReport) -> BoxFuture<'a, Result<()>>;
}

impl ScrubLink for MetaClient {
    fn repair_source(&self, volume: u64, segment: u32) -> BoxFuture<'_, Result<RepairSource>> {
        Box::pin(async move {
            let body = serde_json::to_value(RepairSourceRequest { volume, segment })?;
            let v = self.post(&format!("/v1/nodes/{}/repair-source", self.node().0), Some(&body)).await?;
            serde_json::from_value(v).context("unexpected repair-source reply")
        })
    }

    fn report<'a>(&'a self, report: &'a ScrubReport) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let body = serde_json::to_value(report)?;
            self.post(&format!("/v1/nodes/{}/scrub-report", self.node().0), Some(&body)).await.map(drop)
        })
    }
}

/// How a scrubber runs.
#[derive(Clone, Debug, Default)]
pub struct ScrubOptions {
    /// Background pass rate, bytes per second; 0: no background passes.
    pub rate_bytes_per_sec: u64,
    /// The resume file (see [`state_path`]); `None`: a restart starts over.
    pub state_path: Option<PathBuf>,
    /// Counters for blocks checked, corrupt found, repaired.
    pub metrics: Option<Arc<Metrics>>,
    /// How repair reads reach peer nodes (TLS as this node).
    pub connector: slate_dataplane::tls::Connector,
}

/// A pass's position and counts (what the resume file keeps).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassState {
    pub scrub_id: u64,
    pub started_ms: u64,
    pub segments_done: u64,
    pub segments_total: u64,
    pub blocks_checked: u64,
    pub corrupt_found: u64,
    pub repaired: u64,
    pub unrepaired: u64,
    /// The next position to scrub: segments before (volume, segment) are done; that
    /// segment continues at `cursor` (an engine scrub cursor).
    pub volume: u64,
    pub segment: u64,
    pub cursor: u64,
}

impl PassState {
    fn new(scrub_id: u64) -> Self {
        Self { scrub_id, started_ms: now_ms(), ..Self::default() }
    }

    fn report(&self, running: bool) -> ScrubReport {
        ScrubReport {
            scrub_id: self.scrub_id,
            running,
            started_ms: self.started_ms,
            finished_ms: (!running).then(now_ms),
            segments_done: self.segments_done,
            segments_total: self.segments_total,
            blocks_checked: self.blocks_checked,
            corrupt_found: self.corrupt_found,
            repaired: self.repaired,
            unrepaired: self.unrepaired,
        }
    }
}

/// The resume file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Persisted {
    /// The last requested pass that finished.
    last_request: u64,
    /// When the last background (or requested) pass finished, Unix ms.
    background_finished_ms: u64,
    background: Option<PassState>,
    request: Option<PassState>,
}

/// Runs scrub passes.
#[derive(Clone)]
pub struct Scrubber {
    inner: Arc<Inner>,
}

struct Inner {
    engine: EngineHandle,
    node: NodeId,
    link: Arc<dyn ScrubLink>,
    opts: ScrubOptions,
    requested: watch::Sender<u64>,
    started: AtomicBool,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("node", &self.inner.node)
            .field("rate_bytes_per_sec", &self.inner.opts.rate_bytes_per_sec)
            .field("state_path", &self.inner.opts.state_path)
            .finish_non_exhaustive()
    }
}

/// How a pass ended.
enum PassEnd {
    Finished,
    /// A new request arrived; the position is saved.
    Paused,
    /// The engine is gone: the worker stops.
    Stopped,
}

impl Scrubber {
    /// A scrubber that asks slate-meta for repair sources and reports to it.
    pub fn new(engine: EngineHandle, node: NodeId, meta: MetaClient, opts: ScrubOptions) -> Self {
        Self::with_link(engine, node, Arc::new(meta), opts)
    }

    /// A scrubber with any [`ScrubLink`].
    pub fn with_link(engine: EngineHandle, node: NodeId, link: Arc<dyn ScrubLink>, opts: ScrubOptions) -> Self {
        let (requested, _) = watch::channel(0);
        Self { inner: Arc::new(Inner { engine, node, link, opts, requested, started: AtomicBool::new(false) }) }
    }

    /// Notes an operator request (a pass starts at once if its id is new) and starts the
    /// worker (with the background passes) on the first call. Returns at once.
    pub fn offer(&self, req: Option<&ScrubRequest>) {
        if let Some(r) = req {
            self.inner.requested.send_if_modified(|cur| {
                let new = r.id > *cur;
                if new {
                    *cur = r.id;
                }
                new
            });
        }
        if !self.inner.started.swap(true, Ordering::SeqCst) {
            let inner = self.inner.clone();
            tokio::spawn(async move { inner.worker().await });
        }
    }

    /// Runs one whole pass now, in the caller's task (no resume file, no rate limit,
    /// reports sent as usual); returns its final report.
    pub async fn scrub_now(&self, scrub_id: u64) -> Result<ScrubReport> {
        let mut p = PassState::new(scrub_id);
        match self.inner.pass(&mut p, 0, None, &mut |_| {}).await {
            PassEnd::Finished | PassEnd::Paused => Ok(p.report(false)),
            PassEnd::Stopped => Err(anyhow!("the engine stopped during the scrub")),
        }
    }
}

impl Inner {
    async fn worker(self: Arc<Self>) {
        let mut st = match &self.opts.state_path {
            Some(p) => load(p).unwrap_or_else(|e| {
                warn!(error = %format!("{e:#}"), "scrub resume file unreadable; starting over");
                Persisted::default()
            }),
            None => Persisted::default(),
        };
        let mut rx = self.requested.subscribe();
        let requested_rate = self.opts.rate_bytes_per_sec.max(REQUESTED_MIN_RATE);
        loop {
            let want = *rx.borrow_and_update();
            if want > st.last_request {
                let mut p = st.request.take().filter(|p| p.scrub_id == want).unwrap_or_else(|| PassState::new(want));
                info!(scrub = want, resumed = p.cursor > 0 || p.segment > 0, "scrub pass requested");
                let end = {
                    let mut save = |p: &PassState| {
                        st.request = Some(p.clone());
                        self.save(&st);
                    };
                    self.pass(&mut p, requested_rate, None, &mut save).await
                };
                match end {
                    PassEnd::Stopped => return,
                    PassEnd::Finished | PassEnd::Paused => {
                        st.last_request = want;
                        st.request = None;
                        // A whole pass just happened: the background one can start over later.
                        st.background = None;
                        st.background_finished_ms = now_ms();
                        self.save(&st);
                    }
                }
                continue;
            }
            let rate = self.opts.rate_bytes_per_sec;
            if rate == 0 {
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let due_ms = st.background_finished_ms.saturating_add(BACKGROUND_PAUSE.as_millis() as u64);
            if st.background.is_none() && now_ms() < due_ms {
                let wait = Duration::from_millis(due_ms - now_ms()).min(BACKGROUND_PAUSE);
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let mut p = st.background.take().unwrap_or_else(|| PassState::new(0));
            let end = {
                let mut save = |p: &PassState| {
                    st.background = Some(p.clone());
                    self.save(&st);
                };
                self.pass(&mut p, rate, Some(&mut rx), &mut save).await
            };
            match end {
                PassEnd::Stopped => return,
                PassEnd::Paused => st.background = Some(p),
                PassEnd::Finished => {
                    st.background = None;
                    st.background_finished_ms = now_ms();
                }
            }
            self.save(&st);
        }
    }

    fn save(&self, st: &Persisted) {
        if let Some(p) = &self.opts.state_path {
            if let Err(e) = save(p, st) {
                warn!(error = %format!("{e:#}"), path = %p.display(), "saving the scrub position failed");
            }
        }
    }

    async fn report(&self, p: &PassState, running: bool) {
        if let Err(e) = self.link.report(&p.report(running)).await {
            debug!(error = %format!("{e:#}"), "scrub report failed");
        }
    }

    /// Runs (or continues) the pass `p`; `interrupt` pauses it when a new request comes in.
    async fn pass(
        &self,
        p: &mut PassState,
        rate: u64,
        mut interrupt: Option<&mut watch::Receiver<u64>>,
        save: &mut (dyn FnMut(&PassState) + Send),
    ) -> PassEnd {
        let mut segments = self.engine.segments();
        segments.sort_by_key(|(v, s, _)| (v.0, s.0));
        p.segments_total = segments.len() as u64;
        let mut pacer = Pacer::new(rate);
        let mut last_report = Instant::now();
        self.report(p, true).await;
        for (volume, segment, _) in segments {
            let here = (volume.0, u64::from(segment.0));
            match here.cmp(&(p.volume, p.segment)) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Greater => (p.volume, p.segment, p.cursor) = (here.0, here.1, 0),
                std::cmp::Ordering::Equal => {}
            }
            let mut source = Source::Unknown;
            loop {
                if interrupt.as_mut().is_some_and(|rx| rx.has_changed().unwrap_or(false)) {
                    save(p);
                    return PassEnd::Paused;
                }
                let chunk = match self.engine.scrub(volume, segment, p.cursor, STEP_BLOCKS).await {
                    Ok(c) => c,
                    Err(EngineError::NotAssigned) => break,
                    Err(EngineError::ShuttingDown | EngineError::Failed(_)) => return PassEnd::Stopped,
                    Err(e) => {
                        warn!(%volume, %segment, error = %e, "scrub step failed; skipping the segment");
                        break;
                    }
                };
                p.blocks_checked += chunk.blocks_checked;
                if let Some(m) = &self.opts.metrics {
                    m.scrub_blocks_checked.inc_by(chunk.blocks_checked);
                }
                for c in &chunk.corrupt {
                    p.corrupt_found += 1;
                    let repaired = self.repair(volume, segment, c, &mut source).await;
                    if repaired {
                        p.repaired += 1;
                    } else {
                        p.unrepaired += 1;
                    }
                    if let Some(m) = &self.opts.metrics {
                        m.scrub_corrupt_found.inc();
                        if repaired { &m.scrub_repaired } else { &m.scrub_unrepaired }.inc();
                    }
                }
                match chunk.next_cursor {
                    Some(c) => p.cursor = c,
                    None => break,
                }
                if last_report.elapsed() >= REPORT_INTERVAL {
                    last_report = Instant::now();
                    save(p);
                    self.report(p, true).await;
                }
                pacer.pay(chunk.blocks_checked * BLOCK_SIZE_BYTES_U64 + 4096).await;
            }
            p.segments_done += 1;
            (p.segment, p.cursor) = (p.segment + 1, 0);
        }
        p.segments_done = p.segments_done.min(p.segments_total);
        if let Some(m) = &self.opts.metrics {
            m.scrub_passes.inc();
        }
        info!(
            scrub = p.scrub_id,
            blocks_checked = p.blocks_checked,
            corrupt_found = p.corrupt_found,
            repaired = p.repaired,
            unrepaired = p.unrepaired,
            "scrub pass finished"
        );
        save(p);
        self.report(p, false).await;
        PassEnd::Finished
    }

    /// Repairs one corrupt block from a peer; true if it is good now.
    async fn repair(&self, volume: VolumeId, segment: SegmentIndex, c: &CorruptBlock, source: &mut Source) -> bool {
        warn!(%volume, %segment, block = %c.block, epoch = %c.epoch, "scrub found a corrupt block");
        if c.epoch != HEAD_EPOCH {
            // The data plane cannot read a peer's snapshot layer.
            return false;
        }
        if matches!(source, Source::Unknown) {
            let found = match self.link.repair_source(volume.0, segment.0).await {
                Ok(src) => Peers::new(src).await,
                Err(e) => Err(e),
            };
            *source = match found {
                Ok(p) => Source::Found(Box::new(p)),
                Err(e) => {
                    warn!(%volume, %segment, error = %format!("{e:#}"), "no repair source for the segment");
                    Source::Missing
                }
            };
        }
        let Source::Found(peers) = source else { return false };
        let target = Target { volume, generation: peers.generation };
        for (addr, client) in &mut peers.replicas {
            if client.is_none() {
                match NodeClient::connect_with(&self.opts.connector, *addr, peers.capability.clone()).await {
                    Ok(c) => *client = Some(c),
                    Err(e) => {
                        debug!(%addr, error = %e, "repair peer unreachable");
                        continue;
                    }
                }
            }
            let Some(cl) = client.as_ref() else { continue };
            let data = match cl.request(Request::Read { target, start: c.block, count: 1 }).await {
                Ok(Reply::Data { written, crcs, data }) => {
                    let good = slate_protocol::message::bit(&written, 0)
                        && crcs.first() == Some(&c.stored_crc)
                        && data.len() == BLOCK_SIZE_BYTES_U64 as usize
                        && crc32c::crc32c(&data) == c.stored_crc;
                    if !good {
                        debug!(%addr, block = %c.block, "the peer's copy differs from what was written here");
                        continue;
                    }
                    data
                }
                Ok(other) => {
                    debug!(%addr, reply = ?other, "unexpected repair read reply");
                    continue;
                }
                Err(e) => {
                    debug!(%addr, block = %c.block, error = %e, "repair read failed");
                    continue;
                }
            };
            match self.engine.repair_block(volume, HEAD_EPOCH, c.block, c.stored_crc, data, c.stored_crc).await {
                Ok(wrote) => {
                    info!(%volume, block = %c.block, from = %addr, wrote, "corrupt block repaired");
                    return true;
                }
                Err(e) => {
                    warn!(%volume, block = %c.block, error = %e, "repair write failed");
                    return false;
                }
            }
        }
        false
    }
}

/// A segment's repair source as far as this pass knows it.
enum Source {
    /// Not asked yet.
    Unknown,
    /// Asked, and none is available this pass.
    Missing,
    Found(Box<Peers>),
}

/// A segment's repair source, with sessions opened on demand.
struct Peers {
    generation: Generation,
    capability: SignedCapability,
    replicas: Vec<(SocketAddr, Option<NodeClient>)>,
}

impl Peers {
    async fn new(src: RepairSource) -> Result<Self> {
        if src.peers.is_empty() {
            return Err(anyhow!("the segment has no in-sync peer"));
        }
        let capability =
            SignedCapability::from_token(&src.capability).map_err(|e| anyhow!("the repair capability: {e}"))?;
        let mut replicas = Vec::new();
        for p in &src.peers {
            match crate::mover::resolve(&p.addr).await {
                Ok(a) => replicas.push((a, None)),
                Err(e) => debug!(addr = %p.addr, error = %format!("{e:#}"), "repair peer address does not resolve"),
            }
        }
        Ok(Self { generation: Generation(src.generation), capability, replicas })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn load(path: &Path) -> Result<Persisted> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is unreadable", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Persisted::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save(path: &Path, st: &Persisted) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(st)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert_eq!(load(&path).unwrap(), Persisted::default());
        let st = Persisted {
            last_request: 3,
            background_finished_ms: 7,
            background: Some(PassState { scrub_id: 0, volume: 2, segment: 1, cursor: 99, ..PassState::default() }),
            request: None,
        };
        save(&path, &st).unwrap();
        assert_eq!(load(&path).unwrap(), st);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).is_err());
    }
}
