//! Reading a snapshot's ciphertext straight from the storage nodes, for backups.
//!
//! A snapshot never changes, so a backup needs none of the volume engine's
//! ordering, fencing or repair: it asks one replica of each segment for the
//! blocks changed between two snapshot epochs (`ChangedBlocks`, the engine's
//! layer difference) and reads them at the snapshot's epoch (`ReadAt`), exactly
//! as stored (AES-XTS ciphertext and its crc32c, checked here). The plaintext
//! and the volume key are never needed. If a replica fails or lacks the
//! snapshot's layer, the next replica of the segment is asked.

use crate::volume::VolumeLayout;
use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use slate_dataplane::client::NodeClient;
use slate_protocol::{
    block_crc, BlockIndex, BlockRange, Epoch, NodeId, Reply, Request, SignedCapability, Target, BLOCK_SIZE_BYTES,
};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;

/// Blocks read at a snapshot: which are written, and their ciphertext (zeros where not).
#[derive(Debug, Clone)]
pub struct RawBlocks {
    pub written: Vec<bool>,
    pub crcs: Vec<u32>,
    pub data: Bytes,
}

/// Reads one snapshot of one volume from its replicas.
#[derive(Debug)]
pub struct SnapshotReader {
    layout: VolumeLayout,
    capability: SignedCapability,
    epoch: Epoch,
    clients: Mutex<HashMap<NodeId, Arc<NodeClient>>>,
    data_plane: slate_dataplane::tls::Connector,
}

impl SnapshotReader {
    pub fn new(
        layout: VolumeLayout,
        capability: SignedCapability,
        epoch: Epoch,
        data_plane: slate_dataplane::tls::Connector,
    ) -> Self {
        Self { layout, capability, epoch, clients: Mutex::new(HashMap::new()), data_plane }
    }

    fn target(&self) -> Target {
        Target { volume: self.capability.claims.volume, generation: self.capability.claims.generation }
    }

    /// Blocks per segment.
    pub fn segment_blocks(&self) -> u64 {
        self.layout.segment_blocks
    }

    async fn client(&self, node: NodeId, addr: &str) -> Result<Arc<NodeClient>> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&node) {
            return Ok(Arc::clone(c));
        }
        let sock = addr.parse().map_err(|e| anyhow!("node {node} address {addr}: {e}"))?;
        let c = Arc::new(
            NodeClient::connect_with(&self.data_plane, sock, self.capability.clone())
                .await
                .map_err(|e| anyhow!("connecting to node {node} ({addr}): {e}"))?,
        );
        clients.insert(node, Arc::clone(&c));
        Ok(c)
    }

    /// Replicas of `segment` to ask, in-sync ones first.
    fn replicas(&self, segment: u64) -> Result<Vec<(NodeId, String)>> {
        let set = self
            .layout
            .segments
            .iter()
            .find(|s| u64::from(s.segment.0) == segment)
            .ok_or_else(|| anyhow!("the volume has no segment {segment}"))?;
        let mut reps: Vec<_> = set.replicas.iter().collect();
        reps.sort_by_key(|r| r.role != crate::volume::ReplicaRole::InSync);
        Ok(reps.into_iter().map(|r| (r.node, r.addr.clone())).collect())
    }

    /// Sends `req` to the replicas of `segment` in turn until one answers it.
    async fn ask(&self, segment: u64, req: &Request) -> Result<Reply> {
        let mut errors = Vec::new();
        for (node, addr) in self.replicas(segment)? {
            let client = match self.client(node, &addr).await {
                Ok(c) => c,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            match client.request(req.clone()).await {
                Ok(Reply::Error(e)) => errors.push(format!("node {node}: {e}")),
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.clients.lock().await.remove(&node);
                    errors.push(format!("node {node}: {e}"));
                }
            }
        }
        bail!("no replica of segment {segment} answered: {}", errors.join("; "))
    }

    /// Blocks changed after snapshot epoch `from` up to this snapshot, in order;
    /// `from` = 0 gives every block written up to it (a full backup).
    pub async fn changed(&self, from: Epoch) -> Result<Vec<BlockRange>> {
        let mut out = Vec::new();
        for s in &self.layout.segments {
            let req = Request::ChangedBlocks { target: self.target(), segment: s.segment, from, to: self.epoch };
            match self.ask(u64::from(s.segment.0), &req).await? {
                Reply::Ranges(r) => out.extend(r),
                other => bail!("segment {}: unexpected reply {other:?} to a changed-blocks query", s.segment),
            }
        }
        out.sort_by_key(|r| r.start.0);
        Ok(out)
    }

    /// Reads `count` blocks from `start` (within one segment) at the snapshot, checking every crc.
    pub async fn read(&self, start: u64, count: u32) -> Result<RawBlocks> {
        let segment = start / self.layout.segment_blocks;
        if (start + u64::from(count) - 1) / self.layout.segment_blocks != segment {
            bail!("read of {count} blocks at {start} crosses a segment boundary");
        }
        let req = Request::ReadAt { target: self.target(), epoch: self.epoch, start: BlockIndex(start), count };
        match self.ask(segment, &req).await? {
            Reply::Data { written, crcs, data } => {
                let n = count as usize;
                if crcs.len() != n || data.len() != n * BLOCK_SIZE_BYTES {
                    bail!("short read of {count} blocks at {start}");
                }
                let written: Vec<bool> = (0..n).map(|i| slate_protocol::message::bit(&written, i)).collect();
                for i in (0..n).filter(|i| written[*i]) {
                    if block_crc(&data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]) != crcs[i] {
                        bail!("block {} came back with a bad crc", start + i as u64);
                    }
                }
                Ok(RawBlocks { written, crcs, data })
            }
            other => bail!("unexpected reply {other:?} to a read at blocks {start}+{count}"),
        }
    }
}
