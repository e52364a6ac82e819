//! What the metadata service hands a client at attach: the volume's layout
//! (size, segment geometry, generation, per-segment replica sets), the
//! capability the storage nodes verify, and the volume's data key.
//!
//! These are plain serde structs so that the lead can deserialize slate-meta's
//! attach reply straight into them. The key is the one secret here: it lives
//! in a [`Dek`] that zeroizes itself on drop and never prints.

use serde::{Deserialize, Deserializer, Serialize};
use slate_protocol::{
    BlockIndex, Epoch, Generation, NodeId, SegmentGeometry, SegmentIndex, SignedCapability, VolumeId,
    BLOCK_SIZE_BYTES_U64,
};
use slate_secret::Secret;
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// Bytes in an AES-256-XTS key: two 256-bit halves.
pub const DEK_BYTES: usize = 64;

/// Where a replica stands for the client: the state the metadata service records
/// (in sync: serves reads and receives writes; rebuilding: being filled from a
/// survivor, receives every new write, serves no reads).
pub use slate_protocol::api::ReplicaState as ReplicaRole;

/// One replica of a segment: which node, where to reach it, and its role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub node: NodeId,
    /// The node's data-plane address, `host:port`.
    pub addr: String,
    #[serde(default)]
    pub role: ReplicaRole,
}

/// The replica set of one segment, as recorded by the metadata service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReplicas {
    pub segment: SegmentIndex,
    /// Bumped by the metadata service at every change of this replica set.
    #[serde(default)]
    pub epoch: Epoch,
    pub replicas: Vec<ReplicaInfo>,
}

/// A volume's layout: everything but the secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLayout {
    pub volume: VolumeId,
    /// The volume's size; a multiple of the block size.
    #[serde(alias = "size")]
    pub size_bytes: u64,
    /// Blocks per segment (the unit of placement).
    pub segment_blocks: u64,
    /// The generation of this attachment; nodes refuse older ones.
    pub generation: Generation,
    /// One entry per segment, in any order.
    pub segments: Vec<SegmentReplicas>,
}

impl VolumeLayout {
    /// The segment geometry.
    pub fn geometry(&self) -> SegmentGeometry {
        SegmentGeometry { segment_blocks: self.segment_blocks }
    }

    /// The volume's size in blocks.
    pub fn volume_blocks(&self) -> u64 {
        self.size_bytes / BLOCK_SIZE_BYTES_U64
    }

    /// Number of segments the volume's size needs.
    pub fn segment_count(&self) -> u32 {
        self.geometry().segment_count(self.volume_blocks())
    }

    /// Blocks of `segment` that lie inside the volume (the last segment may be short).
    pub fn segment_len(&self, segment: SegmentIndex) -> u64 {
        let first = self.geometry().first_block(segment).0;
        self.volume_blocks().saturating_sub(first).min(self.segment_blocks)
    }

    /// The first block of `segment`.
    pub fn segment_start(&self, segment: SegmentIndex) -> BlockIndex {
        self.geometry().first_block(segment)
    }

    /// Checks the relations a client relies on: whole blocks, a sane geometry,
    /// exactly one replica set per segment, at least two replicas in each, no
    /// node twice in a set.
    pub fn validate(&self) -> Result<(), String> {
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(BLOCK_SIZE_BYTES_U64) {
            return Err(format!("volume size {} is not a positive multiple of the block size", self.size_bytes));
        }
        if self.segment_blocks == 0 {
            return Err("segment_blocks is 0".into());
        }
        let count = self.segment_count();
        let mut seen = vec![false; count as usize];
        for s in &self.segments {
            let Some(slot) = seen.get_mut(s.segment.0 as usize) else {
                return Err(format!("{} is outside the volume ({count} segments)", s.segment));
            };
            if std::mem::replace(slot, true) {
                return Err(format!("{} is listed twice", s.segment));
            }
            if s.replicas.len() < 2 {
                return Err(format!("{} has {} replicas; at least 2 are required", s.segment, s.replicas.len()));
            }
            if !s.replicas.iter().any(|r| r.role == ReplicaRole::InSync) {
                return Err(format!("{} has no in-sync replica", s.segment));
            }
            for (i, r) in s.replicas.iter().enumerate() {
                if s.replicas[..i].iter().any(|o| o.node == r.node) {
                    return Err(format!("{} lists {} twice", s.segment, r.node));
                }
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(format!("seg-{i} has no replica set"));
        }
        Ok(())
    }
}

/// A snapshot the metadata service recorded as `pending`: the read-write
/// attachment must freeze every replica of the volume at `epoch` and report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSnapshot {
    /// The snapshot's id in the metadata service.
    pub id: u64,
    /// The layer epoch every node freezes the volume's segments at.
    pub epoch: Epoch,
}

/// What a layout poll returns: the layout and the snapshots waiting for this
/// attachment to freeze them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeState {
    pub layout: VolumeLayout,
    /// Snapshots in state `pending`, in any order.
    pub pending_snapshots: Vec<PendingSnapshot>,
}

/// The volume's data key (AES-256-XTS, 64 bytes). Held in a [`Secret`] page (out of
/// core dumps, zeroized on drop); its `Debug` never shows it; it deserializes from a
/// hex string.
#[derive(Clone)]
pub struct Dek(Secret<[u8; DEK_BYTES]>);

impl Dek {
    /// Copies raw key bytes into a secret page (the argument is wiped).
    pub fn new(mut bytes: [u8; DEK_BYTES]) -> Self {
        let key = Secret::from_slice(&bytes);
        bytes.zeroize();
        Self(key)
    }

    /// The key bytes (for the cipher only).
    pub fn expose(&self) -> &[u8; DEK_BYTES] {
        &self.0
    }

    /// Parses 128 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let mut key = Secret::<[u8; DEK_BYTES]>::zeroed();
        hex::decode_to_slice(s.trim(), &mut key[..])
            .map_err(|_| "the volume key must be 128 hex digits".to_string())?;
        Ok(Self(key))
    }

    /// XTS requires two different halves.
    pub fn halves_differ(&self) -> bool {
        self.0[..DEK_BYTES / 2] != self.0[DEK_BYTES / 2..]
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for Dek {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        Self::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A capability as the metadata service may send it: the token string
/// (`SignedCapability::to_token`) or the structured form.
fn capability_from_either<'de, D: Deserializer<'de>>(d: D) -> Result<SignedCapability, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Token(String),
        Structured(SignedCapability),
    }
    match Either::deserialize(d)? {
        Either::Token(t) => SignedCapability::from_token(&t).map_err(serde::de::Error::custom),
        Either::Structured(c) => Ok(c),
    }
}

/// The attach reply: layout, capability and key.
#[derive(Clone, Debug, Deserialize)]
pub struct AttachInfo {
    #[serde(flatten)]
    pub layout: VolumeLayout,
    /// The capability every data-plane session opens with.
    #[serde(alias = "token", deserialize_with = "capability_from_either")]
    pub capability: SignedCapability,
    /// The volume's data key, for this attachment only.
    #[serde(alias = "key")]
    pub dek: Dek,
}

#[cfg(test)]
mod tests {
    use super::*;
    use slate_protocol::{Capability, Rights};

    fn layout() -> VolumeLayout {
        let rep = |n: u64| ReplicaInfo {
            node: NodeId(n),
            addr: format!("127.0.0.1:{}", 7000 + n),
            role: ReplicaRole::InSync,
        };
        VolumeLayout {
            volume: VolumeId(3),
            size_bytes: 10 * 4096,
            segment_blocks: 4,
            generation: Generation(2),
            segments: (0..3)
                .map(|i| SegmentReplicas { segment: SegmentIndex(i), epoch: Epoch(1), replicas: vec![rep(1), rep(2)] })
                .collect(),
        }
    }

    #[test]
    fn layout_geometry_and_validation() {
        let l = layout();
        assert_eq!(l.segment_count(), 3);
        assert_eq!(l.segment_len(SegmentIndex(2)), 2);
        assert_eq!(l.segment_len(SegmentIndex(0)), 4);
        l.validate().unwrap();
        let mut bad = l.clone();
        bad.segments.pop();
        assert!(bad.validate().unwrap_err().contains("seg-2"));
        let mut bad = l.clone();
        bad.segments[0].replicas.pop();
        assert!(bad.validate().is_err());
        let mut bad = l.clone();
        bad.segments[1].replicas[1].node = NodeId(1);
        assert!(bad.validate().is_err());
        let mut bad = l;
        bad.size_bytes += 1;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn attach_info_parses_token_or_struct_and_hides_the_key() {
        let key = slate_protocol::capability::generate_signing_key();
        let cap = Capability {
            volume: VolumeId(3),
            generation: Generation(2),
            rights: Rights::READ_WRITE,
            expires_unix_secs: u64::MAX,
            nodes: vec![NodeId(1), NodeId(2)],
            ..Default::default()
        }
        .sign(&key);
        let dek_hex = "ab".repeat(32) + &"cd".repeat(32);
        let mut v = serde_json::to_value(layout()).unwrap();
        v["capability"] = serde_json::Value::String(cap.to_token());
        v["dek"] = serde_json::Value::String(dek_hex.clone());
        let info: AttachInfo = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(info.capability, cap);
        assert!(info.dek.halves_differ());
        assert!(!format!("{info:?}").contains("abab"));
        v["capability"] = serde_json::to_value(&cap).unwrap();
        let info: AttachInfo = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(info.capability, cap);
        v["dek"] = serde_json::Value::String("00".into());
        assert!(serde_json::from_value::<AttachInfo>(v).is_err());
    }
}
