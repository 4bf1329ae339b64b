//! The quota use cases shared by `/v1/*`, the proxy and recovery: resolve an org's plan, build the
//! limits a set of charges touches, run them through the store in one round trip, and evaluate.
//!
//! This is the only place that combines the catalog, the org directory, the store and the clock;
//! HTTP concerns stay in `api/`, `proxy/` and `http/`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::clock::Clock;
use crate::db::DbError;
use crate::db::orgs::OrgRecord;
use crate::directory::{Change, OrgDirectory};
use crate::domain::decision::Mode;
use crate::domain::decision::{
    Charge, CreditState, Evaluation, LimitReply, LimitState, Outcome, Target, add_headroom_charges,
    evaluate, limits_at, limits_for, mark_headroom, merge_charges,
};
use crate::domain::level::{Levels, Scope};
use crate::domain::org::OrgId;
use crate::domain::plan::{Catalog, Enforcement, Plan};
use crate::lease::{LeaseSettings, Leases, Taken};
use crate::local::{DoubtedDecision, LocalMode, ReplayError, Replayer};
use crate::metrics::Metrics;
use crate::slots::{Slot, Slots};
use crate::store::{
    Batch, CreditReply, KeySpec, LeaseCall, Reply, SlotCall, Status, Store, StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What became of one usage report of a batch (`record_many`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Counted,
    /// Its idempotency key was seen before: not counted again.
    Duplicate,
    /// It would have taken a counter past `MAX_COUNTER`: not counted.
    Overflow,
    /// Keyed, and accepted while Redis could not be asked (unreachable, or its answer in
    /// doubt): it is counted once, when its replay reaches Redis, unless its key was already
    /// counted there. Whether it is a duplicate is not known yet.
    Deferred,
}

/// A local or stored status, with "would overflow" turned into the store's typed error, as
/// `Store::run` does for Redis's answer.
fn refuse_overflow(status: Status) -> Result<Status, QuotaError> {
    if status == Status::WouldOverflow {
        return Err(StoreError::CounterOverflow.into());
    }
    Ok(status)
}

/// What `run_limits` found: the call's status, one reply per limit, what it did with each
/// counter metric's credits, and the concurrency slot's reply when it carried one.
type Limits = (
    Status,
    Vec<LimitReply>,
    Vec<CreditReply>,
    Option<LimitReply>,
);

/// A decision with the plan it was made against.
pub struct Decision<'c> {
    pub plan: &'c Plan,
    pub eval: Evaluation<'c>,
    /// The idempotency key was seen before; nothing was applied.
    pub duplicate: bool,
    /// Shadow enforcement applied: a denial in `eval` was counted, not enforced.
    pub shadow: bool,
    /// The concurrency slot this decision took (`decide_in_flight` only): held until dropped.
    pub slot: Option<Slot>,
}

pub struct QuotaService {
    catalog: ArcSwap<Catalog>,
    directory: Arc<OrgDirectory>,
    store: Store,
    clock: Arc<dyn Clock>,
    idempotency_ttl: Duration,
    shadow_everything: bool,
    local: Arc<LocalMode>,
    /// `None` unless `[leases] enabled`.
    leases: Option<Arc<Leases>>,
    /// Plans' concurrency limits; `None`: not enforced (see `with_slots`).
    slots: Option<Arc<Slots>>,
    metrics: Arc<Metrics>,
}

impl QuotaService {
    /// `local` says how decisions behave while Redis is unreachable (see `local`).
    pub fn new(
        catalog: Catalog,
        directory: Arc<OrgDirectory>,
        store: Store,
        clock: Arc<dyn Clock>,
        idempotency_ttl: Duration,
        local: Arc<LocalMode>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            catalog: ArcSwap::from_pointee(catalog),
            directory,
            store,
            clock,
            idempotency_ttl,
            shadow_everything: false,
            local,
            leases: None,
            slots: None,
            metrics,
        }
    }

    /// Enforce plans' concurrency limits on `decide_in_flight` with these slots.
    pub fn with_slots(mut self, slots: Arc<Slots>) -> Self {
        self.slots = Some(slots);
        self
    }

    /// Admit from leased blocks (`[leases]`); off unless `settings.enabled`.
    pub fn with_leases(mut self, settings: &LeaseSettings) -> Self {
        self.leases = settings
            .enabled
            .then(|| Arc::new(Leases::new(settings.clone())));
        self
    }

    pub fn local(&self) -> &Arc<LocalMode> {
        &self.local
    }

    /// Put the org's durable counters of the current month back from Postgres, once, whichever
    /// replica gets there first (see `store/restore.lua`).
    pub async fn restore_org(
        &self,
        catalog: &Catalog,
        org: &OrgId,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, QuotaError> {
        let month = crate::domain::period::calendar_month(now);
        let rows =
            crate::db::usage::durable_state(self.directory.pool(), org.as_str(), month.start)
                .await?;
        let expiry = (month.end + chrono::Duration::days(7)).timestamp_millis();
        let mut entries = Vec::with_capacity(rows.len());
        for crate::db::usage::DurableRow {
            metric: metric_id,
            quantity,
            version,
            gauge,
        } in rows
        {
            let Some(metric) = catalog.metric(&metric_id) else {
                continue;
            };
            let target = if gauge {
                Target::Gauge
            } else {
                Target::Counter {
                    period: crate::domain::period::Period::Month,
                    window: month,
                }
            };
            let limit = crate::domain::decision::Limit {
                metric,
                target,
                amount: 0,
                limit: None,
                overage: crate::domain::plan::Overage::Allow,
                notify_at: &[],
                headroom: false,
                scope: Default::default(),
            };
            let key = self.store.keys().limit(org, &limit);
            entries.push((key, quantity, version, if gauge { 0 } else { expiry }));
        }
        // The org's billing months are durable too: the one in progress comes back with the
        // calendar month's counters, under the same marker.
        let record = self.directory.get(org).await?;
        let billing = record.billing_cycle().window(now);
        let billing_expiry = (billing.end + chrono::Duration::days(40)).timestamp_millis();
        for (metric_id, quantity, version) in
            crate::db::usage::billing_state(self.directory.pool(), org.as_str(), billing.start)
                .await?
        {
            let Some(metric) = catalog.metric(&metric_id) else {
                continue;
            };
            let limit = crate::domain::decision::Limit {
                metric,
                target: Target::Counter {
                    period: crate::domain::period::Period::BillingMonth,
                    window: billing,
                },
                amount: 0,
                limit: None,
                overage: crate::domain::plan::Overage::Allow,
                notify_at: &[],
                headroom: false,
                scope: Default::default(),
            };
            let key = self.store.keys().limit(org, &limit);
            entries.push((key, quantity, version, billing_expiry));
        }
        let credits = self.credit_hashes(org, now).await?;
        let restored = self.store.restore(org, now, &entries, &credits).await?;
        if restored && !(entries.is_empty() && credits.is_empty()) {
            tracing::warn!(org = %org, counters = entries.len(), credit_metrics = credits.len(), "restored usage and credits from Postgres into Redis");
        }
        Ok(restored)
    }

    /// The org's live grants as Postgres holds them, one credit hash per metric, to restore.
    async fn credit_hashes(
        &self,
        org: &OrgId,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<crate::store::CreditHash>, QuotaError> {
        use crate::domain::credit;
        let rows = crate::db::credits::live(self.directory.pool(), org.as_str(), now).await?;
        let mut hashes: Vec<crate::store::CreditHash> = Vec::new();
        for row in rows {
            let key = self.store.keys().credits(org, &row.metric);
            let field = credit::field(row.priority.max(0) as u32, row.expires_at, &row.id);
            let value = credit::value(row.remaining, row.amount);
            match hashes.last_mut().filter(|h| h.key == key) {
                Some(h) => {
                    h.fields.push((field, value));
                    h.version = h.version.max(row.version);
                }
                None => hashes.push(crate::store::CreditHash {
                    key,
                    fields: vec![(field, value)],
                    version: row.version,
                }),
            }
        }
        Ok(hashes)
    }

    /// Ask Redis; when it answers that the org's counters are missing (Redis lost them, or a new
    /// month began without the org's resident key), restore them from Postgres once and ask
    /// again, handing `ask` what the first answer was. Decisions, adjustments, the usage view
    /// and replays go through here; a batch of reports (`record_many`) asks again for the items
    /// that asked only.
    async fn restoring<T, F>(
        &self,
        catalog: &Catalog,
        org: &OrgId,
        now: chrono::DateTime<chrono::Utc>,
        mut ask: impl FnMut(Option<T>) -> F,
        needs_restore: impl Fn(&T) -> bool,
    ) -> Result<Result<T, StoreError>, QuotaError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        match ask(None).await {
            Ok(first) if needs_restore(&first) => {
                self.restore_org(catalog, org, now).await?;
                match ask(Some(first)).await {
                    Ok(again) if needs_restore(&again) => Err(QuotaError::Store(
                        StoreError::Protocol("restore marker missing right after a restore".into()),
                    )),
                    again => Ok(again),
                }
            }
            other => Ok(other),
        }
    }

    /// Run `limits` through Redis, or locally while Redis is unreachable (per `on_error`). With
    /// leases, a check is admitted from this replica's blocks when it can be, and every check or
    /// dry run that reaches Redis sees the blocks all replicas hold (see `lease`).
    ///
    /// `slot`: take a concurrency slot in the same call. Only Redis takes one: a decision made on
    /// this replica alone (from a lease block, or while Redis is unreachable) takes none, and the
    /// slot's answer is then `None`.
    ///
    /// `leasing: false` (a plan or metric with `leases = false`): no block is taken or admitted
    /// from; the call still counts the blocks other decisions hold.
    #[allow(clippy::too_many_arguments)]
    async fn run_limits(
        &self,
        catalog: &Catalog,
        org: &OrgId,
        limits: &[crate::domain::decision::Limit<'_>],
        mode: Mode,
        now: chrono::DateTime<chrono::Utc>,
        idem: Option<(&str, Duration)>,
        slot: Option<&SlotCall>,
        leasing: bool,
    ) -> Result<Limits, QuotaError> {
        let leases = self
            .leases
            .as_ref()
            .filter(|_| matches!(mode, Mode::Check | Mode::DryRun));
        // With leases: the limits' script arguments, and the lease part of the Redis call.
        let mut lease: Option<(Vec<KeySpec>, LeaseCall, Taken)> = None;
        if let Some(leases) = leases {
            let specs: Vec<KeySpec> = limits.iter().map(|l| self.store.spec(org, l)).collect();
            let refill = mode == Mode::Check && idem.is_none() && leasing;
            // A slot is counted in Redis only: a decision that takes one goes there.
            if refill
                && slot.is_none()
                && let Some(replies) = leases.admit(org, &specs)
            {
                self.metrics
                    .lease_decisions
                    .with_label_values(&["local"])
                    .inc();
                return Ok((Status::Applied, replies, Vec::new(), None));
            }
            if !self.local.serves_locally() {
                let (call, taken) = leases.call(org, &specs, refill, now);
                lease = Some((specs, call, taken));
            }
        }
        let taken = lease.as_ref().map(|(_, _, t)| t);
        let mut in_doubt = None;
        // Until the call is answered, dropping this request (its client went away) must not
        // strand the blocks it took out: see `Unanswered`.
        let mut unanswered = Unanswered {
            quota: self,
            taken,
            slot: None,
        };
        if !self.local.serves_locally() {
            unanswered.slot = slot;
            let asked = self
                .restoring(
                    catalog,
                    org,
                    now,
                    |_| match &lease {
                        Some((specs, call, _)) => self.store.run_specs(
                            org,
                            specs.clone(),
                            mode,
                            now,
                            idem,
                            Some(call),
                            slot,
                        ),
                        None => self.store.run_specs(
                            org,
                            limits.iter().map(|l| self.store.spec(org, l)).collect(),
                            mode,
                            now,
                            idem,
                            None,
                            slot,
                        ),
                    },
                    |r| r.status == Status::NeedsRestore,
                )
                .await;
            unanswered.taken = None;
            unanswered.slot = None;
            let result = match asked {
                Ok(result) => result,
                Err(e) => {
                    // Postgres failed the restore: nothing of the call was applied.
                    self.lease_failed(taken, None);
                    return Err(e);
                }
            };
            match result {
                Ok(reply) => {
                    if let (Some(leases), Some((specs, _, taken))) = (leases, &lease) {
                        self.lease_answered(leases, taken, specs, &reply);
                    }
                    self.local.remember(limits, &reply);
                    return Ok((reply.status, reply.limits, reply.credits, reply.slot));
                }
                Err(StoreError::InDoubt(after, call)) => {
                    self.local.trip();
                    // The call may yet take the slot: give it back after it.
                    self.forget_slot(slot);
                    in_doubt = Some((after, call));
                }
                Err(e) if e.is_unavailable() => {
                    self.local.trip();
                    self.forget_slot(slot);
                    if e.lost_with_connection() {
                        self.lease_unknown(taken);
                    }
                    self.lease_failed(taken, None);
                    if e.lost_with_connection() && mode != Mode::DryRun {
                        self.local.lost_with_connection(1);
                    }
                    if self.local.on_error() == crate::domain::decision::OnRedisError::Closed {
                        return Err(e.into());
                    }
                }
                Err(StoreError::CounterOverflow) => {
                    // The script settled before it refused: only the refill slot is freed.
                    if let (Some(leases), Some(taken)) = (leases, taken) {
                        leases.abandon(taken);
                    }
                    return Err(StoreError::CounterOverflow.into());
                }
                Err(e) => {
                    self.lease_failed(taken, None);
                    return Err(e.into());
                }
            }
        }
        let key = idem.map(|(k, _)| k);
        let specs: Vec<KeySpec> = match &lease {
            Some((specs, _, _)) => specs.clone(),
            None => limits.iter().map(|l| self.store.spec(org, l)).collect(),
        };
        let Some((after, call)) = in_doubt else {
            let reply = self.local.decide(org, limits, &specs, mode, key, false);
            return Ok((
                refuse_overflow(reply.status)?,
                reply.limits,
                Vec::new(),
                None,
            ));
        };
        // Redis may have applied this call: decide here (or refuse, in `closed` mode) without
        // queueing the units, and let the call's own answer say whether they must be replayed.
        let closed = self.local.on_error() == crate::domain::decision::OnRedisError::Closed;
        let reply = (!closed && mode != Mode::DryRun)
            .then(|| self.local.decide(org, limits, &specs, mode, key, true));
        let admitted = reply
            .as_ref()
            .is_some_and(|r| matches!(r.status, Status::Applied | Status::AppliedOverLimit));
        let mut decisions = Vec::with_capacity(2);
        if mode != Mode::DryRun {
            decisions.push((org.clone(), specs, key.map(str::to_owned), admitted, false));
        }
        // Units a lease settled in the same call share its fate.
        self.lease_failed(taken, Some(&mut decisions));
        if !decisions.is_empty() {
            self.local.settle(&self.store, call, decisions);
        }
        match reply {
            Some(reply) => Ok((
                refuse_overflow(reply.status)?,
                reply.limits,
                Vec::new(),
                None,
            )),
            None => Err(StoreError::Timeout(after).into()),
        }
    }

    /// A slot call whose answer will not be used (lost, in doubt, or its request dropped): give
    /// the slot back in case Redis took it. The release goes out on the same connection after
    /// the call, so it cannot overtake it.
    fn forget_slot(&self, slot: Option<&SlotCall>) {
        if let (Some(slots), Some(call)) = (&self.slots, slot) {
            slots.forget(call);
        }
    }

    /// Redis answered a lease call: keep the blocks it granted, and count what it says.
    fn lease_answered(&self, leases: &Leases, taken: &Taken, specs: &[KeySpec], reply: &Reply) {
        leases.install(taken, specs, reply);
        self.metrics
            .lease_decisions
            .with_label_values(&["redis"])
            .inc();
        let mut swept = 0;
        let mut held_back = false;
        for ((spec, limit), lease) in specs.iter().zip(&reply.limits).zip(&reply.leases) {
            swept += lease.swept;
            // Denied by a counter that only others' blocks filled: the price of leases.
            held_back |= limit.denied
                && spec.kind != crate::store::SpecKind::Rate
                && lease.reserved > 0
                && (limit.value - lease.reserved as i64).saturating_add(spec.amount)
                    <= spec.limit as i64;
        }
        self.metrics.lease_swept_units.inc_by(swept);
        if held_back && reply.status == Status::Denied {
            self.metrics.lease_underadmissions.inc();
        }
    }

    /// A lease call failed, so the units it was to settle are not in Redis (or, with
    /// `in_doubt`, may not be): hand them to local mode's replay, which counts them exactly
    /// once, as it does units admitted while degraded.
    fn lease_failed(&self, taken: Option<&Taken>, in_doubt: Option<&mut Vec<DoubtedDecision>>) {
        let Some(taken) = taken else {
            return;
        };
        if let Some(leases) = &self.leases {
            leases.abandon(taken);
        }
        if taken.consumed.is_empty() {
            return;
        }
        match in_doubt {
            Some(decisions) => {
                self.local.hold(&taken.consumed);
                decisions.push((taken.org.clone(), taken.consumed.clone(), None, true, true));
            }
            None => self.local.adopt(&taken.org, &taken.consumed),
        }
    }

    /// A lease call broke with its connection: Redis may have settled its units, and they are
    /// replayed anyway; each may be counted twice (`lease_unknown_units_total`).
    fn lease_unknown(&self, taken: Option<&Taken>) {
        if let Some(t) = taken {
            self.metrics
                .lease_unknown_units
                .inc_by(crate::local::max_amount(&t.consumed));
        }
    }

    /// Settle the blocks that expired here (all of them when `all`): what they consumed goes to
    /// the counters, what they did not returns to the limits. A call that fails hands its units
    /// to local mode's replay. Returns the number of orgs settled.
    pub async fn settle_leases(&self, all: bool) -> usize {
        let Some(leases) = &self.leases else {
            return 0;
        };
        if self.local.is_degraded() && !all {
            // Redis is unreachable: settle when it is back (the recovery task probes it).
            return 0;
        }
        let now = self.clock.now();
        let catalog = self.catalog();
        let due = leases.expired(all, now);
        let n = due.len();
        if self.local.is_degraded() {
            // Shutting down without Redis: straight to local mode's replay (and its outbox).
            for (_, _, taken) in &due {
                self.lease_failed(Some(taken), None);
            }
            return n;
        }
        for (specs, call, taken) in due {
            let asked = self
                .restoring(
                    &catalog,
                    &taken.org,
                    now,
                    |_| {
                        self.store.run_specs(
                            &taken.org,
                            specs.clone(),
                            Mode::Record,
                            now,
                            None,
                            Some(&call),
                            None,
                        )
                    },
                    |r| r.status == Status::NeedsRestore,
                )
                .await;
            match asked {
                Ok(Ok(reply)) => {
                    leases.abandon(&taken);
                    self.metrics.lease_settlements.inc();
                    let swept: u64 = reply.leases.iter().map(|l| l.swept).sum();
                    self.metrics.lease_swept_units.inc_by(swept);
                }
                Ok(Err(StoreError::CounterOverflow)) => leases.abandon(&taken),
                Ok(Err(StoreError::InDoubt(_, doubt))) => {
                    self.local.trip();
                    let mut decisions = Vec::new();
                    self.lease_failed(Some(&taken), Some(&mut decisions));
                    if !decisions.is_empty() {
                        self.local.settle(&self.store, doubt, decisions);
                    }
                }
                Ok(Err(e)) => {
                    if e.is_unavailable() {
                        self.local.trip();
                    }
                    if e.lost_with_connection() {
                        self.lease_unknown(Some(&taken));
                    }
                    tracing::warn!(org = %taken.org, error = %e, "cannot settle leases; replaying their usage");
                    self.lease_failed(Some(&taken), None);
                }
                Err(e) => {
                    tracing::warn!(org = %taken.org, error = %e, "cannot settle leases; replaying their usage");
                    self.lease_failed(Some(&taken), None);
                }
            }
        }
        n
    }

    /// Settle expired blocks until `stop`, then every block (graceful shutdown).
    pub async fn run_lease_settler(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(every) = self
            .leases
            .as_ref()
            .map(|l| crate::lease::settle_every(l.settings()))
        else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    self.settle_leases(false).await;
                }
            }
        }
        self.settle_leases(true).await;
    }

    /// Record a batch of usage reports of one org in one round trip (a pipeline): each item is
    /// its charge and idempotency key. Returns, per item, what became of it.
    pub async fn record_many<'i>(
        &self,
        catalog: &Catalog,
        org: &OrgId,
        items: &[(Charge<'_>, Option<&str>, Levels<'i>)],
    ) -> Result<Vec<Recorded>, QuotaError> {
        let (plan, record) = self.org(catalog, org).await?;
        let now = self.clock.now();
        let ttl = self.idempotency_ttl;
        let limits: Vec<Vec<crate::domain::decision::Limit<'_>>> = items
            .iter()
            .map(|(charge, _, levels)| {
                limits_at(
                    plan,
                    std::slice::from_ref(charge),
                    now,
                    &record.billing_cycle(),
                    levels,
                    levels.key.and_then(|k| record.key_limits.get(k)),
                )
            })
            .collect();
        let specs: Vec<(Vec<crate::store::KeySpec>, Option<&str>)> = limits
            .iter()
            .zip(items)
            .map(|(ls, (_, key, _))| (ls.iter().map(|l| self.store.spec(org, l)).collect(), *key))
            .collect();
        let closed = self.local.on_error() == crate::domain::decision::OnRedisError::Closed;
        // Items (indices into `items`) decided here, while Redis is unreachable or in doubt.
        let decide_locally = |idx: &[usize], hold: bool| -> Vec<Recorded> {
            idx.iter()
                .map(|&i| {
                    let (s, key) = &specs[i];
                    let status = self
                        .local
                        .decide(org, &limits[i], s, Mode::Record, *key, hold)
                        .status;
                    match recorded(status) {
                        Recorded::Counted if key.is_some() => Recorded::Deferred,
                        other => other,
                    }
                })
                .collect()
        };
        // What becomes of the items `idx` when the Redis call that carried them (in that
        // order) failed with `e`.
        let fall_back = |idx: &[usize], e: StoreError| -> Result<Vec<Recorded>, QuotaError> {
            match e {
                StoreError::InDoubt(after, call) => {
                    self.local.trip();
                    let outcomes = (!closed).then(|| decide_locally(idx, true));
                    let decisions = idx
                        .iter()
                        .enumerate()
                        .map(|(j, &i)| {
                            let (s, key) = &specs[i];
                            let counted = outcomes.as_ref().is_some_and(|o| {
                                matches!(o[j], Recorded::Counted | Recorded::Deferred)
                            });
                            (
                                org.clone(),
                                s.clone(),
                                key.map(str::to_owned),
                                counted,
                                false,
                            )
                        })
                        .collect();
                    self.local.settle(&self.store, call, decisions);
                    outcomes.ok_or_else(|| StoreError::Timeout(after).into())
                }
                e if e.is_unavailable() => {
                    self.local.trip();
                    if e.lost_with_connection() {
                        self.local.lost_with_connection(idx.len());
                    }
                    if closed {
                        return Err(e.into());
                    }
                    Ok(decide_locally(idx, false))
                }
                e => Err(e.into()),
            }
        };
        let all: Vec<usize> = (0..items.len()).collect();
        if self.local.serves_locally() {
            return Ok(decide_locally(&all, false));
        }
        let needs = |r: &Reply| r.status == Status::NeedsRestore;
        let first = match self
            .store
            .run_many(org, &specs, Mode::Record, now, ttl)
            .await
        {
            Ok(replies) => replies,
            Err(e) => return fall_back(&all, e),
        };
        let mut outcomes: Vec<Recorded> = first.iter().map(|r| recorded(r.status)).collect();
        if !first.iter().any(needs) {
            return Ok(outcomes);
        }
        // Nothing of this org was applied without its marker, but another replica may have
        // restored meanwhile, so some items may be in: only the items that asked are sent
        // again, and a failure of that second call concerns them alone (unlike `restoring`,
        // which asks again for the whole call).
        self.restore_org(catalog, org, now).await?;
        let again: Vec<usize> = (0..first.len()).filter(|&i| needs(&first[i])).collect();
        let retry: Vec<_> = again.iter().map(|&i| specs[i].clone()).collect();
        let second = match self
            .store
            .run_many(org, &retry, Mode::Record, now, ttl)
            .await
        {
            Ok(second) if second.iter().any(needs) => {
                return Err(QuotaError::Store(StoreError::Protocol(
                    "restore marker missing right after a restore".into(),
                )));
            }
            Ok(second) => second.iter().map(|r| recorded(r.status)).collect(),
            Err(e) => fall_back(&again, e)?,
        };
        for (i, o) in again.into_iter().zip(second) {
            outcomes[i] = o;
        }
        Ok(outcomes)
    }

    /// Put every plan in shadow mode (`[enforcement] mode = "shadow"`).
    pub fn with_enforcement(mut self, enforcement: Enforcement) -> Self {
        self.shadow_everything = enforcement == Enforcement::Shadow;
        self
    }

    /// The current catalog. Callers hold the `Arc` for the whole request, so a reload never
    /// changes the plan under a decision in flight.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    pub fn replace_catalog(&self, catalog: Catalog) {
        self.catalog.store(Arc::new(catalog));
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn directory(&self) -> &Arc<OrgDirectory> {
        &self.directory
    }

    /// Announce that an org's plan or keys changed, after the change is in Postgres. This
    /// replica forgets its cached entry at once; the others hear it through Redis pub/sub,
    /// published in the background: the change is committed, so the caller answers success
    /// whether or not Redis is slow to take the announcement. A failed publish is logged, not
    /// returned: Postgres already holds the truth, and a replica whose subscription is down
    /// trusts its cache for at most a second (see `directory`).
    pub fn announce(&self, change: Change<'_>) {
        match &change {
            Change::Org(org) => self.directory.invalidate(org.as_str()),
            Change::Everything => self.directory.invalidate_all(),
        }
        let store = self.store.clone();
        let payload = change.payload();
        tokio::spawn(async move {
            if let Err(e) = store.publish_org_change(&payload).await {
                tracing::error!(error = %e, "cannot announce an org change to other replicas");
            }
        });
    }

    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    pub async fn org<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
    ) -> Result<(&'c Plan, Arc<OrgRecord>), QuotaError> {
        let record = self.directory.get(org).await?;
        Ok((catalog.plan_or_default(record.plan_id.as_deref()), record))
    }

    /// Check (and in `Check`/`Record` modes apply) `charges` for `org`.
    /// `levels`: the API key and end user the charges are also counted for (`Levels::ORG`: the
    /// org alone); their limits are checked and charged in the same round trip.
    pub async fn decide<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        levels: &Levels<'c>,
        charges: &[Charge<'c>],
        mode: Mode,
        idempotency_key: Option<&str>,
    ) -> Result<Decision<'c>, QuotaError> {
        self.decide_with(
            catalog,
            org,
            levels,
            charges,
            &[],
            mode,
            idempotency_key,
            false,
        )
        .await
    }

    /// `decide` in `Check` mode for a request that stays in flight (the proxy): when the org's
    /// plan has a concurrency limit, a slot is taken in the same Redis call, held by the
    /// decision's `slot` until dropped. While Redis is unreachable no slot is taken (the limit
    /// is not enforced then; see README). The hard quotas of the metrics in `needs` must also have
    /// room left even if `charges` charge them nothing (their cost is recorded after the
    /// response): checked in the same round trip (`Limit::headroom`).
    pub async fn decide_in_flight<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        levels: &Levels<'c>,
        charges: &[Charge<'c>],
        needs: &[&'c crate::domain::plan::Metric],
    ) -> Result<Decision<'c>, QuotaError> {
        let wait = self
            .slots
            .as_ref()
            .map_or(Duration::ZERO, |s| s.settings().queue_timeout);
        let deadline = std::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        let mut queued = false;
        loop {
            let decision = self
                .decide_with(
                    catalog,
                    org,
                    levels,
                    charges,
                    needs,
                    Mode::Check,
                    None,
                    true,
                )
                .await?;
            // Only a concurrency refusal waits: it charged nothing and took no slot, so asking
            // again is safe, and a slot frees whenever some response of the org ends. Quota and
            // rate denials answer at once (a rate's wait is the client's, via Retry-After).
            let refused = decision.eval.outcome == Outcome::TooManyInFlight && !decision.shadow;
            let now = std::time::Instant::now();
            if !refused || now >= deadline {
                let outcome = match (refused, queued) {
                    (true, _) if !wait.is_zero() => Some("timed_out"),
                    (false, true) => Some("admitted"),
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    self.metrics
                        .concurrency_queued
                        .with_label_values(&[outcome])
                        .inc();
                }
                return Ok(decision);
            }
            queued = true;
            // Polling, backing off to 50 ms with jitter so that waiters of one org do not ask
            // in lockstep; each poll is one decision (one EVALSHA).
            let jitter = Duration::from_micros(rand::random::<u64>() % 5_000);
            tokio::time::sleep((pause + jitter).min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn decide_with<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        levels: &Levels<'c>,
        charges: &[Charge<'c>],
        needs: &[&'c crate::domain::plan::Metric],
        mode: Mode,
        idempotency_key: Option<&str>,
        in_flight: bool,
    ) -> Result<Decision<'c>, QuotaError> {
        let (plan, record) = self.org(catalog, org).await?;
        let mut merged = merge_charges(charges);
        add_headroom_charges(&mut merged, needs);
        let now = self.clock.now();
        let own = levels.key.and_then(|k| record.key_limits.get(k));
        let mut limits = limits_at(plan, &merged, now, &record.billing_cycle(), levels, own);
        mark_headroom(&mut limits, needs);
        let idem = idempotency_key.map(|k| (k, self.idempotency_ttl));
        let shadow = matches!(mode, Mode::Check | Mode::DryRun)
            && (self.shadow_everything || plan.enforcement == Enforcement::Shadow);
        let mode = if shadow && mode == Mode::Check {
            Mode::Shadow
        } else {
            mode
        };
        let slot = match (&self.slots, plan.concurrency) {
            (Some(slots), Some(c)) if in_flight => Some((slots, slots.call(org, c.requests))),
            _ => None,
        };
        // A plan or metric with `leases = false` takes no blocks (its decisions still see the
        // blocks other decisions hold, so the switch is exact at any moment).
        let leasing = plan.leases_for(merged.iter().map(|c| c.metric));
        let (status, replies, credits, slot_reply) = self
            .run_limits(
                catalog,
                org,
                &limits,
                mode,
                now,
                idem,
                slot.as_ref().map(|(_, call)| call),
                leasing,
            )
            .await?;
        if status == Status::Duplicate {
            return Ok(Decision {
                plan,
                eval: Evaluation {
                    outcome: Outcome::Allowed,
                    states: Vec::new(),
                    applied: false,
                    credits: Vec::new(),
                    in_flight: None,
                },
                duplicate: true,
                shadow,
                slot: None,
            });
        }
        let applied = matches!(status, Status::Applied | Status::AppliedOverLimit);
        let credits = credit_states(&limits, &credits);
        let mut eval = evaluate(limits, &replies, applied, now);
        eval.credits = credits;
        let mut held = None;
        if let (Some((slots, call)), Some(reply)) = (slot, slot_reply) {
            eval = eval.with_in_flight(call.limit, &reply);
            if reply.millis > 0 {
                self.metrics.concurrency_swept.inc_by(reply.millis as u64);
            }
            if applied {
                held = Some(slots.hold(call));
            }
        }
        Ok(Decision {
            plan,
            eval,
            duplicate: false,
            shadow,
            slot: held,
        })
    }

    /// Add `charge` (negative: a credit) to the current period's counters of its metric, never
    /// denying and never touching rates: an operator's correction, not traffic.
    pub async fn adjust<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        charge: Charge<'c>,
    ) -> Result<Decision<'c>, QuotaError> {
        let (plan, eval) = self
            .record_counters(catalog, org, &Levels::ORG, &[charge], false, None)
            .await?;
        Ok(Decision {
            plan,
            eval,
            duplicate: false,
            shadow: false,
            slot: None,
        })
    }

    /// Give back what a proxied request was charged when the upstream failed it (`refund_on`).
    /// Only period counters and the meter are credited; rates keep the attempt, so a failing
    /// upstream cannot become a way around a rate limit. Counters never drop below zero (the
    /// script clamps).
    pub async fn refund<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        levels: &Levels<'_>,
        charges: &[Charge<'c>],
    ) -> Result<(), QuotaError> {
        self.refund_once(catalog, org, levels, charges, None).await
    }

    /// `refund` under an idempotency key: given back once however often it is retried (a
    /// reservation's settlement that a crash interrupted is finished by a sweeper).
    pub async fn refund_once<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        levels: &Levels<'_>,
        charges: &[Charge<'c>],
        key: Option<&str>,
    ) -> Result<(), QuotaError> {
        let credits: Vec<Charge<'c>> = merge_charges(charges)
            .into_iter()
            .map(|c| Charge {
                metric: c.metric,
                amount: -c.amount,
            })
            .collect();
        let idem = key.map(|k| (k, self.idempotency_ttl));
        self.record_counters(catalog, org, levels, &credits, true, idem)
            .await?;
        Ok(())
    }

    /// What adjustments and refunds share: apply `charges` to the org's counters and meters,
    /// never denied, rates left out, restoring the org's counters first after a Redis loss.
    /// Redis only, never degraded mode: credits are negative amounts, and Redis clamps each at
    /// zero in order, which a locally summed replay would not; and an adjustment is committed
    /// in Postgres only once Redis has it. While Redis is unreachable they fail, and say so.
    /// `from_leases`: credits may be taken from units this replica's blocks have not settled
    /// (a refund of a request admitted from a block).
    async fn record_counters<'c, 'l>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        levels: &Levels<'l>,
        charges: &[Charge<'c>],
        from_leases: bool,
        idem: Option<(&str, Duration)>,
    ) -> Result<(&'c Plan, Evaluation<'l>), QuotaError>
    where
        'c: 'l,
    {
        let (plan, record) = self.org(catalog, org).await?;
        let now = self.clock.now();
        let own = levels.key.and_then(|k| record.key_limits.get(k));
        let mut limits: Vec<_> =
            limits_at(plan, charges, now, &record.billing_cycle(), levels, own)
                .into_iter()
                .filter(|l| !l.is_rate())
                .collect();
        if let Some(leases) = self.leases.as_ref().filter(|_| from_leases) {
            // Credits for units still in this replica's blocks are taken there (see `give_back`).
            let specs: Vec<KeySpec> = limits.iter().map(|l| self.store.spec(org, l)).collect();
            let mut taken = leases.give_back(org, &specs).into_iter();
            limits.retain(|_| !taken.next().unwrap_or(false));
        }
        if limits.is_empty() {
            return Ok((plan, evaluate(limits, &[], false, now)));
        }
        let reply = self
            .restoring(
                catalog,
                org,
                now,
                |_| self.store.run(org, &limits, Mode::Record, now, idem),
                |r| r.status == Status::NeedsRestore,
            )
            .await??;
        let credits = credit_states(&limits, &reply.credits);
        let mut eval = evaluate(limits, &reply.limits, reply.status == Status::Applied, now);
        eval.credits = credits;
        Ok((plan, eval))
    }

    /// The org's current usage: one state per declared metric (the limit nearest exhaustion when a
    /// metric has several, the calendar-month meter when it has none).
    pub async fn usage<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
    ) -> Result<(&'c Plan, Vec<LimitState<'c>>), QuotaError> {
        let (plan, record) = self.org(catalog, org).await?;
        Ok((plan, self.usage_on(catalog, org, plan, &record).await?))
    }

    /// `usage` for an org whose plan and record the caller already read (an admin listing reads
    /// them from Postgres for a whole page at once).
    pub async fn usage_on<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        plan: &'c Plan,
        record: &OrgRecord,
    ) -> Result<Vec<LimitState<'c>>, QuotaError> {
        let charges: Vec<Charge<'c>> = catalog
            .metrics
            .values()
            .map(|metric| Charge { metric, amount: 0 })
            .collect();
        let now = self.clock.now();
        let limits: Vec<_> = limits_for(plan, &charges, now, &record.billing_cycle())
            .into_iter()
            .filter(|l| !matches!(l.target, Target::Rate { .. }))
            .collect();
        let eval = self.read_limits(catalog, org, limits, now).await?;
        let mut chosen: Vec<LimitState<'c>> = Vec::with_capacity(catalog.metrics.len());
        for state in eval.states {
            match chosen
                .iter_mut()
                .find(|s| s.limit.metric.id == state.limit.metric.id)
            {
                None => chosen.push(state),
                Some(existing) => {
                    let better = match (existing.headroom(), state.headroom()) {
                        (None, Some(_)) => true,
                        (Some(a), Some(b)) => b < a,
                        _ => false,
                    };
                    if better {
                        *existing = state;
                    }
                }
            }
        }
        Ok(chosen)
    }

    /// Counters and gauges of `limits` as Redis holds them now, as an evaluation that applied
    /// nothing. Redis lost the org's counters (or never held them): restored first, so a view
    /// never shows zero for usage Postgres knows about.
    async fn read_limits<'c>(
        &self,
        catalog: &Catalog,
        org: &OrgId,
        limits: Vec<crate::domain::decision::Limit<'c>>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Evaluation<'c>, QuotaError> {
        let values = self
            .restoring(
                catalog,
                org,
                now,
                |_| self.store.read(org, &limits, now),
                Option::is_none,
            )
            .await??
            .unwrap_or_else(|| vec![0; limits.len()]);
        let replies: Vec<LimitReply> = values
            .into_iter()
            .map(|value| LimitReply {
                denied: false,
                value,
                millis: 0,
            })
            .collect();
        Ok(evaluate(limits, &replies, false, now))
    }

    /// The usage of one API key or end user of an org (`scope`): one state per quota the plan
    /// (or the key's own quotas) sets at that level. A level is only counted where it is
    /// limited, so a metric without such a quota has no entry.
    pub async fn level_usage<'c>(
        &self,
        catalog: &'c Catalog,
        org: &OrgId,
        scope: Scope<'c>,
    ) -> Result<(&'c Plan, Vec<LimitState<'c>>), QuotaError> {
        let (plan, record) = self.org(catalog, org).await?;
        let charges: Vec<Charge<'c>> = catalog
            .metrics
            .values()
            .map(|metric| Charge { metric, amount: 0 })
            .collect();
        let levels = match scope {
            Scope::Key(id) => Levels {
                key: Some(id),
                user: None,
            },
            Scope::User(id) => Levels {
                key: None,
                user: Some(id),
            },
            Scope::Org => Levels::ORG,
        };
        let now = self.clock.now();
        let own = levels.key.and_then(|k| record.key_limits.get(k));
        let limits: Vec<_> = limits_at(plan, &charges, now, &record.billing_cycle(), &levels, own)
            .into_iter()
            .filter(|l| l.scope == scope && !l.is_rate())
            .collect();
        let eval = self.read_limits(catalog, org, limits, now).await?;
        Ok((plan, eval.states))
    }
}

impl From<QuotaError> for ReplayError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Store(e) => ReplayError::Store(e),
            QuotaError::Db(e) => ReplayError::Db(e),
        }
    }
}

/// Recovery replays through the same restore path as decisions.
impl Replayer for QuotaService {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    async fn send(
        &self,
        batch: &Batch,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Status, ReplayError> {
        let ttl = Duration::from_millis(batch.ttl_ms);
        let catalog = self.catalog();
        let status = self
            .restoring(
                &catalog,
                &batch.org,
                now,
                |_| {
                    self.store
                        .replay(&batch.org, &batch.specs, &batch.key, ttl, now)
                },
                |s| *s == Status::NeedsRestore,
            )
            .await??;
        Ok(status)
    }
}

/// A lease call whose request may be dropped before it is answered (a client that goes away
/// cancels its request's future, and the call with it). Whether Redis settled the blocks the call
/// carried can then not be learned: they are replayed, like a decision in doubt whose answer never
/// comes, and counted the same way (`in_doubt_total{outcome="unknown"}`).
struct Unanswered<'a> {
    quota: &'a QuotaService,
    taken: Option<&'a Taken>,
    /// A concurrency slot the call may take: given back (see `forget_slot`).
    slot: Option<&'a SlotCall>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.quota.forget_slot(self.slot.take());
        if let Some(taken) = self.taken.take() {
            self.quota.lease_unknown(Some(taken));
            self.quota.lease_failed(Some(taken), None);
        }
    }
}

/// The store's credit replies, named by metric.
fn credit_states<'c>(
    limits: &[crate::domain::decision::Limit<'c>],
    replies: &[CreditReply],
) -> Vec<CreditState<'c>> {
    replies
        .iter()
        .filter_map(|c| {
            Some(CreditState {
                metric: &limits.get(c.index)?.metric.id,
                drawn: c.drawn,
                remaining: c.remaining,
            })
        })
        .collect()
}

fn recorded(status: Status) -> Recorded {
    match status {
        Status::Duplicate => Recorded::Duplicate,
        Status::WouldOverflow => Recorded::Overflow,
        _ => Recorded::Counted,
    }
}
