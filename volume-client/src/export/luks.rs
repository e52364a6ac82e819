//! The LUKS1 on-disk format, as far as an export needs it: a header with one
//! passphrase key slot over an `aes-xts-plain64` payload with a 512-bit key and
//! SHA-256 (LUKS On-Disk Format Specification 1.2.3; what cryptsetup and
//! QEMU's `luks` driver read).
//!
//! An image is `[header area | payload]`. The header area holds:
//!
//! * the partition header (`phdr`, 592 bytes, big-endian): magic, version 1,
//!   cipher `aes` / `xts-plain64`, hash `sha256`, payload offset and key size,
//!   the master key digest (PBKDF2 of the master key, 20 bytes) with its salt
//!   and iteration count, a UUID, and 8 key slot descriptors;
//! * the key material of each slot: the master key spread over 4000 stripes by
//!   the anti-forensic splitter ([`af_split`]), encrypted with `aes-xts-plain64`
//!   under a key derived from the passphrase (PBKDF2-HMAC-SHA256 with the slot's
//!   salt and iterations), IVs counted from the slot's first sector.
//!
//! Slots sit where cryptsetup puts them for a 64-byte key (sector 8, then every
//! 504 sectors), and the payload starts at 2 MiB (cryptsetup's 1 MiB alignment
//! past slot 7). Only slot 0 is used; the others are disabled but described,
//! as both readers expect. The payload is the plaintext encrypted 512-byte
//! sector by sector, the tweak being the sector's number in the payload.
//!
//! [`format`] writes a header area for a master key and a passphrase;
//! [`unlock`] reads one back (for the tests, and for any LUKS1 image with this
//! cipher). Derived keys, split key material and passphrases are zeroized.

use crate::crypto::{CryptoError, VolumeCipher, XtsKey, SECTOR_BYTES, XTS_KEY_BYTES};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// The magic at the start of every LUKS header.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only version written.
pub const VERSION: u16 = 1;
/// `cipher-name`, `cipher-mode` and `hash-spec` as written.
pub const CIPHER_NAME: &str = "aes";
pub const CIPHER_MODE: &str = "xts-plain64";
pub const HASH_SPEC: &str = "sha256";
/// The master key: AES-256-XTS, two 256-bit keys.
pub const KEY_BYTES: usize = XTS_KEY_BYTES;
/// Anti-forensic stripes per key slot (fixed by the specification).
pub const STRIPES: u32 = 4000;
/// Key slots in a header.
pub const KEY_SLOTS: usize = 8;
/// Length of the master key digest (fixed by the specification, whatever the hash).
pub const DIGEST_BYTES: usize = 20;
/// Length of the digest's and every slot's salt.
pub const SALT_BYTES: usize = 32;
/// Length of the partition header.
pub const PHDR_BYTES: usize = 592;
/// The fewest PBKDF2 iterations accepted for a slot or the digest (cryptsetup's floor).
pub const MIN_ITERATIONS: u32 = 1000;
/// A slot in use, and a slot not in use.
pub const SLOT_ACTIVE: u32 = 0x00AC_71F3;
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Key slot areas start and are aligned at 4 KiB.
const SLOT_ALIGN_SECTORS: u32 = 8;
/// The payload's first sector: 2 MiB, the first 1 MiB boundary after slot 7.
pub const PAYLOAD_OFFSET_SECTORS: u32 = 4096;
/// The header area's length in bytes, i.e. where the payload starts.
pub const HEADER_AREA_BYTES: usize = PAYLOAD_OFFSET_SECTORS as usize * SECTOR_BYTES;
const UUID_BYTES: usize = 40;
const NAME_BYTES: usize = 32;
const SLOT_BYTES: usize = 48;
const SLOTS_AT: usize = 208;

/// Why a header could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LuksError {
    /// The bytes do not start with a LUKS1 header.
    #[error("not a LUKS1 image (no LUKS magic or version 1 header)")]
    NotLuks,
    /// A LUKS1 header this module does not read (another cipher, key size or hash).
    #[error("unsupported LUKS1 image: {0}")]
    Unsupported(String),
    /// The header's slots or payload lie outside the bytes given, or overlap.
    #[error("corrupt LUKS1 header: {0}")]
    Corrupt(String),
    /// No active key slot opens with this passphrase.
    #[error("no key slot opens with this passphrase")]
    WrongPassphrase,
    /// An empty passphrase.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// Fewer PBKDF2 iterations than [`MIN_ITERATIONS`].
    #[error("{0} PBKDF2 iterations is too few (at least {MIN_ITERATIONS})")]
    TooFewIterations(u32),
    /// The cipher refused a key (a derived key with equal halves, about 2^-256 likely).
    #[error("cipher: {0}")]
    Crypto(#[from] CryptoError),
}

/// One key slot descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_BYTES],
    /// First sector of the slot's key material (from the start of the image).
    pub key_material_offset: u32,
    pub stripes: u32,
}

/// The LUKS1 partition header (`phdr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    /// First sector of the payload.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_BYTES],
    pub mk_digest_salt: [u8; SALT_BYTES],
    pub mk_digest_iter: u32,
    pub uuid: String,
    pub slots: [KeySlot; KEY_SLOTS],
}

/// Sectors of one slot's key material: `STRIPES x KEY_BYTES`, rounded up to whole sectors.
pub const fn key_material_sectors() -> u32 {
    (STRIPES * KEY_BYTES as u32).div_ceil(SECTOR_BYTES as u32)
}

/// Where slot `i`'s key material starts, in sectors: cryptsetup's layout.
pub const fn slot_offset(i: usize) -> u32 {
    let stride = key_material_sectors().div_ceil(SLOT_ALIGN_SECTORS) * SLOT_ALIGN_SECTORS;
    SLOT_ALIGN_SECTORS + i as u32 * stride
}

fn put_name(out: &mut [u8], at: usize, name: &str, len: usize) {
    let b = name.as_bytes();
    let n = b.len().min(len - 1); // always NUL-terminated
    out[at..at + n].copy_from_slice(&b[..n]);
}

fn get_name(b: &[u8], at: usize, len: usize) -> String {
    let field = &b[at..at + len];
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Header {
    /// The header bytes, exactly [`PHDR_BYTES`] long.
    pub fn encode(&self) -> [u8; PHDR_BYTES] {
        let mut b = [0u8; PHDR_BYTES];
        b[0..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&VERSION.to_be_bytes());
        put_name(&mut b, 8, &self.cipher_name, NAME_BYTES);
        put_name(&mut b, 40, &self.cipher_mode, NAME_BYTES);
        put_name(&mut b, 72, &self.hash_spec, NAME_BYTES);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        put_name(&mut b, 168, &self.uuid, UUID_BYTES);
        for (i, s) in self.slots.iter().enumerate() {
            let at = SLOTS_AT + i * SLOT_BYTES;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_DISABLED };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.key_material_offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Parses a header from the start of an image.
    pub fn decode(b: &[u8]) -> Result<Self, LuksError> {
        if b.len() < PHDR_BYTES || b[0..6] != MAGIC || b[6..8] != VERSION.to_be_bytes() {
            return Err(LuksError::NotLuks);
        }
        let mut slots: [KeySlot; KEY_SLOTS] = std::array::from_fn(|_| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_BYTES],
            key_material_offset: 0,
            stripes: 0,
        });
        for (i, s) in slots.iter_mut().enumerate() {
            let at = SLOTS_AT + i * SLOT_BYTES;
            s.active = match be32(b, at) {
                SLOT_ACTIVE => true,
                SLOT_DISABLED => false,
                other => return Err(LuksError::Corrupt(format!("key slot {i} has state {other:#x}"))),
            };
            s.iterations = be32(b, at + 4);
            s.salt.copy_from_slice(&b[at + 8..at + 40]);
            s.key_material_offset = be32(b, at + 40);
            s.stripes = be32(b, at + 44);
        }
        let mut h = Self {
            cipher_name: get_name(b, 8, NAME_BYTES),
            cipher_mode: get_name(b, 40, NAME_BYTES),
            hash_spec: get_name(b, 72, NAME_BYTES),
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: [0; DIGEST_BYTES],
            mk_digest_salt: [0; SALT_BYTES],
            mk_digest_iter: be32(b, 164),
            uuid: get_name(b, 168, UUID_BYTES),
            slots,
        };
        h.mk_digest.copy_from_slice(&b[112..132]);
        h.mk_digest_salt.copy_from_slice(&b[132..164]);
        Ok(h)
    }

    /// Refuses what this module cannot open: another cipher, hash or key size.
    fn check_supported(&self) -> Result<(), LuksError> {
        if self.cipher_name != CIPHER_NAME || self.cipher_mode != CIPHER_MODE {
            return Err(LuksError::Unsupported(format!("cipher {}-{}", self.cipher_name, self.cipher_mode)));
        }
        if self.hash_spec != HASH_SPEC {
            return Err(LuksError::Unsupported(format!("hash {}", self.hash_spec)));
        }
        if self.key_bytes as usize != KEY_BYTES {
            return Err(LuksError::Unsupported(format!("{}-byte key", self.key_bytes)));
        }
        Ok(())
    }
}

/// A random UUID (version 4) in its text form, as LUKS stores it.
fn random_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// PBKDF2-HMAC-SHA256 of `secret` into `out`.
fn pbkdf2_sha256(secret: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    pbkdf2::pbkdf2_hmac::<Sha256>(secret, salt, iterations, out);
}

/// The master key digest stored in the header.
fn mk_digest(master: &[u8], salt: &[u8; SALT_BYTES], iterations: u32) -> [u8; DIGEST_BYTES] {
    let mut d = [0u8; DIGEST_BYTES];
    pbkdf2_sha256(master, salt, iterations, &mut d);
    d
}

/// The AF splitter's diffusion: each hash-sized piece `i` of `buf` becomes
/// `H(be32(i) || piece)` (the last, shorter piece a prefix of its hash).
pub fn diffuse(buf: &mut [u8]) {
    const HASH: usize = 32;
    for (i, piece) in buf.chunks_mut(HASH).enumerate() {
        let mut h = Sha256::new();
        h.update((i as u32).to_be_bytes());
        h.update(&*piece);
        let d = h.finalize();
        piece.copy_from_slice(&d[..piece.len()]);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Spreads `key` over `stripes` stripes of its length (the anti-forensic
/// splitter): every stripe but the last is random, the last is `key` XOR the
/// diffused XOR of the others, so a single lost stripe loses the key.
pub fn af_split(key: &[u8], stripes: u32) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes as usize]);
    let mut acc = Zeroizing::new(vec![0u8; n]);
    let (head, last) = out.split_at_mut(n * (stripes as usize - 1));
    rand::rngs::OsRng.fill_bytes(head);
    for stripe in head.chunks_exact(n) {
        xor_into(&mut acc, stripe);
        diffuse(&mut acc);
    }
    last.copy_from_slice(key);
    xor_into(last, &acc);
    out
}

/// Recovers a key of `key_len` bytes from its `stripes` stripes (inverse of [`af_split`]).
pub fn af_merge(material: &[u8], key_len: usize, stripes: u32) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    let (head, rest) = material.split_at(key_len * (stripes as usize - 1));
    for stripe in head.chunks_exact(key_len) {
        xor_into(&mut acc, stripe);
        diffuse(&mut acc);
    }
    xor_into(&mut acc, &rest[..key_len]);
    acc
}

/// The cipher of a key slot: AES-256-XTS under PBKDF2(passphrase, salt, iterations).
fn slot_cipher(passphrase: &[u8], slot: &KeySlot) -> Result<VolumeCipher, LuksError> {
    let mut derived = Zeroizing::new([0u8; KEY_BYTES]);
    pbkdf2_sha256(passphrase, &slot.salt, slot.iterations, &mut derived[..]);
    let key = XtsKey::from_bytes(&derived[..])?;
    Ok(VolumeCipher::new(&key))
}

/// Iterations of the master key digest for a slot of `slot_iterations`: an
/// eighth of the slot's work, and at least [`MIN_ITERATIONS`].
pub fn digest_iterations(slot_iterations: u32) -> u32 {
    (slot_iterations / 8).max(MIN_ITERATIONS)
}

/// The header area (exactly [`HEADER_AREA_BYTES`]) of an image whose payload
/// is encrypted with `master`, with slot 0 opened by `passphrase` through
/// `iterations` of PBKDF2-HMAC-SHA256. Salts, stripes and the UUID are fresh
/// random bytes. Takes about as long as `iterations` PBKDF2 rounds twice (a
/// 64-byte key is two SHA-256 blocks) plus an eighth for the digest.
pub fn format(master: &XtsKey, passphrase: &[u8], iterations: u32) -> Result<Vec<u8>, LuksError> {
    if passphrase.is_empty() {
        return Err(LuksError::EmptyPassphrase);
    }
    if iterations < MIN_ITERATIONS {
        return Err(LuksError::TooFewIterations(iterations));
    }
    let mk = master.expose_bytes();
    let mut rng = rand::rngs::OsRng;
    let mut mk_digest_salt = [0u8; SALT_BYTES];
    rng.fill_bytes(&mut mk_digest_salt);
    let mk_digest_iter = digest_iterations(iterations);
    let slots = std::array::from_fn(|i| {
        let mut salt = [0u8; SALT_BYTES];
        if i == 0 {
            rng.fill_bytes(&mut salt);
        }
        KeySlot {
            active: i == 0,
            iterations: if i == 0 { iterations } else { 0 },
            salt,
            key_material_offset: slot_offset(i),
            stripes: STRIPES,
        }
    });
    let header = Header {
        cipher_name: CIPHER_NAME.into(),
        cipher_mode: CIPHER_MODE.into(),
        hash_spec: HASH_SPEC.into(),
        payload_offset: PAYLOAD_OFFSET_SECTORS,
        key_bytes: KEY_BYTES as u32,
        mk_digest: mk_digest(mk, &mk_digest_salt, mk_digest_iter),
        mk_digest_salt,
        mk_digest_iter,
        uuid: random_uuid(),
        slots,
    };
    let mut area = vec![0u8; HEADER_AREA_BYTES];
    area[..PHDR_BYTES].copy_from_slice(&header.encode());

    let slot = &header.slots[0];
    let split = af_split(mk, slot.stripes);
    // Whole sectors, allocated once: the split key is never copied into a buffer left unzeroized.
    let mut material = Zeroizing::new(vec![0u8; key_material_sectors() as usize * SECTOR_BYTES]);
    material[..split.len()].copy_from_slice(&split);
    drop(split);
    slot_cipher(passphrase, slot)?.encrypt_sectors(0, &mut material)?;
    let at = slot.key_material_offset as usize * SECTOR_BYTES;
    area[at..at + material.len()].copy_from_slice(&material);
    Ok(area)
}

/// Opens the header at the start of `image` (at least up to the end of its
/// key slots) with `passphrase`: returns the master key and the payload's
/// first byte. Tries every active slot, as cryptsetup does.
pub fn unlock(image: &[u8], passphrase: &[u8]) -> Result<(XtsKey, u64), LuksError> {
    let header = Header::decode(image)?;
    header.check_supported()?;
    let material_len = key_material_sectors() as usize * SECTOR_BYTES;
    for (i, slot) in header.slots.iter().enumerate().filter(|(_, s)| s.active) {
        if slot.stripes != STRIPES || slot.iterations == 0 {
            return Err(LuksError::Corrupt(format!(
                "key slot {i}: {} stripes, {} iterations",
                slot.stripes, slot.iterations
            )));
        }
        let at = slot.key_material_offset as usize * SECTOR_BYTES;
        let Some(encrypted) = image.get(at..at + material_len) else {
            return Err(LuksError::Corrupt(format!("key slot {i}'s material lies past the bytes given")));
        };
        let mut material = Zeroizing::new(encrypted.to_vec());
        slot_cipher(passphrase, slot)?.decrypt_sectors(0, &mut material)?;
        let candidate = af_merge(&material, KEY_BYTES, slot.stripes);
        let digest = mk_digest(&candidate, &header.mk_digest_salt, header.mk_digest_iter);
        if digest.iter().zip(&header.mk_digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0 {
            let key = XtsKey::from_bytes(&candidate)?;
            return Ok((key, u64::from(header.payload_offset) * SECTOR_BYTES as u64));
        }
    }
    Err(LuksError::WrongPassphrase)
}

/// PBKDF2-HMAC-SHA256 iterations that derive a 64-byte key in about `target`
/// on this machine (at least `floor`), measured the way cryptsetup benchmarks
/// its key slots: time a short run, scale it.
pub fn iterations_for(target: Duration, floor: u32) -> u32 {
    let mut out = Zeroizing::new([0u8; KEY_BYTES]);
    let mut probe = 1_000u32;
    loop {
        let t = Instant::now();
        pbkdf2_sha256(b"slate-export-benchmark", &[0u8; SALT_BYTES], probe, &mut out[..]);
        let took = t.elapsed();
        if took >= Duration::from_millis(50) || probe >= 1 << 24 {
            let n = u128::from(probe) * target.as_nanos() / took.as_nanos().max(1);
            return u32::try_from(n).unwrap_or(u32::MAX).max(floor).max(MIN_ITERATIONS);
        }
        probe = probe.saturating_mul(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: u32 = MIN_ITERATIONS;

    #[test]
    fn af_split_merges_back_and_needs_every_stripe() {
        let key = XtsKey::generate();
        let split = af_split(key.expose_bytes(), STRIPES);
        assert_eq!(split.len(), KEY_BYTES * STRIPES as usize);
        assert_eq!(af_merge(&split, KEY_BYTES, STRIPES).as_slice(), key.expose_bytes());
        // Two splits of one key share no stripe: they are random.
        let again = af_split(key.expose_bytes(), STRIPES);
        assert_ne!(split[..KEY_BYTES], again[..KEY_BYTES]);
        // One flipped bit in any stripe loses the whole key.
        for stripe in [0usize, 1234, STRIPES as usize - 1] {
            let mut bad = split.clone();
            bad[stripe * KEY_BYTES + 5] ^= 1;
            let merged = af_merge(&bad, KEY_BYTES, STRIPES);
            assert_ne!(merged.as_slice(), key.expose_bytes(), "stripe {stripe}");
        }
        // Small cases: one stripe is the key itself; odd lengths work.
        assert_eq!(af_split(b"abc", 1).as_slice(), b"abc");
        let odd = af_split(&[7u8; 40], 3);
        assert_eq!(af_merge(&odd, 40, 3).as_slice(), &[7u8; 40]);
    }

    #[test]
    fn diffuse_hashes_each_piece_with_its_index() {
        let mut buf: Vec<u8> = (0u8..40).collect();
        let orig = buf.clone();
        diffuse(&mut buf);
        let mut h = Sha256::new();
        h.update(0u32.to_be_bytes());
        h.update(&orig[..32]);
        assert_eq!(buf[..32], h.finalize()[..]);
        let mut h = Sha256::new();
        h.update(1u32.to_be_bytes());
        h.update(&orig[32..]);
        assert_eq!(buf[32..], h.finalize()[..8]);
    }

    #[test]
    fn header_fields_sit_where_the_specification_puts_them() {
        let master = XtsKey::generate();
        let area = format(&master, b"pass", FAST).unwrap();
        assert_eq!(area.len(), HEADER_AREA_BYTES);
        assert_eq!(HEADER_AREA_BYTES, 2 << 20);
        let b = &area[..PHDR_BYTES];
        assert_eq!(&b[0..6], b"LUKS\xba\xbe");
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(&b[8..12], b"aes\0");
        assert_eq!(&b[40..52], b"xts-plain64\0");
        assert_eq!(&b[72..79], b"sha256\0");
        assert_eq!(be32(b, 104), 4096, "payload offset in sectors");
        assert_eq!(be32(b, 108), 64, "key bytes");
        assert_eq!(be32(b, 164), FAST, "digest iterations");
        let uuid = get_name(b, 168, UUID_BYTES);
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
        assert_eq!(&uuid[14..15], "4");
        // Slot 0 active, the others disabled; all placed as cryptsetup places them.
        let offsets: Vec<u32> = (0..KEY_SLOTS).map(|i| be32(b, SLOTS_AT + i * SLOT_BYTES + 40)).collect();
        assert_eq!(offsets, [8, 512, 1016, 1520, 2024, 2528, 3032, 3536]);
        assert_eq!(key_material_sectors(), 500);
        assert!(slot_offset(7) + key_material_sectors() <= PAYLOAD_OFFSET_SECTORS);
        for i in 0..KEY_SLOTS {
            let at = SLOTS_AT + i * SLOT_BYTES;
            assert_eq!(be32(b, at), if i == 0 { SLOT_ACTIVE } else { SLOT_DISABLED });
            assert_eq!(be32(b, at + 4), if i == 0 { FAST } else { 0 });
            assert_eq!(be32(b, at + 44), STRIPES);
        }
        // The key material fills slot 0's area and nothing else past the header.
        let start = 8 * SECTOR_BYTES;
        let end = start + 500 * SECTOR_BYTES;
        assert!(area[PHDR_BYTES..start].iter().all(|&x| x == 0));
        assert!(area[start..end].iter().any(|&x| x != 0));
        assert!(area[end..].iter().all(|&x| x == 0));
        // Decoding gives back what was encoded.
        let h = Header::decode(&area).unwrap();
        assert_eq!(h.encode()[..], area[..PHDR_BYTES]);
        assert_eq!(h.uuid, uuid);
        // The master key is nowhere in the clear.
        let mk = master.expose_bytes();
        assert!(!area.windows(16).any(|w| w == &mk[..16] || w == &mk[32..48]));
    }

    #[test]
    fn the_slot_opens_with_the_passphrase_only() {
        let master = XtsKey::generate();
        let area = format(&master, b"correct horse", FAST).unwrap();
        let (key, payload) = unlock(&area, b"correct horse").unwrap();
        assert_eq!(key.expose_bytes(), master.expose_bytes());
        assert_eq!(payload, HEADER_AREA_BYTES as u64);
        assert_eq!(unlock(&area, b"correct horse\n").unwrap_err(), LuksError::WrongPassphrase);
        assert_eq!(unlock(&area, b"wrong").unwrap_err(), LuksError::WrongPassphrase);
        // A damaged key slot opens with nothing.
        let mut bad = area.clone();
        bad[8 * SECTOR_BYTES + 100] ^= 0x80;
        assert_eq!(unlock(&bad, b"correct horse").unwrap_err(), LuksError::WrongPassphrase);
        // Two formats of one key differ everywhere that is random.
        let other = format(&master, b"correct horse", FAST).unwrap();
        assert_ne!(other[112..208], area[112..208]);
    }

    #[test]
    fn bad_input_is_refused() {
        let master = XtsKey::generate();
        assert_eq!(format(&master, b"", FAST).unwrap_err(), LuksError::EmptyPassphrase);
        assert_eq!(format(&master, b"p", 999).unwrap_err(), LuksError::TooFewIterations(999));
        assert_eq!(unlock(&[0u8; 4096], b"p").unwrap_err(), LuksError::NotLuks);
        assert_eq!(unlock(b"LUKS", b"p").unwrap_err(), LuksError::NotLuks);
        let area = format(&master, b"p", FAST).unwrap();
        assert!(matches!(unlock(&area[..PHDR_BYTES], b"p").unwrap_err(), LuksError::Corrupt(_)));
        let mut other_cipher = area.clone();
        other_cipher[8..12].copy_from_slice(b"twof");
        assert!(matches!(unlock(&other_cipher, b"p").unwrap_err(), LuksError::Unsupported(_)));
        let mut bad_state = area;
        bad_state[SLOTS_AT + SLOT_BYTES..SLOTS_AT + SLOT_BYTES + 4].copy_from_slice(&[1, 2, 3, 4]);
        assert!(matches!(unlock(&bad_state, b"p").unwrap_err(), LuksError::Corrupt(_)));
    }

    #[test]
    fn iterations_are_measured_and_floored() {
        let n = iterations_for(Duration::from_millis(20), 5_000);
        assert!(n >= 5_000);
        assert_eq!(digest_iterations(8_000_000), 1_000_000);
        assert_eq!(digest_iterations(2_000), MIN_ITERATIONS);
    }
}
