//! Documents signed by the cluster: erase certificates (the record of a
//! decommissioned disk's overwrite and verification) and backup manifests.
//! slate-meta builds or checks the body and signs it with the cluster's ed25519
//! key; anyone holding the cluster's verifying key checks it offline.
//!
//! A file is one JSON document, written exactly as [`render_signed`] produces
//! it: `{FIELD: BODY, "sha256": HEX, "signature": {...}}`, where FIELD is the
//! [`DocKind`]'s (`certificate`, `manifest`). The signature covers the kind's
//! domain tag and the SHA-256 of the body's canonical bytes (serde_json with
//! sorted keys), so a manifest can never pass for a certificate or the reverse;
//! [`verify_signed`] also requires the file to be byte-for-byte the canonical
//! rendering, so changing any byte of it, even whitespace, fails verification.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::Value;
use sha2::Digest;

/// What a signed document is: its domain tag and the field holding its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocKind {
    domain: &'static [u8],
    field: &'static str,
}

/// An erase certificate (`{"certificate": ...}`).
pub const ERASE_CERTIFICATE: DocKind = DocKind { domain: b"slate-erase-certificate-v1\0", field: "certificate" };
/// A backup manifest (`{"manifest": ...}`).
pub const BACKUP_MANIFEST: DocKind = DocKind { domain: b"slate-backup-manifest-v1\0", field: "manifest" };

/// SHA-256 (hex) of a certificate body's canonical bytes.
pub fn body_sha256(body: &Value) -> String {
    hex::encode(sha2::Sha256::digest(serde_json::to_vec(body).unwrap_or_default()))
}

fn message(kind: DocKind, sha_hex: &str) -> Vec<u8> {
    let mut m = kind.domain.to_vec();
    m.extend_from_slice(sha_hex.as_bytes());
    m
}

/// The signed erase certificate for `body`, as the text of the file.
pub fn render_document(body: &Value, key: &SigningKey) -> String {
    render_signed(ERASE_CERTIFICATE, body, key)
}

/// The signed document of `kind` for `body`, as the text of the file.
pub fn render_signed(kind: DocKind, body: &Value, key: &SigningKey) -> String {
    let sha = body_sha256(body);
    let sig = key.sign(&message(kind, &sha));
    let doc = serde_json::json!({
        kind.field: body,
        "sha256": sha,
        "signature": {
            "algorithm": "ed25519",
            "verifying_key": hex::encode(key.verifying_key().as_bytes()),
            "value": hex::encode(sig.to_bytes()),
        },
    });
    canonical_text(&doc)
}

fn canonical_text(doc: &Value) -> String {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_default();
    s.push('\n');
    s
}

/// Why a certificate does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("not a signed document: {0}")]
    Malformed(String),
    #[error("the file is not the canonical rendering of its content (it was edited)")]
    NotCanonical,
    #[error("the body's SHA-256 does not match the recorded one (the body was changed)")]
    HashMismatch,
    #[error("signed by key {found}, not by the cluster's key {expected}")]
    WrongKey { found: String, expected: String },
    #[error("the signature does not verify")]
    BadSignature,
}

/// What a verified certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub body: Value,
    pub sha256: String,
    pub verifying_key: String,
}

/// Verifies the text of a certificate file; `expected_key` (hex) pins the cluster's key.
pub fn verify_document(text: &str, expected_key: Option<&str>) -> Result<Verified, CertificateError> {
    verify_signed(ERASE_CERTIFICATE, text, expected_key)
}

/// Verifies the text of a signed document of `kind`; `expected_key` (hex) pins the cluster's key.
pub fn verify_signed(kind: DocKind, text: &str, expected_key: Option<&str>) -> Result<Verified, CertificateError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| CertificateError::Malformed(e.to_string()))?;
    if canonical_text(&doc) != text {
        return Err(CertificateError::NotCanonical);
    }
    let field = |v: &Value, k: &str| -> Result<String, CertificateError> {
        v[k].as_str().map(str::to_owned).ok_or_else(|| CertificateError::Malformed(format!("no {k}")))
    };
    let body = doc.get(kind.field).cloned().ok_or_else(|| CertificateError::Malformed(format!("no {}", kind.field)))?;
    let sha = field(&doc, "sha256")?;
    if body_sha256(&body) != sha {
        return Err(CertificateError::HashMismatch);
    }
    let sig = &doc["signature"];
    if sig["algorithm"] != "ed25519" {
        return Err(CertificateError::Malformed("unknown signature algorithm".into()));
    }
    let key_hex = field(sig, "verifying_key")?;
    if let Some(exp) = expected_key {
        if !exp.eq_ignore_ascii_case(&key_hex) {
            return Err(CertificateError::WrongKey { found: key_hex, expected: exp.to_owned() });
        }
    }
    let key_bytes: [u8; 32] = hex::decode(&key_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| CertificateError::Malformed("verifying key is not 32 hex bytes".into()))?;
    let key =
        VerifyingKey::from_bytes(&key_bytes).map_err(|_| CertificateError::Malformed("bad verifying key".into()))?;
    let sig_bytes: [u8; 64] = hex::decode(field(sig, "value")?)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| CertificateError::Malformed("signature is not 64 hex bytes".into()))?;
    key.verify(&message(kind, &sha), &Signature::from_bytes(&sig_bytes)).map_err(|_| CertificateError::BadSignature)?;
    Ok(Verified { body, sha256: sha, verifying_key: key_hex })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_any_byte_change_fails() {
        let key = crate::capability::generate_signing_key();
        let body =
            serde_json::json!({"device": {"path": "/dev/x", "size_bytes": 4096}, "verification": {"result": "pass"}});
        let text = render_document(&body, &key);
        let pin = hex::encode(key.verifying_key().as_bytes());
        let v = verify_document(&text, Some(&pin)).unwrap();
        assert_eq!(v.body, body);
        let bytes = text.as_bytes();
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.to_vec();
            b[i] ^= 0x01;
            let t = String::from_utf8_lossy(&b);
            assert!(verify_document(&t, Some(&pin)).is_err(), "byte {i} changed and it still verified");
        }
        let other = crate::capability::generate_signing_key();
        let forged = render_document(&body, &other);
        assert!(matches!(verify_document(&forged, Some(&pin)), Err(CertificateError::WrongKey { .. })));
    }

    #[test]
    fn a_manifest_never_passes_for_a_certificate() {
        let key = crate::capability::generate_signing_key();
        let body = serde_json::json!({"volume": 1});
        let manifest = render_signed(BACKUP_MANIFEST, &body, &key);
        assert_eq!(verify_signed(BACKUP_MANIFEST, &manifest, None).unwrap().body, body);
        assert!(verify_document(&manifest, None).is_err());
        // Same body under the other field name: the domain tag still differs.
        let swapped = manifest.replacen("\"manifest\"", "\"certificate\"", 1);
        assert_eq!(verify_document(&swapped, None), Err(CertificateError::BadSignature));
    }
}
