//! Backups of snapshots to a directory or an S3 bucket, and restores from them.
//!
//! * [`store`]: the targets (`file:///DIR`, `s3://BUCKET[/PREFIX]`).
//! * [`reader`]: a snapshot's ciphertext and changed blocks, straight from the nodes.
//! * [`create`]: a backup: plan, send objects, resume after kill -9.
//! * [`chain`]: loading and checking signed manifests, chains and objects.
//! * [`restore`]: writing a chain into a volume that shares the source's key.
//!
//! The format (manifest, objects) is `slate_protocol::backup`; slate-meta keeps
//! the records and signs manifests (`raft-meta/src/state/backups.rs`).

pub mod chain;
pub mod create;
pub mod reader;
pub mod restore;
pub mod store;

use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::future::Future;
use tokio::task::JoinHandle;

/// At most `window` tasks at once, whose results are taken in the order they were pushed.
#[derive(Debug)]
pub struct Ordered<R> {
    queue: VecDeque<JoinHandle<Result<R>>>,
    window: usize,
}

impl<R: Send + 'static> Ordered<R> {
    pub fn new(window: usize) -> Self {
        Self { queue: VecDeque::new(), window: window.max(1) }
    }

    /// Whether another task may be pushed.
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.window
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn push(&mut self, task: impl Future<Output = Result<R>> + Send + 'static) {
        self.queue.push_back(tokio::spawn(task));
    }

    /// The result of the oldest task (`None` when none is left).
    pub async fn next(&mut self) -> Option<Result<R>> {
        let h = self.queue.pop_front()?;
        Some(h.await.context("backup task").and_then(|r| r))
    }
}

impl<R> Drop for Ordered<R> {
    fn drop(&mut self) {
        for h in &self.queue {
            h.abort();
        }
    }
}
