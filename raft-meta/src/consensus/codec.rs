//! Small byte formats owned by consensus: the entry context that matches a committed entry to the caller
//! that proposed it, and the envelope that wraps the state machine's snapshot with the peer address table.
//!
//! Hand-written fixed layouts (big-endian integers) instead of serde: they sit in the raft log and in
//! snapshots, so they must be stable, tiny, and decoding must never panic on foreign bytes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Identifies a proposal: which node proposed it, in which incarnation of that node, and which request.
/// The boot id keeps request ids unique across restarts (an entry proposed before a restart can still be
/// applied after it, and must not complete a new request that reused its number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RequestCtx {
    pub node: u64,
    pub boot: u64,
    pub request: u64,
}

const CTX_LEN: usize = 24;

impl RequestCtx {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CTX_LEN);
        v.extend_from_slice(&self.node.to_be_bytes());
        v.extend_from_slice(&self.boot.to_be_bytes());
        v.extend_from_slice(&self.request.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != CTX_LEN {
            return None;
        }
        Some(Self { node: be_u64(&b[0..8])?, boot: be_u64(&b[8..16])?, request: be_u64(&b[16..24])? })
    }
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

const SNAP_MAGIC: &[u8; 8] = b"SLSNAP01";

/// Snapshot data as carried in raft snapshots: the peer address table plus the state machine's bytes.
pub(crate) fn encode_snapshot_data(peers: &BTreeMap<u64, SocketAddr>, sm: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(sm.len() + 64);
    v.extend_from_slice(SNAP_MAGIC);
    v.extend_from_slice(&(peers.len() as u32).to_be_bytes());
    for (id, addr) in peers {
        let a = addr.to_string();
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(&(a.len() as u16).to_be_bytes());
        v.extend_from_slice(a.as_bytes());
    }
    v.extend_from_slice(sm);
    v
}

/// Inverse of [`encode_snapshot_data`]; returns the peers and the state machine's bytes.
pub(crate) fn decode_snapshot_data(b: &[u8]) -> Result<(BTreeMap<u64, SocketAddr>, &[u8]), String> {
    let err = || "malformed snapshot envelope".to_owned();
    let rest = b.strip_prefix(SNAP_MAGIC).ok_or_else(err)?;
    let (n, mut rest) = split(rest, 4).ok_or_else(err)?;
    let n = u32::from_be_bytes(n.try_into().map_err(|_| err())?);
    if n > 10_000 {
        return Err(err());
    }
    let mut peers = BTreeMap::new();
    for _ in 0..n {
        let (id, r) = split(rest, 8).ok_or_else(err)?;
        let (len, r) = split(r, 2).ok_or_else(err)?;
        let len = u16::from_be_bytes(len.try_into().map_err(|_| err())?) as usize;
        let (addr, r) = split(r, len).ok_or_else(err)?;
        let addr: SocketAddr = std::str::from_utf8(addr).map_err(|_| err())?.parse().map_err(|_| err())?;
        peers.insert(be_u64(id).ok_or_else(err)?, addr);
        rest = r;
    }
    Ok((peers, rest))
}

fn split(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (b.len() >= n).then(|| b.split_at(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctx_roundtrip_and_garbage() {
        let c = RequestCtx { node: 3, boot: 0xdead_beef, request: 42 };
        assert_eq!(RequestCtx::decode(&c.encode()), Some(c));
        assert_eq!(RequestCtx::decode(b"short"), None);
        assert_eq!(RequestCtx::decode(&[]), None);
    }

    #[test]
    fn snapshot_envelope_roundtrip_and_garbage() {
        let mut peers = BTreeMap::new();
        peers.insert(1, "127.0.0.1:5000".parse().unwrap());
        peers.insert(7, "[::1]:6000".parse().unwrap());
        let enc = encode_snapshot_data(&peers, b"state bytes");
        let (p, sm) = decode_snapshot_data(&enc).unwrap();
        assert_eq!(p, peers);
        assert_eq!(sm, b"state bytes");
        for cut in 0..enc.len() - 11 {
            let _ = decode_snapshot_data(&enc[..cut]);
        }
        assert!(decode_snapshot_data(b"nope").is_err());
    }
}
