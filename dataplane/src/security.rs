//! Security events a process observes, reported to slate-meta.
//!
//! A storage node reports the hellos it refuses for a forged, expired or
//! misbound capability and the TLS handshakes it refuses; a host reports NBD
//! clients that fail mutual TLS. slate-meta counts each in
//! `slate_meta_security_events_total{kind, source}` and aggregates them into the
//! audit chain (`slate audit list --security`). Reporting never blocks the path
//! that saw the event: events go through a bounded queue and are dropped (and
//! counted by the caller's own metrics) when it is full, so a flood costs the
//! reporter nothing but the refusals themselves.

use slate_protocol::ops::SecurityEventReport;
use std::net::SocketAddr;
use tokio::sync::mpsc;

/// Events queued for the reporting task at most.
pub const QUEUE: usize = 256;
/// Longest detail sent (slate-meta accepts 256 printable ASCII characters).
const MAX_DETAIL: usize = 200;

/// Where refusals are reported; cheap to clone. [`Reporter::none`] drops everything.
#[derive(Clone, Debug, Default)]
pub struct Reporter(Option<mpsc::Sender<SecurityEventReport>>);

impl Reporter {
    /// A reporter that reports nowhere (a node without a `[meta]` link, tests).
    pub fn none() -> Self {
        Self(None)
    }

    /// A reporter and the queue a task drains into slate-meta.
    pub fn channel() -> (Self, mpsc::Receiver<SecurityEventReport>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self(Some(tx)), rx)
    }

    /// Queues one event; false when it was dropped (no link, or the queue is full).
    pub fn report(&self, kind: &str, peer: SocketAddr, detail: &str) -> bool {
        let Some(tx) = &self.0 else { return false };
        let detail: String = detail
            .chars()
            .map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else { '?' })
            .take(MAX_DETAIL)
            .collect();
        tx.try_send(SecurityEventReport { kind: kind.to_owned(), source: peer.to_string(), detail }).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_are_bounded_and_cleaned() {
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        assert!(!Reporter::none().report("forged-capability", peer, "x"));
        let (r, mut rx) = Reporter::channel();
        assert!(r.report("forged-capability", peer, "bad\nsig\u{e9}"));
        let ev = rx.recv().await.unwrap();
        assert_eq!(
            (ev.kind.as_str(), ev.source.as_str(), ev.detail.as_str()),
            ("forged-capability", "192.0.2.1:5000", "bad?sig?")
        );
        let sent = (0..QUEUE + 10).filter(|_| r.report("forged-capability", peer, "")).count();
        assert_eq!(sent, QUEUE, "a full queue drops, never blocks");
    }
}
