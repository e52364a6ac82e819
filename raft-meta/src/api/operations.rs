//! Endpoints of the operator flows: drain, decommission and its certificate,
//! scrub, and the reports storage nodes and clients send while these run.

use super::handlers::sign;
use super::holder::HolderOf;
use super::{ApiError, ApiJson, ApiPath, ApiState, Caller, ErrorBody};
use crate::state::command::{Command, ErrorCode, RebuildProgressRequest, SnapshotFrozenRequest};
use crate::state::view::{CapabilityClaims, DecommissionView, DrainView};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use slate_protocol::ops::{DecommissionReport, MoveReport, RepairSourceRequest, ScrubReport};
use slate_protocol::{Holder, Rights};
use std::sync::Arc;
use utoipa::OpenApi;

type S = State<Arc<ApiState>>;
type JsonResult = Result<Json<serde_json::Value>, ApiError>;

/// Lifetime of a mover's capability; the task is handed out again with every heartbeat.
const MOVER_CAPABILITY_SECS: u64 = 3600;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/nodes/:id/drain", post(drain_node).get(get_drain))
        .route("/v1/disks/:id/drain", post(drain_disk))
        .route("/v1/nodes/:id/moves/:mid", post(report_move))
        .route("/v1/volumes/:id/rebuild-progress", post(rebuild_progress))
        .route("/v1/disks/:id/decommission", post(decommission).get(get_decommission))
        .route("/v1/disks/:id/decommission-report", post(report_decommission))
        .route("/v1/disks/:id/certificate", get(certificate))
        .route("/v1/nodes/:id/scrub", post(request_scrub))
        .route("/v1/nodes/:id/scrub-report", post(report_scrub))
        .route("/v1/nodes/:id/repair-source", post(repair_source))
        .route("/v1/volumes/:id/snapshots/:sid/frozen", post(snapshot_frozen))
}

async fn call(s: &ApiState, caller: &Caller, cmd: Command) -> JsonResult {
    Ok(Json(s.call(caller, cmd).await?.body))
}

/// Fills in the capability of every copy task in a heartbeat reply: read and write
/// on the volume, at the generation the task names, on the source and this node.
pub(super) fn sign_copy_tasks(
    s: &ApiState,
    node: u64,
    holder: Holder,
    body: &mut serde_json::Value,
) -> Result<(), ApiError> {
    let Some(copies) = body.pointer_mut("/work/copies").and_then(|c| c.as_array_mut()) else { return Ok(()) };
    for c in copies {
        let get = |k: &str| c[k].as_u64().ok_or_else(|| ApiError::new(ErrorCode::Internal, format!("copy task {k}")));
        let claims = CapabilityClaims {
            volume: get("volume")?,
            generation: get("generation")?,
            rights: Rights::READ_WRITE.union(Rights::ADMIN).bits(),
            nodes: vec![get("source_node")?, node],
            ttl_secs: MOVER_CAPABILITY_SECS,
            size_blocks: u64::MAX,
            segments: u64::MAX,
        };
        c["capability"] = serde_json::Value::String(sign(s, &claims, holder)?.token);
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/nodes/{id}/drain", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)),
    description = "Moves every replica off the node (copy, then cut over; never below R in-sync copies). Refused, changing nothing, when some replica would have nowhere to go.",
    responses((status = 200, body = DrainView), (status = "4XX", body = ErrorBody)))]
async fn drain_node(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::DrainNode { node: id }).await
}

#[utoipa::path(get, path = "/v1/nodes/{id}/drain", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)), responses((status = 200, body = DrainView), (status = "4XX", body = ErrorBody)))]
async fn get_drain(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::GetDrain { node: id }).await
}

#[utoipa::path(post, path = "/v1/disks/{id}/drain", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)),
    description = "Drains the disk's node (a node has one disk today).",
    responses((status = 200, body = DrainView), (status = "4XX", body = ErrorBody)))]
async fn drain_disk(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::DrainDisk { disk: id }).await
}

#[utoipa::path(post, path = "/v1/nodes/{id}/moves/{mid}", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path), ("mid" = u64, Path)), request_body(content = serde_json::Value),
    description = "A mover reports progress on a drain copy, or that it copied everything under a generation.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn report_move(
    State(s): S,
    caller: Caller,
    ApiPath((id, mid)): ApiPath<(u64, u64)>,
    ApiJson(report): ApiJson<MoveReport>,
) -> JsonResult {
    call(&s, &caller, Command::ReportMove { node: id, id: mid, report }).await
}

#[utoipa::path(post, path = "/v1/volumes/{id}/rebuild-progress", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body = RebuildProgressRequest,
    description = "The client rebuilding a replica reports how far it got (shown by volume show).",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn rebuild_progress(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<RebuildProgressRequest>,
) -> JsonResult {
    call(&s, &caller, Command::RebuildProgress { volume: id, req }).await
}

#[utoipa::path(post, path = "/v1/disks/{id}/decommission", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)),
    description = "Overwrites every byte of a drained disk, reads it back, and issues a signed erase certificate. Refused while the disk holds replicas.",
    responses((status = 200, body = DecommissionView), (status = "4XX", body = ErrorBody)))]
async fn decommission(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::DecommissionDisk { disk: id }).await
}

#[utoipa::path(get, path = "/v1/disks/{id}/decommission", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)), responses((status = 200, body = DecommissionView), (status = "4XX", body = ErrorBody)))]
async fn get_decommission(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::GetDecommission { disk: id }).await
}

#[utoipa::path(post, path = "/v1/disks/{id}/decommission-report", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body(content = serde_json::Value),
    description = "The disk's node reports progress, the measured erasure, or a failure.",
    responses((status = 200, body = DecommissionView), (status = "4XX", body = ErrorBody)))]
async fn report_decommission(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(report): ApiJson<DecommissionReport>,
) -> JsonResult {
    call(&s, &caller, Command::ReportDecommission { disk: id, report }).await
}

#[utoipa::path(get, path = "/v1/disks/{id}/certificate", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)),
    description = "The erase certificate of a decommissioned disk, signed with the cluster's key: `text` is the file to keep (check it with `slate certificate verify`).",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn certificate(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    let r = s.call(&caller, Command::GetCertificate { disk: id }).await?.body;
    let body = r.get("certificate").cloned().unwrap_or_default();
    let text = slate_protocol::certificate::render_document(&body, &s.signing_key);
    Ok(Json(serde_json::json!({"sha256": r["sha256"], "text": text})))
}

#[utoipa::path(post, path = "/v1/nodes/{id}/scrub", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)), description = "Asks the node to start a scrub pass now.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn request_scrub(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::RequestScrub { node: id }).await
}

#[utoipa::path(post, path = "/v1/nodes/{id}/scrub-report", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body(content = serde_json::Value),
    description = "The node reports scrub progress and what it found and repaired.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn report_scrub(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(report): ApiJson<ScrubReport>,
) -> JsonResult {
    call(&s, &caller, Command::ReportScrub { node: id, report }).await
}

#[utoipa::path(post, path = "/v1/nodes/{id}/repair-source", tag = "operations", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body(content = serde_json::Value),
    description = "A node that found a corrupt block asks where the segment's in-sync peers are; the reply carries a read capability for them.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn repair_source(
    State(s): S,
    caller: Caller,
    HolderOf(holder): HolderOf,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<RepairSourceRequest>,
) -> JsonResult {
    let mut body = s.call(&caller, Command::RepairSource { node: id, req }).await?.body;
    let peers: Vec<u64> = body["peers"].as_array().into_iter().flatten().filter_map(|p| p["node"].as_u64()).collect();
    if !peers.is_empty() {
        let claims = CapabilityClaims {
            volume: body["volume"].as_u64().unwrap_or_default(),
            generation: body["generation"].as_u64().unwrap_or_default(),
            rights: Rights::READ.bits(),
            nodes: peers,
            ttl_secs: MOVER_CAPABILITY_SECS,
            size_blocks: u64::MAX,
            segments: u64::MAX,
        };
        body["capability"] = serde_json::Value::String(sign(&s, &claims, holder)?.token);
    }
    Ok(Json(body))
}

#[utoipa::path(post, path = "/v1/volumes/{id}/snapshots/{sid}/frozen", tag = "snapshots", security(("bearer" = [])),
    params(("id" = u64, Path), ("sid" = u64, Path)), request_body = SnapshotFrozenRequest,
    description = "The read-write client froze every replica at the snapshot's epoch (no `node`), or a node froze its replicas of a detached volume (`node`). The snapshot becomes ready when every replica is frozen.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn snapshot_frozen(
    State(s): S,
    caller: Caller,
    ApiPath((id, sid)): ApiPath<(u64, u64)>,
    ApiJson(req): ApiJson<SnapshotFrozenRequest>,
) -> JsonResult {
    call(&s, &caller, Command::SnapshotFrozen { volume: id, snapshot: sid, req }).await
}

/// This module's part of the OpenAPI description.
#[derive(OpenApi)]
#[openapi(paths(
    drain_node,
    get_drain,
    drain_disk,
    report_move,
    rebuild_progress,
    decommission,
    get_decommission,
    report_decommission,
    certificate,
    request_scrub,
    report_scrub
))]
#[derive(Debug)]
pub struct OperationsDoc;
