//! The hash-chained audit log, kept in the replicated state.
//!
//! Every management call (including refusals) appends one record inside the
//! state machine's `apply`, so the chain is identical on every metadata node
//! and survives exactly as long as the state does. Each record's hash covers
//! its fields and the previous record's hash, so changing, removing or
//! reordering any stored record breaks the chain at that record, and
//! [`verify`] names it. Records never hold secrets: actors are principal ids
//! and names, objects are ids.
//!
//! Each record carries the tenant it belongs to (the acting principal's tenant,
//! else the tenant of the object), which is how tenants are limited to their
//! own records.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// The previous-hash of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Milliseconds since the Unix epoch, as stamped by the proposing node.
    pub time_ms: u64,
    /// Who: `principal:ID(name)`, `token:ID` when authentication failed, `anonymous` or `system`.
    pub actor: String,
    /// The tenant this record belongs to (`None`: cluster-level, operators only).
    pub tenant: Option<u64>,
    /// The client's network address as seen by the API.
    pub client: String,
    /// What was asked, e.g. `volume.create`.
    pub action: String,
    /// What it was asked on, e.g. `volume:vol-7`.
    pub object: String,
    /// `ok`, `denied: ...` or `error: ...`.
    pub result: String,
    /// Hash of the previous record (hex SHA-256).
    pub prev_hash: String,
    /// SHA-256 over this record's other fields and `prev_hash`.
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record must carry.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"slate-audit-v1\0");
        h.update(self.seq.to_be_bytes());
        h.update(self.time_ms.to_be_bytes());
        for field in [&self.actor, &self.client, &self.action, &self.object, &self.result, &self.prev_hash] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        match self.tenant {
            Some(t) => {
                h.update([1]);
                h.update(t.to_be_bytes());
            }
            None => h.update([0]),
        }
        hex::encode(h.finalize())
    }
}

/// The fields of a record before it is chained.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub time_ms: u64,
    pub actor: String,
    pub tenant: Option<u64>,
    pub client: String,
    pub action: String,
    pub object: String,
    pub result: String,
}

/// The chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    pub records: Vec<AuditRecord>,
}

impl AuditLog {
    /// Appends an entry, chaining it to the last record.
    pub fn append(&mut self, e: AuditEntry) -> u64 {
        let (seq, prev_hash) = match self.records.last() {
            Some(last) => (last.seq + 1, last.hash.clone()),
            None => (1, GENESIS_HASH.to_string()),
        };
        let mut rec = AuditRecord {
            seq,
            time_ms: e.time_ms,
            actor: e.actor,
            tenant: e.tenant,
            client: e.client,
            action: e.action,
            object: e.object,
            result: e.result,
            prev_hash,
            hash: String::new(),
        };
        rec.hash = rec.compute_hash();
        self.records.push(rec);
        seq
    }

    /// The head hash (of the last record), or the genesis hash.
    pub fn head(&self) -> &str {
        self.records.last().map_or(GENESIS_HASH, |r| r.hash.as_str())
    }
}

/// The outcome of walking a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    /// True when every link holds.
    pub ok: bool,
    /// Records checked.
    pub records: u64,
    /// The head hash when the chain holds.
    pub head: Option<String>,
    /// The sequence number (or position, from 1, when the record is unreadable) of the first broken record.
    pub first_broken: Option<u64>,
    /// Why that record is broken.
    pub reason: Option<String>,
}

fn broken(records: u64, at: u64, reason: String) -> VerifyReport {
    VerifyReport { ok: false, records, head: None, first_broken: Some(at), reason: Some(reason) }
}

/// Walks typed records.
pub fn verify(records: &[AuditRecord]) -> VerifyReport {
    let mut prev = GENESIS_HASH.to_string();
    for (i, r) in records.iter().enumerate() {
        let expected_seq = i as u64 + 1;
        if r.seq != expected_seq {
            return broken(i as u64, expected_seq, format!("sequence is {} where {expected_seq} was expected", r.seq));
        }
        if r.prev_hash != prev {
            return broken(i as u64, r.seq, "previous-hash link does not match the record before it".into());
        }
        if r.compute_hash() != r.hash {
            return broken(i as u64, r.seq, "record contents do not match its hash (altered)".into());
        }
        prev.clone_from(&r.hash);
    }
    VerifyReport { ok: true, records: records.len() as u64, head: Some(prev), first_broken: None, reason: None }
}

/// Walks records as stored JSON values, so that a record altered into an
/// unreadable shape is still named (by position) rather than failing the whole parse.
pub fn verify_json(records: &[serde_json::Value]) -> VerifyReport {
    let mut typed = Vec::with_capacity(records.len());
    for (i, v) in records.iter().enumerate() {
        match serde_json::from_value::<AuditRecord>(v.clone()) {
            Ok(r) => typed.push(r),
            Err(e) => {
                // Check the readable prefix first: an earlier break wins.
                let prefix = verify(&typed);
                if !prefix.ok {
                    return prefix;
                }
                return broken(i as u64, i as u64 + 1, format!("record is unreadable: {e}"));
            }
        }
    }
    verify(&typed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            time_ms: i,
            actor: "principal:1(op)".into(),
            tenant: Some(2),
            client: "127.0.0.1:1".into(),
            action: "volume.create".into(),
            object: format!("volume:vol-{i}"),
            result: "ok".into(),
        }
    }

    #[test]
    fn chain_verifies_and_names_the_altered_record() {
        let mut log = AuditLog::default();
        for i in 0..10 {
            log.append(entry(i));
        }
        assert!(verify(&log.records).ok);
        let mut bad = log.records.clone();
        bad[4].object.push('x');
        let rep = verify(&bad);
        assert_eq!(rep.first_broken, Some(5));
        let mut bad = log.records.clone();
        bad.remove(3);
        assert_eq!(verify(&bad).first_broken, Some(4));
        let mut json: Vec<serde_json::Value> = log.records.iter().map(|r| serde_json::to_value(r).unwrap()).collect();
        json[6]["seq"] = serde_json::Value::String("x".into());
        assert_eq!(verify_json(&json).first_broken, Some(7));
    }
}
