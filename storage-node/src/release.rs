//! The node's side of the release queue: slate-meta hands each node the
//! segment replicas (or snapshot layers) it must give up; the node journals
//! their extents dirty (from then on no read reaches them and the zeroer owns
//! them), reports "released" with the extent ids, and once the zeroer has
//! overwritten and read back every one of them as zeros, reports "erased".
//!
//! Both steps are idempotent, so a node killed at any point simply does them
//! again: a second release of a segment that is gone frees nothing, and the
//! extent ids slate-meta keeps are checked again against the engine.

use crate::engine::{EngineError, EngineHandle, ExtentPhase};
use crate::heartbeat::MetaClient;
use anyhow::{Context, Result};
use slate_protocol::ops::{NodeWork, ReleaseReport, ReleaseTask};
use slate_protocol::{Epoch, SegmentIndex, VolumeId};
use tracing::{info, warn};

/// Executes release tasks against one engine.
#[derive(Clone, Debug)]
pub struct Releaser {
    engine: EngineHandle,
}

impl Releaser {
    pub fn new(engine: EngineHandle) -> Self {
        Self { engine }
    }

    /// The engine it works on.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Works through `work`; a task that fails is logged and retried with the next heartbeat.
    pub async fn run(&self, meta: &MetaClient, work: &NodeWork) {
        for task in &work.releases {
            if let Err(e) = self.one(meta, task).await {
                warn!(release = task.id, volume = task.volume, segment = task.segment, error = %format!("{e:#}"),
                    "release task failed; will retry");
            }
        }
    }

    async fn one(&self, meta: &MetaClient, t: &ReleaseTask) -> Result<()> {
        let path = format!("/v1/nodes/{}/releases/{}", meta.node().0, t.id);
        if !t.released {
            let extents = self.release(t).await?;
            info!(release = t.id, volume = t.volume, segment = t.segment, layer = ?t.layer_epoch,
                extents = extents.len(), reason = ?t.reason, "released");
            let report = ReleaseReport::Released { extents };
            meta.post(&path, Some(&serde_json::to_value(&report)?)).await.context("reporting the release")?;
            return Ok(());
        }
        let Some((verified, failed)) = self.zeroed(t).await? else { return Ok(()) };
        info!(
            release = t.id,
            volume = t.volume,
            segment = t.segment,
            verified,
            failed,
            "erased: extents verified zero"
        );
        let report = ReleaseReport::Erased { verified, failed };
        meta.post(&path, Some(&serde_json::to_value(&report)?)).await.context("reporting the erasure")?;
        Ok(())
    }

    /// Journals the task's extents dirty; returns their ids.
    async fn release(&self, t: &ReleaseTask) -> Result<Vec<u32>> {
        let (volume, segment) = (VolumeId(t.volume), SegmentIndex(t.segment));
        match t.layer_epoch {
            None => Ok(self.engine.release_segment(volume, segment).await?),
            Some(e) => match self.engine.delete_layer(volume, segment, Epoch(e)).await {
                Ok(extents) => Ok(extents),
                // The segment or the layer never reached this node: nothing to free.
                Err(EngineError::NotAssigned | EngineError::NoSuchLayer(_)) => Ok(Vec::new()),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// `Some((verified, failed))` once no released extent is dirty or being zeroed.
    async fn zeroed(&self, t: &ReleaseTask) -> Result<Option<(u64, u64)>> {
        let states = self.engine.extent_states(t.extents.clone()).await?;
        let mut failed = 0u64;
        for (extent, s) in t.extents.iter().zip(&states) {
            match s {
                ExtentPhase::Dirty | ExtentPhase::Zeroing => return Ok(None),
                ExtentPhase::Failed => failed += 1,
                ExtentPhase::OutOfRange => {
                    anyhow::bail!("slate-meta names extent {extent}, which this disk does not have")
                }
                // Free or owned again: allocation only ever takes verified-zero extents.
                ExtentPhase::Free | ExtentPhase::Owned => {}
            }
        }
        Ok(Some((t.extents.len() as u64 - failed, failed)))
    }
}
