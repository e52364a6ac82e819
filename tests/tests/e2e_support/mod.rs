//! Data-plane helpers shared by the end-to-end tests that look behind the NBD
//! export: they talk to storage nodes directly with `slate_dataplane`'s
//! [`NodeClient`], holding a capability obtained through the management API
//! like any other client would.
//!
//! The main one compares the replicas of a volume block by block (ciphertext,
//! crc and written bit), since from the NBD side a read comes from only one
//! replica and a divergence would go unnoticed until that replica is lost.

#![allow(dead_code)]

use serde_json::Value;
use slate_dataplane::client::{check_data, ClientError, NodeClient};
use slate_protocol::message::{bit, MAX_IO_BLOCKS};
use slate_protocol::{BlockIndex, Reply, Request, SignedCapability};
use slate_tests::cluster::Cluster;
use std::net::SocketAddr;

/// One segment of a volume as `slate volume show --json` reports it.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    pub index: u64,
    pub first_block: u64,
    pub blocks: u64,
    /// (node id, address, failure domain, state)
    pub replicas: Vec<(u64, String, String, String)>,
}

/// The segments of a volume view.
pub fn segments(view: &Value) -> Vec<SegmentInfo> {
    view["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .map(|s| SegmentInfo {
            index: s["index"].as_u64().expect("index"),
            first_block: s["first_block"].as_u64().expect("first_block"),
            blocks: s["blocks"].as_u64().expect("blocks"),
            replicas: s["replicas"]
                .as_array()
                .expect("replicas")
                .iter()
                .map(|r| {
                    (
                        r["node"].as_u64().expect("node"),
                        r["addr"].as_str().expect("addr").to_owned(),
                        r["failure_domain"].as_str().unwrap_or_default().to_owned(),
                        r["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
        })
        .collect()
}

/// A current-thread tokio runtime for the data-plane calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// Reads `count` blocks at `start` from one node: (written bitmap, crcs, data), checked in transit.
pub async fn read_raw(c: &NodeClient, start: u64, count: u32) -> Result<(Vec<u8>, Vec<u32>, Vec<u8>), ClientError> {
    let req = Request::Read { target: c.target(), start: BlockIndex(start), count };
    match c.request(req).await? {
        Reply::Data { written, crcs, data } => {
            check_data(BlockIndex(start), count, &written, &crcs, &data)?;
            Ok((written, crcs, data.to_vec()))
        }
        other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

/// What a replica comparison found.
#[derive(Debug, Default)]
pub struct Comparison {
    pub segments: usize,
    pub blocks_compared: u64,
    /// Blocks written on at least one replica.
    pub written_blocks: u64,
    /// Blocks written on one replica and not on another (with equal bytes, e.g. zeros).
    pub written_bit_differences: u64,
    /// (segment, block, node a, node b) of blocks whose bytes or crcs differ.
    pub differences: Vec<(u64, u64, u64, u64)>,
}

/// Reads every block of every segment of volume `name` from each of its replicas and compares them.
/// Takes a read-only attachment through the API for the capability and detaches it afterwards.
pub fn compare_replicas(cluster: &Cluster, name: &str) -> Comparison {
    let view = cluster.volume_show(name);
    let volume_id = view["id"].as_u64().expect("volume id");
    let (attachment, token) = cluster.read_only_capability(volume_id);
    let cap = SignedCapability::from_token(&token).expect("a capability token");
    let segs = segments(&view);
    let rt = runtime();
    let result = rt.block_on(async {
        let mut cmp = Comparison { segments: segs.len(), ..Comparison::default() };
        for s in &segs {
            let mut clients = Vec::new();
            for (node, addr, _, _) in &s.replicas {
                let a: SocketAddr = addr.parse().expect("node address");
                let c = NodeClient::connect_with(&data_plane(cluster), a, cap.clone())
                    .await
                    .unwrap_or_else(|e| panic!("connect to node {node} at {addr}: {e}"));
                clients.push((*node, c));
            }
            let mut at = s.first_block;
            let end = s.first_block + s.blocks;
            while at < end {
                let count = (end - at).min(u64::from(MAX_IO_BLOCKS)) as u32;
                let mut reads = Vec::new();
                for (node, c) in &clients {
                    let r = read_raw(c, at, count)
                        .await
                        .unwrap_or_else(|e| panic!("read of blocks {at}+{count} from node {node}: {e}"));
                    reads.push((*node, r));
                }
                for i in 0..count as usize {
                    let block = at + i as u64;
                    let bits: Vec<bool> = reads.iter().map(|(_, (w, _, _))| bit(w, i)).collect();
                    if bits.iter().any(|b| *b) {
                        cmp.written_blocks += 1;
                    }
                    if bits.iter().any(|b| *b != bits[0]) {
                        cmp.written_bit_differences += 1;
                    }
                    let (n0, (_, c0, d0)) = &reads[0];
                    let b0 = &d0[i * 4096..(i + 1) * 4096];
                    for (n, (w, c, d)) in &reads[1..] {
                        let b = &d[i * 4096..(i + 1) * 4096];
                        let crc_differs = bit(w, i) && bits[0] && c[i] != c0[i];
                        if b != b0 || crc_differs {
                            cmp.differences.push((s.index, block, *n0, *n));
                        }
                    }
                }
                cmp.blocks_compared += u64::from(count);
                at += u64::from(count);
            }
        }
        cmp
    });
    cluster.detach(volume_id, attachment);
    result
}

/// TLS to the cluster's storage nodes as the test's own certificate (see `Cluster::data_plane_identity`).
pub fn data_plane(cluster: &Cluster) -> slate_dataplane::tls::Connector {
    let id = cluster.data_plane_identity();
    let identity = slate_dataplane::tls::Identity::from_pem_files(&id.cert, &id.key).expect("the test identity");
    slate_dataplane::tls::Connector::tls(&cluster.info().ca, &identity).expect("a data-plane connector")
}
