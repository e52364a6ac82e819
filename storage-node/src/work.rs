//! Hands each part of the work slate-meta returns with a heartbeat to the part
//! of the node that does it: releases (done in line, they are cheap), drain
//! copies (the mover, in the background), scrub requests (the scrubber) and a
//! decommission (the node's main task, which must stop serving first).

use crate::heartbeat::MetaClient;
use crate::mover::Mover;
use crate::release::Releaser;
use crate::scrub::Scrubber;
use slate_protocol::ops::{DecommissionTask, NodeWork};
use tokio::sync::watch;

/// The node's workers.
#[derive(Debug)]
pub struct Dispatcher {
    pub releaser: Releaser,
    pub mover: Mover,
    pub scrubber: Scrubber,
    /// Set once slate-meta asks for the disk's decommission; the node's main task watches it.
    pub decommission: watch::Sender<Option<DecommissionTask>>,
}

impl Dispatcher {
    /// Acts on one heartbeat's work. Never blocks on long work: copies and scrubs run
    /// in their own tasks, and the decommission is the main task's.
    pub async fn dispatch(&self, meta: &MetaClient, work: &NodeWork) {
        self.releaser.run(meta, work).await;
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
