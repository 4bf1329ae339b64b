//! Parsers for senders that sign with the Standard Webhooks scheme: Dodo Payments,
//! Polar, and our own normalized format.
//!
//! These payloads carry no event id of their own; the `webhook-id` header is the
//! spec's idempotency key, so every parser takes it as an argument. Event time is
//! the payload's `timestamp` when present, else `fallback_occurred_at` (the
//! verified `webhook-timestamp`), which is a delivery time and so slightly later
//! than the event, but still monotonic enough for ordering.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::webhooks::credits;
use crate::webhooks::event::{
    Normalized, ParsedEvent, PayloadError, SubscriptionEvent, SubscriptionStatus, lookup_path,
    lookup_value, opt_bool, opt_rfc3339, opt_str, parse_json, req_str,
};

/// Common envelope: `{"type": ..., "timestamp"?: RFC3339, "data": {...}}`.
struct Envelope {
    root: Value,
    event_id: String,
    event_type: String,
    occurred_at: DateTime<Utc>,
}

impl Envelope {
    fn parse(
        webhook_id: &str,
        body: &[u8],
        fallback_occurred_at: DateTime<Utc>,
    ) -> Result<Self, PayloadError> {
        if webhook_id.trim().is_empty() {
            return Err(PayloadError::MissingField("webhook-id"));
        }
        let root = parse_json(body)?;
        let event_type = req_str(&root, "type")?;
        let occurred_at = opt_rfc3339(&root, "timestamp")?.unwrap_or(fallback_occurred_at);
        Ok(Envelope {
            root,
            event_id: webhook_id.to_owned(),
            event_type,
            occurred_at,
        })
    }

    fn data(&self) -> Result<&Value, PayloadError> {
        match lookup_value(&self.root, "data") {
            Some(v @ Value::Object(_)) => Ok(v),
            Some(Value::Null) | None => Err(PayloadError::MissingField("data")),
            Some(_) => Err(PayloadError::InvalidField("data")),
        }
    }

    fn finish(self, normalized: Normalized) -> ParsedEvent {
        ParsedEvent {
            event_id: self.event_id,
            event_type: self.event_type,
            normalized,
        }
    }

    fn ignored(self) -> ParsedEvent {
        let event_type = self.event_type.clone();
        self.finish(Normalized::Ignored { event_type })
    }

    /// A one-time purchase event, read by `parse` (see `webhooks::credits`); ignored when it is
    /// not one (a subscription's payment).
    fn purchase(
        self,
        parse: credits::PurchaseParser,
        org_id_from: &str,
    ) -> Result<ParsedEvent, PayloadError> {
        match parse(
            &self.event_type,
            self.data()?,
            org_id_from,
            self.occurred_at,
        ) {
            Some(n) => Ok(self.finish(n?)),
            None => Ok(self.ignored()),
        }
    }
}

/// (status, terminal) for one event.
type Mapped = (Option<SubscriptionStatus>, bool);

/// Maps a Dodo subscription status string.
///
/// `cancelled` and `expired` are terminal: Dodo has no way to revive either, and a
/// cancellation that is merely scheduled shows up as `cancel_at_next_billing_date`
/// on a still-active subscription instead. `failed` means the mandate was never
/// set up, so the customer never paid: it maps to Canceled (not terminal, in
/// case Dodo retries) rather than PastDue, which would hand out the paid plan for
/// the grace period. `paused` stops billing, so it also loses paid quota but can
/// be resumed. `pending` is not yet paid and changes nothing.
fn dodo_status(s: &str) -> Mapped {
    match s {
        "active" => (Some(SubscriptionStatus::Active), false),
        "on_hold" => (Some(SubscriptionStatus::PastDue), false),
        "failed" | "paused" => (Some(SubscriptionStatus::Canceled), false),
        "cancelled" | "expired" => (Some(SubscriptionStatus::Canceled), true),
        _ => (None, false),
    }
}

/// Parses a verified Dodo Payments webhook.
///
/// Event types decide the status where they are unambiguous (`active`, `renewed`,
/// `plan_changed`, `on_hold`, ...); `subscription.updated` is a catch-all and
/// uses `data.status`. A `subscription.cancelled` whose data still says
/// `active` with `cancel_at_next_billing_date` is treated as a scheduled
/// cancellation, so access is not cut before the paid period ends.
pub fn parse_dodo(
    webhook_id: &str,
    body: &[u8],
    org_id_from: &str,
    fallback_occurred_at: DateTime<Utc>,
) -> Result<ParsedEvent, PayloadError> {
    let env = Envelope::parse(webhook_id, body, fallback_occurred_at)?;
    let by_type: Option<Mapped> = match env.event_type.as_str() {
        "subscription.active" | "subscription.renewed" | "subscription.plan_changed" => {
            Some((Some(SubscriptionStatus::Active), false))
        }
        "subscription.on_hold" => Some((Some(SubscriptionStatus::PastDue), false)),
        "subscription.failed" => Some(dodo_status("failed")),
        "subscription.paused" => Some(dodo_status("paused")),
        "subscription.cancelled" | "subscription.expired" => {
            Some((Some(SubscriptionStatus::Canceled), true))
        }
        "subscription.updated" => None,
        "payment.succeeded" => return env.purchase(credits::dodo_purchase, org_id_from),
        _ => return Ok(env.ignored()),
    };
    let data = env.data()?;
    let subscription_id =
        req_str(data, "subscription_id").map_err(|e| prefix_data(e, "data.subscription_id"))?;
    let cancel_at_period_end = opt_bool(data, "cancel_at_next_billing_date")
        .map_err(|_| PayloadError::InvalidField("data.cancel_at_next_billing_date"))?;
    let data_status = lookup_path(data, "status").unwrap_or_default();

    let (status, terminal) = match by_type {
        Some((Some(SubscriptionStatus::Canceled), true))
            if env.event_type == "subscription.cancelled"
                && data_status == "active"
                && cancel_at_period_end == Some(true) =>
        {
            (Some(SubscriptionStatus::Active), false)
        }
        Some(m) => m,
        None => dodo_status(data_status),
    };

    let event = SubscriptionEvent {
        subscription_id,
        customer_id: opt_str(data, "customer.customer_id"),
        org_id: opt_str(data, org_id_from),
        product_id: opt_str(data, "product_id"),
        status,
        terminal,
        current_period_end: opt_rfc3339(data, "next_billing_date")
            .map_err(|_| PayloadError::InvalidField("data.next_billing_date"))?,
        cancel_at_period_end,
        occurred_at: env.occurred_at,
    };
    Ok(env.finish(Normalized::Subscription(event)))
}

/// Maps a Polar subscription status string. `incomplete` has not been paid yet
/// and changes nothing (same reasoning as Stripe's `incomplete`).
fn polar_status(s: &str) -> Option<SubscriptionStatus> {
    match s {
        "active" => Some(SubscriptionStatus::Active),
        "trialing" => Some(SubscriptionStatus::Trialing),
        "past_due" | "unpaid" => Some(SubscriptionStatus::PastDue),
        "canceled" | "incomplete_expired" => Some(SubscriptionStatus::Canceled),
        _ => None,
    }
}

/// Parses a verified Polar webhook.
///
/// Polar's `subscription.canceled` usually means "cancel at period end" with the
/// status still `active`, so status always comes from `data.status` and the
/// event type only adds what the data cannot say: `revoked` is terminal (access
/// ends now and cannot come back), `uncanceled` clears the scheduled cancellation.
pub fn parse_polar(
    webhook_id: &str,
    body: &[u8],
    org_id_from: &str,
    fallback_occurred_at: DateTime<Utc>,
) -> Result<ParsedEvent, PayloadError> {
    let env = Envelope::parse(webhook_id, body, fallback_occurred_at)?;
    let revoked = match env.event_type.as_str() {
        "subscription.revoked" => true,
        "subscription.created"
        | "subscription.updated"
        | "subscription.active"
        | "subscription.canceled"
        | "subscription.uncanceled"
        | "subscription.past_due" => false,
        "order.paid" => return env.purchase(credits::polar_purchase, org_id_from),
        _ => return Ok(env.ignored()),
    };
    let data = env.data()?;
    let subscription_id = req_str(data, "id").map_err(|e| prefix_data(e, "data.id"))?;

    let (status, terminal) = if revoked {
        (Some(SubscriptionStatus::Canceled), true)
    } else {
        (lookup_path(data, "status").and_then(polar_status), false)
    };
    let cancel_at_period_end = if env.event_type == "subscription.uncanceled" {
        Some(false)
    } else {
        opt_bool(data, "cancel_at_period_end")
            .map_err(|_| PayloadError::InvalidField("data.cancel_at_period_end"))?
    };

    let event = SubscriptionEvent {
        subscription_id,
        customer_id: opt_str(data, "customer_id").or_else(|| opt_str(data, "customer.id")),
        org_id: opt_str(data, org_id_from),
        product_id: opt_str(data, "product_id").or_else(|| opt_str(data, "product.id")),
        status,
        terminal,
        current_period_end: opt_rfc3339(data, "current_period_end")
            .map_err(|_| PayloadError::InvalidField("data.current_period_end"))?,
        cancel_at_period_end,
        occurred_at: env.occurred_at,
    };
    Ok(env.finish(Normalized::Subscription(event)))
}

/// Parses our own normalized format: what a team's own billing code sends when
/// no supported provider fits. Signed with Standard Webhooks (see
/// `crate::webhooks::signature::sign_standard`), with the `webhook-id` header as event id.
///
/// ```json
/// {
///   "type": "subscription.updated",          // or subscription.created / subscription.deleted
///   "timestamp": "2025-05-01T12:00:00Z",     // optional; else the webhook-timestamp header
///   "data": {
///     "subscription_id": "sub_123",          // required
///     "org_id": "org_1",                     // optional if a customer link exists
///     "customer_id": "cust_9",               // optional
///     "product_id": "pro_monthly",           // optional; mapped to a plan by config
///     "status": "active",                    // active | trialing | past_due | canceled;
///                                            // required except for subscription.deleted
///     "current_period_end": "2025-06-01T00:00:00Z", // RFC 3339 or null
///     "cancel_at_period_end": false          // optional
///   }
/// }
/// ```
///
/// `subscription.deleted` is terminal: the subscription can never be revived,
/// send a new `subscription_id` instead. Other types are ignored. Being our own
/// format, it is strict: an unknown status is an error rather than a no-op, so
/// integration bugs surface at once.
///
/// `org_id_from` is only consulted when `data.org_id` is absent, so the same
/// configuration knob works for every provider.
pub fn parse_normalized(
    webhook_id: &str,
    body: &[u8],
    org_id_from: &str,
    fallback_occurred_at: DateTime<Utc>,
) -> Result<ParsedEvent, PayloadError> {
    let env = Envelope::parse(webhook_id, body, fallback_occurred_at)?;
    let deleted = match env.event_type.as_str() {
        "subscription.deleted" => true,
        "subscription.created" | "subscription.updated" => false,
        "credits.granted" => {
            let grant = credits::normalized_grant(env.data()?, org_id_from)?;
            return Ok(env.finish(grant));
        }
        _ => return Ok(env.ignored()),
    };
    let data = env.data()?;
    let subscription_id =
        req_str(data, "subscription_id").map_err(|e| prefix_data(e, "data.subscription_id"))?;
    let status = if deleted {
        SubscriptionStatus::Canceled
    } else {
        let raw = req_str(data, "status").map_err(|e| prefix_data(e, "data.status"))?;
        SubscriptionStatus::parse(&raw).ok_or(PayloadError::InvalidField("data.status"))?
    };

    let event = SubscriptionEvent {
        subscription_id,
        customer_id: opt_str(data, "customer_id"),
        org_id: opt_str(data, "org_id").or_else(|| opt_str(data, org_id_from)),
        product_id: opt_str(data, "product_id"),
        status: Some(status),
        terminal: deleted,
        current_period_end: opt_rfc3339(data, "current_period_end")
            .map_err(|_| PayloadError::InvalidField("data.current_period_end"))?,
        cancel_at_period_end: opt_bool(data, "cancel_at_period_end")
            .map_err(|_| PayloadError::InvalidField("data.cancel_at_period_end"))?,
        occurred_at: env.occurred_at,
    };
    Ok(env.finish(Normalized::Subscription(event)))
}

/// Re-labels an error raised on the `data` object with its full path, so the
/// message points at the right place in the payload.
fn prefix_data(e: PayloadError, full: &'static str) -> PayloadError {
    match e {
        PayloadError::MissingField(_) => PayloadError::MissingField(full),
        PayloadError::InvalidField(_) => PayloadError::InvalidField(full),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ORG: &str = "metadata.org_id";
    const WID: &str = "msg_2xWbUq5Tn8Ue3Q4Cz1aYHbFj0kP";

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn fallback() -> DateTime<Utc> {
        at("2030-01-01T00:00:00Z")
    }

    fn sub(p: ParsedEvent) -> SubscriptionEvent {
        match p.normalized {
            Normalized::Subscription(s) => s,
            other => panic!("expected subscription, got {other:?}"),
        }
    }

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    // ---- Dodo ----

    #[test]
    fn dodo_fixture_active() {
        let p = parse_dodo(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/dodo/subscription.active.json"),
            ORG,
            fallback(),
        )
        .unwrap();
        assert_eq!(p.event_id, WID);
        assert_eq!(p.event_type, "subscription.active");
        let s = sub(p);
        assert_eq!(s.subscription_id, "sub_2IjqBsAgnMHFQEs2sNK2M");
        assert_eq!(s.customer_id.as_deref(), Some("cus_0NHbJH9tIkSp9NTNtWxUx"));
        assert_eq!(s.org_id.as_deref(), Some("org_acme"));
        assert_eq!(s.product_id.as_deref(), Some("pdt_3Bq9QdVsz1lC8yYq0vE8m"));
        assert_eq!(s.status, Some(SubscriptionStatus::Active));
        assert!(!s.terminal);
        assert_eq!(s.current_period_end, Some(at("2025-07-08T10:15:02Z")));
        assert_eq!(s.cancel_at_period_end, Some(false));
        assert_eq!(s.occurred_at, at("2025-06-08T10:15:05.123456Z"));
    }

    #[test]
    fn dodo_fixture_on_hold() {
        let s = sub(parse_dodo(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/dodo/subscription.on_hold.json"),
            ORG,
            fallback(),
        )
        .unwrap());
        assert_eq!(s.status, Some(SubscriptionStatus::PastDue));
        assert!(!s.terminal);
    }

    #[test]
    fn dodo_fixture_cancelled_is_terminal() {
        let s = sub(parse_dodo(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/dodo/subscription.cancelled.json"),
            ORG,
            fallback(),
        )
        .unwrap());
        assert_eq!(s.status, Some(SubscriptionStatus::Canceled));
        assert!(s.terminal);
    }

    #[test]
    fn dodo_fixture_payment_is_ignored() {
        let p = parse_dodo(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/dodo/payment.succeeded.json"),
            ORG,
            fallback(),
        )
        .unwrap();
        assert_eq!(
            p.normalized,
            Normalized::Ignored {
                event_type: "payment.succeeded".into()
            }
        );
    }

    fn dodo_body(ty: &str, status: &str, cancel_next: bool) -> Vec<u8> {
        body(json!({
            "business_id": "bus_1", "type": ty, "timestamp": "2025-06-08T10:15:05Z",
            "data": {"payload_type": "Subscription", "subscription_id": "sub_1", "status": status,
                     "customer": {"customer_id": "cus_1"}, "product_id": "pdt_1",
                     "cancel_at_next_billing_date": cancel_next, "next_billing_date": "2025-07-08T10:15:02Z",
                     "metadata": {"org_id": "org_1"}}
        }))
    }

    #[test]
    fn dodo_type_mapping() {
        use SubscriptionStatus::*;
        let cases = [
            ("subscription.active", "active", Some(Active), false),
            ("subscription.renewed", "active", Some(Active), false),
            ("subscription.plan_changed", "active", Some(Active), false),
            ("subscription.on_hold", "on_hold", Some(PastDue), false),
            ("subscription.failed", "failed", Some(Canceled), false),
            ("subscription.paused", "paused", Some(Canceled), false),
            ("subscription.cancelled", "cancelled", Some(Canceled), true),
            ("subscription.expired", "expired", Some(Canceled), true),
            ("subscription.updated", "active", Some(Active), false),
            ("subscription.updated", "on_hold", Some(PastDue), false),
            ("subscription.updated", "cancelled", Some(Canceled), true),
            ("subscription.updated", "expired", Some(Canceled), true),
            ("subscription.updated", "pending", None, false),
        ];
        for (ty, st, status, terminal) in cases {
            let s = sub(parse_dodo(WID, &dodo_body(ty, st, false), ORG, fallback()).unwrap());
            assert_eq!((s.status, s.terminal), (status, terminal), "{ty}/{st}");
        }
    }

    #[test]
    fn dodo_cancelled_but_still_active_is_scheduled_cancel() {
        let s = sub(parse_dodo(
            WID,
            &dodo_body("subscription.cancelled", "active", true),
            ORG,
            fallback(),
        )
        .unwrap());
        assert_eq!(s.status, Some(SubscriptionStatus::Active));
        assert!(!s.terminal);
        assert_eq!(s.cancel_at_period_end, Some(true));
    }

    #[test]
    fn dodo_missing_fields() {
        let b = body(json!({"type": "subscription.active", "data": {"status": "active"}}));
        assert_eq!(
            parse_dodo(WID, &b, ORG, fallback()),
            Err(PayloadError::MissingField("data.subscription_id"))
        );
        let b = body(json!({"type": "subscription.active"}));
        assert_eq!(
            parse_dodo(WID, &b, ORG, fallback()),
            Err(PayloadError::MissingField("data"))
        );
        let b = body(json!({"data": {}}));
        assert_eq!(
            parse_dodo(WID, &b, ORG, fallback()),
            Err(PayloadError::MissingField("type"))
        );
        assert_eq!(
            parse_dodo(
                "",
                &dodo_body("subscription.active", "active", false),
                ORG,
                fallback()
            ),
            Err(PayloadError::MissingField("webhook-id"))
        );
        let b = body(
            json!({"type": "subscription.active", "timestamp": "yesterday",
                            "data": {"subscription_id": "s"}}),
        );
        assert_eq!(
            parse_dodo(WID, &b, ORG, fallback()),
            Err(PayloadError::InvalidField("timestamp"))
        );
        let b = body(json!({"type": "subscription.active",
                            "data": {"subscription_id": "s", "next_billing_date": 5}}));
        assert_eq!(
            parse_dodo(WID, &b, ORG, fallback()),
            Err(PayloadError::InvalidField("data.next_billing_date"))
        );
    }

    #[test]
    fn dodo_uses_fallback_time_without_timestamp() {
        let b = body(json!({"type": "subscription.renewed", "data": {"subscription_id": "s"}}));
        let s = sub(parse_dodo(WID, &b, ORG, fallback()).unwrap());
        assert_eq!(s.occurred_at, fallback());
        assert_eq!(s.org_id, None);
        assert_eq!(s.cancel_at_period_end, None);
    }

    // ---- Polar ----

    #[test]
    fn polar_fixture_created() {
        let p = parse_polar(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/polar/subscription.created.json"),
            ORG,
            fallback(),
        )
        .unwrap();
        assert_eq!(p.event_type, "subscription.created");
        let s = sub(p);
        assert_eq!(s.subscription_id, "3b6d7f4e-2a1c-4e8b-9f2d-6c5a4b3e2d1f");
        assert_eq!(
            s.customer_id.as_deref(),
            Some("992fae2a-2a17-4b7a-8d9e-e287cf90131b")
        );
        assert_eq!(s.org_id.as_deref(), Some("org_acme"));
        assert_eq!(
            s.product_id.as_deref(),
            Some("d8dd2de1-21b7-4a41-8bc3-ce909c0cfe23")
        );
        assert_eq!(s.status, Some(SubscriptionStatus::Active));
        assert_eq!(s.current_period_end, Some(at("2025-07-08T10:15:02.501Z")));
        assert_eq!(s.cancel_at_period_end, Some(false));
        assert_eq!(s.occurred_at, at("2025-06-08T10:15:03.2Z"));
    }

    #[test]
    fn polar_fixture_canceled_is_cancel_at_period_end() {
        let s = sub(parse_polar(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/polar/subscription.canceled.json"),
            ORG,
            fallback(),
        )
        .unwrap());
        assert_eq!(s.status, Some(SubscriptionStatus::Active));
        assert!(!s.terminal);
        assert_eq!(s.cancel_at_period_end, Some(true));
        assert_eq!(s.current_period_end, Some(at("2025-07-08T10:15:02.501Z")));
    }

    #[test]
    fn polar_fixture_uncanceled_clears_flag() {
        let s = sub(parse_polar(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/polar/subscription.uncanceled.json"),
            ORG,
            fallback(),
        )
        .unwrap());
        assert_eq!(s.status, Some(SubscriptionStatus::Active));
        assert_eq!(s.cancel_at_period_end, Some(false));
    }

    #[test]
    fn polar_fixture_revoked_is_terminal() {
        let p = parse_polar(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/polar/subscription.revoked.json"),
            "customer.external_id",
            fallback(),
        )
        .unwrap();
        let s = sub(p);
        assert_eq!(s.status, Some(SubscriptionStatus::Canceled));
        assert!(s.terminal);
        // org id configured to come from the customer's external id.
        assert_eq!(s.org_id.as_deref(), Some("org_acme_ext"));
    }

    #[test]
    fn polar_fixture_order_is_ignored() {
        let p = parse_polar(
            WID,
            include_bytes!("../../tests/fixtures/webhooks/polar/order.created.json"),
            ORG,
            fallback(),
        )
        .unwrap();
        assert!(
            matches!(p.normalized, Normalized::Ignored { event_type } if event_type == "order.created")
        );
    }

    #[test]
    fn polar_status_mapping_and_fallbacks() {
        use SubscriptionStatus::*;
        for (st, expected) in [
            ("active", Some(Active)),
            ("trialing", Some(Trialing)),
            ("past_due", Some(PastDue)),
            ("unpaid", Some(PastDue)),
            ("canceled", Some(Canceled)),
            ("incomplete_expired", Some(Canceled)),
            ("incomplete", None),
        ] {
            let b = body(json!({"type": "subscription.updated",
                                "data": {"id": "s1", "status": st, "customer": {"id": "c1"},
                                         "product": {"id": "p1"}}}));
            let s = sub(parse_polar(WID, &b, ORG, fallback()).unwrap());
            assert_eq!(s.status, expected, "{st}");
            assert!(!s.terminal);
            assert_eq!(s.customer_id.as_deref(), Some("c1"));
            assert_eq!(s.product_id.as_deref(), Some("p1"));
            assert_eq!(s.occurred_at, fallback());
        }
    }

    #[test]
    fn polar_missing_id() {
        let b = body(json!({"type": "subscription.updated", "data": {"status": "active"}}));
        assert_eq!(
            parse_polar(WID, &b, ORG, fallback()),
            Err(PayloadError::MissingField("data.id"))
        );
    }

    // ---- Our normalized format ----

    fn ours(ty: &str, data: Value) -> Vec<u8> {
        body(json!({"type": ty, "timestamp": "2025-05-01T12:00:00Z", "data": data}))
    }

    #[test]
    fn normalized_updated_round_trip() {
        let b = ours(
            "subscription.updated",
            json!({"subscription_id": "sub_123", "org_id": "org_1", "product_id": "pro_monthly",
                   "status": "past_due", "current_period_end": "2025-06-01T00:00:00Z",
                   "cancel_at_period_end": true}),
        );
        let p = parse_normalized(WID, &b, ORG, fallback()).unwrap();
        assert_eq!(p.event_id, WID);
        assert_eq!(
            sub(p),
            SubscriptionEvent {
                subscription_id: "sub_123".into(),
                customer_id: None,
                org_id: Some("org_1".into()),
                product_id: Some("pro_monthly".into()),
                status: Some(SubscriptionStatus::PastDue),
                terminal: false,
                current_period_end: Some(at("2025-06-01T00:00:00Z")),
                cancel_at_period_end: Some(true),
                occurred_at: at("2025-05-01T12:00:00Z"),
            }
        );
    }

    #[test]
    fn normalized_deleted_is_terminal_without_status() {
        let b = ours(
            "subscription.deleted",
            json!({"subscription_id": "sub_123"}),
        );
        let s = sub(parse_normalized(WID, &b, ORG, fallback()).unwrap());
        assert_eq!(s.status, Some(SubscriptionStatus::Canceled));
        assert!(s.terminal);
    }

    #[test]
    fn normalized_is_strict() {
        let b = ours("subscription.created", json!({"subscription_id": "s"}));
        assert_eq!(
            parse_normalized(WID, &b, ORG, fallback()),
            Err(PayloadError::MissingField("data.status"))
        );
        let b = ours(
            "subscription.created",
            json!({"subscription_id": "s", "status": "paused"}),
        );
        assert_eq!(
            parse_normalized(WID, &b, ORG, fallback()),
            Err(PayloadError::InvalidField("data.status"))
        );
        let b = ours("subscription.created", json!({"status": "active"}));
        assert_eq!(
            parse_normalized(WID, &b, ORG, fallback()),
            Err(PayloadError::MissingField("data.subscription_id"))
        );
        let b = ours(
            "subscription.updated",
            json!({"subscription_id": "s", "status": "active", "cancel_at_period_end": "yes"}),
        );
        assert_eq!(
            parse_normalized(WID, &b, ORG, fallback()),
            Err(PayloadError::InvalidField("data.cancel_at_period_end"))
        );
        let b = ours(
            "subscription.updated",
            json!({"subscription_id": "s", "status": "active", "current_period_end": "June"}),
        );
        assert_eq!(
            parse_normalized(WID, &b, ORG, fallback()),
            Err(PayloadError::InvalidField("data.current_period_end"))
        );
    }

    #[test]
    fn normalized_other_types_ignored_and_org_fallback() {
        let b = ours("invoice.paid", json!({}));
        assert!(matches!(
            parse_normalized(WID, &b, ORG, fallback())
                .unwrap()
                .normalized,
            Normalized::Ignored { .. }
        ));
        let b = body(json!({"type": "subscription.updated",
                            "data": {"subscription_id": "s", "status": "trialing",
                                     "current_period_end": null,
                                     "metadata": {"org_id": "org_meta"}}}));
        let s = sub(parse_normalized(WID, &b, ORG, fallback()).unwrap());
        assert_eq!(s.org_id.as_deref(), Some("org_meta"));
        assert_eq!(s.current_period_end, None);
        assert_eq!(s.occurred_at, fallback());
    }
}
