//! A clone's parent: the layering of a clone over a snapshot of another volume,
//! done in the client (as librbd does for Ceph RBD clones).
//!
//! A clone is a volume of its own (its own segments, replicas, generation)
//! that shares its parent's DEK. Its [`Parent`] is a second, read-only
//! [`Volume`] opened on the parent's layout at the snapshot's epoch
//! (`VolumeConfig::read_epoch`) with a read-only capability for the parent.
//!
//! * **Reads**: the clone's own blocks first; blocks the clone never wrote (its
//!   nodes' written bit is clear) are read from the parent at the epoch, and
//!   past the parent's size they are zeros.
//! * **Trim and write-zeroes** must not let the parent show through again:
//!   where the parent holds data they become writes of encrypted zero blocks;
//!   elsewhere (and past the parent's size) they stay trims.
//! * **Block status** is the union of the clone's own allocation and the parent's.
//! * **Flatten** ([`Volume::copy_from_parent`]): blocks the parent holds and the
//!   clone has not written are copied into the clone as ciphertext, unchanged:
//!   the same DEK and the same tweak (the block index) make the parent's
//!   ciphertext the clone's, so nothing is decrypted and re-encrypted, and no
//!   plaintext is ever held. Copying only what the clone has not written makes
//!   a step idempotent, so an interrupted flatten just runs again.
//!
//! A parent whose generation moved on (a new read-write attachment of the
//! parent fences older capabilities) or whose capability lapsed is opened
//! again through a [`ParentOpener`] and the read retried once.
//!
//! Nothing here writes the parent: its capability grants reads only.

use super::actor::{Cmd, ReadChunk};
use super::{Volume, VolumeError};
use slate_protocol::message::{bit, MAX_IO_BLOCKS};
use slate_protocol::{BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES_U64};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::RwLock;
use tracing::{info, warn};

/// Opens the parent's read-only volume again (a fresh capability at the
/// parent's current generation, its current layout).
#[async_trait::async_trait]
pub trait ParentOpener: Send + Sync + std::fmt::Debug + 'static {
    async fn open(&self) -> Result<Volume, VolumeError>;
}

/// What one flatten step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStep {
    /// Blocks copied from the parent into the clone.
    pub copied: u64,
    /// Blocks the clone had written already (nothing to copy).
    pub own: u64,
    /// Blocks the parent never wrote (or past its size): they read as zeros either way.
    pub empty: u64,
}

/// A clone's parent: the read-only volume it reads through, at the snapshot's epoch.
pub struct Parent {
    current: RwLock<Arc<Volume>>,
    /// The parent's size in blocks: blocks past it read as zeros unless the clone wrote them.
    blocks: AtomicU64,
    opener: Option<Arc<dyn ParentOpener>>,
    reopened: AtomicU64,
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent")
            .field("blocks", &self.blocks())
            .field("reopened", &self.reopened.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Parent {
    /// A parent over `volume` (opened read-only at the snapshot's epoch); `opener`
    /// opens it again after it was fenced or its capability lapsed.
    pub fn new(volume: Volume, opener: Option<Arc<dyn ParentOpener>>) -> Self {
        let blocks = volume.size_now() / BLOCK_SIZE_BYTES_U64;
        Self { current: RwLock::new(Arc::new(volume)), blocks: AtomicU64::new(blocks), opener, reopened: 0.into() }
    }

    /// The parent's size in blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// How often the parent was opened again.
    pub fn reopened(&self) -> u64 {
        self.reopened.load(Ordering::Relaxed)
    }

    /// Runs `f` on the parent's volume; a parent fenced or refused by its nodes is
    /// opened again (once) and `f` retried on it.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, VolumeError>
    where
        F: Fn(Arc<Volume>) -> Fut,
        Fut: Future<Output = Result<T, VolumeError>>,
    {
        let v = Arc::clone(&*self.current.read().await);
        match f(Arc::clone(&v)).await {
            Err(e @ (VolumeError::Fenced | VolumeError::Denied(_))) if self.opener.is_some() => {
                warn!(parent = %v.id(), error = %e, "the clone's parent refused its reader; opening it again");
                f(self.reopen(&v).await?).await
            }
            other => other,
        }
    }

    async fn reopen(&self, stale: &Arc<Volume>) -> Result<Arc<Volume>, VolumeError> {
        let mut cur = self.current.write().await;
        if !Arc::ptr_eq(&cur, stale) {
            return Ok(Arc::clone(&cur)); // another caller opened it again meanwhile
        }
        let opener = self.opener.as_ref().ok_or(VolumeError::Closed)?;
        let fresh = Arc::new(opener.open().await?);
        self.blocks.store(fresh.size_now() / BLOCK_SIZE_BYTES_U64, Ordering::Release);
        self.reopened.fetch_add(1, Ordering::Relaxed);
        info!(parent = %fresh.id(), "the clone's parent is open again");
        // The old reader stops once its last in-flight read is done and its last handle goes.
        *cur = Arc::clone(&fresh);
        Ok(fresh)
    }

    /// Which of `count` blocks from `start` the parent holds (past its size: none).
    async fn written(&self, start: u64, count: u64) -> Result<Vec<bool>, VolumeError> {
        let n = self.blocks().saturating_sub(start).min(count);
        let mut out = vec![false; count as usize];
        let mut at = 0;
        while at < n {
            // At an epoch the nodes tell by reading: one read's worth at a time.
            let len = (n - at).min(u64::from(MAX_IO_BLOCKS));
            // Boxed: the parent is a `Volume` too, so its calls recurse into this module's types.
            let bits = self.call(|v| async move { Box::pin(v.allocated_blocks(start + at, len)).await }).await?;
            out[at as usize..(at + len) as usize].copy_from_slice(&bits);
            at += len;
        }
        Ok(out)
    }

    /// Fills the blocks of `out` (plaintext of `count` blocks from `start`) that the
    /// clone has not written (`own[i]` false) from the parent.
    pub(super) async fn fill(&self, start: u64, own: &[bool], out: &mut [u8]) -> Result<(), VolumeError> {
        let n = self.blocks().saturating_sub(start).min(own.len() as u64) as usize;
        let (Some(first), Some(last)) = (own[..n].iter().position(|w| !w), own[..n].iter().rposition(|w| !w)) else {
            return Ok(());
        };
        let at = start + first as u64;
        let len = (last - first + 1) as u64;
        let data = self.call(|v| async move { Box::pin(v.read_blocks(at, len)).await }).await?;
        for i in first..=last {
            if !own[i] {
                let src = &data[(i - first) * BLOCK_SIZE_BYTES..(i - first + 1) * BLOCK_SIZE_BYTES];
                out[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES].copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Adds the parent's allocation to the blocks the clone has not written.
    pub(super) async fn union_allocated(&self, start: u64, bits: &mut [bool]) -> Result<(), VolumeError> {
        let (Some(first), Some(last)) = (bits.iter().position(|b| !b), bits.iter().rposition(|b| !b)) else {
            return Ok(());
        };
        let theirs = self.written(start + first as u64, (last - first + 1) as u64).await?;
        for (b, t) in bits[first..=last].iter_mut().zip(theirs) {
            *b |= t;
        }
        Ok(())
    }
}

/// Bits of `count` blocks from read chunks (the nodes' written bitmaps).
fn written_bits(chunks: &[ReadChunk], count: u64) -> Vec<bool> {
    let mut out = vec![false; count as usize];
    for c in chunks {
        for i in 0..c.count as usize {
            out[c.offset as usize + i] = bit(&c.written, i);
        }
    }
    out
}

/// Runs of equal values: (first, len, value).
fn runs(bits: &[bool]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (i, b) in bits.iter().enumerate() {
        match out.last_mut() {
            Some(last) if last.2 == *b => last.1 += 1,
            _ => out.push((i, 1, *b)),
        }
    }
    out
}

impl Volume {
    /// Makes this volume a clone reading through `parent` where it has not written.
    pub fn with_parent(mut self, parent: Parent) -> Self {
        self.parent = Some(parent);
        self
    }

    /// The parent this clone reads through, if it is one.
    pub fn parent(&self) -> Option<&Parent> {
        self.parent.as_ref()
    }

    /// Reads `count` blocks from `start` as the nodes store them: ciphertext, with
    /// the written bitmap of each piece (this volume's own blocks only, never the parent's).
    pub async fn read_ciphertext(&self, start: u64, count: u64) -> Result<Vec<ReadChunk>, VolumeError> {
        let permit = self.permit(count).await?;
        self.ask(|reply| Cmd::Read { start, count, permit: Some(permit), reply }).await
    }

    /// Which blocks this volume's own layer holds (never the parent's).
    pub(super) async fn own_allocated(&self, start: u64, count: u64) -> Result<Vec<bool>, VolumeError> {
        let chunks = if self.read_epoch.is_some() {
            self.read_ciphertext(start, count).await?
        } else {
            let permit = self.permit(0).await?;
            self.ask(|reply| Cmd::BlockStatus { start, count, permit: Some(permit), reply }).await?
        };
        Ok(written_bits(&chunks, count))
    }

    /// Reads own blocks and fills the rest from the parent: `count` blocks of plaintext.
    pub(super) async fn fill_from_parent(
        &self,
        parent: &Parent,
        start: u64,
        chunks: &[ReadChunk],
        out: &mut [u8],
    ) -> Result<(), VolumeError> {
        parent.fill(start, &written_bits(chunks, (out.len() / BLOCK_SIZE_BYTES) as u64), out).await
    }

    /// A clone's trim or write-zeroes: encrypted zero blocks where the parent holds
    /// data (so it never shows through again), an ordinary trim elsewhere.
    pub(super) async fn trim_clone(
        &self,
        parent: &Parent,
        start: u64,
        count: u64,
        zeroes: bool,
    ) -> Result<(), VolumeError> {
        let end = start + count;
        let mut at = start;
        while at < end {
            let len = (end - at).min(u64::from(MAX_IO_BLOCKS));
            let theirs = parent.written(at, len).await?;
            for (first, n, held) in runs(&theirs) {
                let s = at + first as u64;
                if held {
                    self.write_blocks(s, &vec![0u8; n * BLOCK_SIZE_BYTES], false).await?;
                } else {
                    self.trim_own(s, n as u64, zeroes).await?;
                }
            }
            at += len;
        }
        Ok(())
    }

    /// One step of a flatten: copies, from `count` blocks at `start`, those the parent
    /// holds and this clone has not written, as ciphertext. Idempotent: a step run
    /// again finds them written and copies nothing.
    pub async fn copy_from_parent(&self, start: u64, count: u64) -> Result<CopyStep, VolumeError> {
        let parent = self.parent.as_ref().ok_or_else(|| VolumeError::Layout("the volume is not a clone".into()))?;
        let end = (start + count).min(self.size_now());
        let mut step = CopyStep::default();
        let mut at = start;
        while at < end {
            let len = (end - at).min(u64::from(MAX_IO_BLOCKS));
            let own = self.own_allocated(at, len).await?;
            let own_n = own.iter().filter(|w| **w).count() as u64;
            let copied_before = step.copied;
            let inside = parent.blocks().saturating_sub(at).min(len) as usize;
            let todo: Vec<usize> = (0..inside).filter(|i| !own[*i]).collect();
            if let (Some(&first), Some(&last)) = (todo.first(), todo.last()) {
                let (s, n) = (at + first as u64, (last - first + 1) as u64);
                let chunks = parent.call(|v| async move { v.read_ciphertext(s, n).await }).await?;
                for c in &chunks {
                    // Runs of blocks the parent wrote and the clone did not: copied as stored.
                    let base = first + c.offset as usize;
                    let want: Vec<bool> = (0..c.count as usize).map(|i| bit(&c.written, i) && !own[base + i]).collect();
                    for (i, m, copy) in runs(&want) {
                        if copy {
                            let data = c.data.slice(i * BLOCK_SIZE_BYTES..(i + m) * BLOCK_SIZE_BYTES);
                            self.write_ciphertext_blocks(s + c.offset + i as u64, data).await?;
                            step.copied += m as u64;
                        }
                    }
                }
            }
            step.own += own_n;
            step.empty += len - own_n - (step.copied - copied_before);
            at += len;
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests;
