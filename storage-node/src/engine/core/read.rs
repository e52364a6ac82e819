//! Reads: planned through the layer stack (blocks never written read as zeros
//! without a disk read), submitted to the ring beside the batch's writes, and
//! answered on completion. Extents with a read in flight are left alone by the
//! zeroer.

use super::commit::READ_TOKEN;
use super::layers::Loc;
use super::{Core, MAX_IO_BLOCKS};
use crate::engine::layout::{Superblock, BLOCK};
use crate::engine::uring::{AlignedBuf, Completion, Fsync, ALIGN};
use crate::engine::{EngineError, ReadResult, Respond};
use bytes::Bytes;
use slate_protocol::{BlockIndex, Epoch, VolumeId};
use std::sync::atomic::Ordering;

/// A read in flight.
#[derive(Debug)]
pub(super) struct ReadOp {
    tx: Respond<ReadResult>,
    written: Vec<u8>,
    crcs: Vec<u32>,
    pub(super) range: (VolumeId, u64, u64),
    extents: Vec<u32>,
}

impl Core {
    /// Plans a read and starts its disk reads; a read that finds no data is answered
    /// at once.
    pub(super) fn start_read(
        &mut self,
        seq: u64,
        volume: VolumeId,
        epoch: Epoch,
        start: BlockIndex,
        count: u32,
        tx: Respond<ReadResult>,
    ) {
        match self.plan_read(volume, epoch, start, count) {
            Ok((buf, parts, written, crcs)) => {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_read.fetch_add(u64::from(count) * BLOCK, Ordering::Relaxed);
                if parts.is_empty() {
                    let len = crcs.len() * ALIGN;
                    tx.send(Ok(ReadResult { written, crcs, data: Bytes::from_owner(buf).slice(0..len) }));
                    return;
                }
                let extents: Vec<u32> = parts.iter().map(|p| self.extent_at(p.0)).collect();
                for e in &extents {
                    *self.read_extents.entry(*e).or_insert(0) += 1;
                }
                let token = READ_TOKEN | seq;
                let parts: Vec<(bool, u64, usize, usize)> =
                    parts.into_iter().map(|(off, s, e)| (false, off, s, e)).collect();
                self.inflight_data_bytes += buf.len();
                self.ring.start(token, buf, &parts, Fsync::No);
                let range = (volume, start.0, start.0 + u64::from(count));
                self.reads.insert(token, ReadOp { tx, written, crcs, range, extents });
            }
            Err(e) => tx.send(Err(e)),
        }
    }

    #[allow(clippy::type_complexity)]
    fn plan_read(
        &mut self,
        volume: VolumeId,
        epoch: Epoch,
        start: BlockIndex,
        count: u32,
    ) -> Result<(AlignedBuf, Vec<(u64, usize, usize)>, Vec<u8>, Vec<u32>), EngineError> {
        let n = count as usize;
        if n == 0 || n > MAX_IO_BLOCKS {
            return Err(EngineError::Invalid(format!("read of {count} blocks")));
        }
        let pieces = self.pieces(volume, start.0, u64::from(count))?;
        let mut written = vec![0u8; n.div_ceil(8)];
        let mut crcs = vec![0u32; n];
        let mut parts: Vec<(u64, usize, usize)> = Vec::new();
        for (key, sblock, len, idx0) in pieces {
            let top = self.top_for(key, epoch)?;
            for i in 0..len {
                let idx = (idx0 + i) as usize;
                if let Loc::Data { extent, off, crc } = self.resolve(key, top, sblock + i)? {
                    written[idx / 8] |= 1 << (idx % 8);
                    crcs[idx] = crc;
                    let phys = Superblock::off(self.sb.extent_block(extent) + u64::from(off));
                    match parts.last_mut() {
                        Some(last) if last.2 == idx * ALIGN && last.0 + (last.2 - last.1) as u64 == phys => {
                            last.2 += ALIGN;
                        }
                        _ => parts.push((phys, idx * ALIGN, (idx + 1) * ALIGN)),
                    }
                }
            }
        }
        Ok((AlignedBuf::zeroed(n * ALIGN), parts, written, crcs))
    }

    fn extent_at(&self, disk_offset: u64) -> u32 {
        ((disk_offset / BLOCK).saturating_sub(self.sb.data_start) / self.sb.extent_blocks) as u32
    }

    /// Answers a read whose disk reads completed.
    pub(super) fn finish_read(&mut self, c: Completion) {
        let Some(op) = self.reads.remove(&c.user) else { return };
        for e in &op.extents {
            if let Some(n) = self.read_extents.get_mut(e) {
                *n -= 1;
                if *n == 0 {
                    self.read_extents.remove(e);
                }
            }
        }
        let Some(buf) = c.buf else { return };
        self.inflight_data_bytes = self.inflight_data_bytes.saturating_sub(buf.len());
        let r = match c.result {
            Ok(()) => {
                let len = op.crcs.len() * ALIGN;
                Ok(ReadResult { written: op.written, crcs: op.crcs, data: Bytes::from_owner(buf).slice(0..len) })
            }
            Err(e) => Err(EngineError::Io(e)),
        };
        op.tx.send(r);
    }
}
