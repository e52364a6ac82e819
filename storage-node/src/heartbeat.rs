//! The node's link to the metadata service: a periodic heartbeat, so that
//! slate-meta can tell a live node from a dead one (a node silent longer than
//! the service's timeout is marked down and its replicas are re-placed).
//!
//! The heartbeat goes to the first metadata replica that answers; followers
//! forward writes to the leader. Failures are logged (rate-limited by the
//! interval) and never stop the node: the data plane does not depend on it.

use crate::config::MetaLink;
use anyhow::{Context, Result};
use slate_protocol::NodeId;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the node says it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the heartbeat task; it ends when `stop` is cancelled.
pub fn spawn(node: NodeId, link: &MetaLink, stop: CancellationToken) -> Result<tokio::task::JoinHandle<()>> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    if let Some(ca) = &link.ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading the metadata CA {}", ca.display()))?;
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).context("the metadata CA is not PEM")?);
    }
    let http = builder.build()?;
    let token = match &link.token_file {
        Some(p) => Some(zeroize::Zeroizing::new(
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_owned(),
        )),
        None => None,
    };
    let apis = link.apis.clone();
    Ok(tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let mut ok = false;
            for base in &apis {
                let mut req = http.post(format!("{base}/v1/nodes/{}/heartbeat", node.0));
                if let Some(t) = &token {
                    req = req.bearer_auth(t.as_str());
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        ok = true;
                        break;
                    }
                    Ok(r) => debug!(%base, status = %r.status(), "heartbeat refused"),
                    Err(e) => debug!(%base, error = %e, "heartbeat failed"),
                }
            }
            if ok {
                failures = 0;
            } else {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!(failures, "no metadata replica accepted the heartbeat");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            }
        }
    }))
}
