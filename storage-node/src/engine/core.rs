//! The engine thread (work in progress).

use super::{Cmd, EngineError, EngineOptions, StatsCell};
use slate_protocol::{NodeId, SegmentIndex, VolumeId};
use std::path::Path;
use std::sync::{mpsc, Arc, RwLock};

#[derive(Debug)]
pub(crate) struct Core;

#[allow(clippy::unused_self, clippy::unnecessary_wraps)]
impl Core {
    pub fn open(
        _path: &Path,
        _opts: EngineOptions,
        _stats: Arc<StatsCell>,
        _segments: Arc<RwLock<Vec<(VolumeId, SegmentIndex, u64)>>>,
    ) -> Result<(Self, NodeId), EngineError> {
        Err(EngineError::Format("not implemented yet".into()))
    }

    pub fn run(self, rx: &mpsc::Receiver<Cmd>) -> Result<(), EngineError> {
        while let Ok(cmd) = rx.recv() {
            if matches!(cmd, Cmd::Shutdown | Cmd::Crash) {
                break;
            }
        }
        Ok(())
    }
}
