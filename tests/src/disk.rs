//! Looking at a storage node's disk file from outside: fingerprints of its
//! 4 KiB blocks, so a test can tell which blocks a volume wrote and prove that
//! none of them is left after an erasure. Reads are buffered (the page cache
//! is bypassed by the node's O_DIRECT writes, so read only a quiet disk, or
//! accept that a block being written at that moment may be missed).

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

const BLOCK: usize = 4096;

/// A 128-bit fingerprint of a block: crc32c of the whole block plus 12 bytes of it.
/// Ciphertext is uniformly random, so two different blocks collide with
/// probability ~2^-128.
pub fn fingerprint(block: &[u8]) -> u128 {
    let crc = u128::from(crc32c::crc32c(block));
    let a = u128::from(u64::from_le_bytes(block[0..8].try_into().expect("8 bytes")));
    let b = u128::from(u32::from_le_bytes(block[2048..2052].try_into().expect("4 bytes")));
    (crc << 96) | (a << 32) | b
}

/// Calls `f(offset, block)` for every 4 KiB block of `path` from byte `from`.
pub fn for_each_block(path: &Path, from: u64, mut f: impl FnMut(u64, &[u8])) {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.seek(SeekFrom::Start(from)).expect("seek");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = from;
    loop {
        let mut got = 0;
        while got < buf.len() {
            match file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("read {}: {e}", path.display()),
            }
        }
        for (i, b) in buf[..got - got % BLOCK].chunks_exact(BLOCK).enumerate() {
            f(off + (i * BLOCK) as u64, b);
        }
        if got < buf.len() {
            return;
        }
        off += got as u64;
    }
}

/// Fingerprints of the non-zero blocks of `path` from byte `from`.
pub fn nonzero_prints(path: &Path, from: u64) -> HashSet<u128> {
    let mut set = HashSet::new();
    for_each_block(path, from, |_, b| {
        if b.iter().any(|x| *x != 0) {
            set.insert(fingerprint(b));
        }
    });
    set
}

/// How many blocks of `path` (anywhere) have a fingerprint in `prints`.
pub fn count_present<S: std::hash::BuildHasher>(path: &Path, prints: &HashSet<u128, S>) -> usize {
    let mut n = 0;
    for_each_block(path, 0, |_, b| {
        if prints.contains(&fingerprint(b)) {
            n += 1;
        }
    });
    n
}

/// True if every byte of `path` is zero.
pub fn all_zero(path: &Path) -> bool {
    let mut zero = true;
    for_each_block(path, 0, |_, b| zero &= b.iter().all(|x| *x == 0));
    zero
}
