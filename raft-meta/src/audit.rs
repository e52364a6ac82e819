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
//!
//! Retention ([`AuditLog::enforce_retention`]) drops the oldest records once the
//! chain holds more than a record budget or its oldest record is too old. What
//! is dropped leaves an [`AuditAnchor`]: the sequence number and hash of the last
//! dropped record, which the first kept record links to, and the batch's count
//! and time range. Every pruning appends an `audit.pruned` record naming the
//! anchor, so the anchor itself is covered by the chain: [`verify_chain`] checks
//! the kept records from the anchor to the head, and that the newest
//! `audit.pruned` record names exactly this anchor.

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

/// The action of the record every pruning appends.
pub const PRUNE_ACTION: &str = "audit.pruned";

/// How much later than `max_age_ms` a record may be pruned: pruning by age runs in batches
/// (a tenth of the age, at most a day), so it adds one `audit.pruned` record per batch
/// instead of one per call.
pub fn age_slack_ms(max_age_ms: u64) -> u64 {
    (max_age_ms / 10).min(24 * 3600 * 1000)
}

/// What is left of the records pruned so far: the first kept record links to `hash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditAnchor {
    /// Sequence number of the last pruned record: every record up to it is gone.
    pub seq: u64,
    /// Hash of the last pruned record (the first kept record's `prev_hash`).
    pub hash: String,
    /// Records removed by the latest pruning.
    pub pruned: u64,
    /// Time of the first record the latest pruning removed.
    pub first_time_ms: u64,
    /// Time of the last record the latest pruning removed.
    pub last_time_ms: u64,
}

impl AuditAnchor {
    /// The object of the `audit.pruned` record that attests this anchor.
    pub fn describe(&self) -> String {
        format!(
            "anchor seq:{} hash:{} pruned:{} first_ms:{} last_ms:{}",
            self.seq, self.hash, self.pruned, self.first_time_ms, self.last_time_ms
        )
    }
}

/// The chain: the kept records and, once some were pruned, the anchor they hang from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    pub records: Vec<AuditRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<AuditAnchor>,
}

impl AuditLog {
    /// Appends an entry, chaining it to the last record (or to the anchor).
    pub fn append(&mut self, e: AuditEntry) -> u64 {
        let (seq, prev_hash) = match (self.records.last(), &self.anchor) {
            (Some(last), _) => (last.seq + 1, last.hash.clone()),
            (None, Some(a)) => (a.seq + 1, a.hash.clone()),
            (None, None) => (1, GENESIS_HASH.to_string()),
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

    /// The head hash (of the last record, else the anchor's), or the genesis hash.
    pub fn head(&self) -> &str {
        match (self.records.last(), &self.anchor) {
            (Some(r), _) => &r.hash,
            (None, Some(a)) => &a.hash,
            (None, None) => GENESIS_HASH,
        }
    }

    /// Walks the kept records from the anchor.
    pub fn verify(&self) -> VerifyReport {
        verify_chain(self.anchor.as_ref(), &self.records)
    }

    /// Drops the oldest records beyond the retention limits at `now` (the proposer's clock, so
    /// every replica prunes exactly the same records) and returns how many went.
    ///
    /// * By count: once more than `max_records` are kept, the oldest go until a tenth of the
    ///   budget is free again (so pruning is a batch, not one record per call), counting the
    ///   `audit.pruned` record appended here.
    /// * By age: once the oldest record is older than `max_age_ms` plus [`age_slack_ms`], every
    ///   record older than `max_age_ms` goes.
    ///
    /// A pruning moves the anchor to the last record removed and appends `audit.pruned`
    /// naming it ([`AuditAnchor::describe`]); that record is the newest, so it is never
    /// itself pruned before a newer pruning has attested a newer anchor.
    pub fn enforce_retention(&mut self, now: u64, max_records: u64, max_age_ms: u64) -> u64 {
        let len = self.records.len();
        let max_records = usize::try_from(max_records.max(2)).unwrap_or(usize::MAX);
        let by_count = if len > max_records {
            // Keep this many, plus the audit.pruned record.
            let keep = max_records - 1 - max_records / 10;
            len - keep.min(len)
        } else {
            0
        };
        let too_old = |r: &AuditRecord| now.saturating_sub(r.time_ms) > max_age_ms;
        let by_age = match self.records.first() {
            Some(r) if now.saturating_sub(r.time_ms) > max_age_ms.saturating_add(age_slack_ms(max_age_ms)) => {
                // Record times never decrease (the state's clock is monotonic).
                self.records.iter().take_while(|r| too_old(r)).count()
            }
            _ => 0,
        };
        let n = by_count.max(by_age);
        if n == 0 {
            return 0;
        }
        let (first_time_ms, last) = (self.records[0].time_ms, self.records[n - 1].clone());
        self.records.drain(..n);
        let anchor =
            AuditAnchor { seq: last.seq, hash: last.hash, pruned: n as u64, first_time_ms, last_time_ms: last.time_ms };
        let why = if by_count >= by_age {
            format!("by count (more than {max_records} records)")
        } else {
            format!("by age (older than {max_age_ms} ms)")
        };
        let object = anchor.describe();
        self.anchor = Some(anchor);
        self.append(AuditEntry {
            time_ms: now,
            actor: "system".into(),
            tenant: None,
            client: "-".into(),
            action: PRUNE_ACTION.into(),
            object,
            result: format!("ok: {n} records pruned {why}"),
        });
        n as u64
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
    /// The sequence number of the first broken record (its position among the kept records,
    /// from 1, when it is unreadable; 0 when the anchor itself is unreadable).
    pub first_broken: Option<u64>,
    /// Why that record is broken.
    pub reason: Option<String>,
    /// The anchor the walk started from (`None`: from genesis, nothing was pruned).
    #[serde(default)]
    pub anchor: Option<AuditAnchor>,
}

fn broken(records: u64, at: u64, reason: String) -> VerifyReport {
    VerifyReport { ok: false, records, head: None, first_broken: Some(at), reason: Some(reason), anchor: None }
}

/// Walks typed records from genesis.
pub fn verify(records: &[AuditRecord]) -> VerifyReport {
    verify_chain(None, records)
}

/// Walks typed records from `anchor` (or genesis): every record must carry the next sequence
/// number, link to its predecessor (the first one to the anchor's hash) and match its own hash;
/// and when there is an anchor, the newest `audit.pruned` record must name exactly it.
pub fn verify_chain(anchor: Option<&AuditAnchor>, records: &[AuditRecord]) -> VerifyReport {
    let (mut prev, first_seq) = match anchor {
        Some(a) => (a.hash.clone(), a.seq + 1),
        None => (GENESIS_HASH.to_string(), 1),
    };
    for (i, r) in records.iter().enumerate() {
        let expected_seq = first_seq + i as u64;
        if r.seq != expected_seq {
            if i == 0 && anchor.is_some() {
                let why = format!("sequence is {} but the anchor ends at {}", r.seq, expected_seq - 1);
                return broken(0, r.seq, why);
            }
            return broken(i as u64, expected_seq, format!("sequence is {} where {expected_seq} was expected", r.seq));
        }
        if r.prev_hash != prev {
            let why = if i == 0 && anchor.is_some() {
                "previous-hash link does not match the anchor (the last pruned record's hash)"
            } else {
                "previous-hash link does not match the record before it"
            };
            return broken(i as u64, r.seq, why.into());
        }
        if r.compute_hash() != r.hash {
            return broken(i as u64, r.seq, "record contents do not match its hash (altered)".into());
        }
        prev.clone_from(&r.hash);
    }
    let n = records.len() as u64;
    if let Some(a) = anchor {
        match records.iter().rev().find(|r| r.action == PRUNE_ACTION && r.actor == "system") {
            Some(r) if r.object == a.describe() => {}
            Some(r) => {
                return broken(n, r.seq, "the anchor is not the one this audit.pruned record names".into());
            }
            None => return broken(n, first_seq, "no audit.pruned record attests the anchor".into()),
        }
    }
    VerifyReport { ok: true, records: n, head: Some(prev), first_broken: None, reason: None, anchor: anchor.cloned() }
}

/// Walks records as stored JSON values, so that a record altered into an
/// unreadable shape is still named (by position) rather than failing the whole parse.
pub fn verify_json(records: &[serde_json::Value]) -> VerifyReport {
    verify_json_from(None, records)
}

/// [`verify_json`] from a stored anchor (the `anchor` of a stored [`AuditLog`], if any).
pub fn verify_json_from(anchor: Option<&serde_json::Value>, records: &[serde_json::Value]) -> VerifyReport {
    let anchor = match anchor.filter(|a| !a.is_null()).map(|a| serde_json::from_value::<AuditAnchor>(a.clone())) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => return broken(0, 0, format!("the anchor is unreadable: {e}")),
    };
    let mut typed = Vec::with_capacity(records.len());
    for (i, v) in records.iter().enumerate() {
        match serde_json::from_value::<AuditRecord>(v.clone()) {
            Ok(r) => typed.push(r),
            Err(e) => {
                // Check the readable prefix first (links only: the attestation may lie beyond).
                if let Some(b) = first_link_break(anchor.as_ref(), &typed) {
                    return b;
                }
                return broken(i as u64, i as u64 + 1, format!("record is unreadable: {e}"));
            }
        }
    }
    verify_chain(anchor.as_ref(), &typed)
}

/// The first broken link of a readable prefix, ignoring the anchor's attestation.
fn first_link_break(anchor: Option<&AuditAnchor>, prefix: &[AuditRecord]) -> Option<VerifyReport> {
    let rep = verify_chain(anchor, prefix);
    let attestation_only = rep.first_broken.is_some_and(|_| rep.records == prefix.len() as u64);
    (!rep.ok && !attestation_only).then_some(rep)
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

    fn entry_at(i: u64, time_ms: u64) -> AuditEntry {
        AuditEntry { time_ms, ..entry(i) }
    }

    #[test]
    fn pruning_by_count_keeps_the_budget_and_verifies_from_the_anchor() {
        let mut log = AuditLog::default();
        let (mut pruned_total, mut prunings) = (0, 0);
        for i in 1..=1000 {
            log.append(entry_at(i, i));
            let n = log.enforce_retention(i, 100, u64::MAX / 2);
            assert!(n == 0 || n > 10, "a pruning takes a tenth of the budget at least, took {n}");
            pruned_total += n;
            prunings += u64::from(n > 0);
            assert!(log.records.len() <= 100, "over budget after call {i}: {}", log.records.len());
        }
        // Batches: one audit.pruned record per batch, not one per call.
        assert!((60..=90).contains(&prunings), "{prunings} prunings");
        let a = log.anchor.clone().expect("anchored");
        // Every record up to the anchor is gone and the first kept one links to it.
        assert_eq!(log.records[0].seq, a.seq + 1);
        assert_eq!(log.records[0].prev_hash, a.hash);
        assert_eq!(pruned_total, a.seq, "the anchor's seq counts every pruned record (chain starts at 1)");
        let last = log.records.last().unwrap().seq;
        assert_eq!(last as usize - a.seq as usize, log.records.len());
        let rep = log.verify();
        assert!(rep.ok, "{rep:?}");
        assert_eq!(rep.anchor.as_ref(), Some(&a));
        assert_eq!(rep.head.as_deref(), Some(log.head()));
        // Appending continues the chain from the anchor even with nothing kept.
        let mut empty = AuditLog { records: Vec::new(), anchor: Some(a.clone()) };
        empty.append(entry(5000));
        assert_eq!(empty.records[0].seq, a.seq + 1);
        assert_eq!(empty.records[0].prev_hash, a.hash);
    }

    #[test]
    fn pruning_by_age_keeps_young_records_and_runs_in_batches() {
        let day = 24 * 3600 * 1000;
        let max_age = 10 * day;
        let mut log = AuditLog::default();
        // One record an hour for 30 days.
        let hour = 3600 * 1000;
        let mut pruning_times = Vec::new();
        for i in 0..(30 * 24) {
            let now = i * hour;
            log.append(entry_at(i, now));
            if log.enforce_retention(now, 1_000_000, max_age) > 0 {
                pruning_times.push(now);
            }
            let oldest = log.records[0].time_ms;
            assert!(now - oldest <= max_age + age_slack_ms(max_age), "record older than the slack kept at {now}");
        }
        // Nothing younger than max_age was pruned: every record of the last max_age is here.
        let now = (30 * 24 - 1) * hour;
        let young = (0..(30 * 24)).filter(|i| now - i * hour <= max_age).count();
        let kept_young = log.records.iter().filter(|r| r.action != PRUNE_ACTION && now - r.time_ms <= max_age).count();
        assert_eq!(kept_young, young);
        // Batches: the slack is a day, so about one pruning a day after the first 11 days.
        assert!(pruning_times.len() >= 15 && pruning_times.len() <= 20, "{} prunings", pruning_times.len());
        assert!(pruning_times.windows(2).all(|w| w[1] - w[0] >= age_slack_ms(max_age)));
        assert!(log.verify().ok);
        let a = log.anchor.as_ref().unwrap();
        assert!(a.last_time_ms < now - max_age && a.first_time_ms <= a.last_time_ms);
        // The pruning record names the anchor, the count and the reason.
        let p = log.records.iter().rev().find(|r| r.action == PRUNE_ACTION).unwrap();
        assert_eq!(p.object, a.describe());
        assert!(p.result.contains(&format!("{} records pruned by age", a.pruned)), "{}", p.result);
    }

    #[test]
    fn retention_is_deterministic() {
        let run = || {
            let mut log = AuditLog::default();
            for i in 1..=500 {
                log.append(entry_at(i, i * 1000));
                log.enforce_retention(i * 1000, 37, 60_000);
            }
            serde_json::to_vec(&log).unwrap()
        };
        assert_eq!(run(), run());
    }

    fn pruned_log() -> AuditLog {
        let mut log = AuditLog::default();
        for i in 1..=60 {
            log.append(entry_at(i, i));
            log.enforce_retention(i, 20, u64::MAX / 2);
        }
        assert!(log.anchor.is_some() && log.verify().ok);
        log
    }

    #[test]
    fn verify_from_the_anchor_names_a_tampered_kept_record() {
        let log = pruned_log();
        let first = log.records[0].seq;
        let mut bad = log.clone();
        bad.records[3].object.push('x');
        let rep = bad.verify();
        assert!(!rep.ok);
        assert_eq!(rep.first_broken, Some(first + 3));
        assert!(rep.reason.unwrap().contains("altered"));
        // Dropping a kept record from the front breaks the link to the anchor.
        let mut bad = log.clone();
        bad.records.remove(0);
        let rep = bad.verify();
        assert_eq!(rep.first_broken, Some(first + 1));
        assert!(rep.reason.unwrap().contains("anchor ends at"));
        // Through JSON (the offline tool's path).
        let v = serde_json::to_value(&log).unwrap();
        let mut recs = v["records"].as_array().unwrap().clone();
        assert!(verify_json_from(Some(&v["anchor"]), &recs).ok);
        recs[5]["seq"] = serde_json::Value::String("x".into());
        assert_eq!(verify_json_from(Some(&v["anchor"]), &recs).first_broken, Some(6));
    }

    #[test]
    fn a_tampered_anchor_breaks_verify() {
        let log = pruned_log();
        let first = log.records[0].seq;
        // Its hash: the first kept record no longer links to it.
        let mut bad = log.clone();
        bad.anchor.as_mut().unwrap().hash = GENESIS_HASH.into();
        let rep = bad.verify();
        assert_eq!(rep.first_broken, Some(first));
        assert!(rep.reason.unwrap().contains("anchor"));
        // Its seq.
        let mut bad = log.clone();
        bad.anchor.as_mut().unwrap().seq -= 1;
        assert_eq!(bad.verify().first_broken, Some(first));
        // Its count or time range: the audit.pruned record no longer names it.
        for f in [|a: &mut AuditAnchor| a.pruned += 1, |a: &mut AuditAnchor| a.first_time_ms = 0] {
            let mut bad = log.clone();
            f(bad.anchor.as_mut().unwrap());
            let rep = bad.verify();
            assert!(!rep.ok);
            assert!(rep.reason.unwrap().contains("audit.pruned"));
        }
        // Truncating kept records and moving the anchor forward to match: the newest
        // audit.pruned record names another anchor (or none is left).
        let mut bad = log.clone();
        let cut = bad.records.len() - 2;
        let last_cut = bad.records[cut - 1].clone();
        bad.records.drain(..cut);
        let a = bad.anchor.as_mut().unwrap();
        a.seq = last_cut.seq;
        a.hash = last_cut.hash;
        let rep = bad.verify();
        assert!(!rep.ok, "a forged truncation verified");
        assert!(rep.reason.unwrap().contains("audit.pruned"));
        // Dropping the anchor: the chain no longer starts at genesis.
        let mut bad = log.clone();
        bad.anchor = None;
        assert_eq!(bad.verify().first_broken, Some(1));
        // An unreadable anchor is named as such.
        let v = serde_json::to_value(&log).unwrap();
        let recs = v["records"].as_array().unwrap().clone();
        let rep = verify_json_from(Some(&serde_json::json!({"seq": "x"})), &recs);
        assert_eq!(rep.first_broken, Some(0));
    }
}
