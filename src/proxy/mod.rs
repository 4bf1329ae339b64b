//! The metering reverse proxy on `[proxy].listen`.
//!
//! Every request goes through the same four steps, in this order:
//! 1. **identify**: route first (an unmetered route skips everything else), then the org from the
//!    API key or the trusted header. Nothing reaches the quota engine without an org, and nothing
//!    reaches the upstream without having been identified.
//! 2. **decide**: charge the route's metrics in one Redis round trip (`QuotaService::decide`,
//!    `Mode::Check`). A denial is answered here with the same code as `/v1/check`, so the upstream
//!    never sees traffic the org may not spend. Charging *before* forwarding is what makes the
//!    limits exact under concurrency; the price is a refund when the upstream fails (step 4).
//! 3. **forward**: header hygiene, then the request body streams to the upstream and the response
//!    body back, both as hyper `Incoming` bodies (never collected), so memory stays bounded by
//!    hyper's buffers whatever the size.
//! 4. **record**: after the upstream's response headers: refund per `refund_on` on 5xx, connect
//!    errors and timeouts; usage the upstream reports in headers is recorded in a tracked
//!    background task (it never delays or fails the client's response).
//!
//! Before step 1 the path is put in its canonical form (`path`): routes are matched against it
//! and the upstream receives exactly it, so no spelling reaches a route the gateway did not match.
//!
//! Connections are accepted by the loop both listeners share (`crate::serve`: connection cap,
//! header and body timeouts, `Host` checks) and served by hyper-util's auto builder (HTTP/1.1
//! with keep-alive, or HTTP/2 by prior knowledge); upstream connections come from one pooled
//! keep-alive client.

pub mod headers;
pub mod identity;
pub mod path;
pub mod reserve;
pub mod routes;
pub mod settings;
pub mod settle;
pub mod slot_body;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Body;
use axum::response::IntoResponse;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::decision::Charge;
use crate::domain::decision::Mode;
use crate::domain::level::Caller;
use crate::domain::org::OrgId;
use crate::domain::plan::Catalog;
use crate::domain::render;
use crate::http::error::ApiError;
use crate::http::respond;
use crate::metrics::Metrics;
use crate::quota::QuotaService;
use crate::serve::{self, RequestBody};
use identity::{Identifier, IdentityError};
use reserve::Prefixed;
use routes::{ChargeSpec, Estimate, ReserveSpec, RouteAction};
use settings::{IdentityMode, ProxySettings};
use settle::{Metered, Settle, Source};

/// Largest reported usage accepted from an upstream header: the largest counter value.
const MAX_REPORTED: u64 = crate::domain::decision::MAX_COUNTER as u64;

/// Counters tests read directly (the same events are also in Prometheus, see `metrics`).
#[derive(Default)]
pub struct ProxyStats {
    /// Upstream usage-report headers that were not a non-negative integer.
    pub malformed_reports: AtomicU64,
    /// Requests whose charges were given back.
    pub refunds: AtomicU64,
    /// Requests being handled right now (up to the response headers).
    pub in_flight: AtomicU64,
}

/// Counts a request in `in_flight` for as long as its future lives, including when hyper drops
/// it because the client went away.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the proxy uses of the rest of the gateway.
pub struct ProxyDeps {
    pub quota: Arc<QuotaService>,
    pub metrics: Arc<Metrics>,
    /// API keys and org records (identity).
    pub pool: sqlx::PgPool,
}

pub struct ProxyState {
    settings: ProxySettings,
    app: ProxyDeps,
    identifier: Identifier,
    client: Client<HttpConnector, Prefixed>,
    /// Work that outlives a response: usage recording and WebSocket tunnels. Shutdown waits for
    /// it within the drain time.
    tasks: TaskTracker,
    /// Cancelled when the drain time is over: whatever is still running is cut.
    force: CancellationToken,
    pub stats: ProxyStats,
}

/// The bound proxy listener, ready to serve.
pub struct ProxyServer {
    listener: TcpListener,
    addr: SocketAddr,
    state: Arc<ProxyState>,
}

impl ProxyServer {
    pub async fn bind(settings: ProxySettings, app: ProxyDeps) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding the proxy listener on {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let identifier = Identifier::new(
            settings.identity.clone(),
            app.pool.clone(),
            app.quota.directory(),
        );
        let state = Arc::new(ProxyState {
            settings,
            app,
            identifier,
            client,
            tasks: TaskTracker::new(),
            force: CancellationToken::new(),
            stats: ProxyStats::default(),
        });
        Ok(Self {
            listener,
            addr,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> Arc<ProxyState> {
        self.state.clone()
    }

    /// Accept connections until `stop` fires, then stop accepting, let in-flight exchanges finish
    /// for up to `drain_timeout`, and cut whatever is left.
    pub async fn serve(self, stop: CancellationToken) {
        let Self {
            listener, state, ..
        } = self;
        let listening = serve::Listener {
            name: "proxy",
            conn: state.settings.conn,
            metrics: state.app.metrics.clone(),
        };
        let conns = serve::accept_loop(listener, listening, stop, state.force.clone(), |peer| {
            let peer = Arc::new(headers::Peer::new(peer));
            let state = state.clone();
            move |req| {
                let state = state.clone();
                let peer = peer.clone();
                async move {
                    let _counted = InFlight::new(&state.stats.in_flight);
                    observed(state.clone(), &peer, req).await
                }
            }
        })
        .await;
        state.tasks.close();
        let drain = state.settings.drain_timeout;
        let drained = tokio::time::timeout(drain, async {
            conns.wait().await;
            state.tasks.wait().await;
        })
        .await;
        match drained {
            Ok(()) => tracing::info!("proxy drained"),
            Err(_) => {
                tracing::warn!(
                    drain_s = drain.as_secs(),
                    "proxy drain time over; closing what is left"
                );
                state.force.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
            }
        }
    }
}

/// What one proxied request did, for its log line and the metrics.
struct Observation {
    outcome: &'static str,
    org: Option<OrgId>,
    plan: Option<String>,
    /// When the request was handed to the upstream (the gateway's overhead ends here).
    forwarded_at: Option<Instant>,
}

/// One request with its timing, metrics and one info log line (never a key or a body).
async fn observed(
    state: Arc<ProxyState>,
    peer: &headers::Peer,
    mut req: Request<RequestBody>,
) -> Response<Body> {
    let started = Instant::now();
    // Fix the request id now, so the log line and the upstream see the same one.
    if !req.headers().contains_key(&headers::X_REQUEST_ID) {
        let id = headers::request_id(req.headers());
        req.headers_mut().insert(headers::X_REQUEST_ID.clone(), id);
    }
    let request_id = req.headers().get(&headers::X_REQUEST_ID).cloned();
    let method = req.method().clone();
    if let Err(e) = canonicalise(&mut req) {
        tracing::info!(
            method = %method,
            reason = %e,
            request_id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
            "refused a request path"
        );
        return ApiError::BadPath(e.to_string()).into_response();
    }
    let route = state
        .settings
        .routes
        .route_label(req.method(), req.uri().path());
    let mut obs = Observation {
        outcome: "error",
        org: None,
        plan: None,
        forwarded_at: None,
    };
    let response = handle(&state, peer, req, &mut obs).await;
    let metrics = &state.app.metrics;
    let elapsed = started.elapsed();
    metrics
        .proxy_request_duration
        .observe(elapsed.as_secs_f64());
    if let Some(at) = obs.forwarded_at {
        metrics
            .proxy_overhead
            .observe(at.duration_since(started).as_secs_f64());
    }
    tracing::info!(
        method = %method,
        route = %route,
        status = response.status().as_u16(),
        org = obs.org.as_ref().map(OrgId::as_str).unwrap_or("-"),
        plan = obs.plan.as_deref().unwrap_or("-"),
        decision = obs.outcome,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        request_id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
        "proxied"
    );
    response
}

/// Put the request's path in its canonical form, in place, before anything reads it: route
/// matching, the log line and the upstream URI all see the same path. The query is kept as sent.
fn canonicalise(req: &mut Request<RequestBody>) -> Result<(), path::PathError> {
    let canonical = match path::canonical(req.uri().path())? {
        Cow::Borrowed(_) => return Ok(()),
        Cow::Owned(p) => p,
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical,
    };
    let mut parts = req.uri().clone().into_parts();
    // Built from a valid path's bytes, decoded unreserved characters and `%XX` escapes only.
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| path::PathError::BadEscape)?,
    );
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| path::PathError::BadEscape)?;
    Ok(())
}

/// Steps 1–4 for one request (see the module docs for why in this order).
async fn handle(
    state: &Arc<ProxyState>,
    peer: &headers::Peer,
    req: Request<RequestBody>,
    obs: &mut Observation,
) -> Response<Body> {
    let Some(action) = state.settings.routes.find(req.method(), req.uri().path()) else {
        return ApiError::NoRoute.into_response();
    };
    if action.unmetered {
        obs.outcome = "unmetered";
        obs.forwarded_at = Some(Instant::now());
        let forwarded = timed_forward(state, peer, req.map(Prefixed::plain), action, None).await;
        return forwarded
            .map(|f| f.response)
            .unwrap_or_else(|e| e.response());
    }

    // 1. identify
    let identified = match state.identifier.identify(req.headers()).await {
        Ok(i) => i,
        Err(IdentityError::Unauthorized(msg)) => {
            obs.outcome = "unauthorized";
            state
                .app
                .metrics
                .decision("proxy", "unauthorized", "", [""]);
            return ApiError::Unauthorized(msg).into_response();
        }
        Err(IdentityError::Db(e)) => return ApiError::Db(e).into_response(),
    };
    let org = identified.org.clone();
    obs.org = Some(org.clone());
    let user = match state.identifier.user(req.headers()) {
        Ok(u) => u,
        Err(e) => return ApiError::bad_request_code("invalid_user_id", e).into_response(),
    };
    let caller = Caller {
        key: identified.key_id.clone(),
        user,
    };
    let levels = caller.levels();

    // 2. decide. A reservation's estimate is read first (from a header, or the body's first
    // `reserve::PREFIX_LIMIT` bytes, which are then replayed), and charged with the route's
    // charges; metrics charged after the response must have room left (`charged_after`).
    let catalog = state.app.quota.catalog();
    let (req, estimate) = match &action.reserve {
        None => (req.map(Prefixed::plain), None),
        Some(spec) => {
            let (req, estimate) = read_estimate(spec, req).await;
            (req, Some(estimate))
        }
    };
    let mut charges = match resolve(&catalog, &action.charges) {
        Ok(c) => c,
        Err(metric) => return misconfigured(&metric),
    };
    let mut after = Vec::new();
    for name in action.charged_after() {
        match catalog.metric(name) {
            Some(m) => after.push(m),
            None => return misconfigured(name),
        }
    }
    if let (Some(spec), Some(estimate)) = (&action.reserve, estimate)
        && estimate > 0
        && let Some(metric) = catalog.metric(&spec.metric)
    {
        charges.push(Charge {
            metric,
            amount: estimate as i64,
        });
    }
    // With a concurrency limit in the plan, this takes the request's slot in the same call; it
    // is held by the response body (see `slot_body`).
    let mut decision = match state
        .app
        .quota
        .decide_in_flight(&catalog, &org, &levels, &charges, &after)
        .await
    {
        Ok(d) => d,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let slot = decision.slot.take();
    let mut limit_headers = render::ratelimit_headers(&decision.eval);
    let outcome = decision.eval.outcome.label();
    obs.outcome = outcome;
    obs.plan = Some(decision.plan.id.clone());
    state.app.metrics.decision(
        "proxy",
        outcome,
        &decision.plan.id,
        charges.iter().map(|c| c.metric.id.as_str()),
    );
    if let Some(body) = render::denial_body(&catalog, org.as_str(), decision.plan, &decision.eval) {
        if !decision.shadow {
            return respond::denial(&body, &limit_headers);
        }
        // Forwarded anyway.
        respond::shadow_denial(&mut limit_headers, org.as_str(), &decision.plan.id, outcome);
    }

    // 3. forward
    let upstream = Upstream {
        identified: &identified,
        plan_id: &decision.plan.id,
    };
    obs.forwarded_at = Some(Instant::now());
    let forwarded = timed_forward(state, peer, req, action, Some(upstream)).await;

    // 4. record
    let refund_on = state.settings.refund_on;
    let (mut response, refund) = match forwarded {
        Ok(f) => {
            let failed = f.response.status().is_server_error();
            (f.response, failed && refund_on.server_error)
        }
        Err(e) => {
            let refund = match e {
                ForwardError::Connect => refund_on.connect_error,
                ForwardError::Timeout => refund_on.timeout,
                ForwardError::Upstream => refund_on.server_error,
            };
            (e.response(), refund)
        }
    };
    if refund {
        obs.outcome = "refunded";
        state.stats.refunds.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = state
            .app
            .quota
            .refund(&catalog, &org, &levels, &charges)
            .await
        {
            tracing::error!(error = %e, org = %org, "cannot refund a failed proxied request");
        }
    }
    record_reports(state, &catalog, &org, &caller, action, &mut response);
    if let (Some(spec), Some(estimate)) = (&action.reserve, estimate)
        && !refund
    {
        let settle = Box::new(ProxySettle {
            state: state.clone(),
            catalog: catalog.clone(),
            org: org.clone(),
            caller: caller.clone(),
            metric: spec.metric.clone(),
            estimate,
            on_missing: spec.on_missing,
        });
        response = settle_from(spec, response, settle);
    }
    // After a refund the decision's remaining counts are stale: better none than wrong ones.
    if !refund {
        respond::insert_ratelimit_headers(response.headers_mut(), &limit_headers);
    }
    // The slot is given back when the body ends or is dropped. An upgraded connection (101)
    // has an empty body here: its tunnel does not hold a slot.
    match slot {
        Some(slot) => response.map(|body| slot_body::SlotBody::wrap(body, slot)),
        None => response,
    }
}

/// The route's charges against the current catalog; `Err(metric)` when a metric vanished in a
/// catalog reload (configuration checks make this impossible at start-up).
fn resolve<'c>(catalog: &'c Catalog, specs: &[ChargeSpec]) -> Result<Vec<Charge<'c>>, String> {
    specs
        .iter()
        .map(|s| {
            catalog
                .metric(&s.metric)
                .map(|metric| Charge {
                    metric,
                    amount: s.amount,
                })
                .ok_or_else(|| s.metric.clone())
        })
        .collect()
}

fn misconfigured(metric: &str) -> Response<Body> {
    tracing::error!(
        metric,
        "a proxy route charges a metric the catalog no longer declares"
    );
    ApiError::Misconfigured.into_response()
}

/// Take the usage-report headers off the upstream response and record valid values in the
/// background, once per exchange. No idempotency key: the proxy is the only writer of these
/// records and sends each once, and a call whose answer is late is settled by the in-doubt
/// machinery (`local`) like any decision. A key per exchange would leave one Redis key per
/// proxied request for the key's whole TTL, so Redis memory would grow with traffic.
fn record_reports(
    state: &Arc<ProxyState>,
    catalog: &Arc<Catalog>,
    org: &OrgId,
    caller: &Caller,
    action: &RouteAction,
    response: &mut Response<Body>,
) {
    if action.report.is_empty() {
        return;
    }
    let mut reported: Vec<(String, i64)> = Vec::new();
    for spec in &action.report {
        let Some(raw) = response.headers_mut().remove(&spec.header) else {
            continue;
        };
        match raw
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n <= MAX_REPORTED)
        {
            Some(0) => {}
            Some(n) => reported.push((spec.metric.clone(), n as i64)),
            None => {
                state
                    .stats
                    .malformed_reports
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    header = %spec.header,
                    org = %org,
                    "upstream reported usage that is not a non-negative integer; ignored"
                );
            }
        }
    }
    if !reported.is_empty() {
        record_after(state, catalog, org, caller, reported);
    }
}

/// Record usage learnt from a response (`report` headers, the part of a settlement above its
/// reservation) in a tracked background task, never denied (`Mode::Record`): it never delays or
/// fails the client's response, and a Redis fault hands the units to local mode's replay like
/// any decision (`QuotaService::decide`), so they are counted once.
fn record_after(
    state: &Arc<ProxyState>,
    catalog: &Arc<Catalog>,
    org: &OrgId,
    caller: &Caller,
    reported: Vec<(String, i64)>,
) {
    let state2 = state.clone();
    let catalog = catalog.clone();
    let org = org.clone();
    let caller = caller.clone();
    state.tasks.spawn(async move {
        let charges: Vec<Charge<'_>> = reported
            .iter()
            .filter_map(|(m, amount)| {
                catalog.metric(m).map(|metric| Charge {
                    metric,
                    amount: *amount,
                })
            })
            .collect();
        match state2
            .app
            .quota
            .decide(&catalog, &org, &caller.levels(), &charges, Mode::Record, None)
            .await
        {
            Ok(_) => {}
            Err(crate::quota::QuotaError::Store(crate::store::StoreError::CounterOverflow)) => {
                // The upstream's number, not a fault of ours: not counted, said loudly.
                state2
                    .stats
                    .malformed_reports
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    org = %org,
                    "upstream reported usage that would take a counter past its largest value; ignored"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, org = %org, "cannot record usage reported by the upstream");
            }
        }
    });
}

/// The estimate of a reservation and the request to forward. A header or body member that is
/// missing, or not a non-negative integer up to the largest counter, gives the default.
async fn read_estimate(spec: &ReserveSpec, req: Request<RequestBody>) -> (Request<Prefixed>, u64) {
    let default = spec.default.max(0) as u64;
    let valid = |n: u64| n <= crate::domain::decision::MAX_COUNTER as u64;
    match &spec.estimate {
        Estimate::Default => (req.map(Prefixed::plain), default),
        Estimate::Header(name) => {
            let n = req
                .headers()
                .get(name)
                .and_then(|v| settle::parse_units(v.as_bytes()))
                .unwrap_or(default);
            (req.map(Prefixed::plain), n)
        }
        Estimate::Json(field) => {
            let (parts, body) = req.into_parts();
            let (found, body) = reserve::read_json_estimate(body, field).await;
            let n = found.filter(|n| valid(*n)).unwrap_or(default);
            (Request::from_parts(parts, body), n)
        }
    }
}

/// Settle a reservation from the response: at once when the actual is in a response header (or
/// nothing but a header could carry it), else when the body ends or is dropped (`Metered`).
fn settle_from(
    spec: &ReserveSpec,
    mut response: Response<Body>,
    settle: Box<dyn Settle>,
) -> Response<Body> {
    if let Some(name) = &spec.from_header
        && let Some(raw) = response.headers_mut().remove(name)
        && let Some(n) = settle::parse_units(raw.as_bytes())
    {
        settle.settle(Some(n), Source::Header);
        return response;
    }
    if spec.from_trailer.is_none() && spec.from_sse.is_none() {
        settle.settle(None, Source::Missing);
        return response;
    }
    response.map(|body| Body::new(Metered::new(body, spec, settle)))
}

/// Settles one proxied request's reservation (see `settle`): the difference between the actual
/// and the estimate is given back (`QuotaService::refund`: counters only, rates keep the
/// estimate) or charged (`record_after`, never denied: the overshoot is bounded by one request
/// and counted in `quota_gateway_settle_overshoot_units_total`).
struct ProxySettle {
    state: Arc<ProxyState>,
    catalog: Arc<Catalog>,
    org: OrgId,
    caller: Caller,
    metric: String,
    estimate: u64,
    on_missing: routes::OnMissing,
}

impl Settle for ProxySettle {
    fn settle(self: Box<Self>, actual: Option<u64>, source: Source) {
        let actual = actual.unwrap_or(settle::missing_actual(self.on_missing, self.estimate));
        let metrics = &self.state.app.metrics;
        metrics
            .settlements
            .with_label_values(&["proxy", source.as_str()])
            .inc();
        if actual > self.estimate {
            let over = actual - self.estimate;
            metrics.settle_overshoot_units.inc_by(over);
            record_after(
                &self.state,
                &self.catalog,
                &self.org,
                &self.caller,
                vec![(self.metric.clone(), over as i64)],
            );
        } else if actual < self.estimate {
            let back = (self.estimate - actual) as i64;
            let tasks = self.state.tasks.clone();
            let state = self.state.clone();
            tasks.spawn(async move {
                let Some(metric) = self.catalog.metric(&self.metric) else {
                    return;
                };
                let credit = [Charge {
                    metric,
                    amount: back,
                }];
                let levels = self.caller.levels();
                let refunded = state.app.quota.refund(&self.catalog, &self.org, &levels, &credit);
                if let Err(e) = refunded.await {
                    state.app.metrics.settle_refund_failures.inc();
                    tracing::error!(error = %e, org = %self.org, units = back, "cannot give back the unused part of a reservation");
                }
            });
        }
    }
}

/// What the gateway tells the upstream about a metered request.
struct Upstream<'a> {
    identified: &'a identity::Identified,
    plan_id: &'a str,
}

struct Forwarded {
    response: Response<Body>,
}

enum ForwardError {
    Connect,
    Timeout,
    /// The connection broke before response headers arrived.
    Upstream,
}

impl ForwardError {
    fn response(&self) -> Response<Body> {
        match self {
            ForwardError::Connect => ApiError::UpstreamUnavailable.into_response(),
            ForwardError::Upstream => ApiError::UpstreamBroken.into_response(),
            ForwardError::Timeout => ApiError::UpstreamTimeout.into_response(),
        }
    }
}

/// `forward`, with the upstream's response time and status class in the metrics.
async fn timed_forward(
    state: &Arc<ProxyState>,
    peer: &headers::Peer,
    req: Request<Prefixed>,
    action: &RouteAction,
    meta: Option<Upstream<'_>>,
) -> Result<Forwarded, ForwardError> {
    let started = Instant::now();
    let result = forward(state, peer, req, action, meta).await;
    let metrics = &state.app.metrics;
    metrics
        .upstream_duration
        .observe(started.elapsed().as_secs_f64());
    let class = match &result {
        Ok(f) => match f.response.status().as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        Err(ForwardError::Connect) => "connect_error",
        Err(ForwardError::Timeout) => "timeout",
        Err(ForwardError::Upstream) => "upstream_error",
    };
    metrics.upstream_responses.with_label_values(&[class]).inc();
    result
}

async fn forward(
    state: &Arc<ProxyState>,
    peer: &headers::Peer,
    mut req: Request<Prefixed>,
    action: &RouteAction,
    meta: Option<Upstream<'_>>,
) -> Result<Forwarded, ForwardError> {
    let upgrade = headers::upgrade_request(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()));
    let request_id = headers::request_id(&parts.headers);
    let h = &mut parts.headers;
    headers::remove_hop_by_hop(h);
    h.remove(&headers::X_ORG_ID);
    h.remove(&headers::X_PLAN_ID);
    let identity = state.identifier.settings();
    if identity.mode == IdentityMode::ApiKey {
        h.remove(&identity.header);
    }
    headers::set_forwarded(
        h,
        &headers::ClientInfo {
            peer,
            host: host.as_deref(),
        },
    );
    h.insert(headers::X_REQUEST_ID.clone(), request_id.clone());
    if let Some(meta) = &meta {
        if let Some(cred) = &meta.identified.credential_header {
            h.remove(cred);
        }
        if let Ok(v) = HeaderValue::from_str(meta.identified.org.as_str()) {
            h.insert(headers::X_ORG_ID.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(meta.plan_id) {
            h.insert(headers::X_PLAN_ID.clone(), v);
        }
    }
    // `Host` is kept as the client sent it; an HTTP/2 client sent `:authority` instead.
    if !h.contains_key(header::HOST)
        && let Some(v) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok())
    {
        h.insert(header::HOST, v);
    }
    if let Some(u) = &upgrade {
        headers::set_upgrade(h, u.clone());
    }
    // `TE` is hop-by-hop: the client's was removed. On this hop the gateway is the client, and
    // a route that settles from a trailer tells the upstream it takes them.
    if action
        .reserve
        .as_ref()
        .is_some_and(|r| r.from_trailer.is_some())
    {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let base = action.upstream.as_ref().unwrap_or(&state.settings.upstream);
    parts.uri = upstream_uri(base, &parts.uri).map_err(|_| ForwardError::Upstream)?;
    parts.version = Version::HTTP_11;

    let exchange = state.client.request(Request::from_parts(parts, body));
    let mut response = match tokio::time::timeout(state.settings.request_timeout, exchange).await {
        Err(_) => return Err(ForwardError::Timeout),
        Ok(Err(e)) if e.is_connect() => {
            tracing::warn!(error = %e, "cannot connect to the upstream");
            return Err(ForwardError::Connect);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upstream exchange failed");
            return Err(ForwardError::Upstream);
        }
        Ok(Ok(r)) => r,
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let (Some(client_upgrade), Some(u)) = (client_upgrade, upgrade)
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let force = state.force.clone();
        state.tasks.spawn(async move {
            let tunnel = async {
                let (client, upstream) = tokio::try_join!(client_upgrade, upstream_upgrade)?;
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                Ok::<_, anyhow::Error>(())
            };
            tokio::select! {
                r = tunnel => if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                },
                _ = force.cancelled() => {}
            }
        });
        let (mut parts, _) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        headers::set_upgrade(&mut parts.headers, u);
        parts
            .headers
            .insert(headers::X_REQUEST_ID.clone(), request_id);
        return Ok(Forwarded {
            response: Response::from_parts(parts, Body::empty()),
        });
    }

    let (mut parts, body) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(headers::X_REQUEST_ID.clone(), request_id);
    // The client's connection keeps its own protocol version: an HTTP/1.0 upstream must not
    // turn the client's HTTP/1.1 response into 1.0.
    parts.version = Version::default();
    Ok(Forwarded {
        response: Response::from_parts(parts, Body::new(body)),
    })
}

/// The upstream's scheme and authority with the client's path (already canonical, see
/// `canonicalise`) and query.
fn upstream_uri(base: &Uri, client: &Uri) -> Result<Uri, http::Error> {
    let mut b = Uri::builder();
    if let Some(s) = base.scheme() {
        b = b.scheme(s.clone());
    }
    if let Some(a) = base.authority() {
        b = b.authority(a.clone());
    }
    b.path_and_query(client.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_path_and_query_byte_for_byte() {
        let base: Uri = "http://127.0.0.1:3000".parse().unwrap();
        let client: Uri = "/v1/a%20b/c?x=1&y=%2F&x=2".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, &client).unwrap().to_string(),
            "http://127.0.0.1:3000/v1/a%20b/c?x=1&y=%2F&x=2"
        );
        let h2: Uri = "http://gateway.local/x?q".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, &h2).unwrap().to_string(),
            "http://127.0.0.1:3000/x?q"
        );
    }
}
