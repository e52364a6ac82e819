//! AES-256-XTS encryption of volume blocks (IEEE P1619).
//!
//! Each 4 KiB block of a volume is one XTS data unit; its tweak is the block's
//! index in the volume as a little-endian 128-bit number. The 64-byte key is
//! `K1 || K2`: K1 encrypts the data, K2 encrypts the tweak. The halves must differ
//! (IEEE 1619 / FIPS 140 IG A.9), keys are zeroized on drop and never printed.
//!
//! The `xts-mode` crate runs AES one 16-byte block at a time. This module
//! instead computes a run of tweaks first, whitens the data with them, then
//! hands the whole run to `aes`'s multi-block API (which pipelines 8 blocks per
//! AES-NI round where the CPU has it), and whitens again. A test proves it
//! byte-identical to `xts-mode`; `benches/benches/xts.rs` compares the speed.

use std::fmt;

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;
use rand::RngCore;
use slate_secret::Secret;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of an AES-256-XTS key: two AES-256 keys.
pub const XTS_KEY_BYTES: usize = 64;
/// One XTS data unit: one volume block.
pub const DATA_UNIT_BYTES: usize = 4096;
/// One XTS data unit of dm-crypt and LUKS: a 512-byte sector (IV `plain64`).
pub const SECTOR_BYTES: usize = 512;
const AES_BLOCK: usize = 16;
/// AES blocks whitened and encrypted per call into the multi-block API.
const BATCH_BLOCKS: usize = 64;

/// Why a key or a buffer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The key is not 64 bytes long.
    #[error("an AES-256-XTS key is {XTS_KEY_BYTES} bytes, got {0}")]
    KeyLength(usize),
    /// Both halves of the key are the same.
    #[error("the two halves of an AES-256-XTS key must differ")]
    EqualHalves,
    /// The buffer is not a whole number of data units.
    #[error("buffer of {len} bytes is not a whole number of {unit}-byte data units")]
    Misaligned {
        /// Buffer length.
        len: usize,
        /// Data unit length.
        unit: usize,
    },
}

/// A volume data key (512 bits). Kept in a [`Secret`] page (out of core dumps,
/// zeroized on drop); `Debug` shows nothing of it.
pub struct XtsKey {
    bytes: Secret<[u8; XTS_KEY_BYTES]>,
}

impl XtsKey {
    /// Take a key from raw bytes; refuses a wrong length or equal halves.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != XTS_KEY_BYTES {
            return Err(CryptoError::KeyLength(bytes.len()));
        }
        let (k1, k2) = bytes.split_at(XTS_KEY_BYTES / 2);
        if constant_time_eq(k1, k2) {
            return Err(CryptoError::EqualHalves);
        }
        let mut key = Secret::<[u8; XTS_KEY_BYTES]>::zeroed();
        key.copy_from_slice(bytes);
        Ok(Self { bytes: key })
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = Secret::<[u8; XTS_KEY_BYTES]>::zeroed();
        loop {
            rand::rngs::OsRng.fill_bytes(&mut key[..]);
            let (k1, k2) = key.split_at(XTS_KEY_BYTES / 2);
            if !constant_time_eq(k1, k2) {
                return Self { bytes: key };
            }
        }
    }

    /// The raw key, for wrapping under a key-encryption key. Never log it.
    pub fn expose_bytes(&self) -> &[u8; XTS_KEY_BYTES] {
        &self.bytes
    }
}

impl ZeroizeOnDrop for XtsKey {}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XtsKey([redacted])")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Multiply a tweak by the primitive element α of GF(2^128) (IEEE P1619's
/// little-endian convention: shift left by one, fold the carry back as 0x87).
#[inline]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[inline]
fn xor_block(block: &mut [u8], t: u128) {
    let mut b = [0u8; AES_BLOCK];
    b.copy_from_slice(block);
    block.copy_from_slice(&(u128::from_le_bytes(b) ^ t).to_le_bytes());
}

/// The two expanded AES-256 key schedules of an XTS key: K1 for the data, K2 for the tweak.
struct Schedules {
    data: Aes256,
    tweak: Aes256,
}

/// Encrypts and decrypts the blocks of one volume. The AES key schedules live in a
/// [`Secret`] page (out of core dumps) and are zeroized on drop (the `aes` crate's
/// `zeroize` feature, then the page); `Debug` shows nothing.
pub struct VolumeCipher {
    keys: Secret<Schedules>,
}

impl fmt::Debug for VolumeCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeCipher([redacted])")
    }
}

impl VolumeCipher {
    /// Expand the key's two halves into AES-256 key schedules.
    pub fn new(key: &XtsKey) -> Self {
        let (k1, k2) = key.bytes.split_at(XTS_KEY_BYTES / 2);
        // The schedules are built on the stack and moved into the page: that transient
        // copy is the one this cannot wipe (see docs/design/keys.md).
        let keys = Secret::new(Schedules {
            data: Aes256::new(GenericArray::from_slice(k1)),
            tweak: Aes256::new(GenericArray::from_slice(k2)),
        });
        Self { keys }
    }

    /// Encrypt `buf` in place: whole 4 KiB blocks, the first being block `first_block` of the volume.
    pub fn encrypt_blocks(&self, first_block: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(u128::from(first_block), buf, DATA_UNIT_BYTES, true)
    }

    /// Decrypt `buf` in place: whole 4 KiB blocks, the first being block `first_block` of the volume.
    pub fn decrypt_blocks(&self, first_block: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(u128::from(first_block), buf, DATA_UNIT_BYTES, false)
    }

    /// Encrypt `buf` in place as 512-byte sectors, the first being sector
    /// `first_sector` (dm-crypt's `aes-xts-plain64`: tweak = the sector number).
    pub fn encrypt_sectors(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(u128::from(first_sector), buf, SECTOR_BYTES, true)
    }

    /// Decrypt `buf` in place as 512-byte sectors, the first being sector `first_sector`.
    pub fn decrypt_sectors(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.units(u128::from(first_sector), buf, SECTOR_BYTES, false)
    }

    /// Encrypt one data unit of any length that is a non-zero multiple of 16
    /// bytes (for IEEE 1619's 512-byte vectors; volumes use [`Self::encrypt_blocks`]).
    pub fn encrypt_unit(&self, unit_index: u128, unit: &mut [u8]) -> Result<(), CryptoError> {
        self.units(unit_index, unit, unit.len(), true)
    }

    /// Decrypt one data unit of any length that is a non-zero multiple of 16 bytes.
    pub fn decrypt_unit(&self, unit_index: u128, unit: &mut [u8]) -> Result<(), CryptoError> {
        self.units(unit_index, unit, unit.len(), false)
    }

    fn units(&self, first: u128, buf: &mut [u8], unit_len: usize, encrypt: bool) -> Result<(), CryptoError> {
        if unit_len == 0 || !unit_len.is_multiple_of(AES_BLOCK) || !buf.len().is_multiple_of(unit_len) {
            return Err(CryptoError::Misaligned { len: buf.len(), unit: unit_len });
        }
        for (i, unit) in buf.chunks_exact_mut(unit_len).enumerate() {
            self.one_unit(first.wrapping_add(i as u128), unit, encrypt);
        }
        Ok(())
    }

    fn one_unit(&self, index: u128, unit: &mut [u8], encrypt: bool) {
        let mut t = GenericArray::from(index.to_le_bytes());
        self.keys.tweak.encrypt_block(&mut t);
        let mut b = [0u8; AES_BLOCK];
        b.copy_from_slice(&t);
        let mut tweak = u128::from_le_bytes(b);
        let mut tweaks = [0u128; BATCH_BLOCKS];
        for run in unit.chunks_mut(BATCH_BLOCKS * AES_BLOCK) {
            for (slot, block) in tweaks.iter_mut().zip(run.chunks_exact_mut(AES_BLOCK)) {
                *slot = tweak;
                xor_block(block, tweak);
                tweak = mul_alpha(tweak);
            }
            let (blocks, _tail) = InOutBuf::from(&mut *run).into_chunks::<U16>();
            if encrypt {
                self.keys.data.encrypt_blocks_inout(blocks);
            } else {
                self.keys.data.decrypt_blocks_inout(blocks);
            }
            for (slot, block) in tweaks.iter().zip(run.chunks_exact_mut(AES_BLOCK)) {
                xor_block(block, *slot);
            }
        }
        tweaks.zeroize();
        b.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(XtsKey::from_bytes(&[1u8; 63]).unwrap_err(), CryptoError::KeyLength(63));
        assert_eq!(XtsKey::from_bytes(&[1u8; 64]).unwrap_err(), CryptoError::EqualHalves);
        let k = XtsKey::generate();
        assert_eq!(format!("{k:?}"), "XtsKey([redacted])");
        let c = VolumeCipher::new(&k);
        assert_eq!(format!("{c:?}"), "VolumeCipher([redacted])");
        let mut odd = vec![0u8; 4095];
        assert!(c.encrypt_blocks(0, &mut odd).is_err());
    }

    #[test]
    fn keys_and_schedules_are_out_of_core_dumps() {
        let k = XtsKey::generate();
        let c = VolumeCipher::new(&k);
        for (what, addr) in [
            ("key", k.expose_bytes().as_ptr() as usize),
            ("schedules", std::ptr::from_ref::<Schedules>(&c.keys) as usize),
        ] {
            let flags = slate_secret::mapping_flags(addr).expect("mapping found");
            assert!(flags.iter().any(|f| f == "dd"), "{what}: VmFlags {flags:?}");
        }
    }

    #[test]
    fn mul_alpha_carries() {
        assert_eq!(mul_alpha(1), 2);
        assert_eq!(mul_alpha(1 << 127), 0x87);
    }
}
