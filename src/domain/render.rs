//! What a decision looks like to a client: usage entries, denial bodies and rate-limit headers.
//!
//! Both `/v1/check` and the reverse proxy render decisions through this module, so a client sees
//! the same 402/429 documents and the same headers whichever way it reached the gateway.
//!
//! Headers follow draft-ietf-httpapi-ratelimit-headers-11 (`RateLimit-Policy`, `RateLimit`, as
//! Structured Field lists) plus the common `X-RateLimit-*` trio, which describes the single limit
//! with the least headroom (smallest remaining fraction of its limit).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::decision::{Evaluation, LimitState, Outcome, Target};
use super::level::Scope;
use super::plan::{Catalog, MetricKind, Per, Plan};

/// `{"id","name"}` of a plan.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

impl<'a> From<&'a Plan> for PlanRef<'a> {
    fn from(p: &'a Plan) -> Self {
        PlanRef {
            id: &p.id,
            name: &p.name,
        }
    }
}

/// One metric's usage, as in `GET /v1/orgs/{org_id}/usage` and `/v1/check` answers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UsageEntry<'a> {
    pub metric: &'a str,
    pub unit: &'a str,
    pub kind: &'static str,
    pub current: i64,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub percentage: Option<f64>,
    pub unlimited: bool,
    /// Hard (`block`) or soft (`allow`) limit; null when unlimited.
    pub overage: Option<&'static str>,
    pub period: Option<&'static str>,
    pub resets_at: Option<String>,
    /// Units left in the org's unexpired credit grants of this metric; absent without grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits_remaining: Option<u64>,
    /// The level this entry counts (`"key"`, `"user"`); absent for the org's own.
    #[serde(skip_serializing_if = "is_org")]
    pub scope: &'static str,
}

fn is_org(scope: &&'static str) -> bool {
    *scope == "org"
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl<'a> UsageEntry<'a> {
    pub fn from_state(state: &LimitState<'a>) -> Self {
        let limit = &state.limit;
        let (period, resets_at) = match &limit.target {
            Target::Counter { period, window } => {
                (Some(period.as_str()), Some(rfc3339(window.end)))
            }
            _ => (None, None),
        };
        UsageEntry {
            metric: &limit.metric.id,
            unit: &limit.metric.unit,
            kind: limit.metric.kind.as_str(),
            current: state.current,
            limit: limit.limit,
            remaining: state.remaining,
            percentage: state.percentage(),
            unlimited: limit.limit.is_none(),
            overage: limit.limit.map(|_| match limit.overage {
                super::plan::Overage::Block => "block",
                super::plan::Overage::Allow => "allow",
            }),
            period,
            resets_at,
            credits_remaining: None,
            scope: limit.scope.per().as_str(),
        }
    }

    /// The same entry showing the org's credits of its metric.
    pub fn with_credits(mut self, remaining: Option<u64>) -> Self {
        self.credits_remaining = remaining;
        self
    }
}

/// Usage entries for every counter and gauge in an evaluation (rates are reported in headers).
pub fn usage_entries<'a>(eval: &Evaluation<'a>) -> Vec<UsageEntry<'a>> {
    eval.states
        .iter()
        .filter(|s| !s.limit.is_rate())
        .map(|s| {
            let credits = match s.limit.scope {
                Scope::Org => eval.credits_remaining(&s.limit.metric.id),
                _ => None,
            };
            UsageEntry::from_state(s).with_credits(credits)
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Upgrade<'a> {
    pub plan: &'a str,
    pub name: &'a str,
    /// The suggested plan's limit for the same metric and period; null when unlimited there.
    pub limit: Option<u64>,
    pub url: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuotaInfo<'a> {
    pub metric: &'a str,
    pub current: i64,
    pub limit: Option<u64>,
    pub percentage: Option<f64>,
    pub period: Option<&'static str>,
    pub resets_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RateInfo<'a> {
    pub metric: &'a str,
    pub limit: Option<u64>,
    pub window: &'a str,
}

/// The concurrency limit that refused a request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConcurrencyInfo {
    /// Requests the plan allows in flight at once.
    pub limit: u64,
    /// Requests of the org in flight when this one was refused.
    pub in_flight: u64,
}

/// An RFC 9457 problem document for a 402 or 429, with the gateway's own members.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DenialBody<'a> {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub allowed: bool,
    pub error: &'static str,
    pub message: String,
    /// The level that denied: `"org"`, `"key"` or `"user"`.
    pub scope: &'static str,
    /// The API key (`scope: "key"`) or end user (`scope: "user"`) that denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaInfo<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateInfo<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyInfo>,
    pub plan: PlanRef<'a>,
    pub upgrade: Option<Upgrade<'a>>,
    /// A quota denial of a metric the org has credits of: what they still hold (less than the
    /// part of the charge above the quota, or the charge would have been allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsInfo>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CreditsInfo {
    pub remaining: u64,
}

pub const QUOTA_EXCEEDED_TYPE: &str = "urn:quota-gateway:problem:quota-exceeded";
pub const RATE_LIMITED_TYPE: &str = "urn:quota-gateway:problem:rate-limited";
pub const EXCEEDS_BURST_TYPE: &str = "urn:quota-gateway:problem:charge-exceeds-burst";
pub const TOO_MANY_IN_FLIGHT_TYPE: &str = "urn:quota-gateway:problem:too-many-in-flight";

/// The plan an org on `plan` could move up to, with that plan's limit for the same metric and
/// target: the `upgrade` member of a 402/429 body and of a threshold event.
/// `per`: the level the limit is at (the next plan's limit at the same level).
pub fn upgrade_for<'a>(
    catalog: &'a Catalog,
    org_id: &str,
    plan: &Plan,
    metric: &str,
    target: &Target<'_>,
    per: Per,
) -> Option<Upgrade<'a>> {
    let up = plan.upgrade_to.as_deref().and_then(|id| catalog.plan(id))?;
    Some(Upgrade {
        plan: &up.id,
        name: &up.name,
        limit: match target {
            Target::Rate { window, .. } => up
                .rates_per(metric, per)
                .find(|r| r.window == *window)
                .or_else(|| up.rates_per(metric, per).next())
                .map(|r| r.limit),
            Target::Counter { period, .. } => up
                .quotas_per(metric, per)
                .find(|q| q.period == Some(*period))
                .map(|q| q.limit),
            Target::Gauge => up.quotas_per(metric, per).next().map(|q| q.limit),
        },
        url: catalog.upgrade_url_for(org_id, &up.id),
    })
}

/// The denial document for a denied evaluation; `None` when it was allowed.
pub fn denial_body<'a>(
    catalog: &'a Catalog,
    org_id: &str,
    plan: &'a Plan,
    eval: &Evaluation<'a>,
) -> Option<DenialBody<'a>> {
    if eval.outcome == Outcome::TooManyInFlight {
        return eval
            .in_flight
            .map(|f| too_many_in_flight(catalog, org_id, plan, f));
    }
    let state = eval.denied_state()?;
    let limit = &state.limit;
    let metric = &limit.metric.id;
    let upgrade = upgrade_for(
        catalog,
        org_id,
        plan,
        metric,
        &limit.target,
        limit.scope.per(),
    );
    let who = Who(org_id, limit.scope);
    let body = match eval.outcome {
        Outcome::QuotaExceeded(_) => {
            let (period, resets_at) = match &limit.target {
                Target::Counter { period, window } => {
                    (Some(period.as_str()), Some(rfc3339(window.end)))
                }
                _ => (None, None),
            };
            let message = match limit.metric.kind {
                MetricKind::Counter => format!(
                    "{who} has used {} of {} {metric} allowed per {} on the {} plan.",
                    state.before,
                    limit.limit.unwrap_or(0),
                    period.unwrap_or("month"),
                    plan.name
                ),
                MetricKind::Gauge => format!(
                    "Organization {org_id} has {} of {} {metric} allowed on the {} plan; adding {} would exceed it.",
                    state.before,
                    limit.limit.unwrap_or(0),
                    plan.name,
                    limit.amount
                ),
            };
            DenialBody {
                type_: QUOTA_EXCEEDED_TYPE,
                title: "Quota exceeded",
                status: 402,
                detail: message.clone(),
                allowed: false,
                error: "quota_exceeded",
                message,
                scope: "org",
                key_id: None,
                user_id: None,
                quota: Some(QuotaInfo {
                    metric,
                    current: state.before,
                    limit: limit.limit,
                    percentage: limit.limit.map(|l| state.before as f64 * 100.0 / l as f64),
                    period,
                    resets_at,
                }),
                retry_after_seconds: None,
                rate: None,
                concurrency: None,
                plan: plan.into(),
                upgrade,
                credits: eval
                    .credits_remaining(metric)
                    .map(|remaining| CreditsInfo { remaining }),
            }
        }
        Outcome::RateLimited(_) => {
            let window = match &limit.target {
                Target::Rate { label, .. } => *label,
                _ => "",
            };
            let retry = state.retry_after_seconds.unwrap_or(1);
            let message = format!(
                "{who} exceeded {} {metric} per {window} on the {} plan; retry in {retry} s.",
                limit.limit.unwrap_or(0),
                plan.name
            );
            DenialBody {
                type_: RATE_LIMITED_TYPE,
                title: "Rate limited",
                status: 429,
                detail: message.clone(),
                allowed: false,
                error: "rate_limited",
                message,
                scope: "org",
                key_id: None,
                user_id: None,
                quota: None,
                retry_after_seconds: Some(retry),
                rate: Some(RateInfo {
                    metric,
                    limit: limit.limit,
                    window,
                }),
                concurrency: None,
                plan: plan.into(),
                upgrade,
                credits: None,
            }
        }
        Outcome::ExceedsBurst(_) => {
            // Larger than the bucket: no wait makes it fit, so not a 429 (clients retry those,
            // and the OpenAI SDKs do so on their own). A 402 like a used-up quota: the remedy is
            // a smaller charge or another plan, and the upgrade hint only names a plan whose
            // rate would take it.
            let window = match &limit.target {
                Target::Rate { label, .. } => *label,
                _ => "",
            };
            let message = format!(
                "A charge of {} {metric} can never fit the {} plan's rate of {} {metric} per {window}; split it or change plans.",
                limit.amount,
                plan.name,
                limit.limit.unwrap_or(0),
            );
            DenialBody {
                type_: EXCEEDS_BURST_TYPE,
                title: "Charge exceeds the rate's burst",
                status: 402,
                detail: message.clone(),
                allowed: false,
                error: "charge_exceeds_burst",
                message,
                scope: "org",
                key_id: None,
                user_id: None,
                quota: None,
                retry_after_seconds: None,
                rate: Some(RateInfo {
                    metric,
                    limit: limit.limit,
                    window,
                }),
                credits: None,
                concurrency: None,
                plan: plan.into(),
                upgrade: upgrade.filter(|u| u.limit.is_none_or(|l| l >= limit.amount as u64)),
            }
        }
        Outcome::Allowed | Outcome::TooManyInFlight => return None,
    };
    Some(DenialBody {
        scope: limit.scope.per().as_str(),
        key_id: match limit.scope {
            Scope::Key(id) => Some(id),
            _ => None,
        },
        user_id: match limit.scope {
            Scope::User(id) => Some(id),
            _ => None,
        },
        ..body
    })
}

/// Who a denial message is about.
struct Who<'a>(&'a str, Scope<'a>);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Scope::Org => write!(f, "Organization {}", self.0),
            Scope::Key(id) => write!(f, "API key {id} of organization {}", self.0),
            Scope::User(id) => write!(f, "User {id} of organization {}", self.0),
        }
    }
}

/// The 429 of a request refused by the plan's concurrency limit. No wait is known (a slot frees
/// when some response ends), so `Retry-After` says one second.
fn too_many_in_flight<'a>(
    catalog: &'a Catalog,
    org_id: &str,
    plan: &'a Plan,
    f: super::decision::InFlight,
) -> DenialBody<'a> {
    let message = format!(
        "Organization {org_id} already has {} requests in flight, the most the {} plan allows at once; retry when one has finished.",
        f.current, plan.name
    );
    let upgrade = plan
        .upgrade_to
        .as_deref()
        .and_then(|id| catalog.plan(id))
        .map(|up| Upgrade {
            plan: &up.id,
            name: &up.name,
            limit: up.concurrency.map(|c| c.requests),
            url: catalog.upgrade_url_for(org_id, &up.id),
        });
    DenialBody {
        type_: TOO_MANY_IN_FLIGHT_TYPE,
        title: "Too many requests in flight",
        status: 429,
        detail: message.clone(),
        allowed: false,
        error: "too_many_in_flight",
        message,
        scope: "org",
        key_id: None,
        user_id: None,
        quota: None,
        retry_after_seconds: Some(1),
        rate: None,
        concurrency: Some(ConcurrencyInfo {
            limit: f.limit,
            in_flight: f.current,
        }),
        plan: plan.into(),
        upgrade,
        credits: None,
    }
}

/// Rendered rate-limit header values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub policy: String,
    pub ratelimit: String,
    pub x_limit: Option<u64>,
    pub x_remaining: Option<u64>,
    pub x_reset: Option<u64>,
    pub retry_after: Option<u64>,
}

impl RateLimitHeaders {
    pub fn is_empty(&self) -> bool {
        self.policy.is_empty()
    }
}

/// Header values for every limit that applied (unlimited meters are left out).
pub fn ratelimit_headers(eval: &Evaluation<'_>) -> RateLimitHeaders {
    let mut h = RateLimitHeaders {
        policy: String::with_capacity(96),
        ratelimit: String::with_capacity(96),
        ..RateLimitHeaders::default()
    };
    let mut nearest: Option<(&LimitState<'_>, f64)> = None;
    // Plain appends and `itoa` rather than `write!`: this runs for every metered request, and the
    // formatting machinery was most of its cost.
    let mut num = itoa::Buffer::new();
    for state in eval.states.iter().filter(|s| s.limit.limit.is_some()) {
        let limit = &state.limit;
        let q = limit.limit.unwrap_or(0);
        if !h.policy.is_empty() {
            h.policy.push_str(", ");
            h.ratelimit.push_str(", ");
        }
        h.policy.push('"');
        limit.push_policy_name(&mut h.policy);
        h.policy.push_str("\";q=");
        h.policy.push_str(num.format(q));
        let window = match &limit.target {
            Target::Counter { window, .. } => Some(window.length_seconds()),
            Target::Rate { window, .. } => Some(window.as_secs().max(1)),
            Target::Gauge => None,
        };
        if let Some(w) = window {
            h.policy.push_str(";w=");
            h.policy.push_str(num.format(w));
        }
        h.ratelimit.push('"');
        limit.push_policy_name(&mut h.ratelimit);
        h.ratelimit.push_str("\";r=");
        h.ratelimit
            .push_str(num.format(state.remaining.unwrap_or(0)));
        if let Some(t) = state.reset_seconds {
            h.ratelimit.push_str(";t=");
            h.ratelimit.push_str(num.format(t));
        }
        if let Some(room) = state.headroom()
            && nearest.is_none_or(|(_, best)| room < best)
        {
            nearest = Some((state, room));
        }
    }
    // The concurrency policy: `q` requests in flight at once, `r` more may start now. No
    // window and no reset: a slot frees when a response ends.
    if let Some(f) = eval.in_flight {
        if !h.policy.is_empty() {
            h.policy.push_str(", ");
            h.ratelimit.push_str(", ");
        }
        h.policy.push_str("\"concurrency\";q=");
        h.policy.push_str(num.format(f.limit));
        h.ratelimit.push_str("\"concurrency\";r=");
        h.ratelimit.push_str(num.format(f.remaining()));
    }
    // The trio describes one limit: the one that denied, else the nearest to its end.
    if let Some((state, _)) = nearest {
        h.x_limit = state.limit.limit;
        h.x_remaining = state.remaining;
        h.x_reset = state.reset_seconds;
    }
    if eval.outcome == Outcome::TooManyInFlight
        && let Some(f) = eval.in_flight
    {
        h.x_limit = Some(f.limit);
        h.x_remaining = Some(0);
        h.x_reset = None;
        h.retry_after = Some(1);
    }
    if let Some(state) = eval.denied_state() {
        h.x_limit = state.limit.limit;
        h.x_remaining = state.remaining;
        h.x_reset = state.reset_seconds;
        h.retry_after = match eval.outcome {
            Outcome::RateLimited(_) => state.retry_after_seconds,
            _ => None,
        };
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::decision::{Charge, LimitReply, evaluate, limits_for};
    use crate::domain::period::Period;
    use crate::domain::plan::{Metric, Overage, Quota, Rate};
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    fn catalog() -> Catalog {
        let metric = Metric {
            id: "requests".into(),
            unit: "request".into(),
            kind: MetricKind::Counter,
            leases: true,
        };
        let free = Plan {
            enforcement: Default::default(),
            notify_at: Vec::new(),
            id: "free".into(),
            name: "Free".into(),
            upgrade_to: Some("pro".into()),
            features: BTreeSet::new(),
            quotas: vec![Quota {
                metric: "requests".into(),
                limit: 1000,
                period: Some(Period::Month),
                overage: Overage::Block,
                per: Per::Org,
            }],
            concurrency: None,
            leases: true,
            rates: vec![Rate {
                metric: "requests".into(),
                limit: 10,
                window: Duration::from_secs(1),
                window_label: "1s".into(),
                per: Per::Org,
            }],
        };
        let pro = Plan {
            enforcement: Default::default(),
            notify_at: Vec::new(),
            id: "pro".into(),
            name: "Pro".into(),
            upgrade_to: None,
            features: BTreeSet::new(),
            quotas: vec![Quota {
                metric: "requests".into(),
                limit: 100_000,
                period: Some(Period::Month),
                overage: Overage::Block,
                per: Per::Org,
            }],
            concurrency: None,
            leases: true,
            rates: vec![],
        };
        Catalog {
            default_plan: "free".into(),
            upgrade_url: Some("https://example.com/up?org={org_id}&plan={plan}".into()),
            metrics: BTreeMap::from([("requests".into(), metric)]),
            plans: BTreeMap::from([("free".into(), free), ("pro".into(), pro)]),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-30T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn quota_denial_body_and_headers() {
        let cat = catalog();
        let plan = cat.plan("free").unwrap();
        let m = cat.metric("requests").unwrap();
        let limits = limits_for(
            plan,
            &[Charge {
                metric: m,
                amount: 1,
            }],
            now(),
            &crate::domain::period::BillingCycle::default(),
        );
        let replies = [
            LimitReply {
                denied: true,
                value: 1000,
                millis: 0,
            },
            LimitReply {
                denied: false,
                value: 9,
                millis: 100,
            },
        ];
        let eval = evaluate(limits, &replies, false, now());
        let body = denial_body(&cat, "acme", plan, &eval).unwrap();
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["status"], 402);
        assert_eq!(json["error"], "quota_exceeded");
        assert_eq!(json["quota"]["current"], 1000);
        assert_eq!(json["quota"]["resets_at"], "2026-12-01T00:00:00Z");
        assert_eq!(json["upgrade"]["plan"], "pro");
        assert_eq!(json["upgrade"]["limit"], 100_000);
        assert_eq!(
            json["upgrade"]["url"],
            "https://example.com/up?org=acme&plan=pro"
        );
        assert!(json["message"].as_str().unwrap().contains("1000 of 1000"));

        let h = ratelimit_headers(&eval);
        assert_eq!(
            h.policy,
            "\"requests-month\";q=1000;w=2592000, \"requests-1s\";q=10;w=1"
        );
        assert_eq!(
            h.ratelimit,
            "\"requests-month\";r=0;t=86400, \"requests-1s\";r=9;t=1"
        );
        assert_eq!(
            (h.x_limit, h.x_remaining, h.x_reset),
            (Some(1000), Some(0), Some(86400))
        );
        assert_eq!(h.retry_after, None);
    }

    #[test]
    fn rate_denial_body_has_retry_after_and_null_upgrade_limit() {
        let cat = catalog();
        let plan = cat.plan("free").unwrap();
        let m = cat.metric("requests").unwrap();
        let limits = limits_for(
            plan,
            &[Charge {
                metric: m,
                amount: 1,
            }],
            now(),
            &crate::domain::period::BillingCycle::default(),
        );
        let replies = [
            LimitReply {
                denied: false,
                value: 5,
                millis: 0,
            },
            LimitReply {
                denied: true,
                value: 0,
                millis: 1500,
            },
        ];
        let eval = evaluate(limits, &replies, false, now());
        let json = serde_json::to_value(denial_body(&cat, "acme", plan, &eval).unwrap()).unwrap();
        assert_eq!(json["status"], 429);
        assert_eq!(json["retry_after_seconds"], 2);
        assert_eq!(json["rate"]["window"], "1s");
        assert!(json["upgrade"]["limit"].is_null(), "Pro has no rate limit");
        let h = ratelimit_headers(&eval);
        assert_eq!(h.retry_after, Some(2));
        // Every header tells the same wait as Retry-After.
        assert_eq!(
            (h.x_limit, h.x_remaining, h.x_reset),
            (Some(10), Some(0), Some(2))
        );
        assert!(h.ratelimit.ends_with(";r=0;t=2"), "{}", h.ratelimit);
    }

    #[test]
    fn a_charge_above_the_burst_is_a_402_without_retry() {
        let cat = catalog();
        let plan = cat.plan("free").unwrap();
        let m = cat.metric("requests").unwrap();
        let limits = limits_for(
            plan,
            &[Charge {
                metric: m,
                amount: 11,
            }],
            now(),
            &Default::default(),
        );
        let replies = [
            LimitReply {
                denied: false,
                value: 5,
                millis: 0,
            },
            LimitReply {
                denied: true,
                value: 10,
                millis: 100,
            },
        ];
        let eval = evaluate(limits, &replies, false, now());
        assert_eq!(eval.outcome.label(), "exceeds_burst");
        let json = serde_json::to_value(denial_body(&cat, "acme", plan, &eval).unwrap()).unwrap();
        assert_eq!(json["status"], 402);
        assert_eq!(json["error"], "charge_exceeds_burst");
        assert!(json.get("retry_after_seconds").is_none());
        assert_eq!(json["rate"]["limit"], 10);
        assert_eq!(
            json["upgrade"]["plan"], "pro",
            "Pro has no rate: it would fit"
        );
        assert_eq!(ratelimit_headers(&eval).retry_after, None);
    }
}
