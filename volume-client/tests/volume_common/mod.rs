//! Shared setup for the volume engine's process tests: real `slate-node`
//! processes on 127.0.0.1, each with its own formatted disk file, a signing
//! key standing in for the metadata service, a control plane that assigns a
//! spare node when a replica fails, and helpers that read every block of
//! every replica directly so that tests can prove the replicas identical.
#![allow(dead_code)] // each test binary uses a different subset

use async_trait::async_trait;
use ed25519_dalek::SigningKey;
use slate::volume::{
    AttachInfo, ControlError, ControlPlane, Dek, ReplicaInfo, ReplicaRole, ReplicaUpdate, SegmentReplicas,
    VolumeConfig, VolumeLayout,
};
use slate_dataplane::client::NodeClient;
use slate_node::config::{NodeConfig, StaticAssignment};
use slate_protocol::message::{bit, BlockRange};
use slate_protocol::{
    Capability, Epoch, Generation, NodeId, Reply, Request, Rights, SegmentIndex, SignedCapability, Target, VolumeId,
    BLOCK_SIZE_BYTES,
};
use slate_tests::{free_addr, scratch_dir, wait_for_port, ProcessGuard};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

pub const VOLUME: VolumeId = VolumeId(42);
pub const SEGMENT_BLOCKS: u64 = 1024;
pub const DISK_BYTES: u64 = 32 << 20;

/// The `slate-node` binary, built on first use into this test's target dir.
pub fn node_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("SLATE_NODE_BIN") {
            return PathBuf::from(p);
        }
        // .../target/<profile>/deps/<test binary>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>").to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "slate-node", "--bin", "slate-node"]).env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for slate-node");
        assert!(status.success(), "building slate-node failed");
        let bin = profile_dir.join("slate-node");
        assert!(bin.is_file(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// A 64-byte XTS key with differing halves (fixed, so tests can compute ciphertext).
pub fn test_key_bytes() -> [u8; 64] {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    k
}

/// One storage node process and its files.
pub struct Node {
    pub id: NodeId,
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub cfg: NodeConfig,
    pub config_path: PathBuf,
    pub proc: Option<ProcessGuard>,
}

impl Node {
    fn create(id: u64, key: &SigningKey, segments: &[u32]) -> Self {
        let dir = scratch_dir(&format!("slate-vol-node{id}-"));
        let disk = dir.path().join("disk.img");
        let out = Command::new(node_binary())
            .args(["format", disk.to_str().unwrap(), "--size", &DISK_BYTES.to_string()])
            .args(["--extent-size", "1MiB", "--journal-size", "4MiB", "--node-id", &id.to_string()])
            .output()
            .expect("run slate-node format");
        assert!(out.status.success(), "format failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut cfg = NodeConfig::new(NodeId(id), free_addr(), disk.clone(), &key.verifying_key());
        for s in segments {
            cfg.assignments.push(StaticAssignment {
                volume: VOLUME,
                segment: SegmentIndex(*s),
                segment_blocks: SEGMENT_BLOCKS,
            });
        }
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, cfg.to_toml()).unwrap();
        let mut node = Self { id: NodeId(id), dir, disk, cfg, config_path, proc: None };
        node.start();
        node
    }

    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "node already running");
        let mut cmd = Command::new(node_binary());
        cmd.args(["serve", "--config", self.config_path.to_str().unwrap()]);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut p = ProcessGuard::spawn(&format!("slate-node {}", self.id), &mut cmd).expect("spawn slate-node");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !wait_for_port(self.cfg.listen, Duration::from_millis(200)) {
            assert!(p.is_alive(), "slate-node exited during start");
            assert!(Instant::now() < deadline, "slate-node did not start listening");
        }
        self.proc = Some(p);
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM; asserts a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let status = p.terminate().expect("slate-node exits on SIGTERM");
            assert!(status.success(), "slate-node exited with {status}");
        }
    }

    pub fn addr(&self) -> String {
        self.cfg.listen.to_string()
    }
}

/// A set of nodes holding one volume, and the key that signs its capabilities.
pub struct Cluster {
    pub key: SigningKey,
    pub nodes: Vec<Node>,
    /// Segment i's initial replica set.
    pub placement: Vec<Vec<u64>>,
}

impl Cluster {
    /// Starts nodes `1..=n`; segment i is assigned to the nodes in `placement[i]`.
    pub fn start(n: u64, placement: &[&[u64]]) -> Self {
        let key = slate_protocol::capability::generate_signing_key();
        let nodes = (1..=n)
            .map(|id| {
                let segs: Vec<u32> =
                    (0..placement.len()).filter(|s| placement[*s].contains(&id)).map(|s| s as u32).collect();
                Node::create(id, &key, &segs)
            })
            .collect();
        Self { key, nodes, placement: placement.iter().map(|p| p.to_vec()).collect() }
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == NodeId(id)).expect("node")
    }

    pub fn addr_of(&self, id: NodeId) -> String {
        self.nodes.iter().find(|n| n.id == id).expect("node").addr()
    }

    pub fn layout(&self, generation: u64) -> VolumeLayout {
        VolumeLayout {
            volume: VOLUME,
            size_bytes: SEGMENT_BLOCKS * self.placement.len() as u64 * BLOCK_SIZE_BYTES as u64,
            segment_blocks: SEGMENT_BLOCKS,
            generation: Generation(generation),
            segments: self
                .placement
                .iter()
                .enumerate()
                .map(|(i, p)| SegmentReplicas {
                    segment: SegmentIndex(i as u32),
                    epoch: Epoch(1),
                    replicas: p
                        .iter()
                        .map(|n| ReplicaInfo {
                            node: NodeId(*n),
                            addr: self.addr_of(NodeId(*n)),
                            role: ReplicaRole::InSync,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn capability(&self, generation: u64, rights: Rights) -> SignedCapability {
        Capability {
            volume: VOLUME,
            generation: Generation(generation),
            rights,
            expires_unix_secs: slate_protocol::now_unix_secs() + 3600,
            nodes: self.nodes.iter().map(|n| n.id).collect(),
            ..Default::default()
        }
        .sign(&self.key)
    }

    /// What the metadata service would return at attach.
    pub fn attach_info(&self, layout: &VolumeLayout) -> AttachInfo {
        AttachInfo {
            layout: layout.clone(),
            capability: self.capability(layout.generation.0, Rights::READ_WRITE),
            dek: Dek::new(test_key_bytes()),
        }
    }

    /// The same, as the JSON the metadata service sends.
    pub fn attach_json(&self, layout: &VolumeLayout) -> String {
        let mut v = serde_json::to_value(layout).unwrap();
        v["capability"] =
            serde_json::Value::String(self.capability(layout.generation.0, Rights::READ_WRITE).to_token());
        v["dek"] = serde_json::Value::String(hex::encode(test_key_bytes()));
        v.to_string()
    }

    /// A control plane over these nodes with `spares` to replace failed replicas.
    pub fn control(&self, layout: &VolumeLayout, spares: &[u64]) -> Arc<TestControl> {
        Arc::new(TestControl {
            layout: Mutex::new(layout.clone()),
            spares: spares.iter().map(|s| (NodeId(*s), self.addr_of(NodeId(*s)))).collect(),
            admin: self.capability(layout.generation.0, Rights::READ_WRITE.union(Rights::ADMIN)),
            failed: Mutex::default(),
            rebuilt: Mutex::default(),
            signer: self.key.clone(),
            renewals: Mutex::default(),
            progress: Mutex::default(),
            assigned: Mutex::default(),
        })
    }

    /// A raw session with node `id` (read-write-admin) under `generation`.
    pub async fn session(&self, id: NodeId, generation: u64) -> NodeClient {
        let addr = self.addr_of(id).parse().unwrap();
        NodeClient::connect(addr, self.capability(generation, Rights::READ_WRITE.union(Rights::ADMIN)))
            .await
            .expect("session with node")
    }
}

pub fn test_config() -> VolumeConfig {
    VolumeConfig { request_timeout: Duration::from_secs(5), rebuild_chunk_blocks: 128, ..VolumeConfig::default() }
}

/// Stands in for slate-meta: replaces a failed replica with a spare (assigning
/// it the segment over the data plane, as slate-meta does) and records reports.
#[derive(Debug)]
pub struct TestControl {
    pub layout: Mutex<VolumeLayout>,
    pub spares: Vec<(NodeId, String)>,
    pub admin: SignedCapability,
    pub failed: Mutex<Vec<(SegmentIndex, NodeId)>>,
    pub rebuilt: Mutex<Vec<(SegmentIndex, NodeId)>>,
    /// Signs renewed capabilities (scoped to the nodes of the current layout, as slate-meta does).
    pub signer: SigningKey,
    pub renewals: Mutex<u32>,
    /// Rebuild progress reports: (segment, node, done, total).
    pub progress: Mutex<Vec<(SegmentIndex, NodeId, u64, u64)>>,
    /// Replicas the client asked to assign after a layout change made elsewhere.
    pub assigned: Mutex<Vec<(SegmentIndex, NodeId)>>,
}

impl TestControl {
    /// Changes segment `seg`'s replica set as the metadata service would
    /// elsewhere (a drain), bumping its epoch.
    pub fn change_set(&self, seg: u32, f: impl FnOnce(&mut Vec<ReplicaInfo>)) {
        let mut l = self.layout.lock().unwrap_or_else(PoisonError::into_inner);
        let s = l.segments.iter_mut().find(|s| s.segment == SegmentIndex(seg)).expect("segment");
        f(&mut s.replicas);
        s.epoch = s.epoch.next();
    }

    /// Grows the volume as `slate volume resize` does: the new size, and a
    /// replica set (on `nodes`, in sync, epoch 1) for every segment it adds.
    pub fn grow(&self, size_bytes: u64, nodes: &[(NodeId, String)]) {
        let mut l = self.layout.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(size_bytes >= l.size_bytes, "growth only");
        l.size_bytes = size_bytes;
        for i in l.segments.len() as u32..l.segment_count() {
            let replicas = nodes
                .iter()
                .map(|(n, addr)| ReplicaInfo { node: *n, addr: addr.clone(), role: ReplicaRole::InSync })
                .collect();
            l.segments.push(SegmentReplicas { segment: SegmentIndex(i), epoch: Epoch(1), replicas });
        }
    }
}

#[async_trait]
impl ControlPlane for TestControl {
    async fn report_failed_replica(
        &self,
        volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
    ) -> Result<ReplicaUpdate, ControlError> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).push((segment, node));
        let current = self.layout.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let set = current.segments.iter().find(|s| s.segment == segment).ok_or(ControlError("segment".into()))?;
        let mut set = set.clone();
        if set.replicas.iter().any(|r| r.node == node) {
            let (spare, addr) = self
                .spares
                .iter()
                .find(|(s, _)| !set.replicas.iter().any(|r| r.node == *s))
                .ok_or(ControlError("no spare node".into()))?
                .clone();
            let client = NodeClient::connect(addr.parse().unwrap(), self.admin.clone())
                .await
                .map_err(|e| ControlError(format!("spare: {e}")))?;
            let target = Target { volume, generation: current.generation };
            let req = Request::AssignSegment { target, segment, segment_blocks: current.segment_blocks };
            client.request(req).await.map_err(|e| ControlError(format!("assign: {e}")))?;
            set.replicas.retain(|r| r.node != node);
            set.replicas.push(ReplicaInfo { node: spare, addr, role: ReplicaRole::Rebuilding });
            set.epoch = set.epoch.next();
            let mut l = self.layout.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = l.segments.iter_mut().find(|s| s.segment == segment) {
                *s = set.clone();
            }
        }
        Ok(ReplicaUpdate { set, capability: None })
    }

    async fn report_rebuilt(&self, _volume: VolumeId, segment: SegmentIndex, node: NodeId) -> Result<(), ControlError> {
        self.rebuilt.lock().unwrap_or_else(PoisonError::into_inner).push((segment, node));
        let mut l = self.layout.lock().unwrap_or_else(PoisonError::into_inner);
        for r in l.segments.iter_mut().filter(|s| s.segment == segment).flat_map(|s| s.replicas.iter_mut()) {
            if r.node == node {
                r.role = ReplicaRole::InSync;
            }
        }
        Ok(())
    }

    async fn refresh_layout(&self, _volume: VolumeId) -> Result<VolumeLayout, ControlError> {
        Ok(self.layout.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    async fn renew_capability(
        &self,
        volume: VolumeId,
        generation: Generation,
    ) -> Result<SignedCapability, ControlError> {
        *self.renewals.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let mut nodes: Vec<NodeId> = {
            let l = self.layout.lock().unwrap_or_else(PoisonError::into_inner);
            l.segments.iter().flat_map(|s| s.replicas.iter().map(|r| r.node)).collect()
        };
        nodes.sort_unstable();
        nodes.dedup();
        Ok(Capability {
            volume,
            generation,
            rights: Rights::READ_WRITE.union(Rights::ADMIN),
            expires_unix_secs: slate_protocol::now_unix_secs() + 3600,
            nodes,
            ..Default::default()
        }
        .sign(&self.signer))
    }

    async fn report_rebuild_progress(
        &self,
        _volume: VolumeId,
        segment: SegmentIndex,
        node: NodeId,
        done_blocks: u64,
        total_blocks: u64,
    ) -> Result<(), ControlError> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner).push((segment, node, done_blocks, total_blocks));
        Ok(())
    }

    /// Assigns with the client's capability, as `slate attach` does: it must cover the node.
    async fn assign_replicas(
        &self,
        volume: VolumeId,
        set: &SegmentReplicas,
        capability: &SignedCapability,
    ) -> Result<(), ControlError> {
        for r in &set.replicas {
            let client = NodeClient::connect(r.addr.parse().unwrap(), capability.clone())
                .await
                .map_err(|e| ControlError(format!("{}: {e}", r.node)))?;
            let target = Target { volume, generation: capability.claims.generation };
            let req = Request::AssignSegment { target, segment: set.segment, segment_blocks: SEGMENT_BLOCKS };
            match client.request(req).await {
                Ok(Reply::Done) => {}
                other => return Err(ControlError(format!("assign on {}: {other:?}", r.node))),
            }
            self.assigned.lock().unwrap_or_else(PoisonError::into_inner).push((set.segment, r.node));
        }
        Ok(())
    }
}

/// What one replica holds for a run of blocks, as raw ciphertext.
#[derive(Debug, PartialEq, Eq)]
pub struct RawBlock {
    pub written: bool,
    pub crc: u32,
    pub data: Vec<u8>,
}

/// Reads blocks `[start, start+count)` from one node directly (ciphertext, crcs, written bits).
pub async fn raw_blocks(client: &NodeClient, generation: u64, start: u64, count: u64) -> Vec<RawBlock> {
    let target = Target { volume: VOLUME, generation: Generation(generation) };
    let mut out = Vec::new();
    let mut pos = start;
    while pos < start + count {
        let n = (start + count - pos).min(256);
        let req = Request::Read { target, start: slate_protocol::BlockIndex(pos), count: n as u32 };
        match client.request(req).await.expect("raw read") {
            Reply::Data { written, crcs, data } => {
                for i in 0..n as usize {
                    out.push(RawBlock {
                        written: bit(&written, i),
                        crc: crcs[i],
                        data: data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES].to_vec(),
                    });
                }
            }
            other => panic!("unexpected reply {other:?}"),
        }
        pos += n;
    }
    out
}

/// Asserts that every replica of every segment of `layout` returns the same
/// bytes (and written bits and crcs) for every block.
pub async fn assert_replicas_identical(cluster: &Cluster, layout: &VolumeLayout) {
    let generation = layout.generation.0;
    for s in &layout.segments {
        let first = layout.segment_start(s.segment).0;
        let mut seen: BTreeMap<NodeId, Vec<RawBlock>> = BTreeMap::new();
        for r in &s.replicas {
            let c = cluster.session(r.node, generation).await;
            seen.insert(r.node, raw_blocks(&c, generation, first, SEGMENT_BLOCKS).await);
        }
        let mut it = seen.iter();
        let (n0, b0) = it.next().expect("a replica");
        for (n, b) in it {
            for (i, (x, y)) in b0.iter().zip(b).enumerate() {
                assert!(x == y, "{} block {} differs between {n0} and {n}", s.segment, first + i as u64);
            }
        }
    }
}

/// Asks every node of `layout` for its write intents.
pub async fn intents(cluster: &Cluster, layout: &VolumeLayout) -> BTreeMap<NodeId, Vec<BlockRange>> {
    let t = Target { volume: VOLUME, generation: layout.generation };
    let mut out = BTreeMap::new();
    let mut nodes: Vec<NodeId> = layout.segments.iter().flat_map(|s| s.replicas.iter().map(|r| r.node)).collect();
    nodes.sort_unstable();
    nodes.dedup();
    for n in nodes {
        let c = cluster.session(n, layout.generation.0).await;
        match c.request(Request::WriteIntents { target: t }).await.expect("intents") {
            Reply::Ranges(r) => {
                out.insert(n, r);
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    out
}

/// One block of recognizable plaintext naming itself and a version.
pub fn block_text(block: u64, version: u64) -> Vec<u8> {
    let line = format!("SLATE-PLAINTEXT block={block:08} version={version:06} the quick brown fox jumps over it\n");
    line.as_bytes().iter().copied().cycle().take(BLOCK_SIZE_BYTES).collect()
}

/// Reads the whole file (a node's disk).
pub fn read_file(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).expect("read disk file")
}

/// Byte offsets where `needle` occurs in `hay`.
pub fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return Vec::new();
    }
    hay.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect()
}

/// Installs a test log subscriber once (RUST_LOG honoured).
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "slate=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Waits until a writers' completion counter has grown by `n` (2 minutes at most).
pub async fn wait_for_more(done: &std::sync::atomic::AtomicU64, n: u64) {
    use std::sync::atomic::Ordering;
    let target = done.load(Ordering::Relaxed) + n;
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(2);
    while done.load(Ordering::Relaxed) < target {
        assert!(std::time::Instant::now() < deadline, "writers made no progress");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
