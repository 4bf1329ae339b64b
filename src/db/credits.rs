//! `credit_grants`: prepaid credits, the durable record of the balances Redis spends from.
//!
//! A grant is inserted here first and mirrored into Redis after (`store::Store::add_grant`), so
//! a grant Redis has always exists here. `remaining` is written by the flusher with the credit
//! hash's version, like `usage_counters`: a later read always wins, a retried or concurrent flush
//! never goes backwards. Voiding marks the row first, so no restore can bring the grant back.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::DbError;
use crate::domain::credit::NewGrant;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GrantRow {
    pub org_id: String,
    pub id: String,
    pub metric: String,
    pub amount: i64,
    pub remaining: i64,
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub voided_at: Option<DateTime<Utc>>,
    pub voided: Option<i64>,
    pub version: i64,
}

/// The columns of `GrantRow`, spliced into queries with `concat!` (sqlx takes static SQL only).
macro_rules! columns {
    () => {
        "org_id, id, metric, amount, remaining, priority, expires_at, reason, source, \
         created_at, voided_at, voided, version"
    };
}

/// What `insert` found.
pub enum Inserted {
    /// A new grant.
    New(GrantRow),
    /// A grant with this id existed already: the same one (a repeat) or another (a conflict,
    /// which the caller tells apart).
    Existing(GrantRow),
}

/// Insert a grant unless one with its id exists for the org (idempotency by `grant_id`).
pub async fn insert(
    pool: &PgPool,
    org_id: &str,
    grant: &NewGrant,
    source: &str,
) -> Result<Inserted, DbError> {
    let row: Option<GrantRow> = sqlx::query_as(concat!(
        "INSERT INTO credit_grants (org_id, id, metric, amount, remaining, priority, expires_at, \
                                    reason, source) \
         VALUES ($1, $2, $3, $4, $4, $5, $6, $7, $8) \
         ON CONFLICT (org_id, id) DO NOTHING RETURNING ",
        columns!()
    ))
    .bind(org_id)
    .bind(&grant.id)
    .bind(&grant.metric)
    .bind(grant.amount)
    .bind(grant.priority as i32)
    .bind(grant.expires_at)
    .bind(&grant.reason)
    .bind(source)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(row) => Ok(Inserted::New(row)),
        None => Ok(Inserted::Existing(
            get(pool, org_id, &grant.id).await?.ok_or_else(|| {
                DbError::Sqlx(sqlx::Error::Protocol("a conflicting grant vanished".into()))
            })?,
        )),
    }
}

/// Take back a grant just inserted that Redis did not take (nothing was spent from it).
pub async fn delete_new(pool: &PgPool, org_id: &str, id: &str) -> Result<(), DbError> {
    sqlx::query("DELETE FROM credit_grants WHERE org_id = $1 AND id = $2 AND version = 0")
        .bind(org_id)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn get(pool: &PgPool, org_id: &str, id: &str) -> Result<Option<GrantRow>, DbError> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM credit_grants WHERE org_id = $1 AND id = $2"
    ))
    .bind(org_id)
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Every grant of an org, in spending order per metric.
pub async fn list(pool: &PgPool, org_id: &str) -> Result<Vec<GrantRow>, DbError> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM credit_grants WHERE org_id = $1 \
         ORDER BY metric, priority, expires_at NULLS LAST, id"
    ))
    .bind(org_id)
    .fetch_all(pool)
    .await?)
}

/// The grants a restore puts back into Redis: not voided, not expired at `now`.
pub async fn live(
    pool: &PgPool,
    org_id: &str,
    now: DateTime<Utc>,
) -> Result<Vec<GrantRow>, DbError> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM credit_grants WHERE org_id = $1 AND voided_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $2) ORDER BY metric"
    ))
    .bind(org_id)
    .bind(now)
    .fetch_all(pool)
    .await?)
}

/// Mark a grant void (first step of `DELETE`): from now on no restore brings it back. Returns
/// the row; `None` when there is no such grant.
pub async fn void(
    pool: &PgPool,
    org_id: &str,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<GrantRow>, DbError> {
    Ok(sqlx::query_as(concat!(
        "UPDATE credit_grants SET voided_at = COALESCE(voided_at, $3), updated_at = now() \
         WHERE org_id = $1 AND id = $2 RETURNING ",
        columns!()
    ))
    .bind(org_id)
    .bind(id)
    .bind(now)
    .fetch_optional(pool)
    .await?)
}

/// Record what a voided grant had left when Redis let go of it (second step of `DELETE`).
pub async fn record_void(
    pool: &PgPool,
    org_id: &str,
    id: &str,
    left: i64,
    version: i64,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE credit_grants SET voided = $3, remaining = 0, version = GREATEST(version, $4), \
         updated_at = now() WHERE org_id = $1 AND id = $2 AND voided IS NULL",
    )
    .bind(org_id)
    .bind(id)
    .bind(left)
    .bind(version)
    .execute(pool)
    .await?;
    Ok(())
}

/// One grant's balance as read from Redis by the flusher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceRow {
    pub org_id: String,
    pub id: String,
    pub remaining: i64,
    pub version: i64,
}

/// Write balances; a row only changes when its version is older (see the module docs), and a
/// voided grant keeps what its void recorded. Returns the rows changed.
pub async fn upsert_balances(pool: &PgPool, rows: &[BalanceRow]) -> Result<u64, DbError> {
    let mut written = 0;
    for chunk in rows.chunks(500) {
        let orgs: Vec<&str> = chunk.iter().map(|r| r.org_id.as_str()).collect();
        let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
        let remaining: Vec<i64> = chunk.iter().map(|r| r.remaining).collect();
        let versions: Vec<i64> = chunk.iter().map(|r| r.version).collect();
        written += sqlx::query(
            "UPDATE credit_grants g SET remaining = u.remaining, version = u.version, \
               updated_at = now() \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
               AS u(org_id, id, remaining, version) \
             WHERE g.org_id = u.org_id AND g.id = u.id AND g.version < u.version \
               AND g.voided IS NULL",
        )
        .bind(&orgs)
        .bind(&ids)
        .bind(&remaining)
        .bind(&versions)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(written)
}

/// One line of the credits export: a grant with what was spent from it.
pub fn export(pool: &PgPool) -> impl futures_util::Stream<Item = Result<GrantRow, DbError>> + '_ {
    use futures_util::TryStreamExt as _;
    sqlx::query_as::<_, GrantRow>(
        "SELECT org_id, id, metric, amount, remaining, priority, expires_at, reason, source, \
                created_at, voided_at, voided, version \
         FROM credit_grants ORDER BY org_id, metric, id",
    )
    .fetch(pool)
    .map_err(DbError::from)
}
