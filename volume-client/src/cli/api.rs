//! A small client for slate-meta's management API (HTTPS/JSON, bearer token).
//!
//! It trusts only the cluster's CA, tries every metadata node it knows in
//! turn when one does not answer, and bounds every call with a timeout, so a
//! command against a cluster without quorum fails within seconds with a clear
//! error instead of hanging.

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;
use zeroize::Zeroizing;

/// How long one HTTP call may take before the next node is tried.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(8);

/// A management API client.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    bases: Vec<String>,
    token: std::sync::Arc<Zeroizing<String>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient").field("bases", &self.bases).finish_non_exhaustive()
    }
}

/// An error body from the API: `{"error": {"code", "message"}}`.
#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}
#[derive(Debug, serde::Deserialize)]
struct ErrorInner {
    code: String,
    message: String,
}

/// A refusal by the API (4xx/5xx with its error body).
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiClient {
    /// A client for `bases` (e.g. `https://127.0.0.1:7000`), trusting `ca_pem`, presenting the token in `token_file`.
    pub fn new(bases: Vec<String>, ca_pem: &Path, token_file: &Path) -> Result<Self> {
        let token = Zeroizing::new(
            std::fs::read_to_string(token_file)
                .with_context(|| format!("reading the token file {}", token_file.display()))?
                .trim()
                .to_owned(),
        );
        if token.is_empty() {
            bail!("the token file {} is empty", token_file.display());
        }
        Self::with_token(bases, ca_pem, token)
    }

    /// Same with a token in memory.
    pub fn with_token(bases: Vec<String>, ca_pem: &Path, token: Zeroizing<String>) -> Result<Self> {
        let pem = std::fs::read(ca_pem).with_context(|| format!("reading the CA {}", ca_pem.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem).context("the CA file is not a PEM certificate")?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT)
            .build()?;
        if bases.is_empty() {
            bail!("no API address");
        }
        Ok(Self { http, bases, token: std::sync::Arc::new(token) })
    }

    /// Calls `method path` with an optional JSON body; tries each node until one answers.
    pub async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        let mut last: Option<anyhow::Error> = None;
        for base in &self.bases {
            let mut req = self.http.request(method.clone(), format!("{base}{path}")).bearer_auth(self.token.as_str());
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let bytes = resp.bytes().await.unwrap_or_default();
                    if status.is_success() {
                        let text = if bytes.is_empty() { &b"null"[..] } else { &bytes[..] };
                        return serde_json::from_slice(text)
                            .with_context(|| format!("unexpected reply from {method} {path}"));
                    }
                    // The service answered: a 503 (no leader / no quorum) may be better elsewhere.
                    let err = match serde_json::from_slice::<ErrorBody>(&bytes) {
                        Ok(b) => ApiError { status: status.as_u16(), code: b.error.code, message: b.error.message },
                        Err(_) => ApiError {
                            status: status.as_u16(),
                            code: "http".into(),
                            message: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
                        },
                    };
                    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::GATEWAY_TIMEOUT {
                        last = Some(err.into());
                        continue;
                    }
                    return Err(err.into());
                }
                Err(e) => {
                    last = Some(anyhow!("{base}: {}", describe(&e)));
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no metadata node answered"))
            .context("the metadata service is unavailable (no quorum or not running)"))
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R> {
        self.call::<(), R>(Method::GET, path, None).await
    }
    pub async fn post<B: Serialize + ?Sized, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R> {
        self.call(Method::POST, path, Some(body)).await
    }
    pub async fn put<B: Serialize + ?Sized, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R> {
        self.call(Method::PUT, path, Some(body)).await
    }
    pub async fn delete<R: DeserializeOwned>(&self, path: &str) -> Result<R> {
        self.call::<(), R>(Method::DELETE, path, None).await
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("timed out after {CALL_TIMEOUT:?}")
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else {
        e.to_string()
    }
}
