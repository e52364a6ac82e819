//! One running metadata node: consensus, the state machine, the HTTPS API and
//! the leader's background duties, started together and stopped together.
//!
//! Leader duties are proposals like any other (so they are ordered, replicated
//! and audited): the one-time bootstrap of the first operator, and the
//! liveness sweep that carries the leader's clock and its in-memory view of
//! heartbeats into the state (`apply` never reads a clock). The sweep is
//! proposed only when a node is overdue (or a segment sits on a down node),
//! so an idle healthy cluster appends nothing. Every node also flushes its
//! aggregated security events (api/guard.rs) as at most one proposal per
//! interval.

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::consensus::{Consensus, ConsensusConfig, PeerTls, Role};
use crate::keys::{EnvRootKeyProvider, FileRootKeyProvider, RootKeyProvider};
use crate::machine::SlateMachine;
use crate::metrics::Metrics;
use crate::state::command::{Command, Credential, Envelope};
use crate::tls;
use anyhow::Context;
use ed25519_dalek::SigningKey;
use slate_secret::Secret;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Reads the capability signing key (hex of the 32-byte seed) into a secret page
/// (left out of core dumps, zeroized on drop).
pub fn load_signing_key(path: &Path) -> anyhow::Result<Secret<SigningKey>> {
    let text = Zeroizing::new(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?);
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), seed.as_mut())
        .map_err(|_| anyhow::anyhow!("{} must hold 64 hex digits", path.display()))?;
    Ok(Secret::new(SigningKey::from_bytes(&seed)))
}

/// The root key provider a config names.
pub fn root_provider(cfg: &Config) -> anyhow::Result<Arc<dyn RootKeyProvider>> {
    match (&cfg.root_key_env, &cfg.root_key_file) {
        (Some(var), _) => Ok(Arc::new(EnvRootKeyProvider::new(var.clone()))),
        (None, Some(path)) => Ok(Arc::new(FileRootKeyProvider::new(path.clone()))),
        (None, None) => anyhow::bail!("no root key configured"),
    }
}

/// Runs a node until `shutdown` resolves, then stops it cleanly.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    crate::fsutil::create_private_dir(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let provider = root_provider(&cfg)?;
    let sm = SlateMachine::open(&cfg.data_dir, provider)?;
    let signing_key = load_signing_key(&cfg.signing_key_file)?;
    let tls_config = tls::server_config(&cfg.tls_cert, &cfg.tls_key)?;
    // `HASH [TOKEN_ID]`: files written before token ids were random hold the hash alone.
    let bootstrap = match &cfg.bootstrap_token_hash_file {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let mut words = text.split_whitespace();
            let hash = words.next().unwrap_or_default().to_string();
            let id = match words.next() {
                Some(w) => Some(w.parse::<u64>().with_context(|| format!("{}: bad token id", p.display()))?),
                None => None,
            };
            Some((hash, id))
        }
        None => None,
    };

    let mut ccfg = ConsensusConfig::new(
        cfg.node_id,
        cfg.raft_addr,
        cfg.peers.iter().map(|p| (p.id, p.raft_addr)).collect(),
        cfg.data_dir.join("raft"),
    );
    ccfg.join = cfg.join;
    ccfg.tick = Duration::from_millis(cfg.raft.tick_ms);
    ccfg.election_ticks = cfg.raft.election_ticks;
    ccfg.heartbeat_ticks = cfg.raft.heartbeat_ticks;
    ccfg.snapshot_every_entries = cfg.raft.snapshot_every_entries;
    ccfg.log_file_bytes = cfg.raft.log_file_bytes;
    ccfg.log_purge_bytes = cfg.raft.log_purge_bytes;
    ccfg.request_timeout = Duration::from_millis(cfg.raft.request_timeout_ms);
    if let Some(ca) = &cfg.ca_cert {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        ccfg.tls = Some(PeerTls::from_pem(&read(ca)?, &read(&cfg.tls_cert)?, &read(&cfg.tls_key)?)?);
    } else {
        tracing::warn!("no ca_cert configured: the Raft peer port is plaintext and unauthenticated");
    }
    let (consensus, handle) = Consensus::start(ccfg, sm).context("starting consensus")?;

    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(ApiState {
        handle: handle.clone(),
        signing_key,
        metrics: Arc::clone(&metrics),
        node_id: cfg.node_id,
        peer_apis: cfg.peers.iter().map(|p| (p.id, p.api_addr)).collect(),
        guard: api::guard::Guard::new(cfg.guard.clone(), metrics),
        liveness: std::sync::Mutex::new(std::collections::HashMap::new()),
        leader_since_ms: std::sync::atomic::AtomicU64::new(0),
    });
    let app = api::router(Arc::clone(&state), cfg.max_body_bytes);
    let server_handle = axum_server::Handle::new();
    let server = axum_server::bind_rustls(cfg.api_addr, axum_server::tls_rustls::RustlsConfig::from_config(tls_config))
        .handle(server_handle.clone())
        .serve(app.into_make_service_with_connect_info::<SocketAddr>());
    let mut server_task = tokio::spawn(server);
    let purge_reports = tokio::spawn(report_purges(Arc::clone(&state)));
    let flushes = tokio::spawn(flush_security_events(Arc::clone(&state)));
    let duties = tokio::spawn(leader_duties(state, bootstrap, Duration::from_millis(cfg.sweep_interval_ms)));
    tracing::info!(node = cfg.node_id, api = %cfg.api_addr, raft = %cfg.raft_addr, "slate-meta serving");

    let result = tokio::select! {
        () = shutdown => Ok(()),
        r = &mut server_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("API server on {}: {e}", cfg.api_addr)),
            Err(e) => Err(anyhow::anyhow!("API server task: {e}")),
        },
    };
    tracing::info!("slate-meta stopping");
    duties.abort();
    purge_reports.abort();
    flushes.abort();
    server_handle.graceful_shutdown(Some(Duration::from_secs(3)));
    let _ = tokio::time::timeout(Duration::from_secs(5), server_task).await;
    consensus.shutdown().await;
    result
}

/// How often the leader pushes running drains along (start moves, finish moves).
const DRAIN_STEP_EVERY: Duration = Duration::from_secs(2);

async fn leader_duties(state: Arc<ApiState>, bootstrap: Option<(String, Option<u64>)>, sweep_every: Duration) {
    let mut last_sweep = Instant::now();
    let mut last_drain = Instant::now();
    let mut leading = false;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if state.handle.status().role != Role::Leader {
            leading = false;
            continue;
        }
        if !leading {
            // Nodes this leader has not heard from yet count as alive from now on: a new
            // leader marks a silent node down one timeout after it took over, never earlier.
            leading = true;
            state.leader_since_ms.store(api::now_ms(), std::sync::atomic::Ordering::Relaxed);
        }
        let Ok((bootstrapped, nodes, drain_due)) =
            state.handle.read(|sm| (sm.state().bootstrapped, sm.state().liveness(), sm.state().drain_due())).await
        else {
            continue;
        };
        let liveness_ms = state.liveness_view(&nodes);
        let now = api::now_ms();
        let Ok(sweep_due) = state.handle.read(move |sm| sm.state().sweep_due_with(now, &liveness_ms)).await else {
            continue;
        };
        if !bootstrapped {
            if let Some(hash) = &bootstrap {
                let (hash, token_id) = hash.clone();
                let cmd = Command::Bootstrap { operator_name: "operator".into(), token_secret_sha256: hash, token_id };
                if let Err(e) = propose_system(&state, cmd).await {
                    tracing::warn!(error = %e, "bootstrap proposal failed; will retry");
                }
            }
            continue;
        }
        if drain_due && last_drain.elapsed() >= DRAIN_STEP_EVERY {
            last_drain = Instant::now();
            if let Err(e) = propose_system(&state, Command::DrainStep).await {
                tracing::warn!(error = %e, "drain step proposal failed");
            }
        }
        if sweep_due && last_sweep.elapsed() >= sweep_every {
            last_sweep = Instant::now();
            let liveness_ms = state.liveness_view(&nodes);
            if let Err(e) = propose_system(&state, Command::Sweep { liveness_ms }).await {
                tracing::warn!(error = %e, "liveness sweep proposal failed");
            }
        }
    }
}

/// Every node's duty: its aggregated security events become audit records, at most one
/// proposal per `event_flush_ms` (and none while nothing happened).
async fn flush_security_events(state: Arc<ApiState>) {
    let every = Duration::from_millis(state.guard.config().event_flush_ms);
    loop {
        tokio::time::sleep(every).await;
        let events = state.guard.drain_events();
        if events.is_empty() {
            continue;
        }
        let cmd = Command::SecurityEvents { events: events.clone() };
        if let Err(e) = propose_system(&state, cmd).await {
            tracing::debug!(error = %e, "security events not recorded yet; will retry");
            state.guard.restore_events(events);
        }
    }
}

/// Every voter's duty: once its Raft log is purged past the last crypto-shred (and its
/// root key file ratcheted, which happens before the purge), say so through the log, so
/// that a deleted volume's erasure can show which voters still hold its wrapped key.
async fn report_purges(state: Arc<ApiState>) {
    let me = state.node_id;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = state.handle.status();
        let voters: Vec<u64> = status.peers.iter().map(|p| p.0).collect();
        if !voters.contains(&me) {
            continue;
        }
        let Ok((bootstrapped, epoch, epoch_index, reported, known_voters)) = state
            .handle
            .read(move |sm| {
                let st = sm.state();
                (
                    st.bootstrapped,
                    st.root_epoch,
                    st.root_epoch_index,
                    st.meta_purged.get(&me).copied(),
                    st.meta_voters.clone(),
                )
            })
            .await
        else {
            continue;
        };
        let purged = status.purged_index >= epoch_index;
        let stale = reported.is_none_or(|r| r < epoch) || known_voters != voters;
        if bootstrapped && purged && stale {
            let cmd = Command::ReportPurge { meta_node: me, root_epoch: epoch, voters };
            if let Err(e) = propose_system(&state, cmd).await {
                tracing::debug!(error = %e, "purge report not accepted yet; will retry");
            }
        }
    }
}

async fn propose_system(state: &ApiState, command: Command) -> anyhow::Result<()> {
    let env = Envelope { time_ms: api::now_ms(), client: "-".into(), credential: Credential::System, command };
    state.handle.propose(serde_json::to_vec(&env)?).await?;
    Ok(())
}
