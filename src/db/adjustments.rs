//! The `usage_adjustments` table: manual credits and charges with their reason.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::DbError;
use crate::domain::org::OrgId;

pub struct NewAdjustment<'a> {
    pub org: &'a OrgId,
    pub metric: &'a str,
    pub amount: i64,
    pub reason: &'a str,
    pub period_start: DateTime<Utc>,
}

/// Insert inside the caller's transaction, so the row commits only once Redis has applied it.
pub async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    adj: &NewAdjustment<'_>,
) -> Result<i64, DbError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO usage_adjustments (org_id, metric, amount, reason, period_start) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(adj.org.as_str())
    .bind(adj.metric)
    .bind(adj.amount)
    .bind(adj.reason)
    .bind(adj.period_start)
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}
