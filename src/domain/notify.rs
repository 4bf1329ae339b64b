//! Outbound events for the product: their types, their JSON bodies, and the retry schedule of
//! their delivery. Pure: the notifier (`crate::notify`) does the I/O.
//!
//! Bodies follow Standard Webhooks: `{"type", "timestamp", "data"}`. The body is built once,
//! stored in the outbox as it is, and sent unchanged on every attempt under the same
//! `webhook-id`, so a receiver can deduplicate.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::decision::Target;
use super::period::{Period, Window};
use super::plan::{Catalog, Per, Plan};
use super::render::{PlanRef, Upgrade, rfc3339, upgrade_for};

/// The kinds of event (bounded: they label a metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    ThresholdCrossed,
    PlanChanged,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ThresholdCrossed => "usage.threshold_crossed",
            EventType::PlanChanged => "plan.changed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "usage.threshold_crossed" => Some(EventType::ThresholdCrossed),
            "plan.changed" => Some(EventType::PlanChanged),
            _ => None,
        }
    }
}

#[derive(Debug, Serialize)]
struct Body<'a, D: Serialize> {
    #[serde(rename = "type")]
    type_: &'static str,
    timestamp: String,
    data: &'a D,
}

fn body<D: Serialize>(t: EventType, now: DateTime<Utc>, data: &D) -> serde_json::Value {
    serde_json::to_value(Body {
        type_: t.as_str(),
        timestamp: rfc3339(now),
        data,
    })
    .unwrap_or(serde_json::Value::Null)
}

/// One crossed threshold, as the store reported it.
#[derive(Debug, Clone, Copy)]
pub struct Crossed<'a> {
    pub org_id: &'a str,
    pub metric: &'a str,
    /// Counters: the period and its window; `None` for a gauge.
    pub period: Option<(Period, Window)>,
    pub threshold: u16,
    pub current: i64,
    pub limit: u64,
}

#[derive(Debug, Serialize)]
struct ThresholdData<'a> {
    org_id: &'a str,
    metric: &'a str,
    unit: &'a str,
    threshold: u16,
    current: i64,
    limit: u64,
    period: Option<&'static str>,
    period_start: Option<String>,
    resets_at: Option<String>,
    plan: PlanRef<'a>,
    upgrade: Option<Upgrade<'a>>,
}

/// The body of `usage.threshold_crossed` (threshold 100: the limit is reached). `plan` is the
/// org's plan as the notifier sees it when writing the event.
pub fn threshold_crossed(
    catalog: &Catalog,
    plan: &Plan,
    c: &Crossed<'_>,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let target = match c.period {
        Some((period, window)) => Target::Counter { period, window },
        None => Target::Gauge,
    };
    let data = ThresholdData {
        org_id: c.org_id,
        metric: c.metric,
        unit: catalog.metric(c.metric).map_or("", |m| m.unit.as_str()),
        threshold: c.threshold,
        current: c.current,
        limit: c.limit,
        period: c.period.map(|(p, _)| p.as_str()),
        period_start: c.period.map(|(_, w)| rfc3339(w.start)),
        resets_at: c.period.map(|(_, w)| rfc3339(w.end)),
        plan: plan.into(),
        upgrade: upgrade_for(catalog, c.org_id, plan, c.metric, &target, Per::Org),
    };
    body(EventType::ThresholdCrossed, now, &data)
}

#[derive(Debug, Serialize)]
struct PlanChangedData<'a> {
    org_id: &'a str,
    from: Option<&'a str>,
    to: &'a str,
    cause: &'a str,
    event_id: Option<&'a str>,
}

/// The body of `plan.changed`: `cause` is `admin`, or what billing did (see `webhooks::apply`).
pub fn plan_changed(
    org_id: &str,
    from: Option<&str>,
    to: &str,
    cause: &str,
    event_id: Option<&str>,
    now: DateTime<Utc>,
) -> serde_json::Value {
    body(
        EventType::PlanChanged,
        now,
        &PlanChangedData {
            org_id,
            from,
            to,
            cause,
            event_id,
        },
    )
}

/// The retry schedule of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failed attempt.
    pub initial: Duration,
    /// No wait is longer.
    pub max: Duration,
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (1-based): `initial × 2^(attempt-1)`,
    /// capped at `max`, then jittered into its upper half by `jitter` ∈ [0, 1) so that replicas
    /// and receivers recovering together do not retry in lockstep.
    pub fn after(&self, attempt: u32, jitter: f64) -> Duration {
        let doubling = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
        let full = self.initial.saturating_mul(doubling).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        full / 2 + full.mul_f64(jitter / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn backoff_doubles_with_jitter_in_the_upper_half_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        assert_eq!(b.after(1, 0.0), Duration::from_millis(500));
        assert_eq!(b.after(1, 0.999_999).as_millis(), 999);
        assert_eq!(b.after(3, 0.0), Duration::from_secs(2));
        assert_eq!(b.after(40, 0.0), Duration::from_secs(30));
        assert!(b.after(40, 0.99) <= Duration::from_secs(60));
    }

    #[test]
    fn plan_changed_body_names_both_plans_and_the_cause() {
        let now = Utc.with_ymd_and_hms(2026, 12, 3, 9, 0, 0).unwrap();
        let v = plan_changed("acme", Some("free"), "pro", "admin", None, now);
        assert_eq!(v["type"], "plan.changed");
        assert_eq!(v["timestamp"], "2026-12-03T09:00:00Z");
        assert_eq!(v["data"]["from"], "free");
        assert_eq!(v["data"]["to"], "pro");
        assert_eq!(v["data"]["cause"], "admin");
        assert!(v["data"]["event_id"].is_null());
    }

    #[test]
    fn event_types_round_trip() {
        for t in [EventType::ThresholdCrossed, EventType::PlanChanged] {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }
}
