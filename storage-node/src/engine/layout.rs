//! On-disk layout: the superblock (two copies), the geometry it records, the
//! framing shared by every metadata page, and `format`.
//!
//! ```text
//! block 0                superblock copy A
//! block 1, 2             checkpoint block, ping-pong slots
//! journal                journal_blocks, circular, group-committed entries
//! catalog                2 copies x catalog_blocks (segments, layers, generations, intents)
//! extent table           et_pages x 2 slots (80 entries per page)
//! chunk metadata         extent_count x pages_per_extent x 2 slots (512 blocks per page:
//!                        written bitmap, zero bitmap, crc32c per block)
//! data                   extent_count x extent_blocks, 1 MiB aligned
//! last block             superblock copy B
//! ```
//!
//! Every metadata page that is rewritten in place has two slots: a writer always
//! overwrites the older slot, so a torn write leaves the previous version intact,
//! and a reader takes the valid slot with the highest lsn. Every page carries the
//! format nonce, so leftovers of an earlier format never validate.

use super::uring::{preallocate, AlignedBuf, Disk, ALIGN};
use super::{EngineError, FormatOptions};
use slate_protocol::NodeId;
use std::path::Path;

/// Default extent size: 4 MiB.
pub const DEFAULT_EXTENT_SIZE_BYTES: u64 = 4 << 20;
/// Default journal size: 64 MiB.
pub const DEFAULT_JOURNAL_BYTES: u64 = 64 << 20;

pub const BLOCK: u64 = ALIGN as u64;
/// Blocks described by one chunk metadata page.
pub const CHUNK_BLOCKS: u64 = 512;
/// Extent-table entries per page.
pub const ET_PER_PAGE: u64 = 80;
pub const ET_ENTRY_BYTES: usize = 48;

const SB_MAGIC: u64 = u64::from_le_bytes(*b"SLATESB1");
pub const FORMAT_VERSION: u32 = 1;
pub const MAGIC_CKPT: u32 = 0x5143_4b50; // "PKCQ"
pub const MAGIC_CATALOG: u32 = 0x5441_4347;
pub const MAGIC_ET: u32 = 0x5445_5445;
pub const MAGIC_CHUNK: u32 = 0x4b48_4343;
pub const MAGIC_JOURNAL: u32 = 0x4c4e_524a;

/// What `format` laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatReport {
    pub capacity_bytes: u64,
    pub extent_size_bytes: u64,
    pub extent_count: u64,
    pub data_start_bytes: u64,
    pub metadata_bytes: u64,
}

/// The superblock: identity and geometry of a formatted disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub nonce: u64,
    pub node_id: NodeId,
    pub total_blocks: u64,
    pub extent_blocks: u64,
    pub extent_count: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub ckpt_start: u64,
    pub catalog_start: u64,
    pub catalog_blocks: u64,
    pub et_start: u64,
    pub et_pages: u64,
    pub chunk_start: u64,
    pub pages_per_extent: u64,
    pub data_start: u64,
    pub format_time_secs: u64,
}

impl Superblock {
    /// Lays out a disk of `total_blocks`.
    pub fn plan(
        total_blocks: u64,
        extent_blocks: u64,
        journal_blocks: u64,
        node_id: NodeId,
        nonce: u64,
    ) -> Result<Self, EngineError> {
        let pages_per_extent = extent_blocks.div_ceil(CHUNK_BLOCKS);
        let journal_start = 3;
        let catalog_start = journal_start + journal_blocks;
        let layout_for = |n: u64| {
            let catalog_blocks = Self::catalog_blocks_for(n);
            let et_start = catalog_start + 2 * catalog_blocks;
            let et_pages = n.div_ceil(ET_PER_PAGE).max(1);
            let chunk_start = et_start + 2 * et_pages;
            let data_start = (chunk_start + 2 * n * pages_per_extent).div_ceil(256) * 256;
            (catalog_blocks, et_start, et_pages, chunk_start, data_start)
        };
        // Largest extent count that fits before the last block (superblock copy B).
        let usable = total_blocks.saturating_sub(1);
        let mut n = usable / (extent_blocks + 2 * pages_per_extent + 1);
        loop {
            let (_, _, _, _, data_start) = layout_for(n);
            if n == 0 || data_start + n * extent_blocks <= usable {
                break;
            }
            n -= 1;
        }
        if n == 0 {
            return Err(EngineError::Format(format!(
                "disk of {} bytes too small for extents of {} bytes and a journal of {} bytes",
                total_blocks * BLOCK,
                extent_blocks * BLOCK,
                journal_blocks * BLOCK
            )));
        }
        let (catalog_blocks, et_start, et_pages, chunk_start, data_start) = layout_for(n);
        Ok(Self {
            version: FORMAT_VERSION,
            nonce,
            node_id,
            total_blocks,
            extent_blocks,
            extent_count: n,
            journal_start,
            journal_blocks,
            ckpt_start: 1,
            catalog_start,
            catalog_blocks,
            et_start,
            et_pages,
            chunk_start,
            pages_per_extent,
            data_start,
            format_time_secs: slate_protocol::now_unix_secs(),
        })
    }

    /// Catalog copy size: room for ~64 bytes per extent, at least 256 KiB, at most 64 MiB.
    fn catalog_blocks_for(extents: u64) -> u64 {
        (extents * 64).clamp(256 << 10, 64 << 20) / BLOCK
    }

    pub fn sb_b_block(&self) -> u64 {
        self.total_blocks - 1
    }

    pub fn encode(&self) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(ALIGN);
        let fields = [
            SB_MAGIC,
            u64::from(self.version),
            self.nonce,
            self.node_id.0,
            self.total_blocks,
            self.extent_blocks,
            self.extent_count,
            self.journal_start,
            self.journal_blocks,
            self.ckpt_start,
            self.catalog_start,
            self.catalog_blocks,
            self.et_start,
            self.et_pages,
            self.chunk_start,
            self.pages_per_extent,
            self.data_start,
            self.format_time_secs,
        ];
        for (i, f) in fields.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&f.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[8..]);
        b[0..4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, EngineError> {
        if b.len() < ALIGN {
            return Err(EngineError::Format("superblock truncated".into()));
        }
        let crc = u32::from_le_bytes(b[0..4].try_into().unwrap_or_default());
        let f = |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap_or_default());
        if f(0) != SB_MAGIC {
            return Err(EngineError::Format("no slate superblock (bad magic)".into()));
        }
        if crc32c::crc32c(&b[8..ALIGN]) != crc {
            return Err(EngineError::Format("superblock checksum mismatch".into()));
        }
        if f(1) != u64::from(FORMAT_VERSION) {
            return Err(EngineError::Format(format!("unsupported format version {}", f(1))));
        }
        let sb = Self {
            version: FORMAT_VERSION,
            nonce: f(2),
            node_id: NodeId(f(3)),
            total_blocks: f(4),
            extent_blocks: f(5),
            extent_count: f(6),
            journal_start: f(7),
            journal_blocks: f(8),
            ckpt_start: f(9),
            catalog_start: f(10),
            catalog_blocks: f(11),
            et_start: f(12),
            et_pages: f(13),
            chunk_start: f(14),
            pages_per_extent: f(15),
            data_start: f(16),
            format_time_secs: f(17),
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Checks the relations between the fields, so that nothing derived from them overflows.
    fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: &str| Err(EngineError::Format(format!("superblock geometry invalid: {what}")));
        if self.extent_blocks < 16 || self.extent_blocks > (1 << 18) {
            return bad("extent size");
        }
        if self.extent_count == 0 || self.extent_count > u64::from(u32::MAX) {
            return bad("extent count");
        }
        if self.pages_per_extent != self.extent_blocks.div_ceil(CHUNK_BLOCKS) {
            return bad("pages per extent");
        }
        if self.ckpt_start != 1 || self.journal_start != 3 || self.journal_blocks < 16 {
            return bad("journal");
        }
        if self.catalog_start != self.journal_start + self.journal_blocks
            || self.et_start != self.catalog_start + 2 * self.catalog_blocks
            || self.et_pages != self.extent_count.div_ceil(ET_PER_PAGE).max(1)
            || self.chunk_start != self.et_start + 2 * self.et_pages
            || self.data_start < self.chunk_start + 2 * self.extent_count * self.pages_per_extent
        {
            return bad("region order");
        }
        let end = self.extent_count.checked_mul(self.extent_blocks).and_then(|d| d.checked_add(self.data_start));
        if end.is_none_or(|e| e >= self.total_blocks) {
            return bad("data beyond end");
        }
        Ok(())
    }

    /// Byte offset of block `b`.
    pub fn off(b: u64) -> u64 {
        b * BLOCK
    }

    /// First disk block of extent `e`.
    pub fn extent_block(&self, e: u32) -> u64 {
        self.data_start + u64::from(e) * self.extent_blocks
    }

    /// Disk block of slot `slot` (0/1) of chunk page `page` (global page number).
    pub fn chunk_page_block(&self, page: u64, slot: u8) -> u64 {
        self.chunk_start + page * 2 + u64::from(slot)
    }

    /// Disk block of slot `slot` of extent-table page `page`.
    pub fn et_page_block(&self, page: u64, slot: u8) -> u64 {
        self.et_start + page * 2 + u64::from(slot)
    }

    pub fn metadata_bytes(&self) -> u64 {
        self.data_start * BLOCK
    }
}

/// Writes a page header and checksum into `page` (4 KiB): magic, crc, nonce, page number, lsn.
pub fn seal_page(page: &mut [u8], magic: u32, nonce: u64, page_no: u64, lsn: u64) {
    page[0..4].copy_from_slice(&magic.to_le_bytes());
    page[8..16].copy_from_slice(&nonce.to_le_bytes());
    page[16..24].copy_from_slice(&page_no.to_le_bytes());
    page[24..32].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32c::crc32c(&page[8..ALIGN]);
    page[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a page's header; returns its lsn if it is a valid page `page_no` of this format.
pub fn check_page(page: &[u8], magic: u32, nonce: u64, page_no: u64) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap_or_default());
    if page.len() < ALIGN || u32_at(0) != magic || u64_at(8) != nonce || u64_at(16) != page_no {
        return None;
    }
    (crc32c::crc32c(&page[8..ALIGN]) == u32_at(4)).then(|| u64_at(24))
}

/// Formats `path`. See the module docs for the layout.
pub fn format(path: &Path, opts: &FormatOptions) -> Result<FormatReport, EngineError> {
    let es = opts.extent_size_bytes;
    if !(64 << 10..=1 << 30).contains(&es) || !es.is_multiple_of(64 << 10) {
        return Err(EngineError::Invalid("extent size must be a multiple of 64 KiB in 64 KiB ..= 1 GiB".into()));
    }
    if opts.journal_bytes < (1 << 20) || !opts.journal_bytes.is_multiple_of(BLOCK) || opts.journal_bytes > (16 << 30) {
        return Err(EngineError::Invalid("journal size must be a multiple of 4 KiB in 1 MiB ..= 16 GiB".into()));
    }
    if let Some(size) = opts.size_bytes {
        let existing = std::fs::metadata(path).map_or(0, |m| m.len());
        if existing < size {
            preallocate(path, size)?;
        }
    }
    let mut disk = Disk::open(path)?;
    let nonce = rand::random::<u64>() | 1;
    let sb = Superblock::plan(disk.size_bytes() / BLOCK, es / BLOCK, opts.journal_bytes / BLOCK, opts.node_id, nonce)?;
    // Invalidate old superblocks first so that a crash mid-format leaves no stale valid disk.
    let zero = AlignedBuf::zeroed(ALIGN);
    disk.write_at(0, &zero)?;
    disk.write_at(Superblock::off(sb.sb_b_block()), &zero)?;
    disk.sync()?;
    // Zero the journal, catalog and extent table regions: on a preallocated file
    // their blocks are then allocated and initialised, so a later fdatasync of a
    // journal entry never has to convert unwritten extents (a filesystem journal
    // commit on the acknowledgement path).
    let big = AlignedBuf::zeroed(1 << 20);
    let mut blk = sb.journal_start;
    while blk < sb.chunk_start {
        let n = (sb.chunk_start - blk).min((big.len() / ALIGN) as u64);
        disk.write_at(Superblock::off(blk), &big[..n as usize * ALIGN])?;
        blk += n;
    }
    // Empty catalog copy 0, checkpoint slot 0 pointing at it.
    let catalog = super::meta::Catalog::default().encode(nonce, 0);
    disk.write_at(Superblock::off(sb.catalog_start), &catalog)?;
    let ckpt = Checkpoint { seq: 1, tail_lsn: 1, tail_off: 0, catalog_copy: 0, lsn: 0 };
    disk.write_at(Superblock::off(sb.ckpt_start), &ckpt.encode(nonce))?;
    disk.write_at(Superblock::off(sb.ckpt_start + 1), &zero)?;
    // Extent table: every extent dirty (zeroed and verified before first use).
    let table = super::meta::ExtentTable::fresh(sb.extent_count);
    let mut pages = Vec::new();
    for p in 0..sb.et_pages {
        pages.push((sb.et_page_block(p, 0), table.encode_page(p, nonce, 0)));
        pages.push((sb.et_page_block(p, 1), AlignedBuf::zeroed(ALIGN)));
    }
    for chunk in pages.chunks(64) {
        let mut ios: Vec<_> = chunk
            .iter()
            .map(|(blk, buf)| super::uring::Io::Write { offset: Superblock::off(*blk), buf: &buf[..] })
            .collect();
        disk.run(&mut ios, false).first_error()?;
    }
    disk.sync()?;
    let sbb = sb.encode();
    disk.write_at(Superblock::off(sb.sb_b_block()), &sbb)?;
    disk.write_at(0, &sbb)?;
    disk.sync()?;
    Ok(FormatReport {
        capacity_bytes: sb.extent_count * sb.extent_blocks * BLOCK,
        extent_size_bytes: es,
        extent_count: sb.extent_count,
        data_start_bytes: sb.data_start * BLOCK,
        metadata_bytes: sb.metadata_bytes(),
    })
}

/// The geometry of a formatted disk, from its first superblock, without opening it
/// (buffered read: the superblock never changes after format). For tools and tests
/// that look at a disk file from outside, e.g. to tell data blocks from metadata.
pub fn read_geometry(path: &std::path::Path) -> Result<FormatReport, EngineError> {
    use std::io::Read;
    let mut b = vec![0u8; ALIGN];
    std::fs::File::open(path)?.read_exact(&mut b)?;
    let sb = Superblock::decode(&b)?;
    Ok(FormatReport {
        capacity_bytes: sb.extent_count * sb.extent_blocks * BLOCK,
        extent_size_bytes: sb.extent_blocks * BLOCK,
        extent_count: sb.extent_count,
        data_start_bytes: sb.data_start * BLOCK,
        metadata_bytes: sb.metadata_bytes(),
    })
}

/// Reads the superblock: copy A, else copy B (at the last block). Repairs a bad copy.
pub fn read_superblock(disk: &mut Disk) -> Result<Superblock, EngineError> {
    let mut a = AlignedBuf::zeroed(ALIGN);
    disk.read_at(0, &mut a)?;
    let total = disk.size_bytes() / BLOCK;
    let mut b = AlignedBuf::zeroed(ALIGN);
    let b_res = if total > 1 {
        disk.read_at(Superblock::off(total - 1), &mut b)?;
        Superblock::decode(&b)
    } else {
        Err(EngineError::Format("device too small".into()))
    };
    match (Superblock::decode(&a), b_res) {
        (Ok(sa), Ok(sb)) if sa == sb => Ok(sa),
        (Ok(sa), _) => {
            if sa.total_blocks <= total {
                tracing::warn!("superblock copy B invalid; rewriting it from copy A");
                disk.write_at(Superblock::off(sa.sb_b_block()), &sa.encode())?;
                disk.sync()?;
            }
            Ok(sa)
        }
        (Err(ea), Ok(sb)) => {
            tracing::warn!(error = %ea, "superblock copy A invalid; using copy B and rewriting A");
            disk.write_at(0, &sb.encode())?;
            disk.sync()?;
            Ok(sb)
        }
        (Err(ea), Err(eb)) => Err(EngineError::Format(format!("both superblock copies invalid: A: {ea}; B: {eb}"))),
    }
}

/// The checkpoint record (ping-pong in blocks 1 and 2): where journal replay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    /// lsn of the first journal entry to replay.
    pub tail_lsn: u64,
    /// Block offset (within the journal region) of that entry.
    pub tail_off: u64,
    /// Which catalog copy (0/1) this checkpoint wrote.
    pub catalog_copy: u8,
    /// lsn of the last entry whose effects the checkpoint holds (tail_lsn - 1).
    pub lsn: u64,
}

impl Checkpoint {
    pub fn encode(&self, nonce: u64) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(ALIGN);
        b[32..40].copy_from_slice(&self.tail_lsn.to_le_bytes());
        b[40..48].copy_from_slice(&self.tail_off.to_le_bytes());
        b[48] = self.catalog_copy;
        b[56..64].copy_from_slice(&self.lsn.to_le_bytes());
        seal_page(&mut b, MAGIC_CKPT, nonce, 0, self.seq);
        b
    }

    pub fn decode(b: &[u8], nonce: u64) -> Option<Self> {
        let seq = check_page(b, MAGIC_CKPT, nonce, 0)?;
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let catalog_copy = b[48];
        (catalog_copy < 2).then(|| Self {
            seq,
            tail_lsn: u64_at(32),
            tail_off: u64_at(40),
            catalog_copy,
            lsn: u64_at(56),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fits_and_round_trips() {
        let sb = Superblock::plan((1 << 30) / BLOCK, 1024, 4096, NodeId(7), 42).unwrap();
        assert!(sb.data_start + sb.extent_count * sb.extent_blocks < sb.total_blocks);
        assert!(sb.extent_count > 200);
        let enc = sb.encode();
        assert_eq!(Superblock::decode(&enc).unwrap(), sb);
        let mut bad = AlignedBuf::copy_from(&enc);
        bad[100] ^= 1;
        assert!(Superblock::decode(&bad).is_err());
    }

    #[test]
    fn page_seal_and_check() {
        let mut p = AlignedBuf::zeroed(ALIGN);
        p[100] = 5;
        seal_page(&mut p, MAGIC_ET, 9, 3, 77);
        assert_eq!(check_page(&p, MAGIC_ET, 9, 3), Some(77));
        assert_eq!(check_page(&p, MAGIC_ET, 8, 3), None);
        assert_eq!(check_page(&p, MAGIC_ET, 9, 4), None);
        p[200] = 1;
        assert_eq!(check_page(&p, MAGIC_ET, 9, 3), None);
    }
}
