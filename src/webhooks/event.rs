//! Provider-independent view of billing webhooks.
//!
//! Each provider parser reduces its payload to [`ParsedEvent`], so the lifecycle
//! rules in `subscription` and the storage layer never see provider JSON.
//!
//! Convention for [`SubscriptionEvent`]: an `Option` field that is `None` means
//! "this event does not say", not "clear it". Invoice events, for instance, know
//! the subscription's payment state but not its product or period, and must not
//! wipe what an earlier `subscription.updated` stored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::domain::subscription::SubscriptionStatus;

/// A change to one subscription, as far as the event tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionEvent {
    pub subscription_id: String,
    pub customer_id: Option<String>,
    /// Found via the configured `org_id_from` path (e.g. `metadata.org_id`). When
    /// absent, the caller resolves the org through an earlier customer link.
    pub org_id: Option<String>,
    /// Stripe: price id of the first item; Dodo: `product_id`; Polar: `product_id` / `product.id`.
    pub product_id: Option<String>,
    /// `None`: the event does not change the status (e.g. Stripe `incomplete`).
    pub status: Option<SubscriptionStatus>,
    /// Deleted / expired / revoked: nothing later may undo it.
    pub terminal: bool,
    pub current_period_end: Option<DateTime<Utc>>,
    /// `None` when the event does not carry the flag (invoice events), so a stored
    /// "cancel at period end" is not silently cleared.
    pub cancel_at_period_end: Option<bool>,
    /// When the provider created the event; the ordering rules compare this.
    pub occurred_at: DateTime<Utc>,
}

/// What a webhook means for the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Normalized {
    Subscription(SubscriptionEvent),
    /// A checkout tied a provider customer to one of our orgs; later subscription
    /// events without org metadata are routed through this link.
    CustomerLink {
        customer_id: String,
        org_id: String,
        subscription_id: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    /// Authentic but irrelevant; acknowledged so the provider stops retrying.
    Ignored {
        event_type: String,
    },
    /// A paid one-time purchase: credits when its products are in `grants` (see `credits`).
    Purchase(PurchaseEvent),
    /// Credits granted by the team's own billing (`credits.granted`, normalized format).
    CreditGrant(CreditGrantEvent),
}

/// A paid one-time purchase (Stripe payment-mode checkout, Polar order, Dodo payment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseEvent {
    /// The provider's id of the purchase (checkout session, order, payment): with the product,
    /// the grant's id, so a purchase grants once however often it is delivered.
    pub order_id: String,
    pub customer_id: Option<String>,
    pub org_id: Option<String>,
    /// (price or product id, quantity).
    pub items: Vec<(String, i64)>,
    pub occurred_at: DateTime<Utc>,
}

/// `credits.granted` of the normalized format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditGrantEvent {
    pub grant_id: String,
    pub org_id: Option<String>,
    pub customer_id: Option<String>,
    pub metric: String,
    pub amount: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedEvent {
    /// Deduplication key: Stripe `evt_...`, or the `webhook-id` header for Standard Webhooks.
    pub event_id: String,
    pub event_type: String,
    pub normalized: Normalized,
}

impl ParsedEvent {
    /// Whether every string the event carries can be stored as Postgres text (no NUL, no other
    /// control character). A verified event that fails this is answered `invalid`, not retried.
    pub fn is_storable(&self) -> bool {
        let ok = |s: &str| crate::domain::text::is_storable(s);
        let opt = |s: &Option<String>| s.as_deref().is_none_or(ok);
        ok(&self.event_id)
            && ok(&self.event_type)
            && match &self.normalized {
                Normalized::Subscription(ev) => {
                    ok(&ev.subscription_id)
                        && opt(&ev.customer_id)
                        && opt(&ev.org_id)
                        && opt(&ev.product_id)
                }
                Normalized::CustomerLink {
                    customer_id,
                    org_id,
                    subscription_id,
                    ..
                } => ok(customer_id) && ok(org_id) && opt(subscription_id),
                Normalized::Ignored { event_type } => ok(event_type),
                Normalized::Purchase(p) => {
                    ok(&p.order_id)
                        && opt(&p.customer_id)
                        && opt(&p.org_id)
                        && p.items.iter().all(|(id, _)| ok(id))
                }
                Normalized::CreditGrant(g) => {
                    ok(&g.grant_id) && opt(&g.org_id) && opt(&g.customer_id) && ok(&g.metric)
                }
            }
    }
}

/// Why a verified body could not be understood.
///
/// Field names are static paths into the payload; values are never echoed, since
/// payloads carry customer data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Position only: serde_json's message could quote payload text.
    #[error("body is not valid JSON (line {line}, column {column})")]
    InvalidJson { line: usize, column: usize },
    #[error("missing required field: {0}")]
    MissingField(&'static str),
    #[error("field has an unexpected type or value: {0}")]
    InvalidField(&'static str),
}

/// Parses a body into a JSON tree, mapping the error to one that cannot leak content.
pub(crate) fn parse_json(body: &[u8]) -> Result<serde_json::Value, PayloadError> {
    serde_json::from_slice(body).map_err(|e| PayloadError::InvalidJson {
        line: e.line(),
        column: e.column(),
    })
}

/// Follows a dotted path (`metadata.org_id`, `items.data.0.price.id`) and returns
/// the string found there.
///
/// Operators configure where their org id lives, so the path is data, not code.
/// Non-string leaves yield `None` rather than a stringified number, so an org id
/// can never silently come from the wrong field type.
pub fn lookup_path<'a>(v: &'a serde_json::Value, dotted: &str) -> Option<&'a str> {
    lookup_value(v, dotted)?.as_str()
}

/// [`lookup_path`] without the final string requirement.
pub(crate) fn lookup_value<'a>(
    v: &'a serde_json::Value,
    dotted: &str,
) -> Option<&'a serde_json::Value> {
    if dotted.is_empty() {
        return None;
    }
    dotted.split('.').try_fold(v, |cur, seg| match cur {
        serde_json::Value::Object(m) => m.get(seg),
        serde_json::Value::Array(a) => a.get(seg.parse::<usize>().ok()?),
        _ => None,
    })
}

/// A non-empty string at `path`, or `None`. Empty strings are treated as absent
/// because providers send `""` for unset metadata.
pub(crate) fn opt_str(v: &serde_json::Value, path: &str) -> Option<String> {
    lookup_path(v, path)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

pub(crate) fn req_str(v: &serde_json::Value, path: &'static str) -> Result<String, PayloadError> {
    match lookup_value(v, path) {
        None | Some(serde_json::Value::Null) => Err(PayloadError::MissingField(path)),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(serde_json::Value::String(_)) => Err(PayloadError::MissingField(path)),
        Some(_) => Err(PayloadError::InvalidField(path)),
    }
}

/// Optional bool: absent or null is `None`, any other non-bool is an error.
pub(crate) fn opt_bool(
    v: &serde_json::Value,
    path: &'static str,
) -> Result<Option<bool>, PayloadError> {
    match lookup_value(v, path) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(PayloadError::InvalidField(path)),
    }
}

/// Optional RFC 3339 timestamp: absent or null is `None`, unparseable is an error.
pub(crate) fn opt_rfc3339(
    v: &serde_json::Value,
    path: &'static str,
) -> Result<Option<DateTime<Utc>>, PayloadError> {
    match lookup_value(v, path) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|d| Some(d.with_timezone(&Utc)))
            .map_err(|_| PayloadError::InvalidField(path)),
        Some(_) => Err(PayloadError::InvalidField(path)),
    }
}

/// Optional Unix-seconds timestamp (Stripe's encoding).
pub(crate) fn opt_unix(
    v: &serde_json::Value,
    path: &'static str,
) -> Result<Option<DateTime<Utc>>, PayloadError> {
    match lookup_value(v, path) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .map(Some)
            .ok_or(PayloadError::InvalidField(path)),
        Some(_) => Err(PayloadError::InvalidField(path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_path_walks_objects_and_arrays() {
        let v = json!({"metadata": {"org_id": "org_1", "n": 5}, "items": {"data": [{"price": {"id": "price_1"}}]}});
        assert_eq!(lookup_path(&v, "metadata.org_id"), Some("org_1"));
        assert_eq!(lookup_path(&v, "items.data.0.price.id"), Some("price_1"));
        assert_eq!(lookup_path(&v, "items.data.1.price.id"), None);
        assert_eq!(lookup_path(&v, "metadata.n"), None);
        assert_eq!(lookup_path(&v, "metadata.missing"), None);
        assert_eq!(lookup_path(&v, "metadata"), None);
        assert_eq!(lookup_path(&v, ""), None);
    }

    #[test]
    fn required_and_optional_helpers() {
        let v = json!({"a": "x", "b": "", "c": 1, "d": null, "t": "2025-01-02T03:04:05Z", "u": 1700000000, "f": true});
        assert_eq!(req_str(&v, "a"), Ok("x".into()));
        assert_eq!(req_str(&v, "b"), Err(PayloadError::MissingField("b")));
        assert_eq!(req_str(&v, "c"), Err(PayloadError::InvalidField("c")));
        assert_eq!(req_str(&v, "d"), Err(PayloadError::MissingField("d")));
        assert_eq!(opt_str(&v, "b"), None);
        assert_eq!(opt_bool(&v, "f"), Ok(Some(true)));
        assert_eq!(opt_bool(&v, "a"), Err(PayloadError::InvalidField("a")));
        assert_eq!(
            opt_rfc3339(&v, "t").unwrap().map(|d| d.timestamp()),
            Some(1_735_787_045)
        );
        assert_eq!(opt_rfc3339(&v, "a"), Err(PayloadError::InvalidField("a")));
        assert_eq!(
            opt_unix(&v, "u").unwrap().map(|d| d.timestamp()),
            Some(1_700_000_000)
        );
        assert_eq!(opt_unix(&v, "d"), Ok(None));
    }

    #[test]
    fn invalid_json_error_has_no_content() {
        let e = parse_json(br#"{"secret": "abc"#).unwrap_err();
        assert!(matches!(e, PayloadError::InvalidJson { .. }));
        assert!(!e.to_string().contains("abc"));
    }

    #[test]
    fn status_serde_is_snake_case() {
        assert_eq!(
            serde_json::to_string(&SubscriptionStatus::PastDue).unwrap(),
            "\"past_due\""
        );
        for s in [
            SubscriptionStatus::Active,
            SubscriptionStatus::Trialing,
            SubscriptionStatus::PastDue,
            SubscriptionStatus::Canceled,
        ] {
            assert_eq!(SubscriptionStatus::parse(s.as_str()), Some(s));
        }
    }
}
