//! A typed client for quota-gateway's `/v1` API, for services that ask the gateway instead of
//! sitting behind its proxy.
//!
//! ```no_run
//! # async fn demo() -> Result<(), quota_gateway_client::Error> {
//! use quota_gateway_client::{Charge, Client, Error, UsageEvent};
//!
//! let gateway = Client::builder("http://127.0.0.1:9000").build()?;
//! match gateway.check("acme", &[Charge::new("requests", 1)]).await {
//!     Ok(allowed) => println!("allowed on {}", allowed.plan.name),
//!     Err(Error::QuotaExceeded(denial)) => {
//!         // 402: show the upgrade hint.
//!         if let Some(upgrade) = &denial.upgrade {
//!             println!("upgrade to {} at {:?}", upgrade.name, upgrade.url);
//!         }
//!     }
//!     Err(Error::RateLimited(denial)) => println!("retry in {:?}s", denial.retry_after_seconds),
//!     Err(e) => return Err(e),
//! }
//! gateway.report(UsageEvent::new("acme", "tokens", 1234)).await?;
//! # Ok(()) }
//! ```
//!
//! Design:
//! - **Denials are errors with types.** A 402 is `Error::QuotaExceeded`, a 429
//!   `Error::RateLimited`, each carrying the problem document (plan, limit, upgrade hint,
//!   `retry_after_seconds`). Every other refusal keeps the gateway's `error` code and message.
//! - **Retries only where they cannot count twice.** Usage reports always carry an idempotency
//!   key (one is generated when the caller gives none) and a retry reuses it, so a report whose
//!   answer was lost is retried freely. A check that consumes has no key: it is retried only when
//!   the gateway cannot have counted it (the connection was refused, or 503, which the gateway
//!   answers before counting or after crediting back). Back-off doubles from
//!   `ClientBuilder::backoff` up to 2 s.
//! - **Every call has a deadline** (`ClientBuilder::timeout`, 2 s by default, per attempt).
//! - `/openapi.json` on the gateway is the source of truth for other languages (see the
//!   README); these types follow it and ignore fields they do not know, so a newer gateway does
//!   not break an older client.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

/// The gateway refuses larger `/v1/usage` batches (413); `report_batch` splits at this size.
pub const MAX_BATCH: usize = 10_000;

const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 402: a quota is used up. Retrying will not help; the upgrade hint may.
    #[error("quota exceeded: {}", .0.detail)]
    QuotaExceeded(Box<Denial>),
    /// 429: a rate limit; `retry_after_seconds` says when the same call would fit.
    #[error("rate limited: {}", .0.detail)]
    RateLimited(Box<Denial>),
    /// Any other answer that is not a success, after retries where they apply: 401 (service
    /// token), 404, 413, 422 (the message names the field), 503 (store or database unavailable).
    #[error("{status} {code}: {message}")]
    Refused {
        status: u16,
        /// The gateway's `error` member, e.g. `unprocessable`, `store_unavailable`.
        code: String,
        message: String,
    },
    /// No answer: connection refused or reset, or the timeout passed (after retries).
    #[error("gateway unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// An answer that is not the JSON this client expects.
    #[error("unexpected answer from the gateway: {0}")]
    Decode(String),
    /// The client could not be built (e.g. a base URL that is not a URL).
    #[error("client configuration: {0}")]
    Config(String),
}

impl Error {
    /// The upgrade hint of a 402 or 429, when the plan has a next plan up.
    pub fn upgrade(&self) -> Option<&Upgrade> {
        match self {
            Error::QuotaExceeded(d) | Error::RateLimited(d) => d.upgrade.as_ref(),
            _ => None,
        }
    }
}

/// The problem document of a 402 or a 429 (RFC 9457 plus the gateway's members).
#[derive(Debug, Clone, Deserialize)]
pub struct Denial {
    pub status: u16,
    /// `quota_exceeded` or `rate_limited`.
    pub error: String,
    pub detail: String,
    pub plan: PlanRef,
    #[serde(default)]
    pub quota: Option<QuotaInfo>,
    #[serde(default)]
    pub rate: Option<RateInfo>,
    #[serde(default)]
    pub retry_after_seconds: Option<u64>,
    #[serde(default)]
    pub upgrade: Option<Upgrade>,
    /// The level whose limit denied: `org`, `key` or `user`.
    #[serde(default = "org")]
    pub scope: String,
    /// With `scope == "key"`: the API key's id.
    #[serde(default)]
    pub key_id: Option<String>,
    /// With `scope == "user"`: the end user.
    #[serde(default)]
    pub user_id: Option<String>,
}

fn org() -> String {
    "org".to_string()
}

/// The levels below the org a check or report is also counted at: an API key (its id) and an
/// end user, for plans with `per = "key"` or `per = "user"` limits.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Caller {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

impl Caller {
    pub fn user(user_id: impl Into<String>) -> Self {
        Self {
            user_id: Some(user_id.into()),
            key_id: None,
        }
    }

    pub fn key(key_id: impl Into<String>) -> Self {
        Self {
            key_id: Some(key_id.into()),
            user_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PlanRef {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuotaInfo {
    pub metric: String,
    pub current: i64,
    pub limit: Option<u64>,
    pub period: Option<String>,
    pub resets_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RateInfo {
    pub metric: String,
    pub limit: Option<u64>,
    pub window: String,
}

/// The plan to suggest, with its limit for the same metric (`None`: unlimited there) and the
/// catalog's upgrade URL for this org.
#[derive(Debug, Clone, Deserialize)]
pub struct Upgrade {
    pub plan: String,
    pub name: String,
    pub limit: Option<u64>,
    pub url: Option<String>,
}

/// One metric to charge in a check.
#[derive(Debug, Clone, Serialize)]
pub struct Charge {
    pub metric: String,
    pub amount: u64,
}

impl Charge {
    pub fn new(metric: impl Into<String>, amount: u64) -> Self {
        Self {
            metric: metric.into(),
            amount,
        }
    }
}

/// A check that was allowed (200).
#[derive(Debug, Clone, Deserialize)]
pub struct Allowed {
    pub org_id: String,
    pub plan: PlanRef,
    #[serde(default)]
    pub dry_run: bool,
    /// In shadow mode a would-be denial is allowed and marked.
    #[serde(default)]
    pub shadow: bool,
    #[serde(default)]
    pub usage: Vec<UsageEntry>,
}

/// One metric's standing, as `/v1/check` and `/v1/orgs/{org}/usage` report it.
#[derive(Debug, Clone, Deserialize)]
pub struct UsageEntry {
    pub metric: String,
    pub unit: String,
    pub kind: String,
    pub current: i64,
    pub limit: Option<u64>,
    #[serde(default)]
    pub remaining: Option<i64>,
    #[serde(default)]
    pub unlimited: bool,
    #[serde(default)]
    pub period: Option<String>,
    #[serde(default)]
    pub resets_at: Option<String>,
}

/// An org's usage of every declared metric.
#[derive(Debug, Clone, Deserialize)]
pub struct Usage {
    pub org_id: String,
    pub plan: PlanRef,
    pub usage: Vec<UsageEntry>,
}

impl Usage {
    pub fn metric(&self, metric: &str) -> Option<&UsageEntry> {
        self.usage.iter().find(|u| u.metric == metric)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Entitlements {
    pub org_id: String,
    pub plan: PlanRef,
    pub features: BTreeMap<String, bool>,
}

/// Usage to record after the fact. Without an idempotency key the client makes one, so that a
/// retry is recognised as the same event.
#[derive(Debug, Clone, Serialize)]
pub struct UsageEvent {
    pub org_id: String,
    pub metric: String,
    pub amount: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Also count it at this API key's and end user's levels.
    #[serde(flatten)]
    pub caller: Caller,
}

impl UsageEvent {
    pub fn new(org_id: impl Into<String>, metric: impl Into<String>, amount: i64) -> Self {
        Self {
            org_id: org_id.into(),
            metric: metric.into(),
            amount,
            idempotency_key: None,
            caller: Caller::default(),
        }
    }

    /// Count the event at an API key's and an end user's levels too.
    pub fn caller(mut self, caller: Caller) -> Self {
        self.caller = caller;
        self
    }

    /// Your own key (e.g. the request id that caused the usage): resending the event later,
    /// from anywhere, is then a duplicate too.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    fn keyed(mut self) -> Self {
        if self.idempotency_key.is_none() {
            self.idempotency_key = Some(format!("qgc-{}", uuid::Uuid::new_v4().simple()));
        }
        self
    }
}

/// The answer to one usage report.
#[derive(Debug, Clone, Deserialize)]
pub struct Recorded {
    /// False when the key was seen before: the event was not counted again.
    pub recorded: bool,
    pub duplicate: bool,
    /// The key the event was sent with (yours, or the one the client made).
    #[serde(skip)]
    pub idempotency_key: String,
}

/// The answer to a batch (summed over the requests `report_batch` split it into).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchRecorded {
    pub recorded: usize,
    pub duplicates: usize,
    /// Accepted while the gateway could not ask Redis: counted once, unless a duplicate.
    pub deferred: usize,
}

#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base: String,
    service_token: Option<String>,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
}

impl ClientBuilder {
    /// `Authorization: Bearer <token>` on every call, for a gateway with `[api] service_token`.
    pub fn service_token(mut self, token: impl Into<String>) -> Self {
        self.service_token = Some(token.into());
        self
    }

    /// The deadline of each attempt (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Attempts after the first one, where a retry is safe (default 3).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The first back-off (default 50 ms); it doubles per retry, up to 2 s.
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        let base = self.base.trim_end_matches('/').to_string();
        reqwest::Url::parse(&base).map_err(|e| Error::Config(format!("base URL `{base}`: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(self.timeout)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Client {
            http,
            base,
            service_token: self.service_token,
            retries: self.retries,
            backoff: self.backoff,
        })
    }
}

/// A client for one gateway (or a load balancer in front of several). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    service_token: Option<String>,
    retries: u32,
    backoff: Duration,
}

/// Whether a failed attempt may be sent again.
#[derive(Clone, Copy, PartialEq)]
enum Retry {
    /// The request carries its idempotency key (or changes nothing): any failure to get an
    /// answer, and any 5xx, may be retried.
    Always,
    /// It may count when repeated: only when the gateway cannot have counted it.
    WhenNotCounted,
}

impl Client {
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base: base_url.into(),
            service_token: None,
            timeout: Duration::from_secs(2),
            retries: 3,
            backoff: Duration::from_millis(50),
        }
    }

    /// May `org_id` spend these? Consumes them when allowed (all or none).
    pub async fn check(&self, org_id: &str, charges: &[Charge]) -> Result<Allowed, Error> {
        self.check_with(org_id, &Caller::default(), charges, true)
            .await
    }

    /// `check`, also against the limits of an API key and an end user of the org.
    pub async fn check_as(
        &self,
        org_id: &str,
        caller: &Caller,
        charges: &[Charge],
    ) -> Result<Allowed, Error> {
        self.check_with(org_id, caller, charges, true).await
    }

    /// The same answer as `check`, without consuming anything.
    pub async fn check_dry_run(&self, org_id: &str, charges: &[Charge]) -> Result<Allowed, Error> {
        self.check_with(org_id, &Caller::default(), charges, false)
            .await
    }

    async fn check_with(
        &self,
        org_id: &str,
        caller: &Caller,
        charges: &[Charge],
        consume: bool,
    ) -> Result<Allowed, Error> {
        let mut body =
            serde_json::json!({ "org_id": org_id, "charges": charges, "consume": consume });
        if let Some(k) = &caller.key_id {
            body["key_id"] = k.as_str().into();
        }
        if let Some(u) = &caller.user_id {
            body["user_id"] = u.as_str().into();
        }
        let retry = if consume {
            Retry::WhenNotCounted
        } else {
            Retry::Always
        };
        self.send(retry, || self.http.post(self.url("/v1/check")).json(&body))
            .await
    }

    /// Record usage after the fact; never denied. Retried under the same idempotency key.
    pub async fn report(&self, event: UsageEvent) -> Result<Recorded, Error> {
        let event = event.keyed();
        let mut recorded: Recorded = self
            .send(Retry::Always, || {
                self.http.post(self.url("/v1/usage")).json(&event)
            })
            .await?;
        recorded.idempotency_key = event.idempotency_key.unwrap_or_default();
        Ok(recorded)
    }

    /// Record many events: keyed first (so a retried chunk is recognised), then sent in chunks
    /// of `MAX_BATCH`, one request each. A chunk that fails stops the batch; the error is
    /// returned and resending the same events is safe (their keys make them duplicates).
    pub async fn report_batch(
        &self,
        events: impl IntoIterator<Item = UsageEvent>,
    ) -> Result<BatchRecorded, Error> {
        #[derive(Deserialize)]
        struct Answer {
            recorded: usize,
            duplicates: usize,
            #[serde(default)]
            deferred: usize,
        }
        let events: Vec<UsageEvent> = events.into_iter().map(UsageEvent::keyed).collect();
        let mut total = BatchRecorded::default();
        for chunk in events.chunks(MAX_BATCH) {
            let body = serde_json::json!({ "events": chunk });
            let a: Answer = self
                .send(Retry::Always, || {
                    self.http.post(self.url("/v1/usage")).json(&body)
                })
                .await?;
            total.recorded += a.recorded;
            total.duplicates += a.duplicates;
            total.deferred += a.deferred;
        }
        Ok(total)
    }

    /// The org's live usage of every declared metric.
    pub async fn usage(&self, org_id: &str) -> Result<Usage, Error> {
        let url = self.url(&format!("/v1/orgs/{}/usage", path_segment(org_id)));
        self.send(Retry::Always, || self.http.get(&url)).await
    }

    /// A past month's usage from the ledger (`period`: `YYYY-MM`).
    pub async fn usage_in(&self, org_id: &str, period: &str) -> Result<Usage, Error> {
        let url = self.url(&format!(
            "/v1/orgs/{}/usage?period={}",
            path_segment(org_id),
            path_segment(period)
        ));
        self.send(Retry::Always, || self.http.get(&url)).await
    }

    /// The feature flags of the org's plan.
    pub async fn entitlements(&self, org_id: &str) -> Result<Entitlements, Error> {
        let url = self.url(&format!("/v1/orgs/{}/entitlements", path_segment(org_id)));
        self.send(Retry::Always, || self.http.get(&url)).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        retry: Retry,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, Error> {
        let mut attempt = 0;
        loop {
            let mut req = request();
            if let Some(token) = &self.service_token {
                req = req.bearer_auth(token);
            }
            let outcome = match req.send().await {
                Ok(response) => answer(response).await,
                Err(e) => Err(Error::Transport(e)),
            };
            let again = match &outcome {
                Err(Error::Transport(e)) => retry == Retry::Always || e.is_connect(),
                Err(Error::Refused { status, .. }) => match retry {
                    Retry::Always => *status >= 500,
                    Retry::WhenNotCounted => *status == 503,
                },
                _ => false,
            };
            if !again || attempt >= self.retries {
                return outcome;
            }
            let delay = self.backoff.saturating_mul(1 << attempt.min(16));
            tokio::time::sleep(delay.min(MAX_BACKOFF)).await;
            attempt += 1;
        }
    }
}

/// The typed outcome of one answer.
async fn answer<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, Error> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(Error::Transport)?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| Error::Decode(format!("{status}: {e}")));
    }
    if status == StatusCode::PAYMENT_REQUIRED || status == StatusCode::TOO_MANY_REQUESTS {
        let denial: Denial = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Decode(format!("{status} problem document: {e}")))?;
        return Err(if status == StatusCode::PAYMENT_REQUIRED {
            Error::QuotaExceeded(Box::new(denial))
        } else {
            Error::RateLimited(Box::new(denial))
        });
    }
    #[derive(Deserialize)]
    struct Problem {
        error: Option<String>,
        message: Option<String>,
    }
    let problem: Option<Problem> = serde_json::from_slice(&bytes).ok();
    let (code, message) = match problem {
        Some(p) => (p.error, p.message),
        None => (None, None),
    };
    Err(Error::Refused {
        status: status.as_u16(),
        code: code.unwrap_or_else(|| "unknown".into()),
        message: message
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect()),
    })
}

/// Org ids are `A-Za-z0-9._:-`, all safe in a path (and a query); anything else is escaped so
/// that a bad id reaches the gateway as that id (and gets its 422), never as another path.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._:-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_ids_stay_one_path_segment() {
        assert_eq!(path_segment("acme-corp_1.x:y"), "acme-corp_1.x:y");
        assert_eq!(path_segment("../admin"), "..%2Fadmin");
        assert_eq!(path_segment("a b"), "a%20b");
    }

    #[test]
    fn events_without_a_key_get_one_and_keep_it() {
        let e = UsageEvent::new("acme", "tokens", 5).keyed();
        let key = e.idempotency_key.clone().unwrap();
        assert!(key.starts_with("qgc-"));
        assert_eq!(e.keyed().idempotency_key.unwrap(), key);
        let mine = UsageEvent::new("acme", "tokens", 5)
            .idempotency_key("req-1")
            .keyed();
        assert_eq!(mine.idempotency_key.as_deref(), Some("req-1"));
    }
}
