//! Planning of every command other than a write: reads are started, metadata
//! commands (trim, generation, assign, release, snapshot, intent clears) emit
//! their records and reply after the commit that carries them, queries reply
//! after the next commit so that what they report is durable.

use super::commit::{Batch, DataState, ItemReply};
use super::layers::Loc;
use super::Core;
use crate::engine::journal::Record;
use crate::engine::meta::ExtentState;
use crate::engine::{Cmd, Done, EngineError, Reply};
use slate_protocol::{BlockRange, VolumeId};

/// Most blocks in one trim / allocated command (one default segment).
const MAX_RANGE_BLOCKS: u64 = 1 << 18;

impl Core {
    /// Plans a command other than a write (see `Core::plan`): `seq` is its place in
    /// arrival order, `failed` the engine's failure if any.
    pub(super) fn plan_command(&mut self, seq: u64, failed: Option<EngineError>, cmd: Cmd) {
        let mut b = Batch::default();
        match cmd {
            Cmd::Read { volume, epoch, start, count, tx } => self.start_read(seq, volume, epoch, start, count, tx),
            Cmd::Flush { tx } => match failed {
                Some(e) => {
                    let _ = tx.send(Err(e));
                }
                None => self.push_item(seq, Vec::new(), 0, ItemReply::Unit(Done::Slot(tx)), DataState::None),
            },
            Cmd::Trim { volume, range, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.plan_trim(&mut b, volume, range),
                };
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::CheckGeneration { volume, gen, tx } => {
                let r = self.check_generation(&mut b, volume, gen);
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::AssignSegment { volume, segment, segment_blocks, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.assign(&mut b, volume, segment, segment_blocks),
                };
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::ReleaseSegment { volume, segment, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.release(&mut b, volume, segment),
                };
                match r {
                    Ok(extents) => self.push_meta(seq, b, ItemReply::Extents(tx, extents)),
                    Err(e) => {
                        self.salvage(b);
                        let _ = tx.send(Err(e));
                    }
                }
            }
            Cmd::ExtentStates { extents, tx } => {
                // Answered after the next commit, so a phase reported is durable (a `free`
                // record the zeroer left pending is journaled first).
                let phases = extents.iter().map(|e| self.phase(*e)).collect();
                self.push_item(seq, Vec::new(), 0, ItemReply::Phases(tx, phases), DataState::None);
            }
            Cmd::Snapshot { volume, epoch, tx } => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => self.snapshot(&mut b, volume, epoch),
                };
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::ClearIntents { volume, ranges, tx } => {
                let r = self.clear_intents(&mut b, volume, &ranges);
                self.finish_meta(seq, b, tx, r);
            }
            Cmd::Allocated { volume, range, tx } => match self.allocated(volume, range) {
                Ok(v) => self.push_item(seq, Vec::new(), 0, ItemReply::Bitmap(tx, v), DataState::None),
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
            Cmd::ChangedBlocks { volume, segment, from, to, tx } => {
                match self.changed_blocks((volume, segment), from, to) {
                    Ok(v) => self.push_item(seq, Vec::new(), 0, ItemReply::Ranges(tx, v), DataState::None),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            }
            Cmd::Layers { volume, segment, tx } => {
                match self
                    .cat
                    .segments
                    .get(&(volume, segment))
                    .map(|s| s.layers.iter().skip(1).map(|l| l.base).collect())
                {
                    Some(v) => self.push_item(seq, Vec::new(), 0, ItemReply::Epochs(tx, v), DataState::None),
                    None => {
                        let _ = tx.send(Err(EngineError::NotAssigned));
                    }
                }
            }
            Cmd::WriteIntents { volume, tx } => {
                let out = self.write_intents(volume);
                self.push_item(seq, Vec::new(), 0, ItemReply::Ranges(tx, out), DataState::None);
            }
            Cmd::WaitZeroed { tx, deadline } => self.waiters.push((tx, deadline)),
            // Never planned here (see can_plan / run_drained_work).
            Cmd::DeleteLayer { tx, .. } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            Cmd::Checkpoint { tx } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            Cmd::Scrub { tx, .. } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            Cmd::RepairBlock { tx, .. } => {
                let _ = tx.send(Err(EngineError::Invalid("internal: command needs a drained pipeline".into())));
            }
            // Planned by `plan` before it gets here.
            Cmd::Write { tx, .. } => {
                tx.send(Err(EngineError::Invalid("internal: a write is planned by the write path".into())));
            }
            Cmd::Crash | Cmd::Shutdown => {}
        }
    }

    /// A metadata command: its records wait for the next commit, its reply for that commit.
    fn finish_meta(&mut self, seq: u64, b: Batch, tx: Reply<()>, r: Result<(), EngineError>) {
        match r {
            Ok(()) => self.push_meta(seq, b, ItemReply::Unit(Done::Slot(tx))),
            Err(e) => {
                self.salvage(b);
                let _ = tx.send(Err(e));
            }
        }
    }

    fn push_meta(&mut self, seq: u64, mut b: Batch, reply: ItemReply) {
        let mut records = std::mem::take(&mut b.intent_records);
        records.append(&mut b.records);
        let bytes = b.record_bytes + records.len() * 16;
        self.push_item(seq, records, bytes, reply, DataState::None);
    }

    fn plan_trim(&mut self, batch: &mut Batch, volume: VolumeId, range: BlockRange) -> Result<(), EngineError> {
        if range.count == 0 {
            return Ok(());
        }
        if range.count > MAX_RANGE_BLOCKS {
            return Err(EngineError::Invalid(format!("trim of {} blocks", range.count)));
        }
        let pieces = self.pieces(volume, range.start.0, range.count)?;
        self.note_intents(batch, volume, range.start.0, range.count)?;
        let eb = self.sb.extent_blocks;
        let mut recs = std::mem::take(&mut batch.records);
        let res = (|| {
            for (key, sblock, n, _) in pieces {
                let seg_blocks = self.cat.segments[&key].blocks;
                let head = self.cat.segments[&key].layers.len() - 1;
                let head_id = self.cat.segments[&key].layers[head].id;
                let mut sb = sblock;
                while sb < sblock + n {
                    let slot = (sb / eb) as u32;
                    let off = (sb % eb) as u32;
                    let len = (eb - u64::from(off)).min(sblock + n - sb);
                    let slot_len = eb.min(seg_blocks - u64::from(slot) * eb);
                    // Blocks whose older-layer data must stay masked.
                    let mut mask = vec![false; len as usize];
                    if head > 0 {
                        for (i, m) in mask.iter_mut().enumerate() {
                            *m = matches!(self.resolve(key, head - 1, sb + i as u64)?, Loc::Data { .. });
                        }
                    }
                    let existing = self.cat.segments[&key].layers[head].extents.get(&slot).copied();
                    let whole = off == 0 && len >= slot_len;
                    if whole && !mask.iter().any(|m| *m) {
                        if let Some(extent) = existing {
                            // Nothing of this extent stays visible: release it to zeroing now.
                            self.emit(&mut recs, Record::State { extent, state: ExtentState::Dirty as u8 })?;
                        }
                    } else {
                        let needs_extent = mask.iter().any(|m| *m);
                        let extent = match existing {
                            Some(e) => Some(e),
                            None if needs_extent => Some(self.alloc(&mut recs, key, head_id, slot)?),
                            None => None,
                        };
                        if let Some(extent) = extent {
                            let mut i = 0usize;
                            while i < mask.len() {
                                let z = mask[i];
                                let mut j = i;
                                while j < mask.len() && mask[j] == z {
                                    j += 1;
                                }
                                let r = Record::Trim { extent, offset: off + i as u32, count: (j - i) as u32, zero: z };
                                batch.record_bytes += r.encoded_len();
                                self.emit(&mut recs, r)?;
                                i = j;
                            }
                        }
                    }
                    sb += len;
                }
            }
            Ok::<(), EngineError>(())
        })();
        batch.records = recs;
        res
    }

    fn allocated(&mut self, volume: VolumeId, range: BlockRange) -> Result<Vec<u8>, EngineError> {
        if range.count > MAX_RANGE_BLOCKS {
            return Err(EngineError::Invalid(format!("allocated over {} blocks", range.count)));
        }
        let mut out = vec![0u8; (range.count as usize).div_ceil(8)];
        if range.count == 0 {
            return Ok(out);
        }
        for (key, sblock, n, idx0) in self.pieces(volume, range.start.0, range.count)? {
            let top = self.cat.segments[&key].layers.len() - 1;
            for i in 0..n {
                if matches!(self.resolve(key, top, sblock + i)?, Loc::Data { .. }) {
                    let idx = (idx0 + i) as usize;
                    out[idx / 8] |= 1 << (idx % 8);
                }
            }
        }
        Ok(out)
    }
}
