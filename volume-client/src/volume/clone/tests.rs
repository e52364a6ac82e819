//! A clone over in-memory nodes ([`crate::volume::fake`]): reads fall through to the
//! parent where the clone has not written, trims never let the parent show through,
//! block status is the union, flatten copies the parent's ciphertext once and only
//! where needed, and a fenced parent is opened again.

use super::{Parent, ParentOpener};
use crate::volume::fake::{layout, FakeConnector, FakeControl, FakeNode};
use crate::volume::{AttachInfo, Dek, Volume, VolumeConfig, VolumeError, VolumeLayout};
use slate_protocol::{Capability, Generation, Rights, VolumeId, BLOCK_SIZE_BYTES};
use std::sync::Arc;
use std::time::Duration;

const SEG: u64 = 16;

fn key() -> Dek {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(3);
    }
    Dek::new(k)
}

fn cfg() -> VolumeConfig {
    VolumeConfig {
        request_timeout: Duration::from_millis(500),
        retry_delay: Duration::from_millis(5),
        stall_timeout: Duration::from_secs(30),
        ..VolumeConfig::default()
    }
}

fn pattern(block: u64, version: u8) -> Vec<u8> {
    let mut v = vec![version; BLOCK_SIZE_BYTES];
    v[..8].copy_from_slice(&block.to_le_bytes());
    v
}

/// One volume's fake nodes and control plane.
struct Side {
    nodes: Vec<Arc<FakeNode>>,
    control: Arc<FakeControl>,
    connector: Arc<FakeConnector>,
    layout: VolumeLayout,
}

impl Side {
    fn new(volume: u64, segments: usize, node_ids: [u64; 2]) -> Self {
        let nodes: Vec<Arc<FakeNode>> = node_ids.iter().map(|n| FakeNode::new(*n)).collect();
        let placement: Vec<&[u64]> = (0..segments).map(|_| &node_ids[..]).collect();
        let mut layout = layout(SEG, &placement, 1);
        layout.volume = VolumeId(volume);
        let control = FakeControl::new(layout.clone(), &[], Duration::ZERO);
        let connector = FakeConnector::new(&nodes);
        Self { nodes, control, connector, layout }
    }

    async fn open(&self, generation: u64, rights: Rights) -> Result<Volume, VolumeError> {
        let mut l = self.layout.clone();
        l.generation = Generation(generation);
        let capability = Capability {
            volume: l.volume,
            generation: l.generation,
            rights,
            expires_unix_secs: u64::MAX,
            nodes: self.nodes.iter().map(|n| n.id).collect(),
            ..Default::default()
        }
        .sign(&slate_protocol::capability::generate_signing_key());
        let info = AttachInfo { layout: l, capability, dek: key() };
        Volume::open(info, self.control.clone(), self.connector.clone(), cfg()).await
    }

    fn stored(&self, block: u64) -> Option<bytes::Bytes> {
        self.nodes[0].block(block)
    }
}

#[derive(Debug)]
struct Reopen {
    side: Arc<Side>,
    generation: u64,
}

impl std::fmt::Debug for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Side").field("volume", &self.layout.volume).finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ParentOpener for Reopen {
    async fn open(&self) -> Result<Volume, VolumeError> {
        self.side.open(self.generation, Rights::READ).await
    }
}

/// A 32-block parent with the `written` ranges (first, end) at version 0xA0, and a 48-block clone of it.
async fn parent_and_clone(written: &[(u64, u64)]) -> (Arc<Side>, Side, Volume) {
    let parent = Arc::new(Side::new(1, 2, [1, 2]));
    {
        let w = parent.open(1, Rights::READ_WRITE).await.unwrap();
        for (first, end) in written {
            let data: Vec<u8> = (*first..*end).flat_map(|b| pattern(b, 0xA0)).collect();
            w.write_blocks(*first, &data, false).await.unwrap();
        }
        w.close().await;
    }
    let child = Side::new(2, 3, [11, 12]);
    let ro = parent.open(1, Rights::READ).await.unwrap();
    let clone = child.open(1, Rights::READ_WRITE).await.unwrap().with_parent(Parent::new(ro, None));
    (parent, child, clone)
}

async fn expect(v: &Volume, start: u64, count: u64, want: impl Fn(u64) -> Option<u8>) {
    let got = v.read_blocks(start, count).await.unwrap();
    for b in start..start + count {
        let block = &got[((b - start) as usize) * BLOCK_SIZE_BYTES..][..BLOCK_SIZE_BYTES];
        match want(b) {
            Some(version) => assert_eq!(block, &pattern(b, version)[..], "block {b}: expected version {version:#x}"),
            None => assert!(block.iter().all(|x| *x == 0), "block {b}: expected zeros"),
        }
    }
}

#[tokio::test]
async fn a_clone_reads_its_parent_where_it_has_not_written() {
    let (parent, child, clone) = parent_and_clone(&[(0, 32)]).await;
    assert_eq!(clone.parent().unwrap().blocks(), 32);
    // Before any write: the parent's blocks, and zeros past the parent's size.
    expect(&clone, 0, 48, |b| (b < 32).then_some(0xA0)).await;
    assert!(child.nodes.iter().all(|n| n.lock().blocks.is_empty()), "a clone holds nothing until written");
    // Its own writes win; the parent never changes.
    let data: Vec<u8> = (4..8).chain(30..34).flat_map(|b| pattern(b, 0xC1)).collect();
    clone.write_blocks(4, &data[..4 * BLOCK_SIZE_BYTES], false).await.unwrap();
    clone.write_blocks(30, &data[4 * BLOCK_SIZE_BYTES..], false).await.unwrap();
    expect(&clone, 0, 48, |b| match b {
        4..8 | 30..34 => Some(0xC1),
        _ if b < 32 => Some(0xA0),
        _ => None,
    })
    .await;
    let p = parent.open(1, Rights::READ).await.unwrap();
    expect(&p, 0, 32, |_| Some(0xA0)).await;
    // Block status is the union of both layers.
    let bits = clone.allocated_blocks(0, 48).await.unwrap();
    assert!(bits[..34].iter().all(|b| *b) && bits[34..].iter().all(|b| !b), "{bits:?}");
}

#[tokio::test]
async fn trims_and_zeroes_never_let_the_parent_show_through() {
    let (parent, child, clone) = parent_and_clone(&[(0, 8), (20, 24)]).await;
    let ours: Vec<u8> = (40..44).flat_map(|b| pattern(b, 0xC2)).collect();
    clone.write_blocks(40, &ours, false).await.unwrap();
    clone.trim_blocks(0, 48, false).await.unwrap();
    expect(&clone, 0, 48, |_| None).await;
    // Over the parent's data: zero blocks written (ciphertext, not zeros, at rest); elsewhere trimmed.
    let zeros_at_rest = |b: u64| child.stored(b).is_some_and(|d| d.iter().any(|x| *x != 0));
    assert!((0..8).chain(20..24).all(zeros_at_rest), "zero blocks are written over the parent's data");
    assert!((8..20).chain(24..48).all(|b| child.stored(b).is_none()), "the rest is trimmed, not written");
    // Write-zeroes likewise.
    let (_, _, clone2) = parent_and_clone(&[(0, 8)]).await;
    clone2.trim_blocks(2, 4, true).await.unwrap();
    expect(&clone2, 0, 8, |b| (!(2..6).contains(&b)).then_some(0xA0)).await;
    let p = parent.open(1, Rights::READ).await.unwrap();
    expect(&p, 0, 8, |_| Some(0xA0)).await;
    use crate::blockdev::BlockDevice;
    assert!(!clone.can_fast_zero(), "a clone's write-zeroes writes blocks");
}

#[tokio::test]
async fn flatten_copies_the_parents_ciphertext_once_and_only_where_needed() {
    let (parent, child, clone) = parent_and_clone(&[(0, 8), (20, 24)]).await;
    let ours: Vec<u8> = (2..4).flat_map(|b| pattern(b, 0xC3)).collect();
    clone.write_blocks(2, &ours, false).await.unwrap();
    let first = clone.copy_from_parent(0, 20).await.unwrap();
    let second = clone.copy_from_parent(20, 28).await.unwrap();
    assert_eq!((first.copied, first.own, first.empty), (6, 2, 12));
    assert_eq!((second.copied, second.own, second.empty), (4, 0, 24));
    // The parent's stored ciphertext, byte for byte: nothing was re-encrypted.
    for b in (0..2).chain(4..8).chain(20..24) {
        assert_eq!(child.stored(b), parent.stored(b), "block {b}");
    }
    assert_ne!(child.stored(2), parent.stored(2), "the clone's own write is kept");
    assert!((8..20).chain(24..48).all(|b| child.stored(b).is_none()), "nothing copied where the parent is empty");
    // Idempotent: run again, nothing to copy (an interrupted flatten just runs again).
    let again = clone.copy_from_parent(0, 48).await.unwrap();
    assert_eq!((again.copied, again.own, again.empty), (0, 12, 36));
    // Without its parent the clone reads the same.
    clone.close().await;
    let alone = child.open(2, Rights::READ_WRITE).await.unwrap();
    expect(&alone, 0, 48, |b| match b {
        2..4 => Some(0xC3),
        0..8 | 20..24 => Some(0xA0),
        _ => None,
    })
    .await;
    let e = alone.copy_from_parent(0, 8).await.unwrap_err();
    assert!(matches!(e, VolumeError::Layout(_)), "{e:?}");
}

#[tokio::test]
async fn a_fenced_parent_is_opened_again() {
    let parent = Arc::new(Side::new(1, 2, [1, 2]));
    {
        let w = parent.open(1, Rights::READ_WRITE).await.unwrap();
        w.write_blocks(0, &pattern(0, 0xA0), false).await.unwrap();
        w.close().await;
    }
    let child = Side::new(2, 3, [11, 12]);
    let opener = Arc::new(Reopen { side: Arc::clone(&parent), generation: 2 });
    let ro = parent.open(1, Rights::READ).await.unwrap();
    let clone = child
        .open(1, Rights::READ_WRITE)
        .await
        .unwrap()
        .with_parent(Parent::new(ro, Some(opener as Arc<dyn ParentOpener>)));
    // The parent is attached read-write elsewhere: its nodes now refuse generation 1.
    for n in &parent.nodes {
        n.lock().highest = Generation(2);
    }
    expect(&clone, 0, 2, |b| (b == 0).then_some(0xA0)).await;
    assert_eq!(clone.parent().unwrap().reopened(), 1);
    // Without an opener the refusal is the reader's error.
    let ro = parent.open(2, Rights::READ).await.unwrap();
    let plain = child.open(3, Rights::READ_WRITE).await.unwrap().with_parent(Parent::new(ro, None));
    for n in &parent.nodes {
        n.lock().highest = Generation(3);
    }
    assert_eq!(plain.read_blocks(0, 1).await.unwrap_err(), VolumeError::Fenced);
}
