//! Billing webhooks: payment providers tell the gateway when a customer upgrades, downgrades,
//! cancels or stops paying, and the org's plan follows on every replica within a second.
//!
//! Layers, outermost first: `handler` takes the raw body and headers, verifies the signature over
//! the exact bytes (`signature`) before anything is parsed, then a per-provider parser
//! (`stripe`, `standard`) turns the payload into one normalized `event`. `apply` stores it and
//! decides the org's plan with the pure lifecycle rules of `domain::subscription`, in one
//! Postgres transaction; `scheduler` applies downgrades that fall due without a new event.

pub mod apply;
pub mod credits;
pub mod event;
pub mod handler;
pub mod scheduler;
pub mod signature;
pub mod standard;
pub mod stripe;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

/// What the webhook endpoints and the downgrade scheduler use (cheap to clone: axum hands each
/// request its own copy).
#[derive(Clone)]
pub struct Webhooks(Arc<Parts>);

impl Webhooks {
    pub fn new(parts: Parts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for Webhooks {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.0
    }
}

/// Postgres, the billing settings, and the quota service to read the catalog and announce plan
/// changes to every replica.
pub struct Parts {
    pub pool: sqlx::PgPool,
    pub billing: Option<BillingSettings>,
    pub quota: Arc<crate::quota::QuotaService>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// `[billing]`: how payment-provider webhooks drive plans.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// past_due / on_hold keep the paid plan this long.
    pub grace_period: Duration,
    /// false: never move an org to a lower plan without an operator.
    pub auto_downgrade: bool,
    pub providers: Vec<BillingProvider>,
}

impl BillingSettings {
    pub fn provider(&self, kind: &ProviderKind) -> Option<&BillingProvider> {
        self.providers.iter().find(|p| &p.kind == kind)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    Stripe,
    Dodo,
    Polar,
    /// `[billing.standard.<name>]`: our normalized event, signed with Standard Webhooks.
    Standard(String),
}

impl ProviderKind {
    /// The name stored with events and subscriptions (`stripe`, `standard:<name>`).
    pub fn key(&self) -> String {
        match self {
            ProviderKind::Stripe => "stripe".into(),
            ProviderKind::Dodo => "dodo".into(),
            ProviderKind::Polar => "polar".into(),
            ProviderKind::Standard(n) => format!("standard:{n}"),
        }
    }

    /// How a Standard Webhooks secret becomes the HMAC key; `None` for Stripe, which signs with
    /// the secret's bytes as they are.
    pub fn key_encoding(&self) -> Option<crate::webhooks::signature::StandardKeyEncoding> {
        use crate::webhooks::signature::StandardKeyEncoding;
        match self {
            ProviderKind::Stripe => None,
            ProviderKind::Polar => Some(StandardKeyEncoding::Utf8Bytes),
            ProviderKind::Dodo | ProviderKind::Standard(_) => {
                Some(StandardKeyEncoding::Base64AfterWhsecPrefix)
            }
        }
    }

    /// Label for metrics: bounded, so every standard endpoint shares one.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProviderKind::Stripe => "stripe",
            ProviderKind::Dodo => "dodo",
            ProviderKind::Polar => "polar",
            ProviderKind::Standard(_) => "standard",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BillingProvider {
    pub kind: ProviderKind,
    /// Several during a rotation; any one may have signed.
    pub secrets: Vec<SecretString>,
    /// Dotted path of the org id on the provider's object (`metadata.org_id`).
    pub org_id_from: String,
    /// Provider product / price id → plan id.
    pub plans: BTreeMap<String, String>,
    /// One-time purchase (Stripe price, Polar / Dodo product id) → the credits it grants
    /// (`credits`).
    pub grants: BTreeMap<String, GrantTemplate>,
}

/// What one unit of a purchased product grants (`[billing.<provider>] grants`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTemplate {
    pub metric: String,
    pub amount: i64,
    /// From the purchase; `None`: never expires.
    pub expires_in: Option<Duration>,
    pub priority: u32,
}
