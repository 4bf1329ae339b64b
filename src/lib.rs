//! quota-gateway: a usage-metering and quota gateway for SaaS APIs.
//!
//! # Layout
//! From the edges in; each module imports only from those below it (no circles).
//! - `main`, `startup`: the binary and the composition root, which builds every part and hands
//!   each only what it uses; `shutdown`, `telemetry`, `serve` (the accept loop both listeners
//!   share: connection cap, header and body timeouts, `Host` checks).
//! - Inbound HTTP: `api` (`/v1`, `/admin`, health; its own state), `proxy` (the metering reverse
//!   proxy: identify → decide → forward → record), `webhooks` (billing providers; their own
//!   state), all answering through `http` (errors and decisions → responses, in one place).
//! - Jobs: `flush` (counters → Postgres), `reload` (the plan catalog), the billing scheduler
//!   (`webhooks::scheduler`), recovery (`local::LocalMode::recover`), `notify` (threshold and
//!   plan-change events: crossings → outbox → signed deliveries).
//! - Use cases: `quota` (resolve a plan, decide, record, restore after a Redis loss, once),
//!   owning `local` (deciding while Redis is unreachable and replaying it exactly once),
//!   `lease` (blocks of a limit this replica admits from without Redis, opt-in), `slots`
//!   (concurrency slots: held by a response body, released and renewed in the background) and
//!   `directory` (the per-replica org cache; `cache` holds its invalidation rules); `credits`
//!   (grant, list and void prepaid credits; spending them is the decision's own);
//!   `reservations` (`/v1/reservations`: reserve now, settle or release once, expiry swept on
//!   every replica).
//! - Adapters: `store` (Redis: keys, Lua scripts, the in-doubt machinery), `db` (Postgres).
//! - `config`: typed settings and the catalog, validated at start-up, every problem at once.
//! - `domain`: org ids, plans, periods, decisions, modes and their rendering; pure, no I/O.
//! - `metrics`, `clock`, `singleflight`: small shared parts.
//! - `demo_upstream`: a stand-in product API for the quick start (`quota-gateway demo-upstream`);
//!   nothing else imports it.

pub mod api;
pub mod cache;
pub mod clock;
pub mod config;
pub mod credits;
pub mod db;
pub mod demo_upstream;
pub mod directory;
pub mod domain;
pub mod flush;
pub mod http;
pub mod lease;
pub mod local;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod reservations;
pub mod serve;
pub mod shutdown;
pub mod singleflight;
pub mod slots;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod webhooks;
