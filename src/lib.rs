//! quota-gateway: a usage-metering and quota gateway for SaaS APIs.
//!
//! # Layout
//! - `config`: typed `gateway.toml` settings and the `plans.toml` catalog, validated at start-up
//!   with every problem reported at once.
//! - `domain`: org ids, plans, periods, decisions and their rendering; pure, no I/O.
//! - `store`: Redis: key layout (`store::keys`) and the one Lua script a decision runs.
//! - `db`: Postgres: orgs, API keys, plan changes, adjustments; migrations in `migrations/`.
//! - `directory`: the per-replica org → plan cache, invalidated through Redis pub/sub; `cache`
//!   holds the invalidation rules it shares with the proxy's API-key cache.
//! - `flush`: writes changed monthly counters to Postgres (`usage_counters`), the billing record.
//! - `local`: deciding while Redis is unreachable, and replaying what was admitted meanwhile.
//! - `quota`: the use cases that combine catalog, directory, store and clock.
//! - `proxy`: the metering reverse proxy on `[proxy].listen` (identify → decide → forward →
//!   record), with route matching, header hygiene and API-key identity in submodules.
//! - `api`: the HTTP routes; `respond` renders decisions; `error` maps errors to HTTP.
//! - `reload`: hot reload of the plan catalog (SIGHUP or a change on disk).
//! - `metrics`: the Prometheus registry and every metric, served at `/metrics`.
//! - `singleflight`: one lookup per burst of concurrent cache misses for the same key.
//! - `serve`: the accept loop both listeners share: connection cap, header and body timeouts,
//!   `Host` checks.
//! - `startup`, `shutdown`, `telemetry`, `clock`: running the process.

pub mod api;
pub mod cache;
pub mod clock;
pub mod config;
pub mod db;
pub mod directory;
pub mod domain;
pub mod error;
pub mod flush;
pub mod local;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod respond;
pub mod serve;
pub mod shutdown;
pub mod singleflight;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod webhooks;
