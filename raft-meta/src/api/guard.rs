//! The API's front door: every credential is checked here, in memory, before anything is
//! proposed to Raft (design/api-security.md).
//!
//! * **Cheap refusals.** A missing, malformed, unknown or expired credential, or a wrong secret,
//!   is refused after one hash lookup in [`AuthTable`] (a copy of the replicated token table,
//!   refreshed when the state moves on). It never becomes a log entry, so a flood of bad tokens
//!   costs the cluster neither fsyncs nor audit records. Calls with a valid credential go on to
//!   be proposed and authorized in `apply`, where a missing right is still refused and audited
//!   in the replicated chain.
//! * **Rate limits.** A token bucket per source IP (every request) and per principal (after
//!   authentication) answer 429 with `Retry-After`. Defaults are far above the cluster's own
//!   traffic (node heartbeats every 2 s, layout polls every 3 s, benchmarks at ~1,500 calls/s).
//! * **Backoff that cannot be turned against others.** Failures are counted per source IP and
//!   per token id; past `free_failures`, each further failure doubles a backoff window during
//!   which *failing* attempts get 429 instead of 401. A correct secret always passes, whatever
//!   the failures of its source or token id, so nobody is locked out by someone else's guesses.
//! * **Alarms, aggregated.** Each refusal counts in `slate_meta_security_events_total{kind,
//!   source}` and in an in-memory aggregate, flushed every `event_flush_ms` as one
//!   `SecurityEvents` proposal: one audit record per (source, kind) per interval with its count.
//!
//! Every map here is bounded (`max_tracked`); beyond it new sources are not tracked (their
//! requests are still refused) and metric labels fold into `source="other"`.

use super::{ApiError, ApiState};
use crate::config::GuardConfig;
use crate::metrics::{Metrics, SecurityLabel};
use crate::state::command::{ErrorCode, SecurityEvent};
use crate::state::security::AuthEntry;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The kinds of security event this service observes itself.
pub mod kind {
    pub const MISSING: &str = "missing-credential";
    pub const MALFORMED: &str = "malformed-credential";
    pub const UNKNOWN_TOKEN: &str = "unknown-token";
    pub const BAD_SECRET: &str = "bad-secret";
    pub const EXPIRED: &str = "expired-credential";
    pub const LOCKOUT: &str = "lockout";
    pub const RATE_LIMITED: &str = "rate-limited";
    /// Kinds storage nodes and hosts may report (`POST /v1/security-events`).
    pub use slate_protocol::ops::security_kind::REPORTABLE;
}

/// A refusal from the guard: an error body, and for 429 a `Retry-After`.
#[derive(Debug)]
pub struct GuardRefusal {
    pub error: ApiError,
    pub retry_after_secs: Option<u64>,
}

impl GuardRefusal {
    fn unauthorized(message: &str) -> Self {
        Self { error: ApiError::new(ErrorCode::Unauthorized, message), retry_after_secs: None }
    }

    fn limited(message: String, retry_after: Duration) -> Self {
        let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
        Self {
            error: ApiError::new(ErrorCode::RateLimited, format!("{message}; retry after {secs} s")),
            retry_after_secs: Some(secs),
        }
    }
}

impl From<ApiError> for GuardRefusal {
    fn from(error: ApiError) -> Self {
        Self { error, retry_after_secs: None }
    }
}

impl IntoResponse for GuardRefusal {
    fn into_response(self) -> Response {
        let mut resp = self.error.into_response();
        if let Some(secs) = self.retry_after_secs {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            debug_assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        }
        resp
    }
}

/// The authenticated caller, as the guard saw it (`apply` checks again, authoritatively).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthInfo {
    pub principal: u64,
    pub name: String,
    pub role: crate::state::types::Role,
    pub tenant: Option<u64>,
    /// The storage node a `node` principal speaks for.
    pub node: Option<u64>,
}

/// A copy of the replicated token table at one applied index.
#[derive(Debug, Default)]
pub struct AuthTable {
    pub index: u64,
    pub bootstrapped: bool,
    pub taken: Option<Instant>,
    pub tokens: HashMap<u64, AuthEntry>,
}

/// A token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Failures of one source or token id.
#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct Aggregate {
    count: u64,
    first_ms: u64,
    last_ms: u64,
    detail: String,
}

#[derive(Debug, Default)]
struct Tracking {
    source_buckets: HashMap<IpAddr, Bucket>,
    principal_buckets: HashMap<u64, Bucket>,
    source_failures: HashMap<IpAddr, Failures>,
    token_failures: HashMap<u64, Failures>,
}

/// What to do with a failed credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// 401.
    Refuse,
    /// 429 for this long (the source or token id is in backoff).
    Backoff(Duration),
}

/// The guard of one API node.
#[derive(Debug)]
pub struct Guard {
    cfg: GuardConfig,
    metrics: Arc<Metrics>,
    table: RwLock<Arc<AuthTable>>,
    refresh: tokio::sync::Mutex<()>,
    tracking: Mutex<Tracking>,
    /// Pending audit aggregates: (kind, source, reporter) -> count.
    events: Mutex<BTreeMap<(String, String, String), Aggregate>>,
    /// Sources that have a metric label of their own.
    labelled: Mutex<HashSet<String>>,
}

/// Distinct sources with their own metric label; the rest are `other`.
const MAX_LABELLED_SOURCES: usize = 256;
/// Distinct (kind, source) aggregates per flush; the rest fold into `other`.
const MAX_AGGREGATES: usize = 256;

fn now_ms() -> u64 {
    super::now_ms()
}

/// Compares two strings in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Guard {
    pub fn new(cfg: GuardConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            cfg,
            metrics,
            table: RwLock::new(Arc::new(AuthTable::default())),
            refresh: tokio::sync::Mutex::new(()),
            tracking: Mutex::new(Tracking::default()),
            events: Mutex::new(BTreeMap::new()),
            labelled: Mutex::new(HashSet::new()),
        }
    }

    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    fn current(&self) -> Arc<AuthTable> {
        self.table.read().map(|t| Arc::clone(&t)).unwrap_or_default()
    }

    /// The token table, refreshed from the local replica when it is behind the applied index
    /// and older than `max_age` (or at once with `force`, after a read barrier).
    async fn table(&self, s: &ApiState, force: bool, max_age: Duration) -> Result<Arc<AuthTable>, ApiError> {
        let applied = s.handle.status().applied;
        let fresh = |t: &AuthTable| t.index >= applied || t.taken.is_some_and(|at| at.elapsed() < max_age);
        let t = self.current();
        if !force && t.taken.is_some() && fresh(&t) {
            return Ok(t);
        }
        let _one = self.refresh.lock().await;
        if force {
            s.handle.read_barrier().await?;
        } else {
            let t = self.current();
            if t.taken.is_some() && fresh(&t) {
                return Ok(t);
            }
        }
        let (index, bootstrapped, tokens) = s
            .handle
            .read(|sm| {
                let st = sm.state();
                (st.applied_index, st.bootstrapped, st.auth_table())
            })
            .await?;
        let t = Arc::new(AuthTable { index, bootstrapped, taken: Some(Instant::now()), tokens });
        if let Ok(mut w) = self.table.write() {
            *w = Arc::clone(&t);
        }
        Ok(t)
    }

    /// Per-source rate limit, for every request that carries (or lacks) a credential.
    pub fn admit_source(&self, ip: IpAddr) -> Result<(), GuardRefusal> {
        let (rate, burst) = (self.cfg.per_source_rps, self.cfg.per_source_burst);
        let wait = {
            let mut t = self.tracking.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let max = self.cfg.max_tracked;
            take_token(&mut t.source_buckets, ip, rate, burst, max)
        };
        match wait {
            None => Ok(()),
            Some(wait) => {
                self.event(kind::RATE_LIMITED, &ip.to_string(), "api", "per-source limit");
                Err(GuardRefusal::limited(format!("too many requests from {ip}"), wait))
            }
        }
    }

    fn admit_principal(&self, ip: IpAddr, principal: u64) -> Result<(), GuardRefusal> {
        let (rate, burst) = (self.cfg.per_principal_rps, self.cfg.per_principal_burst);
        let wait = {
            let mut t = self.tracking.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let max = self.cfg.max_tracked;
            take_token(&mut t.principal_buckets, principal, rate, burst, max)
        };
        match wait {
            None => Ok(()),
            Some(wait) => {
                self.event(kind::RATE_LIMITED, &ip.to_string(), "api", &format!("principal {principal}"));
                Err(GuardRefusal::limited(format!("too many requests for principal {principal}"), wait))
            }
        }
    }

    /// True while `ip` may still have unknown token ids checked against the leader's commit
    /// (a token made a moment ago on another node): its failures are below `free_failures`.
    fn in_good_standing(&self, ip: IpAddr) -> bool {
        let t = self.tracking.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        t.source_failures.get(&ip).is_none_or(|f| {
            f.count < self.cfg.free_failures || f.last.elapsed() > Duration::from_millis(self.cfg.failure_forget_ms)
        })
    }

    /// Counts a failure of `ip` (and of `token`, a known token id) and says how to answer.
    fn fail(&self, ip: IpAddr, token: Option<u64>, what: &'static str, detail: &str) -> Verdict {
        let source = ip.to_string();
        self.event(what, &source, "api", detail);
        let now = Instant::now();
        let (by_source, by_token, started) = {
            let mut t = self.tracking.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let max = self.cfg.max_tracked;
            let (s_wait, s_started) = record_failure(&mut t.source_failures, ip, now, &self.cfg, max);
            let (t_wait, t_started) = match token {
                Some(id) => record_failure(&mut t.token_failures, id, now, &self.cfg, max),
                None => (None, false),
            };
            (s_wait, t_wait, s_started || t_started)
        };
        if started {
            let who = token.map_or_else(|| format!("source {source}"), |id| format!("source {source}, token id {id}"));
            self.event(kind::LOCKOUT, &source, "api", &who);
        }
        match by_source.max(by_token) {
            Some(wait) => Verdict::Backoff(wait),
            None => Verdict::Refuse,
        }
    }

    fn refuse(&self, ip: IpAddr, token: Option<u64>, what: &'static str, message: &str) -> GuardRefusal {
        match self.fail(ip, token, what, message) {
            Verdict::Refuse => GuardRefusal::unauthorized(message),
            Verdict::Backoff(wait) => GuardRefusal::limited(format!("{message}; too many failed attempts"), wait),
        }
    }

    /// Checks a bearer token (`None`: the table says the cluster is not bootstrapped yet, let
    /// the call through so the state machine answers 503 as before).
    pub async fn authenticate(
        &self,
        s: &ApiState,
        ip: IpAddr,
        token_id: u64,
        secret_sha256: &str,
    ) -> Result<Option<AuthInfo>, GuardRefusal> {
        let mut table = self.table(s, false, Duration::from_millis(500)).await?;
        if !table.bootstrapped {
            table = self.table(s, true, Duration::ZERO).await?;
            if !table.bootstrapped {
                return Ok(None);
            }
        }
        if !table.tokens.contains_key(&token_id) && self.in_good_standing(ip) {
            // Possibly a token made a moment ago through another node: catch up with the leader's
            // commit (a read barrier: no log entry) before refusing.
            table = self.table(s, true, Duration::ZERO).await?;
        }
        let Some(e) = table.tokens.get(&token_id) else {
            return Err(self.refuse(ip, None, kind::UNKNOWN_TOKEN, "unknown or revoked token"));
        };
        if !same(&e.secret_sha256, secret_sha256) {
            return Err(self.refuse(ip, Some(token_id), kind::BAD_SECRET, "bad credentials"));
        }
        let now = now_ms();
        let expired = if e.token_expires_ms.is_some_and(|t| now >= t) {
            Some("token has expired")
        } else if e.not_after_ms.is_some_and(|t| now >= t) {
            Some("account has expired")
        } else if e.not_before_ms.is_some_and(|t| now < t) {
            Some("account is not valid yet")
        } else {
            None
        };
        if let Some(why) = expired {
            return Err(self.refuse(ip, None, kind::EXPIRED, why));
        }
        self.admit_principal(ip, e.principal)?;
        Ok(Some(AuthInfo {
            principal: e.principal,
            name: e.principal_name.clone(),
            role: e.role,
            tenant: e.tenant,
            node: e.node,
        }))
    }

    /// A missing or malformed credential.
    pub fn refuse_credential(&self, ip: IpAddr, missing: bool) -> GuardRefusal {
        if missing {
            self.refuse(ip, None, kind::MISSING, "missing bearer token")
        } else {
            self.refuse(ip, None, kind::MALFORMED, "malformed bearer token")
        }
    }

    /// Times one refusal (for the p99 the flood test reads).
    pub fn observe_refusal(&self, started: Instant) {
        self.metrics.auth_refusal_latency.observe(started.elapsed().as_secs_f64());
    }

    /// Counts one security event in the metric and the pending audit aggregate.
    pub fn event(&self, what: &str, source: &str, reporter: &str, detail: &str) {
        let label = {
            let mut l = self.labelled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if l.contains(source) || (l.len() < MAX_LABELLED_SOURCES && l.insert(source.to_owned())) {
                source.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.metrics.security_events.get_or_create(&SecurityLabel { kind: what.to_owned(), source: label }).inc();
        let now = now_ms();
        let mut ev = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut key = (what.to_owned(), source.to_owned(), reporter.to_owned());
        if !ev.contains_key(&key) && ev.len() >= MAX_AGGREGATES {
            "other".clone_into(&mut key.1);
        }
        let a = ev.entry(key).or_default();
        if a.count == 0 {
            a.first_ms = now;
        }
        a.count += 1;
        a.last_ms = now;
        detail.clone_into(&mut a.detail);
    }

    /// Takes the pending aggregates (one audit record each).
    pub fn drain_events(&self) -> Vec<SecurityEvent> {
        let taken = std::mem::take(&mut *self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        taken
            .into_iter()
            .map(|((kind, source, reporter), a)| SecurityEvent {
                kind,
                source,
                count: a.count,
                first_ms: a.first_ms,
                last_ms: a.last_ms,
                reporter,
                detail: a.detail,
            })
            .collect()
    }

    /// Puts back aggregates whose proposal failed, so the next flush carries them.
    pub fn restore_events(&self, events: Vec<SecurityEvent>) {
        let mut ev = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in events {
            let a = ev.entry((e.kind, e.source, e.reporter)).or_default();
            if a.count == 0 {
                a.first_ms = e.first_ms;
                a.detail = e.detail;
            }
            a.count += e.count;
            a.first_ms = a.first_ms.min(e.first_ms);
            a.last_ms = a.last_ms.max(e.last_ms);
        }
    }
}

/// Takes one token from `key`'s bucket; `Some(wait)` when it is empty.
fn take_token<K: std::hash::Hash + Eq + Copy>(
    map: &mut HashMap<K, Bucket>,
    key: K,
    rate: u32,
    burst: u32,
    max: usize,
) -> Option<Duration> {
    let now = Instant::now();
    let (rate, burst) = (f64::from(rate), f64::from(burst));
    if !map.contains_key(&key) && map.len() >= max {
        // Forget buckets that have refilled; if none has, leave this key untracked.
        map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        if map.len() >= max {
            return None;
        }
    }
    let b = map.entry(key).or_insert(Bucket { tokens: burst, at: now });
    b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        None
    } else {
        Some(Duration::from_secs_f64((1.0 - b.tokens) / rate))
    }
}

/// Records one failure of `key`; returns the backoff it is now in (if any) and whether this
/// failure started (or extended) a backoff window.
fn record_failure<K: std::hash::Hash + Eq + Copy>(
    map: &mut HashMap<K, Failures>,
    key: K,
    now: Instant,
    cfg: &GuardConfig,
    max: usize,
) -> (Option<Duration>, bool) {
    let forget = Duration::from_millis(cfg.failure_forget_ms);
    if !map.contains_key(&key) && map.len() >= max {
        map.retain(|_, f| now.duration_since(f.last) < forget);
        if map.len() >= max {
            return (None, false);
        }
    }
    let f = map.entry(key).or_insert(Failures { count: 0, last: now, blocked_until: None });
    if now.duration_since(f.last) > forget {
        *f = Failures { count: 0, last: now, blocked_until: None };
    }
    // A failure inside a running window is answered 429 and does not lengthen it further: the
    // window grows with the attempts that were actually checked, so a flood cannot push one
    // source's (or token id's) window to the maximum faster than the schedule allows.
    if let Some(until) = f.blocked_until.filter(|u| *u > now) {
        f.last = now;
        return (Some(until - now), false);
    }
    f.count = f.count.saturating_add(1);
    f.last = now;
    if f.count <= cfg.free_failures {
        return (None, false);
    }
    let doublings = (f.count - cfg.free_failures - 1).min(30);
    let ms = cfg.backoff_base_ms.saturating_mul(1u64 << doublings).min(cfg.backoff_max_ms);
    let wait = Duration::from_millis(ms);
    f.blocked_until = Some(now + wait);
    (Some(wait), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GuardConfig {
        GuardConfig { free_failures: 3, backoff_base_ms: 100, backoff_max_ms: 1_000, ..GuardConfig::default() }
    }

    #[test]
    fn backoff_starts_after_free_failures_and_doubles_to_the_cap() {
        let c = cfg();
        let mut m = HashMap::new();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(record_failure(&mut m, 1u8, t0 + Duration::from_millis(i), &c, 10), (None, false));
        }
        let mut at = t0 + Duration::from_millis(10);
        let mut expected = 100;
        for _ in 0..6 {
            let (wait, started) = record_failure(&mut m, 1u8, at, &c, 10);
            assert!(started);
            assert_eq!(wait, Some(Duration::from_millis(expected)));
            // Inside the window: 429, the window is not extended.
            let (inside, again) = record_failure(&mut m, 1u8, at + Duration::from_millis(1), &c, 10);
            assert!(!again);
            assert_eq!(inside, Some(Duration::from_millis(expected - 1)));
            at += Duration::from_millis(expected + 1);
            expected = (expected * 2).min(1_000);
        }
        // Another key is unaffected.
        assert_eq!(record_failure(&mut m, 2u8, at, &c, 10), (None, false));
    }

    #[test]
    fn failures_are_forgotten_and_maps_stay_bounded() {
        let c = GuardConfig { failure_forget_ms: 50, ..cfg() };
        let mut m = HashMap::new();
        let t0 = Instant::now();
        for i in 0..5 {
            record_failure(&mut m, 1u32, t0 + Duration::from_millis(i), &c, 2);
        }
        let later = t0 + Duration::from_millis(200);
        assert_eq!(record_failure(&mut m, 1u32, later, &c, 2), (None, false));
        record_failure(&mut m, 2u32, later, &c, 2);
        // Full: a third key is not tracked (its request is still refused by the caller).
        assert_eq!(record_failure(&mut m, 3u32, later, &c, 2), (None, false));
        assert!(m.len() <= 2);
    }

    #[test]
    fn token_bucket_refuses_past_the_burst_and_refills() {
        let mut m = HashMap::new();
        for _ in 0..5 {
            assert_eq!(take_token(&mut m, 7u8, 10, 5, 10), None);
        }
        let wait = take_token(&mut m, 7u8, 10, 5, 10).expect("empty bucket");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(take_token(&mut m, 7u8, 10, 5, 10), None);
    }

    #[test]
    fn hash_comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
