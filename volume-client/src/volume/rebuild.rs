//! Filling a new replica from a survivor while the volume stays in use.
//!
//! A rebuild walks its segment in chunks. For each chunk it asks the actor
//! for an **exclusive range lock** — the same lock user writes take — so a
//! chunk is copied either entirely before or entirely after any overlapping
//! write, never interleaved with one:
//!
//! - a write that completed before the lock was granted is on the survivor
//!   (and was sent to the new replica too, since it joined the write set
//!   first), so the copy carries the same or newer bytes;
//! - a write that arrives while the chunk is copied waits for the lock, and
//!   then reaches the new replica after the copy, overwriting it.
//!
//! So the copy never overwrites a block newer than itself. Data moves as
//! ciphertext with the crcs the source stored: nothing is decrypted. Only
//! written blocks are copied (the `Allocated` bitmap skips the rest; a fresh
//! replica reads unwritten blocks as zeros already). A source that returns a
//! corrupt block is skipped for that run and repaired from the next source
//! under the same lock. Progress (blocks done out of the segment's length)
//! goes back to the actor with each unlock.

use super::actor::{classify, Event, Outcome};
use super::error::VolumeError;
use super::link::NodeLink;
use super::runs::{bit_runs, check_data, copy_requests};
use slate_protocol::message::{BlockRange, MAX_IO_BLOCKS};
use slate_protocol::{BlockIndex, NodeId, Reply, Request, SegmentIndex, Target};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

/// A chunk's lock, with the links to copy through.
#[derive(Debug)]
pub struct RebuildGrant {
    /// The lock's id, to hand back with [`Event::Unlock`].
    pub lock: u64,
    /// In-sync members, in the order to try them.
    pub sources: Vec<(NodeId, Arc<dyn NodeLink>)>,
    /// The replica being filled.
    pub target: Arc<dyn NodeLink>,
}

/// What a rebuild task needs to know.
#[derive(Debug)]
pub struct RebuildCtx {
    pub events: mpsc::UnboundedSender<Event>,
    pub target: Target,
    pub segment: SegmentIndex,
    pub node: NodeId,
    pub first_block: u64,
    pub len_blocks: u64,
    pub chunk_blocks: u64,
    pub request_timeout: Duration,
}

/// Releases a chunk's lock when dropped, also when the task is aborted.
struct LockGuard {
    events: mpsc::UnboundedSender<Event>,
    lock: u64,
    progress: Option<(SegmentIndex, NodeId, u64)>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Unlock { lock: self.lock, progress: self.progress.take() });
    }
}

#[derive(Debug)]
enum CopyError {
    Source(NodeId, String),
    Target(String),
    Fatal(VolumeError),
}

async fn call(link: &Arc<dyn NodeLink>, req: &Request, timeout: Duration) -> Outcome {
    let fut = link.start(req);
    classify(tokio::time::timeout(timeout, fut).await.unwrap_or(Err(super::link::LinkError::Timeout)))
}

/// Copies the whole segment into the new replica, then reports it done.
pub async fn run(ctx: RebuildCtx) {
    let mut done = 0u64;
    let mut copied = 0u64;
    while done < ctx.len_blocks {
        let n = ctx.chunk_blocks.min(ctx.len_blocks - done);
        let range = BlockRange { start: BlockIndex(ctx.first_block + done), count: n };
        let (tx, rx) = oneshot::channel();
        let ask = Event::LockRequest { segment: ctx.segment, target: ctx.node, range, reply: tx };
        if ctx.events.send(ask).is_err() {
            return;
        }
        let Ok(Some(grant)) = rx.await else {
            warn!(segment = %ctx.segment, node = %ctx.node, "rebuild stopped: the replica left the set or has no source");
            return;
        };
        let mut guard = LockGuard { events: ctx.events.clone(), lock: grant.lock, progress: None };
        match copy_range(&ctx, &grant, range).await {
            Ok(blocks) => {
                done += n;
                copied += blocks;
                guard.progress = Some((ctx.segment, ctx.node, done));
            }
            Err(CopyError::Source(src, why)) => {
                // The actor drops the source before it sees the unlock; the chunk is retried from another.
                let _ = ctx.events.send(Event::NodeDown { node: src, segment: Some(ctx.segment), why });
            }
            Err(CopyError::Target(why)) => {
                let _ = ctx.events.send(Event::NodeDown { node: ctx.node, segment: Some(ctx.segment), why });
                return;
            }
            Err(CopyError::Fatal(e)) => {
                let _ = ctx.events.send(Event::Fatal(e));
                return;
            }
        }
        drop(guard);
    }
    let _ = ctx.events.send(Event::RebuildDone { segment: ctx.segment, target: ctx.node, copied_blocks: copied });
}

async fn copy_range(ctx: &RebuildCtx, grant: &RebuildGrant, range: BlockRange) -> Result<u64, CopyError> {
    let t = ctx.target;
    let timeout = ctx.request_timeout;
    // Which blocks hold data, from the first source that answers.
    let (src, link) = &grant.sources[0];
    let bits = match call(link, &Request::Allocated { target: t, range }, timeout).await {
        Outcome::Ok(Reply::Bitmap(bits)) => bits,
        Outcome::Fatal(e) => return Err(CopyError::Fatal(e)),
        other => return Err(CopyError::Source(*src, format!("allocated query failed: {other:?}"))),
    };
    // Blocks the new replica holds but the source does not (a fresh replica has none; this
    // covers a replica left half-rebuilt by an earlier attachment) are unmapped there.
    let target_bits = match call(&grant.target, &Request::Allocated { target: t, range }, timeout).await {
        Outcome::Ok(Reply::Bitmap(b)) => b,
        Outcome::Fatal(e) => return Err(CopyError::Fatal(e)),
        other => return Err(CopyError::Target(format!("allocated query failed: {other:?}"))),
    };
    let mut extra = Vec::with_capacity(bits.len().max(target_bits.len()));
    for i in 0..bits.len().max(target_bits.len()) {
        extra.push(target_bits.get(i).copied().unwrap_or(0) & !bits.get(i).copied().unwrap_or(0));
    }
    for (first, len, set) in bit_runs(&extra, range.count as usize) {
        if set {
            let trim = Request::Trim {
                target: t,
                range: BlockRange { start: BlockIndex(range.start.0 + first as u64), count: len as u64 },
            };
            match call(&grant.target, &trim, timeout).await {
                Outcome::Ok(Reply::Done) => {}
                Outcome::Fatal(e) => return Err(CopyError::Fatal(e)),
                other => return Err(CopyError::Target(format!("rebuild trim failed: {other:?}"))),
            }
        }
    }
    let mut copied = 0u64;
    for (first, len, set) in bit_runs(&bits, range.count as usize) {
        if !set {
            continue;
        }
        let mut pos = first;
        while pos < first + len {
            let m = (first + len - pos).min(MAX_IO_BLOCKS as usize);
            let start = BlockIndex(range.start.0 + pos as u64);
            copied += copy_run(ctx, grant, start, m).await?;
            pos += m;
        }
    }
    Ok(copied)
}

/// Copies `count` blocks at `start` from the first source with a good copy.
async fn copy_run(ctx: &RebuildCtx, grant: &RebuildGrant, start: BlockIndex, count: usize) -> Result<u64, CopyError> {
    let t = ctx.target;
    let timeout = ctx.request_timeout;
    let read = Request::Read { target: t, start, count: count as u32 };
    let mut bad: Vec<&(NodeId, Arc<dyn NodeLink>)> = Vec::new();
    for source in &grant.sources {
        let (node, link) = source;
        match call(link, &read, timeout).await {
            Outcome::Ok(Reply::Data { written, crcs, data }) => {
                if check_data(count, &written, &crcs, &data).is_err() {
                    warn!(%node, %start, "rebuild source sent a block that fails its checksum");
                    bad.push(source);
                    continue;
                }
                for req in copy_requests(t, start, &written, &crcs, &data, None, false) {
                    match call(&grant.target, &req, timeout).await {
                        Outcome::Ok(Reply::Done) => {}
                        Outcome::Fatal(e) => return Err(CopyError::Fatal(e)),
                        other => return Err(CopyError::Target(format!("rebuild write failed: {other:?}"))),
                    }
                }
                for (bad_node, bad_link) in bad {
                    warn!(node = %bad_node, %start, "repairing a corrupt block of a source during rebuild");
                    for req in copy_requests(t, start, &written, &crcs, &data, None, true) {
                        match call(bad_link, &req, timeout).await {
                            Outcome::Ok(Reply::Done) => {}
                            Outcome::Fatal(e) => return Err(CopyError::Fatal(e)),
                            other => {
                                return Err(CopyError::Source(*bad_node, format!("repair write failed: {other:?}")))
                            }
                        }
                    }
                }
                let n = (0..count).filter(|i| slate_protocol::message::bit(&written, *i)).count();
                return Ok(n as u64);
            }
            Outcome::Corrupt(block) => {
                warn!(%node, ?block, "rebuild source holds a corrupt block; trying another source");
                bad.push(source);
            }
            Outcome::Fatal(e) => return Err(CopyError::Fatal(e)),
            other => return Err(CopyError::Source(*node, format!("rebuild read failed: {other:?}"))),
        }
    }
    error!(
        volume = %t.volume, segment = %ctx.segment, %start, count,
        "no source holds a good copy of these blocks; they stay unwritten on the new replica"
    );
    Ok(0)
}
