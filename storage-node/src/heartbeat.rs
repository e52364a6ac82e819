//! The node's link to the metadata service: a periodic heartbeat, so that
//! slate-meta can tell a live node from a dead one (a node silent longer than
//! the service's timeout is marked down and its replicas are re-placed), and
//! whose reply carries the node's work: its share of the release queue (see
//! `release.rs`).
//!
//! Every call goes to the first metadata replica that answers; followers
//! forward writes to the leader. Failures are logged (rate-limited by the
//! interval) and never stop the node: the data plane does not depend on it.

use crate::config::MetaLink;
use crate::release::Releaser;
use crate::work::Dispatcher;
use anyhow::{anyhow, Context, Result};
use slate_protocol::ops::HeartbeatReply;
use slate_protocol::NodeId;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the node says it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// An HTTPS/JSON client for the metadata replicas, as the node's own principal.
#[derive(Clone)]
pub struct MetaClient {
    http: reqwest::Client,
    apis: Vec<String>,
    token: Option<std::sync::Arc<zeroize::Zeroizing<String>>>,
    node: NodeId,
    /// The data-plane certificate capabilities minted for this node are bound to.
    holder: Option<slate_protocol::Holder>,
}

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaClient").field("apis", &self.apis).field("node", &self.node).finish_non_exhaustive()
    }
}

impl MetaClient {
    /// A client from the node's `[meta]` configuration.
    pub fn new(node: NodeId, link: &MetaLink) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10));
        if let Some(ca) = &link.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading the metadata CA {}", ca.display()))?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem).context("the metadata CA is not PEM")?);
        }
        let http = builder.build()?;
        let token = match &link.token_file {
            Some(p) => Some(std::sync::Arc::new(zeroize::Zeroizing::new(
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_owned(),
            ))),
            None => None,
        };
        Ok(Self { http, apis: link.apis.clone(), token, node, holder: None })
    }

    /// Asks that the capabilities slate-meta hands this node (copy tasks, repair
    /// sources) be bound to `holder`, the node's data-plane certificate.
    #[must_use]
    pub fn with_holder(mut self, holder: Option<slate_protocol::Holder>) -> Self {
        self.holder = holder;
        self
    }

    /// The node this client speaks for.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// POSTs `body` to `path` on the first replica that accepts it; returns the reply body.
    /// A refusal other than 503 is final and comes back as [`Refused`].
    pub async fn post(&self, path: &str, body: Option<&serde_json::Value>) -> Result<serde_json::Value> {
        let mut last = anyhow!("no metadata API configured");
        for base in &self.apis {
            let mut req = self.http.post(format!("{base}{path}"));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t.as_str());
            }
            if let Some(h) = self.holder {
                req = req.header(slate_protocol::capability::HOLDER_HEADER, h.to_hex());
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    return r.json().await.with_context(|| format!("reply of {base}{path}"));
                }
                Ok(r) => {
                    let status = r.status();
                    let text: String = r.text().await.unwrap_or_default().chars().take(300).collect();
                    debug!(%base, %status, "metadata call refused");
                    last = anyhow!("{base}{path}: HTTP {status}: {text}");
                    // 503: no leader on that replica; another may do better. Other refusals are final.
                    if status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                        return Err(anyhow::Error::new(Refused { status: status.as_u16(), message: text })
                            .context(format!("{base}{path}")));
                    }
                }
                Err(e) => {
                    debug!(%base, error = %e, "metadata call failed");
                    last = anyhow!("{base}{path}: {e}");
                }
            }
        }
        Err(last)
    }

    /// One heartbeat; returns the node's work.
    pub async fn heartbeat(&self) -> Result<HeartbeatReply> {
        let v = self.post(&format!("/v1/nodes/{}/heartbeat", self.node.0), None).await?;
        serde_json::from_value(v).context("unexpected heartbeat reply")
    }
}

/// slate-meta answered and refused the call (anything but 503).
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}: {message}")]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

/// Before the node serves anything: tell slate-meta it is back and release what was
/// re-placed or deleted while it was away, so that no stale replica is ever served.
/// Gives up (and serves anyway, releasing later) when slate-meta does not answer
/// within `patience`: the data plane must not depend on the metadata service.
pub async fn release_before_serving(meta: &MetaClient, releaser: &Releaser, patience: Duration) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match meta.heartbeat().await {
            Ok(reply) => {
                let pending = reply.work.releases.iter().filter(|r| !r.released).count();
                if pending > 0 {
                    tracing::info!(pending, "releasing replicas deleted or re-placed while this node was away");
                }
                releaser.run(meta, &reply.work).await;
                return;
            }
            Err(e) if e.downcast_ref::<Refused>().is_some() => {
                // Not registered yet (a new cluster), or not allowed: nothing to release.
                warn!(error = %format!("{e:#}"), "slate-meta refused the first heartbeat; serving");
                return;
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                warn!(error = %e, "slate-meta did not answer at start; serving, and releasing once it does");
                return;
            }
            Err(e) => {
                debug!(error = %e, "first heartbeat failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Starts the heartbeat task; it ends when `stop` is cancelled.
pub fn spawn(meta: MetaClient, work: Dispatcher, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match meta.heartbeat().await {
                Ok(reply) => {
                    failures = 0;
                    work.dispatch(&meta, &reply.work).await;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        warn!(failures, error = %e, "no metadata replica accepted the heartbeat");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            }
        }
    })
}
