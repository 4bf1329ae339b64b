//! Prometheus metrics, owned by one `Metrics` value with its own registry (no globals, so tests
//! and several apps in one process do not collide).
//!
//! Labels hold only bounded values: route patterns, plan and metric ids from the catalog,
//! outcomes, status classes. Never an org id, a key or a raw path.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Fine enough at the low end to see 100 µs, wide enough for slow upstreams.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    /// Every metric family name registered, sorted; see `names`.
    names: Vec<String>,
    /// `source`: proxy | check; `outcome`: allowed | quota_exceeded | rate_limited |
    /// too_many_in_flight |
    /// unauthorized | error.
    pub decisions: IntCounterVec,
    /// API requests by route pattern and status class.
    pub api_requests: HistogramVec,
    pub proxy_request_duration: Histogram,
    /// Time spent in the gateway before the request is forwarded (identify + decide).
    pub proxy_overhead: Histogram,
    pub upstream_duration: Histogram,
    /// Upstream responses by status class (2xx…5xx, connect_error, timeout).
    pub upstream_responses: IntCounterVec,
    pub redis_duration: Histogram,
    /// `kind`: timeout | connection | other.
    pub redis_errors: IntCounterVec,
    pub redis_reconnects: IntCounter,
    pub redis_script_reloads: IntCounter,
    /// 1 while the last Redis call failed, 0 once one succeeds.
    pub degraded: IntGauge,
    pub webhooks: IntCounterVec,
    /// Plan catalog reloads by outcome (ok | rejected).
    pub catalog_reloads: IntCounterVec,
    pub flush_duration: Histogram,
    pub flush_rows: IntCounter,
    pub flush_failures: IntCounter,
    pub flush_reconciliations: IntCounter,
    /// Seconds since the oldest change not yet in Postgres (0 when none).
    pub flush_oldest_unflushed: prometheus::Gauge,
    /// Decisions whose Redis call was in doubt, by what was learned: applied | not_applied |
    /// unknown (replayed on a guess: exact with a usage report's key, else possibly twice).
    pub in_doubt: IntCounterVec,
    /// Units admitted that neither Redis nor Postgres would take before the process exited.
    pub usage_lost: IntCounter,
    /// Units admitted while Redis was unreachable that Redis refused on replay because a
    /// counter would pass the largest counter value; settled, never retried.
    pub replay_overflow: IntCounter,
    /// 1 while every Redis primary's `maxmemory-policy` is `noeviction` (see `store::eviction`).
    pub redis_eviction_policy_ok: IntGauge,
    /// Leased decisions by path: local (from a block this replica holds, no Redis call) |
    /// redis (a lease call: settle, decide exactly, take a new block).
    pub lease_decisions: IntCounterVec,
    /// Credit units by direction: drawn (spent past a hard quota) | returned (refunds).
    pub credit_units: IntCounterVec,
    /// Grants made, by source: admin | webhook.
    pub credit_grants: IntCounterVec,
    /// Lease calls that only settled and returned blocks (expiry, shutdown).
    pub lease_settlements: IntCounter,
    /// Units of expired, unsettled leases (a replica died or lost Redis) returned to their
    /// limits: the bound on what such a replica may have admitted without it being counted.
    pub lease_swept_units: IntCounter,
    /// Denials that would have been admitted but for units other replicas held in leases.
    pub lease_underadmissions: IntCounter,
    /// Reservations settled, by path (proxy | api) and how the actual was learnt (header |
    /// trailer | sse | missing | disconnected | api | expired | released).
    pub settlements: IntCounterVec,
    /// Units charged after the fact because a request cost more than it reserved: the
    /// overshoot past a hard limit, at most one request's worth each.
    pub settle_overshoot_units: IntCounter,
    /// Settlements whose give-back could not be written (Redis unreachable): those units stay
    /// charged (the customer pays the estimate), never lost the other way.
    pub settle_refund_failures: IntCounter,
    /// Units a lease settlement carried on a call whose outcome could not be learned (its
    /// connection broke): replayed, so each may be counted twice.
    pub lease_unknown_units: IntCounter,
    /// Concurrency slots this replica holds (requests in flight under a plan's `concurrency`).
    pub concurrency_slots: IntGauge,
    /// Slots given back, by outcome: released | failed (a failed one expires with its lease).
    pub concurrency_releases: IntCounterVec,
    /// Slots of other holders found expired and swept by this replica's decisions: slots of a
    /// replica that died (or could not renew).
    pub concurrency_swept: IntCounter,
    pub concurrency_queued: IntCounterVec,
    /// Open client connections by listener (api | proxy).
    pub connections_open: prometheus::IntGaugeVec,
    /// Times a listener reached its `max_connections` and stopped accepting until one closed.
    pub connections_at_cap: IntCounterVec,
    /// Requests cut for slowness, by listener and phase (header | body).
    pub client_timeouts: IntCounterVec,
    /// Outbound events by type (usage.threshold_crossed | plan.changed) and outcome: queued
    /// (in the outbox), dropped (lost before the outbox), delivered, retried, failed.
    pub notifications: IntCounterVec,
    /// Age in seconds of the oldest event still pending delivery (0 when none).
    pub notifications_oldest_pending: prometheus::Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let decisions = IntCounterVec::new(
            Opts::new(
                "quota_gateway_decisions_total",
                "Quota decisions by source, outcome, plan and charged metric.",
            ),
            &["source", "outcome", "plan", "metric"],
        )
        .expect("valid metric");
        let api_requests = HistogramVec::new(
            HistogramOpts::new(
                "quota_gateway_api_request_duration_seconds",
                "API requests (quota checks, usage, admin) by route pattern and status class.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "status"],
        )
        .expect("valid metric");
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                .expect("valid metric")
        };
        let proxy_request_duration = histogram(
            "quota_gateway_proxy_request_duration_seconds",
            "Whole proxied requests, from arrival to response headers.",
        );
        let proxy_overhead = histogram(
            "quota_gateway_proxy_overhead_seconds",
            "Time spent in the gateway before forwarding (identify and decide).",
        );
        let upstream_duration = histogram(
            "quota_gateway_upstream_duration_seconds",
            "Upstream response time, until response headers.",
        );
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "quota_gateway_upstream_responses_total",
                "Upstream responses by status class, connect errors and timeouts.",
            ),
            &["class"],
        )
        .expect("valid metric");
        let redis_duration = histogram(
            "quota_gateway_redis_duration_seconds",
            "Redis round trips of decisions and usage reports.",
        );
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "quota_gateway_redis_errors_total",
                "Failed Redis calls by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let redis_reconnects = IntCounter::new(
            "quota_gateway_redis_reconnects_total",
            "Redis connections re-established after a failure.",
        )
        .expect("valid metric");
        let redis_script_reloads = IntCounter::new(
            "quota_gateway_redis_script_reloads_total",
            "Times the decide script had to be loaded again (NOSCRIPT).",
        )
        .expect("valid metric");
        let degraded = IntGauge::new(
            "quota_gateway_degraded",
            "1 while Redis is unreachable, 0 otherwise.",
        )
        .expect("valid metric");
        let webhooks = IntCounterVec::new(
            Opts::new(
                "quota_gateway_webhooks_total",
                "Billing webhooks by provider and outcome.",
            ),
            &["provider", "outcome"],
        )
        .expect("valid metric");
        let catalog_reloads = IntCounterVec::new(
            Opts::new(
                "quota_gateway_catalog_reloads_total",
                "Plan catalog reloads by outcome (ok, rejected).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let flush_duration = histogram(
            "quota_gateway_flush_duration_seconds",
            "Usage flushes to Postgres.",
        );
        let flush_rows = IntCounter::new(
            "quota_gateway_flush_rows_total",
            "usage_counters rows written by flushes.",
        )
        .expect("valid metric");
        let flush_failures = IntCounter::new(
            "quota_gateway_flush_failures_total",
            "Usage flushes that failed (the changes are kept and retried).",
        )
        .expect("valid metric");
        let flush_reconciliations = IntCounter::new(
            "quota_gateway_flush_reconciliations_total",
            "Scans of Redis that marked every durable counter for the flusher (at start-up, then hourly), so counts of a replica that died before flushing reach Postgres.",
        )
        .unwrap();
        let flush_oldest_unflushed = prometheus::Gauge::new(
            "quota_gateway_flush_oldest_unflushed_seconds",
            "Age of the oldest usage change not yet in Postgres.",
        )
        .expect("valid metric");
        let in_doubt = IntCounterVec::new(
            Opts::new(
                "quota_gateway_in_doubt_total",
                "Decisions whose Redis call was in doubt, by what was learned of it.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        // Present at 0 from the start, so a dashboard (or a drill) reads a number, not a gap.
        for outcome in ["applied", "not_applied", "unknown"] {
            in_doubt.with_label_values(&[outcome]);
        }
        let usage_lost = IntCounter::new(
            "quota_gateway_usage_lost_total",
            "Admitted units that neither Redis nor Postgres took before the process exited.",
        )
        .expect("valid metric");
        let replay_overflow = IntCounter::new(
            "quota_gateway_replay_overflow_units_total",
            "Units admitted while Redis was unreachable that Redis refused on replay because a \
             counter would pass 9007199254740991 (the largest counter value); not retried.",
        )
        .expect("valid metric");
        let redis_eviction_policy_ok = IntGauge::new(
            "quota_gateway_redis_eviction_policy_ok",
            "1 while every Redis primary's maxmemory-policy is noeviction; 0 when one may evict \
             keys (an evicted counter silently resets a budget), or before the first check.",
        )
        .expect("valid metric");
        let credit_units = IntCounterVec::new(
            Opts::new(
                "quota_gateway_credit_units_total",
                "Prepaid credit units drawn past hard quotas, or returned by refunds.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        for direction in ["drawn", "returned"] {
            credit_units.with_label_values(&[direction]);
        }
        let credit_grants = IntCounterVec::new(
            Opts::new(
                "quota_gateway_credit_grants_total",
                "Credit grants made, by source (admin API or billing webhook); repeats excluded.",
            ),
            &["source"],
        )
        .expect("valid metric");
        for source in ["admin", "webhook"] {
            credit_grants.with_label_values(&[source]);
        }
        let lease_decisions = IntCounterVec::new(
            Opts::new(
                "quota_gateway_lease_decisions_total",
                "Leased decisions by path: local (no Redis call) or redis (settle, decide, refill).",
            ),
            &["path"],
        )
        .expect("valid metric");
        for path in ["local", "redis"] {
            lease_decisions.with_label_values(&[path]);
        }
        let lease_settlements = IntCounter::new(
            "quota_gateway_lease_settlements_total",
            "Lease calls that only settled consumed units and returned blocks (expiry, shutdown).",
        )
        .expect("valid metric");
        let lease_swept_units = IntCounter::new(
            "quota_gateway_lease_swept_units_total",
            "Units of expired, unsettled leases returned to their limits: the bound on what a \
             replica that died (or lost Redis) may have admitted from them uncounted.",
        )
        .expect("valid metric");
        let lease_underadmissions = IntCounter::new(
            "quota_gateway_lease_underadmissions_total",
            "Denials that would have been admitted but for units other replicas held in leases.",
        )
        .expect("valid metric");
        let settlements = IntCounterVec::new(
            Opts::new(
                "quota_gateway_settlements_total",
                "Reservations settled, by path (proxy, api) and source of the actual.",
            ),
            &["path", "source"],
        )
        .expect("valid metric");
        let settle_overshoot_units = IntCounter::new(
            "quota_gateway_settle_overshoot_units_total",
            "Units charged after the fact because a request cost more than it reserved.",
        )
        .expect("valid metric");
        let settle_refund_failures = IntCounter::new(
            "quota_gateway_settle_refund_failures_total",
            "Settlements whose give-back could not be written; the estimate stays charged.",
        )
        .expect("valid metric");
        let lease_unknown_units = IntCounter::new(
            "quota_gateway_lease_unknown_units_total",
            "Units a lease settlement carried on a call whose outcome could not be learned; \
             replayed, so each may be counted twice.",
        )
        .expect("valid metric");
        let concurrency_slots = IntGauge::new(
            "quota_gateway_concurrency_slots",
            "Concurrency slots this replica holds: requests in flight under a plan's concurrency limit.",
        )
        .expect("valid metric");
        let concurrency_releases = IntCounterVec::new(
            Opts::new(
                "quota_gateway_concurrency_releases_total",
                "Concurrency slots given back, by outcome (a failed release expires with its lease).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in ["released", "failed"] {
            concurrency_releases.with_label_values(&[outcome]);
        }
        let concurrency_swept = IntCounter::new(
            "quota_gateway_concurrency_swept_total",
            "Expired concurrency slots (of a replica that died or could not renew) swept by decisions.",
        )
        .expect("valid metric");
        let concurrency_queued = IntCounterVec::new(
            Opts::new(
                "quota_gateway_concurrency_queued_total",
                "Requests that waited for a concurrency slot ([concurrency] queue_timeout), by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in ["admitted", "timed_out"] {
            concurrency_queued.with_label_values(&[outcome]);
        }
        let connections_open = prometheus::IntGaugeVec::new(
            Opts::new(
                "quota_gateway_connections_open",
                "Open client connections by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let connections_at_cap = IntCounterVec::new(
            Opts::new(
                "quota_gateway_connections_at_cap_total",
                "Times a listener reached max_connections and paused accepting until one closed.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let client_timeouts = IntCounterVec::new(
            Opts::new(
                "quota_gateway_client_timeouts_total",
                "Client requests cut for sending headers or a body too slowly, by listener and phase.",
            ),
            &["listener", "phase"],
        )
        .expect("valid metric");
        let notifications = IntCounterVec::new(
            Opts::new(
                "quota_gateway_notifications_total",
                "Outbound events (usage.threshold_crossed, plan.changed) by type and outcome: \
                 queued, dropped (lost before reaching the outbox), delivered, retried, failed.",
            ),
            &["type", "outcome"],
        )
        .expect("valid metric");
        for t in ["usage.threshold_crossed", "plan.changed"] {
            for outcome in ["queued", "dropped", "delivered", "retried", "failed"] {
                notifications.with_label_values(&[t, outcome]);
            }
        }
        let notifications_oldest_pending = prometheus::Gauge::new(
            "quota_gateway_notifications_oldest_pending_seconds",
            "Age of the oldest outbound event not yet delivered (0 when none).",
        )
        .expect("valid metric");
        for listener in ["api", "proxy"] {
            connections_open.with_label_values(&[listener]);
            connections_at_cap.with_label_values(&[listener]);
            for phase in ["header", "body"] {
                client_timeouts.with_label_values(&[listener, phase]);
            }
        }
        let mut names = Vec::new();
        for c in [
            Box::new(connections_open.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(connections_at_cap.clone()),
            Box::new(client_timeouts.clone()),
            Box::new(in_doubt.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(usage_lost.clone()),
            Box::new(replay_overflow.clone()),
            Box::new(decisions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(api_requests.clone()),
            Box::new(proxy_request_duration.clone()),
            Box::new(proxy_overhead.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_responses.clone()),
            Box::new(redis_duration.clone()),
            Box::new(redis_errors.clone()),
            Box::new(redis_reconnects.clone()),
            Box::new(redis_script_reloads.clone()),
            Box::new(degraded.clone()),
            Box::new(webhooks.clone()),
            Box::new(catalog_reloads.clone()),
            Box::new(flush_duration.clone()),
            Box::new(flush_rows.clone()),
            Box::new(flush_failures.clone()),
            Box::new(flush_reconciliations.clone()),
            Box::new(flush_oldest_unflushed.clone()),
            Box::new(redis_eviction_policy_ok.clone()),
            Box::new(notifications.clone()),
            Box::new(notifications_oldest_pending.clone()),
            Box::new(lease_decisions.clone()),
            Box::new(credit_units.clone()),
            Box::new(credit_grants.clone()),
            Box::new(lease_settlements.clone()),
            Box::new(lease_swept_units.clone()),
            Box::new(lease_underadmissions.clone()),
            Box::new(lease_unknown_units.clone()),
            Box::new(settlements.clone()),
            Box::new(settle_overshoot_units.clone()),
            Box::new(settle_refund_failures.clone()),
            Box::new(concurrency_slots.clone()),
            Box::new(concurrency_releases.clone()),
            Box::new(concurrency_swept.clone()),
            Box::new(concurrency_queued.clone()),
        ] {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            // process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...
            let process = prometheus::process_collector::ProcessCollector::for_self();
            use prometheus::core::Collector as _;
            let process_names: Vec<String> =
                process.desc().iter().map(|d| d.fq_name.clone()).collect();
            if registry.register(Box::new(process)).is_ok() {
                names.extend(process_names);
            }
        }
        names.sort();
        Self {
            registry,
            names,
            decisions,
            api_requests,
            proxy_request_duration,
            proxy_overhead,
            upstream_duration,
            upstream_responses,
            redis_duration,
            redis_errors,
            redis_reconnects,
            redis_script_reloads,
            degraded,
            webhooks,
            catalog_reloads,
            flush_duration,
            flush_rows,
            flush_failures,
            flush_reconciliations,
            flush_oldest_unflushed,
            in_doubt,
            usage_lost,
            replay_overflow,
            redis_eviction_policy_ok,
            lease_decisions,
            credit_units,
            credit_grants,
            lease_settlements,
            lease_swept_units,
            lease_underadmissions,
            lease_unknown_units,
            settlements,
            settle_overshoot_units,
            settle_refund_failures,
            concurrency_slots,
            concurrency_releases,
            concurrency_swept,
            concurrency_queued,
            connections_open,
            connections_at_cap,
            client_timeouts,
            notifications,
            notifications_oldest_pending,
        }
    }

    /// Count one decision once per charged metric.
    pub fn decision<'a>(
        &self,
        source: &str,
        outcome: &str,
        plan: &str,
        metrics: impl IntoIterator<Item = &'a str>,
    ) {
        for metric in metrics {
            self.decisions
                .with_label_values(&[source, outcome, plan, metric])
                .inc();
        }
    }

    /// Every metric family this registry exports, including labelled families that appear on
    /// `/metrics` only after their first use (dashboards and alert rules are checked against it).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
