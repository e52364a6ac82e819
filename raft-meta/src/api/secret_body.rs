//! Replies that carry a volume key (attach, restore): serialized straight into a
//! buffer that is zeroized when the HTTP layer drops the body, instead of the
//! `Json` extractor's ordinary buffer, which is freed with the key still in it.
//!
//! What stays out of reach: the copies rustls makes while encrypting the record
//! (its send buffer) and whatever hyper copies into its own write buffer; those
//! are freed, not wiped.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use zeroize::Zeroizing;

use super::ApiError;
use crate::state::command::ErrorCode;

/// A JSON body holding a secret; wiped when the last reference to it is dropped.
#[derive(Debug)]
pub(crate) struct SecretJson(Zeroizing<Vec<u8>>);

/// Owner of the body bytes handed to the HTTP layer: zeroizes them on drop.
struct WipedOnDrop(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for WipedOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl SecretJson {
    /// Serializes `value`; the caller wipes the secret fields of `value` afterwards.
    pub(crate) fn new<T: Serialize>(value: &T) -> Result<Self, ApiError> {
        // Large enough that an attach reply does not reallocate (a grown Vec frees
        // the old buffer without wiping it); it grows only for huge segment maps.
        let mut buf = Zeroizing::new(Vec::with_capacity(64 * 1024));
        serde_json::to_writer(&mut *buf, value).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        Ok(Self(buf))
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl IntoResponse for SecretJson {
    fn into_response(self) -> Response {
        let body = Body::from(Bytes::from_owner(WipedOnDrop(self.0)));
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_body_is_the_json_and_typed_as_such() {
        let v = serde_json::json!({"dek_hex": "ab".repeat(64), "n": 1});
        let s = SecretJson::new(&v).unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(s.bytes()).unwrap(), v);
        let resp = s.into_response();
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap(), v);
    }
}
