//! A small client for slate-meta's management API (HTTPS/JSON, bearer token).
//!
//! It trusts only the cluster's CA and knows every metadata node's API
//! address. A call goes first to the node that answered last (the leader,
//! when one was learned from `GET /v1/status`), then to the others in turn.
//!
//! Two modes:
//!
//! - **one round** (the CLI's default): every node is tried once and every
//!   HTTP call is bounded by a timeout, so a command against a cluster
//!   without quorum fails within seconds with a clear error instead of
//!   hanging;
//! - **patient** ([`ApiClient::patient`], the volume client's control plane):
//!   rounds are repeated with backoff for a bounded window, so the call rides
//!   through a leader election or the loss of the node it last talked to.
//!   Between rounds it asks the nodes that answer for the leader's address
//!   and goes there first.
//!
//! In both modes an answer that refuses the call (a 4xx other than 503) is
//! returned at once: it is the service's decision, not an outage. Connection
//! errors, timeouts, 503 (no leader or no quorum yet) and other 5xx move on
//! to the next node.

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use slate_dataplane::tls::{Connector, Identity};
use slate_protocol::api::{ErrorBody, ErrorCode, StatusView};
use slate_protocol::capability::HOLDER_HEADER;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use zeroize::{Zeroize, Zeroizing};

/// How long one HTTP call may take before the next node is tried.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(8);
/// First pause between two rounds of a patient call; it doubles up to [`MAX_ROUND_PAUSE`].
const FIRST_ROUND_PAUSE: Duration = Duration::from_millis(250);
const MAX_ROUND_PAUSE: Duration = Duration::from_secs(2);
/// How long a status probe (leader discovery) may take per node.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A management API client. Clones share what they learned about the cluster.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    /// Every known API base (`https://host:port`), fixed order; learned leaders are appended.
    bases: Arc<RwLock<Vec<String>>>,
    /// Index into `bases` of the node to try first (the last one that answered).
    preferred: Arc<AtomicUsize>,
    token: Arc<Zeroizing<String>>,
    /// `Some(window)`: retry rounds for up to `window` (see the module doc).
    patience: Option<Duration>,
    /// How this process reaches storage nodes: TLS as an ephemeral certificate
    /// made at start, which every capability it is handed is bound to.
    data_plane: Connector,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("bases", &self.bases())
            .field("patience", &self.patience)
            .finish_non_exhaustive()
    }
}

/// A refusal by the API (4xx/5xx with its error body; `code` is `None` for an answer
/// without one, e.g. from a proxy).
#[derive(Debug, thiserror::Error)]
#[error("{message} ({}, HTTP {status})", code.map_or("http", ErrorCode::as_str))]
pub struct ApiError {
    pub status: u16,
    pub code: Option<ErrorCode>,
    pub message: String,
}

/// What one attempt against one node came to.
enum Attempt<R> {
    Done(R),
    /// The service refused the call: return it as is.
    Refused(anyhow::Error),
    /// This node could not serve it now: try another.
    Unavailable(anyhow::Error),
}

/// True for answers that say "not now" rather than "no": 503 (no leader or quorum), and other 5xx.
fn retryable_status(status: StatusCode) -> bool {
    status.is_server_error()
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
        // The cluster CA issues the storage nodes' certificates too.
        let identity = Identity::ephemeral()?;
        let data_plane = Connector::tls(ca_pem, &identity)?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            HOLDER_HEADER,
            reqwest::header::HeaderValue::from_str(&identity.holder().to_hex()).context("holder header")?,
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT)
            .build()?;
        let mut uniq: Vec<String> = Vec::new();
        for b in bases {
            let b = b.trim().trim_end_matches('/').to_owned();
            if !b.is_empty() && !uniq.contains(&b) {
                uniq.push(b);
            }
        }
        if uniq.is_empty() {
            bail!("no API address");
        }
        Ok(Self {
            http,
            bases: Arc::new(RwLock::new(uniq)),
            preferred: Arc::new(AtomicUsize::new(0)),
            token: Arc::new(token),
            patience: None,
            data_plane,
        })
    }

    /// How this process reaches storage nodes (TLS, as the certificate its capabilities are bound to).
    pub fn data_plane(&self) -> &Connector {
        &self.data_plane
    }

    /// The same client, retrying unavailable-service errors for up to `window`
    /// (shares the learned leader with `self`).
    #[must_use]
    pub fn patient(&self, window: Duration) -> Self {
        Self { patience: Some(window), ..self.clone() }
    }

    /// Every API base this client knows, in its fixed order.
    pub fn bases(&self) -> Vec<String> {
        self.bases.read().map(|b| b.clone()).unwrap_or_default()
    }

    /// The bases in the order to try them: the preferred one first, then the others in turn.
    fn round_order(&self) -> Vec<String> {
        let bases = self.bases();
        let first = self.preferred.load(Ordering::Relaxed) % bases.len().max(1);
        bases.iter().cycle().skip(first).take(bases.len()).cloned().collect()
    }

    fn prefer(&self, base: &str) {
        let Ok(mut bases) = self.bases.write() else { return };
        let i = if let Some(i) = bases.iter().position(|b| b == base) {
            i
        } else {
            bases.push(base.to_owned());
            bases.len() - 1
        };
        self.preferred.store(i, Ordering::Relaxed);
    }

    /// Asks the nodes that answer who leads; prefers the leader's API when one is known.
    async fn find_leader(&self) {
        for base in self.round_order() {
            let req = self.http.get(format!("{base}/v1/status")).timeout(PROBE_TIMEOUT);
            let Ok(resp) = req.send().await else { continue };
            if !resp.status().is_success() {
                continue;
            }
            let Ok(st) = resp.json::<StatusView>().await else { continue };
            if let Some(addr) = st.leader_api.filter(|a| !a.is_empty()) {
                let leader = if addr.contains("://") {
                    addr
                } else {
                    format!("{}://{addr}", base.split("://").next().unwrap_or("https"))
                };
                debug!(leader = %leader, "metadata leader learned");
                self.prefer(&leader);
                return;
            }
        }
    }

    async fn attempt<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        base: &str,
        method: &Method,
        path: &str,
        body: Option<&B>,
    ) -> Attempt<R> {
        let mut req = self.http.request(method.clone(), format!("{base}{path}")).bearer_auth(self.token.as_str());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Unavailable(anyhow!("{base}: {}", describe(&e))),
        };
        let status = resp.status();
        let bytes = match read_body(resp).await {
            Ok(b) => b,
            Err(e) => return Attempt::Unavailable(anyhow!("{base}: reading the reply: {}", describe(&e))),
        };
        if status.is_success() {
            let text = if bytes.is_empty() { &b"null"[..] } else { &bytes[..] };
            return match serde_json::from_slice(text) {
                Ok(r) => Attempt::Done(r),
                Err(e) => Attempt::Refused(anyhow!(e).context(format!("unexpected reply from {method} {path}"))),
            };
        }
        let err = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ApiError { status: status.as_u16(), code: Some(b.error.code), message: b.error.message },
            Err(_) => ApiError {
                status: status.as_u16(),
                code: None,
                message: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
            },
        };
        if retryable_status(status) {
            Attempt::Unavailable(anyhow!(err).context(base.to_owned()))
        } else {
            Attempt::Refused(err.into())
        }
    }

    /// Calls `method path` with an optional JSON body (see the module doc for which nodes, how often).
    pub async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        let started = Instant::now();
        let mut pause = FIRST_ROUND_PAUSE;
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            let mut last: Option<anyhow::Error> = None;
            for base in self.round_order() {
                match self.attempt(&base, &method, path, body).await {
                    Attempt::Done(r) => {
                        self.prefer(&base);
                        if rounds > 1 {
                            debug!(%method, path, rounds, elapsed = ?started.elapsed(), "metadata service answered again");
                        }
                        return Ok(r);
                    }
                    Attempt::Refused(e) => {
                        self.prefer(&base);
                        return Err(e);
                    }
                    Attempt::Unavailable(e) => last = Some(e),
                }
            }
            let last = last.unwrap_or_else(|| anyhow!("no metadata node answered"));
            let window = match self.patience {
                Some(w) if started.elapsed() + pause < w => w,
                _ => {
                    return Err(last.context(format!(
                        "the metadata service is unavailable (no quorum or not running; {rounds} round(s) over {} node(s) in {:.1} s)",
                        self.bases().len(),
                        started.elapsed().as_secs_f64()
                    )));
                }
            };
            if rounds == 1 || rounds.is_multiple_of(10) {
                warn!(%method, path, error = %format!("{last:#}"), window = ?window, "metadata service unavailable; retrying");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_ROUND_PAUSE);
            self.find_leader().await;
        }
    }

    /// `GET path` on one node `base` only, once (no failover): for per-node views such as
    /// each metadata node's own `/v1/status`.
    pub async fn get_at<R: DeserializeOwned>(&self, base: &str, path: &str) -> Result<R> {
        match self.attempt::<(), R>(base, &Method::GET, path, None).await {
            Attempt::Done(r) => Ok(r),
            Attempt::Refused(e) | Attempt::Unavailable(e) => Err(e),
        }
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

/// Reads a reply body into a buffer that is zeroized on drop, wiping each received
/// chunk after copying it where reqwest lets go of it: attach and restore replies carry
/// a volume key. (Copies inside hyper's and rustls's own buffers are out of reach.)
async fn read_body(mut resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, reqwest::Error> {
    let hint = resp.content_length().unwrap_or(0).min(1 << 20);
    let mut body = Zeroizing::new(Vec::with_capacity(usize::try_from(hint).unwrap_or(0)));
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > body.capacity() {
            // Grow by hand so the old allocation is wiped rather than freed with its bytes.
            let mut bigger = Zeroizing::new(Vec::with_capacity((body.len() + chunk.len()).max(body.capacity() * 2)));
            bigger.extend_from_slice(&body);
            body = bigger;
        }
        body.extend_from_slice(&chunk);
        if let Ok(mut owned) = chunk.try_into_mut() {
            owned.as_mut().zeroize();
        }
    }
    Ok(body)
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
