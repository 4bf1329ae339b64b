//! The flusher: writes the durable counters this replica changed to Postgres.
//!
//! `try_flush_once` is the step (tests call it directly); `run` only schedules it every
//! `[flush] interval`, backs off while Postgres fails, and flushes one last time on shutdown.
//! It takes the dirty keys, reads their current values and versions from Redis (one `MGET` per
//! org, so one slot per read in a cluster) and upserts them in batches. A write only lands when
//! its (version, quantity) is newer than the stored one (a version moves when a value goes
//! down, see `db::usage::upsert`), so two replicas flushing the same counter, or a flush retried
//! after a failure, never count twice and never go backwards. What could not be written stays
//! dirty for the next attempt.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::db::DbError;
use crate::db::credits;
use crate::db::usage::{self, CounterRow};
use crate::domain::period::{self, Period};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Dirty keys taken.
    pub keys: usize,
    /// Rows whose stored value changed.
    pub rows_written: u64,
    /// Keys gone from Redis (expired); nothing to write.
    pub missing: usize,
}

/// Orgs read from Redis at once.
const READ_CONCURRENCY: usize = 64;

pub async fn try_flush_once(
    store: &Store,
    pool: &sqlx::PgPool,
    metrics: &Metrics,
    now: DateTime<Utc>,
) -> Result<FlushOutcome, FlushError> {
    let started = Instant::now();
    let taken = store.dirty().take();
    if taken.is_empty() {
        metrics.flush_oldest_unflushed.set(0.0);
        return Ok(FlushOutcome::default());
    }
    let result = flush_keys(store, pool, &taken, now).await;
    metrics
        .flush_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(outcome) => {
            metrics.flush_rows.inc_by(outcome.rows_written);
            metrics.flush_oldest_unflushed.set(
                store
                    .dirty()
                    .oldest()
                    .map_or(0.0, |t| t.elapsed().as_secs_f64()),
            );
            Ok(outcome)
        }
        Err(e) => {
            metrics.flush_failures.inc();
            let oldest = taken.values().min().copied();
            store.dirty().restore(taken);
            if let Some(t) = oldest {
                metrics
                    .flush_oldest_unflushed
                    .set(t.elapsed().as_secs_f64());
            }
            Err(e)
        }
    }
}

async fn flush_keys(
    store: &Store,
    pool: &sqlx::PgPool,
    taken: &HashMap<String, Instant>,
    now: DateTime<Utc>,
) -> Result<FlushOutcome, FlushError> {
    // key → (metric, period and its start) grouped by org; credit hashes apart.
    type Entry = (String, String, Option<(Period, i64)>);
    let mut by_org: HashMap<String, Vec<Entry>> = HashMap::new();
    let mut credits: HashMap<String, Vec<String>> = HashMap::new();
    for key in taken.keys() {
        if let Some((org, _)) = store.keys().parse_credits(key) {
            credits
                .entry(org.as_str().to_owned())
                .or_default()
                .push(key.clone());
            continue;
        }
        match store.keys().parse_durable(key) {
            Some((org, metric, start)) => by_org
                .entry(org.as_str().to_owned())
                .or_default()
                .push((key.clone(), metric, start)),
            None => tracing::warn!(key, "not a durable key; skipped"),
        }
    }
    let gauge_month = period::calendar_month(now).start;
    let orgs: Vec<_> = by_org.into_iter().collect();
    let mut rows = Vec::with_capacity(taken.len());
    let mut billing_rows = Vec::new();
    let mut missing = 0;
    for chunk in orgs.chunks(READ_CONCURRENCY) {
        let reads = join_all(chunk.iter().map(|(_, entries)| {
            let keys: Vec<String> = entries.iter().map(|(k, ..)| k.clone()).collect();
            async move { store.read_durable(&keys).await }
        }))
        .await;
        for ((org, entries), values) in chunk.iter().zip(reads) {
            for ((_, metric, start), value) in entries.iter().zip(values?) {
                let Some((quantity, version)) = value else {
                    missing += 1;
                    continue;
                };
                let period_start = match start {
                    Some((_, s)) => Utc.timestamp_opt(*s, 0).single().unwrap_or(gauge_month),
                    None => gauge_month,
                };
                // Billing months have their own table: the calendar meter beside them stays
                // the one record of usage that billing exports read.
                let into = match start {
                    Some((Period::BillingMonth, _)) => &mut billing_rows,
                    _ => &mut rows,
                };
                into.push(CounterRow {
                    org_id: org.clone(),
                    metric: metric.clone(),
                    period_start,
                    quantity,
                    version,
                    gauge: start.is_none(),
                });
            }
        }
    }
    let mut rows_written = usage::upsert(pool, &rows).await?;
    rows_written += usage::upsert_billing(pool, &billing_rows).await?;
    rows_written += flush_credits(store, pool, credits).await?;
    Ok(FlushOutcome {
        keys: taken.len(),
        rows_written,
        missing,
    })
}

/// Write the balances of the grants in `by_org`'s credit hashes (org → keys) to Postgres: each
/// grant's remaining units with its hash's version (see `db::credits`).
async fn flush_credits(
    store: &Store,
    pool: &sqlx::PgPool,
    by_org: HashMap<String, Vec<String>>,
) -> Result<u64, FlushError> {
    if by_org.is_empty() {
        return Ok(0);
    }
    let orgs: Vec<_> = by_org.into_iter().collect();
    let mut rows = Vec::new();
    for chunk in orgs.chunks(READ_CONCURRENCY) {
        let reads = join_all(chunk.iter().map(|(_, keys)| store.read_credits(keys))).await;
        for ((org, _), hashes) in chunk.iter().zip(reads) {
            for hash in hashes? {
                for (field, value) in &hash.fields {
                    let Some(b) = crate::domain::credit::Balance::parse(field, value) else {
                        tracing::warn!(org, "unreadable credit grant field; skipped");
                        continue;
                    };
                    rows.push(credits::BalanceRow {
                        org_id: org.clone(),
                        id: b.id,
                        remaining: b.remaining,
                        version: hash.version,
                    });
                }
            }
        }
    }
    Ok(credits::upsert_balances(pool, &rows).await?)
}

/// How often every replica looks through Redis for durable keys nobody marked (see
/// `reconcile`).
const RECONCILE_EVERY: Duration = Duration::from_secs(3600);

/// Mark every durable key of this prefix as dirty, so counters changed by a replica that died
/// before flushing still reach Postgres. A `SCAN` over the prefix on each node: done at start-up
/// and hourly, never per flush. Versions make re-writing unchanged counters a no-op.
pub async fn reconcile(store: &Store, nodes: &[String]) -> Result<usize, StoreError> {
    let pattern = store.keys().scan_pattern();
    let mut marked = 0;
    for node in nodes {
        let client = redis::Client::open(node.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            for key in keys {
                if store.keys().parse_durable(&key).is_some()
                    || store.keys().parse_credits(&key).is_some()
                {
                    store.dirty().mark(&key);
                    marked += 1;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(marked)
}

/// Flush every `interval` until `stop`, then once more. `nodes`: the Redis nodes to reconcile
/// (all primaries of a cluster).
pub async fn run(
    store: Store,
    pool: sqlx::PgPool,
    metrics: std::sync::Arc<Metrics>,
    clock: std::sync::Arc<dyn Clock>,
    interval: Duration,
    nodes: Vec<String>,
    stop: CancellationToken,
) {
    let mut wait = interval;
    let mut last_reconcile: Option<Instant> = None;
    loop {
        if last_reconcile.is_none_or(|t| t.elapsed() >= RECONCILE_EVERY) {
            match reconcile(&store, &nodes).await {
                Ok(n) => {
                    tracing::debug!(keys = n, "reconciled durable keys for flushing");
                    metrics.flush_reconciliations.inc();
                    last_reconcile = Some(Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "reconciliation scan failed; retrying later"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        match try_flush_once(&store, &pool, &metrics, clock.now()).await {
            Ok(o) => {
                if o.keys > 0 {
                    tracing::debug!(keys = o.keys, rows = o.rows_written, "flushed usage");
                }
                wait = interval;
            }
            Err(e) => {
                wait = (wait * 2).min(Duration::from_secs(60));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, pending = store.dirty().len(), "usage flush failed; keeping the changes");
            }
        }
    }
    // Final flush: everything this replica counted reaches Postgres before it exits.
    for attempt in 1..=3 {
        match try_flush_once(&store, &pool, &metrics, clock.now()).await {
            Ok(o) => {
                tracing::info!(
                    keys = o.keys,
                    rows = o.rows_written,
                    "final usage flush done"
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, attempt, "final usage flush failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
