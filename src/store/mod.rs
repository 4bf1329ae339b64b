//! The Redis adapter: counters, gauges, rate state and idempotency markers.
//!
//! One decision is one `EVALSHA` of `decide.lua` (reloaded by `redis::Script` on `NOSCRIPT`),
//! sent over a multiplexed connection so that concurrent decisions are pipelined on one socket
//! instead of each waiting for a pooled connection.

pub mod connection;
pub mod dirty;
pub mod eviction;
pub mod keys;
pub mod reservations;

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::Deserialize;

use crate::domain::decision::{Limit, LimitReply, Mode, OnRedisError, Target};
use crate::domain::org::OrgId;
use crate::metrics::Metrics;
pub use connection::Conn;
pub use keys::Keys;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from the decide script: {0}")]
    Protocol(String),
    /// A decision was sent, and Redis made no progress at all for the deadline: it may or may
    /// not have applied it. The call is still alive; `InDoubt::resolve` learns its outcome.
    #[error("redis made no progress within {0:?}; the decision is in doubt")]
    InDoubt(Duration, InDoubt),
    /// The decision would take a counter or gauge past `MAX_COUNTER`; nothing was applied. A
    /// client's doing, not an outage.
    #[error(
        "the charge would take a counter past {}",
        crate::domain::decision::MAX_COUNTER
    )]
    CounterOverflow,
}

impl StoreError {
    /// Evidence that Redis is unreachable (as opposed to a script or protocol error): the
    /// outage modes apply.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Timeout(_) | StoreError::InDoubt(..) => true,
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
            }
            StoreError::Protocol(_) | StoreError::CounterOverflow => false,
        }
    }

    /// The call broke with its connection: it may have reached Redis before the reply was lost.
    pub fn lost_with_connection(&self) -> bool {
        matches!(self, StoreError::Redis(e)
            if !e.is_connection_refusal() && (e.is_io_error() || e.is_connection_dropped()))
    }
}

/// Raw script replies of one call: one per decision it carried (a pipeline carries several).
type RawReplies = Vec<Vec<i64>>;
type CallFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = redis::RedisResult<RawReplies>> + Send + 'static>,
>;

/// A decision call whose answer did not arrive in time. Dropping it would throw the answer away,
/// and with it the only way to know whether Redis counted the units; so it is kept, and awaited
/// (up to a backstop) by whoever must account for them.
pub struct InDoubt {
    // Behind a mutex only so that errors carrying it stay `Sync`; it is never contended.
    call: std::sync::Mutex<CallFuture>,
    backstop: Duration,
}

impl std::fmt::Debug for InDoubt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InDoubt").finish_non_exhaustive()
    }
}

impl InDoubt {
    /// Wait for the answer: the status of each decision the call carried, or `None` when it
    /// cannot be learned (the connection broke, or no answer within the backstop).
    pub async fn resolve(self) -> Option<Vec<Status>> {
        let call = match self.call.into_inner() {
            Ok(call) => call,
            Err(poisoned) => poisoned.into_inner(),
        };
        match tokio::time::timeout(self.backstop, call).await {
            Ok(Ok(raw)) => raw
                .iter()
                .map(|r| status_of(r.first().copied()).ok())
                .collect(),
            _ => None,
        }
    }
}

/// While calls queue behind each other, a slow answer is not a missing one: a call only falls
/// in doubt after this many deadlines in total, however much progress Redis makes meanwhile.
const PATIENCE: u32 = 10;
/// How long an in-doubt call's answer is awaited at most, in deadlines.
const BACKSTOP: u32 = 30;

/// The script's spelling of a mode.
fn mode_arg(mode: Mode) -> &'static str {
    match mode {
        Mode::Check => "check",
        Mode::DryRun => "dry",
        Mode::Record => "record",
        Mode::Shadow => "shadow",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Applied,
    Denied,
    DryRunAllowed,
    Duplicate,
    /// Applied, although a limit would have denied it (shadow mode).
    AppliedOverLimit,
    /// The org's durable counters of this month are not (or no longer) in Redis: restore them
    /// from Postgres, then decide again. Nothing was applied.
    NeedsRestore,
    /// A counter or gauge would pass `MAX_COUNTER`: nothing was applied (see `decide.lua`).
    WouldOverflow,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: Status,
    /// One per limit, in the order given; empty for `Duplicate`.
    pub limits: Vec<LimitReply>,
    /// The Redis key of each limit, in the same order (empty unless from `run`).
    pub keys: Vec<String>,
    /// One per limit of a call with leases (empty otherwise; default for gauges).
    pub leases: Vec<LeaseReply>,
    /// Notification thresholds this call crossed: (index of the limit, percent, the counter or
    /// level after the call).
    pub crossings: Vec<(usize, u16, i64)>,
    /// One per counter metric of the call (see "Credits" in `decide.lua`).
    pub credits: Vec<CreditReply>,
    /// The concurrency slot of a call that carried one: denied, slots held before the call
    /// (`value`) and slots of dead holders swept (`millis`).
    pub slot: Option<LimitReply>,
}

/// What a call did with the credits of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditReply {
    /// The index of the metric's first limit in the call.
    pub index: usize,
    /// Units drawn from grants (negative: given back); 0 unless applied.
    pub drawn: i64,
    /// Units left in unexpired grants; `None` when the org has no grant of the metric.
    pub remaining: Option<u64>,
}

/// The credit groups of a call (see "Credits" in `decide.lua`): the index of the first limit of
/// each counter metric. Limits of one metric come from one charge, so they share its amount.
fn credit_heads(specs: &[KeySpec]) -> impl Iterator<Item = usize> + '_ {
    specs.iter().enumerate().filter_map(|(i, spec)| {
        let metric = spec_metric(spec)?;
        let first = specs[..i].iter().all(|s| spec_metric(s) != Some(metric));
        first.then_some(i)
    })
}

/// The metric of a counter limit (the meter or a period quota).
fn spec_metric(spec: &KeySpec) -> Option<&str> {
    match spec.kind {
        SpecKind::Counter | SpecKind::Meter => Keys::counter_metric(&spec.key),
        SpecKind::Gauge | SpecKind::Rate => None,
    }
}

/// A notification threshold crossed by a call (see `decide.lua`): reported once per
/// (org, metric, period, threshold), whichever replica made the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub org: OrgId,
    pub metric: String,
    /// Counters: the period and its window; `None` for a gauge.
    pub period: Option<(crate::domain::period::Period, crate::domain::period::Window)>,
    pub threshold: u16,
    /// The counter or level after the call.
    pub current: i64,
    pub limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SpecKind {
    Counter,
    /// A durable counter (versioned, flushed, restored): the calendar-month meter, or a
    /// billing-month counter.
    Meter,
    Gauge,
    Rate,
}

impl SpecKind {
    /// The script's letter for the kind; upper case when the call carries lease arguments.
    fn as_arg(self, leased: bool) -> &'static str {
        match (self, leased) {
            (SpecKind::Counter, false) => "c",
            (SpecKind::Meter, false) => "m",
            (SpecKind::Gauge, _) => "g",
            (SpecKind::Rate, false) => "r",
            (SpecKind::Counter, true) => "C",
            (SpecKind::Meter, true) => "M",
            (SpecKind::Rate, true) => "R",
        }
    }

    /// Gauges are levels, not flows: they are never leased.
    pub fn leasable(self) -> bool {
        self != SpecKind::Gauge
    }
}

/// The lease part of a decision (see "Leases" in `decide.lua`): every leasable limit of the call
/// sees the reservations of all holders, and this holder may settle and take new blocks.
#[derive(Debug, Clone)]
pub struct LeaseCall {
    /// This replica's id.
    pub holder: std::sync::Arc<str>,
    /// When a block granted by this call stops counting against the limit in Redis (Unix µs):
    /// after the holder stops using it, plus a grace for clocks that disagree.
    pub expiry_us: i64,
    /// Per limit of the call, in order (ignored for gauges).
    pub args: Vec<LeaseArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseArg {
    /// Units admitted from this holder's lease since it last settled; `None` keeps the lease
    /// as it is (the call settles nothing).
    pub consumed: Option<u64>,
    /// The largest block to take (0: none).
    pub want: u64,
    /// Settle `consumed` but keep the rest of the lease (a checkpoint; takes no block).
    pub checkpoint: bool,
}

impl LeaseArg {
    /// See every reservation, settle nothing, take nothing.
    pub const LOOK: LeaseArg = LeaseArg {
        consumed: None,
        want: 0,
        checkpoint: false,
    };
}

/// What a call did with one leased limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseReply {
    /// The block now leased to this holder (0: none).
    pub granted: u64,
    /// Units of other holders' expired leases returned to the limit.
    pub swept: u64,
    /// Units other holders' live leases reserve (a counter's `value` includes them).
    pub reserved: u64,
}

/// A concurrency slot to take in a decision (kind "s" in `decide.lua`): one member of the org's
/// `inflight` sorted set, scored by when it expires unless renewed.
#[derive(Debug, Clone)]
pub struct SlotCall {
    pub key: String,
    /// This slot's id (unique per replica and request).
    pub member: String,
    /// Requests the plan allows in flight.
    pub limit: u64,
    /// When the slot frees itself if its holder stops renewing it (Unix ms).
    pub expiry_ms: i64,
}

/// One limit as the script sees it (see the argument contract in `decide.lua`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeySpec {
    pub key: String,
    pub kind: SpecKind,
    pub amount: i64,
    /// 0: unlimited.
    pub limit: u64,
    pub block: bool,
    /// Counters: expiry (Unix ms); rates: window (µs); gauges: 0.
    pub param: i64,
    /// Notification thresholds (percent of `limit`), ascending; empty for most limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<u16>,
    /// A zero-amount check that the (blocking) limit has room left (`Limit::headroom`): sent
    /// to the script as block `h`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headroom: bool,
}

impl KeySpec {
    /// The smallest value at or past `percent` of the limit (exact integer arithmetic).
    pub fn trigger(&self, percent: u16) -> u64 {
        let t = (u128::from(self.limit) * u128::from(percent)).div_ceil(100);
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Meters and gauges are flushed to Postgres and carry a version key.
    pub fn is_durable(&self) -> bool {
        matches!(self.kind, SpecKind::Meter | SpecKind::Gauge)
    }
}

/// The month's restore marker and what `decide.lua` needs to create it itself at a new month
/// (see `restore.lua`).
struct MonthMarker {
    key: String,
    resident: String,
    /// Unix ms.
    expiry: i64,
}

/// An org's credit hash of one metric, as read from Redis or to restore into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditHash {
    pub key: String,
    /// (field, value), see `domain::credit`.
    pub fields: Vec<(String, String)>,
    pub version: i64,
}

/// How long a replayed batch's id is remembered.
pub const REPLAY_IDEMPOTENCY_TTL: Duration = Duration::from_secs(48 * 3600);

/// How long a period counter outlives its period, so late reads (the usage view of a just-ended
/// period, the flusher) still find it.
fn expiry_grace(period: crate::domain::period::Period) -> chrono::Duration {
    use crate::domain::period::Period;
    match period {
        Period::Minute | Period::Hour => chrono::Duration::minutes(10),
        Period::Day => chrono::Duration::hours(6),
        Period::Month => chrono::Duration::days(7),
        // An anchor change can carry a billing month up to a month past the end it had when its
        // counter was created (decide.lua sets a counter's expiry once, at creation): the grace
        // covers that month plus the usual week.
        Period::BillingMonth => chrono::Duration::days(40),
    }
}

/// Units to add to Redis under one idempotency key (usage admitted while Redis was unreachable);
/// kept, in memory or in Postgres's replay outbox, until Redis confirms them.
#[derive(Debug, Clone)]
pub struct Batch {
    pub org: OrgId,
    /// The idempotency key: `replay:<uuid>`, or a usage report's own key.
    pub key: String,
    pub ttl_ms: u64,
    pub specs: Vec<KeySpec>,
    /// Gives back units Redis counted for a request this replica refused: it never counted
    /// against the local cap.
    pub compensation: bool,
}

#[derive(Clone)]
pub struct Store {
    conn: Conn,
    client: redis::Client,
    keys: Keys,
    decide: std::sync::Arc<redis::Script>,
    /// How long a call may go without Redis making any progress before Redis counts as
    /// unreachable (`[redis] timeout`).
    timeout: Duration,
    /// Replies received on this replica's connections: while it moves, Redis is alive, and a
    /// call still waiting is queued, not lost.
    progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
    metrics: std::sync::Arc<Metrics>,
    /// False after a connection failure, until a call succeeds again (counts reconnects).
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    restore: std::sync::Arc<redis::Script>,
    /// `reservation.lua`: ends a `/v1/reservations` reservation once.
    reservation: std::sync::Arc<redis::Script>,
    grant: std::sync::Arc<redis::Script>,
    dirty: std::sync::Arc<dirty::DirtySet>,
    eviction: std::sync::Arc<eviction::EvictionWatch>,
    /// Where crossed notification thresholds go (the notifier's writer); `None`: nowhere.
    crossings: Option<tokio::sync::mpsc::Sender<Crossing>>,
}

impl Store {
    /// Create the store without connecting: the first command connects, and a Redis that is
    /// down at start-up only makes decisions answer 503 (and `/readyz` say so) until it is back,
    /// instead of crash-looping the process.
    pub fn new(
        settings: &RedisSettings,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let seeds = settings.seeds();
        // Pub/sub needs a connection of its own; in a cluster any node hears every PUBLISH.
        let client = redis::Client::open(seeds[0].as_str())?;
        // The connection's own response timeout is only a backstop: the gateway's deadline
        // (`await_decide`) decides when Redis counts as unreachable, and a call past it is kept
        // alive to learn its outcome.
        let backstop = settings.timeout * BACKSTOP;
        let conn = match settings.mode {
            RedisMode::Standalone => {
                Conn::standalone(client.clone(), settings.connect_timeout, backstop)?
            }
            RedisMode::Cluster => Conn::cluster(&seeds, settings.connect_timeout, backstop)?,
        };
        Ok(Self {
            conn,
            client,
            keys: Keys::new(settings.key_prefix.clone()),
            decide: std::sync::Arc::new(redis::Script::new(include_str!("decide.lua"))),
            timeout: settings.timeout,
            progress: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
            metrics,
            healthy: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            restore: std::sync::Arc::new(redis::Script::new(include_str!("restore.lua"))),
            reservation: std::sync::Arc::new(redis::Script::new(include_str!("reservation.lua"))),
            grant: std::sync::Arc::new(redis::Script::new(include_str!("grant.lua"))),
            dirty: std::sync::Arc::new(dirty::DirtySet::default()),
            eviction: std::sync::Arc::new(eviction::EvictionWatch::new(
                settings.require_noeviction,
            )),
            crossings: None,
        })
    }

    /// Hand every threshold crossing to `sink`. Never waits: when the sink is full the crossing
    /// is dropped, counted and logged, so notifications never slow a decision.
    pub fn with_crossings(mut self, sink: tokio::sync::mpsc::Sender<Crossing>) -> Self {
        self.crossings = Some(sink);
        self
    }

    /// Send the crossings of an applied call (`reply`, for `specs`) to the sink.
    fn report_crossings(&self, specs: &[KeySpec], reply: &Reply) {
        let Some(sink) = &self.crossings else { return };
        for &(i, percent, current) in &reply.crossings {
            let Some(spec) = specs.get(i) else {
                continue;
            };
            let Some((org, metric, period)) = self.keys.parse_limit(&spec.key) else {
                continue;
            };
            let period = period.and_then(|(p, start)| {
                let start = DateTime::from_timestamp(start, 0)?;
                let end = DateTime::from_timestamp_millis(spec.param)? - expiry_grace(p);
                Some((p, crate::domain::period::Window { start, end }))
            });
            let crossing = Crossing {
                org,
                metric,
                period,
                threshold: percent,
                current,
                limit: spec.limit,
            };
            if let Err(e) = sink.try_send(crossing) {
                self.metrics
                    .notifications
                    .with_label_values(&["usage.threshold_crossed", "dropped"])
                    .inc();
                tracing::error!(error = %e, threshold = percent, "threshold event dropped: the notification queue is full or closed");
            }
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A client for dedicated connections (pub/sub), which cannot share the multiplexed one.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Run one Redis call under the deadline, keeping the error counters and the degraded gauge
    /// current. For calls that are safe to drop (reads, pings, idempotent replays).
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        self.account(&result);
        result
    }

    fn account<T>(&self, result: &Result<T, StoreError>) {
        use std::sync::atomic::Ordering;
        match result {
            Ok(_) => {
                self.progress.fetch_add(1, Ordering::Relaxed);
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    self.metrics.redis_reconnects.inc();
                }
            }
            Err(e) => {
                let kind = match e {
                    StoreError::Timeout(_) | StoreError::InDoubt(..) => "timeout",
                    StoreError::Redis(r) if r.is_io_error() || r.is_connection_dropped() => {
                        "connection"
                    }
                    _ => "other",
                };
                self.metrics.redis_errors.with_label_values(&[kind]).inc();
                if kind != "other" {
                    self.healthy.store(false, Ordering::Release);
                }
            }
        }
    }

    /// The decide script's call as a future that owns everything it needs, so that it can outlive
    /// the request that made it (see `InDoubt`). `NOSCRIPT` (after a restart, a failover or
    /// `SCRIPT FLUSH`) loads the script once more and retries.
    fn decide_call(&self, call: Call) -> CallFuture {
        let mut conn = self.conn.clone();
        let script = self.decide.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match call.query(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    metrics.redis_script_reloads.inc();
                    script.load_async(&mut conn).await?;
                    call.query(&mut conn).await
                }
                other => other,
            }
        })
    }

    /// Await a decision call. Slow is not down: while Redis answers anything on this replica's
    /// connections, the call keeps waiting (it is queued behind others, which Redis is working
    /// through), up to `PATIENCE` deadlines. Only a deadline with no progress at all (or the
    /// patience spent) makes the call *in doubt*: it was sent, and Redis may have applied it.
    async fn await_decide(&self, mut call: CallFuture) -> Result<RawReplies, StoreError> {
        use std::sync::atomic::Ordering;
        let started = std::time::Instant::now();
        let mut seen = self.progress.load(Ordering::Relaxed);
        let result = loop {
            match tokio::time::timeout(self.timeout, &mut call).await {
                Ok(r) => break r.map_err(StoreError::Redis),
                Err(_) => {
                    let now = self.progress.load(Ordering::Relaxed);
                    if now != seen && started.elapsed() < self.timeout * PATIENCE {
                        seen = now;
                        continue;
                    }
                    break Err(StoreError::InDoubt(
                        self.timeout,
                        InDoubt {
                            call: std::sync::Mutex::new(call),
                            backstop: self.timeout * BACKSTOP,
                        },
                    ));
                }
            }
        };
        self.metrics
            .redis_duration
            .observe(started.elapsed().as_secs_f64());
        self.account(&result);
        result
    }

    /// The script arguments of one limit: its key, kind and expiry or window.
    pub fn spec(&self, org: &OrgId, limit: &Limit<'_>) -> KeySpec {
        let (kind, param) = match &limit.target {
            Target::Counter { period, window } => (
                if limit.is_durable() {
                    SpecKind::Meter
                } else {
                    SpecKind::Counter
                },
                (window.end + expiry_grace(*period)).timestamp_millis(),
            ),
            Target::Gauge => (SpecKind::Gauge, 0),
            Target::Rate { window, .. } => (SpecKind::Rate, window.as_micros() as i64),
        };
        let notify = match (limit.limit, kind) {
            (Some(l), SpecKind::Counter | SpecKind::Meter | SpecKind::Gauge) if l > 0 => {
                limit.notify_at.to_vec()
            }
            _ => Vec::new(),
        };
        KeySpec {
            key: self.keys.limit(org, limit),
            kind,
            amount: limit.amount,
            limit: limit.limit.unwrap_or(0),
            block: limit.blocks(),
            param,
            notify,
            headroom: limit.headroom,
        }
    }

    /// Check and/or apply `limits` of one org in one round trip.
    pub async fn run(
        &self,
        org: &OrgId,
        limits: &[Limit<'_>],
        mode: Mode,
        now: DateTime<Utc>,
        idempotency: Option<(&str, Duration)>,
    ) -> Result<Reply, StoreError> {
        let specs: Vec<KeySpec> = limits.iter().map(|l| self.spec(org, l)).collect();
        self.run_specs(org, specs, mode, now, idempotency, None, None)
            .await
    }

    /// `run` for limits already turned into script arguments, with leases when `lease` is given
    /// and a concurrency slot taken in the same call when `slot` is.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_specs(
        &self,
        org: &OrgId,
        specs: Vec<KeySpec>,
        mode: Mode,
        now: DateTime<Utc>,
        idempotency: Option<(&str, Duration)>,
        lease: Option<&LeaseCall>,
        slot: Option<&SlotCall>,
    ) -> Result<Reply, StoreError> {
        let idem = idempotency.map(|(key, ttl)| (self.keys.idempotency(org, key), ttl));
        let marker = self.marker(org, now);
        let mut reply = self
            .eval_specs(&specs, mode, now, idem, Some(marker), lease, slot)
            .await?;
        reply.keys = specs.into_iter().map(|s| s.key).collect();
        Ok(reply)
    }

    /// Check and/or apply several decisions of one org in one round trip (a pipeline): a batch
    /// of usage reports. Each item is its limits and its idempotency key.
    pub async fn run_many(
        &self,
        org: &OrgId,
        items: &[(Vec<KeySpec>, Option<&str>)],
        mode: Mode,
        now: DateTime<Utc>,
        idempotency_ttl: Duration,
    ) -> Result<Vec<Reply>, StoreError> {
        let marker = self.marker(org, now);
        let mut pipe = redis::Pipeline::with_capacity(items.len());
        for (specs, idem) in items {
            let idem = idem.map(|k| (self.keys.idempotency(org, k), idempotency_ttl));
            pipe.add_command(self.decide_cmd(specs, mode, now, idem, Some(&marker), None, None));
        }
        let raw = self
            .await_decide(self.decide_call(Call::Many(pipe)))
            .await?;
        if raw.len() != items.len() {
            return Err(StoreError::Protocol(format!(
                "{} replies for {} decisions",
                raw.len(),
                items.len()
            )));
        }
        raw.iter()
            .zip(items)
            .map(|(r, (specs, _))| {
                let reply = parse_reply(r, specs, None, false)?;
                self.mark_if_applied(specs, reply.status);
                self.mark_credits(specs, &reply);
                self.report_crossings(specs, &reply);
                Ok(reply)
            })
            .collect()
    }

    /// Add usage that Redis has not counted yet (admitted while it was unreachable, or in
    /// doubt). `idempotency_key` makes the call exactly-once however often it is retried: a
    /// batch id of the gateway's own, or the client's key of a usage report, so a report the
    /// client resends is a duplicate whichever of the two reached Redis first. Every key the
    /// batch names is marked for the flusher whether it was applied now or before.
    pub async fn replay(
        &self,
        org: &OrgId,
        specs: &[KeySpec],
        idempotency_key: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Status, StoreError> {
        let idem = Some((self.keys.idempotency(org, idempotency_key), ttl));
        let marker = self.marker(org, now);
        let cmd = self.decide_cmd(specs, Mode::Record, now, idem, Some(&marker), None, None);
        let raw = self.bounded(self.decide_call(Call::One(cmd))).await?;
        let reply = parse_reply(
            raw.first().map_or(&[][..], Vec::as_slice),
            specs,
            None,
            false,
        )?;
        // A replay detects crossings when it reaches Redis, not when the units were admitted.
        self.report_crossings(specs, &reply);
        self.mark_credits(specs, &reply);
        let status = reply.status;
        if matches!(
            status,
            Status::Applied | Status::AppliedOverLimit | Status::Duplicate
        ) {
            self.mark(specs);
        }
        Ok(status)
    }

    /// Mark durable keys changed by an applied call for the flusher.
    fn mark_if_applied(&self, specs: &[KeySpec], status: Status) {
        if matches!(status, Status::Applied | Status::AppliedOverLimit) {
            self.mark(specs);
        }
    }

    /// Mark the credit hashes a call drew from or gave back to for the flusher.
    fn mark_credits(&self, specs: &[KeySpec], reply: &Reply) {
        let mut key = String::new();
        for c in reply.credits.iter().filter(|c| c.drawn != 0) {
            let direction = if c.drawn > 0 { "drawn" } else { "returned" };
            self.metrics
                .credit_units
                .with_label_values(&[direction])
                .inc_by(c.drawn.unsigned_abs());
            if let Some(spec) = specs.get(c.index)
                && Keys::credits_for_into(&mut key, &spec.key)
            {
                self.dirty.mark(&key);
            }
        }
    }

    /// Mark the durable keys `specs` change for the flusher.
    pub fn mark(&self, specs: &[KeySpec]) {
        for spec in specs.iter().filter(|s| s.is_durable() && s.amount != 0) {
            self.dirty.mark(&spec.key);
        }
    }

    fn marker(&self, org: &OrgId, now: DateTime<Utc>) -> MonthMarker {
        let month = crate::domain::period::calendar_month(now);
        MonthMarker {
            key: self.keys.restore_marker(org, month.start.timestamp()),
            resident: self.keys.resident(org),
            expiry: (month.end + expiry_grace(crate::domain::period::Period::Month))
                .timestamp_millis(),
        }
    }

    /// Keys changed since the last flush.
    pub fn dirty(&self) -> &dirty::DirtySet {
        &self.dirty
    }

    /// Put an org's durable counters for the month of `now` back from Postgres (see
    /// `restore.lua`); `entries` are (value key, value, version, expiry ms or 0). Returns whether
    /// this call restored (false: another replica already had).
    /// `credits`: per metric with live grants, its credit hash, the fields and values of its
    /// grants and the version they were flushed at (see "Credits" in `decide.lua`).
    pub async fn restore(
        &self,
        org: &OrgId,
        now: DateTime<Utc>,
        entries: &[(String, i64, i64, i64)],
        credits: &[CreditHash],
    ) -> Result<bool, StoreError> {
        let marker = self.marker(org, now);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.restore.get_hash())
            .arg(2 + 2 * entries.len() + 2 * credits.len())
            .arg(&marker.key)
            .arg(&marker.resident);
        for (key, ..) in entries {
            cmd.arg(key).arg(Keys::version(key));
        }
        for c in credits {
            cmd.arg(&c.key).arg(Keys::version(&c.key));
        }
        cmd.arg(marker.expiry);
        for (_, value, version, expiry) in entries {
            cmd.arg(value).arg(version).arg(expiry);
        }
        if !credits.is_empty() {
            let mut len = 0;
            for c in credits {
                cmd.arg(c.fields.len());
                for (field, value) in &c.fields {
                    cmd.arg(field).arg(value);
                }
                cmd.arg(c.version);
                len += 2 + 2 * c.fields.len();
            }
            cmd.arg(format!("K{len}"));
        }
        let restored = self.eval_script(&self.restore, &cmd).await?;
        Ok(restored == 1)
    }

    /// An `EVALSHA` of a small script, loading it once on `NOSCRIPT`.
    async fn eval_script(
        &self,
        script: &redis::Script,
        cmd: &redis::Cmd,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn.clone();
        let first: Result<i64, StoreError> = self.bounded(cmd.query_async(&mut conn)).await;
        match first {
            Err(StoreError::Redis(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.metrics.redis_script_reloads.inc();
                self.bounded(script.load_async(&mut conn)).await?;
                self.bounded(cmd.query_async(&mut conn)).await
            }
            other => other,
        }
    }

    /// Mirror a grant Postgres holds into the org's credit hash (see `grant.lua`): `Some(true)`
    /// when added, `Some(false)` when it was there already, `None` when the org's data is not in
    /// Redis (restore it, which brings the grant, then ask again).
    pub async fn add_grant(
        &self,
        org: &OrgId,
        metric: &str,
        field: &str,
        value: &str,
    ) -> Result<Option<bool>, StoreError> {
        let key = self.keys.credits(org, metric);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.grant.get_hash())
            .arg(3)
            .arg(self.keys.resident(org))
            .arg(&key)
            .arg(Keys::version(&key))
            .arg("add")
            .arg(field)
            .arg(value);
        let added = self.eval_script(&self.grant, &cmd).await?;
        if added == 1 {
            self.dirty.mark(&key);
        }
        Ok((added >= 0).then_some(added == 1))
    }

    /// Take a grant out of the org's credit hash: the units it had left, `None` when it was not
    /// there. Marks the hash for the flusher, so the new version reaches Postgres.
    pub async fn void_grant(
        &self,
        org: &OrgId,
        metric: &str,
        field: &str,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let key = self.keys.credits(org, metric);
        let version = Keys::version(&key);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.grant.get_hash())
            .arg(3)
            .arg(self.keys.resident(org))
            .arg(&key)
            .arg(&version)
            .arg("void")
            .arg(field);
        let left = self.eval_script(&self.grant, &cmd).await?;
        if left < 0 {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let v: Option<i64> = self
            .bounded(redis::cmd("GET").arg(&version).query_async(&mut conn))
            .await?;
        Ok(Some((left, v.unwrap_or(0))))
    }

    /// The fields and values of credit hashes of one org (one slot), with each hash's version,
    /// read together (`MULTI`), so a version always goes with the values it counts.
    pub async fn read_credits(&self, keys: &[String]) -> Result<Vec<CreditHash>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for k in keys {
            pipe.cmd("HGETALL").arg(k).cmd("GET").arg(Keys::version(k));
        }
        let mut conn = self.conn.clone();
        let raw: Vec<redis::Value> = self.bounded(pipe.query_async(&mut conn)).await?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, pair) in keys.iter().zip(raw.chunks_exact(2)) {
            let flat: Vec<String> = redis::from_redis_value_ref(&pair[0])
                .map_err(|e| StoreError::Protocol(format!("credit hash: {e}")))?;
            let fields = flat
                .chunks_exact(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect();
            let version: Option<i64> = redis::from_redis_value_ref(&pair[1])
                .map_err(|e| StoreError::Protocol(format!("credit version: {e}")))?;
            out.push(CreditHash {
                key: key.clone(),
                fields,
                version: version.unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Values and versions of durable keys of one org (one slot), one `MGET`.
    pub async fn read_durable(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<(i64, i64)>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for k in keys {
            cmd.arg(k).arg(Keys::version(k));
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<i64>> = self.bounded(cmd.query_async(&mut conn)).await?;
        Ok(values
            .chunks_exact(2)
            .map(|c| c[0].map(|v| (v, c[1].unwrap_or(0))))
            .collect())
    }

    #[allow(clippy::too_many_arguments)]
    async fn eval_specs(
        &self,
        specs: &[KeySpec],
        mode: Mode,
        now: DateTime<Utc>,
        idempotency: Option<(String, Duration)>,
        marker: Option<MonthMarker>,
        lease: Option<&LeaseCall>,
        slot: Option<&SlotCall>,
    ) -> Result<Reply, StoreError> {
        let cmd = self.decide_cmd(specs, mode, now, idempotency, marker.as_ref(), lease, slot);
        let raw = self.await_decide(self.decide_call(Call::One(cmd))).await?;
        let leased = lease.map(|_| specs);
        let reply = parse_reply(
            raw.first().map_or(&[][..], Vec::as_slice),
            specs,
            leased,
            slot.is_some(),
        )?;
        // What a lease call settled is in whatever the status, bar the two that return first.
        if let Some(lease) = lease
            && !matches!(reply.status, Status::NeedsRestore | Status::Duplicate)
        {
            for (spec, arg) in specs.iter().zip(&lease.args) {
                if spec.kind == SpecKind::Meter && arg.consumed.is_some_and(|c| c > 0) {
                    self.dirty.mark(&spec.key);
                }
            }
        }
        if reply.status == Status::WouldOverflow {
            return Err(StoreError::CounterOverflow);
        }
        self.mark_if_applied(specs, reply.status);
        self.mark_credits(specs, &reply);
        self.report_crossings(specs, &reply);
        Ok(reply)
    }

    /// One `EVALSHA` of the decide script (see the argument contract in `decide.lua`). A slot
    /// goes last among the limits, so the other limits keep their indices (and thresholds theirs).
    #[allow(clippy::too_many_arguments)]
    fn decide_cmd(
        &self,
        specs: &[KeySpec],
        mode: Mode,
        now: DateTime<Utc>,
        idempotency: Option<(String, Duration)>,
        marker: Option<&MonthMarker>,
        lease: Option<&LeaseCall>,
        slot: Option<&SlotCall>,
    ) -> redis::Cmd {
        let durable = specs.iter().filter(|s| s.is_durable()).count();
        let notified = specs.iter().filter(|s| !s.notify.is_empty()).count();
        let leased = |spec: &KeySpec| lease.is_some() && spec.kind.leasable();
        let hashes = specs.iter().filter(|s| leased(s)).count();
        let groups = credit_heads(specs).count();
        let mut cmd = redis::Cmd::with_capacity(8 + specs.len() * 12 + 2, 64 + specs.len() * 224);
        cmd.arg("EVALSHA").arg(self.decide.get_hash()).arg(
            specs.len()
                + durable
                + hashes
                + 2 * groups
                + notified
                + usize::from(idempotency.is_some())
                + 2 * usize::from(marker.is_some())
                + usize::from(slot.is_some()),
        );
        if let Some((k, _)) = &idempotency {
            cmd.arg(k);
        }
        if let Some(m) = marker {
            cmd.arg(&m.key).arg(&m.resident);
        }
        // One scratch buffer for the version keys: `Cmd` copies each argument anyway.
        let mut version = String::new();
        for spec in specs {
            cmd.arg(&spec.key);
            if spec.is_durable() {
                Keys::version_into(&mut version, &spec.key);
                cmd.arg(&version);
            }
            if leased(spec) {
                Keys::lease_into(&mut version, &spec.key);
                cmd.arg(&version);
            }
        }
        if let Some(s) = slot {
            cmd.arg(&s.key);
        }
        for head in credit_heads(specs) {
            if Keys::credits_for_into(&mut version, &specs[head].key) {
                cmd.arg(&version);
                version.push_str(":v");
                cmd.arg(&version);
            }
        }
        if notified > 0 {
            for spec in specs.iter().filter(|s| !s.notify.is_empty()) {
                Keys::fired_into(&mut version, &spec.key);
                cmd.arg(&version);
            }
        }
        cmd.arg(now.timestamp_micros()).arg(mode_arg(mode));
        match &idempotency {
            Some((_, ttl)) => cmd.arg(ttl.as_millis() as u64),
            None => cmd.arg(0),
        };
        cmd.arg(marker.as_ref().map_or(0, |m| m.expiry));
        match lease {
            Some(l) => cmd.arg(&*l.holder).arg(l.expiry_us),
            None => cmd.arg("").arg(0),
        };
        for (i, spec) in specs.iter().enumerate() {
            cmd.arg(spec.kind.as_arg(leased(spec)))
                .arg(spec.amount)
                .arg(spec.limit)
                .arg(match (spec.block, spec.headroom) {
                    (true, true) => "h",
                    (true, false) => "1",
                    (false, _) => "0",
                })
                .arg(spec.param);
            if leased(spec) {
                let arg = lease
                    .and_then(|l| l.args.get(i).copied())
                    .unwrap_or(LeaseArg::LOOK);
                match arg.consumed {
                    Some(c) => cmd.arg(c),
                    None => cmd.arg(-1),
                };
                if arg.checkpoint {
                    cmd.arg(-1);
                } else {
                    cmd.arg(arg.want);
                }
            }
        }
        if let Some(s) = slot {
            let block = if mode == Mode::Record { "0" } else { "1" };
            cmd.arg("s")
                .arg(1)
                .arg(s.limit)
                .arg(block)
                .arg(s.expiry_ms)
                .arg(&s.member);
        }
        if groups > 0 {
            Self::credit_section(&mut cmd, specs);
        }
        if notified > 0 {
            Self::threshold_tail(&mut cmd, specs);
        }
        cmd
    }

    /// The credit section of a decide call's ARGV (see "Credits" in `decide.lua`): per counter
    /// metric, its first limit and its hard quotas (1-based), then "K<length>".
    fn credit_section(cmd: &mut redis::Cmd, specs: &[KeySpec]) {
        let mut len = 0usize;
        for head in credit_heads(specs) {
            let metric = spec_metric(&specs[head]);
            let hard = |s: &KeySpec| s.block && s.limit > 0 && spec_metric(s) == metric;
            cmd.arg(head + 1)
                .arg(specs.iter().filter(|s| hard(s)).count());
            len += 2;
            for (i, _) in specs.iter().enumerate().filter(|(_, s)| hard(s)) {
                cmd.arg(i + 1);
                len += 1;
            }
        }
        cmd.arg(format!("K{len}"));
    }

    /// The threshold tail of a decide call's ARGV (see `decide.lua`); its "fired" keys end KEYS.
    fn threshold_tail(cmd: &mut redis::Cmd, specs: &[KeySpec]) {
        let mut len = 0usize;
        for (i, spec) in specs.iter().enumerate() {
            if spec.notify.is_empty() {
                continue;
            }
            cmd.arg(i + 1).arg(spec.notify.len());
            for &p in &spec.notify {
                cmd.arg(p).arg(spec.trigger(p));
            }
            len += 2 + 2 * spec.notify.len();
        }
        cmd.arg(format!("T{len}"));
    }

    /// Current values of counters and gauges (rates read as 0), one `MGET` for one org, or
    /// `None` when Redis may have lost them (restore first). As in `decide.lua`, the resident
    /// key stands in for a month marker not created yet: a new month's counters read as zero.
    pub async fn read(
        &self,
        org: &OrgId,
        limits: &[Limit<'_>],
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<i64>>, StoreError> {
        let marker = self.marker(org, now);
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&marker.key).arg(&marker.resident);
        for l in limits {
            cmd.arg(self.keys.limit(org, l));
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<String>> = self.bounded(cmd.query_async(&mut conn)).await?;
        if values.len() < 2 || (values[0].is_none() && values[1].is_none()) {
            return Ok(None);
        }
        Ok(Some(
            limits
                .iter()
                .zip(values.into_iter().skip(2))
                .map(|(l, v)| match l.target {
                    Target::Rate { .. } => 0,
                    _ => v.and_then(|s| s.parse().ok()).unwrap_or(0),
                })
                .collect(),
        ))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Give concurrency slots back: one `ZREM` each, sent together on the multiplexed connection
    /// (which pipelines them; in a cluster each goes to its org's node). Returns how many calls
    /// failed: those slots free themselves when their lease expires.
    pub async fn release_slots(&self, slots: &[(std::sync::Arc<str>, String)]) -> usize {
        let calls = slots.iter().map(|(key, member)| {
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(&**key).arg(member);
            async move { self.bounded(cmd.query_async::<i64>(&mut conn)).await }
        });
        futures_util::future::join_all(calls)
            .await
            .iter()
            .filter(|r| r.is_err())
            .count()
    }

    /// Push the expiry of live slots to `expiry_ms` (a holder renewing what it still uses). `XX`:
    /// a slot released meanwhile is not brought back; `GT`: the set's own expiry only grows.
    pub async fn renew_slots(
        &self,
        slots: &[(std::sync::Arc<str>, String)],
        expiry_ms: i64,
    ) -> usize {
        let calls = slots.iter().map(|(key, member)| {
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            pipe.cmd("ZADD")
                .arg(&**key)
                .arg("XX")
                .arg(expiry_ms)
                .arg(member)
                .ignore()
                .cmd("PEXPIREAT")
                .arg(&**key)
                .arg(expiry_ms)
                .arg("GT")
                .ignore();
            async move { self.bounded(pipe.query_async::<()>(&mut conn)).await }
        });
        futures_util::future::join_all(calls)
            .await
            .iter()
            .filter(|r| r.is_err())
            .count()
    }

    /// Slots held in an org's set, live or not yet swept (tests and the usage view).
    pub async fn slots_held(&self, org: &OrgId) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("ZCARD")
                .arg(self.keys.in_flight(org))
                .query_async(&mut conn),
        )
        .await
    }

    /// Tell every replica that an org's plan or keys changed.
    pub async fn publish_org_change(&self, payload: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .bounded(
                redis::cmd("PUBLISH")
                    .arg(self.keys.org_changes_channel())
                    .arg(payload)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }
}

/// One call to Redis: a single `EVALSHA`, or a pipeline of them.
enum Call {
    One(redis::Cmd),
    Many(redis::Pipeline),
}

impl Call {
    async fn query(&self, conn: &mut Conn) -> redis::RedisResult<RawReplies> {
        match self {
            Call::One(cmd) => cmd.query_async::<Vec<i64>>(conn).await.map(|r| vec![r]),
            Call::Many(pipe) => pipe.query_async(conn).await,
        }
    }
}

fn status_of(code: Option<i64>) -> Result<Status, StoreError> {
    Ok(match code {
        Some(0) => Status::Applied,
        Some(1) => Status::Denied,
        Some(2) => Status::DryRunAllowed,
        Some(3) => Status::Duplicate,
        Some(4) => Status::AppliedOverLimit,
        Some(5) => Status::NeedsRestore,
        Some(6) => Status::WouldOverflow,
        other => return Err(StoreError::Protocol(format!("status {other:?}"))),
    })
}

/// `leased`: the call's specs when it carried lease arguments (their leasable limits have three
/// more values each, after every limit's three). `slot`: the call took a concurrency slot, whose
/// three values follow the limits' (before the lease values). `specs`: the call's limits, whose
/// counter metrics each have two more values (credits) after the lease values.
fn parse_reply(
    raw: &[i64],
    specs: &[KeySpec],
    leased: Option<&[KeySpec]>,
    slot: bool,
) -> Result<Reply, StoreError> {
    let n = specs.len();
    let status = status_of(raw.first().copied())?;
    if matches!(
        status,
        Status::Duplicate | Status::NeedsRestore | Status::WouldOverflow
    ) {
        return Ok(Reply {
            status,
            limits: Vec::new(),
            keys: Vec::new(),
            leases: Vec::new(),
            crossings: Vec::new(),
            credits: Vec::new(),
            slot: None,
        });
    }
    let s = usize::from(slot);
    // After the limits (and their lease values), (limit index, percent, value after) for
    // crossed notification thresholds: usually none.
    let extra = leased.map_or(0, |s| s.iter().filter(|s| s.kind.leasable()).count());
    let groups = credit_heads(specs).count();
    let lease_end = 1 + 3 * (n + s) + 3 * extra;
    let fixed = lease_end + 2 * groups;
    if raw.len() < fixed || !(raw.len() - fixed).is_multiple_of(3) {
        return Err(StoreError::Protocol(format!(
            "{} values for {n} limits",
            raw.len()
        )));
    }
    let crossings = raw[fixed..]
        .chunks_exact(3)
        .filter_map(|c| {
            let i = usize::try_from(c[0])
                .ok()?
                .checked_sub(1)
                .filter(|&i| i < n)?;
            Some((i, u16::try_from(c[1]).ok()?, c[2]))
        })
        .collect();
    let limits = raw[1..1 + 3 * n]
        .chunks_exact(3)
        .map(|c| LimitReply {
            denied: c[0] == 1,
            value: c[1],
            millis: c[2],
        })
        .collect();
    let credits = credit_heads(specs)
        .zip(raw[lease_end..fixed].chunks_exact(2))
        .map(|(index, c)| CreditReply {
            index,
            drawn: c[0],
            remaining: u64::try_from(c[1]).ok(),
        })
        .collect();
    let slot = slot.then(|| LimitReply {
        denied: raw[1 + 3 * n] == 1,
        value: raw[2 + 3 * n],
        millis: raw[3 + 3 * n],
    });
    let mut tail = raw[1 + 3 * (n + s)..lease_end].chunks_exact(3);
    let leases = leased
        .map(|specs| {
            specs
                .iter()
                .map(|s| match (s.kind.leasable(), tail.next()) {
                    (true, Some(c)) => LeaseReply {
                        granted: c[0].max(0) as u64,
                        swept: c[1].max(0) as u64,
                        reserved: c[2].max(0) as u64,
                    },
                    _ => LeaseReply::default(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Reply {
        status,
        limits,
        keys: Vec::new(),
        leases,
        crossings,
        credits,
        slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_status_has_a_meaning() {
        let expected = [
            (0, Status::Applied),
            (1, Status::Denied),
            (2, Status::DryRunAllowed),
            (3, Status::Duplicate),
            (4, Status::AppliedOverLimit),
            (5, Status::NeedsRestore),
            (6, Status::WouldOverflow),
        ];
        for (code, status) in expected {
            assert_eq!(status_of(Some(code)).unwrap(), status);
        }
        assert!(matches!(status_of(Some(7)), Err(StoreError::Protocol(_))));
        assert!(matches!(status_of(None), Err(StoreError::Protocol(_))));
    }

    #[test]
    fn an_overflow_reply_carries_no_limits_and_is_not_an_outage() {
        let reply = parse_reply(&[6], &[], None, false).unwrap();
        assert_eq!(reply.status, Status::WouldOverflow);
        assert!(reply.limits.is_empty());
        assert!(!StoreError::CounterOverflow.is_unavailable());
        assert!(!StoreError::CounterOverflow.lost_with_connection());
    }

    #[test]
    fn crossings_follow_the_limits_and_a_reply_without_them_is_unchanged() {
        let gauge = |key: &str| KeySpec {
            key: key.into(),
            kind: SpecKind::Gauge,
            amount: 1,
            limit: 10,
            block: true,
            param: 0,
            notify: Vec::new(),
            headroom: false,
        };
        let two = [gauge("qg:{a}:g:x"), gauge("qg:{a}:g:y")];
        let plain = parse_reply(&[0, 0, 5, 0, 0, 9, 0], &two, None, false).unwrap();
        assert!(plain.crossings.is_empty());
        assert_eq!(plain.limits.len(), 2);
        let crossed = parse_reply(
            &[0, 0, 5, 0, 0, 9, 0, 2, 80, 10, 2, 100, 10],
            &two,
            None,
            false,
        )
        .unwrap();
        assert_eq!(crossed.crossings, [(1, 80, 10), (1, 100, 10)]);
        assert_eq!(crossed.limits[1].value, 9);
        assert!(matches!(
            parse_reply(&[0, 0, 5, 0, 2, 80], &two[..1], None, false),
            Err(StoreError::Protocol(_))
        ));
    }

    #[test]
    fn credit_values_sit_between_leases_and_crossings_one_pair_per_counter_metric() {
        let spec = |key: &str, kind, block| KeySpec {
            key: key.into(),
            kind,
            amount: 3,
            limit: 10,
            block,
            param: 0,
            notify: Vec::new(),
            headroom: false,
        };
        let specs = [
            spec("qg:{a}:c:tokens:month:1", SpecKind::Meter, false),
            spec("qg:{a}:c:tokens:day:1", SpecKind::Counter, true),
            spec("qg:{a}:g:seats", SpecKind::Gauge, true),
            spec("qg:{a}:c:requests:month:1", SpecKind::Meter, true),
        ];
        assert_eq!(credit_heads(&specs).collect::<Vec<_>>(), [0, 3]);
        let raw = [
            0, 0, 1, 0, 0, 9, 0, 0, 2, 0, 0, 4, 0, 2, 5, 0, -1, 2, 100, 12,
        ];
        let reply = parse_reply(&raw, &specs, None, false).unwrap();
        assert_eq!(
            reply.credits,
            [
                CreditReply {
                    index: 0,
                    drawn: 2,
                    remaining: Some(5)
                },
                CreditReply {
                    index: 3,
                    drawn: 0,
                    remaining: None
                }
            ]
        );
        assert_eq!(reply.crossings, [(1, 100, 12)]);
    }

    #[test]
    fn a_slot_reply_follows_the_limits_and_precedes_crossings() {
        let seats = [KeySpec {
            key: "qg:{a}:g:seats".into(),
            kind: SpecKind::Gauge,
            amount: 1,
            limit: 10,
            block: true,
            param: 0,
            notify: Vec::new(),
            headroom: false,
        }];
        let reply = parse_reply(&[1, 0, 5, 0, 1, 3, 2, 1, 80, 5], &seats, None, true).unwrap();
        assert_eq!(reply.limits.len(), 1);
        assert_eq!(
            reply.slot,
            Some(LimitReply {
                denied: true,
                value: 3,
                millis: 2
            })
        );
        assert_eq!(reply.crossings, [(0, 80, 5)]);
        assert!(parse_reply(&[0, 0, 5, 0], &seats, None, true).is_err());
    }

    #[test]
    fn triggers_are_the_smallest_values_at_or_past_the_percentage() {
        let spec = |limit| KeySpec {
            key: String::new(),
            kind: SpecKind::Counter,
            amount: 1,
            limit,
            block: true,
            param: 0,
            notify: vec![80, 100],
            headroom: false,
        };
        assert_eq!(spec(20).trigger(80), 16);
        assert_eq!(spec(3).trigger(80), 3, "2.4 rounds up");
        assert_eq!(spec(3).trigger(1), 1);
        assert_eq!(spec(1000).trigger(1000), 10_000);
        assert_eq!(spec(u64::MAX).trigger(100), u64::MAX);
    }

    #[test]
    fn the_script_and_the_domain_agree_on_the_largest_counter() {
        let script = include_str!("decide.lua");
        let line = format!(
            "local MAX_COUNTER = {}",
            crate::domain::decision::MAX_COUNTER
        );
        assert!(script.contains(&line), "decide.lua must declare `{line}`");
    }
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: SecretString,
    pub key_prefix: String,
    /// How long Redis may go without answering anything before it counts as unreachable (a
    /// slow answer while Redis answers others is waited for; see `store::Store::await_decide`).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// What decisions do while Redis is unreachable.
    pub on_error: OnRedisError,
    /// Fraction of each limit (of what was left of it) one replica may admit on its own while
    /// Redis is unreachable, in `local` mode. With N replicas, 1/N never over-admits.
    pub local_share: f64,
    /// A single Redis (or a managed primary with replicas) or a Redis Cluster.
    pub mode: RedisMode,
    /// Refuse readiness while a Redis primary may evict keys (`maxmemory-policy` other than
    /// `noeviction`): an evicted counter silently resets a budget.
    pub require_noeviction: bool,
}

impl RedisSettings {
    /// The node URLs: one for standalone; for a cluster, `url` may list several seeds
    /// separated by commas.
    /// `host:port` of each seed, for messages (never a password).
    pub fn describe_seeds(&self) -> String {
        self.seeds()
            .iter()
            .map(|s| {
                let rest = s.split_once("://").map_or(s.as_str(), |(_, r)| r);
                let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
                rest.split('/').next().unwrap_or(rest).to_string()
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn seeds(&self) -> Vec<String> {
        use secrecy::ExposeSecret;
        self.url
            .expose_secret()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
}
