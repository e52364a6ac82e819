//! `slate attach`: attach a volume through slate-meta and serve it over NBD
//! until SIGTERM or SIGINT.
//!
//! The attach reply carries the segment map, a capability and the volume key.
//! Before any I/O this process tells every replica's node that it holds its
//! segment (`AssignSegment`, idempotent, with the attachment's admin right):
//! the metadata service decides placement, the client carries it to the
//! nodes, so slate-meta stays off the data path. [`MetaControl`] does the same
//! for replacement replicas after a failure report.
//!
//! `slate attach VOL@SNAP --read-only` serves snapshot SNAP of VOL instead of
//! its head: the snapshot is found by name in the volume's snapshot list, must
//! be `ready`, and the volume engine reads every block at its epoch
//! (`VolumeConfig::read_epoch`, `ReadAt` on the wire).

use super::open::{self, layout_from_view, parse_capability, pending_snapshots, segment_from_view};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use slate::api::ApiClient;
use slate::blockdev::BlockDevice;
use slate::nbd::{ExportConfig, ExportRegistry, NbdServer, ServerConfig};
use slate::volume::{
    AttachInfo, ControlError, ControlPlane, ReplicaRole, ReplicaUpdate, SegmentReplicas, Volume, VolumeConfig,
    VolumeLayout, VolumeState,
};
use slate_dataplane::client::NodeClient;
use slate_protocol::api::{
    CapabilityView, DetachRequest, MarkInSyncRequest, RebuildProgressRequest, ReconfigureReply, ReportFailureRequest,
    SnapshotFrozenRequest, VolumeView,
};
use slate_protocol::stages::Side;
use slate_protocol::{Generation, NodeId, Reply, Request, SegmentIndex, SignedCapability, Target, VolumeId};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use zeroize::Zeroizing;

/// Options of `slate attach`.
#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// The volume, by name or id; `VOL@SNAP` serves snapshot SNAP (by name) of
    /// VOL, and needs --read-only.
    pub volume: String,
    /// Take the volume over from a live read-write attachment (fences it).
    #[arg(long)]
    pub force: bool,
    /// Attach read-only (shared).
    #[arg(long)]
    pub read_only: bool,
    /// Serve NBD on this unix socket.
    #[arg(long)]
    pub nbd_unix: Option<PathBuf>,
    /// Serve NBD on this TCP address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    pub nbd_tcp: Option<String>,
    /// The NBD export name (default: the volume's name).
    #[arg(long)]
    pub export_name: Option<String>,
    /// This host's name, recorded with the attachment.
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// Serve NBD on TCP with TLS (NBD STARTTLS) with this certificate chain (PEM)...
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// ...and this private key (PEM)...
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// ...and accept only clients presenting a certificate signed by this CA (PEM): mutual
    /// TLS, required for --nbd-tcp.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve --nbd-tcp without TLS: anyone who reaches the port reads and writes the
    /// decrypted volume. Logged as a warning and recorded in the audit chain.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Serve Prometheus metrics (the data path's per-stage latency histograms) on
    /// this address, e.g. 127.0.0.1:9101: `GET /metrics`.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
}

/// Tells the nodes of `set` that they hold the segment (idempotent).
pub(super) async fn assign(
    data_plane: &slate_dataplane::tls::Connector,
    set: &SegmentReplicas,
    cap: &SignedCapability,
    segment_blocks: u64,
) -> Result<(), ControlError> {
    let target = Target { volume: cap.claims.volume, generation: cap.claims.generation };
    for r in &set.replicas {
        let addr = r.addr.parse().map_err(|e| ControlError(format!("node address {}: {e}", r.addr)))?;
        let client = NodeClient::connect_with(data_plane, addr, cap.clone())
            .await
            .map_err(|e| ControlError(format!("connecting to {} ({}): {e}", r.node, r.addr)))?;
        let req = Request::AssignSegment { target, segment: set.segment, segment_blocks };
        match client.request(req).await {
            Ok(Reply::Done) => {}
            Ok(Reply::Error(e)) => return Err(ControlError(format!("{} refused the assignment: {e}", r.node))),
            Ok(other) => return Err(ControlError(format!("{}: unexpected reply {other:?}", r.node))),
            Err(e) => return Err(ControlError(format!("{}: {e}", r.node))),
        }
    }
    Ok(())
}

/// How long a control-plane call keeps trying the metadata nodes (an
/// election takes seconds; the capability TTL and the write stall timeout are
/// much longer).
pub const CONTROL_PATIENCE: Duration = Duration::from_mins(1);

/// The volume engine's control plane over slate-meta's API. Every call tries
/// every metadata node and rides through an election (see [`ApiClient::patient`]).
#[derive(Debug)]
pub struct MetaControl {
    api: ApiClient,
    /// The same API without the patience, for advisory calls (rebuild progress).
    quick_api: ApiClient,
    volume: u64,
    attachment: u64,
    segment_blocks: u64,
    generation: u64,
    capability: tokio::sync::Mutex<SignedCapability>,
}

impl MetaControl {
    /// The control plane of attachment `attachment` of volume `volume`
    /// (`quick_api`: the same API without patience, for advisory calls).
    pub(super) fn new(
        api: ApiClient,
        quick_api: ApiClient,
        volume: u64,
        attachment: u64,
        layout: &VolumeLayout,
        generation: u64,
        capability: SignedCapability,
    ) -> Self {
        Self {
            api,
            quick_api,
            volume,
            attachment,
            segment_blocks: layout.segment_blocks,
            generation,
            capability: tokio::sync::Mutex::new(capability),
        }
    }
}

#[async_trait::async_trait]
impl ControlPlane for MetaControl {
    async fn report_failed_replica(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
    ) -> Result<ReplicaUpdate, ControlError> {
        let reply: ReconfigureReply = self
            .api
            .post(
                &format!("/v1/volumes/{}/report-failure", volume.0),
                &ReportFailureRequest { segment: segment.0, node: node.0 },
            )
            .await
            .map_err(|e| ControlError(format!("{e:#}")))?;
        let set = segment_from_view(&reply.segment);
        let capability = reply.capability.as_ref().map(|c| parse_capability(&c.token)).transpose()?;
        let cap = match &capability {
            Some(c) => {
                *self.capability.lock().await = c.clone();
                c.clone()
            }
            None => self.capability.lock().await.clone(),
        };
        // The new replica must know it holds the segment before the engine writes to it.
        let fresh = SegmentReplicas {
            segment: set.segment,
            epoch: set.epoch,
            replicas: set.replicas.iter().filter(|r| r.role == ReplicaRole::Rebuilding).cloned().collect(),
        };
        assign(self.api.data_plane(), &fresh, &cap, self.segment_blocks).await?;
        info!(volume = %volume, %segment, failed = %node, new = ?reply.new_node, "replica replaced");
        Ok(ReplicaUpdate { set, capability })
    }

    async fn report_rebuild_progress(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
        done_blocks: u64,
        total_blocks: u64,
    ) -> Result<(), ControlError> {
        // Progress is advisory: one attempt, no patience (the engine ignores failures).
        let body = RebuildProgressRequest { segment: segment.0, node: node.0, done_blocks, total_blocks };
        let _: Value = self
            .quick_api
            .post(&format!("/v1/volumes/{}/rebuild-progress", volume.0), &body)
            .await
            .map_err(|e| ControlError(format!("{e:#}")))?;
        Ok(())
    }

    async fn assign_replicas(
        &self,
        _volume: VolumeId,
        set: &SegmentReplicas,
        capability: &SignedCapability,
    ) -> Result<(), ControlError> {
        assign(self.api.data_plane(), set, capability, self.segment_blocks).await
    }

    async fn report_rebuilt(&self, volume: VolumeId, segment: SegmentIndex, node: NodeId) -> Result<(), ControlError> {
        let _: Value = self
            .api
            .post(
                &format!("/v1/volumes/{}/mark-in-sync", volume.0),
                &MarkInSyncRequest { segment: segment.0, node: node.0 },
            )
            .await
            .map_err(|e| ControlError(format!("{e:#}")))?;
        Ok(())
    }

    async fn renew_capability(
        &self,
        volume: VolumeId,
        generation: Generation,
    ) -> Result<SignedCapability, ControlError> {
        let reply: CapabilityView = self
            .api
            .post(&format!("/v1/volumes/{}/attachments/{}/capability", volume.0, self.attachment), &json!(null))
            .await
            .map_err(|e| ControlError(format!("{e:#}")))?;
        let cap = parse_capability(&reply.token)?;
        if cap.claims.volume != volume || cap.claims.generation != generation {
            return Err(ControlError("slate-meta renewed the capability for another attachment".into()));
        }
        *self.capability.lock().await = cap.clone();
        Ok(cap)
    }

    async fn refresh_layout(&self, volume: VolumeId) -> Result<VolumeLayout, ControlError> {
        Ok(self.refresh_state(volume).await?.layout)
    }

    async fn refresh_state(&self, volume: VolumeId) -> Result<VolumeState, ControlError> {
        let v: VolumeView =
            self.api.get(&format!("/v1/volumes/{}", volume.0)).await.map_err(|e| ControlError(format!("{e:#}")))?;
        let _ = self.volume;
        Ok(VolumeState { layout: layout_from_view(&v, self.generation), pending_snapshots: pending_snapshots(&v) })
    }

    async fn report_snapshot_frozen(&self, volume: VolumeId, snapshot: u64) -> Result<(), ControlError> {
        let _: Value = self
            .api
            .post(&format!("/v1/volumes/{}/snapshots/{snapshot}/frozen", volume.0), &SnapshotFrozenRequest::default())
            .await
            .map_err(|e| ControlError(format!("{e:#}")))?;
        Ok(())
    }
}

/// Opens the volume engine on an attachment made by [`open::attach`]: tells the
/// nodes they hold their segments (read-write), then connects and reconciles.
/// A clone also opens its parent, read-only at the snapshot's epoch, to read through.
/// `quick_api` is used for advisory calls, `api` (patient) for the rest.
pub async fn open_volume(quick_api: &ApiClient, api: &ApiClient, opened: open::Attached) -> Result<Arc<Volume>> {
    let open::Attached { id, snapshot, attachment, generation, layout, capability, dek, parent, .. } = opened;
    if capability.claims.rights.contains(slate_protocol::Rights::WRITE) {
        for s in &layout.segments {
            assign(api.data_plane(), s, &capability, layout.segment_blocks)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let control = Arc::new(MetaControl::new(
        api.clone(),
        quick_api.clone(),
        id,
        attachment,
        &layout,
        generation,
        capability.clone(),
    ));
    // A clone reads its parent's snapshot where it has not written (volume/clone.rs).
    let parent = match parent {
        Some(p) => {
            info!(volume = id, parent = p.id, snapshot = %p.snapshot_name, epoch = %p.epoch, "a clone: reading through its parent");
            Some(super::clone::open_parent(api, id, attachment, p, &dek).await?)
        }
        None => None,
    };
    let vcfg = VolumeConfig { read_epoch: snapshot.map(|s| s.epoch), ..VolumeConfig::default() };
    let mut volume = Volume::attach(AttachInfo { layout, capability, dek }, control, api.data_plane().clone(), vcfg)
        .await
        .context("opening the volume on its storage nodes")?;
    if let Some(p) = parent {
        volume = volume.with_parent(p);
    }
    Ok(Arc::new(volume))
}

/// The TLS configuration of the TCP listener: mutual TLS from `--tls-cert`, `--tls-key`
/// and `--tls-client-ca`; `None` with `--insecure-plaintext`; an error otherwise.
fn tcp_tls_config(args: &AttachArgs) -> Result<Option<Arc<rustls::ServerConfig>>> {
    if args.nbd_tcp.is_none() {
        if args.insecure_plaintext || args.tls_cert.is_some() {
            bail!("--insecure-plaintext and --tls-cert apply to --nbd-tcp only");
        }
        return Ok(None);
    }
    match (&args.tls_cert, &args.tls_key, &args.tls_client_ca, args.insecure_plaintext) {
        (Some(_), _, _, true) => bail!("give either mutual TLS (--tls-*) or --insecure-plaintext, not both"),
        (Some(cert), Some(key), Some(ca), false) => {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let (cert, ca) = (read(cert)?, read(ca)?);
            let key = Zeroizing::new(read(key)?);
            Ok(Some(slate::nbd::tls::server_config_from_pem(&cert, &key, Some(&ca))?))
        }
        (_, _, _, true) => Ok(None),
        (Some(_), _, None, false) => bail!(
            "--nbd-tcp with TLS needs --tls-client-ca too: without client certificates anyone who reaches the \
             port gets the decrypted volume"
        ),
        _ => bail!(
            "--nbd-tcp serves the decrypted volume to the network: give --tls-cert, --tls-key and --tls-client-ca \
             (mutual TLS, as qemu's tls-creds-x509 and libnbd speak it), or --insecure-plaintext to accept the risk"
        ),
    }
}

/// Binds the NBD unix socket with mode 0600 (only this user may connect), and warns
/// if its directory lets other users in.
fn bind_private_socket(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            warn!(dir = %dir.display(), "the NBD socket's directory is open to other users; a 0700 directory keeps them from even seeing it");
        }
    }
    Ok(l)
}

/// Attaches and serves until a signal; detaches on the way out.
pub async fn run(api: ApiClient, args: AttachArgs) -> Result<()> {
    // From here on every call rides through the loss of a metadata node or an election.
    let quick_api = api.clone();
    let api = api.patient(CONTROL_PATIENCE);
    if args.nbd_unix.is_none() && args.nbd_tcp.is_none() {
        bail!("give --nbd-unix PATH and/or --nbd-tcp ADDR to serve the volume");
    }
    let (volume_spec, snapshot) = open::split_snapshot_spec(&args.volume)?;
    if snapshot.is_some() && !args.read_only {
        bail!("{} names a snapshot, which can only be served read-only: add --read-only", args.volume);
    }
    // NBD on TCP reaches the network with the decrypted volume: mutual TLS, or an explicit,
    // audited choice. Checked before anything is attached.
    let tcp_tls = tcp_tls_config(&args)?;
    let insecure = args.nbd_tcp.is_some() && tcp_tls.is_none();
    if insecure {
        warn!(
            addr = args.nbd_tcp.as_deref().unwrap_or(""),
            "--insecure-plaintext: serving the decrypted volume over TCP without TLS; anyone who reaches the port can read and write it"
        );
    }
    let opened = open::attach_opts(&api, volume_spec, snapshot, args.read_only, &args.host, args.force, insecure)
        .await
        .with_context(|| format!("attaching volume {}", args.volume))?;
    let (id, name, attachment, generation) = (opened.id, opened.name.clone(), opened.attachment, opened.generation);
    let snapshot = opened.snapshot.clone().map(|s| (s.name, s.epoch));
    let volume = open_volume(&quick_api, &api, opened).await?;
    info!(volume = id, generation, snapshot = ?snapshot, "attached");

    let registry = ExportRegistry::new();
    let export_name = args.export_name.clone().unwrap_or(match &snapshot {
        Some((snap, _)) => format!("{name}@{snap}"),
        None => name,
    });
    let mut ecfg = ExportConfig::new(export_name.clone());
    ecfg.read_only = args.read_only;
    ecfg.multi_conn = true;
    ecfg.description = match &snapshot {
        Some((snap, epoch)) => format!("slate volume {id} snapshot {snap} ({epoch})"),
        None => format!("slate volume {id}"),
    };
    registry.add(ecfg, Arc::clone(&volume) as Arc<dyn BlockDevice>)?;
    registry.set_default(Some(&export_name));
    // The unix socket is guarded by its mode (0600); TCP by mutual TLS.
    let local = NbdServer::new(Arc::clone(&registry), ServerConfig::default())?;
    let (security, mut events) = slate_dataplane::security::Reporter::channel();
    let reporter = api.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Err(e) = reporter.post::<_, Value>("/v1/security-events", &ev).await {
                warn!(kind = %ev.kind, source = %ev.source, error = %e, "could not report a security event");
            }
        }
    });
    let remote = NbdServer::new(registry, ServerConfig { tls: tcp_tls, security, ..ServerConfig::default() })?;
    let mut tasks = Vec::new();
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    if let Some(addr) = args.metrics {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
        let render = || slate_dataplane::metrics::with_stages("# EOF\n".to_owned(), Side::Client, "slate_client");
        tokio::spawn(slate_dataplane::metrics::serve_text(l, Arc::new(render), metrics_stopped));
    }
    if let Some(path) = &args.nbd_unix {
        let l = bind_private_socket(path)?;
        let s = local.clone();
        tasks.push(tokio::spawn(async move { s.serve_unix(l).await }));
        println!("serving {export_name} on nbd+unix:///{export_name}?socket={}", path.display());
    }
    if let Some(addr) = &args.nbd_tcp {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let s = remote.clone();
        tasks.push(tokio::spawn(async move { s.serve_tcp(l).await }));
        let scheme = if insecure { "nbd" } else { "nbds" };
        println!("serving {export_name} on {scheme}://{addr}/{export_name}");
    }
    shutdown_signal().await;
    info!("stopping: finishing in-flight requests");
    local.shutdown().await;
    remote.shutdown().await;
    let _ = stop_metrics.send(true);
    for t in tasks {
        t.abort();
    }
    if let Err(e) = volume.flush_all().await {
        warn!(error = %e, "final flush failed");
    }
    volume.close().await;
    if let Some(path) = &args.nbd_unix {
        let _ = std::fs::remove_file(path);
    }
    if let Err(e) = api.post::<_, Value>(&format!("/v1/volumes/{id}/detach"), &DetachRequest { attachment }).await {
        warn!(error = %format!("{e:#}"), "detach failed (a later attach may need --force)");
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
