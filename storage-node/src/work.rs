//! Hands each part of the work slate-meta returns with a heartbeat to the part
//! of the node that does it: releases (done in line, they are cheap), drain
//! copies (the mover, in the background), scrub requests (the scrubber) and a
//! decommission (the node's main task, which must stop serving first).

use crate::heartbeat::MetaClient;
use crate::mover::Mover;
use crate::release::Releaser;
use crate::scrub::Scrubber;
use slate_protocol::ops::{DecommissionTask, FreezeTask, NodeWork};
use slate_protocol::{Epoch, VolumeId};
use tokio::sync::watch;

/// The node's workers.
#[derive(Debug)]
pub struct Dispatcher {
    pub releaser: Releaser,
    pub mover: Mover,
    pub scrubber: Scrubber,
    /// Set once slate-meta asks for the disk's decommission; the node's main task watches it.
    pub decommission: watch::Sender<Option<DecommissionTask>>,
    /// Raises generations that a grant revocation fenced.
    pub fencer: crate::fence::Fencer,
}

impl Dispatcher {
    /// Freezes a detached volume's segments here at a snapshot's epoch and says so.
    async fn freeze(&self, meta: &MetaClient, f: &FreezeTask) {
        let r = self.releaser.engine().snapshot(VolumeId(f.volume), Epoch(f.epoch)).await;
        if let Err(e) = r {
            tracing::warn!(volume = f.volume, snapshot = f.snapshot, error = %e, "snapshot freeze failed; will retry");
            return;
        }
        let body = serde_json::json!({"node": meta.node().0});
        let path = format!("/v1/volumes/{}/snapshots/{}/frozen", f.volume, f.snapshot);
        match meta.post(&path, Some(&body)).await {
            Ok(_) => tracing::info!(volume = f.volume, snapshot = f.snapshot, epoch = f.epoch, "snapshot frozen"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "snapshot freeze report failed; will retry"),
        }
    }

    /// Acts on one heartbeat's work. Never blocks on long work: copies and scrubs run
    /// in their own tasks, and the decommission is the main task's.
    pub async fn dispatch(&self, meta: &MetaClient, work: &NodeWork) {
        // Fences first: a revoked writer must stop before anything slower runs.
        self.fencer.apply(&work.fences).await;
        self.releaser.run(meta, work).await;
        for f in &work.freezes {
            self.freeze(meta, f).await;
        }
        self.mover.offer(meta, &work.copies);
        self.scrubber.offer(work.scrub.as_ref());
        if let Some(t) = &work.decommission {
            self.decommission.send_if_modified(|cur| {
                if cur.is_none() {
                    *cur = Some(t.clone());
                    true
                } else {
                    false
                }
            });
        }
    }
}
