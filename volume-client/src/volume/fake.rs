//! In-memory storage nodes and control plane for the engine's unit tests.
//!
//! A [`FakeNode`] behaves like a storage node at the protocol level: it
//! checks the generation (fencing), the crc of every written block, keeps a
//! written bitmap (unwritten blocks read as zeros), records write intents
//! until they are cleared, and applies requests in the order they are
//! processed. Faults are switched on per node: dead (every request fails as
//! a lost connection), hung (no reply: the engine's timeout fires), corrupt
//! blocks (reads fail with `Corrupt` until the block is rewritten), a black
//! hole for writes (recorded as intents, never applied nor answered), and
//! seeded random delays that reorder concurrent requests.

use super::control::{ControlError, ControlPlane, ReplicaUpdate};
use super::layout::{ReplicaInfo, ReplicaRole, SegmentReplicas, VolumeLayout};
use super::link::{BoxFuture, Connector, LinkError, NodeLink};
use bytes::Bytes;
use slate_protocol::message::{set_bit, BlockRange};
use slate_protocol::{
    block_crc, BlockIndex, ErrorKind, Generation, NodeId, Reply, Request, SegmentIndex, SignedCapability, VolumeId,
    WireError, BLOCK_SIZE_BYTES,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct NodeState {
    pub blocks: BTreeMap<u64, (Bytes, u32)>,
    pub highest: Generation,
    pub intents: Vec<BlockRange>,
    pub corrupt: BTreeSet<u64>,
    pub dead: bool,
    pub hung: bool,
    pub black_hole_writes: bool,
    pub max_delay_us: u64,
    /// Requests processed (any kind).
    pub requests: u64,
    /// Requests that arrived after the node was marked dead or refused a stale generation.
    pub refused: u64,
}

#[derive(Debug)]
pub struct FakeNode {
    pub id: NodeId,
    pub state: Mutex<NodeState>,
    seed: AtomicU64,
}

fn err(kind: ErrorKind, detail: &str) -> Reply {
    Reply::Error(WireError::new(kind, detail))
}

impl FakeNode {
    pub fn new(id: u64) -> Arc<Self> {
        Arc::new(Self { id: NodeId(id), state: Mutex::default(), seed: AtomicU64::new(id * 7919 + 1) })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_delay(&self, max_us: u64) -> Duration {
        if max_us == 0 {
            return Duration::ZERO;
        }
        // xorshift: deterministic per node, varied per request.
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        Duration::from_micros(x % max_us)
    }

    /// The node's content of `block`: `None` if unwritten.
    pub fn block(&self, block: u64) -> Option<Bytes> {
        self.lock().blocks.get(&block).map(|(d, _)| d.clone())
    }

    /// Applies one request (the node's whole behaviour, without delays).
    fn process(&self, req: &Request) -> Option<Reply> {
        let mut st = self.lock();
        st.requests += 1;
        if st.dead {
            st.refused += 1;
            return Some(err(ErrorKind::Internal, "dead"));
        }
        if let Some(t) = req.target() {
            if t.generation < st.highest {
                st.refused += 1;
                return Some(Reply::Error(WireError::new(ErrorKind::StaleGeneration, "stale")));
            }
            st.highest = st.highest.max(t.generation);
        }
        Some(match req {
            Request::Write { start, crcs, data, .. } => {
                for (i, c) in crcs.iter().enumerate() {
                    if block_crc(&data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]) != *c {
                        return Some(Reply::Error(WireError::at(
                            ErrorKind::BadCrc,
                            BlockIndex(start.0 + i as u64),
                            "crc",
                        )));
                    }
                }
                st.intents.push(BlockRange { start: *start, count: crcs.len() as u64 });
                if st.black_hole_writes {
                    return None;
                }
                for (i, c) in crcs.iter().enumerate() {
                    let b = start.0 + i as u64;
                    st.blocks.insert(b, (data.slice(i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES), *c));
                    st.corrupt.remove(&b);
                }
                Reply::Done
            }
            Request::Read { start, count, .. } => {
                let mut written = Vec::new();
                let mut crcs = Vec::new();
                let mut data = Vec::with_capacity(*count as usize * BLOCK_SIZE_BYTES);
                for i in 0..u64::from(*count) {
                    let b = start.0 + i;
                    if st.corrupt.contains(&b) {
                        return Some(Reply::Error(WireError::at(ErrorKind::Corrupt, BlockIndex(b), "corrupt")));
                    }
                    if let Some((d, c)) = st.blocks.get(&b) {
                        set_bit(&mut written, i as usize);
                        crcs.push(*c);
                        data.extend_from_slice(d);
                    } else {
                        crcs.push(0);
                        data.extend_from_slice(&[0; BLOCK_SIZE_BYTES]);
                    }
                }
                written.resize((*count as usize).div_ceil(8), 0);
                Reply::Data { written, crcs, data: Bytes::from(data) }
            }
            Request::Allocated { range, .. } => {
                let mut bits = vec![0u8; (range.count as usize).div_ceil(8)];
                for (b, _) in st.blocks.range(range.start.0..range.start.0 + range.count) {
                    set_bit(&mut bits, (b - range.start.0) as usize);
                }
                Reply::Bitmap(bits)
            }
            Request::Trim { range, .. } | Request::WriteZeroes { range, .. } => {
                st.intents.push(*range);
                for b in range.start.0..range.start.0 + range.count {
                    st.blocks.remove(&b);
                    st.corrupt.remove(&b);
                }
                Reply::Done
            }
            Request::WriteIntents { .. } => Reply::Ranges(st.intents.clone()),
            Request::ClearIntents { ranges, .. } => {
                st.intents.retain(|r| !ranges.contains(r));
                Reply::Done
            }
            Request::Hello { .. } | Request::Flush { .. } => Reply::Done,
            _ => err(ErrorKind::Malformed, "not supported by the fake"),
        })
    }
}

#[derive(Debug)]
pub struct FakeLink {
    pub node: Arc<FakeNode>,
    /// The session's capability expiry: later requests are refused as `Expired`.
    pub expires_unix_secs: u64,
}

impl NodeLink for FakeLink {
    fn node(&self) -> NodeId {
        self.node.id
    }

    fn start(&self, req: &Request) -> BoxFuture<Result<Reply, LinkError>> {
        let node = Arc::clone(&self.node);
        let req = req.clone();
        let (delay, dead, hung) = {
            let st = node.lock();
            (node.next_delay(st.max_delay_us), st.dead, st.hung)
        };
        let expired = slate_protocol::now_unix_secs() >= self.expires_unix_secs;
        Box::pin(async move {
            if expired {
                return Ok(err(ErrorKind::Expired, "capability expired"));
            }
            if dead {
                node.lock().refused += 1;
                return Err(LinkError::Closed("connection reset".into()));
            }
            if hung {
                std::future::pending::<()>().await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if node.lock().dead {
                return Err(LinkError::Closed("connection reset".into()));
            }
            match node.process(&req) {
                Some(r) => Ok(r),
                None => std::future::pending().await,
            }
        })
    }
}

#[derive(Debug, Default)]
pub struct FakeConnector {
    pub nodes: Mutex<HashMap<NodeId, Arc<FakeNode>>>,
}

impl FakeConnector {
    pub fn new(nodes: &[Arc<FakeNode>]) -> Arc<Self> {
        Arc::new(Self { nodes: Mutex::new(nodes.iter().map(|n| (n.id, Arc::clone(n))).collect()) })
    }
}

impl Connector for FakeConnector {
    fn connect(
        &self,
        node: NodeId,
        _addr: &str,
        cap: &SignedCapability,
    ) -> BoxFuture<Result<Arc<dyn NodeLink>, LinkError>> {
        let n = self.nodes.lock().unwrap_or_else(PoisonError::into_inner).get(&node).cloned();
        let generation = cap.claims.generation;
        let expires_unix_secs = cap.claims.expires_unix_secs;
        Box::pin(async move {
            let n = n.ok_or_else(|| LinkError::Closed("connection refused".into()))?;
            {
                let mut st = n.lock();
                if st.dead {
                    return Err(LinkError::Closed("connection refused".into()));
                }
                if generation < st.highest {
                    return Err(LinkError::Remote(WireError::new(ErrorKind::StaleGeneration, "stale")));
                }
                st.highest = st.highest.max(generation);
            }
            if slate_protocol::now_unix_secs() >= expires_unix_secs {
                return Err(LinkError::Remote(WireError::new(ErrorKind::Expired, "capability expired")));
            }
            Ok(Arc::new(FakeLink { node: n, expires_unix_secs }) as Arc<dyn NodeLink>)
        })
    }
}

/// Replaces a failed replica with the first spare not already in the segment's set and never reported failed.
#[derive(Debug)]
pub struct FakeControl {
    pub layout: Mutex<VolumeLayout>,
    pub spares: Mutex<Vec<NodeId>>,
    pub delay: Duration,
    pub failed_reports: Mutex<Vec<(SegmentIndex, NodeId)>>,
    pub rebuilt_reports: Mutex<Vec<(SegmentIndex, NodeId)>>,
    /// Renews capabilities for this many seconds when set.
    pub renew: Mutex<Option<(ed25519_dalek::SigningKey, Vec<NodeId>, u64)>>,
}

impl FakeControl {
    pub fn new(layout: VolumeLayout, spares: &[u64], delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            layout: Mutex::new(layout),
            spares: Mutex::new(spares.iter().map(|n| NodeId(*n)).collect()),
            delay,
            failed_reports: Mutex::default(),
            rebuilt_reports: Mutex::default(),
            renew: Mutex::default(),
        })
    }
}

#[async_trait::async_trait]
impl ControlPlane for FakeControl {
    async fn report_failed_replica(
        &self,
        _volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
    ) -> Result<ReplicaUpdate, ControlError> {
        tokio::time::sleep(self.delay).await;
        self.failed_reports.lock().unwrap_or_else(PoisonError::into_inner).push((segment, node));
        let mut layout = self.layout.lock().unwrap_or_else(PoisonError::into_inner);
        let set = layout
            .segments
            .iter_mut()
            .find(|s| s.segment == segment)
            .ok_or_else(|| ControlError("no such segment".into()))?;
        if set.replicas.iter().any(|r| r.node == node) {
            set.replicas.retain(|r| r.node != node);
            let failed: Vec<NodeId> =
                self.failed_reports.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(_, n)| *n).collect();
            let spare = {
                let spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
                spares.iter().find(|s| !set.replicas.iter().any(|r| r.node == **s) && !failed.contains(s)).copied()
            };
            let spare = spare.ok_or_else(|| ControlError("no spare node".into()))?;
            set.replicas.push(ReplicaInfo {
                node: spare,
                addr: format!("fake:{}", spare.0),
                role: ReplicaRole::Rebuilding,
            });
            set.epoch = set.epoch.next();
        }
        Ok(ReplicaUpdate { set: set.clone(), capability: None })
    }

    async fn report_rebuilt(&self, _volume: VolumeId, segment: SegmentIndex, node: NodeId) -> Result<(), ControlError> {
        self.rebuilt_reports.lock().unwrap_or_else(PoisonError::into_inner).push((segment, node));
        let mut layout = self.layout.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = layout
            .segments
            .iter_mut()
            .filter(|s| s.segment == segment)
            .flat_map(|s| s.replicas.iter_mut())
            .find(|r| r.node == node)
        {
            r.role = ReplicaRole::InSync;
        }
        Ok(())
    }

    async fn renew_capability(
        &self,
        volume: VolumeId,
        generation: Generation,
    ) -> Result<SignedCapability, ControlError> {
        let renew = self.renew.lock().unwrap_or_else(PoisonError::into_inner);
        let (key, nodes, secs) = renew.as_ref().ok_or_else(|| ControlError("no renewal".into()))?;
        Ok(slate_protocol::Capability {
            volume,
            generation,
            rights: slate_protocol::Rights::READ_WRITE,
            expires_unix_secs: slate_protocol::now_unix_secs() + secs,
            nodes: nodes.clone(),
            ..Default::default()
        }
        .sign(key))
    }

    async fn refresh_layout(&self, _volume: VolumeId) -> Result<VolumeLayout, ControlError> {
        Ok(self.layout.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// A layout of `segments` segments of `segment_blocks` blocks, segment i on
/// nodes `placement[i]`.
pub fn layout(segment_blocks: u64, placement: &[&[u64]], generation: u64) -> VolumeLayout {
    VolumeLayout {
        volume: VolumeId(9),
        size_bytes: segment_blocks * placement.len() as u64 * BLOCK_SIZE_BYTES as u64,
        segment_blocks,
        generation: Generation(generation),
        segments: placement
            .iter()
            .enumerate()
            .map(|(i, nodes)| SegmentReplicas {
                segment: SegmentIndex(i as u32),
                epoch: slate_protocol::Epoch(1),
                replicas: nodes
                    .iter()
                    .map(|n| ReplicaInfo { node: NodeId(*n), addr: format!("fake:{n}"), role: ReplicaRole::InSync })
                    .collect(),
            })
            .collect(),
    }
}
