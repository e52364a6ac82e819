//! What the loop does besides the write path: how long it may sleep, work
//! between batches (a zeroer step, lazy intent clears, checkpoint triggers,
//! syncing evicted pages, zero waiters), work that needs the pipeline drained
//! (layer deletion, scrub, repair, checkpoints), and the clean shutdown.

use super::zeroer::ZERO_STEP_BYTES;
use super::Core;
use crate::engine::{Cmd, EngineError};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Core {
    /// No command is between planning and its durable reply, and no read is in flight.
    pub(super) fn pipeline_idle(&self) -> bool {
        self.fifo.is_empty() && self.committing.is_none() && self.reads.is_empty()
    }

    /// How long the loop may block: not at all if something can be done now.
    pub(super) fn wait_timeout(&mut self, shutting_down: bool) -> Duration {
        let plannable = self.queue.front().is_some_and(|c| self.can_plan(c));
        if plannable || (shutting_down && self.pipeline_idle()) {
            return Duration::ZERO;
        }
        if self.pipeline_idle() && self.queue.front().is_some() {
            return Duration::ZERO;
        }
        let mut t = Duration::from_millis(500);
        if let Some(until) = self.gather_until {
            t = t.min(until.saturating_duration_since(Instant::now()));
        }
        if self.has_zero_work() && self.failed.is_none() {
            self.refill_tokens();
            if self.zero_tokens >= ZERO_STEP_BYTES as f64 {
                return Duration::ZERO;
            }
            let rate = self.opts.zero_rate_bytes_per_sec.max(1) as f64;
            let wait = (ZERO_STEP_BYTES as f64 - self.zero_tokens) / rate;
            t = t.min(Duration::from_secs_f64(wait.clamp(0.0005, 0.5)));
        }
        if !self.pending.is_empty() || !self.waiters.is_empty() || !self.evicted_unsynced.is_empty() {
            t = t.min(Duration::from_millis(5));
        }
        if self.ring.busy() > 0 && t > Duration::from_millis(100) {
            // Completions wake the wait; the bound only keeps timers honest.
            t = Duration::from_millis(100);
        }
        t
    }

    /// Work that needs the pipeline drained: layer folds, explicit and due checkpoints.
    pub(super) fn run_drained_work(&mut self) {
        while self.pipeline_idle() && !self.crashed {
            match self.queue.front() {
                Some(Cmd::DeleteLayer { .. }) => {
                    let Some(Cmd::DeleteLayer { volume, segment, epoch, tx }) = self.queue.pop_front() else { break };
                    let r = if let Some(f) = self.failed.clone() {
                        Err(EngineError::Failed(f))
                    } else {
                        self.new_seq();
                        self.delete_layer((volume, segment), epoch)
                    };
                    if self.crashed {
                        return;
                    }
                    self.publish();
                    let _ = tx.send(r);
                }
                Some(Cmd::Scrub { .. }) => {
                    let Some(Cmd::Scrub { volume, segment, cursor, max_blocks, tx }) = self.queue.pop_front() else {
                        break;
                    };
                    let r = self.scrub((volume, segment), cursor, max_blocks);
                    let _ = tx.send(r);
                }
                Some(Cmd::RepairBlock { .. }) => {
                    let Some(Cmd::RepairBlock { volume, epoch, block, bad_crc, data, crc, tx }) =
                        self.queue.pop_front()
                    else {
                        break;
                    };
                    let r = if let Some(f) = self.failed.clone() {
                        Err(EngineError::Failed(f))
                    } else {
                        self.new_seq();
                        self.repair_block(volume, epoch, block, bad_crc, &data, crc)
                    };
                    if self.crashed {
                        return;
                    }
                    let _ = tx.send(r);
                }
                Some(Cmd::Checkpoint { .. }) => {
                    let Some(Cmd::Checkpoint { tx }) = self.queue.pop_front() else { break };
                    let r = match self.failed.clone() {
                        Some(f) => Err(EngineError::Failed(f)),
                        None => self.checkpoint(),
                    };
                    if self.crashed {
                        return;
                    }
                    let _ = tx.send(r);
                }
                _ => break,
            }
        }
        if self.pipeline_idle() && self.want_checkpoint && self.failed.is_none() {
            if let Err(e) = self.checkpoint() {
                tracing::warn!(error = %e, "checkpoint failed");
            }
        }
        self.want_checkpoint = false;
    }

    /// Work between events: a zeroer step, lazy intent clearing, checkpoint triggers,
    /// syncing evicted pages, answering zero waiters.
    pub(super) fn background(&mut self) -> Result<(), EngineError> {
        if self.failed.is_some() {
            self.answer_waiters();
            return Ok(());
        }
        if self.has_zero_work() {
            self.refill_tokens();
            if self.zero_tokens >= ZERO_STEP_BYTES as f64 {
                self.zero_step(false)?;
                if self.crashed {
                    return Ok(());
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(self.last_intent_scan) >= Duration::from_millis(500) {
            self.last_intent_scan = now;
            self.clear_idle_intents(now)?;
        }
        let journal_quarter = self.journal.used() * 4 > self.journal.blocks;
        let interval = Duration::from_secs(self.opts.checkpoint_interval_secs.max(1));
        let something = !self.et.dirty_pages.is_empty() || self.journal.used() > 0;
        if journal_quarter || (something && now.duration_since(self.last_ckpt) >= interval) {
            self.want_checkpoint = true;
        }
        if !self.evicted_unsynced.is_empty() && self.committing.is_none() && self.fifo.is_empty() {
            self.disk.sync()?;
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.evicted_unsynced.clear();
        }
        self.answer_waiters();
        Ok(())
    }

    pub(super) fn shutdown(mut self) -> Result<(), EngineError> {
        if self.failed.is_none() {
            // Intents stay: a clean stop of the node says nothing about its clients, one of which
            // may have died with a write on this replica only. Only `clear_intents` clears them.
            self.checkpoint()?;
        }
        for (tx, _) in self.waiters.drain(..) {
            let _ = tx.send(Err(EngineError::ShuttingDown));
        }
        Ok(())
    }
}
