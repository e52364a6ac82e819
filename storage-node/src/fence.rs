//! Generation fences that slate-meta sends with the heartbeat reply.
//!
//! When a grant revocation ends a live read-write attachment, slate-meta bumps
//! the volume's generation and lists `{volume, generation}` in the heartbeat
//! reply of every node holding the volume. The node raises its generation for
//! the volume exactly as a hello of that generation would: under the volume's
//! exclusive fence (so requests already admitted land first), durably in the
//! engine (the fence survives a restart), then in the in-memory table every
//! request is checked against. The revoked client's next request fails with
//! `StaleGeneration`, without waiting for its capability to expire.

use crate::engine::{EngineError, EngineHandle};
use crate::session::GenerationTable;
use slate_protocol::ops::VolumeFence;
use slate_protocol::{Generation, VolumeId};
use std::sync::Arc;

/// Applies fences to one node's engine and generation table.
#[derive(Debug, Clone)]
pub struct Fencer {
    gens: Arc<GenerationTable>,
    engine: EngineHandle,
}

impl Fencer {
    pub fn new(gens: Arc<GenerationTable>, engine: EngineHandle) -> Self {
        Self { gens, engine }
    }

    /// Raises the generation of each fenced volume (no-op when already there).
    pub async fn apply(&self, fences: &[VolumeFence]) {
        for f in fences {
            let (volume, generation) = (VolumeId(f.volume), Generation(f.generation));
            if self.gens.highest(volume).is_some_and(|h| h >= generation) {
                continue;
            }
            let fence = self.gens.fence(volume);
            let _exclusive = fence.write().await;
            match self.engine.check_generation(volume, generation).await {
                // The engine knows a newer generation already: raising to it is as good.
                Ok(()) | Err(EngineError::StaleGeneration { .. }) => {
                    self.gens.raise(volume, generation);
                    tracing::info!(%volume, %generation, "generation fenced by slate-meta (grant revoked)");
                }
                Err(e) => {
                    tracing::warn!(%volume, %generation, error = %e, "applying a generation fence failed; will retry");
                }
            }
        }
    }
}
