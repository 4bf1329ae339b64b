//! Stripe event parser.
//!
//! Handles both pre- and post-`2025-03-31.basil` payload shapes, because an
//! account's webhook endpoints can be pinned to either API version and operators
//! rarely control which one.
//!
//! Status mapping (Stripe → ours):
//! - `active` → Active, `trialing` → Trialing
//! - `past_due`, `unpaid` → PastDue (grace applies)
//! - `canceled`, `incomplete_expired` → Canceled
//! - `paused` → Canceled, not terminal: a paused subscription collects no money,
//!   so it must not keep paid quota, but Stripe can resume it with a later update.
//! - `incomplete` → `None` (no status change): the first payment has not gone
//!   through. Mapping it to PastDue would grant the paid plan for the grace period
//!   to someone who never paid; `None` leaves a new subscription unactivated and
//!   an existing one as it was.
//! - anything unknown → `None`, so a new Stripe status cannot wrongly grant or revoke.
//! - `customer.subscription.deleted` → Canceled + terminal whatever the status says.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::webhooks::event::{
    Normalized, ParsedEvent, PayloadError, SubscriptionEvent, SubscriptionStatus, lookup_path,
    lookup_value, opt_bool, opt_str, opt_unix, parse_json, req_str,
};

fn map_status(s: &str) -> Option<SubscriptionStatus> {
    match s {
        "active" => Some(SubscriptionStatus::Active),
        "trialing" => Some(SubscriptionStatus::Trialing),
        "past_due" | "unpaid" => Some(SubscriptionStatus::PastDue),
        "canceled" | "incomplete_expired" | "paused" => Some(SubscriptionStatus::Canceled),
        _ => None,
    }
}

/// Id of a field that Stripe sends either as an id string or, when expanded, as an object.
fn expandable_id(v: &Value, path: &str) -> Option<String> {
    match lookup_value(v, path)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        obj @ Value::Object(_) => opt_str(obj, "id"),
        _ => None,
    }
}

/// Parses a verified Stripe event body.
///
/// `org_id_from` is a dotted path evaluated on the event's data object
/// (subscription, checkout session or invoice), e.g. `metadata.org_id` or
/// `client_reference_id`.
pub fn parse(body: &[u8], org_id_from: &str) -> Result<ParsedEvent, PayloadError> {
    let root = parse_json(body)?;
    let event_id = req_str(&root, "id")?;
    let event_type = req_str(&root, "type")?;
    let occurred_at = opt_unix(&root, "created")?.ok_or(PayloadError::MissingField("created"))?;

    let normalized = match event_type.as_str() {
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            let obj = data_object(&root)?;
            let deleted = event_type == "customer.subscription.deleted";
            Normalized::Subscription(subscription_event(obj, org_id_from, deleted, occurred_at)?)
        }
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let session = data_object(&root)?;
            match crate::webhooks::credits::stripe_purchase(session, org_id_from, occurred_at) {
                Some(purchase) => purchase?,
                None if event_type == "checkout.session.completed" => {
                    checkout_link(session, org_id_from, occurred_at).unwrap_or_else(|| {
                        Normalized::Ignored {
                            event_type: event_type.clone(),
                        }
                    })
                }
                None => Normalized::Ignored {
                    event_type: event_type.clone(),
                },
            }
        }
        "invoice.paid" | "invoice.payment_failed" => {
            let status = if event_type == "invoice.paid" {
                SubscriptionStatus::Active
            } else {
                SubscriptionStatus::PastDue
            };
            invoice_event(data_object(&root)?, org_id_from, status, occurred_at).unwrap_or_else(
                || Normalized::Ignored {
                    event_type: event_type.clone(),
                },
            )
        }
        _ => Normalized::Ignored {
            event_type: event_type.clone(),
        },
    };
    Ok(ParsedEvent {
        event_id,
        event_type,
        normalized,
    })
}

fn data_object(root: &Value) -> Result<&Value, PayloadError> {
    match lookup_value(root, "data.object") {
        Some(v @ Value::Object(_)) => Ok(v),
        Some(Value::Null) | None => Err(PayloadError::MissingField("data.object")),
        Some(_) => Err(PayloadError::InvalidField("data.object")),
    }
}

fn subscription_event(
    sub: &Value,
    org_id_from: &str,
    deleted: bool,
    occurred_at: DateTime<Utc>,
) -> Result<SubscriptionEvent, PayloadError> {
    let subscription_id = req_str(sub, "id").map_err(|e| match e {
        PayloadError::MissingField(_) => PayloadError::MissingField("data.object.id"),
        _ => PayloadError::InvalidField("data.object.id"),
    })?;
    let status = if deleted {
        Some(SubscriptionStatus::Canceled)
    } else {
        lookup_path(sub, "status").and_then(map_status)
    };

    // Basil moved the period onto each item; older versions keep it on the subscription.
    let period_end = match opt_unix(sub, "current_period_end")? {
        Some(t) => Some(t),
        None => opt_unix(sub, "items.data.0.current_period_end")?,
    };
    let mut cancel_at_period_end = opt_bool(sub, "cancel_at_period_end")?;
    let mut current_period_end = period_end;
    // Newer dashboards schedule cancellations with `cancel_at` instead of the flag.
    // If it falls within the current period it is the same thing, ending earlier;
    // a later `cancel_at` means the subscription still renews at least once.
    let cancel_at = opt_unix(sub, "cancel_at")?;
    if let Some(cancel_at) = cancel_at.filter(|c| period_end.is_none_or(|end| *c <= end)) {
        cancel_at_period_end = Some(true);
        current_period_end = Some(cancel_at);
    }

    Ok(SubscriptionEvent {
        subscription_id,
        customer_id: expandable_id(sub, "customer"),
        org_id: opt_str(sub, org_id_from),
        product_id: opt_str(sub, "items.data.0.price.id").or_else(|| opt_str(sub, "plan.id")),
        status,
        terminal: deleted,
        current_period_end,
        cancel_at_period_end,
        occurred_at,
    })
}

/// `None` when the session cannot link anything (no customer, or not one of our
/// checkouts because the org id is absent); such events are acknowledged and ignored.
fn checkout_link(
    session: &Value,
    org_id_from: &str,
    occurred_at: DateTime<Utc>,
) -> Option<Normalized> {
    Some(Normalized::CustomerLink {
        customer_id: expandable_id(session, "customer")?,
        org_id: opt_str(session, org_id_from)?,
        subscription_id: expandable_id(session, "subscription"),
        occurred_at,
    })
}

/// `None` for invoices that belong to no subscription (one-off invoices).
///
/// Only status is reported: product, period and the cancel flag are left `None`
/// so they do not overwrite what subscription events stored.
fn invoice_event(
    invoice: &Value,
    org_id_from: &str,
    status: SubscriptionStatus,
    occurred_at: DateTime<Utc>,
) -> Option<Normalized> {
    let subscription_id = expandable_id(invoice, "subscription")
        .or_else(|| expandable_id(invoice, "parent.subscription_details.subscription"))?;
    let org_id = opt_str(invoice, org_id_from)
        .or_else(|| {
            lookup_value(invoice, "parent.subscription_details")
                .and_then(|d| opt_str(d, org_id_from))
        })
        .or_else(|| {
            lookup_value(invoice, "subscription_details").and_then(|d| opt_str(d, org_id_from))
        });
    Some(Normalized::Subscription(SubscriptionEvent {
        subscription_id,
        customer_id: expandable_id(invoice, "customer"),
        org_id,
        product_id: None,
        status: Some(status),
        terminal: false,
        current_period_end: None,
        cancel_at_period_end: None,
        occurred_at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ORG: &str = "metadata.org_id";

    fn ts(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    fn sub_event(p: ParsedEvent) -> SubscriptionEvent {
        match p.normalized {
            Normalized::Subscription(s) => s,
            other => panic!("expected subscription, got {other:?}"),
        }
    }

    fn event(ty: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "id": "evt_test", "object": "event", "type": ty, "created": 1_700_000_000,
            "data": {"object": object}
        }))
        .unwrap()
    }

    #[test]
    fn fixture_subscription_updated_basil_shape() {
        let p = parse(
            include_bytes!(
                "../../tests/fixtures/webhooks/stripe/customer.subscription.updated.json"
            ),
            ORG,
        )
        .unwrap();
        assert_eq!(p.event_id, "evt_1RQmaBQxu7lNeOGtWVxEFDdG");
        assert_eq!(p.event_type, "customer.subscription.updated");
        let s = sub_event(p);
        assert_eq!(s.subscription_id, "sub_1RQmZyQxu7lNeOGtEBsBLdgd");
        assert_eq!(s.customer_id.as_deref(), Some("cus_SLTUXsrP3XAm5X"));
        assert_eq!(s.org_id.as_deref(), Some("org_acme"));
        assert_eq!(
            s.product_id.as_deref(),
            Some("price_1RQmYdQxu7lNeOGtPro0Mnth")
        );
        assert_eq!(s.status, Some(SubscriptionStatus::Active));
        assert!(!s.terminal);
        // Period end read from items.data[0] (no top-level field in basil).
        assert_eq!(s.current_period_end, Some(ts(1_750_281_318)));
        assert_eq!(s.cancel_at_period_end, Some(true));
        assert_eq!(s.occurred_at, ts(1_747_689_331));
    }

    #[test]
    fn fixture_subscription_deleted_legacy_shape() {
        let p = parse(
            include_bytes!(
                "../../tests/fixtures/webhooks/stripe/customer.subscription.deleted.json"
            ),
            ORG,
        )
        .unwrap();
        let s = sub_event(p);
        assert_eq!(s.status, Some(SubscriptionStatus::Canceled));
        assert!(s.terminal);
        assert_eq!(s.org_id.as_deref(), Some("org_acme"));
        // Legacy top-level current_period_end.
        assert_eq!(s.current_period_end, Some(ts(1_712_000_000)));
        assert_eq!(s.product_id.as_deref(), Some("price_1OrgPro0Legacy"));
    }

    #[test]
    fn fixture_checkout_session_completed() {
        let p = parse(
            include_bytes!("../../tests/fixtures/webhooks/stripe/checkout.session.completed.json"),
            ORG,
        )
        .unwrap();
        assert_eq!(
            p.normalized,
            Normalized::CustomerLink {
                customer_id: "cus_SLTUXsrP3XAm5X".into(),
                org_id: "org_acme".into(),
                subscription_id: Some("sub_1RQmZyQxu7lNeOGtEBsBLdgd".into()),
                occurred_at: ts(1_747_689_320),
            }
        );
        // The operator may keep the org id elsewhere on the session.
        let p = parse(
            include_bytes!("../../tests/fixtures/webhooks/stripe/checkout.session.completed.json"),
            "client_reference_id",
        )
        .unwrap();
        assert!(
            matches!(p.normalized, Normalized::CustomerLink { org_id, .. } if org_id == "org_acme_ref")
        );
    }

    #[test]
    fn fixture_invoice_payment_failed_basil_parent() {
        let p = parse(
            include_bytes!("../../tests/fixtures/webhooks/stripe/invoice.payment_failed.json"),
            ORG,
        )
        .unwrap();
        let s = sub_event(p);
        assert_eq!(s.subscription_id, "sub_1RQmZyQxu7lNeOGtEBsBLdgd");
        assert_eq!(s.status, Some(SubscriptionStatus::PastDue));
        // Org id found on parent.subscription_details.metadata.
        assert_eq!(s.org_id.as_deref(), Some("org_acme"));
        assert_eq!(s.customer_id.as_deref(), Some("cus_SLTUXsrP3XAm5X"));
        assert_eq!(s.product_id, None);
        assert_eq!(s.current_period_end, None);
        assert_eq!(s.cancel_at_period_end, None);
    }

    #[test]
    fn fixture_invoice_paid_legacy_subscription_field() {
        let p = parse(
            include_bytes!("../../tests/fixtures/webhooks/stripe/invoice.paid.json"),
            ORG,
        )
        .unwrap();
        let s = sub_event(p);
        assert_eq!(s.subscription_id, "sub_1OrgLegacy0000000000000");
        assert_eq!(s.status, Some(SubscriptionStatus::Active));
        // Org id found on the legacy subscription_details.metadata.
        assert_eq!(s.org_id.as_deref(), Some("org_legacy"));
    }

    #[test]
    fn fixture_unhandled_event_is_ignored() {
        let p = parse(
            include_bytes!("../../tests/fixtures/webhooks/stripe/customer.created.json"),
            ORG,
        )
        .unwrap();
        assert_eq!(
            p.normalized,
            Normalized::Ignored {
                event_type: "customer.created".into()
            }
        );
    }

    #[test]
    fn status_mapping() {
        let cases = [
            ("active", Some(SubscriptionStatus::Active)),
            ("trialing", Some(SubscriptionStatus::Trialing)),
            ("past_due", Some(SubscriptionStatus::PastDue)),
            ("unpaid", Some(SubscriptionStatus::PastDue)),
            ("canceled", Some(SubscriptionStatus::Canceled)),
            ("incomplete_expired", Some(SubscriptionStatus::Canceled)),
            ("paused", Some(SubscriptionStatus::Canceled)),
            ("incomplete", None),
            ("something_new", None),
        ];
        for (stripe, ours) in cases {
            let body = event(
                "customer.subscription.updated",
                json!({"id": "sub_1", "status": stripe}),
            );
            let s = sub_event(parse(&body, ORG).unwrap());
            assert_eq!(s.status, ours, "{stripe}");
            assert!(!s.terminal);
        }
    }

    #[test]
    fn deleted_is_terminal_even_if_status_says_active() {
        let body = event(
            "customer.subscription.deleted",
            json!({"id": "sub_1", "status": "active"}),
        );
        let s = sub_event(parse(&body, ORG).unwrap());
        assert_eq!(s.status, Some(SubscriptionStatus::Canceled));
        assert!(s.terminal);
    }

    #[test]
    fn cancel_at_within_period_counts_as_cancel_at_period_end() {
        let body = event(
            "customer.subscription.updated",
            json!({"id": "sub_1", "status": "active", "cancel_at_period_end": false,
                   "cancel_at": 1_700_500_000,
                   "items": {"data": [{"current_period_end": 1_701_000_000, "price": {"id": "price_1"}}]}}),
        );
        let s = sub_event(parse(&body, ORG).unwrap());
        assert_eq!(s.cancel_at_period_end, Some(true));
        assert_eq!(s.current_period_end, Some(ts(1_700_500_000)));

        // A cancel_at after this period: it still renews, so nothing is scheduled yet.
        let body = event(
            "customer.subscription.updated",
            json!({"id": "sub_1", "status": "active", "cancel_at_period_end": false,
                   "cancel_at": 1_800_000_000, "current_period_end": 1_701_000_000}),
        );
        let s = sub_event(parse(&body, ORG).unwrap());
        assert_eq!(s.cancel_at_period_end, Some(false));
        assert_eq!(s.current_period_end, Some(ts(1_701_000_000)));
    }

    #[test]
    fn expanded_customer_and_plan_fallback() {
        let body = event(
            "customer.subscription.created",
            json!({"id": "sub_1", "status": "trialing", "customer": {"id": "cus_9", "object": "customer"},
                   "plan": {"id": "price_plan"}}),
        );
        let s = sub_event(parse(&body, ORG).unwrap());
        assert_eq!(s.customer_id.as_deref(), Some("cus_9"));
        assert_eq!(s.product_id.as_deref(), Some("price_plan"));
        assert_eq!(s.org_id, None);
    }

    #[test]
    fn checkout_without_org_or_customer_is_ignored() {
        let body = event(
            "checkout.session.completed",
            json!({"id": "cs_1", "customer": "cus_1", "metadata": {}}),
        );
        assert!(matches!(
            parse(&body, ORG).unwrap().normalized,
            Normalized::Ignored { .. }
        ));
        let body = event(
            "checkout.session.completed",
            json!({"id": "cs_1", "customer": null, "metadata": {"org_id": "org_1"}}),
        );
        assert!(matches!(
            parse(&body, ORG).unwrap().normalized,
            Normalized::Ignored { .. }
        ));
    }

    #[test]
    fn invoice_without_subscription_is_ignored() {
        let body = event(
            "invoice.paid",
            json!({"id": "in_1", "customer": "cus_1", "subscription": null, "parent": null}),
        );
        assert!(matches!(
            parse(&body, ORG).unwrap().normalized,
            Normalized::Ignored { .. }
        ));
    }

    #[test]
    fn invoice_org_id_on_invoice_itself_wins() {
        let body = event(
            "invoice.payment_failed",
            json!({"id": "in_1", "subscription": "sub_1", "metadata": {"org_id": "org_inv"},
                   "subscription_details": {"metadata": {"org_id": "org_sub"}}}),
        );
        let s = sub_event(parse(&body, ORG).unwrap());
        assert_eq!(s.org_id.as_deref(), Some("org_inv"));
    }

    #[test]
    fn malformed_payloads_name_the_field() {
        assert!(matches!(
            parse(b"not json", ORG),
            Err(PayloadError::InvalidJson { .. })
        ));
        assert_eq!(
            parse(br#"{"type":"x","created":1}"#, ORG),
            Err(PayloadError::MissingField("id"))
        );
        assert_eq!(
            parse(br#"{"id":"evt","created":1}"#, ORG),
            Err(PayloadError::MissingField("type"))
        );
        assert_eq!(
            parse(br#"{"id":"evt","type":"x"}"#, ORG),
            Err(PayloadError::MissingField("created"))
        );
        assert_eq!(
            parse(br#"{"id":"evt","type":"x","created":"yesterday"}"#, ORG),
            Err(PayloadError::InvalidField("created"))
        );
        assert_eq!(
            parse(
                br#"{"id":"evt","type":"customer.subscription.updated","created":1,"data":{}}"#,
                ORG
            ),
            Err(PayloadError::MissingField("data.object"))
        );
        assert_eq!(
            parse(
                &event("customer.subscription.updated", json!({"status": "active"})),
                ORG
            ),
            Err(PayloadError::MissingField("data.object.id"))
        );
        assert_eq!(
            parse(
                &event(
                    "customer.subscription.updated",
                    json!({"id": "sub_1", "current_period_end": "soon"})
                ),
                ORG
            ),
            Err(PayloadError::InvalidField("current_period_end"))
        );
    }
}
