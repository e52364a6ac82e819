//! Audit retention inside `apply`: both replicas prune the same records at the same entry,
//! driven by the entries' clock, and the kept chain verifies from its anchor.

use super::*;
use crate::audit::PRUNE_ACTION;

fn settings(records: Option<u64>, age_ms: Option<u64>) -> Command {
    Command::UpdateSettings(UpdateSettingsRequest {
        placement_level: None,
        heartbeat_timeout_ms: None,
        lockout_threshold: None,
        lockout_ms: None,
        capability_ttl_secs: None,
        segment_blocks: None,
        audit_max_records: records,
        audit_max_age_ms: age_ms,
    })
}

#[test]
fn defaults_and_bounds_of_the_retention_settings() {
    let mut h = Harness::new();
    let v = h.op(Command::GetSettings);
    assert_eq!(v["audit_max_records"], DEFAULT_AUDIT_MAX_RECORDS);
    assert_eq!(v["audit_max_age_ms"], DEFAULT_AUDIT_MAX_AGE_MS);
    for bad in [settings(Some(9), None), settings(None, Some(59_999))] {
        assert_eq!(h.err(tok(1, "op-secret"), bad).code, ErrorCode::BadRequest);
    }
    // A state written before retention existed reads with the defaults.
    let mut old = serde_json::to_value(&h.state().settings).unwrap();
    old.as_object_mut().unwrap().retain(|k, _| !k.starts_with("audit_"));
    let s: Settings = serde_json::from_value(old).unwrap();
    assert_eq!((s.audit_max_records, s.audit_max_age_ms), (DEFAULT_AUDIT_MAX_RECORDS, DEFAULT_AUDIT_MAX_AGE_MS));
}

#[test]
fn apply_prunes_by_count_identically_on_every_replica() {
    let mut h = Harness::new();
    h.op(settings(Some(50), None));
    for _ in 0..400 {
        // Every `run` checks that both replicas' states are byte-identical.
        h.op(Command::WhoAmI);
        assert!(h.state().audit.records.len() <= 50);
    }
    let st = h.state();
    let a = st.audit.anchor.clone().expect("pruned");
    assert!(a.seq > 300, "{a:?}");
    assert!(st.audit.verify().ok);
    let p = st.audit.records.iter().rev().find(|r| r.action == PRUNE_ACTION).unwrap();
    assert_eq!((p.actor.as_str(), p.tenant), ("system", None));
    // Listing starts at the first kept record and says where the chain is anchored.
    let page = h.op(Command::ListAudit { tenant: None, after_seq: None, limit: Some(10) });
    assert_eq!(page["records"][0]["seq"], h.state().audit.records[0].seq);
    assert_eq!(page["anchor"]["seq"], a.seq);
    let rep = h.op(Command::VerifyAudit);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(rep["anchor"]["hash"], a.hash.as_str());
}

#[test]
fn apply_prunes_by_age_with_the_proposer_clock() {
    let mut h = Harness::new();
    let minute = 60_000;
    h.op(settings(None, Some(10 * minute)));
    for _ in 0..5 {
        h.op(Command::WhoAmI);
    }
    let before = h.state().audit.records.len();
    // Time only moves with the entries: 10 minutes plus the slack later, nothing went yet.
    h.now += 10 * minute + crate::audit::age_slack_ms(10 * minute);
    assert_eq!(h.state().audit.records.len(), before);
    // The next entry (any entry) prunes everything older than 10 minutes, on both replicas.
    h.op(Command::WhoAmI);
    let st = h.state();
    let now = st.last_time_ms;
    assert!(st.audit.records.iter().all(|r| now - r.time_ms <= 10 * minute), "an old record was kept");
    let a = st.audit.anchor.as_ref().expect("pruned by age");
    assert_eq!(a.pruned as usize, before);
    assert!(st.audit.records.last().unwrap().result.contains("by age"));
    assert!(st.audit.verify().ok);
}
