//! Subscription lifecycle rules, kept free of I/O and of the clock so every
//! boundary can be tested exactly. The caller supplies `now` and persists the
//! result.
//!
//! Two questions are answered here:
//! 1. [`ordering`]: should an incoming event be applied at all? Providers retry
//!    and deliver out of order, so the newest applied event time is stored and
//!    compared.
//! 2. [`effective_plan`]: which plan does an org get right now, and when must a
//!    background job look again (period end, grace expiry)? Downgrades happen
//!    on that schedule rather than on a webhook, because providers do not always
//!    send an event at the exact moment access should end.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// The four states the quota logic distinguishes. Provider vocabularies are
/// larger; each parser documents how it folds them into these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    Trialing,
    PastDue,
    Canceled,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
        }
    }

    /// Parses our own spelling (the serde names); providers' spellings are mapped
    /// in their parsers because their sets differ.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(SubscriptionStatus::Active),
            "trialing" => Some(SubscriptionStatus::Trialing),
            "past_due" => Some(SubscriptionStatus::PastDue),
            "canceled" => Some(SubscriptionStatus::Canceled),
            _ => None,
        }
    }
}

/// What the gateway remembers about one provider subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// The paid plan the product maps to; `None` if the product is not mapped, in
    /// which case even an active subscription yields the default plan.
    pub plan_if_active: Option<String>,
    pub status: SubscriptionStatus,
    pub terminal: bool,
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    /// When the current status was entered; the past-due grace period counts from here,
    /// so it must not be reset by repeated past-due events.
    pub status_since: DateTime<Utc>,
    /// `occurred_at` of the newest event applied so far.
    pub last_event_at: DateTime<Utc>,
}

/// Verdict on an incoming event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    Apply,
    /// Strictly older than the newest applied event: a late retry or reordering.
    Stale,
    /// The subscription already ended for good; a non-terminal event cannot revive it.
    AfterTerminal,
}

/// Decides whether an event may be applied on top of `stored`.
///
/// An event with the same `occurred_at` as the last applied one is applied.
/// Stripe timestamps have one-second resolution, so two different events in the
/// same second cannot be ordered; refusing them would drop real changes (e.g.
/// `invoice.paid` right after `customer.subscription.updated`). The residual risk
/// is that two same-second events arriving in reverse order leave the older one's
/// state; the terminal rule below limits the damage for cancellations, and the
/// next event for the subscription corrects anything else.
///
/// A strictly older event never applies, even a terminal one: its information is
/// superseded by what was applied since.
pub fn ordering(
    stored: Option<&StoredSubscription>,
    incoming_occurred_at: DateTime<Utc>,
    incoming_terminal: bool,
) -> Ordering {
    let Some(s) = stored else {
        return Ordering::Apply;
    };
    if incoming_occurred_at < s.last_event_at {
        Ordering::Stale
    } else if s.terminal && !incoming_terminal {
        Ordering::AfterTerminal
    } else {
        Ordering::Apply
    }
}

/// The plan in force and when it may next change without any new event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub plan: String,
    /// When the job must re-evaluate; `None` if only a new event can change the plan.
    pub next_change_at: Option<DateTime<Utc>>,
}

/// Computes the plan an org gets at `now`.
///
/// - canceled or terminal → `default_plan` immediately;
/// - active / trialing → the paid plan; with `cancel_at_period_end` only until
///   `current_period_end` (exclusive: at that instant the default applies);
/// - past due → the paid plan until `status_since + grace` (exclusive), so a
///   failed card does not cut access before the provider's retries had a chance.
///
/// A scheduled cancellation also bounds the past-due grace: access never outlives
/// the period the customer cancelled at.
///
/// A cancellation with no known period end keeps the paid plan: the provider's
/// final cancel/delete event will end it, and guessing a date could cut off a
/// paying customer.
pub fn effective_plan(
    s: &StoredSubscription,
    default_plan: &str,
    grace: Duration,
    now: DateTime<Utc>,
) -> Effective {
    let default = || Effective {
        plan: default_plan.to_owned(),
        next_change_at: None,
    };
    if s.terminal || s.status == SubscriptionStatus::Canceled {
        return default();
    }

    let period_deadline = if s.cancel_at_period_end {
        s.current_period_end
    } else {
        None
    };
    let grace_deadline = match s.status {
        // Overflow means a grace so long it never ends.
        SubscriptionStatus::PastDue => s
            .status_since
            .checked_add_signed(grace.max(Duration::zero())),
        _ => None,
    };
    let deadline = match (period_deadline, grace_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };

    match deadline {
        Some(d) if now >= d => default(),
        next_change_at => Effective {
            plan: s
                .plan_if_active
                .clone()
                .unwrap_or_else(|| default_plan.to_owned()),
            next_change_at,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    fn stored(status: SubscriptionStatus) -> StoredSubscription {
        StoredSubscription {
            plan_if_active: Some("pro".into()),
            status,
            terminal: false,
            current_period_end: Some(t(10_000)),
            cancel_at_period_end: false,
            status_since: t(1_000),
            last_event_at: t(1_000),
        }
    }

    const GRACE: i64 = 3_600;

    fn eff(s: &StoredSubscription, now: i64) -> Effective {
        effective_plan(s, "free", Duration::seconds(GRACE), t(now))
    }

    fn plan(p: &str, next: Option<i64>) -> Effective {
        Effective {
            plan: p.into(),
            next_change_at: next.map(t),
        }
    }

    // ---- ordering ----

    #[test]
    fn first_event_applies() {
        assert_eq!(ordering(None, t(5), false), Ordering::Apply);
        assert_eq!(ordering(None, t(5), true), Ordering::Apply);
    }

    #[test]
    fn older_event_is_stale() {
        let s = stored(SubscriptionStatus::Active);
        assert_eq!(ordering(Some(&s), t(999), false), Ordering::Stale);
        assert_eq!(ordering(Some(&s), t(999), true), Ordering::Stale);
    }

    #[test]
    fn same_second_applies() {
        let s = stored(SubscriptionStatus::Active);
        assert_eq!(ordering(Some(&s), t(1_000), false), Ordering::Apply);
    }

    #[test]
    fn newer_event_applies() {
        let s = stored(SubscriptionStatus::Active);
        assert_eq!(ordering(Some(&s), t(1_001), false), Ordering::Apply);
    }

    #[test]
    fn nothing_unterminates() {
        let mut s = stored(SubscriptionStatus::Canceled);
        s.terminal = true;
        assert_eq!(ordering(Some(&s), t(2_000), false), Ordering::AfterTerminal);
        assert_eq!(ordering(Some(&s), t(1_000), false), Ordering::AfterTerminal);
        // A repeated terminal event (e.g. a redelivery) is harmless to apply.
        assert_eq!(ordering(Some(&s), t(2_000), true), Ordering::Apply);
        // Staleness is judged first.
        assert_eq!(ordering(Some(&s), t(10), false), Ordering::Stale);
    }

    // ---- effective_plan ----

    #[test]
    fn active_and_trialing_get_paid_plan() {
        assert_eq!(
            eff(&stored(SubscriptionStatus::Active), 5_000),
            plan("pro", None)
        );
        assert_eq!(
            eff(&stored(SubscriptionStatus::Trialing), 5_000),
            plan("pro", None)
        );
        // Active past its period end without cancellation: renewal is the provider's
        // job, and a failed renewal arrives as past_due.
        assert_eq!(
            eff(&stored(SubscriptionStatus::Active), 20_000),
            plan("pro", None)
        );
    }

    #[test]
    fn unmapped_product_gets_default() {
        let mut s = stored(SubscriptionStatus::Active);
        s.plan_if_active = None;
        assert_eq!(eff(&s, 5_000), plan("free", None));
    }

    #[test]
    fn cancel_at_period_end_boundaries() {
        let mut s = stored(SubscriptionStatus::Active);
        s.cancel_at_period_end = true;
        assert_eq!(eff(&s, 9_999), plan("pro", Some(10_000)));
        assert_eq!(eff(&s, 10_000), plan("free", None));
        assert_eq!(eff(&s, 10_001), plan("free", None));
        s.status = SubscriptionStatus::Trialing;
        assert_eq!(eff(&s, 9_999), plan("pro", Some(10_000)));
        assert_eq!(eff(&s, 10_000), plan("free", None));
    }

    #[test]
    fn cancel_at_period_end_without_period_keeps_plan() {
        let mut s = stored(SubscriptionStatus::Active);
        s.cancel_at_period_end = true;
        s.current_period_end = None;
        assert_eq!(eff(&s, 50_000), plan("pro", None));
    }

    #[test]
    fn canceled_or_terminal_is_default_now() {
        let s = stored(SubscriptionStatus::Canceled);
        assert_eq!(eff(&s, 1_000), plan("free", None));
        // Terminal wins even if a status field still says active.
        let mut s = stored(SubscriptionStatus::Active);
        s.terminal = true;
        assert_eq!(eff(&s, 1_000), plan("free", None));
    }

    #[test]
    fn past_due_grace_boundaries() {
        let s = stored(SubscriptionStatus::PastDue);
        let expiry = 1_000 + GRACE;
        assert_eq!(eff(&s, 1_000), plan("pro", Some(expiry)));
        assert_eq!(eff(&s, expiry - 1), plan("pro", Some(expiry)));
        assert_eq!(eff(&s, expiry), plan("free", None));
        assert_eq!(eff(&s, expiry + 1), plan("free", None));
    }

    #[test]
    fn past_due_with_scheduled_cancel_ends_at_earlier_deadline() {
        let mut s = stored(SubscriptionStatus::PastDue);
        s.cancel_at_period_end = true;
        s.current_period_end = Some(t(2_000));
        assert_eq!(eff(&s, 1_500), plan("pro", Some(2_000)));
        assert_eq!(eff(&s, 2_000), plan("free", None));
        // Grace shorter than the remaining period: grace wins.
        s.current_period_end = Some(t(100_000));
        assert_eq!(eff(&s, 1_500), plan("pro", Some(1_000 + GRACE)));
    }

    #[test]
    fn zero_negative_and_huge_grace() {
        let s = stored(SubscriptionStatus::PastDue);
        assert_eq!(
            effective_plan(&s, "free", Duration::zero(), t(1_000)),
            plan("free", None)
        );
        assert_eq!(
            effective_plan(&s, "free", Duration::seconds(-50), t(1_000)),
            plan("free", None)
        );
        // Must not panic on overflow.
        assert_eq!(
            effective_plan(&s, "free", Duration::MAX, t(1_000)).plan,
            "pro"
        );
    }
}
