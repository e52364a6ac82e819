//! The write path, top to bottom: the thread's loop takes commands off the
//! channel, plans them in arrival order, starts their data writes, commits one
//! journal entry with one fdatasync behind it, and only then replies.
//!
//! One batch = everything queued when the thread wakes (up to a bound), cut
//! before the first command whose blocks overlap a data I/O already in the
//! batch, so overlapping requests are applied in arrival order and two writes
//! to one physical block are never in flight together. Planning a command
//! changes the in-RAM state and emits journal records through [`Core::emit`],
//! which applies each record with the same [`Core::apply`] that replay uses:
//! live operation and recovery cannot disagree. Then:
//!
//! 1. if the batch touches write-intent regions not yet recorded, one small
//!    entry with those intents + fdatasync (so an intent is durable before any
//!    data it covers can reach the disk);
//! 2. the data writes, the reads and the batch's journal entry in one io_uring
//!    submission, an fdatasync drained behind them;
//! 3. only then the replies.

use super::{crash_point, Core, MAX_IO_BLOCKS, PIN_BUDGET_PAGES};
use crate::engine::journal::{encode_entry, Record};
use crate::engine::layout::Superblock;
use crate::engine::uring::{AlignedBuf, Completion, Fsync, ALIGN};
use crate::engine::{Cmd, Done, EngineError, ExtentPhase, Reply};
use bytes::Bytes;
use slate_protocol::stages::Stage;
use slate_protocol::{BlockIndex, BlockRange, Epoch, VolumeId};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Data bytes (write and read buffers) one batch may hold.
const MAX_BATCH_DATA_BYTES: usize = 64 << 20;
/// Background records that are committed on their own once this many are pending.
const PENDING_FLUSH_RECORDS: usize = 512;

/// What a queued command replies once its commit is durable.
#[derive(Debug)]
pub(super) enum ItemReply {
    /// Background records (zeroer, lazy intent clears): nobody waits.
    None,
    Unit(Done),
    Ranges(Reply<Vec<BlockRange>>, Vec<BlockRange>),
    Bitmap(Reply<Vec<u8>>, Vec<u8>),
    Epochs(Reply<Vec<Epoch>>, Vec<Epoch>),
    Extents(Reply<Vec<u32>>, Vec<u32>),
    Phases(Reply<Vec<ExtentPhase>>, Vec<ExtentPhase>),
}

/// The data I/O of a queued write.
#[derive(Debug)]
pub(super) enum DataState {
    None,
    /// Waiting for the commit of its write-intent item (`after`).
    Deferred {
        buf: AlignedBuf,
        parts: Vec<(bool, u64, usize, usize)>,
        after: u64,
        range: (VolumeId, u64, u64),
    },
    InFlight {
        range: (VolumeId, u64, u64),
        /// When the data was submitted (the `disk_write` stage).
        since: Instant,
    },
    Done,
}

/// A planned command between planning and its durable reply, in arrival order.
#[derive(Debug)]
pub(super) struct Item {
    seq: u64,
    records: Vec<Record>,
    record_bytes: usize,
    reply: ItemReply,
    data: DataState,
    /// Volume blocks this uncommitted write covers (for ordering overlapping requests).
    range: Option<(VolumeId, u64, u64)>,
    io_err: Option<String>,
    planned_at: Instant,
}

/// The commit in flight: one journal entry and its fdatasync.
#[derive(Debug)]
pub(super) struct Commit {
    items: Vec<Item>,
    lsn: u64,
    at: u64,
    nblocks: u64,
    last_seq: u64,
    epoch: u64,
    /// The entry is written (and, if `drained`, synced).
    entry_done: bool,
    drained: bool,
    /// Items of this commit whose data is still being written.
    data_pending: usize,
    fsync_started: bool,
    /// When a separate fdatasync was submitted (the `fdatasync` stage).
    fsync_at: Option<Instant>,
}

const COMMIT_TOKEN: u64 = 1 << 63;
const COMMIT_FSYNC_TOKEN: u64 = COMMIT_TOKEN | 1;
pub(super) const READ_TOKEN: u64 = 1 << 62;

/// What planning one command produced: journal records, and write-intent records
/// that must be durable before the command's data may reach the disk.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) records: Vec<Record>,
    pub(super) intent_records: Vec<Record>,
    pub(super) record_bytes: usize,
}

impl Core {
    /// The engine thread's event loop.
    pub(in crate::engine) fn run(mut self, rx: &mpsc::Receiver<Cmd>) -> Result<(), EngineError> {
        let mut shutting_down = false;
        let mut completions: Vec<Completion> = Vec::new();
        loop {
            // Intake.
            if !shutting_down {
                loop {
                    match rx.try_recv() {
                        Ok(Cmd::Crash) => return Ok(()),
                        Ok(Cmd::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                            shutting_down = true;
                            break;
                        }
                        Ok(c) => self.queue.push_back(c),
                        Err(mpsc::TryRecvError::Empty) => break,
                    }
                }
            }
            self.plan_queue();
            if self.crashed {
                return Ok(());
            }
            self.submit_deferred();
            self.try_commit();
            if self.crashed {
                return Ok(());
            }
            if self.pipeline_idle() {
                self.run_drained_work();
                if self.crashed {
                    return Ok(());
                }
                if shutting_down && self.queue.is_empty() && self.pipeline_idle() {
                    return self.shutdown();
                }
            }
            if let Err(e) = self.background() {
                tracing::warn!(error = %e, "engine background work failed");
            }
            if self.crashed {
                return Ok(());
            }
            self.try_commit();
            // Wait for completions, a new command or the next background deadline.
            let timeout = self.wait_timeout(shutting_down);
            let blocking = !timeout.is_zero();
            if blocking && !shutting_down {
                self.waker.set_sleeping(true);
                match rx.try_recv() {
                    Ok(c) => {
                        self.waker.set_sleeping(false);
                        match c {
                            Cmd::Crash => return Ok(()),
                            Cmd::Shutdown => shutting_down = true,
                            c => self.queue.push_back(c),
                        }
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.waker.set_sleeping(false);
                        shutting_down = true;
                        continue;
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                }
            }
            let res = self.ring.wait(Some(timeout), &mut completions);
            self.waker.set_sleeping(false);
            if let Err(e) = res {
                let _ = self.fail(format!("io_uring wait failed: {e}"));
            }
            for c in completions.drain(..) {
                self.complete(c);
                if self.crashed {
                    return Ok(());
                }
            }
        }
    }

    fn plan_queue(&mut self) {
        while let Some(cmd) = self.queue.front() {
            if !self.can_plan(cmd) {
                break;
            }
            let Some(cmd) = self.queue.pop_front() else { break };
            self.plan(cmd);
            if self.crashed {
                return;
            }
        }
    }

    /// Whether the command at the head of the queue can be planned now: it does not
    /// overlap blocks with uncommitted writes (or, for a write, in-flight reads), and
    /// the pipeline has room.
    pub(super) fn can_plan(&self, cmd: &Cmd) -> bool {
        if self.want_checkpoint {
            return false;
        }
        if self.fifo.len() >= self.opts.max_batch_commands.max(1) * 2
            || self.inflight_data_bytes >= MAX_BATCH_DATA_BYTES
            || self.fifo_record_bytes >= self.max_entry_bytes * 2
            || self.cache.pinned_count() + PIN_BUDGET_PAGES > self.cache.cap()
        {
            return false;
        }
        let overlaps_write = |v: VolumeId, s: u64, e: u64| {
            self.fifo
                .iter()
                .chain(self.committing.iter().flat_map(|c| c.items.iter()))
                .filter_map(|i| i.range)
                .any(|(iv, is, ie)| iv == v && is < e && s < ie)
        };
        let overlaps_read =
            |v: VolumeId, s: u64, e: u64| self.reads.values().any(|r| r.range.0 == v && r.range.1 < e && s < r.range.2);
        match cmd {
            Cmd::Write { volume, start, crcs, .. } => {
                let end = start.0.saturating_add(crcs.len() as u64);
                !overlaps_write(*volume, start.0, end) && !overlaps_read(*volume, start.0, end)
            }
            Cmd::Read { volume, start, count, .. } => {
                !overlaps_write(*volume, start.0, start.0.saturating_add(u64::from(*count)))
            }
            // These run alone, with the pipeline drained.
            Cmd::DeleteLayer { .. } | Cmd::Checkpoint { .. } | Cmd::Scrub { .. } | Cmd::RepairBlock { .. } => false,
            _ => true,
        }
    }

    pub(super) fn new_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.cur_seq = self.next_seq;
        self.next_seq
    }

    /// Plans one command, in arrival order: a write here, any other command in
    /// `commands.rs`.
    fn plan(&mut self, cmd: Cmd) {
        let failed = self.failed.clone().map(EngineError::Failed);
        let seq = self.new_seq();
        match cmd {
            Cmd::Write { volume, start, crcs, data, tx, sent } => {
                Stage::EngineQueue.since(sent);
                if let Some(e) = failed {
                    tx.send(Err(e));
                    return;
                }
                let mut b = Batch::default();
                match self.plan_write(&mut b, volume, start, &crcs, &data) {
                    Ok((buf, parts)) => {
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                        self.stats.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
                        let range = (volume, start.0, start.0 + crcs.len() as u64);
                        let parts: Vec<(bool, u64, usize, usize)> =
                            parts.into_iter().map(|(off, s, e)| (true, off, s, e)).collect();
                        if b.intent_records.is_empty() {
                            self.inflight_data_bytes += buf.len();
                            self.ring.start(seq, buf, &parts, Fsync::No);
                            self.push_item(
                                seq,
                                b.records,
                                b.record_bytes,
                                ItemReply::Unit(tx),
                                DataState::InFlight { range, since: Instant::now() },
                            );
                        } else {
                            // The intent must be durable before any of the data can reach the disk.
                            let intents = std::mem::take(&mut b.intent_records);
                            let n = intents.len() * 24;
                            self.push_item(seq, intents, n, ItemReply::None, DataState::None);
                            let wseq = self.new_seq();
                            self.push_item(
                                wseq,
                                b.records,
                                b.record_bytes,
                                ItemReply::Unit(tx),
                                DataState::Deferred { buf, parts, after: seq, range },
                            );
                        }
                    }
                    Err(e) => {
                        self.salvage(b);
                        tx.send(Err(e));
                    }
                }
            }
            cmd => self.plan_command(seq, failed, cmd),
        }
    }

    #[allow(clippy::type_complexity)]
    fn plan_write(
        &mut self,
        b: &mut Batch,
        volume: VolumeId,
        start: BlockIndex,
        crcs: &[u32],
        data: &Bytes,
    ) -> Result<(AlignedBuf, Vec<(u64, usize, usize)>), EngineError> {
        let count = crcs.len();
        if count == 0 || count > MAX_IO_BLOCKS || data.len() != count * ALIGN {
            return Err(EngineError::Invalid(format!("write of {count} blocks with {} bytes", data.len())));
        }
        let pieces = self.pieces(volume, start.0, count as u64)?;
        let eb = self.sb.extent_blocks;
        // Allocate every extent the write needs before changing anything else.
        let mut recs = std::mem::take(&mut b.records);
        let mut runs: Vec<(u32, u32, usize, usize)> = Vec::new(); // (extent, off, first idx, len)
        let res = (|| {
            for &(key, sblock, n, idx0) in &pieces {
                let head = self.cat.segments.get(&key).map(|s| s.layers.len() - 1).ok_or(EngineError::NotAssigned)?;
                let head_id = self.cat.segments[&key].layers[head].id;
                let mut sb = sblock;
                let mut idx = idx0 as usize;
                while sb < sblock + n {
                    let slot = (sb / eb) as u32;
                    let off = (sb % eb) as u32;
                    let len = (eb - u64::from(off)).min(sblock + n - sb) as usize;
                    let existing = self.cat.segments[&key].layers[head].extents.get(&slot).copied();
                    let extent = match existing {
                        Some(e) => e,
                        None => self.alloc(&mut recs, key, head_id, slot)?,
                    };
                    runs.push((extent, off, idx, len));
                    sb += len as u64;
                    idx += len;
                }
            }
            Ok::<(), EngineError>(())
        })();
        b.records = recs;
        res?;
        self.note_intents(b, volume, start.0, count as u64)?;
        let buf = AlignedBuf::copy_from(data);
        let mut parts = Vec::with_capacity(runs.len());
        let mut recs = std::mem::take(&mut b.records);
        for (extent, off, idx, len) in runs {
            let r = Record::Write { extent, offset: off, crcs: crcs[idx..idx + len].to_vec() };
            b.record_bytes += r.encoded_len();
            if let Err(e) = self.emit(&mut recs, r) {
                b.records = recs;
                return Err(e);
            }
            let phys = Superblock::off(self.sb.extent_block(extent) + u64::from(off));
            parts.push((phys, idx * ALIGN, (idx + len) * ALIGN));
        }
        b.records = recs;
        Ok((buf, parts))
    }

    /// Records emitted by a command that then failed still have to be journaled.
    pub(super) fn salvage(&mut self, b: Batch) {
        self.pending.extend(b.intent_records);
        self.pending.extend(b.records);
    }

    /// Appends a planned command to the commit queue.
    pub(super) fn push_item(
        &mut self,
        seq: u64,
        records: Vec<Record>,
        record_bytes: usize,
        reply: ItemReply,
        data: DataState,
    ) {
        let range = match &data {
            DataState::Deferred { range, .. } | DataState::InFlight { range, .. } => Some(*range),
            DataState::None | DataState::Done => None,
        };
        self.fifo_record_bytes += record_bytes;
        self.fifo.push_back(Item {
            seq,
            records,
            record_bytes,
            reply,
            data,
            range,
            io_err: None,
            planned_at: Instant::now(),
        });
    }

    /// Starts the data of writes whose write-intent records are now durable.
    fn submit_deferred(&mut self) {
        let committed = self.committed_seq;
        for i in 0..self.fifo.len() {
            let ready = matches!(&self.fifo[i].data, DataState::Deferred { after, .. } if *after <= committed);
            if !ready {
                continue;
            }
            let seq = self.fifo[i].seq;
            let data = std::mem::replace(&mut self.fifo[i].data, DataState::None);
            if let DataState::Deferred { buf, parts, range, .. } = data {
                self.inflight_data_bytes += buf.len();
                self.ring.start(seq, buf, &parts, Fsync::No);
                self.fifo[i].data = DataState::InFlight { range, since: Instant::now() };
            }
        }
    }

    /// Starts a commit of the longest prefix of the queue whose data is written: one
    /// journal entry (background records first, then the prefix's records in arrival
    /// order) and one fdatasync behind it.
    fn try_commit(&mut self) {
        if self.committing.is_some() || self.crashed {
            return;
        }
        let mut n = 0;
        let mut bytes = 0;
        for item in &self.fifo {
            // Data still being written may join: the fdatasync waits for it. Data not yet
            // submitted (waiting for its intent to be durable) may not.
            let ready = !matches!(item.data, DataState::Deferred { .. });
            if !ready || (n > 0 && bytes + item.record_bytes > self.max_entry_bytes) {
                break;
            }
            bytes += item.record_bytes;
            n += 1;
        }
        if n == 0 {
            // Background records alone (zeroer transitions, lazy intent clears) are
            // committed in bulk, when the zeroer has nothing left, or by a checkpoint.
            let flush = self.pending.len() >= PENDING_FLUSH_RECORDS || !self.has_zero_work();
            if self.pending.is_empty() || !self.fifo.is_empty() || !flush || self.want_checkpoint {
                return;
            }
        }
        // Gather: more commands are probably on their way (the last commit carried more).
        let clients = self.fifo.iter().take(n).filter(|i| !matches!(i.reply, ItemReply::None)).count();
        if n > 0 && clients < self.last_commit_items && !self.want_checkpoint {
            let window = (self.commit_latency / 2).min(Duration::from_micros(500));
            let until = self.fifo[0].planned_at + window;
            if Instant::now() < until {
                self.gather_until = Some(until);
                return;
            }
        }
        self.gather_until = None;
        self.last_commit_items = clients.max(1);
        self.commit_started = Instant::now();
        let items: Vec<Item> = self.fifo.drain(..n).collect();
        for item in items.iter().filter(|i| !matches!(i.reply, ItemReply::None)) {
            Stage::CommitWait.record(self.commit_started - item.planned_at);
        }
        if clients > 0 {
            Stage::CommitItems.count(clients as u64);
        }
        self.fifo_record_bytes = self.fifo_record_bytes.saturating_sub(bytes);
        let last_seq = items.last().map_or(self.committed_seq, |i| i.seq);
        let mut records = std::mem::take(&mut self.pending);
        for item in &items {
            records.extend(item.records.iter().cloned());
        }
        if let Some(f) = self.failed.clone() {
            Self::reply_items(items, Some(&f));
            return;
        }
        let data_pending = items.iter().filter(|i| matches!(i.data, DataState::InFlight { .. })).count();
        if records.is_empty() && data_pending == 0 {
            // Only queries and flushes: everything before them is durable already.
            self.committed_seq = self.committed_seq.max(last_seq);
            Self::reply_items(items, None);
            return;
        }
        if crash_point("after_data_write_before_journal") {
            self.crashed = true;
            return;
        }
        let lsn = self.journal.next_lsn;
        let entry = encode_entry(self.sb.nonce, lsn, &records);
        let nblocks = (entry.len() / ALIGN) as u64;
        let Some(at) = self.journal.place(nblocks) else {
            let j = &self.journal;
            let why = format!("journal full: entry {nblocks} blocks, head {} tail {} of {}", j.head, j.tail, j.blocks);
            let f = self.fail(why).to_string();
            Self::reply_items(items, Some(&f));
            return;
        };
        let offset = self.journal.disk_offset(at);
        if crash_point("after_journal_before_fsync") {
            let _ = self.disk.write_at(offset, &entry);
            self.crashed = true;
            return;
        }
        self.stats.journal_bytes_written.fetch_add(entry.len() as u64, Ordering::Relaxed);
        let len = entry.len();
        // With nothing else in flight but this commit's data, the fdatasync can be
        // drained behind the entry and the data in the same submission, which saves a
        // wake-up of this thread. But IO_DRAIN also holds back every later submission
        // until the fdatasync completes, so under load (more than one client write in
        // this commit: the next batch's data is on its way) the fdatasync waits for the
        // completions instead and the next batch's data writes overlap it.
        let drained = self.ring.busy() == data_pending && clients <= 1;
        let fsync = if drained { Fsync::Drain } else { Fsync::No };
        self.ring.start(COMMIT_TOKEN, entry, &[(true, offset, 0, len)], fsync);
        self.fsync_epoch += 1;
        self.committing = Some(Commit {
            items,
            lsn,
            at,
            nblocks,
            last_seq,
            epoch: self.fsync_epoch - 1,
            entry_done: false,
            drained,
            data_pending,
            fsync_started: drained,
            fsync_at: None,
        });
    }

    /// Starts the commit's fdatasync once its entry and all its data are written.
    fn maybe_commit_fsync(&mut self) {
        if let Some(c) = &mut self.committing {
            if c.entry_done && c.data_pending == 0 && !c.fsync_started {
                c.fsync_started = true;
                c.fsync_at = Some(Instant::now());
                self.ring.start_fsync(COMMIT_FSYNC_TOKEN);
            }
        }
    }

    fn complete(&mut self, c: Completion) {
        if c.user == COMMIT_TOKEN {
            let done = match &mut self.committing {
                Some(commit) => {
                    commit.entry_done = true;
                    commit.drained || c.result.is_err()
                }
                None => return,
            };
            if done {
                self.finish_commit(c.result);
            } else {
                self.maybe_commit_fsync();
            }
        } else if c.user == COMMIT_FSYNC_TOKEN {
            if let Some(at) = self.committing.as_ref().and_then(|c| c.fsync_at) {
                Stage::Fdatasync.since(at);
            }
            self.finish_commit(c.result);
        } else if c.user & READ_TOKEN != 0 {
            self.finish_read(c);
        } else {
            // A write's data.
            if let Some(buf) = &c.buf {
                self.inflight_data_bytes = self.inflight_data_bytes.saturating_sub(buf.len());
            }
            let err = c.result.err().map(|e| e.to_string());
            let data_since = |d: &DataState| {
                if let DataState::InFlight { since, .. } = d {
                    Stage::DiskWrite.since(*since);
                }
            };
            if let Ok(i) = self.fifo.binary_search_by_key(&c.user, |i| i.seq) {
                data_since(&self.fifo[i].data);
                self.fifo[i].io_err = err;
                self.fifo[i].data = DataState::Done;
            } else if let Some(commit) = &mut self.committing {
                if let Ok(i) = commit.items.binary_search_by_key(&c.user, |i| i.seq) {
                    data_since(&commit.items[i].data);
                    commit.items[i].io_err = err;
                    commit.items[i].data = DataState::Done;
                    commit.data_pending -= 1;
                }
                self.maybe_commit_fsync();
            }
        }
    }

    fn finish_commit(&mut self, result: std::io::Result<()>) {
        let Some(commit) = self.committing.take() else { return };
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            let f = self.fail(format!("journal commit failed: {e}")).to_string();
            Self::reply_items(commit.items, Some(&f));
            return;
        }
        self.journal.advance(commit.at, commit.nblocks);
        let took = self.commit_started.elapsed();
        Stage::EngineCommit.record(took);
        self.commit_latency = (self.commit_latency * 7 + took) / 8;
        self.durable_lsn = commit.lsn;
        self.committed_seq = self.committed_seq.max(commit.last_seq);
        self.cache.unpin_upto(commit.last_seq);
        self.evicted_unsynced.retain(|_, e| *e > commit.epoch);
        if crash_point("before_ack") {
            self.crashed = true;
            return;
        }
        self.publish();
        Self::reply_items(commit.items, None);
        self.note_cache_size();
    }

    fn reply_items(items: Vec<Item>, failed: Option<&str>) {
        for item in items {
            let err = failed
                .map(|f| EngineError::Failed(f.to_string()))
                .or_else(|| item.io_err.map(|e| EngineError::Io(std::io::Error::other(e))));
            match item.reply {
                ItemReply::None => {}
                ItemReply::Unit(tx) => tx.send(err.map_or(Ok(()), Err)),
                ItemReply::Ranges(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Bitmap(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Epochs(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Extents(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
                ItemReply::Phases(tx, v) => {
                    let _ = tx.send(err.map_or(Ok(v), Err));
                }
            }
        }
    }
}
