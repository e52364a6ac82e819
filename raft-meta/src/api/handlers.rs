//! The management API's handlers, one per endpoint, each documented for the
//! generated OpenAPI description. A handler validates its input, turns it into
//! a [`Command`], proposes it, and shapes the reply.

#![allow(clippy::wildcard_imports)]

use super::holder::HolderOf;
use super::{format_token, now_ms, ApiError, ApiJson, ApiPath, ApiQuery, ApiState, Caller, ErrorBody, Reply};
use crate::keys::{generate_token_secret, hash_secret, WrappedKey};
use crate::state::apply::{
    validate_create_volume, validate_principal, validate_register_node, validate_settings, validate_size,
};
use crate::state::command::*;
use crate::state::view::*;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use slate_protocol::api::{
    AttachReply, CapabilityRefresh, CapabilityView, MemberView, MetaRole, ReconfigureReply, StatusView,
};
use slate_protocol::capability::MAX_SCOPE_NODES;
use slate_protocol::{Capability, Generation, Holder, NodeId, Rights, VolumeId};
use std::sync::Arc;
use std::time::Instant;
use utoipa::{IntoParams, OpenApi};

type S = State<Arc<ApiState>>;
type JsonResult = Result<Json<serde_json::Value>, ApiError>;

/// How often a proposal whose wrapped key went stale (a shred or rotation raced it) is retried.
const KEY_RETRIES: usize = 5;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/whoami", get(whoami))
        .route("/v1/settings", get(get_settings).patch(update_settings))
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/tenants/:id", get(get_tenant).delete(delete_tenant))
        .route("/v1/tenants/:id/rotate-key", post(rotate_tenant_key))
        .route("/v1/principals", post(create_principal).get(list_principals))
        .route("/v1/principals/:id", get(get_principal).delete(delete_principal))
        .route("/v1/principals/:id/unlock", post(unlock_principal))
        .route("/v1/principals/:id/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/:id", delete(revoke_token))
        .route("/v1/grants", post(create_grant).get(list_grants))
        .route("/v1/grants/:id", delete(delete_grant))
        .route("/v1/nodes", post(register_node).get(list_nodes))
        .route("/v1/nodes/:id", get(get_node))
        .route("/v1/nodes/:id/heartbeat", post(heartbeat))
        .route("/v1/nodes/:id/state", post(set_node_state))
        .route("/v1/disks", get(list_disks))
        .route("/v1/volumes", post(create_volume).get(list_volumes))
        .route("/v1/volumes/:id", get(get_volume).delete(delete_volume))
        .route("/v1/volumes/:id/resize", post(resize_volume))
        .route("/v1/volumes/:id/attach", post(attach))
        .route("/v1/volumes/:id/detach", post(detach))
        .route("/v1/volumes/:id/attachments/:aid/capability", post(refresh_capability))
        .route("/v1/volumes/:id/report-failure", post(report_failure))
        .route("/v1/volumes/:id/mark-in-sync", post(mark_in_sync))
        .route("/v1/volumes/:id/snapshots", post(create_snapshot).get(list_snapshots))
        .route("/v1/volumes/:id/snapshots/:sid", delete(delete_snapshot))
        .route("/v1/audit", get(list_audit))
        .route("/v1/audit/verify", get(verify_audit))
        .route("/v1/cluster/members", get(list_members).post(add_member))
        .route("/v1/cluster/members/:id", delete(remove_member))
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint; see /openapi.json")
}

#[allow(clippy::unnecessary_wraps)]
fn ok(r: Reply) -> JsonResult {
    Ok(Json(r.body))
}

async fn simple(s: &ApiState, caller: &Caller, cmd: Command) -> JsonResult {
    ok(s.call(caller, cmd).await?)
}

// ----- meta -----

async fn openapi_json() -> impl IntoResponse {
    let mut doc = super::ApiDoc::openapi();
    doc.merge(super::erasure::ErasureDoc::openapi());
    doc.merge(super::keys::KeysDoc::openapi());
    doc.merge(super::backups::BackupsDoc::openapi());
    doc.merge(super::clones::ClonesDoc::openapi());
    doc.merge(super::operations::OperationsDoc::openapi());
    Json(doc)
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

async fn metrics(State(s): S) -> impl IntoResponse {
    let st = s.handle.status();
    let m = &s.metrics;
    m.term.set(gauge(st.term));
    m.commit_index.set(gauge(st.commit));
    m.applied_index.set(gauge(st.applied));
    m.apply_lag.set(gauge(st.commit.saturating_sub(st.applied)));
    m.leader_id.set(gauge(st.leader_id));
    m.is_leader.set(i64::from(st.role == crate::consensus::Role::Leader));
    let counts = s
        .handle
        .read(|sm| {
            let st = sm.state();
            (
                st.nodes_by_state(),
                st.volumes.len(),
                st.tenants.len(),
                st.volumes.values().map(|v| v.attachments.len()).sum::<usize>(),
                st.audit.records.len(),
                st.root_epoch,
            )
        })
        .await;
    if let Ok((nodes, volumes, tenants, attachments, audit, epoch)) = counts {
        for state in crate::state::types::NodeState::ALL {
            m.nodes.get_or_create(&crate::metrics::StateLabel { state: state.as_str().into() }).set(0);
        }
        for (state, n) in nodes {
            m.nodes.get_or_create(&crate::metrics::StateLabel { state: state.as_str().into() }).set(gauge(n));
        }
        m.volumes.set(gauge(volumes as u64));
        m.tenants.set(gauge(tenants as u64));
        m.attachments.set(gauge(attachments as u64));
        m.audit_records.set(gauge(audit as u64));
        m.root_epoch.set(gauge(epoch));
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.render())
}

fn meta_role(r: crate::consensus::Role) -> MetaRole {
    use crate::consensus::Role;
    match r {
        Role::Follower => MetaRole::Follower,
        Role::PreCandidate => MetaRole::PreCandidate,
        Role::Candidate => MetaRole::Candidate,
        Role::Leader => MetaRole::Leader,
        Role::Failed => MetaRole::Failed,
    }
}

#[utoipa::path(get, path = "/v1/status", tag = "cluster", responses((status = 200, body = StatusView)))]
async fn status(State(s): S) -> Result<Json<StatusView>, ApiError> {
    let st = s.handle.status();
    let (bootstrapped, root_epoch, root_key_epoch, root_generation, dek_unwraps) = s
        .handle
        .read(|sm| {
            let st = sm.state();
            (st.bootstrapped, st.root_epoch, sm.root_epoch(), sm.root_generation(), sm.dek_unwraps())
        })
        .await?;
    Ok(Json(StatusView {
        node_id: s.node_id,
        role: meta_role(st.role),
        term: st.term,
        commit_index: st.commit,
        applied_index: st.applied,
        leader_id: st.leader_id,
        leader_api: s.leader_api().map(|a| a.to_string()),
        members: st.peers.iter().map(|(id, a)| MemberView { id: *id, raft_addr: a.map(|a| a.to_string()) }).collect(),
        bootstrapped,
        root_epoch,
        root_key_epoch,
        root_generation,
        dek_unwraps,
        snapshot_index: st.snapshot_index,
        first_log_index: st.first_index,
        last_log_index: st.last_index,
    }))
}

#[utoipa::path(get, path = "/v1/whoami", tag = "principals", security(("bearer" = [])),
    responses((status = 200, body = PrincipalView), (status = "4XX", body = ErrorBody)))]
async fn whoami(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::WhoAmI).await
}

#[utoipa::path(get, path = "/v1/settings", tag = "cluster", security(("bearer" = [])),
    responses((status = 200, body = SettingsView), (status = "4XX", body = ErrorBody)))]
async fn get_settings(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::GetSettings).await
}

#[utoipa::path(patch, path = "/v1/settings", tag = "cluster", security(("bearer" = [])), request_body = UpdateSettingsRequest,
    responses((status = 200, body = SettingsView), (status = "4XX", body = ErrorBody)))]
async fn update_settings(State(s): S, caller: Caller, ApiJson(req): ApiJson<UpdateSettingsRequest>) -> JsonResult {
    validate_settings(&req)?;
    simple(&s, &caller, Command::UpdateSettings(req)).await
}

// ----- tenants -----

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", security(("bearer" = [])), request_body = CreateTenantRequest,
    responses((status = 200, body = TenantView), (status = "4XX", body = ErrorBody)))]
async fn create_tenant(State(s): S, caller: Caller, ApiJson(req): ApiJson<CreateTenantRequest>) -> JsonResult {
    crate::state::apply::validate_name("tenant name", &req.name, &[])?;
    let mut last = None;
    for _ in 0..KEY_RETRIES {
        let (wrapped_key, root_epoch) = s.handle.read(crate::machine::SlateMachine::wrap_fresh_tenant_key).await?;
        match s.call(&caller, Command::CreateTenant { req: req.clone(), wrapped_key, root_epoch }).await {
            Err(ApiError(r)) if r.code == ErrorCode::KeyRotated => {
                last = Some(r);
                s.handle.read_barrier().await?;
            }
            other => return ok(other?),
        }
    }
    Err(ApiError(last.unwrap_or_else(|| Refusal::new(ErrorCode::Unavailable, "key rotation raced every retry"))))
}

#[utoipa::path(get, path = "/v1/tenants", tag = "tenants", security(("bearer" = [])),
    responses((status = 200, body = [TenantView]), (status = "4XX", body = ErrorBody)))]
async fn list_tenants(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::ListTenants).await
}

#[utoipa::path(get, path = "/v1/tenants/{id}", tag = "tenants", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200, body = TenantView), (status = "4XX", body = ErrorBody)))]
async fn get_tenant(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::GetTenant { tenant: id }).await
}

#[utoipa::path(delete, path = "/v1/tenants/{id}", tag = "tenants", security(("bearer" = [])), params(("id" = u64, Path)),
    description = "Deletes the tenant with all its volumes, principals and grants, and crypto-shreds its key.",
    responses((status = 200, body = ShredReport), (status = "4XX", body = ErrorBody)))]
async fn delete_tenant(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::DeleteTenant { tenant: id }).await
}

#[utoipa::path(post, path = "/v1/tenants/{id}/rotate-key", tag = "tenants", security(("bearer" = [])), params(("id" = u64, Path)),
    description = "Replaces the tenant key by a fresh one and re-wraps every volume key of the tenant.",
    responses((status = 200, body = TenantView), (status = "4XX", body = ErrorBody)))]
async fn rotate_tenant_key(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    let mut last = None;
    for _ in 0..KEY_RETRIES {
        let (wrapped_key, root_epoch) = s.handle.read(crate::machine::SlateMachine::wrap_fresh_tenant_key).await?;
        match s.call(&caller, Command::RotateTenantKey { tenant: id, wrapped_key, root_epoch }).await {
            Err(ApiError(r)) if r.code == ErrorCode::KeyRotated => {
                last = Some(r);
                s.handle.read_barrier().await?;
            }
            other => return ok(other?),
        }
    }
    Err(ApiError(last.unwrap_or_else(|| Refusal::new(ErrorCode::Unavailable, "key rotation raced every retry"))))
}

// ----- principals and tokens -----

#[utoipa::path(post, path = "/v1/principals", tag = "principals", security(("bearer" = [])), request_body = CreatePrincipalRequest,
    description = "Creates a principal and its first token; the token is shown once in the reply.",
    responses((status = 200, body = IssuedToken), (status = "4XX", body = ErrorBody)))]
async fn create_principal(State(s): S, caller: Caller, ApiJson(req): ApiJson<CreatePrincipalRequest>) -> JsonResult {
    validate_principal(&req)?;
    let secret = generate_token_secret();
    let token_secret_sha256 = hex::encode(hash_secret(secret.as_ref()));
    let token_id = Some(super::random_token_id());
    let r = s.call(&caller, Command::CreatePrincipal { req, token_secret_sha256, token_id }).await?;
    issued(r, &secret)
}

fn issued(r: Reply, secret: &[u8; 32]) -> JsonResult {
    let mut issued: IssuedToken =
        serde_json::from_value(r.body).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    issued.token = Some(format_token(issued.token_id, secret).to_string());
    Ok(Json(serde_json::to_value(issued).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?))
}

#[utoipa::path(get, path = "/v1/principals", tag = "principals", security(("bearer" = [])),
    responses((status = 200, body = [PrincipalView]), (status = "4XX", body = ErrorBody)))]
async fn list_principals(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::ListPrincipals).await
}

#[utoipa::path(get, path = "/v1/principals/{id}", tag = "principals", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200, body = PrincipalView), (status = "4XX", body = ErrorBody)))]
async fn get_principal(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::GetPrincipal { principal: id }).await
}

#[utoipa::path(delete, path = "/v1/principals/{id}", tag = "principals", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn delete_principal(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::DeletePrincipal { principal: id }).await
}

#[utoipa::path(post, path = "/v1/principals/{id}/unlock", tag = "principals", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200, body = PrincipalView), (status = "4XX", body = ErrorBody)))]
async fn unlock_principal(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::UnlockPrincipal { principal: id }).await
}

#[utoipa::path(post, path = "/v1/principals/{id}/tokens", tag = "principals", security(("bearer" = [])), params(("id" = u64, Path)),
    request_body = CreateTokenRequest,
    responses((status = 200, body = IssuedToken), (status = "4XX", body = ErrorBody)))]
async fn create_token(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> JsonResult {
    let secret = generate_token_secret();
    let secret_sha256 = hex::encode(hash_secret(secret.as_ref()));
    let token_id = Some(super::random_token_id());
    let r = s.call(&caller, Command::CreateToken { principal: id, req, secret_sha256, token_id }).await?;
    issued(r, &secret)
}

#[utoipa::path(get, path = "/v1/principals/{id}/tokens", tag = "principals", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200, body = [TokenView]), (status = "4XX", body = ErrorBody)))]
async fn list_tokens(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::ListTokens { principal: id }).await
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "principals", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn revoke_token(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::RevokeToken { token: id }).await
}

// ----- grants -----

#[utoipa::path(post, path = "/v1/grants", tag = "grants", security(("bearer" = [])), request_body = CreateGrantRequest,
    responses((status = 200, body = GrantView), (status = "4XX", body = ErrorBody)))]
async fn create_grant(State(s): S, caller: Caller, ApiJson(req): ApiJson<CreateGrantRequest>) -> JsonResult {
    simple(&s, &caller, Command::CreateGrant(req)).await
}

#[utoipa::path(get, path = "/v1/grants", tag = "grants", security(("bearer" = [])),
    responses((status = 200, body = [GrantView]), (status = "4XX", body = ErrorBody)))]
async fn list_grants(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::ListGrants).await
}

#[utoipa::path(delete, path = "/v1/grants/{id}", tag = "grants", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn delete_grant(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::DeleteGrant { grant: id }).await
}

// ----- storage nodes -----

#[utoipa::path(post, path = "/v1/nodes", tag = "nodes", security(("bearer" = [])), request_body = RegisterNodeRequest,
    responses((status = 200, body = NodeView), (status = "4XX", body = ErrorBody)))]
async fn register_node(State(s): S, caller: Caller, ApiJson(req): ApiJson<RegisterNodeRequest>) -> JsonResult {
    validate_register_node(&req)?;
    simple(&s, &caller, Command::RegisterNode(req)).await
}

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes", security(("bearer" = [])),
    responses((status = 200, body = [NodeView]), (status = "4XX", body = ErrorBody)))]
async fn list_nodes(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::ListNodes).await
}

#[utoipa::path(get, path = "/v1/nodes/{id}", tag = "nodes", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200, body = NodeView), (status = "4XX", body = ErrorBody)))]
async fn get_node(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::GetNode { node: id }).await
}

#[utoipa::path(post, path = "/v1/nodes/{id}/heartbeat", tag = "nodes", security(("bearer" = [])), params(("id" = u64, Path)),
    description = "Marks the storage node alive (operators or hosts) and returns its work. Served by the leader from memory (no Raft entry) unless the node was down; a follower answers 503 naming the leader. A node silent longer than the heartbeat timeout is marked down and its replicas are re-placed.",
    responses((status = 200), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn heartbeat(State(s): S, caller: Caller, HolderOf(holder): HolderOf, ApiPath(id): ApiPath<u64>) -> JsonResult {
    let mut body = if let Some(body) = s.heartbeat_in_memory(&caller, id).await? {
        body
    } else {
        // Down -> active, an unknown node, or a caller without the right: through the log
        // (the change, or the refusal, is audited).
        let body = s.call(&caller, Command::Heartbeat { node: id }).await?.body;
        s.record_heartbeat(id);
        body
    };
    super::operations::sign_copy_tasks(&s, id, holder, &mut body)?;
    Ok(Json(body))
}

#[utoipa::path(post, path = "/v1/nodes/{id}/state", tag = "nodes", security(("bearer" = [])), params(("id" = u64, Path)),
    request_body = SetNodeStateRequest,
    responses((status = 200, body = NodeView), (status = "4XX", body = ErrorBody)))]
async fn set_node_state(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<SetNodeStateRequest>,
) -> JsonResult {
    simple(&s, &caller, Command::SetNodeState { node: id, req }).await
}

#[utoipa::path(get, path = "/v1/disks", tag = "nodes", security(("bearer" = [])),
    responses((status = 200, body = [DiskView]), (status = "4XX", body = ErrorBody)))]
async fn list_disks(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::ListDisks).await
}

// ----- volumes -----

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", security(("bearer" = [])), request_body = CreateVolumeRequest,
    description = "Creates a volume: places every segment on R nodes in R distinct failure domains and wraps a fresh DEK under the tenant key.",
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody)))]
async fn create_volume(State(s): S, caller: Caller, ApiJson(req): ApiJson<CreateVolumeRequest>) -> JsonResult {
    validate_create_volume(&req)?;
    let started = Instant::now();
    let hint = match &caller.credential {
        Credential::Token { token, .. } => {
            let t = *token;
            s.handle.read(move |sm| sm.state().token_tenant(t)).await?
        }
        _ => None,
    };
    let tenant = match (req.tenant, hint, &caller.credential) {
        (Some(t), _, _) | (None, Some(t), _) => t,
        (None, None, Credential::Token { .. }) => {
            return Err(ApiError::new(ErrorCode::BadRequest, "tenant is required for principals without a tenant"))
        }
        (None, None, _) => 0,
    };
    let mut last = None;
    for _ in 0..KEY_RETRIES {
        let prepared = s.handle.read(move |sm| sm.wrap_fresh_dek(tenant)).await?;
        let (wrapped_dek, tenant_key_version) = prepared.unwrap_or((WrappedKey::default(), 0));
        let cmd = Command::CreateVolume { tenant, req: req.clone(), wrapped_dek, tenant_key_version };
        match s.call(&caller, cmd).await {
            Err(ApiError(r)) if r.code == ErrorCode::KeyRotated => {
                last = Some(r);
                s.handle.read_barrier().await?;
            }
            other => {
                let r = other?;
                s.metrics.create_volume_latency.observe(started.elapsed().as_secs_f64());
                return ok(r);
            }
        }
    }
    Err(ApiError(last.unwrap_or_else(|| Refusal::new(ErrorCode::Unavailable, "key rotation raced every retry"))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct VolumeFilter {
    /// Only volumes with this name.
    name: Option<String>,
    /// Only volumes of this tenant.
    tenant: Option<u64>,
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", security(("bearer" = [])), params(VolumeFilter),
    responses((status = 200, body = [VolumeView]), (status = "4XX", body = ErrorBody)))]
async fn list_volumes(State(s): S, caller: Caller, ApiQuery(f): ApiQuery<VolumeFilter>) -> JsonResult {
    let r = s.call(&caller, Command::ListVolumes).await?;
    let mut list = match r.body {
        serde_json::Value::Array(a) => a,
        other => return Ok(Json(other)),
    };
    list.retain(|v| f.name.as_deref().is_none_or(|n| v["name"] == n) && f.tenant.is_none_or(|t| v["tenant"] == t));
    Ok(Json(serde_json::Value::Array(list)))
}

#[utoipa::path(get, path = "/v1/volumes/{id}", tag = "volumes", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody)))]
async fn get_volume(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    // An attachment holder's layout poll (every 3 s per read-write client) was never audited;
    // it is answered after a read barrier, without a log entry. Every other read is proposed.
    if let Some(a) = caller.auth.clone() {
        let now = super::now_ms();
        let view = s
            .handle
            .linearizable_read(move |sm| sm.state().attached_layout(a.principal, &a.name, a.role, a.tenant, id, now))
            .await?;
        if let Some(v) = view {
            return Ok(Json(serde_json::to_value(v).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?));
        }
    }
    simple(&s, &caller, Command::GetVolume { volume: id }).await
}

#[utoipa::path(post, path = "/v1/volumes/{id}/resize", tag = "volumes", security(("bearer" = [])), params(("id" = u64, Path)),
    request_body = ResizeVolumeRequest,
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody)))]
async fn resize_volume(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<ResizeVolumeRequest>,
) -> JsonResult {
    validate_size(req.size_bytes)?;
    simple(&s, &caller, Command::ResizeVolume { volume: id, req }).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ForceQuery {
    /// Delete even with live attachments.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/volumes/{id}", tag = "volumes", security(("bearer" = [])), params(("id" = u64, Path), ForceQuery),
    description = "Deletes the volume and crypto-shreds its key (and so its snapshots and backups).",
    responses((status = 200, body = ShredReport), (status = "4XX", body = ErrorBody)))]
async fn delete_volume(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> JsonResult {
    simple(&s, &caller, Command::DeleteVolume { volume: id, force: q.force }).await
}

/// Signs `c` for `holder`: valid from now (nodes allow for clock skew) until the TTL runs out.
pub(super) fn sign(s: &ApiState, c: &CapabilityClaims, holder: Holder) -> Result<CapabilityView, ApiError> {
    if c.nodes.is_empty() || c.nodes.len() > MAX_SCOPE_NODES {
        return Err(ApiError::new(
            ErrorCode::Unsatisfiable,
            format!("a capability names 1 to {MAX_SCOPE_NODES} nodes; this volume spans {}", c.nodes.len()),
        ));
    }
    let rights = Rights::from_bits(c.rights).ok_or_else(|| ApiError::new(ErrorCode::Internal, "bad rights"))?;
    let now = now_ms() / 1000;
    let expires_unix_secs = now + c.ttl_secs;
    let cap = Capability {
        not_before_unix_secs: now,
        size_blocks: c.size_blocks,
        segments: c.segments,
        holder,
        volume: VolumeId(c.volume),
        generation: Generation(c.generation),
        rights,
        expires_unix_secs,
        nodes: c.nodes.iter().map(|n| NodeId(*n)).collect(),
    };
    let signed = cap.sign(&s.signing_key);
    Ok(CapabilityView {
        token: signed.to_token(),
        volume: c.volume,
        generation: c.generation,
        rights: c.rights,
        nodes: c.nodes.clone(),
        expires_unix_secs,
    })
}

#[utoipa::path(post, path = "/v1/volumes/{id}/attach", tag = "attachments", security(("bearer" = [])), params(("id" = u64, Path)),
    request_body = AttachRequest,
    description = "Attaches the volume. Read-write is exclusive and bumps the generation (force takes over and fences the holder); read-only attaches are shared. Returns the segment map, a signed capability and the volume key.",
    responses((status = 200, body = AttachReply), (status = "4XX", body = ErrorBody)))]
async fn attach(
    State(s): S,
    caller: Caller,
    HolderOf(holder): HolderOf,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<AttachRequest>,
) -> Result<super::secret_body::SecretJson, ApiError> {
    let started = Instant::now();
    let r = s.call(&caller, Command::Attach { volume: id, req }).await?;
    let mut dek = r.dek_hex.ok_or_else(|| ApiError::new(ErrorCode::Internal, "attach reply without key"))?;
    let grant: AttachGrant =
        serde_json::from_value(r.body).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let capability = sign(&s, &grant.claims, holder)?;
    let reply = AttachReply {
        attachment: grant.attachment,
        volume: grant.volume,
        capability,
        // Moved, not copied: the key's only buffer is wiped below, after serialization.
        dek_hex: std::mem::take(&mut *dek),
        verifying_key_hex: hex::encode(s.signing_key.verifying_key().as_bytes()),
        parent: super::clones::sign_parent(&s, grant.parent, holder)?,
    };
    let mut reply = reply;
    let body = super::secret_body::SecretJson::new(&reply);
    zeroize::Zeroize::zeroize(&mut reply.dek_hex);
    s.metrics.attach_latency.observe(started.elapsed().as_secs_f64());
    body
}

#[utoipa::path(post, path = "/v1/volumes/{id}/detach", tag = "attachments", security(("bearer" = [])), params(("id" = u64, Path)),
    request_body = DetachRequest,
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn detach(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<DetachRequest>,
) -> JsonResult {
    simple(&s, &caller, Command::Detach { volume: id, req }).await
}

#[utoipa::path(post, path = "/v1/volumes/{id}/attachments/{aid}/capability", tag = "attachments", security(("bearer" = [])),
    params(("id" = u64, Path), ("aid" = u64, Path)),
    description = "A fresh capability for a live attachment (same generation, current node scope); for a clone, with `parent` renewed as in the attach reply.",
    responses((status = 200, body = CapabilityRefresh), (status = "4XX", body = ErrorBody)))]
async fn refresh_capability(
    State(s): S,
    caller: Caller,
    HolderOf(holder): HolderOf,
    ApiPath((id, aid)): ApiPath<(u64, u64)>,
) -> JsonResult {
    let r = s.call(&caller, Command::RefreshCapability { volume: id, attachment: aid }).await?;
    let grant: crate::state::clones::RefreshGrant =
        serde_json::from_value(r.body).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = CapabilityRefresh {
        capability: sign(&s, &grant.claims, holder)?,
        parent: super::clones::sign_parent(&s, grant.parent, holder)?,
    };
    Ok(Json(serde_json::to_value(reply).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?))
}

#[utoipa::path(post, path = "/v1/volumes/{id}/report-failure", tag = "attachments", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body = ReportFailureRequest,
    description = "Reports a failed replica. The service puts a fresh replica (state rebuilding) on a node in a failure domain the survivors do not use and bumps the segment's epoch. The caller tells the new node (AssignSegment with its admin capability) and fills it from a survivor, then calls mark-in-sync.",
    responses((status = 200, body = ReconfigureReply), (status = "4XX", body = ErrorBody)))]
async fn report_failure(
    State(s): S,
    caller: Caller,
    HolderOf(holder): HolderOf,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<ReportFailureRequest>,
) -> JsonResult {
    let r = s.call(&caller, Command::ReportFailure { volume: id, req }).await?;
    let res: ReconfigureResult =
        serde_json::from_value(r.body).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let capability = res.claims.as_ref().map(|c| sign(&s, c, holder)).transpose()?;
    let reply = ReconfigureReply { replaced: res.replaced, new_node: res.new_node, segment: res.segment, capability };
    Ok(Json(serde_json::to_value(reply).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?))
}

#[utoipa::path(post, path = "/v1/volumes/{id}/mark-in-sync", tag = "attachments", security(("bearer" = [])),
    params(("id" = u64, Path)), request_body = MarkInSyncRequest,
    responses((status = 200, body = SegmentView), (status = "4XX", body = ErrorBody)))]
async fn mark_in_sync(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<MarkInSyncRequest>,
) -> JsonResult {
    simple(&s, &caller, Command::MarkInSync { volume: id, req }).await
}

#[utoipa::path(post, path = "/v1/volumes/{id}/snapshots", tag = "snapshots", security(("bearer" = [])), params(("id" = u64, Path)),
    request_body = CreateSnapshotRequest,
    description = "Records a snapshot and hands out its layer epoch; the client freezes the layer on the storage nodes.",
    responses((status = 200, body = SnapshotView), (status = "4XX", body = ErrorBody)))]
async fn create_snapshot(
    State(s): S,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CreateSnapshotRequest>,
) -> JsonResult {
    simple(&s, &caller, Command::CreateSnapshot { volume: id, req }).await
}

#[utoipa::path(get, path = "/v1/volumes/{id}/snapshots", tag = "snapshots", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200, body = [SnapshotView]), (status = "4XX", body = ErrorBody)))]
async fn list_snapshots(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    simple(&s, &caller, Command::ListSnapshots { volume: id }).await
}

#[utoipa::path(delete, path = "/v1/volumes/{id}/snapshots/{sid}", tag = "snapshots", security(("bearer" = [])),
    params(("id" = u64, Path), ("sid" = u64, Path)),
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn delete_snapshot(State(s): S, caller: Caller, ApiPath((id, sid)): ApiPath<(u64, u64)>) -> JsonResult {
    simple(&s, &caller, Command::DeleteSnapshot { volume: id, snapshot: sid }).await
}

// ----- audit -----

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Operators: only this tenant's records. Tenant principals always see only their own.
    tenant: Option<u64>,
    /// Only records after this sequence number.
    after: Option<u64>,
    /// At most this many records (default 1000, at most 10000).
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", security(("bearer" = [])), params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = "4XX", body = ErrorBody)))]
async fn list_audit(State(s): S, caller: Caller, ApiQuery(q): ApiQuery<AuditQuery>) -> JsonResult {
    simple(&s, &caller, Command::ListAudit { tenant: q.tenant, after_seq: q.after, limit: q.limit }).await
}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", security(("bearer" = [])),
    description = "Walks the whole hash chain and names the first broken record.",
    responses((status = 200, body = crate::audit::VerifyReport), (status = "4XX", body = ErrorBody)))]
async fn verify_audit(State(s): S, caller: Caller) -> JsonResult {
    simple(&s, &caller, Command::VerifyAudit).await
}

// ----- membership -----

#[utoipa::path(get, path = "/v1/cluster/members", tag = "cluster", security(("bearer" = [])),
    responses((status = 200, body = [MemberView]), (status = "4XX", body = ErrorBody)))]
async fn list_members(State(s): S, caller: Caller) -> JsonResult {
    // Authorize and audit like every call; the member list itself comes from consensus.
    s.call(&caller, Command::ListMembers).await?;
    let st = s.handle.status();
    let list: Vec<MemberView> =
        st.peers.iter().map(|(id, a)| MemberView { id: *id, raft_addr: a.map(|a| a.to_string()) }).collect();
    Ok(Json(serde_json::to_value(list).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?))
}

#[utoipa::path(post, path = "/v1/cluster/members", tag = "cluster", security(("bearer" = [])), request_body = MemberRequest,
    description = "Adds a metadata node (one membership change at a time). Start the new node with join = true.",
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn add_member(State(s): S, caller: Caller, ApiJson(req): ApiJson<MemberRequest>) -> JsonResult {
    let addr = req
        .addr
        .as_deref()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, "addr must be ip:port"))?;
    let id = req.id;
    s.call(&caller, Command::ChangeMembership { add: true, req }).await?;
    s.handle.add_node(id, addr).await?;
    Ok(Json(serde_json::json!({"added": id})))
}

#[utoipa::path(delete, path = "/v1/cluster/members/{id}", tag = "cluster", security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 200), (status = "4XX", body = ErrorBody)))]
async fn remove_member(State(s): S, caller: Caller, ApiPath(id): ApiPath<u64>) -> JsonResult {
    s.call(&caller, Command::ChangeMembership { add: false, req: MemberRequest { id, addr: None } }).await?;
    s.handle.remove_node(id).await?;
    Ok(Json(serde_json::json!({"removed": id})))
}

// ----- the OpenAPI description -----

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("slate_<token id>_<64 hex digits>")
                    .build(),
            ),
        );
    }
}

/// The OpenAPI description, generated from the handlers above.
#[derive(OpenApi)]
#[openapi(
    info(title = "Slate metadata service", description = "Management API of slate-meta. Every call but status is authenticated with a bearer token, authorized against the caller's role and grants, and recorded in the hash-chained audit log. Errors have one shape: {\"error\": {\"code\", \"message\"}}."),
    modifiers(&BearerAuth),
    paths(
        status, whoami, get_settings, update_settings,
        create_tenant, list_tenants, get_tenant, delete_tenant, rotate_tenant_key,
        create_principal, list_principals, get_principal, delete_principal, unlock_principal,
        create_token, list_tokens, revoke_token,
        create_grant, list_grants, delete_grant,
        register_node, list_nodes, get_node, heartbeat, set_node_state, list_disks,
        create_volume, list_volumes, get_volume, resize_volume, delete_volume,
        attach, detach, refresh_capability, report_failure, mark_in_sync,
        create_snapshot, list_snapshots, delete_snapshot,
        list_audit, verify_audit,
        list_members, add_member, remove_member,
    ),
    components(schemas(ErrorBody, crate::audit::AuditRecord, crate::audit::AuditAnchor))
)]
#[derive(Debug)]
pub struct ApiDoc;
