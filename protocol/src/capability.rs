//! Capability tokens: what a data-plane session may do, signed by the
//! metadata service.
//!
//! The metadata service holds the ed25519 signing key; storage nodes hold only
//! the verifying key, so a node (or anyone who steals a node's config) can
//! check a capability but never mint one. The signed bytes are a canonical,
//! domain-separated encoding, so a signature over one structure can never be
//! replayed as another.

use crate::ids::{Generation, NodeId, VolumeId};
use crate::wire::{Reader, Writer};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;

const DOMAIN: &[u8] = b"slate-capability-v2\0";
/// Upper bound on the node scope of one capability (keeps decoding bounded).
pub const MAX_SCOPE_NODES: usize = 64;
/// How far a node's clock may be from the metadata service's before a fresh
/// capability looks "not yet valid" or a live one looks expired, in seconds.
pub const CLOCK_SKEW_SECS: u64 = 30;
/// The HTTP header in which a caller of the management API names the [`Holder`]
/// the capabilities it is handed must be bound to (64 hex digits).
pub const HOLDER_HEADER: &str = "slate-holder";
/// Length of a holder binding: SHA-256 of the holder's TLS certificate (DER).
pub const HOLDER_BYTES: usize = 32;

/// Whose capability it is: the SHA-256 of the TLS certificate (DER) the holder
/// presents to storage nodes. A node serving TLS accepts the capability only on a
/// session whose peer proved possession of that certificate's key, so a copied
/// capability is useless on any other connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Holder(#[serde(with = "holder_hex")] pub [u8; HOLDER_BYTES]);

impl Holder {
    /// The binding of a DER certificate.
    pub fn of_certificate(der: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(der).into())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        hex::decode(s.trim()).ok()?.try_into().ok().map(Self)
    }

    /// 64 hex digits.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Holder({}..)", &self.to_hex()[..12])
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

mod holder_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)?.try_into().map_err(|_| serde::de::Error::custom("32 bytes"))
    }
}

/// What a capability allows, as a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Rights(u8);

impl Rights {
    /// Read blocks, list changed blocks and write intents.
    pub const READ: Self = Self(1);
    /// Write, trim, zero, flush.
    pub const WRITE: Self = Self(2);
    /// Manage the volume's layout on a node: assign/release segments, snapshot, delete layers.
    pub const ADMIN: Self = Self(4);
    /// Everything a read-write attachment needs.
    pub const READ_WRITE: Self = Self(1 | 2);

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Rights from raw bits; unknown bits are an error.
    pub fn from_bits(bits: u8) -> Option<Self> {
        (bits & !7 == 0).then_some(Self(bits))
    }
    /// True when every right in `other` is also in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// The union of two sets.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        for (bit, c) in [(Self::READ, 'r'), (Self::WRITE, 'w'), (Self::ADMIN, 'a')] {
            s.push(if self.contains(bit) { c } else { '-' });
        }
        write!(f, "Rights({s})")
    }
}

/// The claims of a capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// The one volume this capability is for.
    pub volume: VolumeId,
    /// The attachment's generation; nodes refuse it once a newer one is seen.
    pub generation: Generation,
    /// What the holder may do.
    pub rights: Rights,
    /// Seconds since the Unix epoch after which the capability is void.
    pub expires_unix_secs: u64,
    /// The storage nodes that may honour it; never empty.
    pub nodes: Vec<NodeId>,
    /// Seconds since the Unix epoch before which the capability is not yet valid.
    pub not_before_unix_secs: u64,
    /// The volume's size in blocks: no request may touch a block at or past it.
    pub size_blocks: u64,
    /// The volume's segment count: segments `0..segments` exist, no other may be assigned.
    pub segments: u64,
    /// The TLS certificate the capability is bound to (see [`Holder`]).
    pub holder: Holder,
}

impl Default for Capability {
    /// An empty scope with no expiry bound and no size bound, for building
    /// capabilities field by field (`Capability { volume, .., ..Default::default() }`).
    fn default() -> Self {
        Self {
            volume: VolumeId(0),
            generation: Generation(0),
            rights: Rights::default(),
            expires_unix_secs: 0,
            nodes: Vec::new(),
            not_before_unix_secs: 0,
            size_blocks: u64::MAX,
            segments: u64::MAX,
            holder: Holder::default(),
        }
    }
}

/// Why a capability was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// The signature does not verify under the cluster's key.
    #[error("capability signature is invalid (forged or corrupted)")]
    Forged,
    /// The expiry time has passed.
    #[error("capability expired")]
    Expired,
    /// This node is not in the capability's node scope.
    #[error("capability is not valid on this node")]
    WrongNode,
    /// The token bytes do not parse.
    #[error("capability is malformed")]
    Malformed,
    /// The not-before time has not come yet (beyond the allowed clock skew).
    #[error("capability is not valid yet")]
    NotYetValid,
}

impl Capability {
    /// True once `now` is past the expiry plus the allowed clock skew.
    pub fn expired_at(&self, now_unix_secs: u64) -> bool {
        now_unix_secs >= self.expires_unix_secs.saturating_add(CLOCK_SKEW_SECS)
    }

    /// The canonical bytes that are signed.
    fn signed_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(DOMAIN);
        self.encode_claims(&mut w);
        w.into_vec()
    }

    fn encode_claims(&self, w: &mut Writer) {
        w.u64(self.volume.0);
        w.u64(self.generation.0);
        w.u8(self.rights.bits());
        w.u64(self.expires_unix_secs);
        w.u16(self.nodes.len() as u16);
        for n in &self.nodes {
            w.u64(n.0);
        }
        w.u64(self.not_before_unix_secs);
        w.u64(self.size_blocks);
        w.u64(self.segments);
        w.bytes(&self.holder.0);
    }

    /// Signs the claims. Only the metadata service holds `key`.
    pub fn sign(self, key: &SigningKey) -> SignedCapability {
        let signature = key.sign(&self.signed_bytes()).to_bytes();
        SignedCapability { claims: self, signature }
    }
}

/// A capability with its signature, as carried in a session's hello.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCapability {
    /// The claims.
    pub claims: Capability,
    /// ed25519 signature over the canonical claim bytes.
    #[serde(with = "sig_hex")]
    pub signature: [u8; 64],
}

impl fmt::Debug for SignedCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedCapability").field("claims", &self.claims).finish_non_exhaustive()
    }
}

mod sig_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(sig))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        v.try_into().map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))
    }
}

impl SignedCapability {
    /// Checks signature, validity window (with [`CLOCK_SKEW_SECS`] either side)
    /// and node scope, in that order. The holder binding is the session's to check.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        this_node: NodeId,
        now_unix_secs: u64,
    ) -> Result<&Capability, CapabilityError> {
        let sig = Signature::from_bytes(&self.signature);
        key.verify(&self.claims.signed_bytes(), &sig).map_err(|_| CapabilityError::Forged)?;
        if self.claims.expired_at(now_unix_secs) {
            return Err(CapabilityError::Expired);
        }
        if now_unix_secs.saturating_add(CLOCK_SKEW_SECS) < self.claims.not_before_unix_secs {
            return Err(CapabilityError::NotYetValid);
        }
        if !self.claims.nodes.contains(&this_node) {
            return Err(CapabilityError::WrongNode);
        }
        Ok(&self.claims)
    }

    /// Appends the wire form.
    pub(crate) fn encode(&self, w: &mut Writer) {
        self.claims.encode_claims(w);
        w.bytes(&self.signature);
    }

    /// Parses the wire form (does not verify).
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, crate::wire::DecodeError> {
        let volume = VolumeId(r.u64()?);
        let generation = Generation(r.u64()?);
        let rights = Rights::from_bits(r.u8()?).ok_or(crate::wire::DecodeError::Invalid("rights"))?;
        let expires_unix_secs = r.u64()?;
        let n = usize::from(r.u16()?);
        if n == 0 || n > MAX_SCOPE_NODES {
            return Err(crate::wire::DecodeError::Invalid("capability node scope"));
        }
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(NodeId(r.u64()?));
        }
        let not_before_unix_secs = r.u64()?;
        let size_blocks = r.u64()?;
        let segments = r.u64()?;
        let holder = Holder(r.array()?);
        let signature: [u8; 64] = r.array()?;
        let claims = Capability {
            volume,
            generation,
            rights,
            expires_unix_secs,
            nodes,
            not_before_unix_secs,
            size_blocks,
            segments,
            holder,
        };
        Ok(Self { claims, signature })
    }

    /// The token as a printable string (hex of the wire form), for config files and tests.
    pub fn to_token(&self) -> String {
        let mut w = Writer::default();
        self.encode(&mut w);
        hex::encode(w.into_vec())
    }

    /// Parses a token made by [`Self::to_token`].
    pub fn from_token(token: &str) -> Result<Self, CapabilityError> {
        let bytes = hex::decode(token.trim()).map_err(|_| CapabilityError::Malformed)?;
        let mut r = Reader::new(&bytes);
        let cap = Self::decode(&mut r).map_err(|_| CapabilityError::Malformed)?;
        r.finish().map_err(|_| CapabilityError::Malformed)?;
        Ok(cap)
    }
}

/// Helpers for the verifying key as it appears in config files (hex).
pub fn verifying_key_from_hex(s: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(s.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// A fresh signing key from the OS CSPRNG.
pub fn generate_signing_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capability {
        Capability {
            volume: VolumeId(7),
            generation: Generation(3),
            rights: Rights::READ_WRITE,
            expires_unix_secs: 2_000,
            nodes: vec![NodeId(1), NodeId(2)],
            not_before_unix_secs: 900,
            size_blocks: 1 << 20,
            segments: 4,
            holder: Holder([9; HOLDER_BYTES]),
        }
    }

    #[test]
    fn verifies_and_refuses() {
        let key = generate_signing_key();
        let vk = key.verifying_key();
        let signed = cap().sign(&key);
        assert_eq!(signed.verify(&vk, NodeId(1), 1_000).unwrap().volume, VolumeId(7));
        assert_eq!(signed.verify(&vk, NodeId(9), 1_000), Err(CapabilityError::WrongNode));
        assert_eq!(signed.verify(&vk, NodeId(1), 2_000 + CLOCK_SKEW_SECS), Err(CapabilityError::Expired));
        assert!(signed.verify(&vk, NodeId(1), 2_000 + CLOCK_SKEW_SECS - 1).is_ok(), "within the skew allowance");
        assert_eq!(signed.verify(&vk, NodeId(1), 900 - CLOCK_SKEW_SECS - 1), Err(CapabilityError::NotYetValid));
        assert!(signed.verify(&vk, NodeId(1), 900 - CLOCK_SKEW_SECS).is_ok(), "within the skew allowance");
        for tamper in [
            |c: &mut Capability| c.size_blocks += 1,
            |c: &mut Capability| c.segments += 1,
            |c: &mut Capability| c.not_before_unix_secs -= 100,
            |c: &mut Capability| c.holder.0[0] ^= 1,
        ] {
            let mut t = signed.clone();
            tamper(&mut t.claims);
            assert_eq!(t.verify(&vk, NodeId(1), 1_000), Err(CapabilityError::Forged));
        }
        let mut forged = signed.clone();
        forged.claims.volume = VolumeId(8);
        assert_eq!(forged.verify(&vk, NodeId(1), 1_000), Err(CapabilityError::Forged));
        let other = generate_signing_key();
        let by_other = cap().sign(&other);
        assert_eq!(by_other.verify(&vk, NodeId(1), 1_000), Err(CapabilityError::Forged));
        let tok = signed.to_token();
        assert_eq!(SignedCapability::from_token(&tok).unwrap(), signed);
        assert_eq!(SignedCapability::from_token("zz"), Err(CapabilityError::Malformed));
    }
}
