//! Fencing: the highest generation seen per volume is journaled; a request with
//! an older one is refused, also after a restart.

use super::commit::Batch;
use super::Core;
use crate::engine::journal::Record;
use crate::engine::EngineError;
use slate_protocol::{Generation, VolumeId};

/// Most volumes with a recorded generation.
const MAX_VOLUMES: usize = 1 << 16;

impl Core {
    pub(super) fn check_generation(
        &mut self,
        b: &mut Batch,
        volume: VolumeId,
        gen: Generation,
    ) -> Result<(), EngineError> {
        match self.cat.generations.get(&volume) {
            Some(cur) if gen < *cur => Err(EngineError::StaleGeneration { current: *cur }),
            Some(cur) if gen == *cur => Ok(()),
            _ => {
                if let Some(f) = &self.failed {
                    return Err(EngineError::Failed(f.clone()));
                }
                if !self.cat.generations.contains_key(&volume) && self.cat.generations.len() >= MAX_VOLUMES {
                    return Err(EngineError::NoSpace);
                }
                let mut recs = std::mem::take(&mut b.records);
                let r = self.emit(&mut recs, Record::Generation { volume, gen });
                b.records = recs;
                r
            }
        }
    }
}
