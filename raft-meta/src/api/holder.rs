//! The holder binding a caller asks its capabilities to carry.
//!
//! Storage nodes accept a capability only on a TLS session whose client proved
//! it holds the certificate the capability names (see `slate_protocol::Holder`).
//! A caller names that certificate's hash in the `slate-holder` header of the
//! calls that hand out capabilities (attach, refresh, report-failure, a node's
//! heartbeat and repair-source). The hash is not a secret: it only says where
//! the capability will work. A caller that names nothing gets capabilities bound
//! to no certificate, which only plaintext test listeners accept.

use super::ApiError;
use crate::state::command::ErrorCode;
use axum::async_trait;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use slate_protocol::capability::HOLDER_HEADER;
use slate_protocol::Holder;

/// The `slate-holder` header of a request, parsed (all zeros when absent).
#[derive(Debug, Clone, Copy)]
pub struct HolderOf(pub Holder);

#[async_trait]
impl<S: Send + Sync> FromRequestParts<S> for HolderOf {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(v) = parts.headers.get(HOLDER_HEADER) else { return Ok(Self(Holder::default())) };
        v.to_str().ok().and_then(Holder::from_hex).map(Self).ok_or_else(|| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("the {HOLDER_HEADER} header must be 64 hex digits: the SHA-256 of your data-plane certificate"),
            )
        })
    }
}
