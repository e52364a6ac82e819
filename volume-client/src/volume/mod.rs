//! The replicated volume I/O engine: an attached volume as a [`BlockDevice`].
//!
//! [`Volume::open`] takes what the metadata service returned at attach
//! ([`AttachInfo`]: layout, capability, key), connects to every storage node
//! of the layout, reconciles the write intents a crashed predecessor may have
//! left ([`reconcile`]), and starts the one task that owns the volume's
//! state ([`actor`]). The `Volume` handle itself holds no mutable state: it
//! encrypts and decrypts in the caller's task (AES-256-XTS, tweak = block
//! index), bounds the bytes in flight with a semaphore, and exchanges
//! messages with the actor.
//!
//! Memory is bounded: an operation enters only with an op slot
//! (`max_in_flight_ops`) and a share of `max_in_flight_bytes`, both held until
//! it completes. A write's ciphertext is one buffer shared by every replica's
//! request until each session encodes its own frame, so the data in flight is
//! at most `max_in_flight_bytes x (1 + R)`; the range-lock table and the
//! actor's per-operation state grow with the op count only.
//!
//! Layout of the module:
//!
//! | file | what |
//! |---|---|
//! | `layout.rs` | attach reply types (`AttachInfo`, `VolumeLayout`, replica sets, the key) |
//! | `control.rs` | `ControlPlane`: replacement of failed replicas, rebuild done, layout and snapshot polling |
//! | `link.rs` | `NodeLink`/`Connector`: the engine's view of node sessions |
//! | `node_link.rs` | those traits over `slate_dataplane::client::NodeClient` |
//! | `deps.rs` | the FIFO range lock that orders overlapping operations |
//! | `replicas.rs` | per-segment replica sets, read rotation, rebuild progress |
//! | `runs.rs` | splitting ranges, checking replies, building copy requests |
//! | `actor.rs` | the task that owns the volume: its commands, events, state, loop and dispatch |
//! | `actor/` | the actor's parts, one responsibility each (listed in `actor.rs`): ordering, reads, the write path, flush, failures and fencing, membership, rebuilds, capability renewal, layout polling, growth, snapshot freezes, intent clearing |
//! | `rebuild.rs` | filling a new replica under range locks |
//! | `reconcile.rs` | write-intent reconciliation at open |
//! | `intents.rs` | which intent regions may be cleared while serving |
//! | `status.rs` | what `slate volume show` prints |
//! | `clone.rs` | a clone's parent: reads through it, trims over it, flatten's copy (ciphertext) |

pub mod actor;
pub mod clone;
pub mod control;
pub mod deps;
pub mod error;
pub mod intents;
pub mod layout;
pub mod link;
pub mod node_link;
pub mod rebuild;
pub mod reconcile;
pub mod replicas;
pub mod runs;
pub mod status;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use clone::{CopyStep, Parent, ParentOpener};
pub use control::{ControlError, ControlPlane, ReplicaUpdate};
pub use error::VolumeError;
pub use layout::{
    AttachInfo, Dek, PendingSnapshot, ReplicaInfo, ReplicaRole, SegmentReplicas, VolumeLayout, VolumeState,
};
pub use link::{Connector, LinkError, NodeLink};
pub use node_link::NodeClientConnector;
pub use status::VolumeStatus;

use crate::blockdev::{BlockDevice, DevError, DevFuture, Extent};
use crate::crypto::{VolumeCipher, XtsKey};
use actor::{Budget, Cmd, ReadChunk};
use bytes::{Bytes, BytesMut};
use slate_protocol::stages::Stage;
use slate_protocol::{block_crc, Epoch, ErrorKind, NodeId, VolumeId, BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES_U64};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{info, warn};

/// Tunables of one attached volume.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// A node that does not answer a request within this is treated as failed.
    pub request_timeout: Duration,
    /// Base delay before retrying a refused request or a control-plane call.
    pub retry_delay: Duration,
    /// Longest a snapshot freeze holds new writes while it waits for the
    /// writes in flight to complete; past it the writes resume and the freeze
    /// is tried again after a later layout poll.
    pub freeze_hold_limit: Duration,
    /// A write that cannot reach two replicas for this long fails (EIO).
    pub stall_timeout: Duration,
    /// Most plaintext bytes of reads and writes in flight at once.
    pub max_in_flight_bytes: u64,
    /// Most operations (reads, writes, trims, block-status queries) in flight at once.
    pub max_in_flight_ops: usize,
    /// Commands queued to the volume's task before callers wait.
    pub queue_depth: usize,
    /// Blocks copied per range lock during a rebuild.
    pub rebuild_chunk_blocks: u32,
    /// How often the nodes' write intents of quiet, healthy regions are cleared
    /// (see `intents.rs`); zero turns it off (intents then wait for the next attach).
    pub intent_clear_interval: Duration,
    /// How often a read-write attachment asks the control plane for the
    /// volume's layout, to follow replica sets changed elsewhere (a drain);
    /// zero turns it off.
    pub layout_poll_interval: Duration,
    /// Serve the volume as it was at a snapshot: every read goes out as
    /// `ReadAt` at this epoch (through the layers frozen at or before it, never
    /// the newer ones) and block status is derived from those reads. `None`
    /// reads the head. Only a read-only attachment may read at an epoch.
    pub read_epoch: Option<Epoch>,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            retry_delay: Duration::from_millis(100),
            freeze_hold_limit: Duration::from_secs(10),
            stall_timeout: Duration::from_mins(2),
            max_in_flight_bytes: 64 << 20,
            max_in_flight_ops: 1024,
            queue_depth: 1024,
            rebuild_chunk_blocks: 256,
            intent_clear_interval: Duration::from_secs(15),
            layout_poll_interval: Duration::from_secs(3),
            read_epoch: None,
        }
    }
}

impl VolumeConfig {
    /// Checks the relations between the settings.
    pub fn validate(&self) -> Result<(), VolumeError> {
        let bad = |s: &str| Err(VolumeError::Layout(format!("volume config: {s}")));
        if self.request_timeout.is_zero() || self.stall_timeout < self.request_timeout {
            return bad("request_timeout must be > 0 and <= stall_timeout");
        }
        if self.max_in_flight_bytes < 4 << 20 {
            return bad("max_in_flight_bytes must be at least 4 MiB (one full-size request)");
        }
        if self.queue_depth == 0 || self.rebuild_chunk_blocks == 0 || self.max_in_flight_ops == 0 {
            return bad("queue_depth, max_in_flight_ops and rebuild_chunk_blocks must be > 0");
        }
        Ok(())
    }
}

/// An attached, replicated, encrypted volume. Cheap to share behind an `Arc`;
/// every method may be called from many tasks at once.
pub struct Volume {
    id: VolumeId,
    /// The volume's size, shared with the actor: it grows when a layout poll
    /// brings a larger one (online growth), never shrinks.
    size_bytes: Arc<AtomicU64>,
    cmds: mpsc::Sender<Cmd>,
    /// The snapshot this attachment reads (`VolumeConfig::read_epoch`).
    read_epoch: Option<Epoch>,
    cipher: Arc<VolumeCipher>,
    budget: Arc<Semaphore>,
    budget_blocks: u64,
    op_slots: Arc<Semaphore>,
    /// For a clone: the snapshot it reads through where it has not written (`clone.rs`).
    parent: Option<Parent>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("id", &self.id).field("size_bytes", &self.size_now()).finish_non_exhaustive()
    }
}

impl Volume {
    /// Opens an attachment over real storage nodes (`NodeClient` sessions through `data_plane`).
    pub async fn attach(
        info: AttachInfo,
        control: Arc<dyn ControlPlane>,
        data_plane: slate_dataplane::tls::Connector,
        cfg: VolumeConfig,
    ) -> Result<Self, VolumeError> {
        Self::open(info, control, Arc::new(NodeClientConnector(data_plane)), cfg).await
    }

    /// Opens an attachment: connects to every node of the layout, reconciles
    /// write intents, and starts serving. The key in `info` is consumed: it
    /// lives on only as the cipher's key schedule (zeroized on drop).
    pub async fn open(
        info: AttachInfo,
        control: Arc<dyn ControlPlane>,
        connector: Arc<dyn Connector>,
        cfg: VolumeConfig,
    ) -> Result<Self, VolumeError> {
        cfg.validate()?;
        let AttachInfo { layout, capability, dek } = info;
        layout.validate().map_err(VolumeError::Layout)?;
        let cipher = {
            let key = XtsKey::from_bytes(dek.expose()).map_err(|e| VolumeError::Layout(e.to_string()))?;
            drop(dek);
            Arc::new(VolumeCipher::new(&key))
        };
        let claims = &capability.claims;
        if claims.volume != layout.volume || claims.generation != layout.generation {
            return Err(VolumeError::Layout("the capability is for another volume or generation".into()));
        }
        if let Some(epoch) = cfg.read_epoch {
            // Writes, repairs and rebuilds act on the head: a snapshot is only ever read.
            if claims.rights.contains(slate_protocol::Rights::WRITE) {
                return Err(VolumeError::Layout(format!(
                    "a snapshot (at {epoch}) is served read-only; the capability grants writes"
                )));
            }
        }

        // Connect to every node of the layout at once.
        let mut addrs: Vec<(NodeId, String)> =
            layout.segments.iter().flat_map(|s| s.replicas.iter().map(|r| (r.node, r.addr.clone()))).collect();
        addrs.sort();
        addrs.dedup_by_key(|(n, _)| *n);
        let attempts = addrs.into_iter().map(|(node, addr)| {
            let connector = Arc::clone(&connector);
            let cap = capability.clone();
            let timeout = cfg.request_timeout;
            tokio::spawn(async move {
                let r = tokio::time::timeout(timeout, connector.connect(node, &addr, &cap)).await;
                (node, r.unwrap_or(Err(LinkError::Timeout)))
            })
        });
        let mut links: HashMap<NodeId, Arc<dyn NodeLink>> = HashMap::new();
        let mut down: Vec<(NodeId, String)> = Vec::new();
        for a in attempts.collect::<Vec<_>>() {
            let (node, r) = a.await.map_err(|e| VolumeError::Io(format!("connect task: {e}")))?;
            match r {
                Ok(link) => {
                    links.insert(node, link);
                }
                Err(LinkError::Remote(e)) if e.kind == ErrorKind::StaleGeneration => return Err(VolumeError::Fenced),
                Err(LinkError::Remote(e))
                    if matches!(
                        e.kind,
                        ErrorKind::Expired | ErrorKind::Forged | ErrorKind::WrongVolume | ErrorKind::NoRight
                    ) =>
                {
                    return Err(VolumeError::Denied(e.to_string()));
                }
                Err(e) => {
                    warn!(volume = %layout.volume, %node, error = %e, "storage node unreachable at open");
                    down.push((node, e.to_string()));
                }
            }
        }

        // Reconciling writes; a read-only attachment cannot, and reads whatever the replicas hold.
        let report = if capability.claims.rights.contains(slate_protocol::Rights::WRITE) {
            reconcile::reconcile(&layout, &links, cfg.request_timeout).await?
        } else {
            reconcile::ReconcileReport::default()
        };
        for (node, why) in report.down {
            links.remove(&node);
            down.push((node, why));
        }
        for s in &layout.segments {
            let reachable = s.replicas.iter().any(|r| r.role == ReplicaRole::InSync && links.contains_key(&r.node));
            if !reachable {
                return Err(VolumeError::Io(format!("no in-sync replica of {} is reachable", s.segment)));
            }
        }
        if report.regions > 0 {
            info!(volume = %layout.volume, regions = report.regions, blocks = report.blocks, "write intents reconciled");
        }

        let (tx, rx) = mpsc::channel(cfg.queue_depth);
        let max_ops = cfg.max_in_flight_ops;
        let budget_blocks = (cfg.max_in_flight_bytes / BLOCK_SIZE_BYTES_U64).max(1);
        let volume = layout.volume;
        let size_bytes = Arc::new(AtomicU64::new(layout.size_bytes));
        let read_epoch = cfg.read_epoch;
        let init = actor::Init {
            layout,
            capability,
            links,
            down,
            control,
            connector,
            cfg,
            reconciled_blocks: report.blocks,
            size: Arc::clone(&size_bytes),
        };
        tokio::spawn(actor::run(init, rx));
        Ok(Self {
            id: volume,
            size_bytes,
            cmds: tx,
            read_epoch,
            cipher,
            budget: Arc::new(Semaphore::new(budget_blocks as usize)),
            budget_blocks,
            op_slots: Arc::new(Semaphore::new(max_ops)),
            parent: None,
        })
    }

    /// The volume's id.
    pub fn id(&self) -> VolumeId {
        self.id
    }

    /// The volume's current size in bytes: the size at attach, or a larger one
    /// adopted since from the control plane.
    pub fn size_now(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, VolumeError>>) -> Cmd,
    ) -> Result<T, VolumeError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(make(tx)).await.map_err(|_| VolumeError::Closed)?;
        rx.await.map_err(|_| VolumeError::Closed)?
    }

    /// Waits for room for one more operation carrying `blocks` blocks of data (0 for none).
    async fn permit(&self, blocks: u64) -> Result<Budget, VolumeError> {
        let op = Arc::clone(&self.op_slots).acquire_owned().await.map_err(|_| VolumeError::Closed)?;
        let bytes = if blocks == 0 {
            None
        } else {
            let n = blocks.min(self.budget_blocks) as u32;
            Some(Arc::clone(&self.budget).acquire_many_owned(n).await.map_err(|_| VolumeError::Closed)?)
        };
        Ok(Budget { bytes, op })
    }

    fn blocks_of(&self, offset: u64, len: u64) -> Result<(u64, u64), VolumeError> {
        let end = offset.checked_add(len).ok_or(VolumeError::OutOfRange)?;
        if len == 0
            || !offset.is_multiple_of(BLOCK_SIZE_BYTES_U64)
            || !len.is_multiple_of(BLOCK_SIZE_BYTES_U64)
            || end > self.size_now()
        {
            return Err(VolumeError::OutOfRange);
        }
        Ok((offset / BLOCK_SIZE_BYTES_U64, len / BLOCK_SIZE_BYTES_U64))
    }

    /// Reads `count` blocks at block `start` and returns the plaintext.
    pub async fn read_blocks(&self, start: u64, count: u64) -> Result<Bytes, VolumeError> {
        let permit = self.permit(count).await?;
        let chunks = self.ask(|reply| Cmd::Read { start, count, permit: Some(permit), reply }).await?;
        let mut out = BytesMut::zeroed(count as usize * BLOCK_SIZE_BYTES);
        for c in &chunks {
            self.decrypt_chunk(start, c, &mut out)?;
        }
        if let Some(p) = &self.parent {
            self.fill_from_parent(p, start, &chunks, &mut out).await?;
        }
        Ok(out.freeze())
    }

    fn decrypt_chunk(&self, start: u64, c: &ReadChunk, out: &mut [u8]) -> Result<(), VolumeError> {
        for (first, len, set) in runs::bit_runs(&c.written, c.count as usize) {
            if !set {
                continue; // unwritten blocks read as plaintext zeros
            }
            let src = &c.data[first * BLOCK_SIZE_BYTES..(first + len) * BLOCK_SIZE_BYTES];
            let at = (c.offset as usize + first) * BLOCK_SIZE_BYTES;
            let dst = &mut out[at..at + len * BLOCK_SIZE_BYTES];
            dst.copy_from_slice(src);
            self.cipher
                .decrypt_blocks(start + c.offset + first as u64, dst)
                .map_err(|e| VolumeError::Io(e.to_string()))?;
        }
        Ok(())
    }

    /// Writes whole blocks of plaintext at block `start`; returns once every
    /// in-sync replica (and at least two) made them durable.
    pub async fn write_blocks(&self, start: u64, plaintext: &[u8], fua: bool) -> Result<(), VolumeError> {
        if plaintext.is_empty() || !plaintext.len().is_multiple_of(BLOCK_SIZE_BYTES) {
            return Err(VolumeError::OutOfRange);
        }
        self.write_buf(start, BytesMut::from(plaintext), fua).await
    }

    /// [`Self::write_blocks`] on a buffer this call owns: encrypted in place, no copy.
    async fn write_buf(&self, start: u64, mut buf: BytesMut, fua: bool) -> Result<(), VolumeError> {
        if buf.is_empty() || !buf.len().is_multiple_of(BLOCK_SIZE_BYTES) {
            return Err(VolumeError::OutOfRange);
        }
        let count = (buf.len() / BLOCK_SIZE_BYTES) as u64;
        let permit = self.permit(count).await?;
        let t = Instant::now();
        self.cipher.encrypt_blocks(start, &mut buf).map_err(|e| VolumeError::Io(e.to_string()))?;
        let crcs: Vec<u32> = buf.chunks(BLOCK_SIZE_BYTES).map(block_crc).collect();
        let data = buf.freeze();
        Stage::Encrypt.since(t);
        let t = Instant::now();
        let r = self.ask(|reply| Cmd::Write { start, fua, crcs, data, permit: Some(permit), reply }).await;
        Stage::Volume.since(t);
        r
    }

    /// Writes whole blocks that are already ciphertext under this volume's key
    /// (a backup restored into a volume that shares its source's key: the XTS
    /// tweak is the block index, so the blocks are valid here as they are).
    pub async fn write_ciphertext_blocks(&self, start: u64, ciphertext: Bytes) -> Result<(), VolumeError> {
        if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(BLOCK_SIZE_BYTES) {
            return Err(VolumeError::OutOfRange);
        }
        let count = (ciphertext.len() / BLOCK_SIZE_BYTES) as u64;
        let permit = self.permit(count).await?;
        let crcs: Vec<u32> = ciphertext.chunks(BLOCK_SIZE_BYTES).map(block_crc).collect();
        self.ask(|reply| Cmd::Write { start, fua: false, crcs, data: ciphertext, permit: Some(permit), reply }).await
    }

    /// Unmaps blocks (they read as zeros); `zeroes` asks for write-zeroes semantics.
    pub async fn trim_blocks(&self, start: u64, count: u64, zeroes: bool) -> Result<(), VolumeError> {
        match &self.parent {
            Some(p) => self.trim_clone(p, start, count, zeroes).await,
            None => self.trim_own(start, count, zeroes).await,
        }
    }

    /// Unmaps blocks of this volume's own layer.
    async fn trim_own(&self, start: u64, count: u64, zeroes: bool) -> Result<(), VolumeError> {
        let permit = self.permit(0).await?;
        self.ask(|reply| Cmd::Trim { start, count, zeroes, permit: Some(permit), reply }).await
    }

    /// Which blocks are written: one bit per block from block `start`. At a
    /// snapshot epoch the nodes can only tell by reading (their allocation
    /// query answers for the head), so keep `count` small there (see
    /// [`BlockDevice::block_status`] below, which asks for one read's worth).
    pub async fn allocated_blocks(&self, start: u64, count: u64) -> Result<Vec<bool>, VolumeError> {
        let chunks = if self.read_epoch.is_some() {
            let permit = self.permit(count).await?;
            self.ask(|reply| Cmd::Read { start, count, permit: Some(permit), reply }).await?
        } else {
            let permit = self.permit(0).await?;
            self.ask(|reply| Cmd::BlockStatus { start, count, permit: Some(permit), reply }).await?
        };
        let mut out = vec![false; count as usize];
        for c in chunks {
            for i in 0..c.count as usize {
                out[c.offset as usize + i] = slate_protocol::message::bit(&c.written, i);
            }
        }
        if let Some(p) = &self.parent {
            p.union_allocated(start, &mut out).await?;
        }
        Ok(out)
    }

    /// A barrier: every acknowledged write is durable (they are at acknowledgement already).
    pub async fn flush_all(&self) -> Result<(), VolumeError> {
        self.ask(|reply| Cmd::Flush { reply }).await
    }

    /// The volume's replica sets, rebuild progress and counters.
    pub async fn status(&self) -> Result<VolumeStatus, VolumeError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Status { reply: tx }).await.map_err(|_| VolumeError::Closed)?;
        rx.await.map_err(|_| VolumeError::Closed)
    }

    /// Stops serving: in-flight I/O completes, running rebuilds stop (they
    /// start over at the next attach), connections close.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn dev<T>(r: Result<T, VolumeError>) -> Result<T, DevError> {
    r.map_err(DevError::from)
}

impl BlockDevice for Volume {
    fn size_bytes(&self) -> u64 {
        self.size_now()
    }

    fn can_fast_zero(&self) -> bool {
        // Write-zeroes only clears the nodes' written bits; a clone writes zero blocks over its parent.
        self.parent.is_none()
    }

    fn read(&self, offset: u64, len: u32) -> DevFuture<'_, Bytes> {
        Box::pin(async move {
            let (start, count) = dev(self.blocks_of(offset, u64::from(len)))?;
            dev(self.read_blocks(start, count).await)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DevFuture<'_, ()> {
        Box::pin(async move {
            let (start, _) = dev(self.blocks_of(offset, data.len() as u64))?;
            // The NBD payload is ours alone: encrypted where it lies.
            let buf = data.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            dev(self.write_buf(start, buf, fua).await)
        })
    }

    fn flush(&self) -> DevFuture<'_, ()> {
        Box::pin(async move { dev(self.flush_all().await) })
    }

    fn trim(&self, offset: u64, len: u64) -> DevFuture<'_, ()> {
        Box::pin(async move {
            let (start, count) = dev(self.blocks_of(offset, len))?;
            dev(self.trim_blocks(start, count, false).await)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _no_hole: bool) -> DevFuture<'_, ()> {
        Box::pin(async move {
            let (start, count) = dev(self.blocks_of(offset, len))?;
            dev(self.trim_blocks(start, count, true).await)
        })
    }

    fn block_status(&self, offset: u64, len: u32) -> DevFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            let (start, mut count) = dev(self.blocks_of(offset, u64::from(len)))?;
            if self.read_epoch.is_some() || self.parent.is_some() {
                // Answered by reading: at most one read's worth (NBD lets an answer be shorter).
                count = count.min(u64::from(slate_protocol::message::MAX_IO_BLOCKS));
            }
            let bits = dev(self.allocated_blocks(start, count).await)?;
            let mut out: Vec<Extent> = Vec::new();
            for b in bits {
                match out.last_mut() {
                    Some(e) if e.allocated == b && e.len <= u32::MAX - 4096 => e.len += 4096,
                    _ => out.push(Extent { len: 4096, allocated: b, zero: !b }),
                }
            }
            Ok(out)
        })
    }
}
