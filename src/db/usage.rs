//! `usage_counters`: monthly usage per org and metric, the record billing reads.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::DbError;

/// One counter or gauge as read from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRow {
    pub org_id: String,
    pub metric: String,
    pub period_start: DateTime<Utc>,
    pub quantity: i64,
    pub version: i64,
    pub gauge: bool,
}

/// Rows per statement: big enough to amortise the round trip, small enough to keep locks short.
const BATCH: usize = 500;

/// Write rows; a row only replaces a stored one with a lower (version, quantity), compared in
/// that order, so concurrent or retried flushes never go backwards and never count twice.
/// `decide.lua` moves a version only when the value goes down, so between two moves the
/// quantity alone orders the reads (see "Versions" there). Returns the rows actually changed.
pub async fn upsert(pool: &PgPool, rows: &[CounterRow]) -> Result<u64, DbError> {
    upsert_versioned(
        pool,
        rows,
        "INSERT INTO usage_counters (org_id, metric, period_start, quantity, version, kind) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], \
                              $5::bigint[], $6::text[]) \
         ON CONFLICT (org_id, metric, period_start) DO UPDATE SET \
           quantity = EXCLUDED.quantity, version = EXCLUDED.version, updated_at = now() \
         WHERE (usage_counters.version, usage_counters.quantity) \
             < (EXCLUDED.version, EXCLUDED.quantity)",
        true,
    )
    .await
}

/// Write billing-month rows (`billing_usage`) with the same version rule as `upsert`.
pub async fn upsert_billing(pool: &PgPool, rows: &[CounterRow]) -> Result<u64, DbError> {
    upsert_versioned(
        pool,
        rows,
        "INSERT INTO billing_usage (org_id, metric, period_start, quantity, version) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], \
                              $5::bigint[]) \
         ON CONFLICT (org_id, metric, period_start) DO UPDATE SET \
           quantity = EXCLUDED.quantity, version = EXCLUDED.version, updated_at = now() \
         WHERE (billing_usage.version, billing_usage.quantity) \
             < (EXCLUDED.version, EXCLUDED.quantity)",
        false,
    )
    .await
}

/// `sql` takes the rows as arrays: org, metric, period start, quantity, version, and the kind
/// (`"gauge"` or `"counter"`) when `with_kind`. Sent in chunks of `BATCH`.
async fn upsert_versioned(
    pool: &PgPool,
    rows: &[CounterRow],
    sql: &'static str,
    with_kind: bool,
) -> Result<u64, DbError> {
    let mut written = 0;
    for chunk in rows.chunks(BATCH) {
        let orgs: Vec<&str> = chunk.iter().map(|r| r.org_id.as_str()).collect();
        let metrics: Vec<&str> = chunk.iter().map(|r| r.metric.as_str()).collect();
        let starts: Vec<DateTime<Utc>> = chunk.iter().map(|r| r.period_start).collect();
        let quantities: Vec<i64> = chunk.iter().map(|r| r.quantity).collect();
        let versions: Vec<i64> = chunk.iter().map(|r| r.version).collect();
        let mut query = sqlx::query(sql)
            .bind(&orgs)
            .bind(&metrics)
            .bind(&starts)
            .bind(&quantities)
            .bind(&versions);
        if with_kind {
            let kinds: Vec<&str> = chunk
                .iter()
                .map(|r| if r.gauge { "gauge" } else { "counter" })
                .collect();
            query = query.bind(kinds);
        }
        written += query.execute(pool).await?.rows_affected();
    }
    Ok(written)
}

/// The org's billing-month counters of the period starting at `start`: (metric, quantity,
/// version), for putting back into Redis.
pub async fn billing_state(
    pool: &PgPool,
    org_id: &str,
    start: DateTime<Utc>,
) -> Result<Vec<(String, i64, i64)>, DbError> {
    Ok(sqlx::query_as(
        "SELECT metric, quantity, version FROM billing_usage \
         WHERE org_id = $1 AND period_start = $2",
    )
    .bind(org_id)
    .bind(start)
    .fetch_all(pool)
    .await?)
}

/// The org's billing months that start in `[from, to)`, oldest first: (metric, period start,
/// quantity).
pub async fn billing_periods(
    pool: &PgPool,
    org_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(String, DateTime<Utc>, i64)>, DbError> {
    Ok(sqlx::query_as(
        "SELECT metric, period_start, quantity FROM billing_usage \
         WHERE org_id = $1 AND period_start >= $2 AND period_start < $3 \
         ORDER BY period_start, metric",
    )
    .bind(org_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?)
}

/// What Postgres knows of an org's durable counters: the counters of the month starting at
/// `month_start`, and the latest level of each gauge. (metric, quantity, version, gauge)
pub async fn durable_state(
    pool: &PgPool,
    org_id: &str,
    month_start: DateTime<Utc>,
) -> Result<Vec<DurableRow>, DbError> {
    Ok(sqlx::query_as(
        "(SELECT metric, quantity, version, false AS gauge FROM usage_counters \
           WHERE org_id = $1 AND period_start = $2 AND kind = 'counter') \
         UNION ALL \
         (SELECT DISTINCT ON (metric) metric, quantity, version, true AS gauge \
           FROM usage_counters WHERE org_id = $1 AND kind = 'gauge' \
           ORDER BY metric, period_start DESC)",
    )
    .bind(org_id)
    .bind(month_start)
    .fetch_all(pool)
    .await?)
}

/// A durable counter or gauge as the ledger holds it, for putting back into Redis.
#[derive(Debug, sqlx::FromRow)]
pub struct DurableRow {
    pub metric: String,
    pub quantity: i64,
    pub version: i64,
    pub gauge: bool,
}

/// One line of a month's billing export.
#[derive(Debug, sqlx::FromRow)]
pub struct ExportRow {
    pub org_id: String,
    pub metric: String,
    pub period_start: DateTime<Utc>,
    pub quantity: i64,
}

/// One org's rows for a month: (metric, quantity).
pub async fn month(
    pool: &PgPool,
    org_id: &str,
    month_start: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, DbError> {
    let rows = sqlx::query(
        "SELECT metric, quantity FROM usage_counters WHERE org_id = $1 AND period_start = $2",
    )
    .bind(org_id)
    .bind(month_start)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("metric")?, r.try_get("quantity")?)))
        .collect()
}

/// Every org's rows for a month, for billing exports, ordered by org and metric; streamed, so a
/// month of millions of rows is written as it is read instead of held in memory.
pub fn export(
    pool: &PgPool,
    month_start: DateTime<Utc>,
) -> impl futures_util::Stream<Item = Result<ExportRow, DbError>> + '_ {
    use futures_util::TryStreamExt as _;
    sqlx::query_as(
        "SELECT org_id, metric, period_start, quantity FROM usage_counters \
         WHERE period_start = $1 ORDER BY org_id, metric",
    )
    .bind(month_start)
    .fetch(pool)
    .map_err(DbError::from)
}

/// Every org's billing months that start in `[from, to)`, for billing exports, ordered by org,
/// metric and start; streamed like `export`.
pub fn export_billing(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> impl futures_util::Stream<Item = Result<ExportRow, DbError>> + '_ {
    use futures_util::TryStreamExt as _;
    sqlx::query_as(
        "SELECT org_id, metric, period_start, quantity FROM billing_usage \
         WHERE period_start >= $1 AND period_start < $2 ORDER BY org_id, metric, period_start",
    )
    .bind(from)
    .bind(to)
    .fetch(pool)
    .map_err(DbError::from)
}
