//! Billing webhooks: payment providers tell the gateway when a customer upgrades, downgrades,
//! cancels or stops paying, and the org's plan follows on every replica within a second.
//!
//! Layers, outermost first: `handler` takes the raw body and headers, verifies the signature over
//! the exact bytes (`signature`) before anything is parsed, then a per-provider parser
//! (`stripe`, `standard`) turns the payload into one normalized `event`. `apply` stores it and
//! decides the org's plan with the pure lifecycle rules of `domain::subscription`, in one
//! Postgres transaction; `scheduler` applies downgrades that fall due without a new event.

pub mod apply;
pub mod event;
pub mod handler;
pub mod scheduler;
pub mod signature;
pub mod standard;
pub mod stripe;

use std::sync::Arc;

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
    pub billing: Option<crate::config::BillingSettings>,
    pub quota: Arc<crate::quota::QuotaService>,
    pub metrics: Arc<crate::metrics::Metrics>,
}
