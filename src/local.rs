//! Deciding while Redis is unreachable, and giving Redis back every unit admitted meanwhile.
//!
//! A Redis call that fails or is slower than `[redis] timeout` trips this replica into degraded
//! mode. Until a background probe reaches Redis again, decisions skip Redis entirely (so no
//! request waits for a timeout) and are made here, per `[redis] on_error`:
//! - `local`: counters and gauges are checked against what this replica last saw in Redis plus
//!   what it admitted since, with at most `local_share` of what was left of each limit; rates use
//!   `governor` with `local_share` of each rate.
//! - `open`: everything is admitted and counted.
//! - `closed`: decisions answer 503 (this module only tracks the degraded state).
//!
//! Everything admitted is kept as pending increments per Redis key and replayed when Redis is
//! back, one batch per org with an idempotency key of its own, so a replay whose reply was lost
//! is not counted twice. Bounds, documented in the README: each replica only knows the values it
//! last saw; idempotency keys of usage reports cannot be checked during the outage; rate state is
//! not replayed.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;

use crate::config::OnRedisError;
use crate::domain::decision::{Limit, LimitReply, Target};
use crate::domain::org::OrgId;
use crate::metrics::Metrics;
use crate::store::{KeySpec, Mode, Reply, SpecKind, Status, Store};

/// How often a degraded replica probes Redis and retries its replay.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Bound on remembered counter values; past it the memory starts over.
const MAX_KNOWN: usize = 500_000;

/// Usage admitted while degraded, per Redis key.
#[derive(Debug, Clone)]
struct Pending {
    kind: SpecKind,
    param: i64,
    amount: i64,
}

/// A batch being replayed; kept with its id until Redis confirms it.
struct Batch {
    org: OrgId,
    id: String,
    specs: Vec<KeySpec>,
}

type RateKey = (String, Duration);

pub struct LocalMode {
    on_error: OnRedisError,
    share: f64,
    degraded: AtomicBool,
    /// Last value seen in Redis for each limited counter and gauge.
    known: DashMap<String, i64>,
    pending: Mutex<HashMap<OrgId, HashMap<String, Pending>>>,
    unconfirmed: Mutex<Vec<Batch>>,
    rates: Mutex<HashMap<RateKey, Arc<DefaultKeyedRateLimiter<OrgId>>>>,
    metrics: Arc<Metrics>,
}

/// The outcome of a local decision, shaped like the store's.
pub struct LocalReply {
    pub status: Status,
    pub limits: Vec<LimitReply>,
}

impl LocalMode {
    pub fn new(on_error: OnRedisError, share: f64, metrics: Arc<Metrics>) -> Self {
        Self {
            on_error,
            share,
            degraded: AtomicBool::new(false),
            known: DashMap::new(),
            pending: Mutex::new(HashMap::new()),
            unconfirmed: Mutex::new(Vec::new()),
            rates: Mutex::new(HashMap::new()),
            metrics,
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

    /// Redis just failed a call.
    pub fn trip(&self) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.degraded.set(1);
            tracing::warn!(mode = ?self.on_error, "Redis unreachable: degraded mode");
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
                (r.value + limit.amount).max(0)
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
    pub fn decide(
        &self,
        org: &OrgId,
        limits: &[Limit<'_>],
        specs: &[KeySpec],
        mode: Mode,
    ) -> LocalReply {
        let enforce = self.on_error == OnRedisError::Local
            && matches!(mode, Mode::Check | Mode::DryRun | Mode::Shadow);
        let mut pending = match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let org_pending = pending.entry(org.clone()).or_default();
        let mut replies = Vec::with_capacity(limits.len());
        let mut denied = false;
        for (limit, spec) in limits.iter().zip(specs) {
            let mut reply = LimitReply::default();
            if limit.is_rate() {
                replies.push(reply);
                continue;
            }
            let known = self.known.get(&spec.key).map_or(0, |v| *v);
            let admitted = org_pending.get(&spec.key).map_or(0, |p| p.amount);
            reply.value = (known + admitted).max(0);
            if enforce
                && limit.blocks()
                && limit.amount > 0
                && let Some(max) = limit.limit
            {
                let left = (max as i64 - known).max(0) as f64;
                let cap = known + (left * self.share).floor() as i64;
                if reply.value + limit.amount > cap {
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
        for (limit, spec) in limits.iter().zip(specs) {
            if limit.is_rate() {
                continue;
            }
            let entry = org_pending.entry(spec.key.clone()).or_insert(Pending {
                kind: spec.kind,
                param: spec.param,
                amount: 0,
            });
            entry.amount = entry.amount.saturating_add(limit.amount);
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

    /// Units admitted locally and not yet confirmed by Redis.
    pub fn pending_units(&self) -> i64 {
        let pending: i64 = self
            .pending
            .lock()
            .map(|p| p.values().flat_map(|m| m.values()).map(|e| e.amount).sum())
            .unwrap_or(0);
        let unconfirmed: i64 = self
            .unconfirmed
            .lock()
            .map(|b| b.iter().flat_map(|b| &b.specs).map(|s| s.amount).sum())
            .unwrap_or(0);
        pending + unconfirmed
    }

    /// Probe Redis while degraded and replay pending usage; returns when `stop` fires.
    pub async fn recover(self: Arc<Self>, state: crate::api::SharedState, stop: CancellationToken) {
        let store = state.quota.store().clone();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // Shutting down: hand Redis what this replica admitted, if it can.
                    if self.pending_units() != 0 || self.has_batches() {
                        match self.replay(&state, &store, state.quota.now()).await {
                            Ok(n) => tracing::info!(units = n, "replayed admitted usage before exiting"),
                            Err(e) => tracing::error!(error = %e, units = self.pending_units(), "usage admitted while Redis was unreachable could not be replayed before exiting"),
                        }
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
            let has_work = self.pending_units() != 0 || self.has_batches();
            if !self.is_degraded() && !has_work {
                continue;
            }
            if store.ping().await.is_err() {
                continue;
            }
            match self.replay(&state, &store, state.quota.now()).await {
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
            if self.is_degraded() && self.pending_units() == 0 && !self.has_batches() {
                self.degraded.store(false, Ordering::Release);
                self.metrics.degraded.set(0);
                tracing::info!("Redis reachable again: degraded mode over");
            }
        }
    }

    fn has_batches(&self) -> bool {
        self.unconfirmed
            .lock()
            .map(|b| !b.is_empty())
            .unwrap_or(false)
    }

    /// Move pending usage into batches and send them; a batch leaves only when Redis confirmed
    /// it (applied, or already applied by an earlier attempt).
    async fn replay(
        &self,
        state: &crate::api::SharedState,
        store: &Store,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<i64, crate::quota::QuotaError> {
        let drained: HashMap<OrgId, HashMap<String, Pending>> = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => HashMap::new(),
        };
        if let Ok(mut batches) = self.unconfirmed.lock() {
            for (org, entries) in drained {
                let specs: Vec<KeySpec> = entries
                    .into_iter()
                    .filter(|(_, p)| p.amount != 0)
                    .map(|(key, p)| KeySpec {
                        key,
                        kind: p.kind,
                        amount: p.amount,
                        limit: 0,
                        block: false,
                        param: p.param,
                    })
                    .collect();
                if !specs.is_empty() {
                    batches.push(Batch {
                        org,
                        id: format!("replay:{}", uuid::Uuid::new_v4()),
                        specs,
                    });
                }
            }
        }
        let mut replayed = 0;
        loop {
            let batch = match self.unconfirmed.lock() {
                Ok(mut b) => b.pop(),
                Err(_) => None,
            };
            let Some(batch) = batch else { break };
            let mut result = store.replay(&batch.org, &batch.specs, &batch.id, now).await;
            if matches!(result, Ok(Status::NeedsRestore)) {
                // Redis lost the org's counters meanwhile: restore them first, then add ours.
                let catalog = state.quota.catalog();
                if let Err(e) = state.quota.restore_org(&catalog, &batch.org, now).await {
                    if let Ok(mut b) = self.unconfirmed.lock() {
                        b.push(batch);
                    }
                    return Err(e);
                }
                result = store.replay(&batch.org, &batch.specs, &batch.id, now).await;
            }
            match result {
                Ok(Status::NeedsRestore) => {
                    if let Ok(mut b) = self.unconfirmed.lock() {
                        b.push(batch);
                    }
                    return Err(crate::store::StoreError::Protocol(
                        "restore marker missing during replay".into(),
                    )
                    .into());
                }
                Ok(_) => {
                    replayed += batch.specs.iter().map(|s| s.amount).sum::<i64>();
                    // Redis now holds these units too: keep the local view in step with it
                    // for a next outage.
                    for spec in &batch.specs {
                        if let Some(mut v) = self.known.get_mut(&spec.key) {
                            *v = (*v + spec.amount).max(0);
                        }
                    }
                }
                Err(e) => {
                    if let Ok(mut b) = self.unconfirmed.lock() {
                        b.push(batch);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(replayed)
    }
}
