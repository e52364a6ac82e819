//! Capability renewal.
//!
//! The capability is renewed two thirds into its lifetime: a fresh one is
//! asked for, sessions are reopened with it on every member, and the old
//! sessions are kept until their last replies are in. A failed renewal is
//! tried again well before the capability expires.

use super::{Actor, Event};
use crate::volume::link::{LinkError, NodeLink};
use crate::volume::VolumeError;
use slate_protocol::{ErrorKind, NodeId, SignedCapability};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// When to renew the capability: two thirds into its lifetime, counted from when it was received.
pub(super) fn renew_at(received_unix_secs: u64, expires_unix_secs: u64) -> u64 {
    received_unix_secs.saturating_add(expires_unix_secs.saturating_sub(received_unix_secs) / 3 * 2)
}

impl Actor {
    /// Renews the capability when it is due; retires old sessions.
    pub(super) fn renew_if_due(&mut self) {
        let grace = self.cfg.request_timeout * 2;
        self.retired.retain(|(t, _)| t.elapsed() < grace);
        let due = self.renew_at.is_some_and(|at| slate_protocol::now_unix_secs() >= at);
        if !due || self.fatal.is_some() {
            return;
        }
        self.renew_at = None;
        let control = Arc::clone(&self.control);
        let connector = Arc::clone(&self.connector);
        let tx = self.events_tx.clone();
        let target = self.target;
        let timeout = self.cfg.request_timeout;
        let mut nodes: Vec<(NodeId, String)> =
            self.sets.iter().flat_map(|s| s.members().iter().map(|m| (m.node, m.addr.clone()))).collect();
        nodes.sort();
        nodes.dedup_by_key(|(n, _)| *n);
        let h = tokio::spawn(async move {
            let cap = match control.renew_capability(target.volume, target.generation).await {
                Ok(c) if c.claims.volume == target.volume && c.claims.generation == target.generation => c,
                Ok(_) => {
                    let _ = tx.send(Event::RenewFailed("renewed capability is for another attachment".into()));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Event::RenewFailed(e.to_string()));
                    return;
                }
            };
            let mut links = Vec::new();
            for (node, addr) in nodes {
                match tokio::time::timeout(timeout, connector.connect(node, &addr, &cap)).await {
                    Ok(Ok(link)) => links.push((node, link)),
                    Ok(Err(LinkError::Remote(e))) if e.kind == ErrorKind::StaleGeneration => {
                        let _ = tx.send(Event::Fatal(VolumeError::Fenced));
                        return;
                    }
                    // The old session serves until the node fails it; then the node is replaced as usual.
                    Ok(Err(e)) => warn!(%node, error = %e, "could not reopen a session with the renewed capability"),
                    Err(_) => warn!(%node, "timed out reopening a session with the renewed capability"),
                }
            }
            let _ = tx.send(Event::Renewed { capability: cap, links });
        });
        self.helpers.retain(|h| !h.is_finished());
        self.helpers.push(h);
    }

    pub(super) fn on_renewed(&mut self, capability: SignedCapability, links: Vec<(NodeId, Arc<dyn NodeLink>)>) {
        if self.fatal.is_some() {
            return;
        }
        info!(volume = %self.target.volume, expires = capability.claims.expires_unix_secs, "capability renewed");
        self.renew_at = Some(renew_at(slate_protocol::now_unix_secs(), capability.claims.expires_unix_secs));
        self.capability = capability;
        self.counters.capability_renewals += 1;
        for (node, link) in links {
            if self.dead.contains(&node) {
                continue;
            }
            if let Some(old) = self.links.insert(node, link) {
                self.retired.push((Instant::now(), old));
            }
        }
    }

    pub(super) fn on_renew_failed(&mut self, why: &str) {
        warn!(volume = %self.target.volume, %why, "capability renewal failed; retrying");
        let now = slate_protocol::now_unix_secs();
        let left = self.capability.claims.expires_unix_secs.saturating_sub(now);
        self.renew_at = Some(now + (left / 2).clamp(1, 10));
    }
}
