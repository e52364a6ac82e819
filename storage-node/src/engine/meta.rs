//! Metadata structures and their page encodings.
//!
//! - [`ExtentTable`]: one 48-byte entry per extent (state, owner, alloc lsn),
//!   held entirely in RAM (~48 B per extent) and written as 4 KiB pages of 80
//!   entries at checkpoints.
//! - [`Catalog`]: segments and their snapshot layers, the highest generation
//!   per volume, and the write-intent regions. Small; held in RAM and written
//!   whole (one of two copies) at each checkpoint.
//! - [`ChunkPage`] / [`PageCache`]: per-block crc32c, written bitmap and zero
//!   bitmap, 512 blocks per 4 KiB page. These are the bulk of the metadata
//!   (~2 GiB per TiB on disk), so they live on disk and only a bounded LRU
//!   cache of them is in RAM. The cache does no I/O itself: the engine thread
//!   loads, evicts and writes pages; the cache tracks dirtiness, which slot is
//!   newest and which pages are pinned (changed by a batch not yet durable).

use super::layout::{check_page, seal_page, CHUNK_BLOCKS, ET_ENTRY_BYTES, ET_PER_PAGE, MAGIC_CATALOG, MAGIC_ET};
use super::uring::{AlignedBuf, ALIGN};
use super::EngineError;
use slate_protocol::wire::{Reader, Writer};
use slate_protocol::{Epoch, Generation, SegmentIndex, VolumeId};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Where an extent is in its lifecycle: free (verified zero) -> owned -> dirty -> zeroing -> free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExtentState {
    /// Verified zero: the only state allocation takes from.
    Free = 1,
    Owned = 2,
    /// Released; holds old data until the zeroer overwrites it.
    Dirty = 3,
    /// The zeroer is overwriting it (treated as dirty after a crash).
    Zeroing = 4,
    /// Failed verification repeatedly; never allocated again.
    Failed = 5,
}

impl ExtentState {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Free,
            2 => Self::Owned,
            3 => Self::Dirty,
            4 => Self::Zeroing,
            5 => Self::Failed,
            _ => return None,
        })
    }
}

/// One extent's table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentEntry {
    pub state: ExtentState,
    pub zero_failures: u8,
    /// Index of the extent within its segment layer (segment block / extent blocks).
    pub slot: u32,
    pub volume: VolumeId,
    pub segment: SegmentIndex,
    /// Layer id within the segment (see `SegMeta`).
    pub layer: u64,
    /// Chunk pages written home with an lsn below this predate the allocation: stale.
    pub alloc_lsn: u64,
}

impl ExtentEntry {
    pub fn dirty() -> Self {
        Self {
            state: ExtentState::Dirty,
            zero_failures: 0,
            slot: 0,
            volume: VolumeId(0),
            segment: SegmentIndex(0),
            layer: 0,
            alloc_lsn: 0,
        }
    }

    fn encode(&self, b: &mut [u8]) {
        b[0] = self.state as u8;
        b[1] = self.zero_failures;
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.volume.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.segment.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.layer.to_le_bytes());
        b[32..40].copy_from_slice(&self.alloc_lsn.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        Some(Self {
            state: ExtentState::from_u8(b[0])?,
            zero_failures: b[1],
            slot: u32_at(4),
            volume: VolumeId(u64_at(8)),
            segment: SegmentIndex(u32_at(16)),
            layer: u64_at(24),
            alloc_lsn: u64_at(32),
        })
    }
}

/// All extents' entries (in RAM), with the pages changed since the last checkpoint.
#[derive(Debug)]
pub struct ExtentTable {
    pub entries: Vec<ExtentEntry>,
    pub dirty_pages: BTreeSet<u64>,
    /// Per page: the slot (0/1) holding its newest version on disk.
    pub newest_slot: Vec<u8>,
}

impl ExtentTable {
    pub fn fresh(count: u64) -> Self {
        let pages = count.div_ceil(ET_PER_PAGE).max(1) as usize;
        Self {
            entries: vec![ExtentEntry::dirty(); count as usize],
            dirty_pages: BTreeSet::new(),
            newest_slot: vec![0; pages],
        }
    }

    pub fn get(&self, e: u32) -> Option<&ExtentEntry> {
        self.entries.get(e as usize)
    }

    pub fn set(&mut self, e: u32, entry: ExtentEntry) {
        if let Some(slot) = self.entries.get_mut(e as usize) {
            *slot = entry;
            self.dirty_pages.insert(u64::from(e) / ET_PER_PAGE);
        }
    }

    pub fn encode_page(&self, page: u64, nonce: u64, lsn: u64) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(ALIGN);
        let first = (page * ET_PER_PAGE) as usize;
        for i in 0..ET_PER_PAGE as usize {
            if let Some(e) = self.entries.get(first + i) {
                let o = 32 + i * ET_ENTRY_BYTES;
                e.encode(&mut b[o..o + ET_ENTRY_BYTES]);
            }
        }
        seal_page(&mut b, MAGIC_ET, nonce, page, lsn);
        b
    }

    /// Decodes page `page` into the table; returns false if the page is not valid.
    pub fn decode_page(&mut self, buf: &[u8], page: u64, nonce: u64) -> Result<u64, EngineError> {
        let lsn = check_page(buf, MAGIC_ET, nonce, page)
            .ok_or_else(|| EngineError::Format(format!("extent table page {page} invalid")))?;
        let first = (page * ET_PER_PAGE) as usize;
        for i in 0..ET_PER_PAGE as usize {
            let idx = first + i;
            if idx >= self.entries.len() {
                break;
            }
            let o = 32 + i * ET_ENTRY_BYTES;
            self.entries[idx] = ExtentEntry::decode(&buf[o..o + ET_ENTRY_BYTES])
                .ok_or_else(|| EngineError::Format(format!("extent table entry {idx} invalid")))?;
        }
        Ok(lsn)
    }
}

/// A snapshot layer of a segment. `extents` maps slot -> extent and is rebuilt from
/// the extent table at open (not stored in the catalog).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerMeta {
    /// Stable id, recorded as the owner of the layer's extents.
    pub id: u64,
    /// The snapshot epoch this layer started after (0 for the first layer). The layer
    /// is frozen at the next layer's base; the last layer is the writable head.
    pub base: Epoch,
    pub extents: BTreeMap<u32, u32>,
}

/// A segment held by this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegMeta {
    pub blocks: u64,
    pub next_layer_id: u64,
    /// Layer being folded away by an interrupted `delete_layer`.
    pub deleting: Option<u64>,
    /// Oldest first; never empty.
    pub layers: Vec<LayerMeta>,
}

/// Durable small state, written whole at checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub generations: BTreeMap<VolumeId, Generation>,
    pub segments: BTreeMap<(VolumeId, SegmentIndex), SegMeta>,
    pub intents: BTreeMap<VolumeId, BTreeSet<u64>>,
}

/// Most layers (snapshots + head) a segment may have.
pub const MAX_LAYERS: usize = 64;

impl Catalog {
    /// Bytes `encode` would produce (an upper bound).
    pub fn encoded_len(&self) -> usize {
        let segs: usize = self.segments.values().map(|s| 48 + s.layers.len() * 16).sum();
        let intents: usize = self.intents.values().map(|s| 12 + s.len() * 8).sum();
        40 + 12 + self.generations.len() * 16 + segs + intents
    }

    /// The catalog as a blob of whole blocks: header (magic, crc, nonce, len, lsn) + payload.
    pub fn encode(&self, nonce: u64, lsn: u64) -> AlignedBuf {
        let mut w = Writer::with_capacity(self.encoded_len());
        w.u32(self.generations.len() as u32);
        for (v, g) in &self.generations {
            w.u64(v.0);
            w.u64(g.0);
        }
        w.u32(self.segments.len() as u32);
        for ((v, s), m) in &self.segments {
            w.u64(v.0);
            w.u32(s.0);
            w.u64(m.blocks);
            w.u64(m.next_layer_id);
            w.u64(m.deleting.map_or(u64::MAX, |d| d));
            w.u16(m.layers.len() as u16);
            for l in &m.layers {
                w.u64(l.id);
                w.u64(l.base.0);
            }
        }
        w.u32(self.intents.len() as u32);
        for (v, set) in &self.intents {
            w.u64(v.0);
            w.u32(set.len() as u32);
            for r in set {
                w.u64(*r);
            }
        }
        let payload = w.into_vec();
        let mut b = AlignedBuf::zeroed(40 + payload.len());
        b[0..4].copy_from_slice(&MAGIC_CATALOG.to_le_bytes());
        b[8..16].copy_from_slice(&nonce.to_le_bytes());
        b[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        b[24..32].copy_from_slice(&lsn.to_le_bytes());
        b[40..40 + payload.len()].copy_from_slice(&payload);
        let crc = crc32c::crc32c(&b[8..40 + payload.len()]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Length in bytes of the blob whose first block is `first` (to read the rest), if valid.
    pub fn blob_len(first: &[u8], nonce: u64) -> Option<usize> {
        let u32_at = |o: usize| u32::from_le_bytes(first[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(first[o..o + 8].try_into().unwrap_or_default());
        if u32_at(0) != MAGIC_CATALOG || u64_at(8) != nonce {
            return None;
        }
        usize::try_from(u64_at(16)).ok().map(|l| 40 + l)
    }

    #[allow(clippy::many_single_char_names)]
    pub fn decode(b: &[u8], nonce: u64) -> Result<(Self, u64), EngineError> {
        let bad = |what: &str| EngineError::Format(format!("catalog invalid: {what}"));
        let len = Self::blob_len(b, nonce).ok_or_else(|| bad("header"))?;
        if len > b.len() {
            return Err(bad("length"));
        }
        let crc = u32::from_le_bytes(b[4..8].try_into().unwrap_or_default());
        if crc32c::crc32c(&b[8..len]) != crc {
            return Err(bad("checksum"));
        }
        let lsn = u64::from_le_bytes(b[24..32].try_into().unwrap_or_default());
        let mut r = Reader::new(&b[40..len]);
        let e = |_| bad("truncated");
        let mut c = Catalog::default();
        for _ in 0..r.u32().map_err(e)? {
            c.generations.insert(VolumeId(r.u64().map_err(e)?), Generation(r.u64().map_err(e)?));
        }
        for _ in 0..r.u32().map_err(e)? {
            let v = VolumeId(r.u64().map_err(e)?);
            let s = SegmentIndex(r.u32().map_err(e)?);
            let blocks = r.u64().map_err(e)?;
            let next_layer_id = r.u64().map_err(e)?;
            let deleting = Some(r.u64().map_err(e)?).filter(|d| *d != u64::MAX);
            let n = r.u16().map_err(e)?;
            if n == 0 || usize::from(n) > MAX_LAYERS {
                return Err(bad("layer count"));
            }
            let mut layers = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                layers.push(LayerMeta {
                    id: r.u64().map_err(e)?,
                    base: Epoch(r.u64().map_err(e)?),
                    extents: BTreeMap::new(),
                });
            }
            c.segments.insert((v, s), SegMeta { blocks, next_layer_id, deleting, layers });
        }
        for _ in 0..r.u32().map_err(e)? {
            let v = VolumeId(r.u64().map_err(e)?);
            let n = r.u32().map_err(e)?;
            let set = c.intents.entry(v).or_default();
            for _ in 0..n {
                set.insert(r.u64().map_err(e)?);
            }
        }
        r.finish().map_err(|_| bad("trailing bytes"))?;
        Ok((c, lsn))
    }
}

const BITMAP_WORDS: usize = (CHUNK_BLOCKS as usize) / 64;

/// Metadata of 512 consecutive blocks of one extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPage {
    pub written: [u64; BITMAP_WORDS],
    /// Set where a newer layer masks older layers' data with zeros (trim over a snapshot).
    pub zero: [u64; BITMAP_WORDS],
    pub crcs: [u32; CHUNK_BLOCKS as usize],
}

impl Default for ChunkPage {
    fn default() -> Self {
        Self { written: [0; BITMAP_WORDS], zero: [0; BITMAP_WORDS], crcs: [0; CHUNK_BLOCKS as usize] }
    }
}

const WRITTEN_AT: usize = 32;
const ZERO_AT: usize = WRITTEN_AT + BITMAP_WORDS * 8;
const CRCS_AT: usize = ZERO_AT + BITMAP_WORDS * 8;

impl ChunkPage {
    pub fn is_written(&self, i: usize) -> bool {
        self.written[i / 64] >> (i % 64) & 1 == 1
    }
    pub fn is_zero(&self, i: usize) -> bool {
        self.zero[i / 64] >> (i % 64) & 1 == 1
    }
    pub fn set_written(&mut self, i: usize, crc: u32) {
        self.written[i / 64] |= 1 << (i % 64);
        self.zero[i / 64] &= !(1 << (i % 64));
        self.crcs[i] = crc;
    }
    pub fn set_zero(&mut self, i: usize) {
        self.written[i / 64] &= !(1 << (i % 64));
        self.zero[i / 64] |= 1 << (i % 64);
        self.crcs[i] = 0;
    }
    pub fn clear(&mut self, i: usize) {
        self.written[i / 64] &= !(1 << (i % 64));
        self.zero[i / 64] &= !(1 << (i % 64));
        self.crcs[i] = 0;
    }
    pub fn encode(&self, magic: u32, nonce: u64, page_no: u64, lsn: u64) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(ALIGN);
        for (i, w) in self.written.iter().enumerate() {
            b[WRITTEN_AT + i * 8..WRITTEN_AT + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        for (i, w) in self.zero.iter().enumerate() {
            b[ZERO_AT + i * 8..ZERO_AT + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        for (i, c) in self.crcs.iter().enumerate() {
            b[CRCS_AT + i * 4..CRCS_AT + i * 4 + 4].copy_from_slice(&c.to_le_bytes());
        }
        seal_page(&mut b, magic, nonce, page_no, lsn);
        b
    }

    /// Decodes a page slot; None if it is not a valid page `page_no` of this format.
    pub fn decode(b: &[u8], magic: u32, nonce: u64, page_no: u64) -> Option<(Self, u64)> {
        let lsn = check_page(b, magic, nonce, page_no)?;
        let mut p = Self::default();
        for i in 0..BITMAP_WORDS {
            p.written[i] = u64::from_le_bytes(b[WRITTEN_AT + i * 8..WRITTEN_AT + i * 8 + 8].try_into().ok()?);
            p.zero[i] = u64::from_le_bytes(b[ZERO_AT + i * 8..ZERO_AT + i * 8 + 8].try_into().ok()?);
        }
        for i in 0..CHUNK_BLOCKS as usize {
            p.crcs[i] = u32::from_le_bytes(b[CRCS_AT + i * 4..CRCS_AT + i * 4 + 4].try_into().ok()?);
        }
        Some((p, lsn))
    }
}

/// A cached chunk page.
#[derive(Debug)]
pub struct CachedPage {
    pub page: Box<ChunkPage>,
    /// Changed since last written home.
    pub dirty: bool,
    /// Sequence number of the last not-yet-durable command that changed it (0: none).
    /// A pinned page is never written home or evicted.
    pub pin_seq: u64,
    /// The slot (0/1) holding the newest version on disk; the next write goes to the other.
    pub newest_slot: u8,
    tick: u64,
}

impl CachedPage {
    pub fn pinned(&self) -> bool {
        self.pin_seq != 0
    }
}

/// RAM charged per cached page: the page, its entry, and map overheads.
pub const CACHE_ENTRY_BYTES: u64 =
    (std::mem::size_of::<ChunkPage>() + std::mem::size_of::<CachedPage>() + 3 * 8 + 4 * 8 + 24) as u64;

/// Bounded LRU of chunk pages. Does no I/O.
#[derive(Debug)]
pub struct PageCache {
    map: HashMap<u64, CachedPage>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    cap: usize,
    pinned: Vec<u64>,
}

impl PageCache {
    pub fn new(cap_pages: usize) -> Self {
        Self { map: HashMap::new(), lru: BTreeMap::new(), tick: 0, cap: cap_pages, pinned: Vec::new() }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn pinned_count(&self) -> usize {
        self.pinned.len()
    }
    pub fn contains(&self, page: u64) -> bool {
        self.map.contains_key(&page)
    }

    fn touch(&mut self, page: u64) {
        if let Some(c) = self.map.get_mut(&page) {
            self.lru.remove(&c.tick);
            self.tick += 1;
            c.tick = self.tick;
            self.lru.insert(self.tick, page);
        }
    }

    pub fn get(&mut self, page: u64) -> Option<&CachedPage> {
        self.touch(page);
        self.map.get(&page)
    }

    /// Mutable access for a change by command `seq`: marks the page dirty and, unless
    /// `seq` is 0 (a change already durable), pinned until `unpin_upto(seq)`.
    pub fn modify(&mut self, page: u64, seq: u64) -> Option<&mut ChunkPage> {
        self.touch(page);
        let c = self.map.get_mut(&page)?;
        c.dirty = true;
        if seq != 0 {
            if c.pin_seq == 0 {
                self.pinned.push(page);
            }
            c.pin_seq = c.pin_seq.max(seq);
        }
        Some(&mut c.page)
    }

    /// Replaces a cached page's content without marking it dirty (reset after a new allocation).
    pub fn reset_clean(&mut self, page: u64) {
        if let Some(c) = self.map.get_mut(&page) {
            *c.page = ChunkPage::default();
            c.dirty = false;
        }
    }

    pub fn insert(&mut self, page: u64, content: ChunkPage, newest_slot: u8) {
        self.tick += 1;
        let c = CachedPage { page: Box::new(content), dirty: false, pin_seq: 0, newest_slot, tick: self.tick };
        if let Some(old) = self.map.insert(page, c) {
            self.lru.remove(&old.tick);
        }
        self.lru.insert(self.tick, page);
    }

    /// Least recently used page that is not pinned.
    pub fn victim(&self) -> Option<u64> {
        self.lru.values().copied().find(|p| self.map.get(p).is_some_and(|c| !c.pinned()))
    }

    pub fn remove(&mut self, page: u64) -> Option<CachedPage> {
        let c = self.map.remove(&page)?;
        self.lru.remove(&c.tick);
        Some(c)
    }

    /// Commands up to `seq` are durable: pages they changed may be written home again.
    pub fn unpin_upto(&mut self, seq: u64) {
        let map = &mut self.map;
        self.pinned.retain(|p| match map.get_mut(p) {
            Some(c) if c.pin_seq != 0 && c.pin_seq <= seq => {
                c.pin_seq = 0;
                false
            }
            Some(c) => c.pin_seq != 0,
            None => false,
        });
    }

    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.iter().filter(|(_, c)| c.dirty).map(|(p, _)| *p).collect();
        v.sort_unstable();
        v
    }

    /// After a page was written to slot `slot`: it is clean and that slot is newest.
    pub fn mark_written(&mut self, page: u64, slot: u8) {
        if let Some(c) = self.map.get_mut(&page) {
            c.dirty = false;
            c.newest_slot = slot;
        }
    }

    pub fn peek(&self, page: u64) -> Option<&CachedPage> {
        self.map.get(&page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_round_trip() {
        let mut c = Catalog::default();
        c.generations.insert(VolumeId(1), Generation(5));
        c.segments.insert(
            (VolumeId(1), SegmentIndex(2)),
            SegMeta {
                blocks: 1024,
                next_layer_id: 3,
                deleting: Some(1),
                layers: vec![
                    LayerMeta { id: 0, base: Epoch(0), extents: BTreeMap::new() },
                    LayerMeta { id: 2, base: Epoch(7), extents: BTreeMap::new() },
                ],
            },
        );
        c.intents.entry(VolumeId(1)).or_default().insert(9);
        let b = c.encode(11, 42);
        assert!(c.encoded_len() + 40 >= b.len() - ALIGN);
        let (d, lsn) = Catalog::decode(&b, 11).unwrap();
        assert_eq!(d, c);
        assert_eq!(lsn, 42);
        let mut bad = AlignedBuf::copy_from(&b);
        bad[45] ^= 0xff;
        assert!(Catalog::decode(&bad, 11).is_err());
    }

    #[test]
    fn chunk_page_round_trip() {
        let mut p = ChunkPage::default();
        p.set_written(3, 0xdead_beef);
        p.set_zero(511);
        let b = p.encode(7, 1, 2, 3);
        let (q, lsn) = ChunkPage::decode(&b, 7, 1, 2).unwrap();
        assert_eq!(q, p);
        assert_eq!(lsn, 3);
        assert!(q.is_written(3) && !q.is_written(4) && q.is_zero(511));
    }

    #[test]
    fn extent_table_round_trip() {
        let mut t = ExtentTable::fresh(100);
        t.set(
            81,
            ExtentEntry {
                state: ExtentState::Owned,
                zero_failures: 0,
                slot: 4,
                volume: VolumeId(9),
                segment: SegmentIndex(1),
                layer: 2,
                alloc_lsn: 55,
            },
        );
        let b = t.encode_page(1, 5, 10);
        let mut u = ExtentTable::fresh(100);
        assert_eq!(u.decode_page(&b, 1, 5).unwrap(), 10);
        assert_eq!(u.entries[81], t.entries[81]);
    }
}
