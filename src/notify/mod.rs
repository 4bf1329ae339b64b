//! Telling the product: threshold crossings and plan changes, as signed Standard Webhooks
//! events, through an outbox in Postgres.
//!
//! Two jobs, both off the request path:
//! - `write_crossings` takes the crossings the store reports (`store::Crossing`, handed over a
//!   bounded channel that a decision never waits on) and writes them to the outbox in batches.
//!   While Postgres is unreachable it holds up to `HOLD` of them and retries; past that the
//!   channel fills and further crossings are dropped, counted
//!   (`quota_gateway_notifications_total{outcome="dropped"}`) and logged. `plan.changed` events
//!   do not go through here: they are written in the transaction that changes the plan.
//! - `Deliverer::try_deliver_once` claims due events (`FOR UPDATE SKIP LOCKED` plus a lease, see
//!   `db::notifications`), signs each per Standard Webhooks and POSTs it to the global `url`
//!   and the org's own endpoint; `deliver` only schedules it. Any replica may run it; none sends
//!   the same event twice at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::DbError;
use crate::db::notifications::{self as outbox, Claimed, NewEvent, Settled};
use crate::domain::notify::{Backoff, Crossed, EventType, threshold_crossed};
use crate::metrics::Metrics;
use crate::quota::{QuotaError, QuotaService};
use crate::store::Crossing;
use crate::webhooks::signature::{StandardKeyEncoding, sign_standard, standard_key};

/// Crossings waiting for the writer (the channel's capacity).
pub const QUEUE: usize = 10_000;
/// Crossings the writer holds while Postgres is unreachable, on top of the queue.
const HOLD: usize = 10_000;
/// Events per outbox transaction.
const BATCH: usize = 500;
/// Events claimed per delivery round.
const CLAIM_AT_MOST: i64 = 50;
/// The most of a receiver's answer that is read.
const ANSWER_READ: usize = 64 * 1024;
/// Delivered and failed events are kept this long (for `GET …/notifications`), then removed.
const RETAIN: Duration = Duration::from_secs(30 * 86_400);
/// How often each replica removes them.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// `[notifications]` in gateway.toml.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// The product's receiver of every org's events; `None`: only org endpoints get events.
    pub url: Option<String>,
    /// Standard Webhooks secret (`whsec_` + base64) for `url`.
    pub secret: Option<SecretString>,
    /// An event not delivered this long after it was written is marked failed.
    pub max_age: Duration,
    /// Per delivery attempt (connect, send, response headers).
    pub timeout: Duration,
    /// Retry schedule: the first wait, doubling up to `retry_max`, with jitter.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How often each replica looks for due events.
    pub poll_interval: Duration,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            url: None,
            secret: None,
            max_age: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Why a receiver URL is refused (`None`: usable): an absolute `http://` or `https://` URL
/// (https verified against Mozilla's root certificates, as `webpki-roots` ships them).
pub fn url_problem(url: &str) -> Option<&'static str> {
    match url.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
            None
        }
        _ => Some("must be an absolute http:// or https:// URL"),
    }
}

/// The channel between the store and the writer.
pub fn queue() -> (mpsc::Sender<Crossing>, mpsc::Receiver<Crossing>) {
    mpsc::channel(QUEUE)
}

/// A crossing with the id and time it got when the writer first saw it, kept across retries
/// so a write that committed although its answer was lost is not written twice.
struct Held {
    crossing: Crossing,
    id: uuid::Uuid,
    at: chrono::DateTime<chrono::Utc>,
}

/// Write crossings to the outbox until `stop`; then what is queued gets one last attempt.
pub async fn write_crossings(
    mut rx: mpsc::Receiver<Crossing>,
    quota: Arc<QuotaService>,
    pool: PgPool,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut held: Vec<Held> = Vec::new();
    let mut wait = Duration::from_millis(100);
    let hold = |c: Crossing, held: &mut Vec<Held>| {
        held.push(Held {
            crossing: c,
            id: uuid::Uuid::now_v7(),
            at: quota.now(),
        })
    };
    loop {
        if held.is_empty() {
            let mut fresh = Vec::with_capacity(64);
            tokio::select! {
                n = rx.recv_many(&mut fresh, BATCH) => if n == 0 { break },
                _ = stop.cancelled() => break,
            }
            for c in fresh {
                hold(c, &mut held);
            }
        }
        while held.len() < HOLD {
            match rx.try_recv() {
                Ok(c) => hold(c, &mut held),
                Err(_) => break,
            }
        }
        match write_held(&quota, &pool, &held).await {
            Ok(()) => {
                count(&metrics, "queued", held.len());
                held.clear();
                wait = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(error = %e, held = held.len(), "cannot write threshold events to the outbox yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break,
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    while let Ok(c) = rx.try_recv() {
        hold(c, &mut held);
    }
    if held.is_empty() {
        return;
    }
    match write_held(&quota, &pool, &held).await {
        Ok(()) => count(&metrics, "queued", held.len()),
        Err(e) => {
            count(&metrics, "dropped", held.len());
            tracing::error!(error = %e, events = held.len(), "threshold events lost at shutdown: Postgres did not take them");
        }
    }
}

fn count(metrics: &Metrics, outcome: &str, n: usize) {
    metrics
        .notifications
        .with_label_values(&[EventType::ThresholdCrossed.as_str(), outcome])
        .inc_by(n as u64);
}

/// Render and write held crossings, in batches of `BATCH` per transaction. The plan named in an
/// event is the org's plan when the event is written (milliseconds after the crossing).
async fn write_held(quota: &QuotaService, pool: &PgPool, held: &[Held]) -> Result<(), QuotaError> {
    let catalog = quota.catalog();
    for chunk in held.chunks(BATCH) {
        let mut events = Vec::with_capacity(chunk.len());
        for h in chunk {
            let c = &h.crossing;
            let (plan, _) = quota.org(&catalog, &c.org).await?;
            let crossed = Crossed {
                org_id: c.org.as_str(),
                metric: &c.metric,
                period: c.period,
                threshold: c.threshold,
                current: c.current,
                limit: c.limit,
            };
            events.push(NewEvent {
                id: h.id,
                org_id: c.org.as_str().to_string(),
                type_: EventType::ThresholdCrossed.as_str(),
                payload: threshold_crossed(&catalog, plan, &crossed, h.at),
            });
        }
        outbox::put(pool, &events).await?;
    }
    Ok(())
}

/// What one delivery round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    pub claimed: usize,
    pub delivered: usize,
    pub retried: usize,
    pub failed: usize,
}

/// Sends outbox events to their receivers.
#[derive(Clone)]
pub struct Deliverer {
    pool: PgPool,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The global receiver and its HMAC key.
    global: Option<(String, Arc<Vec<u8>>)>,
    settings: NotifySettings,
    metrics: Arc<Metrics>,
}

/// One receiver of one event.
struct Target<'a> {
    name: &'static str,
    url: &'a str,
    key: Arc<Vec<u8>>,
}

/// What a receiver answered.
enum Answer {
    Ok,
    /// 410 Gone from an org endpoint: it is disabled.
    Gone,
    Error(String),
}

impl Deliverer {
    /// `settings` is validated at start-up (`config`): a URL with an unusable secret is refused
    /// there, so here it only means no global receiver.
    pub fn new(pool: PgPool, settings: NotifySettings, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .expect("ring supports the default TLS versions")
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(tls);
        let global = settings
            .url
            .clone()
            .zip(settings.secret.as_ref().and_then(|s| {
                standard_key(
                    s.expose_secret(),
                    StandardKeyEncoding::Base64AfterWhsecPrefix,
                )
                .ok()
            }));
        Self {
            pool,
            client,
            global: global.map(|(u, k)| (u, Arc::new(k))),
            settings,
            metrics,
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.settings.retry_initial,
            max: self.settings.retry_max,
        }
    }

    /// Claim the due events and try each once. Returns what became of them.
    pub async fn try_deliver_once(&self) -> Result<Round, DbError> {
        // Longer than any attempt: two receivers, each within the timeout, plus slack.
        let lease = self.settings.timeout * 2 + Duration::from_secs(5);
        let claimed = outbox::claim(&self.pool, CLAIM_AT_MOST, lease).await?;
        let settled =
            futures_util::future::join_all(claimed.iter().map(|c| self.deliver_one(c))).await;
        let mut round = Round {
            claimed: claimed.len(),
            ..Round::default()
        };
        for (c, s) in claimed.iter().zip(settled) {
            let outcome = match s? {
                Settled::Delivered => {
                    round.delivered += 1;
                    "delivered"
                }
                Settled::Retry(_) => {
                    round.retried += 1;
                    "retried"
                }
                Settled::Failed => {
                    round.failed += 1;
                    "failed"
                }
            };
            let type_ = EventType::parse(&c.type_).map_or("other", EventType::as_str);
            self.metrics
                .notifications
                .with_label_values(&[type_, outcome])
                .inc();
        }
        Ok(round)
    }

    async fn deliver_one(&self, c: &Claimed) -> Result<Settled, DbError> {
        let mut delivered = c.delivered_to.clone();
        let mut errors: Vec<String> = Vec::new();
        let mut targets = Vec::with_capacity(2);
        if let Some((url, key)) = &self.global
            && !delivered.iter().any(|d| d == "global")
        {
            targets.push(Target {
                name: "global",
                url,
                key: key.clone(),
            });
        }
        if let Some((url, secret)) = &c.endpoint
            && !delivered.iter().any(|d| d == "org")
        {
            match standard_key(
                secret.expose_secret(),
                StandardKeyEncoding::Base64AfterWhsecPrefix,
            ) {
                Ok(key) => targets.push(Target {
                    name: "org",
                    url,
                    key: Arc::new(key),
                }),
                Err(_) => errors.push("org: unusable endpoint secret".into()),
            }
        }
        let nowhere = targets.is_empty() && delivered.is_empty() && errors.is_empty();
        let id = c.id.to_string();
        let answers = futures_util::future::join_all(
            targets
                .iter()
                .map(|t| self.post(t.url, &t.key, &id, c.body.as_bytes())),
        )
        .await;
        let mut remaining = errors.len();
        for (t, answer) in targets.iter().zip(answers) {
            match answer {
                Answer::Ok => delivered.push(t.name.to_string()),
                Answer::Gone if t.name == "org" => {
                    outbox::disable_endpoint(&self.pool, &c.org_id, t.url).await?;
                    tracing::warn!(org = %c.org_id, "org notification endpoint answered 410 Gone; disabled");
                    errors.push("org: 410 Gone, endpoint disabled".into());
                }
                Answer::Gone => {
                    remaining += 1;
                    errors.push(format!("{}: HTTP 410", t.name));
                }
                Answer::Error(e) => {
                    remaining += 1;
                    errors.push(format!("{}: {e}", t.name));
                }
            }
        }
        let outcome = if nowhere {
            errors.push("no receiver: neither [notifications] url nor an org endpoint".into());
            Settled::Failed
        } else if remaining == 0 {
            if delivered.is_empty() {
                Settled::Failed
            } else {
                Settled::Delivered
            }
        } else {
            let attempt = u32::try_from(c.attempts).unwrap_or(1).max(1);
            let wait = self.backoff().after(attempt, rand::random::<f64>());
            let give_up = c.created_at
                + chrono::Duration::from_std(self.settings.max_age)
                    .unwrap_or(chrono::Duration::MAX);
            let next = chrono::Utc::now()
                + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
            if next > give_up {
                errors.push("max_age reached".into());
                Settled::Failed
            } else {
                Settled::Retry(wait)
            }
        };
        let last_error = (!errors.is_empty()).then(|| errors.join("; "));
        if let Some(e) = &last_error {
            tracing::info!(event = %c.id, org = %c.org_id, attempt = c.attempts, error = %e, "notification not delivered");
        }
        outbox::settle(
            &self.pool,
            c.id,
            &delivered,
            &outcome,
            last_error.as_deref(),
        )
        .await?;
        Ok(outcome)
    }

    /// One signed POST. Errors name what happened, never the URL or the payload.
    async fn post(&self, url: &str, key: &[u8], id: &str, body: &[u8]) -> Answer {
        let t = chrono::Utc::now().timestamp();
        let signature = sign_standard(key, id, t, body);
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("quota-gateway/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", id)
            .header("webhook-timestamp", t)
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::copy_from_slice(body)));
        let Ok(request) = request else {
            return Answer::Error("invalid URL".into());
        };
        let call = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            // Read (and drop) what the receiver answers, so the connection can be reused; a
            // receiver's answer is not ours to hold, so at most `ANSWER_READ` of it.
            let _ = http_body_util::Limited::new(response.into_body(), ANSWER_READ)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>(status)
        };
        match tokio::time::timeout(self.settings.timeout, call).await {
            Err(_) => Answer::Error("timed out".into()),
            Ok(Err(e)) if e.is_connect() => {
                // The innermost cause says which: refused, DNS, or TLS (certificate, protocol).
                let mut cause: &dyn std::error::Error = &e;
                while let Some(next) = cause.source() {
                    cause = next;
                }
                Answer::Error(format!("cannot connect: {cause}"))
            }
            Ok(Err(_)) => Answer::Error("connection failed".into()),
            Ok(Ok(s)) if s.is_success() => Answer::Ok,
            Ok(Ok(s)) if s == http::StatusCode::GONE => Answer::Gone,
            Ok(Ok(s)) => Answer::Error(format!("HTTP {}", s.as_u16())),
        }
    }
}

/// Deliver due events every `poll_interval` until `stop`, and keep the oldest-pending gauge
/// current. Only schedules: the work is `try_deliver_once`.
pub async fn deliver(d: Deliverer, stop: CancellationToken) {
    let mut pruned: Option<std::time::Instant> = None;
    let mut failing = false;
    loop {
        if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            match outbox::prune(&d.pool, RETAIN).await {
                Ok(n) => {
                    pruned = Some(std::time::Instant::now());
                    if n > 0 {
                        tracing::debug!(events = n, "old notifications removed");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot prune the notification outbox"),
            }
        }
        match outbox::oldest_pending_age(&d.pool).await {
            Ok(age) => d.metrics.notifications_oldest_pending.set(age),
            Err(e) => tracing::debug!(error = %e, "cannot read the notification outbox"),
        }
        loop {
            match d.try_deliver_once().await {
                Ok(round) => {
                    if failing {
                        tracing::info!("notification delivery works again");
                        failing = false;
                    }
                    if round.claimed as i64 != CLAIM_AT_MOST || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    // Once per outage, not once per poll.
                    if !failing {
                        tracing::warn!(error = %e, "notification delivery round failed; retrying");
                        failing = true;
                    }
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(d.settings.poll_interval) => {}
            _ = stop.cancelled() => break,
        }
    }
}
