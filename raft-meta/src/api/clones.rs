//! Endpoints of clones: make a clone of a ready snapshot, and mark a clone
//! flattened once its client copied what it read from its parent. The parent
//! part of a clone's attach reply and capability refresh is signed here too.

use super::handlers::sign;
use super::{ApiError, ApiJson, ApiPath, ApiState, Caller, ErrorBody};
use crate::state::clones::{validate_create_clone, CreateCloneRequest, FlattenedRequest, ParentGrant};
use crate::state::command::Command;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use slate_protocol::api::{ParentAttach, VolumeView};
use std::sync::Arc;
use utoipa::OpenApi;

type S = State<Arc<ApiState>>;
type JsonResult = Result<Json<serde_json::Value>, ApiError>;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/volumes/:id/clones", post(create_clone))
        .route("/v1/volumes/:id/flattened", post(flattened))
}

/// Signs the parent part of an attach or refresh.
pub(super) fn sign_parent(
    s: &ApiState,
    grant: Option<ParentGrant>,
    holder: slate_protocol::Holder,
) -> Result<Option<ParentAttach>, ApiError> {
    let Some(g) = grant else { return Ok(None) };
    let capability = sign(s, &g.claims, holder)?;
    Ok(Some(ParentAttach {
        volume: g.volume,
        snapshot: g.snapshot,
        snapshot_name: g.snapshot_name,
        epoch: g.epoch,
        size_bytes: g.size_bytes,
        capability,
    }))
}

#[utoipa::path(post, path = "/v1/volumes/{id}/clones", tag = "clones", security(("bearer" = [])),
    params(("id" = u64, Path, description = "The parent volume")), request_body = CreateCloneRequest,
    description = "Makes a writable clone of a ready snapshot of the volume. Nothing is copied: the clone reads through the snapshot wherever it has not written, with the parent's DEK re-wrapped under the clone's tenant key. Needs a snapshot or backup right on the parent and the admin of the clone's tenant.",
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody)))]
async fn create_clone(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CreateCloneRequest>,
) -> JsonResult {
    validate_create_clone(&req)?;
    Ok(Json(s.call(&caller, Command::CreateClone { volume: id, req }).await?.body))
}

#[utoipa::path(post, path = "/v1/volumes/{id}/flattened", tag = "clones", security(("bearer" = [])),
    params(("id" = u64, Path, description = "The clone")), request_body = FlattenedRequest,
    description = "The clone's read-write client copied every block it still read from its parent: the clone no longer reads through the parent's snapshot. Only that attachment's holder may call it; refused while the clone has snapshots of its own.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn flattened(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<FlattenedRequest>,
) -> JsonResult {
    Ok(Json(s.call(&caller, Command::CloneFlattened { volume: id, req }).await?.body))
}

/// This module's part of the OpenAPI description.
#[derive(OpenApi)]
#[openapi(paths(create_clone, flattened), components(schemas(ParentAttach)))]
#[derive(Debug)]
pub struct ClonesDoc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_description_names_the_clone_endpoints() {
        let mut doc = super::super::ApiDoc::openapi();
        doc.merge(ClonesDoc::openapi());
        let v = serde_json::to_value(&doc).unwrap();
        for path in ["/v1/volumes/{id}/clones", "/v1/volumes/{id}/flattened"] {
            assert!(v["paths"][path]["post"].is_object(), "{path} missing");
        }
        assert!(v["components"]["schemas"]["CreateCloneRequest"].is_object());
        assert!(v["components"]["schemas"]["VolumeView"]["properties"]["parent"].is_object());
    }
}
