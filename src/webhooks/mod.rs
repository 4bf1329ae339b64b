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
