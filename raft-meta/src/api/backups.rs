//! Endpoints of backups and restores. The CLI moves the data; slate-meta keeps
//! the records, checks a completed backup's manifest against its record and signs
//! it with the cluster key, and creates restore volumes with the source's key
//! re-wrapped for them (see `state/backups.rs`).

use super::{ApiError, ApiJson, ApiPath, ApiState, Caller, ErrorBody};
use crate::state::command::{
    BeginBackupRequest, Command, CompleteBackupRequest, ErrorCode, Refusal, RestoreProgressRequest,
    RestoreVolumeRequest,
};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use slate_protocol::api::{Backup, BackupState, CompletedBackup, RestoreReply};
use slate_protocol::backup::Manifest;
use slate_protocol::certificate::{body_sha256, render_signed, BACKUP_MANIFEST};
use std::sync::Arc;
use utoipa::OpenApi;

type S = State<Arc<ApiState>>;
type JsonResult = Result<Json<serde_json::Value>, ApiError>;

/// Largest manifest accepted: about 1,000 bytes per 4 MiB of changed data, so 64 MiB
/// covers a backup of some 250 GiB of changed blocks (see docs/design/backups.md).
const MAX_MANIFEST_BYTES: usize = 64 << 20;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route(
            "/v1/backups/:bid/complete",
            post(complete_backup).layer(axum::extract::DefaultBodyLimit::max(MAX_MANIFEST_BYTES)),
        )
        .route("/v1/volumes/:id/backups", post(begin_backup).get(list_volume_backups))
        .route("/v1/backups", get(list_backups))
        .route("/v1/backups/:bid", get(get_backup))
        .route("/v1/restores", post(restore_volume))
        .route("/v1/volumes/:id/restore-progress", post(restore_progress))
}

async fn call(s: &ApiState, caller: &Caller, cmd: Command) -> JsonResult {
    Ok(Json(s.call(caller, cmd).await?.body))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, msg)
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

#[utoipa::path(post, path = "/v1/volumes/{id}/backups", tag = "backups", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body = BeginBackupRequest,
    description = "Begins a backup of a ready snapshot (or returns the unfinished one of the same snapshot, target and base, to resume). Needs the backup grant or the tenant's admin.",
    responses((status = 200, body = Backup), (status = "4XX", body = ErrorBody)))]
async fn begin_backup(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<BeginBackupRequest>,
) -> JsonResult {
    call(&s, &caller, Command::BeginBackup { volume: id, req }).await
}

#[utoipa::path(get, path = "/v1/volumes/{id}/backups", tag = "backups", security(("bearer" = [])),
    params(("id" = u64, Path)), responses((status = 200, body = [Backup]), (status = "4XX", body = ErrorBody)))]
async fn list_volume_backups(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::ListBackups { volume: Some(id) }).await
}

#[utoipa::path(get, path = "/v1/backups", tag = "backups", security(("bearer" = [])),
    description = "Every backup the caller may read, including those of deleted volumes.",
    responses((status = 200, body = [Backup]), (status = "4XX", body = ErrorBody)))]
async fn list_backups(State(s): S, caller: Caller) -> JsonResult {
    call(&s, &caller, Command::ListBackups { volume: None }).await
}

#[utoipa::path(get, path = "/v1/backups/{bid}", tag = "backups", security(("bearer" = [])),
    params(("bid" = u64, Path)), responses((status = 200, body = Backup), (status = "4XX", body = ErrorBody)))]
async fn get_backup(State(s): S, caller: Caller, ApiPath(bid): ApiPath<u64>) -> JsonResult {
    call(&s, &caller, Command::GetBackup { backup: bid }).await
}

/// Checks a manifest against its backup's record (and its parent's).
fn check_manifest(m: &Manifest, b: &Backup, parent: Option<&Backup>) -> Result<(), ApiError> {
    m.check().map_err(|e| bad(e.to_string()))?;
    let expect =
        |ok: bool, what: &str| if ok { Ok(()) } else { Err(bad(format!("the manifest's {what} is not the backup's"))) };
    expect(m.backup == b.id, "backup id")?;
    expect(m.volume.id == b.volume && m.volume.tenant == b.tenant, "volume")?;
    expect(m.snapshot.id == b.snapshot && m.snapshot.epoch == b.epoch, "snapshot")?;
    expect(m.key_fingerprint == b.key_fingerprint, "key fingerprint")?;
    match (&m.parent, parent) {
        (None, None) => Ok(()),
        (Some(p), Some(pb)) => {
            expect(p.backup == pb.id, "parent")?;
            expect(pb.manifest_sha256.as_deref() == Some(p.manifest_sha256.as_str()), "parent manifest hash")
        }
        _ => Err(bad("the manifest's parent is not the backup's")),
    }
}

#[utoipa::path(post, path = "/v1/backups/{bid}/complete", tag = "backups", security(("bearer" = [])),
    params(("bid" = u64, Path)), request_body(content = serde_json::Value, description = "`{\"manifest\": MANIFEST}`"),
    description = "Completes a backup: the manifest is checked against the record and signed with the cluster's key; `text` is the signed manifest file to store in the target.",
    responses((status = 200, body = CompletedBackup), (status = "4XX", body = ErrorBody)))]
async fn complete_backup(
    State(s): S,
    caller: Caller,
    ApiPath(bid): ApiPath<u64>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> JsonResult {
    let manifest_value = body.get("manifest").cloned().ok_or_else(|| bad("no manifest"))?;
    let manifest: Manifest =
        serde_json::from_value(manifest_value.clone()).map_err(|e| bad(format!("manifest: {e}")))?;
    let b: Backup = decode(s.call(&caller, Command::GetBackup { backup: bid }).await?.body)?;
    let parent: Option<Backup> = match b.parent {
        Some(p) => Some(decode(s.call(&caller, Command::GetBackup { backup: p }).await?.body)?),
        None => None,
    };
    if parent.as_ref().is_some_and(|p| p.state != BackupState::Complete) {
        return Err(bad("the base backup is not complete"));
    }
    check_manifest(&manifest, &b, parent.as_ref())?;
    // Sign the manifest as parsed, so that the signed text holds nothing the check did not see.
    let canonical = serde_json::to_value(&manifest).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let sha = body_sha256(&canonical);
    let req = CompleteBackupRequest {
        manifest_sha256: sha.clone(),
        blocks_changed: manifest.blocks_changed,
        blocks_stored: manifest.blocks_stored,
        bytes_stored: manifest.bytes_stored,
    };
    let backup: Backup = decode(s.call(&caller, Command::CompleteBackup { backup: bid, req }).await?.body)?;
    let text = render_signed(BACKUP_MANIFEST, &canonical, &s.signing_key);
    let reply = CompletedBackup { backup, sha256: sha, text };
    Ok(Json(serde_json::to_value(reply).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?))
}

#[utoipa::path(post, path = "/v1/restores", tag = "backups", security(("bearer" = [])),
    request_body = RestoreVolumeRequest,
    description = "Creates the volume a backup restores into, with the backed-up volume's key re-wrapped for it; refused with \"key destroyed\" once that volume was deleted.",
    responses((status = 200, body = RestoreReply), (status = "4XX", body = ErrorBody)))]
async fn restore_volume(
    State(s): S,
    caller: Caller,
    ApiJson(req): ApiJson<RestoreVolumeRequest>,
) -> Result<super::secret_body::SecretJson, ApiError> {
    let bid = req.backup;
    let tenant = match req.tenant {
        Some(t) => t,
        None => s.handle.read(move |sm| sm.state().backups.get(&bid).map(|b| b.tenant)).await?.unwrap_or(0),
    };
    let mut last = None;
    for _ in 0..5 {
        // A fresh key for the new volume, wrapped under its tenant's key (as for a create).
        let prepared = s.handle.read(move |sm| sm.wrap_fresh_dek(tenant)).await?;
        let (wrapped_dek, tenant_key_version) = prepared.unwrap_or_default();
        let cmd = Command::RestoreVolume { req: req.clone(), wrapped_dek, tenant_key_version };
        match s.call(&caller, cmd).await {
            Err(ApiError(r)) if r.code == ErrorCode::KeyRotated => {
                last = Some(r);
                s.handle.read_barrier().await?;
            }
            other => {
                let r = other?;
                let mut body = r.body;
                // The backed-up volume's key, to decrypt the backup with (the reply is TLS only).
                let mut key =
                    r.dek_hex.ok_or_else(|| ApiError::new(ErrorCode::Internal, "restore reply without key"))?;
                // Moved into the reply, serialized into a wiped buffer, then wiped here too.
                body["source_dek_hex"] = serde_json::Value::String(std::mem::take(&mut *key));
                let reply = super::secret_body::SecretJson::new(&body);
                if let Some(serde_json::Value::String(k)) = body.get_mut("source_dek_hex") {
                    zeroize::Zeroize::zeroize(k);
                }
                return reply;
            }
        }
    }
    Err(ApiError(last.unwrap_or_else(|| Refusal::new(ErrorCode::Unavailable, "key rotation raced every retry"))))
}

#[utoipa::path(post, path = "/v1/volumes/{id}/restore-progress", tag = "backups", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body = RestoreProgressRequest,
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn restore_progress(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<RestoreProgressRequest>,
) -> JsonResult {
    call(&s, &caller, Command::RestoreProgress { volume: id, req }).await
}

/// This module's part of the OpenAPI description.
#[derive(OpenApi)]
#[openapi(paths(
    begin_backup,
    list_volume_backups,
    list_backups,
    get_backup,
    complete_backup,
    restore_volume,
    restore_progress
))]
#[derive(Debug)]
pub struct BackupsDoc;
