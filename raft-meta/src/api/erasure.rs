//! Endpoints of the release queue and of erasure records: storage nodes report
//! their releases here; operators and tenant admins follow a deleted volume's
//! erasure until it is complete.

use super::{ApiJson, ApiPath, ApiQuery, ApiState, Caller, ErrorBody};
use crate::state::command::Command;
use crate::state::view::{ErasureView, ReleaseView};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use slate_protocol::ops::ReleaseReport;
use std::sync::Arc;
use utoipa::{IntoParams, OpenApi};

type S = State<Arc<ApiState>>;
type JsonResult = Result<Json<serde_json::Value>, super::ApiError>;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/nodes/:id/releases/:rid", post(report_release))
        .route("/v1/releases", get(list_releases))
        .route("/v1/erasures", get(list_erasures))
        .route("/v1/erasures/:volume", get(get_erasure))
}

async fn call(s: &ApiState, caller: &Caller, cmd: Command) -> JsonResult {
    Ok(Json(s.call(caller, cmd).await?.body))
}

#[utoipa::path(post, path = "/v1/nodes/{id}/releases/{rid}", tag = "erasure", security(("bearer" = [])),
    params(("id" = u64, Path), ("rid" = u64, Path)),
    request_body(content = serde_json::Value, description = "`{\"phase\":\"released\",\"extents\":[...]}` or `{\"phase\":\"erased\",\"verified\":N,\"failed\":N}`"),
    description = "A storage node reports a release task: its extents are journaled dirty (released), then every one of them was read back as zeros (erased).",
    responses((status = 200, body = ReleaseView), (status = "4XX", body = ErrorBody)))]
async fn report_release(
    State(s): S,
    caller: Caller,
    ApiPath((id, rid)): ApiPath<(u64, u64)>,
    ApiJson(report): ApiJson<ReleaseReport>,
) -> JsonResult {
    call(&s, &caller, Command::ReportRelease { node: id, release: rid, report }).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ReleaseQuery {
    /// Only this storage node's entries.
    node: Option<u64>,
}

#[utoipa::path(get, path = "/v1/releases", tag = "erasure", security(("bearer" = [])), params(ReleaseQuery),
    description = "The release queue and its history (operators).",
    responses((status = 200, body = [ReleaseView]), (status = "4XX", body = ErrorBody)))]
async fn list_releases(State(s): S, caller: Caller, ApiQuery(q): ApiQuery<ReleaseQuery>) -> JsonResult {
    call(&s, &caller, Command::ListReleases { node: q.node }).await
}

#[utoipa::path(get, path = "/v1/erasures", tag = "erasure", security(("bearer" = [])),
    description = "Deleted volumes the caller may see, with the progress of their erasure.",
    responses((status = 200, body = [ErasureView]), (status = "4XX", body = ErrorBody)))]
async fn list_erasures(State(s): S, caller: Caller) -> JsonResult {
    call(&s, &caller, Command::ListErasures).await
}

#[utoipa::path(get, path = "/v1/erasures/{volume}", tag = "erasure", security(("bearer" = [])),
    params(("volume" = u64, Path)),
    description = "One deleted volume's erasure: per replica, extents released and verified zero; per metadata voter, whether it purged the volume's key. `state` is `complete` only when all of them are done.",
    responses((status = 200, body = ErasureView), (status = "4XX", body = ErrorBody)))]
async fn get_erasure(State(s): S, caller: Caller, ApiPath(volume): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::GetErasure { volume }).await
}

/// This module's part of the OpenAPI description.
#[derive(OpenApi)]
#[openapi(paths(report_release, list_releases, list_erasures, get_erasure))]
#[derive(Debug)]
pub struct ErasureDoc;
