//! The zeroer: brings released (dirty) extents back to free. Each extent and its
//! metadata pages are zeroed with the disk's cheapest primitive, synced, read back
//! and checked byte by byte before a `free` record; an extent that fails
//! verification repeatedly is retired. It works in bounded, rate-limited steps
//! between batches (at full speed when an allocation waits for it), and only on
//! extents whose release is durable and that no read is using.

use super::{crash_point, Core};
use crate::engine::journal::Record;
use crate::engine::layout::{Superblock, BLOCK};
use crate::engine::meta::ExtentState;
use crate::engine::uring::{AlignedBuf, ALIGN};
use crate::engine::zero::ZeroMethod;
use crate::engine::EngineError;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Bytes written (and then read back) per zeroer step.
pub(super) const ZERO_STEP_BYTES: usize = 256 << 10;
/// Bytes zeroed per step by a cheap primitive (zero-range, device write-zeroes).
const OFFLOAD_STEP_BYTES: usize = 16 << 20;
/// Extents zeroed by a cheap primitive before one shared fdatasync.
const ZERO_BATCH_EXTENTS: usize = 8;
/// Rate-limiter cost of one cheap zeroing call, whatever its length.
const OFFLOAD_COST_BYTES: f64 = (64 << 10) as f64;
/// A verify read costs this fraction of its length.
const VERIFY_COST_FRACTION: f64 = 0.25;
/// Zero verification failures before an extent is retired.
const MAX_ZERO_FAILURES: u8 = 3;

#[derive(Debug, Clone, Copy)]
enum ZeroPhase {
    Write(usize),
    Verify(usize),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct ZeroJob {
    extent: u32,
    phase: ZeroPhase,
}

impl Core {
    pub(super) fn has_zero_work(&self) -> bool {
        self.zero_job.is_some()
            || self.dirty.iter().any(|e| self.dirty_at.get(e).is_none_or(|l| *l <= self.durable_lsn))
    }

    pub(super) fn refill_tokens(&mut self) {
        let now = Instant::now();
        let rate = self.opts.zero_rate_bytes_per_sec;
        if rate == u64::MAX {
            self.zero_tokens = f64::MAX;
        } else {
            let dt = now.duration_since(self.zero_refill).as_secs_f64();
            self.zero_tokens = (self.zero_tokens + dt * rate as f64).min((2 * ZERO_STEP_BYTES) as f64);
        }
        self.zero_refill = now;
    }

    /// One step of the zeroer: write or verify up to `ZERO_STEP_BYTES` of the current
    /// dirty extent. Returns false if there was nothing to do.
    pub(super) fn zero_step(&mut self, urgent: bool) -> Result<bool, EngineError> {
        if self.failed.is_some() {
            return Ok(false);
        }
        let job = if let Some(j) = self.zero_job {
            j
        } else {
            // Only extents whose release is durable: an unacknowledged release must
            // not destroy data that a crash would bring back. With a cheap primitive,
            // several extents are zeroed and share one fdatasync.
            let durable = self.durable_lsn;
            let batch_max = if self.zeroing.is_cheap() { ZERO_BATCH_EXTENTS } else { 1 };
            let mut picked = Vec::new();
            let mut skipped = false;
            while picked.len() < batch_max {
                let pos = self.dirty.iter().position(|e| {
                    self.dirty_at.get(e).is_none_or(|l| *l <= durable) && !self.read_extents.contains_key(e)
                });
                let Some(extent) = pos.and_then(|p| self.dirty.remove(p)) else { break };
                self.dirty_at.remove(&extent);
                let st = self.et.get(extent).map(|e| e.state);
                if !matches!(st, Some(ExtentState::Dirty | ExtentState::Zeroing)) {
                    self.queued_dirty.remove(&extent);
                    skipped = true;
                    continue;
                }
                self.emit_pending(Record::State { extent, state: ExtentState::Zeroing as u8 })?;
                picked.push(extent);
            }
            match picked.len() {
                0 => return Ok(skipped),
                1 => {
                    let j = ZeroJob { extent: picked[0], phase: ZeroPhase::Write(0) };
                    self.zero_job = Some(j);
                    j
                }
                _ => return self.zero_batch(&picked, urgent),
            }
        };
        let ext_bytes = (self.sb.extent_blocks * BLOCK) as usize;
        let base = Superblock::off(self.sb.extent_block(job.extent));
        match job.phase {
            ZeroPhase::Write(done) => {
                if done == 0 {
                    // Erase the extent's per-block metadata (crcs, bitmaps) as well: the
                    // previous owner's metadata goes with its data.
                    self.drop_cached_pages(job.extent);
                    let first = self.sb.chunk_page_block(u64::from(job.extent) * self.sb.pages_per_extent, 0);
                    let total = (2 * self.sb.pages_per_extent) as usize * ALIGN;
                    if let Err(e) = self.zero_range(Superblock::off(first), total, false) {
                        return Err(self.fail(format!("zeroing metadata failed: {e}")));
                    }
                }
                let step = if self.zeroing.is_cheap() { OFFLOAD_STEP_BYTES } else { ZERO_STEP_BYTES };
                let mut len = step.min(ext_bytes - done);
                let half = ext_bytes / 2;
                let crash_mid = done < half && done + len >= half && crash_point("mid_zeroing");
                if crash_mid {
                    // Simulated crash with the extent half zeroed.
                    len = half - done;
                }
                let cost = match self.zero_range(base + done as u64, len, true) {
                    Ok(c) => c,
                    Err(e) => return Err(self.fail(format!("zeroing failed: {e}"))),
                };
                if !urgent {
                    self.zero_tokens -= cost;
                }
                self.stats.bytes_zeroed_total.fetch_add(len as u64, Ordering::Relaxed);
                let done = done + len;
                if crash_mid {
                    self.crashed = true;
                    return Ok(true);
                }
                if done < ext_bytes {
                    self.zero_job = Some(ZeroJob { phase: ZeroPhase::Write(done), ..job });
                } else {
                    // Zeros must be on stable storage before they are verified and the
                    // extent is declared free.
                    if let Err(e) = self.disk.sync() {
                        return Err(self.fail(format!("zeroing sync failed: {e}")));
                    }
                    self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                    if crash_point("after_zeroing_before_verify") {
                        self.crashed = true;
                        return Ok(true);
                    }
                    self.zero_job = Some(ZeroJob { phase: ZeroPhase::Verify(0), ..job });
                }
            }
            ZeroPhase::Verify(done) => {
                let len = ZERO_STEP_BYTES.min(ext_bytes - done);
                let mut vb = std::mem::replace(&mut self.verify_buf, AlignedBuf::zeroed(ALIGN));
                let res = self.disk.read_at(base + done as u64, &mut vb[..len]);
                let all_zero = vb[..len].iter().all(|b| *b == 0);
                self.verify_buf = vb;
                if !urgent {
                    self.zero_tokens -= len as f64 * VERIFY_COST_FRACTION;
                }
                if let Err(e) = res {
                    return Err(self.fail(format!("zeroing verify read failed: {e}")));
                }
                if !all_zero {
                    let mut e = self.et.entries[job.extent as usize];
                    e.zero_failures = e.zero_failures.saturating_add(1);
                    tracing::warn!(extent = job.extent, failures = e.zero_failures, "zero verification failed");
                    let retire = e.zero_failures >= MAX_ZERO_FAILURES;
                    self.et.set(job.extent, e);
                    if retire {
                        self.emit_pending(Record::State { extent: job.extent, state: ExtentState::Failed as u8 })?;
                        self.zero_job = self.next_to_verify();
                    } else {
                        self.zero_job = Some(ZeroJob { phase: ZeroPhase::Write(0), ..job });
                    }
                    return Ok(true);
                }
                let done = done + len;
                if done < ext_bytes {
                    self.zero_job = Some(ZeroJob { phase: ZeroPhase::Verify(done), ..job });
                } else {
                    self.zero_job = self.next_to_verify();
                    self.emit_pending(Record::State { extent: job.extent, state: ExtentState::Free as u8 })?;
                    self.stats.extents_zeroed_total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(true)
    }

    /// The next extent of a zeroed batch waiting for its verify read.
    fn next_to_verify(&mut self) -> Option<ZeroJob> {
        self.verify_queue.pop_front().map(|extent| ZeroJob { extent, phase: ZeroPhase::Verify(0) })
    }

    /// Zeroes several extents (and their metadata pages) with the cheap primitive, one
    /// fdatasync for all, then queues them for their verify reads. One zeroer step.
    fn zero_batch(&mut self, extents: &[u32], urgent: bool) -> Result<bool, EngineError> {
        let ext_bytes = (self.sb.extent_blocks * BLOCK) as usize;
        let meta_bytes = (2 * self.sb.pages_per_extent) as usize * ALIGN;
        for (i, &extent) in extents.iter().enumerate() {
            self.drop_cached_pages(extent);
            let meta = Superblock::off(self.sb.chunk_page_block(u64::from(extent) * self.sb.pages_per_extent, 0));
            let base = Superblock::off(self.sb.extent_block(extent));
            let mut cost = match self.zero_range(meta, meta_bytes, false) {
                Ok(c) => c,
                Err(e) => return Err(self.fail(format!("zeroing metadata failed: {e}"))),
            };
            let mut done = 0usize;
            while done < ext_bytes {
                let mut len = OFFLOAD_STEP_BYTES.min(ext_bytes - done);
                let half = ext_bytes / 2;
                let crash_mid = i == 0 && done < half && done + len >= half && crash_point("mid_zeroing");
                if crash_mid {
                    // Simulated crash with the first extent half zeroed.
                    len = half - done;
                }
                cost += match self.zero_range(base + done as u64, len, true) {
                    Ok(c) => c,
                    Err(e) => return Err(self.fail(format!("zeroing failed: {e}"))),
                };
                self.stats.bytes_zeroed_total.fetch_add(len as u64, Ordering::Relaxed);
                if crash_mid {
                    self.crashed = true;
                    return Ok(true);
                }
                done += len;
            }
            if !urgent {
                self.zero_tokens -= cost;
            }
        }
        // Zeros must be on stable storage before they are verified and declared free.
        if let Err(e) = self.disk.sync() {
            return Err(self.fail(format!("zeroing sync failed: {e}")));
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        if crash_point("after_zeroing_before_verify") {
            self.crashed = true;
            return Ok(true);
        }
        self.verify_queue.extend(extents.iter().copied());
        self.zero_job = self.next_to_verify();
        Ok(true)
    }

    /// Zeroes `len` bytes at `offset` with the disk's cheapest primitive (writing zeros
    /// where there is none); not synced. Returns the rate-limiter cost; bytes of
    /// extent data (`data`) zeroed without writing are counted in the stats.
    fn zero_range(&mut self, offset: u64, len: usize, data: bool) -> std::io::Result<f64> {
        let cheap = self.zeroing.is_cheap();
        let method = self.zeroing.zero(self.disk.file(), offset, len as u64)?;
        if data && method != ZeroMethod::Overwrite {
            self.stats.bytes_zeroed_offload_total.fetch_add(len as u64, Ordering::Relaxed);
        }
        match method {
            ZeroMethod::Overwrite => {
                let mut at = 0usize;
                while at < len {
                    let n = (len - at).min(self.zero_buf.len());
                    self.disk.write_at(offset + at as u64, &self.zero_buf[..n])?;
                    at += n;
                }
                Ok(len as f64)
            }
            _ => Ok(if cheap { OFFLOAD_COST_BYTES } else { len as f64 }),
        }
    }

    pub(super) fn answer_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let clean = !self.has_zero_work() && self.pending.is_empty() && self.zero_job.is_none();
        let now = Instant::now();
        let waiters = std::mem::take(&mut self.waiters);
        for (tx, deadline) in waiters {
            if clean {
                let _ = tx.send(Ok(true));
            } else if self.failed.is_some() || now >= deadline {
                let _ = tx.send(Ok(false));
            } else {
                self.waiters.push((tx, deadline));
            }
        }
    }
}
