//! A whole storage node in one value: engine, data-plane server, metrics and admin endpoints.
//!
//! `slate-node serve` and `slate-node demo` both start a node through
//! [`RunningNode::start`], so the demo runs exactly what an operator runs. The
//! node stops in a fixed order: stop accepting, let in-flight requests finish
//! and their replies go out, then shut the engine down (which makes
//! everything durable) — so a clean stop never loses an acknowledged write and
//! never leaves a reply unsent.

use crate::config::NodeConfig;
use crate::engine::{Engine, EngineError, EngineHandle, EngineOptions};
use crate::heartbeat::MetaClient;
use crate::metrics::Metrics;
use crate::server::{Server, ServerOptions};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How long to wait for the disk lock: after a crash (kill -9) the kernel may
/// release the dead process's io_uring, and with it the lock, a moment later.
const DISK_LOCK_WAIT: Duration = Duration::from_secs(15);
/// How long a starting node waits for slate-meta to hand it its releases before serving anyway.
const RELEASE_PATIENCE: Duration = Duration::from_secs(20);

/// Opens the engine, waiting for the disk lock of a process that just died.
async fn open_engine(disk: &Path, opts: EngineOptions) -> anyhow::Result<(Engine, EngineHandle)> {
    let deadline = Instant::now() + DISK_LOCK_WAIT;
    loop {
        let (path, o) = (disk.to_owned(), opts.clone());
        let r = tokio::task::spawn_blocking(move || Engine::open(&path, o)).await.context("engine open task")?;
        match r {
            Err(EngineError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tracing::warn!(disk = %disk.display(), "disk is locked (a previous process still releasing it?); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r.with_context(|| format!("opening disk {}", disk.display())),
        }
    }
}

/// A started node.
#[derive(Debug)]
pub struct RunningNode {
    /// Where the data plane listens.
    pub addr: SocketAddr,
    /// Where `/metrics` is served, if configured.
    pub metrics_addr: Option<SocketAddr>,
    engine: Option<Engine>,
    handle: EngineHandle,
    metrics: Arc<Metrics>,
    gens: Arc<crate::session::GenerationTable>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Opens the disk (replaying its journal), applies the config's static
    /// assignments, and starts serving.
    pub async fn start(cfg: &NodeConfig) -> anyhow::Result<Self> {
        Self::start_with(cfg, None).await
    }

    /// Same, and with a link to slate-meta: before serving, releases whatever was
    /// deleted or re-placed while the node was away (see `release.rs`).
    pub async fn start_with(cfg: &NodeConfig, meta: Option<&MetaClient>) -> anyhow::Result<Self> {
        cfg.validate()?;
        let verifying_key = cfg.verifying_key()?;
        let disk = cfg.disks[0].clone();
        let opts = EngineOptions {
            zero_rate_bytes_per_sec: cfg.zero_rate_bytes_per_sec,
            metadata_cache_bytes: cfg.metadata_cache_bytes,
            ..EngineOptions::default()
        };
        let (engine, handle) = open_engine(&disk, opts).await?;
        if handle.node_id() != cfg.node_id {
            anyhow::bail!(
                "disk {} was formatted for {} but the config says {}",
                disk.display(),
                handle.node_id(),
                cfg.node_id
            );
        }
        info!(disk = %disk.display(), node = %cfg.node_id, "engine open");
        for a in &cfg.assignments {
            handle
                .assign_segment(a.volume, a.segment, a.segment_blocks)
                .await
                .with_context(|| format!("assigning {} {} from the config", a.volume, a.segment))?;
        }

        if let Some(m) = meta {
            let releaser = crate::release::Releaser::new(handle.clone());
            crate::heartbeat::release_before_serving(m, &releaser, RELEASE_PATIENCE).await;
        }

        let metrics = Metrics::new(cfg.zero_rate_bytes_per_sec);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let tls = if let Some(files) = &cfg.tls {
            let identity = slate_dataplane::tls::Identity::from_pem_files(&files.cert, &files.key)
                .context("loading the data-plane certificate")?;
            Some(slate_dataplane::tls::server_config(&identity)?)
        } else {
            warn!("the data plane serves plain TCP (insecure_plaintext): capabilities travel in clear");
            None
        };
        // Refused hellos and handshakes go to slate-meta when there is a link to it.
        let security = match meta {
            Some(m) => {
                let (reporter, rx) = slate_dataplane::security::Reporter::channel();
                tasks.push(tokio::spawn(report_security_events(m.clone(), rx, shutdown_rx.clone())));
                reporter
            }
            None => slate_dataplane::security::Reporter::none(),
        };
        let server_opts = ServerOptions {
            security,
            tls,
            node_id: cfg.node_id,
            verifying_key,
            max_inflight_bytes_per_connection: usize::try_from(cfg.max_inflight_bytes_per_connection)
                .context("max_inflight_bytes_per_connection")?,
        };
        let server = Server::bind(cfg.listen, server_opts, handle.clone(), metrics.clone())
            .await
            .with_context(|| format!("binding data plane on {}", cfg.listen))?;
        let addr = server.local_addr()?;
        let gens = server.generations();
        tasks.push(tokio::spawn(server.run(shutdown_rx.clone())));

        let metrics_addr = match cfg.metrics_listen {
            Some(a) => {
                let l = TcpListener::bind(a).await.with_context(|| format!("binding metrics on {a}"))?;
                let bound = l.local_addr()?;
                tasks.push(tokio::spawn(crate::metrics::serve(
                    l,
                    metrics.clone(),
                    handle.clone(),
                    shutdown_rx.clone(),
                )));
                Some(bound)
            }
            None => None,
        };
        if let Some(path) = &cfg.admin_socket {
            let l = crate::admin::bind(path).with_context(|| format!("binding admin socket {}", path.display()))?;
            tasks.push(tokio::spawn(crate::admin::serve(l, path.clone(), handle.clone(), shutdown_rx.clone())));
        }
        info!(%addr, metrics = ?metrics_addr, "storage node serving");
        Ok(Self { addr, metrics_addr, engine: Some(engine), handle, metrics, gens, shutdown, tasks })
    }

    /// The engine, for in-process callers (the demo, tests).
    pub fn engine(&self) -> &EngineHandle {
        &self.handle
    }

    /// Applies generation fences from slate-meta to this node (`fence.rs`).
    pub fn fencer(&self) -> crate::fence::Fencer {
        crate::fence::Fencer::new(Arc::clone(&self.gens), self.handle.clone())
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, finishes in-flight requests, then shuts the engine down.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        if let Some(engine) = self.engine.take() {
            tokio::task::spawn_blocking(move || engine.shutdown()).await.context("engine shutdown task")??;
        }
        info!("storage node stopped");
        Ok(())
    }
}

/// Sends queued security events to slate-meta, one call each, until the node stops.
async fn report_security_events(
    meta: MetaClient,
    mut rx: tokio::sync::mpsc::Receiver<slate_protocol::ops::SecurityEventReport>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => match ev { Some(ev) => ev, None => return },
            () = crate::server::stopping(&mut shutdown) => return,
        };
        let body = serde_json::to_value(&ev).unwrap_or_default();
        tokio::select! {
            r = meta.post("/v1/security-events", Some(&body)) => {
                if let Err(e) = r {
                    warn!(kind = %ev.kind, source = %ev.source, error = %e, "could not report a security event");
                }
            }
            () = crate::server::stopping(&mut shutdown) => return,
        }
    }
}
