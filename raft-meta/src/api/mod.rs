//! The management API: HTTP/JSON over TLS (axum + rustls), bearer tokens.
//!
//! Every credential is first checked in memory by the [`guard`]: a missing,
//! malformed, unknown or expired token, or a wrong secret, is refused there
//! and never proposed (it is counted and aggregated into the audit instead).
//! A call with a valid credential (except `/v1/status`, `/metrics` and
//! `/openapi.json`, which reveal nothing secret) becomes one state-machine
//! command proposed through Raft: authorization, the change and its audit
//! record are decided in `apply`, identically on every node. Two routine reads
//! skip the log (design/api-security.md): a storage node's heartbeat (the
//! leader keeps liveness in memory) and an attached client's layout poll
//! (answered after a read barrier). This layer only parses and
//! validates input (so bad input is refused before anything is proposed and
//! changes nothing), generates fresh secrets from the OS CSPRNG (tokens, keys:
//! they enter the command only hashed or wrapped), signs capabilities after a
//! committed attach, and maps refusals onto one error body:
//! `{"error": {"code": "...", "message": "..."}}`.
//!
//! Request bodies are bounded (`max_body_bytes`), unknown fields are refused,
//! and the OpenAPI description is generated from these handlers (utoipa).

mod backups;
mod clones;
mod erasure;
pub mod guard;
mod handlers;
mod holder;
mod keys;
mod operations;
mod secret_body;
mod security;

use crate::consensus::{ConsensusError, ConsensusHandle};
use crate::keys::hash_secret;
use crate::machine::{decode_response, SlateMachine};
use crate::metrics::{Metrics, StatusLabel};
use crate::state::command::{Command, Credential, Envelope, ErrorCode, Refusal, Response as SmResponse};
use axum::async_trait;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ed25519_dalek::SigningKey;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use zeroize::{Zeroize, Zeroizing};

pub use handlers::ApiDoc;

/// The consensus handle over Slate's machine.
pub type Handle = ConsensusHandle<SlateMachine>;

/// Shared by every handler.
pub struct ApiState {
    pub handle: Handle,
    pub signing_key: slate_secret::Secret<SigningKey>,
    pub metrics: Arc<Metrics>,
    pub node_id: u64,
    /// (raft id, API address) of every configured member, for leader hints.
    pub peer_apis: Vec<(u64, SocketAddr)>,
    /// Credential checks, rate limits, backoff and security-event aggregation.
    pub guard: guard::Guard,
    /// The leader's view of storage-node liveness: node id -> last heartbeat (ms since the
    /// epoch). Kept in memory only; a sweep carries it into the state when a node is overdue.
    pub liveness: Mutex<HashMap<u64, u64>>,
    /// When this node last became leader (ms since the epoch): nodes it has not heard from
    /// yet count as alive from then on, so a new leader never marks a node down early.
    pub leader_since_ms: AtomicU64,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// Builds the router.
pub fn router(state: Arc<ApiState>, max_body_bytes: usize) -> axum::Router {
    handlers::routes()
        .merge(erasure::routes())
        .merge(keys::routes())
        .merge(backups::routes())
        .merge(clones::routes())
        .merge(operations::routes())
        .merge(security::routes())
        .fallback(handlers::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), count_status))
        .with_state(state)
}

async fn count_status(
    axum::extract::State(s): axum::extract::State<Arc<ApiState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    s.metrics.requests.get_or_create(&StatusLabel { status: resp.status().as_u16() }).inc();
    resp
}

// ----- errors -----

pub use slate_protocol::api::{ErrorBody, ErrorDetail};

/// An API error: a code (which fixes the HTTP status) and a message without secrets.
#[derive(Debug)]
pub struct ApiError(pub Refusal);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(Refusal::new(code, message))
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        Self(r)
    }
}

impl From<ConsensusError> for ApiError {
    fn from(e: ConsensusError) -> Self {
        let code = match e {
            ConsensusError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            ConsensusError::Membership(_) | ConsensusError::ConfChangePending => ErrorCode::Conflict,
            _ => ErrorCode::Unavailable,
        };
        Self::new(code, format!("metadata cluster: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: ErrorDetail { code: self.0.code, message: self.0.message } })).into_response()
    }
}

fn rejection(status: StatusCode, text: String) -> ApiError {
    let code = match status.as_u16() {
        413 => ErrorCode::PayloadTooLarge,
        415 => ErrorCode::UnsupportedMediaType,
        _ => ErrorCode::BadRequest,
    };
    ApiError::new(code, text)
}

// ----- extractors that answer with the error body -----

/// `Json<T>` whose rejections use [`ErrorBody`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

#[async_trait]
impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(e) => {
                let status = e.status();
                let text = match &e {
                    JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                        format!("invalid JSON body: {}", e.body_text())
                    }
                    _ => e.body_text(),
                };
                Err(rejection(status, text))
            }
        }
    }
}

/// `Path<T>` whose rejections use [`ErrorBody`].
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

#[async_trait]
impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| rejection(StatusCode::BAD_REQUEST, format!("invalid path: {}", e.body_text())))
    }
}

/// `Query<T>` whose rejections use [`ErrorBody`].
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

#[async_trait]
impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state).await.map(|q| Self(q.0)).map_err(
            |e: QueryRejection| rejection(StatusCode::BAD_REQUEST, format!("invalid query: {}", e.body_text())),
        )
    }
}

/// Who is calling: client address, the presented credential, and (once the guard let it
/// through) who it authenticated as. A caller that reaches a handler always holds a credential
/// that was valid a moment ago; `apply` checks it again, authoritatively.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client: String,
    pub ip: IpAddr,
    pub credential: Credential,
    /// `None` only before the cluster is bootstrapped (the call then gets 503 from `apply`).
    pub auth: Option<guard::AuthInfo>,
}

#[async_trait]
impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = guard::GuardRefusal;
    async fn from_request_parts(parts: &mut Parts, s: &Arc<ApiState>) -> Result<Self, guard::GuardRefusal> {
        let started = Instant::now();
        let addr = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        let client = addr.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let ip = addr.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let credential = match parts.headers.get(header::AUTHORIZATION) {
            None => Credential::Missing,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.strip_prefix("Bearer "))
                .and_then(|t| parse_token(t.trim()))
                .map_or(Credential::Malformed, |(token, secret_sha256)| Credential::Token { token, secret_sha256 }),
        };
        let checked = async {
            s.guard.admit_source(ip)?;
            match &credential {
                Credential::Token { token, secret_sha256 } => s.guard.authenticate(s, ip, *token, secret_sha256).await,
                Credential::Missing => Err(s.guard.refuse_credential(ip, true)),
                Credential::Malformed | Credential::System => Err(s.guard.refuse_credential(ip, false)),
            }
        }
        .await;
        match checked {
            Ok(auth) => Ok(Self { client, ip, credential, auth }),
            Err(refusal) => {
                s.guard.observe_refusal(started);
                Err(refusal)
            }
        }
    }
}

// ----- tokens -----

const TOKEN_PREFIX: &str = "slate_";

/// Formats a bearer token: `slate_<token id>_<64 hex digits of secret>`.
pub fn format_token(id: u64, secret: &[u8; 32]) -> Zeroizing<String> {
    let hex = Zeroizing::new(hex::encode(secret));
    Zeroizing::new(format!("{TOKEN_PREFIX}{id}_{}", hex.as_str()))
}

/// A fresh public token id: random, so that ids cannot be guessed or enumerated.
pub fn random_token_id() -> u64 {
    use crate::state::security::{RANDOM_TOKEN_ID_MAX, RANDOM_TOKEN_ID_MIN};
    use rand::Rng;
    rand::rngs::OsRng.gen_range(RANDOM_TOKEN_ID_MIN..RANDOM_TOKEN_ID_MAX)
}

/// Parses a bearer token into its id and the hex SHA-256 of its secret.
pub fn parse_token(token: &str) -> Option<(u64, String)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret_hex) = rest.split_once('_')?;
    let id: u64 = id.parse().ok()?;
    let mut secret = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(secret_hex, secret.as_mut()).ok()?;
    Some((id, hex::encode(hash_secret(secret.as_ref()))))
}

// ----- proposing -----

/// A successful reply: the JSON body and, for an attach, the DEK.
pub struct Reply {
    pub body: serde_json::Value,
    pub dek_hex: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("body", &self.body).finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch (the proposer's clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ApiState {
    /// Proposes `command` for `caller` and waits for this node's apply of it.
    pub async fn call(&self, caller: &Caller, command: Command) -> Result<Reply, ApiError> {
        let env = Envelope {
            time_ms: now_ms(),
            client: caller.client.clone(),
            credential: caller.credential.clone(),
            command,
        };
        let bytes = serde_json::to_vec(&env).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let mut out = self.handle.propose(bytes).await?;
        let decoded = decode_response(&out);
        out.zeroize();
        match decoded.map_err(|e| ApiError::new(ErrorCode::Internal, e))? {
            SmResponse::Ok { body, dek_hex, .. } => Ok(Reply { body, dek_hex: dek_hex.map(Zeroizing::new) }),
            SmResponse::Err(r) => Err(ApiError(r)),
        }
    }

    /// Records a storage node's heartbeat in this (leader) node's memory.
    pub fn record_heartbeat(&self, node: u64) {
        self.liveness.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(node, now_ms());
    }

    /// A heartbeat answered without a log entry: on the leader, for an allowed caller (the
    /// node's own principal, or an operator) and a node that is not down, liveness is renewed
    /// in memory and the reply (the node's work) is read from the leader's state. `None`: the
    /// call must go through the log (so a refusal is audited there). A follower answers 503
    /// naming the leader, since only the leader's memory counts.
    pub async fn heartbeat_in_memory(&self, caller: &Caller, node: u64) -> Result<Option<serde_json::Value>, ApiError> {
        use crate::state::types::{NodeState, Role};
        let Some(auth) = &caller.auth else { return Ok(None) };
        let allowed = match auth.role {
            Role::Operator => true,
            Role::Node => auth.node == Some(node),
            _ => false,
        };
        if !allowed {
            return Ok(None);
        }
        if self.handle.status().role != crate::consensus::Role::Leader {
            let hint =
                self.leader_api().map_or_else(|| "no leader known yet".to_string(), |a| format!("leader at {a}"));
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("heartbeats are kept by the leader; this node is not the leader ({hint})"),
            ));
        }
        let reply = self
            .handle
            .read(move |sm| {
                let st = sm.state();
                match st.nodes.get(&node) {
                    Some(n) if n.state != NodeState::Down => st.heartbeat_reply(node).ok(),
                    _ => None,
                }
            })
            .await?;
        if reply.is_some() {
            self.record_heartbeat(node);
        }
        Ok(reply)
    }

    /// The leader's view of each active or draining node's last sign of life: its last
    /// heartbeat in memory, but never earlier than this node's accession to leadership.
    pub fn liveness_view(
        &self,
        nodes: &[crate::state::security::NodeLiveness],
    ) -> std::collections::BTreeMap<u64, u64> {
        use crate::state::types::NodeState;
        let since = self.leader_since_ms.load(Ordering::Relaxed);
        let mem = self.liveness.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        nodes
            .iter()
            .filter(|n| matches!(n.state, NodeState::Active | NodeState::Draining))
            .map(|n| (n.id, mem.get(&n.id).copied().unwrap_or(0).max(since)))
            .collect()
    }

    /// The API address of the current leader, if known.
    pub fn leader_api(&self) -> Option<SocketAddr> {
        let leader = self.handle.status().leader_id;
        self.peer_apis.iter().find(|(id, _)| *id == leader).map(|(_, a)| *a)
    }
}
