//! The key hierarchy: root key -> tenant keys -> volume DEKs.
//!
//! * The **root key** `M_e` lives outside the data directory (a file or an
//!   environment variable by default, see [`provider`]); it carries an epoch
//!   `e`. Every crypto-shred ratchets it: `M_{e+1} = HKDF(M_e, "ratchet")`,
//!   and the old value is destroyed, so a copy of anything wrapped under
//!   `M_e` is dead once the shred has run.
//! * A **tenant key** (32 bytes) is wrapped under a KEK derived from the root.
//! * A volume's **DEK** (64 bytes: AES-256-XTS, two halves that differ) is
//!   wrapped under a KEK derived from its tenant key.
//!
//! Wrapping is AES key wrap (RFC 3394): deterministic, so every metadata
//! replica that re-wraps the same keys during a shred produces byte-identical
//! state without any key material crossing the Raft log. Every plaintext key
//! lives in a [`Secret`] page (left out of core dumps, locked in RAM where the
//! limit allows, zeroized on drop) and has a redacted `Debug`; nothing here
//! implements `Display` or `Serialize` for plaintext keys.

pub mod provider;

pub use provider::{EnvRootKeyProvider, FileRootKeyProvider, RootKeyProvider};

use aes_kw::KekAes256;
use hkdf::Hkdf;
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use slate_secret::Secret;
use std::fmt;
use zeroize::Zeroizing;

/// Bytes in a root key.
pub const ROOT_KEY_BYTES: usize = 32;
/// Bytes in a tenant key.
pub const TENANT_KEY_BYTES: usize = 32;
/// Bytes in a volume DEK: two AES-256 keys for XTS.
pub const DEK_BYTES: usize = 64;

const KDF_SALT: &[u8] = b"slate-keys-v1";
const INFO_RATCHET: &[u8] = b"slate root ratchet";
const INFO_TENANT_KEK: &[u8] = b"slate tenant-key wrap";
const INFO_DEK_KEK: &[u8] = b"slate dek wrap";
const INFO_TENANT_SHRED: &[u8] = b"slate tenant-key shred rotate";
const INFO_ROOT_ROTATE: &[u8] = b"slate root rotate";

/// Why a key operation failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A wrapped key did not unwrap: wrong wrapping key (e.g. it was shredded) or corrupted bytes.
    #[error("cannot unwrap {what}: wrong wrapping key or corrupted data")]
    Unwrap { what: &'static str },
    /// The root key store could not be read or written.
    #[error("root key store: {0}")]
    Store(String),
    /// The stored root key is at an epoch the state cannot use.
    #[error("root key epoch {file} does not match the state's epoch {state}: {hint}")]
    Epoch { file: u64, state: u64, hint: &'static str },
}

fn fill_random(buf: &mut [u8]) {
    rand::rngs::OsRng.fill_bytes(buf);
}

fn hkdf32(ikm: &[u8], info: &[&[u8]]) -> Secret<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(KDF_SALT), ikm);
    let mut out = Secret::<[u8; 32]>::zeroed();
    let info: Vec<u8> = info.concat();
    hk.expand(&info, out.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

fn kek(key: &[u8; 32]) -> KekAes256 {
    KekAes256::from(*key)
}

/// The root key at one epoch.
pub struct RootKey {
    epoch: u64,
    key: Secret<[u8; ROOT_KEY_BYTES]>,
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootKey").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl RootKey {
    /// A fresh root key at epoch 0, from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = Secret::<[u8; ROOT_KEY_BYTES]>::zeroed();
        fill_random(key.as_mut());
        Self { epoch: 0, key }
    }

    /// A root key from stored parts (copied into a secret page; `key` wipes itself).
    pub fn from_parts(epoch: u64, key: Zeroizing<[u8; ROOT_KEY_BYTES]>) -> Self {
        Self { epoch, key: Secret::from_slice(&key) }
    }

    /// The epoch: how many shreds this key has been ratcheted through.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The raw key, for the provider that stores it. Never log it.
    pub(crate) fn secret(&self) -> &[u8; ROOT_KEY_BYTES] {
        &self.key
    }

    /// The next epoch's key: one-way, so the new key says nothing about this one.
    pub fn ratchet(&self) -> Self {
        let next = self.epoch + 1;
        Self { epoch: next, key: hkdf32(self.key.as_ref(), &[INFO_RATCHET, &next.to_be_bytes()]) }
    }

    /// Ratchets forward to `epoch` (no-op when already there); `None` when `epoch` is in the past.
    pub fn ratchet_to(&self, epoch: u64) -> Option<Self> {
        if epoch < self.epoch {
            return None;
        }
        let mut k = Self { epoch: self.epoch, key: self.key.clone() };
        while k.epoch < epoch {
            k = k.ratchet();
        }
        Some(k)
    }

    /// A successor at the next epoch made of fresh OS randomness (`slate-meta rotate-root`):
    /// unlike [`RootKey::ratchet`], nothing derives it from this key.
    pub fn fresh_successor(&self) -> Self {
        let mut k = Self::generate();
        k.epoch = self.epoch + 1;
        k
    }

    fn rotate_kek(&self) -> KekAes256 {
        kek(&hkdf32(self.key.as_ref(), &[INFO_ROOT_ROTATE, &self.epoch.to_be_bytes()]))
    }

    /// Wraps a successor root under this one: how a rotation travels through the Raft log
    /// (every voter opens it with the root it holds, then destroys that root).
    pub fn wrap_successor(&self, next: &RootKey) -> WrappedKey {
        WrappedKey(self.rotate_kek().wrap_vec(next.key.as_ref()).expect("32-byte key wraps"))
    }

    /// Opens a successor wrapped by [`RootKey::wrap_successor`]; it is at the next epoch.
    pub fn open_successor(&self, wrapped: &WrappedKey) -> Result<Self, KeyError> {
        let mut out = Secret::<[u8; ROOT_KEY_BYTES]>::zeroed();
        if wrapped.0.len() != ROOT_KEY_BYTES + 8 {
            return Err(KeyError::Unwrap { what: "root key" });
        }
        self.rotate_kek().unwrap(&wrapped.0, out.as_mut()).map_err(|_| KeyError::Unwrap { what: "root key" })?;
        Ok(Self { epoch: self.epoch + 1, key: out })
    }

    /// Moves forward to `epoch`, by ratchet steps, and through the one random rotation
    /// `rotation` if it lies on the way. `None` when `epoch` is in the past, or when a
    /// rotation on the way is unknown or does not open (the node must resync).
    pub fn advance_to(&self, epoch: u64, rotation: Option<&RootRotation>) -> Option<Self> {
        match rotation {
            Some(r) if self.epoch < r.epoch && r.epoch <= epoch => {
                let before = self.ratchet_to(r.epoch - 1)?;
                before.open_successor(&r.wrapped_root).ok()?.ratchet_to(epoch)
            }
            _ => self.ratchet_to(epoch),
        }
    }

    fn tenant_kek(&self) -> KekAes256 {
        kek(&hkdf32(self.key.as_ref(), &[INFO_TENANT_KEK]))
    }

    /// Wraps a tenant key under this root.
    pub fn wrap_tenant_key(&self, key: &TenantKey) -> WrappedKey {
        WrappedKey(self.tenant_kek().wrap_vec(key.0.as_ref()).expect("32-byte key wraps"))
    }

    /// Unwraps a tenant key wrapped under this root.
    pub fn unwrap_tenant_key(&self, wrapped: &WrappedKey) -> Result<TenantKey, KeyError> {
        let mut out = Secret::<[u8; TENANT_KEY_BYTES]>::zeroed();
        if wrapped.0.len() != TENANT_KEY_BYTES + 8 {
            return Err(KeyError::Unwrap { what: "tenant key" });
        }
        self.tenant_kek().unwrap(&wrapped.0, out.as_mut()).map_err(|_| KeyError::Unwrap { what: "tenant key" })?;
        Ok(TenantKey(out))
    }
}

/// A tenant's key: wraps the tenant's volume DEKs.
pub struct TenantKey(Secret<[u8; TENANT_KEY_BYTES]>);

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TenantKey(..)")
    }
}

impl TenantKey {
    /// A fresh tenant key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = Secret::<[u8; TENANT_KEY_BYTES]>::zeroed();
        fill_random(key.as_mut());
        Self(key)
    }

    /// The key that replaces this one when one of the tenant's volumes is
    /// shredded: derived one-way, so every metadata replica computes the same
    /// successor without key material in the log, and the successor cannot
    /// give back this key.
    pub fn shred_successor(&self, tenant: u64, new_version: u64) -> Self {
        Self(hkdf32(self.0.as_ref(), &[INFO_TENANT_SHRED, &tenant.to_be_bytes(), &new_version.to_be_bytes()]))
    }

    fn dek_kek(&self) -> KekAes256 {
        kek(&hkdf32(self.0.as_ref(), &[INFO_DEK_KEK]))
    }

    /// Wraps a DEK under this tenant key.
    pub fn wrap_dek(&self, dek: &Dek) -> WrappedKey {
        WrappedKey(self.dek_kek().wrap_vec(dek.0.as_ref()).expect("64-byte key wraps"))
    }

    /// Unwraps a DEK wrapped under this tenant key.
    pub fn unwrap_dek(&self, wrapped: &WrappedKey) -> Result<Dek, KeyError> {
        let mut out = Secret::<[u8; DEK_BYTES]>::zeroed();
        if wrapped.0.len() != DEK_BYTES + 8 {
            return Err(KeyError::Unwrap { what: "volume key" });
        }
        self.dek_kek().unwrap(&wrapped.0, out.as_mut()).map_err(|_| KeyError::Unwrap { what: "volume key" })?;
        Ok(Dek(out))
    }
}

/// A volume's data encryption key: 64 bytes for AES-256-XTS, halves distinct.
pub struct Dek(Secret<[u8; DEK_BYTES]>);

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(..)")
    }
}

impl Dek {
    /// A fresh DEK from the OS CSPRNG; redrawn until its two XTS halves differ.
    pub fn generate() -> Self {
        let mut key = Secret::<[u8; DEK_BYTES]>::zeroed();
        loop {
            fill_random(key.as_mut());
            if key[..32] != key[32..] {
                return Self(key);
            }
        }
    }

    /// The key bytes, for the attach reply only.
    pub fn expose(&self) -> &[u8; DEK_BYTES] {
        &self.0
    }

    /// Lowercase hex of the key, zeroized on drop: the attach reply's form.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }

    /// A one-way fingerprint (SHA-256 of the key, hex), so tools and tests can
    /// compare keys without printing them.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_ref()))
    }
}

/// A key wrapped by another (safe to store; useless without its wrapping key).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct WrappedKey(pub Vec<u8>);

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({} bytes)", self.0.len())
    }
}

impl WrappedKey {
    /// Lowercase hex: how it appears in state files and the Raft log.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

/// The last random root rotation, kept in the replicated state until every voter
/// has stored its new root: the new root wrapped under the previous epoch's root,
/// so a voter that was down (or crashed mid-rotation) can still move across it.
/// Cleared once every voter reports the epoch, since a stolen old root file plus
/// this record would give the new root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRotation {
    /// The epoch the rotated root has.
    pub epoch: u64,
    pub wrapped_root: WrappedKey,
}

/// What `apply` hands back instead of a plaintext DEK (attach, restore): the
/// wrapped forms and the root epoch they open under. Only the node that proposed
/// the command unwraps it ([`KeyRelease::open`]), once, after `apply`; every other
/// replica drops it unopened. Wrapped keys are not secrets on their own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRelease {
    pub root_epoch: u64,
    pub wrapped_tenant_key: WrappedKey,
    pub wrapped_dek: WrappedKey,
}

impl KeyRelease {
    /// Unwraps the DEK with `root`, which must be at the release's epoch.
    pub fn open(&self, root: &RootKey) -> Result<Dek, KeyError> {
        if root.epoch() != self.root_epoch {
            return Err(KeyError::Epoch {
                file: root.epoch(),
                state: self.root_epoch,
                hint: "the root key moved between apply and the release",
            });
        }
        root.unwrap_tenant_key(&self.wrapped_tenant_key)?.unwrap_dek(&self.wrapped_dek)
    }
}

impl Serialize for WrappedKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for WrappedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() > 512 {
            return Err(serde::de::Error::custom("wrapped key too long"));
        }
        hex::decode(s).map(Self).map_err(serde::de::Error::custom)
    }
}

/// SHA-256 of a token secret: the only form of a credential that is stored.
pub fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// A fresh API token secret (32 bytes from the OS CSPRNG).
pub fn generate_token_secret() -> Zeroizing<[u8; 32]> {
    let mut s = Zeroizing::new([0u8; 32]);
    fill_random(s.as_mut());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_determinism() {
        let root = RootKey::generate();
        let t = TenantKey::generate();
        let w1 = root.wrap_tenant_key(&t);
        let w2 = root.wrap_tenant_key(&t);
        assert_eq!(w1, w2, "AES-KW is deterministic");
        let t2 = root.unwrap_tenant_key(&w1).unwrap();
        let dek = Dek::generate();
        assert_ne!(dek.expose()[..32], dek.expose()[32..]);
        let wd = t.wrap_dek(&dek);
        assert_eq!(t2.unwrap_dek(&wd).unwrap().expose(), dek.expose());
    }

    #[test]
    fn ratchet_and_shred_successor_kill_old_wraps() {
        let root = RootKey::generate();
        let t = TenantKey::generate();
        let w = root.wrap_tenant_key(&t);
        let next = root.ratchet();
        assert_eq!(next.epoch(), 1);
        assert!(next.unwrap_tenant_key(&w).is_err());
        assert_eq!(root.ratchet_to(3).unwrap().secret(), next.ratchet().ratchet().secret());
        assert!(next.ratchet_to(0).is_none());
        let dek = Dek::generate();
        let wd = t.wrap_dek(&dek);
        let t_new = t.shred_successor(7, 2);
        assert!(t_new.unwrap_dek(&wd).is_err());
        // Deterministic on every replica.
        assert_eq!(t.shred_successor(7, 2).0.as_ref(), t_new.0.as_ref());
        assert_ne!(t.shred_successor(8, 2).0.as_ref(), t_new.0.as_ref());
    }

    #[test]
    fn plaintext_keys_are_out_of_core_dumps() {
        let root = RootKey::generate();
        let t = TenantKey::generate();
        let dek = t.unwrap_dek(&t.wrap_dek(&Dek::generate())).unwrap();
        let ratcheted = root.ratchet();
        let opened = root.unwrap_tenant_key(&root.wrap_tenant_key(&t)).unwrap();
        for (what, addr) in [
            ("root", root.secret().as_ptr() as usize),
            ("ratcheted root", ratcheted.secret().as_ptr() as usize),
            ("tenant key", t.0.as_ptr() as usize),
            ("unwrapped tenant key", opened.0.as_ptr() as usize),
            ("unwrapped dek", dek.expose().as_ptr() as usize),
        ] {
            let flags = slate_secret::mapping_flags(addr).expect("mapping found");
            assert!(flags.iter().any(|f| f == "dd"), "{what}: VmFlags {flags:?}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let dek = Dek::generate();
        let s = format!("{dek:?} {:?} {:?}", TenantKey::generate(), RootKey::generate());
        assert!(!s.contains(&hex::encode(&dek.expose()[..4])));
        assert!(s.contains("Dek(..)"));
    }
}
