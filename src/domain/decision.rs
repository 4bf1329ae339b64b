//! Turning "org X wants to spend these charges" into the list of limits to check, and the store's
//! answer back into a decision.
//!
//! The split keeps the rules here, free of I/O: `limits_for` decides *which* counters apply (the
//! calendar-month meter of every charged metric, each quota period of the plan, each rate, each
//! gauge), the store checks and increments them in one atomic step, and `evaluate` decides what the
//! result means (a quota denial wins over a rate denial, because retrying cannot help).

use chrono::{DateTime, Utc};

use super::level::{self, KeyLimits, Levels, Scope};
use super::period::{self, BillingCycle, Period, Window};
use super::plan::{Metric, MetricKind, Overage, Plan, Rate};

/// How a decision treats its limits: policy (dry runs, shadow enforcement), which the store
/// carries out.
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

/// The largest value a counter or gauge may hold, and so the largest amount of one charge:
/// 2^53 − 1, the largest integer that JSON clients and the Lua doubles of `decide.lua` both
/// represent exactly. A charge that would take a counter past it is refused with nothing applied
/// (`decide.lua` status 6), rather than overflowing Redis's 64-bit integers.
pub const MAX_COUNTER: i64 = (1 << 53) - 1;

/// One metric to spend, already checked against the catalog.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub metric: &'a Metric,
    pub amount: i64,
}

/// What a limit counts in, which is also what identifies its Redis key.
#[derive(Debug, Clone, PartialEq)]
pub enum Target<'a> {
    /// A counter of one period window. The calendar month of every counter metric is always
    /// one of these (the meter billing reads), limited or not.
    Counter { period: Period, window: Window },
    /// The current level of a gauge metric.
    Gauge,
    /// A GCRA rate: `limit` units per `window`.
    Rate {
        window: std::time::Duration,
        label: &'a str,
    },
}

/// One counter, gauge or rate that a charge touches.
#[derive(Debug, Clone)]
pub struct Limit<'a> {
    pub metric: &'a Metric,
    pub target: Target<'a>,
    pub amount: i64,
    /// `None`: metered only, never denies.
    pub limit: Option<u64>,
    pub overage: Overage,
    /// Threshold percentages to report crossings of (the plan's `notify_at`); empty for rates
    /// and metered-only counters.
    pub notify_at: &'a [u16],
    /// Charges nothing now, but the decision needs room left under this (blocking) quota: the
    /// request will be charged for it after the fact (a route that reports or settles the
    /// metric from the response), so a quota already used up denies it. See `needs_headroom`.
    pub headroom: bool,
    /// The level this limit counts: the org, or one of its keys or end users.
    pub scope: Scope<'a>,
}

impl Limit<'_> {
    /// Whether exceeding this limit denies the request.
    pub fn blocks(&self) -> bool {
        self.limit.is_some() && self.overage == Overage::Block
    }

    pub fn is_rate(&self) -> bool {
        matches!(self.target, Target::Rate { .. })
    }

    /// The calendar-month meter of a counter metric: what billing reads, flushed to Postgres.
    /// Only the org has one; a key's or user's monthly quota is a limit, not an invoice.
    pub fn is_meter(&self) -> bool {
        if self.scope != Scope::Org {
            return false;
        }
        match &self.target {
            Target::Counter {
                period: Period::Month,
                window,
            } => *window == period::calendar_month(window.start),
            _ => false,
        }
    }

    /// Kept durably (flushed to Postgres, restored after a Redis loss): the monthly meter of a
    /// counter, a billing-month counter (a month of usage, like the meter) and the level of a
    /// gauge. Other periods and rates are short-lived by nature.
    pub fn is_durable(&self) -> bool {
        self.is_meter()
            || self.scope == Scope::Org
                && matches!(
                    self.target,
                    Target::Gauge
                        | Target::Counter {
                            period: Period::BillingMonth,
                            ..
                        }
                )
    }

    /// The name used in `RateLimit-Policy` and `RateLimit` headers, appended to `out` (header
    /// rendering runs on every request and needs no `String` of its own for it).
    pub fn push_policy_name(&self, out: &mut String) {
        out.push_str(&self.metric.id);
        match &self.target {
            Target::Counter { period, .. } => {
                out.push('-');
                out.push_str(period.as_str());
            }
            Target::Gauge => {}
            Target::Rate { label, .. } => {
                out.push('-');
                out.push_str(label);
            }
        }
        if self.scope != Scope::Org {
            out.push('-');
            out.push_str(self.scope.per().as_str());
        }
    }
}

/// Sum charges of the same metric so one metric is never checked twice against its own limit.
pub fn merge_charges<'a>(charges: &[Charge<'a>]) -> Vec<Charge<'a>> {
    let mut merged: Vec<Charge<'a>> = Vec::with_capacity(charges.len());
    for c in charges {
        match merged.iter_mut().find(|m| m.metric.id == c.metric.id) {
            Some(m) => m.amount = m.amount.saturating_add(c.amount),
            None => merged.push(*c),
        }
    }
    merged
}

/// Every limit that `charges` touch on `plan` at `now`.
///
/// Charges must already be merged per metric. Quotas come before rates in the result so that the
/// first blocking quota found is the one reported.
pub fn limits_for<'a>(
    plan: &'a Plan,
    charges: &[Charge<'a>],
    now: DateTime<Utc>,
    cycle: &BillingCycle,
) -> Vec<Limit<'a>> {
    limits_at(plan, charges, now, cycle, &Levels::ORG, None)
}

/// `limits_for`, plus the limits of the levels below the org that the request names (its API
/// key, its end user): after all of the org's own, so the org's limits keep their order. `own`:
/// the key's own quotas, when an admin set them.
pub fn limits_at<'a>(
    plan: &'a Plan,
    charges: &[Charge<'a>],
    now: DateTime<Utc>,
    cycle: &BillingCycle,
    levels: &Levels<'a>,
    own: Option<&KeyLimits>,
) -> Vec<Limit<'a>> {
    let mut limits: Vec<Limit<'a>> = Vec::with_capacity(charges.len() * 3);
    for charge in charges {
        let metric = charge.metric;
        match metric.kind {
            MetricKind::Gauge => {
                let quota = plan.quotas_for(&metric.id).next();
                limits.push(Limit {
                    metric,
                    target: Target::Gauge,
                    amount: charge.amount,
                    limit: quota.map(|q| q.limit),
                    overage: quota.map_or(Overage::Allow, |q| q.overage),
                    notify_at: if quota.is_some() {
                        &plan.notify_at
                    } else {
                        &[]
                    },
                    headroom: false,
                    scope: Scope::Org,
                });
            }
            MetricKind::Counter => {
                let meter_index = limits.len();
                limits.push(Limit {
                    metric,
                    target: Target::Counter {
                        period: Period::Month,
                        window: period::calendar_month(now),
                    },
                    amount: charge.amount,
                    limit: None,
                    overage: Overage::Allow,
                    notify_at: &[],
                    headroom: false,
                    scope: Scope::Org,
                });
                for quota in plan.quotas_for(&metric.id) {
                    let Some(p) = quota.period else { continue };
                    let target = Target::Counter {
                        period: p,
                        window: period::window(p, now, cycle),
                    };
                    // A monthly quota is the meter itself: check that key rather than counting
                    // the same usage twice. A billing month is always a counter of its own, even
                    // while it equals the calendar month (no anchor): when an anchor is set, the
                    // period in progress carries on with the usage that counter holds.
                    if limits[meter_index].target == target {
                        limits[meter_index].limit = Some(quota.limit);
                        limits[meter_index].overage = quota.overage;
                        limits[meter_index].notify_at = &plan.notify_at;
                    } else {
                        limits.push(Limit {
                            metric,
                            target,
                            amount: charge.amount,
                            limit: Some(quota.limit),
                            overage: quota.overage,
                            notify_at: &plan.notify_at,
                            headroom: false,
                            scope: Scope::Org,
                        });
                    }
                }
            }
        }
    }
    for charge in charges {
        for rate in plan.rates_for(&charge.metric.id) {
            limits.push(rate_limit(charge, rate, Scope::Org));
        }
    }
    for scope in levels.scopes() {
        let per = scope.per();
        for charge in charges {
            let metric = charge.metric;
            if metric.kind == MetricKind::Counter {
                let plan_quotas = plan.quotas_per(&metric.id, per);
                for quota in level::quotas_at(scope, &metric.id, own, plan_quotas) {
                    let Some(p) = quota.period else { continue };
                    limits.push(Limit {
                        metric,
                        target: Target::Counter {
                            period: p,
                            window: period::window(p, now, cycle),
                        },
                        amount: charge.amount,
                        limit: Some(quota.limit),
                        overage: quota.overage,
                        // Threshold events are about the org's allowance.
                        notify_at: &[],
                        headroom: false,
                        scope,
                    });
                }
            }
            for rate in plan.rates_per(&metric.id, per) {
                limits.push(rate_limit(charge, rate, scope));
            }
        }
    }
    limits
}

/// The GCRA limit of `rate` for `charge` at `scope`.
fn rate_limit<'a>(charge: &Charge<'a>, rate: &'a Rate, scope: Scope<'a>) -> Limit<'a> {
    Limit {
        metric: charge.metric,
        target: Target::Rate {
            window: rate.window,
            label: &rate.window_label,
        },
        amount: charge.amount,
        limit: Some(rate.limit),
        overage: Overage::Block,
        notify_at: &[],
        headroom: false,
        scope,
    }
}

/// Zero-amount charges for the metrics of `needs` that `charges` (already merged) do not
/// charge, so that the decision sees their limits (see `Limit::headroom`).
pub fn add_headroom_charges<'a>(charges: &mut Vec<Charge<'a>>, needs: &[&'a Metric]) {
    for m in needs {
        if !charges.iter().any(|c| c.metric.id == m.id) {
            charges.push(Charge {
                metric: m,
                amount: 0,
            });
        }
    }
}

/// Mark the blocking quotas of `needs` that this decision charges nothing as needing room left
/// (`Limit::headroom`), and drop the other limits it charges nothing (rates, soft and unlimited
/// counters): they could not deny, and each would cost the script work on every request. Rates
/// are not checked: a rate refills, a used-up quota does not.
pub fn mark_headroom(limits: &mut Vec<Limit<'_>>, needs: &[&Metric]) {
    if needs.is_empty() {
        return;
    }
    limits.retain_mut(|l| {
        if l.amount != 0 || !needs.iter().any(|m| m.id == l.metric.id) {
            return true;
        }
        l.headroom = !l.is_rate() && l.blocks();
        l.headroom
    });
}

/// The store's answer for one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitReply {
    /// This limit alone would have denied the charge.
    pub denied: bool,
    /// Counters and gauges: the value before this call. Rates: units remaining after it.
    pub value: i64,
    /// Rates: milliseconds until the bucket is full again, or until the charge would fit when
    /// denied. Unused otherwise.
    pub millis: i64,
}

/// The state of one limit after a decision, ready to render.
#[derive(Debug, Clone)]
pub struct LimitState<'a> {
    pub limit: Limit<'a>,
    /// Counters and gauges: usage after the decision (before it, when nothing was applied).
    pub current: i64,
    /// Counters and gauges: usage before the decision.
    pub before: i64,
    /// Units left under the limit (0 when over a soft limit); `None` when unlimited.
    pub remaining: Option<u64>,
    /// Seconds until this limit resets or refills; `None` for gauges.
    pub reset_seconds: Option<u64>,
    /// Rates, when denied: seconds until the charge would fit.
    pub retry_after_seconds: Option<u64>,
}

impl LimitState<'_> {
    pub fn percentage(&self) -> Option<f64> {
        match (self.limit.limit, &self.limit.target) {
            (Some(l), Target::Counter { .. } | Target::Gauge) => {
                Some(self.current as f64 * 100.0 / l as f64)
            }
            _ => None,
        }
    }

    /// Fraction of the limit still available; lower means nearer exhaustion.
    pub fn headroom(&self) -> Option<f64> {
        match (self.limit.limit, self.remaining) {
            (Some(l), Some(r)) => Some(r as f64 / l as f64),
            _ => None,
        }
    }
}

/// The Redis-outage mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Enforce plans with in-memory counters on each replica; replay admitted usage later.
    #[default]
    Local,
    /// Admit everything; count locally and replay later.
    Open,
    /// Answer 503 for metered requests.
    Closed,
}

impl OnRedisError {
    /// As written in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Open => "open",
            OnRedisError::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    /// Index into `Evaluation::states` of the quota that denied.
    QuotaExceeded(usize),
    /// Index into `Evaluation::states` of the rate that denied.
    RateLimited(usize),
    /// Index into `Evaluation::states` of a rate whose burst (its limit) is smaller than the
    /// charge: no wait makes it fit, so it is not a 429 to retry (see `render::denial_body`).
    ExceedsBurst(usize),
    /// The plan's concurrency limit: the org already has that many requests in flight.
    TooManyInFlight,
}

impl Outcome {
    /// The name in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::QuotaExceeded(_) => "quota_exceeded",
            Outcome::RateLimited(_) => "rate_limited",
            Outcome::ExceedsBurst(_) => "exceeds_burst",
            Outcome::TooManyInFlight => "too_many_in_flight",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Evaluation<'a> {
    pub outcome: Outcome,
    pub states: Vec<LimitState<'a>>,
    /// Whether the charges were actually added (allowed and not a dry run).
    pub applied: bool,
    /// Per charged counter metric, what the decision did with the org's credits (empty when
    /// the store did not say: local mode, a leased admission).
    pub credits: Vec<CreditState<'a>>,
    /// The plan's concurrency limit, when the decision took (or was refused) a slot.
    pub in_flight: Option<InFlight>,
}

/// The requests an org has in flight, as a decision that takes a slot saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// The plan's `concurrency.requests`.
    pub limit: u64,
    /// In flight after the decision: this request's slot included when it was taken.
    pub current: u64,
    pub denied: bool,
}

impl InFlight {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.current)
    }
}

/// What a decision did with one metric's credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditState<'a> {
    pub metric: &'a str,
    /// Units drawn by this decision (negative: given back).
    pub drawn: i64,
    /// Units left in unexpired grants; `None` when the org has no grant of the metric.
    pub remaining: Option<u64>,
}

impl<'a> Evaluation<'a> {
    /// The org's credits left for `metric`; `None` when it has no grant of it (or unknown).
    pub fn credits_remaining(&self, metric: &str) -> Option<u64> {
        self.credits
            .iter()
            .find(|c| c.metric == metric)
            .and_then(|c| c.remaining)
    }

    pub fn denied_state(&self) -> Option<&LimitState<'a>> {
        match self.outcome {
            Outcome::Allowed | Outcome::TooManyInFlight => None,
            Outcome::QuotaExceeded(i) | Outcome::RateLimited(i) | Outcome::ExceedsBurst(i) => {
                self.states.get(i)
            }
        }
    }

    /// Add the store's answer for the concurrency slot (`reply.value`: slots held before this
    /// call). A quota or rate denial is reported before a concurrency one: it says more (an
    /// upgrade, or when to retry).
    pub fn with_in_flight(mut self, limit: u64, reply: &LimitReply) -> Self {
        let before = reply.value.max(0) as u64;
        // Applied means the slot was taken (in shadow mode even past the limit).
        self.in_flight = Some(InFlight {
            limit,
            current: before + u64::from(self.applied),
            denied: reply.denied,
        });
        if reply.denied && self.outcome == Outcome::Allowed {
            self.outcome = Outcome::TooManyInFlight;
        }
        self
    }
}

/// Interpret the store's replies (one per limit, same order) for a decision.
///
/// `applied` says whether the store added the charges. A quota denial is preferred over a rate
/// denial, and a charge larger than a rate's burst over one that waiting would fix (neither can
/// be cured by retrying); among rates the one with the longest wait is reported, so a client
/// that honours `Retry-After` does not come back too early.
pub fn evaluate<'a>(
    limits: Vec<Limit<'a>>,
    replies: &[LimitReply],
    applied: bool,
    now: DateTime<Utc>,
) -> Evaluation<'a> {
    let mut states = Vec::with_capacity(limits.len());
    let mut quota_denial = None;
    let mut rate_denial: Option<(usize, i64)> = None;
    let mut over_burst = None;
    for (i, (limit, reply)) in limits.into_iter().zip(replies).enumerate() {
        if reply.denied {
            let burst = limit.limit.unwrap_or(u64::MAX);
            if limit.is_rate() && limit.amount > 0 && limit.amount as u64 > burst {
                over_burst.get_or_insert(i);
            } else if limit.is_rate() {
                if rate_denial.is_none_or(|(_, ms)| reply.millis > ms) {
                    rate_denial = Some((i, reply.millis));
                }
            } else if quota_denial.is_none() {
                quota_denial = Some(i);
            }
        }
        states.push(state_of(limit, reply, applied, now));
    }
    let outcome = match (quota_denial, over_burst, rate_denial) {
        (Some(i), _, _) => Outcome::QuotaExceeded(i),
        (None, Some(i), _) => Outcome::ExceedsBurst(i),
        (None, None, Some((i, _))) => Outcome::RateLimited(i),
        (None, None, None) => Outcome::Allowed,
    };
    Evaluation {
        outcome,
        states,
        applied,
        credits: Vec::new(),
        in_flight: None,
    }
}

fn state_of<'a>(
    limit: Limit<'a>,
    reply: &LimitReply,
    applied: bool,
    now: DateTime<Utc>,
) -> LimitState<'a> {
    match &limit.target {
        Target::Rate { .. } => {
            let millis = reply.millis.max(0) as u64;
            // Denied: `millis` is the time until this amount fits, and `reset` says the same as
            // `Retry-After` (a client reading either waits as long). Otherwise: until the bucket
            // is full again.
            let retry = reply.denied.then(|| millis.div_ceil(1000).max(1));
            LimitState {
                current: 0,
                before: 0,
                remaining: Some(reply.value.max(0) as u64),
                reset_seconds: Some(retry.unwrap_or_else(|| millis.div_ceil(1000))),
                retry_after_seconds: retry,
                limit,
            }
        }
        Target::Counter { .. } | Target::Gauge => {
            let before = reply.value.max(0);
            let current = if applied {
                before.saturating_add(limit.amount).max(0)
            } else {
                before
            };
            let remaining = limit.limit.map(|l| l.saturating_sub(current.max(0) as u64));
            let reset_seconds = match &limit.target {
                Target::Counter { window, .. } => Some(window.seconds_until_end(now)),
                _ => None,
            };
            LimitState {
                current,
                before,
                remaining,
                reset_seconds,
                retry_after_seconds: None,
                limit,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::level::KeyLimits;
    use crate::domain::plan::{Per, Quota, Rate};
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn metric(id: &str, kind: MetricKind) -> Metric {
        Metric {
            id: id.into(),
            unit: "unit".into(),
            kind,
            leases: true,
        }
    }

    fn plan() -> Plan {
        Plan {
            enforcement: Default::default(),
            id: "free".into(),
            name: "Free".into(),
            upgrade_to: None,
            notify_at: Vec::new(),
            features: BTreeSet::new(),
            quotas: vec![
                Quota {
                    metric: "requests".into(),
                    limit: 1000,
                    period: Some(Period::Month),
                    overage: Overage::Block,
                    per: Per::Org,
                },
                Quota {
                    metric: "requests".into(),
                    limit: 100,
                    period: Some(Period::Day),
                    overage: Overage::Allow,
                    per: Per::Org,
                },
                Quota {
                    metric: "projects".into(),
                    limit: 3,
                    period: None,
                    overage: Overage::Block,
                    per: Per::Org,
                },
            ],
            concurrency: None,
            leases: true,
            rates: vec![Rate {
                metric: "requests".into(),
                limit: 10,
                window: Duration::from_secs(1),
                window_label: "1s".into(),
                per: Per::Org,
            }],
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_key_and_a_user_add_their_own_limits_after_the_orgs() {
        let mut plan = plan();
        plan.quotas.push(Quota {
            metric: "requests".into(),
            limit: 50,
            period: Some(Period::Month),
            overage: Overage::Block,
            per: Per::Key,
        });
        plan.rates.push(Rate {
            metric: "requests".into(),
            limit: 2,
            window: Duration::from_secs(1),
            window_label: "1s".into(),
            per: Per::User,
        });
        let requests = metric("requests", MetricKind::Counter);
        let charge = [Charge {
            metric: &requests,
            amount: 1,
        }];
        let org_only = limits_for(&plan, &charge, now(), &BillingCycle::default());
        let levels = Levels {
            key: Some("k1"),
            user: Some("u1"),
        };
        let all = limits_at(
            &plan,
            &charge,
            now(),
            &BillingCycle::default(),
            &levels,
            None,
        );
        assert_eq!(all.len(), org_only.len() + 2);
        assert!(all[..org_only.len()].iter().all(|l| l.scope == Scope::Org));
        let key = &all[org_only.len()];
        assert_eq!((key.scope, key.limit), (Scope::Key("k1"), Some(50)));
        // A key's monthly quota is a limit, not the org's meter: never flushed as billing usage.
        assert!(!key.is_meter() && !key.is_durable());
        let user = &all[org_only.len() + 1];
        assert!(user.is_rate() && user.scope == Scope::User("u1"));
        let mut name = String::new();
        user.push_policy_name(&mut name);
        assert_eq!(name, "requests-1s-user");
        // The key's own quotas replace the plan's per-key quotas of the metric.
        let own = KeyLimits {
            quotas: vec![Quota {
                metric: "requests".into(),
                limit: 5,
                period: Some(Period::Day),
                overage: Overage::Block,
                per: Per::Key,
            }],
        };
        let with_own = limits_at(
            &plan,
            &charge,
            now(),
            &BillingCycle::default(),
            &levels,
            Some(&own),
        );
        let key = &with_own[org_only.len()];
        assert_eq!(key.limit, Some(5));
        assert!(matches!(
            key.target,
            Target::Counter {
                period: Period::Day,
                ..
            }
        ));
        assert_eq!(with_own.len(), all.len());
    }

    #[test]
    fn metrics_charged_after_the_response_need_headroom_on_their_hard_quotas_only() {
        let plan = plan();
        let requests = metric("requests", MetricKind::Counter);
        let tokens = metric("tokens", MetricKind::Counter);
        let mut charges = vec![Charge {
            metric: &tokens,
            amount: 5,
        }];
        add_headroom_charges(&mut charges, &[&requests, &tokens]);
        assert_eq!(charges.len(), 2, "tokens is charged already");
        let mut limits = limits_for(&plan, &charges, now(), &Default::default());
        mark_headroom(&mut limits, &[&requests, &tokens]);
        let kept: Vec<_> = limits
            .iter()
            .map(|l| {
                let mut name = String::new();
                l.push_policy_name(&mut name);
                (name, l.amount, l.headroom)
            })
            .collect();
        // requests: the hard monthly quota needs room; the soft daily one and the rate are
        // dropped (they cannot deny a charge of nothing); tokens is charged as usual.
        assert_eq!(
            kept,
            vec![
                ("tokens-month".to_string(), 5, false),
                ("requests-month".to_string(), 0, true),
            ]
        );
    }

    #[test]
    fn calendar_monthly_quota_shares_the_meter_key() {
        let plan = plan();
        let requests = metric("requests", MetricKind::Counter);
        let limits = limits_for(
            &plan,
            &[Charge {
                metric: &requests,
                amount: 1,
            }],
            now(),
            &BillingCycle::default(),
        );
        let names: Vec<_> = limits
            .iter()
            .map(|l| {
                let mut name = String::new();
                l.push_policy_name(&mut name);
                name
            })
            .collect();
        assert_eq!(names, ["requests-month", "requests-day", "requests-1s"]);
        assert_eq!(limits[0].limit, Some(1000));
        assert!(limits[0].blocks());
        assert!(!limits[1].blocks(), "soft limit");
    }

    #[test]
    fn billing_month_is_a_separate_durable_counter_from_the_meter() {
        let mut plan = plan();
        plan.quotas[0].period = Some(Period::BillingMonth);
        let requests = metric("requests", MetricKind::Counter);
        let charge = [Charge {
            metric: &requests,
            amount: 1,
        }];
        // Without an anchor: the calendar month, but its own counter all the same.
        let limits = limits_for(&plan, &charge, now(), &BillingCycle::default());
        assert_eq!(limits.len(), 4);
        assert_eq!(limits[0].limit, None, "the meter stays unlimited");
        assert!(limits[0].is_meter() && limits[0].is_durable());
        assert_eq!(limits[1].limit, Some(1000));
        assert!(!limits[1].is_meter() && limits[1].is_durable());
        assert_eq!(
            limits[1].target,
            Target::Counter {
                period: Period::BillingMonth,
                window: period::calendar_month(now()),
            }
        );
        let anchor = DateTime::parse_from_rfc3339("2026-01-15T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let cycle = BillingCycle::new(Some(anchor), None);
        let limits = limits_for(&plan, &charge, now(), &cycle);
        assert_eq!(
            limits[1].target,
            Target::Counter {
                period: Period::BillingMonth,
                window: cycle.window(now()),
            }
        );
        // `month` ignores the anchor: it stays the meter.
        let calendar = self::plan();
        let limits = limits_for(&calendar, &charge, now(), &cycle);
        assert_eq!(limits.len(), 3);
        assert_eq!(limits[0].limit, Some(1000));
    }

    #[test]
    fn unlimited_metrics_are_still_metered() {
        let plan = plan();
        let tokens = metric("tokens", MetricKind::Counter);
        let limits = limits_for(
            &plan,
            &[Charge {
                metric: &tokens,
                amount: 5,
            }],
            now(),
            &BillingCycle::default(),
        );
        assert_eq!(limits.len(), 1);
        assert_eq!(limits[0].limit, None);
    }

    #[test]
    fn quota_denial_wins_over_rate_denial() {
        let plan = plan();
        let requests = metric("requests", MetricKind::Counter);
        let limits = limits_for(
            &plan,
            &[Charge {
                metric: &requests,
                amount: 1,
            }],
            now(),
            &BillingCycle::default(),
        );
        let replies = [
            LimitReply {
                denied: true,
                value: 1000,
                millis: 0,
            },
            LimitReply::default(),
            LimitReply {
                denied: true,
                value: 0,
                millis: 300,
            },
        ];
        let eval = evaluate(limits, &replies, false, now());
        assert_eq!(eval.outcome, Outcome::QuotaExceeded(0));
        assert_eq!(eval.states[0].current, 1000);
        assert_eq!(eval.states[2].retry_after_seconds, Some(1));
    }

    #[test]
    fn applied_counters_report_usage_after_the_charge() {
        let plan = plan();
        let requests = metric("requests", MetricKind::Counter);
        let limits = limits_for(
            &plan,
            &[Charge {
                metric: &requests,
                amount: 2,
            }],
            now(),
            &BillingCycle::default(),
        );
        let replies = [
            LimitReply {
                denied: false,
                value: 10,
                millis: 0,
            },
            LimitReply {
                denied: false,
                value: 99,
                millis: 0,
            },
            LimitReply {
                denied: false,
                value: 7,
                millis: 200,
            },
        ];
        let eval = evaluate(limits, &replies, true, now());
        assert_eq!(eval.outcome, Outcome::Allowed);
        assert_eq!(eval.states[0].current, 12);
        assert_eq!(eval.states[0].remaining, Some(988));
        assert_eq!(eval.states[1].current, 101);
        assert_eq!(eval.states[1].remaining, Some(0), "over a soft limit");
        assert!(eval.states[1].percentage().unwrap() > 100.0);
        assert_eq!(eval.states[2].remaining, Some(7));
        assert_eq!(eval.states[2].reset_seconds, Some(1));
    }

    #[test]
    fn a_refused_slot_is_reported_after_quota_and_rate_denials() {
        let plan = plan();
        let requests = metric("requests", MetricKind::Counter);
        let charge = [Charge {
            metric: &requests,
            amount: 1,
        }];
        let full = LimitReply {
            denied: true,
            value: 3,
            millis: 0,
        };
        let replies = [LimitReply::default(); 3];
        let eval = evaluate(
            limits_for(&plan, &charge, now(), &BillingCycle::default()),
            &replies,
            false,
            now(),
        )
        .with_in_flight(3, &full);
        assert_eq!(eval.outcome, Outcome::TooManyInFlight);
        assert_eq!(eval.outcome.label(), "too_many_in_flight");
        assert!(eval.denied_state().is_none());
        assert_eq!(eval.in_flight.unwrap().remaining(), 0);

        let mut quota = replies;
        quota[0] = LimitReply {
            denied: true,
            value: 1000,
            millis: 0,
        };
        let eval = evaluate(
            limits_for(&plan, &charge, now(), &BillingCycle::default()),
            &quota,
            false,
            now(),
        )
        .with_in_flight(3, &full);
        assert_eq!(eval.outcome, Outcome::QuotaExceeded(0));

        let free = LimitReply {
            denied: false,
            value: 1,
            millis: 0,
        };
        let eval = evaluate(
            limits_for(&plan, &charge, now(), &BillingCycle::default()),
            &replies,
            true,
            now(),
        )
        .with_in_flight(3, &free);
        assert_eq!(eval.outcome, Outcome::Allowed);
        assert_eq!(
            eval.in_flight.unwrap().current,
            2,
            "this request's slot counts"
        );
    }

    #[test]
    fn merging_sums_the_same_metric() {
        let requests = metric("requests", MetricKind::Counter);
        let tokens = metric("tokens", MetricKind::Counter);
        let merged = merge_charges(&[
            Charge {
                metric: &requests,
                amount: 1,
            },
            Charge {
                metric: &tokens,
                amount: 10,
            },
            Charge {
                metric: &requests,
                amount: 2,
            },
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].amount, 3);
    }
}
