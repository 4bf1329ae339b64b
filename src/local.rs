//! Deciding while Redis is unreachable, and giving Redis back every unit admitted meanwhile,
//! exactly once.
//!
//! Slow is not down: a decision waits for Redis as long as Redis makes progress (see
//! `Store::await_decide`). Only evidence of unreachability (a refused, reset or closed
//! connection, or a deadline with no reply at all) trips this replica into degraded mode. Until a
//! background probe reaches Redis again, decisions skip Redis entirely (so no request waits for a
//! deadline) and are made here, per `[redis] on_error`:
//! - `local`: counters and gauges are checked against what this replica last saw in Redis plus
//!   everything it admitted that Redis has not confirmed yet, with at most `local_share` of what
//!   was left of each limit; rates use `governor` with `local_share` of each rate.
//! - `open`: everything is admitted and counted.
//! - `closed`: decisions answer 503 (this module only tracks the degraded state).
//!
//! Exactness rests on three rules:
//! - **Unconfirmed units count.** A unit admitted here counts against the local cap until Redis
//!   has confirmed it, so failed replays never grant the quota again.
//! - **Replays are idempotent.** Units are replayed in batches that carry an idempotency key: the
//!   gateway's own for aggregated traffic, the client's own for usage reports, so a report
//!   resent during or after the outage is a duplicate whichever copy reached Redis first.
//! - **A call in doubt is learned, not guessed.** A decision sent to Redis whose answer did not
//!   come in time is awaited in the background: if Redis applied it, the local admission is not
//!   replayed; if not, it is. Only a call whose answer can never arrive (its connection broke) is
//!   replayed on a guess, and counted in `quota_gateway_in_doubt_total{outcome="unknown"}`.
//!
//! On shutdown with Redis unreachable, what is left goes to Postgres (`replay_outbox`), which any
//! replica applies to Redis once it is reachable, with the same idempotency keys.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;

use crate::db::DbError;
use crate::domain::decision::Mode;
use crate::domain::decision::{Limit, LimitReply, MAX_COUNTER, OnRedisError, Target};
use crate::domain::org::OrgId;
use crate::metrics::Metrics;
use crate::store::{
    Batch, InDoubt, KeySpec, REPLAY_IDEMPOTENCY_TTL, Reply, SpecKind, Status, Store, StoreError,
};

/// Why a replay did not go through; it is retried.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What recovery needs from the layer that owns this one: the time, and sending one batch to
/// Redis with the org's counters restored first if Redis lost them (that dance lives with the
/// decisions, once).
pub trait Replayer: Send + Sync {
    fn now(&self) -> chrono::DateTime<chrono::Utc>;
    fn send(
        &self,
        batch: &Batch,
        now: chrono::DateTime<chrono::Utc>,
    ) -> impl std::future::Future<Output = Result<Status, ReplayError>> + Send;
}

/// How often a degraded replica probes Redis and retries its replay.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How often a healthy replica looks for usage other replicas left in Postgres.
const OUTBOX_EVERY: Duration = Duration::from_secs(5);
/// Bound on remembered counter values; past it the memory starts over.
const MAX_KNOWN: usize = 500_000;
/// Bound on the idempotency keys of usage reports remembered while degraded; past it the memory
/// starts over (Redis still recognises every key when the replay reaches it).
const MAX_ACCEPTED: usize = 100_000;

/// Usage admitted while degraded without an idempotency key, per Redis key.
#[derive(Debug, Clone)]
struct Pending {
    kind: SpecKind,
    param: i64,
    amount: i64,
    /// The limit and its notification thresholds, so the replay reports crossings.
    limit: u64,
    notify: Vec<u16>,
}

/// A locally made decision whose Redis call is in doubt.
struct Doubt {
    org: OrgId,
    specs: Vec<KeySpec>,
    idempotency_key: Option<String>,
    /// Whether this replica admitted (and so counted) the request.
    admitted: bool,
    /// Units a lease settles: an unknown outcome is counted in units, not as one decision.
    lease: bool,
}

#[derive(Default)]
struct Ledger {
    pending: HashMap<OrgId, HashMap<String, Pending>>,
    batches: Vec<Batch>,
    /// Per Redis key: units admitted here that Redis has not confirmed (pending, in batches, or
    /// in doubt). They count against the local cap until confirmed.
    unconfirmed: HashMap<String, i64>,
    /// Usage-report idempotency keys accepted here while degraded.
    accepted: HashSet<(OrgId, String)>,
    doubts: HashMap<u64, Doubt>,
}

impl Ledger {
    fn add_unconfirmed(&mut self, specs: &[KeySpec], sign: i64) {
        for s in specs {
            let e = self.unconfirmed.entry(s.key.clone()).or_insert(0);
            *e = e.saturating_add(sign.saturating_mul(s.amount));
            if *e == 0 {
                self.unconfirmed.remove(&s.key);
            }
        }
    }

    /// Queue admitted units for replay: under the report's own key, or aggregated per org.
    fn queue(&mut self, org: &OrgId, specs: Vec<KeySpec>, key: Option<String>, ttl: Duration) {
        if specs.is_empty() {
            return;
        }
        match key {
            Some(key) => self.batches.push(Batch {
                org: org.clone(),
                key,
                ttl_ms: ttl.as_millis() as u64,
                specs,
                compensation: false,
            }),
            None => {
                let org_pending = self.pending.entry(org.clone()).or_default();
                for s in specs {
                    let p = org_pending.entry(s.key).or_insert(Pending {
                        kind: s.kind,
                        param: s.param,
                        amount: 0,
                        limit: s.limit,
                        notify: s.notify,
                    });
                    p.amount = p.amount.saturating_add(s.amount);
                }
            }
        }
    }

    /// Turn aggregated pending units into batches with fresh idempotency keys.
    fn seal(&mut self) {
        for (org, entries) in std::mem::take(&mut self.pending) {
            let specs: Vec<KeySpec> = entries
                .into_iter()
                .filter(|(_, p)| p.amount != 0)
                .map(|(key, p)| replay_spec(key, p.kind, p.param, p.amount, p.limit, p.notify))
                .collect();
            if !specs.is_empty() {
                self.batches.push(Batch {
                    org,
                    key: format!("replay:{}", uuid::Uuid::new_v4()),
                    ttl_ms: REPLAY_IDEMPOTENCY_TTL.as_millis() as u64,
                    specs,
                    compensation: false,
                });
            }
        }
    }

    fn has_work(&self) -> bool {
        !self.pending.is_empty() || !self.batches.is_empty()
    }
}

/// A limit as a replay carries it: never denies (replays run in "record" mode); the limit and
/// thresholds only let the script report a threshold the replay crosses.
fn replay_spec(
    key: String,
    kind: SpecKind,
    param: i64,
    amount: i64,
    limit: u64,
    notify: Vec<u16>,
) -> KeySpec {
    KeySpec {
        key,
        kind,
        amount,
        limit,
        block: false,
        param,
        notify,
        headroom: false,
    }
}

type RateKey = (String, Duration);

/// A decision carried by a call in doubt: its org, specs, idempotency key, whether this replica
/// admitted it, and whether it is units a lease settles (see `LocalMode::settle`).
pub type DoubtedDecision = (OrgId, Vec<KeySpec>, Option<String>, bool, bool);

pub struct LocalMode {
    on_error: OnRedisError,
    share: f64,
    degraded: AtomicBool,
    /// Last value seen in Redis for each limited counter and gauge.
    known: DashMap<String, i64>,
    ledger: Mutex<Ledger>,
    next_doubt: AtomicU64,
    rates: Mutex<HashMap<RateKey, Arc<DefaultKeyedRateLimiter<OrgId>>>>,
    /// How long usage-report idempotency keys are kept (`[usage] idempotency_ttl`).
    idempotency_ttl: Duration,
    metrics: Arc<Metrics>,
}

/// The outcome of a local decision, shaped like the store's.
pub struct LocalReply {
    pub status: Status,
    pub limits: Vec<LimitReply>,
}

impl LocalMode {
    pub fn new(
        on_error: OnRedisError,
        share: f64,
        idempotency_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            on_error,
            share,
            degraded: AtomicBool::new(false),
            known: DashMap::new(),
            ledger: Mutex::new(Ledger::default()),
            next_doubt: AtomicU64::new(0),
            rates: Mutex::new(HashMap::new()),
            idempotency_ttl,
            metrics,
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        match self.ledger.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn on_error(&self) -> OnRedisError {
        self.on_error
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Decisions go straight to the local path while degraded (in `local` and `open` modes).
    pub fn serves_locally(&self) -> bool {
        self.on_error != OnRedisError::Closed && self.is_degraded()
    }

    /// Redis is unreachable (a failed call, or one in doubt).
    pub fn trip(&self) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.degraded.set(1);
            tracing::warn!(
                on_error = self.on_error.as_str(),
                "Redis unreachable: degraded mode"
            );
        }
    }

    /// Remember the values Redis reported, to decide from them if it becomes unreachable.
    pub fn remember(&self, limits: &[Limit<'_>], reply: &Reply) {
        if self.on_error != OnRedisError::Local || reply.keys.len() != limits.len() {
            return;
        }
        let applied = matches!(reply.status, Status::Applied | Status::AppliedOverLimit);
        for ((limit, r), key) in limits.iter().zip(&reply.limits).zip(&reply.keys) {
            if limit.limit.is_none() || limit.is_rate() {
                continue;
            }
            let value = if applied {
                r.value.saturating_add(limit.amount).max(0)
            } else {
                r.value
            };
            if self.known.len() >= MAX_KNOWN {
                self.known.clear();
            }
            self.known.insert(key.clone(), value);
        }
    }

    /// Decide without Redis. `specs` are the limits' script arguments (keys and expiries).
    /// `idempotency_key`: a usage report's key (a repeat of one accepted here is a duplicate).
    /// `hold`: the request's Redis call is in doubt; its units count against the cap but are
    /// not queued for replay until the call's outcome is known (see `settle`).
    pub fn decide(
        &self,
        org: &OrgId,
        limits: &[Limit<'_>],
        specs: &[KeySpec],
        mode: Mode,
        idempotency_key: Option<&str>,
        hold: bool,
    ) -> LocalReply {
        let enforce = self.on_error == OnRedisError::Local
            && matches!(mode, Mode::Check | Mode::DryRun | Mode::Shadow);
        let mut ledger = self.ledger();
        if let Some(k) = idempotency_key
            && ledger.accepted.contains(&(org.clone(), k.to_owned()))
        {
            return LocalReply {
                status: Status::Duplicate,
                limits: Vec::new(),
            };
        }
        let mut replies = Vec::with_capacity(limits.len());
        let mut denied = false;
        for (limit, spec) in limits.iter().zip(specs) {
            let mut reply = LimitReply::default();
            if limit.is_rate() {
                replies.push(reply);
                continue;
            }
            let known = self.known.get(&spec.key).map_or(0, |v| *v);
            let admitted = ledger.unconfirmed.get(&spec.key).copied().unwrap_or(0);
            reply.value = known.saturating_add(admitted).max(0);
            if limit.amount > 0 && reply.value.saturating_add(limit.amount) > MAX_COUNTER {
                // As `decide.lua` would: nothing is counted past the largest counter value.
                return LocalReply {
                    status: Status::WouldOverflow,
                    limits: Vec::new(),
                };
            }
            if enforce
                && limit.blocks()
                && (limit.amount > 0 || limit.headroom)
                && let Some(max) = limit.limit
            {
                let left = (max as i64 - known).max(0) as f64;
                let cap = known + (left * self.share).floor() as i64;
                // A headroom check (amount 0) needs one unit of room, as in `decide.lua`.
                if reply.value.saturating_add(limit.amount.max(1)) > cap {
                    reply.denied = true;
                    denied = true;
                }
            }
            replies.push(reply);
        }
        // Rates last, so a counter denial does not spend rate budget.
        if enforce && !denied && mode != Mode::DryRun {
            for (limit, reply) in limits.iter().zip(replies.iter_mut()) {
                if let Target::Rate { window, .. } = &limit.target
                    && let Some(wait) = self.check_rate(org, limit, *window)
                {
                    reply.denied = true;
                    reply.millis = wait.as_millis() as i64;
                    denied = true;
                }
            }
        }
        let shadow = mode == Mode::Shadow;
        if denied && !shadow {
            return LocalReply {
                status: Status::Denied,
                limits: replies,
            };
        }
        if mode == Mode::DryRun {
            return LocalReply {
                status: Status::DryRunAllowed,
                limits: replies,
            };
        }
        let counted = counted_specs(specs);
        ledger.add_unconfirmed(&counted, 1);
        if let Some(k) = idempotency_key {
            if ledger.accepted.len() >= MAX_ACCEPTED {
                ledger.accepted.clear();
            }
            ledger.accepted.insert((org.clone(), k.to_owned()));
        }
        if !hold {
            ledger.queue(
                org,
                counted,
                idempotency_key.map(str::to_owned),
                self.idempotency_ttl,
            );
        }
        LocalReply {
            status: if denied {
                Status::AppliedOverLimit
            } else {
                Status::Applied
            },
            limits: replies,
        }
    }

    /// Units already admitted (from a lease block) that Redis has not counted, because the
    /// call that would have settled them failed: replayed like units admitted while degraded.
    pub fn adopt(&self, org: &OrgId, specs: &[KeySpec]) {
        let counted = counted_specs(specs);
        let mut ledger = self.ledger();
        ledger.add_unconfirmed(&counted, 1);
        ledger.queue(org, counted, None, self.idempotency_ttl);
    }

    /// Units already admitted that travel in a call now in doubt: they count against the local
    /// cap until `settle` learns whether Redis took them (pass them there as admitted).
    pub fn hold(&self, specs: &[KeySpec]) {
        self.ledger().add_unconfirmed(&counted_specs(specs), 1);
    }

    /// Learn the outcome of Redis calls in doubt, in the background, and account for each of the
    /// decisions they carried exactly once. `decisions`: per decision in the call, in order, its
    /// org, specs, idempotency key and whether this replica admitted it (after `decide` with
    /// `hold`).
    pub fn settle(
        self: &Arc<Self>,
        store: &Store,
        in_doubt: InDoubt,
        decisions: Vec<DoubtedDecision>,
    ) {
        let ids: Vec<u64> = {
            let mut ledger = self.ledger();
            decisions
                .into_iter()
                .map(|(org, specs, idempotency_key, admitted, lease)| {
                    let id = self.next_doubt.fetch_add(1, Ordering::Relaxed);
                    ledger.doubts.insert(
                        id,
                        Doubt {
                            org,
                            specs: counted_specs(&specs),
                            idempotency_key,
                            admitted,
                            lease,
                        },
                    );
                    id
                })
                .collect()
        };
        let this = self.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let statuses = in_doubt.resolve().await;
            for (i, id) in ids.into_iter().enumerate() {
                // A pipeline has a status per decision; a single script call carries all of its
                // decisions (a request and the lease units it settles) under its one status.
                let status = statuses.as_ref().and_then(|s| match s.len() {
                    1 => s.first().copied(),
                    _ => s.get(i).copied(),
                });
                this.resolve_doubt(&store, id, status);
            }
        });
    }

    /// Account for one decision whose Redis call was in doubt, now that its outcome is known
    /// (`None`: it never will be). A doubt already taken by shutdown is left alone.
    fn resolve_doubt(&self, store: &Store, id: u64, status: Option<Status>) {
        let mut ledger = self.ledger();
        let Some(d) = ledger.doubts.remove(&id) else {
            return;
        };
        let applied = matches!(status, Some(Status::Applied | Status::AppliedOverLimit));
        let duplicate = status == Some(Status::Duplicate);
        let outcome = match status {
            None => "unknown",
            Some(_) if applied => "applied",
            Some(_) => "not_applied",
        };
        self.metrics.in_doubt.with_label_values(&[outcome]).inc();
        if status.is_none() && d.lease {
            self.metrics
                .lease_unknown_units
                .inc_by(max_amount(&d.specs));
        }
        match (d.admitted, applied || duplicate, status.is_some()) {
            // Redis counted it (or an earlier copy of the report): nothing to replay.
            (true, true, _) => {
                ledger.add_unconfirmed(&d.specs, -1);
                if applied {
                    for s in &d.specs {
                        if let Some(mut v) = self.known.get_mut(&s.key) {
                            *v = v.saturating_add(s.amount).max(0);
                        }
                    }
                    store.mark(&d.specs);
                }
            }
            // Admitted here, and Redis did not count it, or nobody can tell: replay it. With the
            // report's own key the guess is exact; without one it may count a unit twice.
            (true, false, _) => {
                let ttl = self.idempotency_ttl;
                ledger.queue(&d.org, d.specs, d.idempotency_key, ttl);
            }
            // Refused here, and Redis counted it: give the units back (rates keep the attempt).
            // Not for a usage report: Redis keeps its key, so the client's retry is a duplicate
            // and the units must stay.
            (false, true, true) if applied && d.idempotency_key.is_none() => {
                let specs: Vec<KeySpec> = d
                    .specs
                    .into_iter()
                    .map(|s| KeySpec {
                        amount: -s.amount,
                        ..s
                    })
                    .collect();
                ledger.batches.push(Batch {
                    org: d.org,
                    key: format!("refund:{}", uuid::Uuid::new_v4()),
                    ttl_ms: REPLAY_IDEMPOTENCY_TTL.as_millis() as u64,
                    specs,
                    compensation: true,
                });
            }
            _ => {}
        }
    }

    /// Decisions whose call broke with its connection: Redis may have run them before the reply
    /// was lost, and nobody can learn whether. They are decided here like any other while
    /// degraded, so each may be counted twice; `in_doubt_total{outcome="unknown"}` bounds that.
    pub fn lost_with_connection(&self, decisions: usize) {
        self.metrics
            .in_doubt
            .with_label_values(&["unknown"])
            .inc_by(decisions as u64);
    }

    /// `None` when the rate admits `limit.amount` now, else how long until it would.
    fn check_rate(&self, org: &OrgId, limit: &Limit<'_>, window: Duration) -> Option<Duration> {
        let max = ((limit.limit.unwrap_or(1) as f64) * self.share)
            .floor()
            .max(1.0) as u32;
        let burst = NonZeroU32::new(max)?;
        let limiter = {
            let mut rates = self.rates.lock().ok()?;
            rates
                .entry((limit.metric.id.clone(), window))
                .or_insert_with(|| {
                    let period = (window / burst.get()).max(Duration::from_nanos(1));
                    let quota = Quota::with_period(period)
                        .unwrap_or_else(|| Quota::per_second(burst))
                        .allow_burst(burst);
                    Arc::new(DefaultKeyedRateLimiter::keyed(quota))
                })
                .clone()
        };
        let n = NonZeroU32::new(u32::try_from(limit.amount.max(1)).unwrap_or(u32::MAX))?;
        match limiter.check_key_n(org, n) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))),
            Err(_) => Some(window),
        }
    }

    /// Units admitted locally and not yet confirmed by Redis (in doubt included).
    pub fn pending_units(&self) -> i64 {
        self.ledger().unconfirmed.values().sum()
    }

    /// Calls in doubt whose outcome is still awaited.
    pub fn in_doubt(&self) -> usize {
        self.ledger().doubts.len()
    }

    fn has_work(&self) -> bool {
        self.ledger().has_work()
    }

    /// Probe Redis while degraded and replay pending usage; apply what other replicas left in
    /// Postgres; on `stop`, hand Redis (or else Postgres) everything still unconfirmed.
    pub async fn recover<R: Replayer>(
        self: Arc<Self>,
        replayer: Arc<R>,
        store: Store,
        pool: sqlx::PgPool,
        stop: CancellationToken,
    ) {
        let (replayer, pool) = (&*replayer, &pool);
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_outbox: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.drain_on_shutdown(replayer, pool).await;
                    return;
                }
                _ = tick.tick() => {}
            }
            if !self.is_degraded() && !self.has_work() {
                if last_outbox.is_none_or(|t| t.elapsed() >= OUTBOX_EVERY) {
                    last_outbox = Some(tokio::time::Instant::now());
                    match self.apply_outbox(replayer, pool).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(units = n, "applied usage left in the replay outbox")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "replay outbox not applied; retrying later")
                        }
                    }
                }
                continue;
            }
            if store.ping().await.is_err() {
                continue;
            }
            match self.replay(replayer, replayer.now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    units = n,
                    "replayed usage admitted while Redis was unreachable"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "replay failed; retrying");
                    continue;
                }
            }
            // Redis answers and has what this replica queued: decide there again. Decisions
            // that were already under way locally queue their units for the next tick.
            if self.is_degraded() {
                self.degraded.store(false, Ordering::Release);
                self.metrics.degraded.set(0);
                tracing::info!("Redis reachable again: degraded mode over");
            }
        }
    }

    /// Shutdown: wait a little for calls in doubt, then replay everything; what Redis does not
    /// take goes to the replay outbox in Postgres. Nothing admitted is dropped while either store
    /// is up.
    async fn drain_on_shutdown(&self, replayer: &impl Replayer, pool: &sqlx::PgPool) {
        let wait_until = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.in_doubt() > 0 && tokio::time::Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        {
            // Calls still in doubt can no longer be learned before exiting: replay them (with a
            // report's own key, exactly; without, possibly twice: counted as unknown).
            let mut ledger = self.ledger();
            let ttl = self.idempotency_ttl;
            for (_, d) in std::mem::take(&mut ledger.doubts) {
                self.metrics.in_doubt.with_label_values(&["unknown"]).inc();
                if d.admitted {
                    ledger.queue(&d.org, d.specs, d.idempotency_key, ttl);
                }
            }
        }
        if !self.has_work() {
            return;
        }
        match self.replay(replayer, replayer.now()).await {
            Ok(n) => {
                tracing::info!(units = n, "replayed admitted usage before exiting");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Redis did not take the admitted usage before exiting; writing it to Postgres")
            }
        }
        let batches = {
            let mut ledger = self.ledger();
            ledger.seal();
            std::mem::take(&mut ledger.batches)
        };
        let units: i64 = batches
            .iter()
            .flat_map(|b| &b.specs)
            .map(|s| s.amount)
            .sum();
        match crate::db::outbox::put(pool, &batches).await {
            Ok(()) => tracing::info!(
                units,
                batches = batches.len(),
                "admitted usage written to the replay outbox; the next replica to reach Redis applies it"
            ),
            Err(e) => {
                self.metrics.usage_lost.inc_by(units.max(0) as u64);
                tracing::error!(error = %e, units, "neither Redis nor Postgres took the admitted usage before exiting; it is lost");
            }
        }
    }

    /// Apply batches other replicas (or this one, before a restart) left in Postgres.
    async fn apply_outbox(
        &self,
        replayer: &impl Replayer,
        pool: &sqlx::PgPool,
    ) -> Result<i64, ReplayError> {
        let mut tx = pool.begin().await.map_err(DbError::from)?;
        let claimed = crate::db::outbox::claim(&mut tx).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let now = replayer.now();
        let mut units = 0;
        for (_, batch) in &claimed {
            if replayer.send(batch, now).await? == Status::WouldOverflow {
                self.overflowed(batch);
                continue;
            }
            units += batch.specs.iter().map(|s| s.amount).sum::<i64>();
        }
        let ids: Vec<uuid::Uuid> = claimed.iter().map(|(id, _)| *id).collect();
        crate::db::outbox::remove(&mut tx, &ids).await?;
        tx.commit().await.map_err(DbError::from)?;
        Ok(units)
    }

    /// A replayed batch Redis refused because a counter would pass `MAX_COUNTER`: counted and
    /// logged (org and units, never the idempotency key), then dropped.
    fn overflowed(&self, batch: &Batch) {
        let units: u64 = batch
            .specs
            .iter()
            .map(|s| s.amount.max(0).unsigned_abs())
            .fold(0, u64::saturating_add);
        self.metrics.replay_overflow.inc_by(units);
        tracing::warn!(
            org = %batch.org,
            units,
            max = MAX_COUNTER,
            "replayed usage refused: a counter would pass the largest counter value; not retried"
        );
    }

    /// Seal pending usage into batches and send them; a batch leaves only when Redis confirmed
    /// it (applied, or already applied by an earlier attempt). Until then its units keep
    /// counting against the local cap.
    async fn replay(
        &self,
        replayer: &impl Replayer,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<i64, ReplayError> {
        let batches = {
            let mut ledger = self.ledger();
            ledger.seal();
            std::mem::take(&mut ledger.batches)
        };
        let mut replayed = 0;
        let mut left = batches.into_iter();
        while let Some(batch) = left.next() {
            let status = match replayer.send(&batch, now).await {
                Ok(status) => status,
                Err(e) => {
                    let mut ledger = self.ledger();
                    ledger.batches.push(batch);
                    ledger.batches.extend(left);
                    return Err(e);
                }
            };
            if status == Status::WouldOverflow {
                // Redis will never take these units: settle the batch instead of retrying it
                // forever, and say so.
                self.overflowed(&batch);
                if !batch.compensation {
                    self.ledger().add_unconfirmed(&batch.specs, -1);
                }
                continue;
            }
            replayed += batch.specs.iter().map(|s| s.amount).sum::<i64>();
            if !batch.compensation {
                self.ledger().add_unconfirmed(&batch.specs, -1);
                // Redis now holds these units too: keep the local view in step with it for a
                // next outage.
                for spec in &batch.specs {
                    if let Some(mut v) = self.known.get_mut(&spec.key) {
                        *v = v.saturating_add(spec.amount).max(0);
                    }
                }
            }
        }
        Ok(replayed)
    }
}

/// The specs of a decision that carry units to count: counters and gauges, not rates (rate state
/// is not replayed) and not zero amounts.
/// The units a decision carries: its largest amount (each unit is in every key it charges).
pub fn max_amount(specs: &[KeySpec]) -> u64 {
    specs
        .iter()
        .map(|s| s.amount.unsigned_abs())
        .max()
        .unwrap_or(0)
}

fn counted_specs(specs: &[KeySpec]) -> Vec<KeySpec> {
    specs
        .iter()
        .filter(|s| s.kind != SpecKind::Rate && s.amount != 0)
        .map(|s| {
            replay_spec(
                s.key.clone(),
                s.kind,
                s.param,
                s.amount,
                s.limit,
                s.notify.clone(),
            )
        })
        .collect()
}
