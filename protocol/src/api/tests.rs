//! The JSON of the API types is the wire format: these pin it.

use super::*;
use crate::ops::ReleaseReason;
use serde_json::json;

fn wire<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

#[test]
fn states_are_snake_case_on_the_wire() {
    assert_eq!(wire(ReplicaState::InSync), "in_sync");
    assert_eq!(wire(ReplicaState::Rebuilding), "rebuilding");
    assert_eq!(wire(SnapshotState::Pending), "pending");
    assert_eq!(wire(VolumeState::Degraded), "degraded");
    assert_eq!(wire(NodeState::Decommissioned), "decommissioned");
    assert_eq!(wire(DiskState::Decommissioning), "decommissioning");
    assert_eq!(wire(AttachMode::ReadWrite), "read_write");
    assert_eq!(wire(Role::TenantAdmin), "tenant_admin");
    assert_eq!(wire(Access::ReadOnly), "read_only");
    assert_eq!(wire(DomainLevel::Rack), "rack");
    assert_eq!(wire(BackupState::Complete), "complete");
    assert_eq!(wire(ErasureState::KeptForClones), "kept_for_clones");
    assert_eq!(wire(ReleaseState::Erased), "erased");
    assert_eq!(wire(DrainState::None), "none");
    assert_eq!(wire(MetaRole::PreCandidate), "pre-candidate");
    assert_eq!(wire(ErrorCode::KeyRotated), "key_rotated");
}

#[test]
fn display_names_match_the_wire() {
    fn same<T: serde::Serialize + std::fmt::Display + Copy>(all: &[T]) {
        for v in all {
            assert_eq!(wire(v), v.to_string());
        }
    }
    same(&[
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::Locked,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::KeyRotated,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Unsatisfiable,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ]);
    same(&[MetaRole::Follower, MetaRole::PreCandidate, MetaRole::Candidate, MetaRole::Leader, MetaRole::Failed]);
    same(&NodeState::ALL);
    same(&[DiskState::Active, DiskState::Decommissioning, DiskState::Decommissioned]);
    same(&[DrainState::None, DrainState::Draining, DrainState::Blocked, DrainState::Complete]);
    same(&[BackupState::Creating, BackupState::Complete]);
    same(&[ReleaseState::Pending, ReleaseState::Released, ReleaseState::Erased]);
    same(&[ErasureState::Erasing, ErasureState::KeptForClones, ErasureState::Complete]);
    same(&[ReplicaState::InSync, ReplicaState::Rebuilding]);
    same(&[SnapshotState::Pending, SnapshotState::Ready]);
    same(&[VolumeState::Available, VolumeState::Attached, VolumeState::Degraded]);
    same(&[DomainLevel::Zone, DomainLevel::Rack, DomainLevel::Host]);
    same(&[AttachMode::ReadWrite, AttachMode::ReadOnly]);
    same(&[Role::Operator, Role::TenantAdmin, Role::TenantMember, Role::Host, Role::Node]);
    same(&[Access::ReadWrite, Access::ReadOnly, Access::Snapshot, Access::Backup]);
    same(&[
        ReleaseReason::VolumeDeleted,
        ReleaseReason::ReplicaReplaced,
        ReleaseReason::ReplicaMoved,
        ReleaseReason::SnapshotDeleted,
    ]);
}

#[test]
fn a_volume_view_reads_and_writes_the_same_json() {
    let v = json!({
        "id": 7, "name": "v", "tenant": 1, "size_bytes": 8192, "block_size": 4096, "replicas": 2,
        "failure_domain_level": "host", "qos": {"iops_limit": null, "mbps_limit": 10},
        "state": "attached", "generation": 3, "segment_blocks": 2,
        "segments": [{"index": 0, "epoch": 1, "first_block": 0, "blocks": 2, "replicas": [
            {"node": 1, "addr": "127.0.0.1:1", "failure_domain": "z/r/a", "state": "in_sync",
             "node_state": "active", "rebuild_done_blocks": 0, "rebuild_total_blocks": 0},
            {"node": 2, "addr": "127.0.0.1:2", "failure_domain": "z/r/b", "state": "rebuilding",
             "node_state": "active", "rebuild_done_blocks": 1, "rebuild_total_blocks": 2}]}],
        "attachments": [{"id": 9, "principal": 4, "host": "h", "mode": "read_write", "generation": 3, "attached_ms": 5}],
        "snapshots": [{"id": 4, "volume": 7, "name": "a", "epoch": 2, "created_ms": 1, "state": "pending", "ready_ms": null}],
        "dek": {"created_ms": 1, "age_secs": 2, "wrapped_ms": 3, "tenant_key_version": 1}
    });
    let view: VolumeView = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(view.state, VolumeState::Attached);
    assert_eq!(view.segments[0].replicas[1].state, ReplicaState::Rebuilding);
    assert_eq!(view.snapshots[0].state, SnapshotState::Pending);
    assert_eq!(wire(&view), v, "no field added, dropped or renamed");
    let mut with_parent = v;
    with_parent["parent"] = json!({"volume": 1, "volume_name": "p", "deleted": false, "snapshot": 2,
        "snapshot_name": "s", "epoch": 3, "size_bytes": 8192});
    with_parent["clones"] = json!([{"volume": 8, "name": "c", "snapshot": 4, "snapshot_name": "a"}]);
    let view: VolumeView = serde_json::from_value(with_parent.clone()).unwrap();
    assert_eq!(wire(&view), with_parent);
}

#[test]
fn a_capability_refresh_is_the_capability_with_an_optional_parent() {
    let cap =
        json!({"token": "00", "volume": 1, "generation": 2, "rights": 1, "nodes": [1, 2], "expires_unix_secs": 9});
    let r: CapabilityRefresh = serde_json::from_value(cap.clone()).unwrap();
    assert!(r.parent.is_none());
    assert_eq!(wire(&r), cap);
    assert!(!format!("{r:?}").contains("\"00\""), "the token stays out of Debug");
}

#[test]
fn erasure_and_release_views_keep_their_strings() {
    let rel = json!({"id": 1, "node": 2, "node_name": "n", "volume": 3, "segment": 0, "layer_epoch": null,
        "reason": "replica_moved", "state": "released", "queued_ms": 1, "released_ms": 2, "erased_ms": null,
        "extents_released": 1, "extents_verified": 0, "extents_failed": 0, "extents": [5]});
    let r: ReleaseView = serde_json::from_value(rel.clone()).unwrap();
    assert_eq!((r.reason, r.state), (ReleaseReason::ReplicaMoved, ReleaseState::Released));
    assert_eq!(wire(&r), rel);
}

#[test]
fn requests_refuse_unknown_fields() {
    let ok: AttachRequest = serde_json::from_value(json!({"mode": "read_only", "host": "h"})).unwrap();
    assert_eq!(ok.mode, AttachMode::ReadOnly);
    assert!(!ok.force && !ok.insecure_plaintext_nbd);
    assert!(serde_json::from_value::<AttachRequest>(json!({"mode": "read_only", "host": "h", "x": 1})).is_err());
    assert!(serde_json::from_value::<AttachRequest>(json!({"mode": "rw", "host": "h"})).is_err());
}

#[test]
fn the_error_body_has_one_shape() {
    let e: ErrorBody =
        serde_json::from_value(json!({"error": {"code": "not_found", "message": "no volume 3"}})).unwrap();
    assert_eq!(e.error.code, ErrorCode::NotFound);
    assert_eq!(e.error.code.http_status(), 404);
}
