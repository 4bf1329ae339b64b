//! The Redis adapter: counters, gauges, rate state and idempotency markers.
//!
//! One decision is one `EVALSHA` of `decide.lua` (reloaded by `redis::Script` on `NOSCRIPT`),
//! sent over a multiplexed connection so that concurrent decisions are pipelined on one socket
//! instead of each waiting for a pooled connection.

pub mod connection;
pub mod dirty;
pub mod eviction;
pub mod keys;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{RedisMode, RedisSettings};
use crate::domain::decision::{Limit, LimitReply, Target};
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
}

impl StoreError {
    /// Redis could not be reached in time (as opposed to a script or protocol error): the
    /// outage modes apply.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
            }
            StoreError::Protocol(_) => false,
        }
    }
}

/// How the script treats the limits it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deny if any blocking limit would be exceeded; otherwise apply every charge.
    Check,
    /// The same checks; apply nothing.
    DryRun,
    /// Never deny; apply every charge (usage reported after the fact, adjustments).
    Record,
    /// Check, report what would be denied, but apply every charge anyway.
    Shadow,
}

impl Mode {
    fn as_arg(self) -> &'static str {
        match self {
            Mode::Check => "check",
            Mode::DryRun => "dry",
            Mode::Record => "record",
            Mode::Shadow => "shadow",
        }
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
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: Status,
    /// One per limit, in the order given; empty for `Duplicate`.
    pub limits: Vec<LimitReply>,
    /// The Redis key of each limit, in the same order (empty unless from `run`).
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecKind {
    Counter,
    /// The calendar-month meter of a counter: durable.
    Meter,
    Gauge,
    Rate,
}

impl SpecKind {
    fn as_arg(self) -> &'static str {
        match self {
            SpecKind::Counter => "c",
            SpecKind::Meter => "m",
            SpecKind::Gauge => "g",
            SpecKind::Rate => "r",
        }
    }
}

/// One limit as the script sees it (see the argument contract in `decide.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub key: String,
    pub kind: SpecKind,
    pub amount: i64,
    /// 0: unlimited.
    pub limit: u64,
    pub block: bool,
    /// Counters: expiry (Unix ms); rates: window (µs); gauges: 0.
    pub param: i64,
}

impl KeySpec {
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

/// How long a replayed batch's id is remembered.
const REPLAY_IDEMPOTENCY_TTL: Duration = Duration::from_secs(48 * 3600);

/// How long a period counter outlives its period, so late reads (the usage view of a just-ended
/// period, the flusher) still find it.
fn expiry_grace(period: crate::domain::period::Period) -> chrono::Duration {
    use crate::domain::period::Period;
    match period {
        Period::Minute | Period::Hour => chrono::Duration::minutes(10),
        Period::Day => chrono::Duration::hours(6),
        Period::Month => chrono::Duration::days(7),
    }
}

#[derive(Clone)]
pub struct Store {
    conn: Conn,
    client: redis::Client,
    keys: Keys,
    decide: std::sync::Arc<redis::Script>,
    timeout: Duration,
    metrics: std::sync::Arc<Metrics>,
    /// False after a connection failure, until a call succeeds again (counts reconnects).
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    restore: std::sync::Arc<redis::Script>,
    dirty: std::sync::Arc<dirty::DirtySet>,
    eviction: std::sync::Arc<eviction::EvictionWatch>,
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
        let conn = match settings.mode {
            RedisMode::Standalone => {
                Conn::standalone(client.clone(), settings.connect_timeout, settings.timeout)?
            }
            RedisMode::Cluster => {
                Conn::cluster(&seeds, settings.connect_timeout, settings.timeout)?
            }
        };
        Ok(Self {
            conn,
            client,
            keys: Keys::new(settings.key_prefix.clone()),
            decide: std::sync::Arc::new(redis::Script::new(include_str!("decide.lua"))),
            timeout: settings.timeout,
            metrics,
            healthy: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            restore: std::sync::Arc::new(redis::Script::new(include_str!("restore.lua"))),
            dirty: std::sync::Arc::new(dirty::DirtySet::default()),
            eviction: std::sync::Arc::new(eviction::EvictionWatch::new(
                settings.require_noeviction,
            )),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A client for dedicated connections (pub/sub), which cannot share the multiplexed one.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Run one Redis call under the configured timeout, keeping the error counters and the
    /// degraded gauge current.
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        match &result {
            Ok(_) => {
                if !self.healthy.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    self.metrics.redis_reconnects.inc();
                }
            }
            Err(e) => {
                let kind = match e {
                    StoreError::Timeout(_) => "timeout",
                    StoreError::Redis(r) if r.is_io_error() || r.is_connection_dropped() => {
                        "connection"
                    }
                    _ => "other",
                };
                self.metrics.redis_errors.with_label_values(&[kind]).inc();
                if kind != "other" {
                    self.healthy
                        .store(false, std::sync::atomic::Ordering::Release);
                }
            }
        }
        result
    }

    /// `EVALSHA` the decide script, loading it once more when Redis answers `NOSCRIPT` (after a
    /// restart, a failover or `SCRIPT FLUSH`).
    async fn eval_decide(&self, cmd: &redis::Cmd) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let started = std::time::Instant::now();
        let first = self.bounded(cmd.query_async::<Vec<i64>>(&mut conn)).await;
        let result = match first {
            Err(StoreError::Redis(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.metrics.redis_script_reloads.inc();
                self.bounded(self.decide.load_async(&mut conn)).await?;
                self.bounded(cmd.query_async::<Vec<i64>>(&mut conn)).await
            }
            other => other,
        };
        self.metrics
            .redis_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The script arguments of one limit: its key, kind and expiry or window.
    pub fn spec(&self, org: &OrgId, limit: &Limit<'_>) -> KeySpec {
        let (kind, param) = match &limit.target {
            Target::Counter { period, window } => (
                if limit.is_meter() {
                    SpecKind::Meter
                } else {
                    SpecKind::Counter
                },
                (window.end + expiry_grace(*period)).timestamp_millis(),
            ),
            Target::Gauge => (SpecKind::Gauge, 0),
            Target::Rate { window, .. } => (SpecKind::Rate, window.as_micros() as i64),
        };
        KeySpec {
            key: self.keys.limit(org, limit),
            kind,
            amount: limit.amount,
            limit: limit.limit.unwrap_or(0),
            block: limit.blocks(),
            param,
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
        let idem = idempotency.map(|(key, ttl)| (self.keys.idempotency(org, key), ttl));
        let marker = self.marker(org, now);
        let mut reply = self
            .eval_specs(&specs, mode, now, idem, Some(marker))
            .await?;
        reply.keys = specs.into_iter().map(|s| s.key).collect();
        Ok(reply)
    }

    /// Add usage counted while Redis was unreachable (see `local`). The batch carries its own
    /// idempotency key, so a replay retried after a timeout that did reach Redis is not counted
    /// twice.
    pub async fn replay(
        &self,
        org: &OrgId,
        specs: &[KeySpec],
        batch_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Status, StoreError> {
        let idem = Some((self.keys.idempotency(org, batch_id), REPLAY_IDEMPOTENCY_TTL));
        let marker = self.marker(org, now);
        Ok(self
            .eval_specs(specs, Mode::Record, now, idem, Some(marker))
            .await?
            .status)
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
    pub async fn restore(
        &self,
        org: &OrgId,
        now: DateTime<Utc>,
        entries: &[(String, i64, i64, i64)],
    ) -> Result<bool, StoreError> {
        let marker = self.marker(org, now);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.restore.get_hash())
            .arg(2 + 2 * entries.len())
            .arg(&marker.key)
            .arg(&marker.resident);
        for (key, ..) in entries {
            cmd.arg(key).arg(Keys::version(key));
        }
        cmd.arg(marker.expiry);
        for (_, value, version, expiry) in entries {
            cmd.arg(value).arg(version).arg(expiry);
        }
        let mut conn = self.conn.clone();
        let first: Result<i64, StoreError> = self.bounded(cmd.query_async(&mut conn)).await;
        let restored = match first {
            Err(StoreError::Redis(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.metrics.redis_script_reloads.inc();
                self.bounded(self.restore.load_async(&mut conn)).await?;
                self.bounded(cmd.query_async(&mut conn)).await?
            }
            other => other?,
        };
        Ok(restored == 1)
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

    async fn eval_specs(
        &self,
        specs: &[KeySpec],
        mode: Mode,
        now: DateTime<Utc>,
        idempotency: Option<(String, Duration)>,
        marker: Option<MonthMarker>,
    ) -> Result<Reply, StoreError> {
        let durable = specs.iter().filter(|s| s.is_durable()).count();
        let mut cmd = redis::Cmd::with_capacity(6 + specs.len() * 7 + 2, 64 + specs.len() * 128);
        cmd.arg("EVALSHA").arg(self.decide.get_hash()).arg(
            specs.len()
                + durable
                + usize::from(idempotency.is_some())
                + 2 * usize::from(marker.is_some()),
        );
        if let Some((k, _)) = &idempotency {
            cmd.arg(k);
        }
        if let Some(m) = &marker {
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
        }
        cmd.arg(now.timestamp_micros()).arg(mode.as_arg());
        match &idempotency {
            Some((_, ttl)) => cmd.arg(ttl.as_millis() as u64),
            None => cmd.arg(0),
        };
        cmd.arg(marker.as_ref().map_or(0, |m| m.expiry));
        for spec in specs {
            cmd.arg(spec.kind.as_arg())
                .arg(spec.amount)
                .arg(spec.limit)
                .arg(if spec.block { "1" } else { "0" })
                .arg(spec.param);
        }
        let raw = self.eval_decide(&cmd).await?;
        let reply = parse_reply(&raw, specs.len())?;
        if matches!(reply.status, Status::Applied | Status::AppliedOverLimit) {
            for spec in specs.iter().filter(|s| s.is_durable() && s.amount != 0) {
                self.dirty.mark(&spec.key);
            }
        }
        Ok(reply)
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

fn parse_reply(raw: &[i64], n: usize) -> Result<Reply, StoreError> {
    let status = match raw.first() {
        Some(0) => Status::Applied,
        Some(1) => Status::Denied,
        Some(2) => Status::DryRunAllowed,
        Some(4) => Status::AppliedOverLimit,
        Some(5) => {
            return Ok(Reply {
                status: Status::NeedsRestore,
                limits: Vec::new(),
                keys: Vec::new(),
            });
        }
        Some(3) => {
            return Ok(Reply {
                status: Status::Duplicate,
                limits: Vec::new(),
                keys: Vec::new(),
            });
        }
        other => return Err(StoreError::Protocol(format!("status {other:?}"))),
    };
    if raw.len() != 1 + 3 * n {
        return Err(StoreError::Protocol(format!(
            "{} values for {n} limits",
            raw.len()
        )));
    }
    let limits = raw[1..]
        .chunks_exact(3)
        .map(|c| LimitReply {
            denied: c[0] == 1,
            value: c[1],
            millis: c[2],
        })
        .collect();
    Ok(Reply {
        status,
        limits,
        keys: Vec::new(),
    })
}
