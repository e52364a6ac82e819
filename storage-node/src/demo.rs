//! `slate-node demo`: the storage node end to end in a few seconds, for the README.
//!
//! Formats a small disk file, starts a real node (engine, data-plane server,
//! metrics) in this process on loopback, opens a session with a capability
//! signed by a key made on the spot, writes and reads back blocks, shows what
//! trim, fencing and a forged capability do, and stops the node cleanly. It
//! uses only public APIs ([`RunningNode`], [`NodeClient`]), so it doubles as a
//! smoke test of the whole path.

use crate::config::{NodeConfig, StaticAssignment};
use crate::engine::{self, FormatOptions};
use crate::node::RunningNode;
use anyhow::{bail, Context};
use bytes::Bytes;
use slate_dataplane::client::{ClientError, NodeClient};
use slate_protocol::message::BlockRange;
use slate_protocol::{
    BlockIndex, Capability, ErrorKind, Generation, NodeId, Rights, SegmentIndex, SignedCapability, VolumeId,
    BLOCK_SIZE_BYTES,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 64 << 20;
const EXTENT_BYTES: u64 = 1 << 20;
const JOURNAL_BYTES: u64 = 4 << 20;
const SEGMENT_BLOCKS: u64 = 4096;
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// A directory for the disk file on a filesystem that supports O_DIRECT (not tmpfs).
fn pick_dir() -> anyhow::Result<tempfile::TempDir> {
    let tmp = std::env::temp_dir();
    let on_tmpfs = rustix::fs::statfs(&tmp).is_ok_and(|s| u64::try_from(s.f_type).unwrap_or(0) == TMPFS_MAGIC);
    let base = if on_tmpfs { std::env::current_dir()? } else { tmp };
    tempfile::Builder::new().prefix("slate-demo-").tempdir_in(&base).context("making a temporary directory")
}

/// Writes with retries while the fresh disk's extents are still being zeroed and verified.
async fn write_retrying(client: &NodeClient, start: BlockIndex, data: Bytes) -> Result<(), ClientError> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match client.write_blocks(start, data.clone()).await {
            Err(e) if e.kind() == Some(ErrorKind::NoSpace) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

fn pattern(block: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK_SIZE_BYTES];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (block as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
    }
    v
}

/// Runs the demo, printing each step.
pub async fn run(dir: Option<&Path>) -> anyhow::Result<()> {
    let tmp;
    let dir: PathBuf = if let Some(d) = dir {
        d.to_owned()
    } else {
        tmp = pick_dir()?;
        tmp.path().to_owned()
    };
    let disk = dir.join("demo-disk.img");
    if disk.exists() {
        bail!("{} already exists; pick another --dir", disk.display());
    }
    let fmt = FormatOptions {
        extent_size_bytes: EXTENT_BYTES,
        journal_bytes: JOURNAL_BYTES,
        node_id: NodeId(1),
        size_bytes: Some(DISK_BYTES),
    };
    let report = engine::format(&disk, &fmt).context("formatting the demo disk")?;
    println!(
        "1. formatted {} ({} MiB file): {} extents of {} KiB, all dirty until zeroed and verified",
        disk.display(),
        DISK_BYTES >> 20,
        report.extent_count,
        report.extent_size_bytes >> 10
    );

    let signing_key = slate_protocol::capability::generate_signing_key();
    let mut cfg = NodeConfig::new(NodeId(1), "127.0.0.1:0".parse()?, disk.clone(), &signing_key.verifying_key());
    cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
    cfg.assignments.push(StaticAssignment {
        volume: VolumeId(1),
        segment: SegmentIndex(0),
        segment_blocks: SEGMENT_BLOCKS,
    });
    let node = RunningNode::start(&cfg).await?;
    println!(
        "2. node-1 serving the data plane on {} (metrics on http://{}/metrics), holding vol-1 seg-0 ({} blocks)",
        node.addr,
        node.metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
        SEGMENT_BLOCKS
    );

    let cap = |generation: u64, key: &ed25519_dalek::SigningKey| -> SignedCapability {
        Capability {
            volume: VolumeId(1),
            generation: Generation(generation),
            rights: Rights::READ_WRITE,
            expires_unix_secs: slate_protocol::now_unix_secs() + 600,
            nodes: vec![NodeId(1)],
            ..Default::default()
        }
        .sign(key)
    };
    let client = NodeClient::connect(node.addr, cap(1, &signing_key)).await?;
    println!("3. session open for vol-1 gen-1 (capability signed by a key made just now)");

    let blocks = 16u64;
    let mut data = Vec::with_capacity(blocks as usize * BLOCK_SIZE_BYTES);
    for b in 0..blocks {
        data.extend_from_slice(&pattern(b));
    }
    let started = Instant::now();
    write_retrying(&client, BlockIndex(0), Bytes::from(data.clone())).await?;
    println!("4. wrote {blocks} blocks at blk-0 (durable when acknowledged) in {:?}", started.elapsed());
    let back = client.read_blocks(BlockIndex(0), blocks as u32).await?;
    if back[..] != data[..] {
        bail!("read back differs from what was written");
    }
    println!("5. read them back: identical ({} bytes, crc32c checked on the node and here)", back.len());
    let unwritten = client.read_blocks(BlockIndex(100), 4).await?;
    if unwritten.iter().any(|b| *b != 0) {
        bail!("unwritten blocks are not zeros");
    }
    println!("6. blocks never written read as zeros");
    client.trim(BlockRange { start: BlockIndex(4), count: 4 }).await?;
    let after = client.read_blocks(BlockIndex(0), blocks as u32).await?;
    let zeros = (4..8).all(|b| after[b * BLOCK_SIZE_BYTES..(b + 1) * BLOCK_SIZE_BYTES].iter().all(|x| *x == 0));
    if !zeros || after[..4 * BLOCK_SIZE_BYTES] != data[..4 * BLOCK_SIZE_BYTES] {
        bail!("trim did not do what it should");
    }
    println!("7. trimmed blk-4..blk-8: they read as zeros, the others are intact");

    let newer = NodeClient::connect(node.addr, cap(2, &signing_key)).await?;
    match client.write_blocks(BlockIndex(0), Bytes::from(pattern(0))).await {
        Err(e) if e.kind() == Some(ErrorKind::StaleGeneration) => {
            println!("8. a gen-2 session opened; the gen-1 session is now fenced: {e}");
        }
        other => bail!("the old generation was not fenced: {other:?}"),
    }
    newer.read_blocks(BlockIndex(0), 1).await?;

    let stranger = slate_protocol::capability::generate_signing_key();
    match NodeClient::connect(node.addr, cap(3, &stranger)).await {
        Err(e) if e.kind() == Some(ErrorKind::Forged) => println!("9. a capability signed by another key: {e}"),
        other => bail!("a forged capability was accepted: {other:?}"),
    }

    let stats = node.engine().stats();
    println!(
        "10. engine: extents free {} / owned {} / dirty {} / zeroing {}; {} MiB zeroed and verified; {} writes, {} fsyncs",
        stats.extents_free,
        stats.extents_owned,
        stats.extents_dirty,
        stats.extents_zeroing,
        stats.bytes_zeroed_total >> 20,
        stats.writes,
        stats.fsyncs
    );
    drop(client);
    drop(newer);
    node.shutdown().await?;
    println!("11. node stopped cleanly (in-flight requests finished, engine shut down)");
    Ok(())
}
