//! The one error body every refusal has: `{"error": {"code": "...", "message": "..."}}`.

use serde::{Deserialize, Serialize};

/// Error classes; each fixes an HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed or out of range.
    BadRequest,
    /// 401: no valid credential.
    Unauthorized,
    /// 403: authenticated, but not allowed.
    Forbidden,
    /// 403: the principal is locked out after repeated failures.
    Locked,
    /// 404.
    NotFound,
    /// 409: conflicts with the current state (e.g. already attached read-write).
    Conflict,
    /// 409 internally retried: the key the proposer wrapped under was rotated meanwhile.
    KeyRotated,
    /// 413.
    PayloadTooLarge,
    /// 415.
    UnsupportedMediaType,
    /// 422: valid request the cluster cannot satisfy (e.g. too few failure domains).
    Unsatisfiable,
    /// 429: too many requests (rate limit, or failed-credential backoff); the reply says when to retry.
    RateLimited,
    /// 503: no quorum, no leader, or not bootstrapped yet.
    Unavailable,
    /// 500.
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden | Self::Locked => 403,
            Self::NotFound => 404,
            Self::Conflict | Self::KeyRotated => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Unsatisfiable => 422,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

wire_names!(ErrorCode {
    BadRequest => "bad_request",
    Unauthorized => "unauthorized",
    Forbidden => "forbidden",
    Locked => "locked",
    NotFound => "not_found",
    Conflict => "conflict",
    KeyRotated => "key_rotated",
    PayloadTooLarge => "payload_too_large",
    UnsupportedMediaType => "unsupported_media_type",
    Unsatisfiable => "unsatisfiable",
    RateLimited => "rate_limited",
    Unavailable => "unavailable",
    Internal => "internal",
});

/// The one error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a code and a message without secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}
