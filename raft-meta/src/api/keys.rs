//! Key management endpoints: re-keying the root with fresh randomness.

use super::{ApiError, ApiState, Caller, ErrorBody};
use crate::state::command::{Command, ErrorCode, Refusal};
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use std::sync::Arc;
use utoipa::OpenApi;

type S = State<Arc<ApiState>>;

/// Proposals raced by a shred or another rotation are retried this often.
const ROTATE_RETRIES: usize = 5;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/cluster/rotate-root", post(rotate_root))
}

#[utoipa::path(post, path = "/v1/cluster/rotate-root", tag = "cluster", security(("bearer" = [])),
    description = "Re-keys the root with fresh randomness (operators): every voter re-wraps every tenant key under the new root, stores it over its old root key file and purges its Raft log past the rotation.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn rotate_root(State(s): S, caller: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    let mut last = None;
    for _ in 0..ROTATE_RETRIES {
        let (wrapped_root, root_epoch) = s.handle.read(crate::machine::SlateMachine::wrap_fresh_root).await?;
        match s.call(&caller, Command::RotateRoot { wrapped_root, root_epoch }).await {
            Err(ApiError(r)) if r.code == ErrorCode::KeyRotated => {
                last = Some(r);
                s.handle.read_barrier().await?;
            }
            other => return Ok(Json(other?.body)),
        }
    }
    Err(ApiError(last.unwrap_or_else(|| Refusal::new(ErrorCode::Unavailable, "root rotation raced every retry"))))
}

/// This module's part of the OpenAPI description.
#[derive(OpenApi)]
#[openapi(paths(rotate_root))]
#[derive(Debug)]
pub struct KeysDoc;
