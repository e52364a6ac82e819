//! `POST /v1/security-events`: storage nodes and hosts report what they refused (a forged or
//! expired capability, a capability for another client's key, an NBD client certificate that
//! failed), so that every security event of the cluster has one metric and one audit view.
//!
//! Reports are aggregated exactly like the API's own refusals (guard.rs): counted in
//! `slate_meta_security_events_total{kind, source}` at once, and written to the audit chain as
//! one record per (kind, source, reporter) per flush interval, with the count. A flood of
//! reports therefore costs at most one log entry per interval, and a report never carries a
//! secret (the detail is bounded printable ASCII; callers must not put tokens in it).

use super::guard::kind;
use super::{ApiError, ApiJson, ApiState, Caller};
use crate::state::command::{Command, ErrorCode};
use crate::state::types::Role;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use slate_protocol::ops::SecurityEventReport;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Longest `detail` accepted.
pub const MAX_DETAIL_CHARS: usize = 256;

pub fn routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/security-events", post(report))
}

/// The source's IP address, from `IP:port` or `IP`.
fn source_ip(source: &str) -> Option<IpAddr> {
    source.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| source.parse::<IpAddr>()).ok()
}

#[utoipa::path(post, path = "/v1/security-events", tag = "audit", security(("bearer" = [])),
    request_body(content = serde_json::Value, description = "slate_protocol::ops::SecurityEventReport: {kind, source, detail}"),
    description = "Reports a security event observed by a storage node or host (operator or host principals). Counted in slate_meta_security_events_total{kind,source} and aggregated into the audit chain (one record per kind, source and reporter per interval, with the count).",
    responses((status = 202), (status = "4XX", body = super::ErrorBody)))]
async fn report(
    State(s): State<Arc<ApiState>>,
    caller: Caller,
    ApiJson(req): ApiJson<SecurityEventReport>,
) -> Result<(axum::http::StatusCode, Json<serde_json::Value>), ApiError> {
    if !kind::REPORTABLE.contains(&req.kind.as_str()) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("kind must be one of {}", kind::REPORTABLE.join(", ")),
        ));
    }
    let Some(ip) = source_ip(&req.source) else {
        return Err(ApiError::new(ErrorCode::BadRequest, "source must be IP:port or IP"));
    };
    if req.detail.chars().count() > MAX_DETAIL_CHARS
        || !req.detail.chars().all(|c| c.is_ascii() && !c.is_ascii_control())
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("detail must be at most {MAX_DETAIL_CHARS} printable ASCII characters"),
        ));
    }
    let Some(auth) = &caller.auth else {
        return Err(ApiError::new(ErrorCode::Unavailable, "cluster not bootstrapped yet; retry"));
    };
    if !matches!(auth.role, Role::Operator | Role::Host | Role::Node) {
        // A valid credential without the right: refused in the log, so the refusal is audited.
        s.call(&caller, Command::ReportSecurityEvent { kind: req.kind }).await?;
        return Err(ApiError::new(ErrorCode::Forbidden, "security events are reported by storage nodes or hosts"));
    }
    let reporter = format!("principal:{}({})", auth.principal, auth.name);
    s.guard.event(&req.kind, &ip.to_string(), &reporter, &req.detail);
    Ok((axum::http::StatusCode::ACCEPTED, Json(serde_json::json!({"accepted": true}))))
}

#[cfg(test)]
mod tests {
    use super::source_ip;

    #[test]
    fn sources_parse_with_or_without_port() {
        assert_eq!(source_ip("10.1.2.3:5000").map(|i| i.to_string()).as_deref(), Some("10.1.2.3"));
        assert_eq!(source_ip("[::1]:80").map(|i| i.to_string()).as_deref(), Some("::1"));
        assert_eq!(source_ip("192.0.2.7").map(|i| i.to_string()).as_deref(), Some("192.0.2.7"));
        assert!(source_ip("host:1").is_none());
    }
}
