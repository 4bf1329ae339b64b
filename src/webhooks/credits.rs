//! Credits from billing: one-time purchases and `credits.granted` events become grants.
//!
//! The parsers here read each provider's documented purchase payload and are called by the
//! provider parsers (`stripe`, `standard`) for the event types they name:
//! - Stripe `checkout.session.completed` (and `checkout.session.async_payment_succeeded`) with
//!   `mode: "payment"` and `payment_status` `paid` / `no_payment_required`. Webhooks do not carry
//!   `line_items` unless the session was expanded (a relay may do so), so the prices are read
//!   from `line_items.data[].price.id` (× `quantity`) when present, else from
//!   `metadata.price_id` (× 1), which the checkout code sets.
//! - Polar `order.paid` with `billing_reason: "purchase"` (a one-time product): `product_id`.
//! - Dodo Payments `payment.succeeded` without a `subscription_id`: `product_cart[]`
//!   (`product_id` × `quantity`).
//! - The normalized format's `credits.granted`: `{"grant_id", "org_id", "metric", "amount",
//!   "expires_at"?, "priority"?}`.
//!
//! `grant` makes the grants before the event is recorded (`apply`): a grant's id is derived from
//! the purchase (or is the event's own `grant_id`), so a redelivery, or a delivery that failed
//! after granting, grants nothing twice; and an event is only recorded once its grants exist.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::credit::{self, NewGrant};
use crate::domain::org::OrgId;
use crate::webhooks::BillingProvider;
use crate::webhooks::event::{
    CreditGrantEvent, Normalized, PayloadError, PurchaseEvent, lookup_value, opt_rfc3339, opt_str,
    req_str,
};

/// A provider's purchase parser: (event type, data object, `org_id_from`, event time) → the
/// purchase, or `None` when the event is not a one-time purchase.
pub type PurchaseParser =
    fn(&str, &Value, &str, DateTime<Utc>) -> Option<Result<Normalized, PayloadError>>;

/// Units of one line: a missing quantity is 1; a nonsensical one is the payload's mistake.
fn quantity(item: &Value, path: &'static str) -> Result<i64, PayloadError> {
    match lookup_value(item, "quantity") {
        None | Some(Value::Null) => Ok(1),
        Some(Value::Number(n)) => n
            .as_i64()
            .filter(|q| (1..=1_000_000).contains(q))
            .ok_or(PayloadError::InvalidField(path)),
        Some(_) => Err(PayloadError::InvalidField(path)),
    }
}

/// Stripe: a checkout session event. `None` when it is not a paid one-time purchase (a
/// subscription checkout links a customer instead, see `stripe`).
pub fn stripe_purchase(
    session: &Value,
    org_id_from: &str,
    occurred_at: DateTime<Utc>,
) -> Option<Result<Normalized, PayloadError>> {
    if opt_str(session, "mode").as_deref() != Some("payment") {
        return None;
    }
    let paid = matches!(
        opt_str(session, "payment_status").as_deref(),
        Some("paid" | "no_payment_required")
    );
    if !paid {
        // Paid later, by an asynchronous method: `checkout.session.async_payment_succeeded`.
        return None;
    }
    Some((|| {
        let order_id =
            req_str(session, "id").map_err(|_| PayloadError::MissingField("data.object.id"))?;
        let mut items = Vec::new();
        if let Some(Value::Array(lines)) = lookup_value(session, "line_items.data") {
            for line in lines {
                if let Some(price) = opt_str(line, "price.id") {
                    items.push((
                        price,
                        quantity(line, "data.object.line_items.data.quantity")?,
                    ));
                }
            }
        }
        if items.is_empty()
            && let Some(price) = opt_str(session, "metadata.price_id")
        {
            items.push((price, 1));
        }
        Ok(Normalized::Purchase(PurchaseEvent {
            order_id,
            customer_id: match lookup_value(session, "customer") {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(obj @ Value::Object(_)) => opt_str(obj, "id"),
                _ => None,
            },
            org_id: opt_str(session, org_id_from)
                .or_else(|| opt_str(session, "client_reference_id")),
            items,
            occurred_at,
        }))
    })())
}

/// Polar: `order.paid` for a one-time product. `None` for other types and for subscription
/// orders (the subscription events carry those).
pub fn polar_purchase(
    event_type: &str,
    data: &Value,
    org_id_from: &str,
    occurred_at: DateTime<Utc>,
) -> Option<Result<Normalized, PayloadError>> {
    if event_type != "order.paid" || opt_str(data, "billing_reason").as_deref() != Some("purchase")
    {
        return None;
    }
    Some((|| {
        let order_id = req_str(data, "id").map_err(|_| PayloadError::MissingField("data.id"))?;
        let product = opt_str(data, "product_id").or_else(|| opt_str(data, "product.id"));
        Ok(Normalized::Purchase(PurchaseEvent {
            order_id,
            customer_id: opt_str(data, "customer_id").or_else(|| opt_str(data, "customer.id")),
            org_id: opt_str(data, org_id_from).or_else(|| opt_str(data, "customer.external_id")),
            items: product.into_iter().map(|p| (p, 1)).collect(),
            occurred_at,
        }))
    })())
}

/// Dodo Payments: `payment.succeeded` of a one-time payment (no `subscription_id`).
pub fn dodo_purchase(
    event_type: &str,
    data: &Value,
    org_id_from: &str,
    occurred_at: DateTime<Utc>,
) -> Option<Result<Normalized, PayloadError>> {
    if event_type != "payment.succeeded" || opt_str(data, "subscription_id").is_some() {
        return None;
    }
    Some((|| {
        let order_id = req_str(data, "payment_id")
            .map_err(|_| PayloadError::MissingField("data.payment_id"))?;
        let mut items = Vec::new();
        if let Some(Value::Array(cart)) = lookup_value(data, "product_cart") {
            for line in cart {
                let product = req_str(line, "product_id")
                    .map_err(|_| PayloadError::InvalidField("data.product_cart.product_id"))?;
                items.push((product, quantity(line, "data.product_cart.quantity")?));
            }
        }
        Ok(Normalized::Purchase(PurchaseEvent {
            order_id,
            customer_id: opt_str(data, "customer.customer_id"),
            org_id: opt_str(data, org_id_from),
            items,
            occurred_at,
        }))
    })())
}

/// The normalized format's `credits.granted` (strict, like the rest of that format).
pub fn normalized_grant(data: &Value, org_id_from: &str) -> Result<Normalized, PayloadError> {
    let grant_id = req_str(data, "grant_id").map_err(|e| relabel(e, "data.grant_id"))?;
    let metric = req_str(data, "metric").map_err(|e| relabel(e, "data.metric"))?;
    let amount = match lookup_value(data, "amount") {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or(PayloadError::InvalidField("data.amount"))?,
        None | Some(Value::Null) => return Err(PayloadError::MissingField("data.amount")),
        Some(_) => return Err(PayloadError::InvalidField("data.amount")),
    };
    let priority = match lookup_value(data, "priority") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or(PayloadError::InvalidField("data.priority"))?,
        ),
        Some(_) => return Err(PayloadError::InvalidField("data.priority")),
    };
    Ok(Normalized::CreditGrant(CreditGrantEvent {
        grant_id,
        org_id: opt_str(data, "org_id").or_else(|| opt_str(data, org_id_from)),
        customer_id: opt_str(data, "customer_id"),
        metric,
        amount,
        expires_at: opt_rfc3339(data, "expires_at")
            .map_err(|_| PayloadError::InvalidField("data.expires_at"))?,
        priority,
    }))
}

fn relabel(e: PayloadError, full: &'static str) -> PayloadError {
    match e {
        PayloadError::MissingField(_) => PayloadError::MissingField(full),
        PayloadError::InvalidField(_) => PayloadError::InvalidField(full),
        other => other,
    }
}

/// The grants an event asks for (before the org is known): empty for other events and for
/// purchases of products `grants` does not name.
pub fn grants_of(
    provider: &BillingProvider,
    normalized: &Normalized,
    now: DateTime<Utc>,
) -> Vec<NewGrant> {
    match normalized {
        Normalized::Purchase(p) => p
            .items
            .iter()
            .filter_map(|(product, qty)| {
                let t = provider.grants.get(product)?;
                Some(NewGrant {
                    id: format!(
                        "{}:{}:{}",
                        provider.kind.metric_label(),
                        p.order_id,
                        product
                    ),
                    metric: t.metric.clone(),
                    amount: t.amount.saturating_mul(*qty),
                    priority: t.priority,
                    expires_at: t
                        .expires_in
                        .and_then(|d| chrono::Duration::from_std(d).ok())
                        .map(|d| p.occurred_at.min(now) + d),
                    reason: Some(format!("{} purchase", provider.kind.metric_label())),
                })
            })
            .collect(),
        Normalized::CreditGrant(g) => vec![NewGrant {
            id: g.grant_id.clone(),
            metric: g.metric.clone(),
            amount: g.amount,
            priority: g.priority.unwrap_or(credit::DEFAULT_PRIORITY),
            expires_at: g.expires_at,
            reason: Some("credits.granted".into()),
        }],
        _ => Vec::new(),
    }
}

/// The org and customer an event names, for `grant`.
pub fn target(normalized: &Normalized) -> (Option<&str>, Option<&str>) {
    match normalized {
        Normalized::Purchase(p) => (p.org_id.as_deref(), p.customer_id.as_deref()),
        Normalized::CreditGrant(g) => (g.org_id.as_deref(), g.customer_id.as_deref()),
        _ => (None, None),
    }
}

/// What `grant` did with an event's grants.
#[derive(Debug)]
pub enum Outcome {
    /// Not a credit event, or nothing to grant.
    Nothing,
    /// Granted (or found granted already).
    Granted(OrgId, usize),
    /// No org could be found for the event.
    Unlinked,
    /// The grant is impossible (an unknown metric, an expired or nonsensical grant).
    Invalid(String),
}

/// Make the grants an event asks for, before the event is recorded (see the module docs).
pub async fn grant(
    quota: &crate::quota::QuotaService,
    pool: &sqlx::PgPool,
    provider: &BillingProvider,
    normalized: &Normalized,
    now: DateTime<Utc>,
) -> Result<Outcome, crate::credits::CreditError> {
    let grants = grants_of(provider, normalized, now);
    if grants.is_empty() {
        return Ok(Outcome::Nothing);
    }
    let (org, customer) = target(normalized);
    let org = match (org, customer) {
        (Some(org), _) => Some(org.to_string()),
        (None, Some(customer)) => {
            let mut tx = pool.begin().await.map_err(crate::db::DbError::from)?;
            let found =
                crate::db::billing::customer_org(&mut tx, &provider.kind.key(), customer).await?;
            tx.commit().await.map_err(crate::db::DbError::from)?;
            found
        }
        (None, None) => None,
    };
    let Some(org) = org.and_then(|o| OrgId::parse(&o).ok()) else {
        return Ok(Outcome::Unlinked);
    };
    let source = format!("webhook:{}", provider.kind.key());
    for g in &grants {
        if let Err(e) = g.validate(now) {
            return Ok(Outcome::Invalid(e.to_string()));
        }
        match crate::credits::grant(quota, &org, g, &source).await {
            Ok(_) => {}
            Err(
                e @ (crate::credits::CreditError::Invalid(_)
                | crate::credits::CreditError::UnknownMetric(_)
                | crate::credits::CreditError::GaugeMetric(_)
                | crate::credits::CreditError::Conflict(_)),
            ) => return Ok(Outcome::Invalid(e.to_string())),
            Err(e) => return Err(e),
        }
    }
    Ok(Outcome::Granted(org, grants.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_paid_stripe_payment_checkout_is_a_purchase_and_a_subscription_one_is_not() {
        let s = json!({"id": "cs_1", "mode": "payment", "payment_status": "paid",
            "customer": "cus_1", "metadata": {"org_id": "acme", "price_id": "price_1k"}});
        let Some(Ok(Normalized::Purchase(p))) = stripe_purchase(&s, "metadata.org_id", at()) else {
            panic!("a purchase")
        };
        assert_eq!(p.items, [("price_1k".to_string(), 1)]);
        assert_eq!(p.org_id.as_deref(), Some("acme"));
        let expanded = json!({"id": "cs_2", "mode": "payment", "payment_status": "paid",
            "line_items": {"data": [{"price": {"id": "price_a"}, "quantity": 3}]}});
        let Some(Ok(Normalized::Purchase(p))) = stripe_purchase(&expanded, "metadata.org_id", at())
        else {
            panic!("a purchase")
        };
        assert_eq!(p.items, [("price_a".to_string(), 3)]);
        let sub = json!({"id": "cs_3", "mode": "subscription", "payment_status": "paid"});
        assert!(stripe_purchase(&sub, "metadata.org_id", at()).is_none());
        let unpaid = json!({"id": "cs_4", "mode": "payment", "payment_status": "unpaid"});
        assert!(stripe_purchase(&unpaid, "metadata.org_id", at()).is_none());
    }

    #[test]
    fn polar_and_dodo_one_time_orders_are_purchases() {
        let order = json!({"id": "ord_1", "billing_reason": "purchase", "product_id": "prod_1",
            "customer": {"id": "c1", "external_id": "acme"}, "metadata": {}});
        let Some(Ok(Normalized::Purchase(p))) =
            polar_purchase("order.paid", &order, "metadata.org_id", at())
        else {
            panic!("a purchase")
        };
        assert_eq!(p.org_id.as_deref(), Some("acme"));
        assert_eq!(p.items, [("prod_1".to_string(), 1)]);
        let renewal = json!({"id": "ord_2", "billing_reason": "subscription_cycle"});
        assert!(polar_purchase("order.paid", &renewal, "metadata.org_id", at()).is_none());
        let pay = json!({"payment_id": "pay_1", "subscription_id": null,
            "product_cart": [{"product_id": "p_credits", "quantity": 2}],
            "metadata": {"org_id": "acme"}});
        let Some(Ok(Normalized::Purchase(p))) =
            dodo_purchase("payment.succeeded", &pay, "metadata.org_id", at())
        else {
            panic!("a purchase")
        };
        assert_eq!(p.items, [("p_credits".to_string(), 2)]);
        let sub_pay = json!({"payment_id": "pay_2", "subscription_id": "sub_1"});
        assert!(dodo_purchase("payment.succeeded", &sub_pay, "metadata.org_id", at()).is_none());
    }

    #[test]
    fn the_normalized_grant_is_strict() {
        let ok = json!({"grant_id": "g1", "org_id": "acme", "metric": "tokens", "amount": 5,
            "expires_at": "2027-01-01T00:00:00Z"});
        assert!(matches!(
            normalized_grant(&ok, "metadata.org_id"),
            Ok(Normalized::CreditGrant(_))
        ));
        let bad = json!({"grant_id": "g1", "metric": "tokens", "amount": "5"});
        assert_eq!(
            normalized_grant(&bad, "metadata.org_id"),
            Err(PayloadError::InvalidField("data.amount"))
        );
    }
}
