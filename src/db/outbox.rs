//! The `replay_outbox` table: admitted usage that Redis did not take before a replica stopped
//! (see `local`). Rows are claimed with `SKIP LOCKED`, so replicas applying the outbox at once
//! never apply the same row concurrently; a row is deleted in the transaction that claimed it,
//! after Redis confirmed it.

use sqlx::{PgPool, Postgres, Row, Transaction};

use super::DbError;
use crate::domain::org::OrgId;
use crate::store::Batch;

/// Rows applied per transaction.
const CLAIM_AT_MOST: i64 = 200;

pub async fn put(pool: &PgPool, batches: &[Batch]) -> Result<(), DbError> {
    let mut tx = pool.begin().await?;
    for b in batches {
        sqlx::query(
            "INSERT INTO replay_outbox (id, org_id, idem_key, ttl_ms, specs, compensation) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(b.org.as_str())
        .bind(&b.key)
        .bind(i64::try_from(b.ttl_ms).unwrap_or(i64::MAX))
        .bind(sqlx::types::Json(&b.specs))
        .bind(b.compensation)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Lock the oldest rows nobody else holds. A row whose org id no longer parses is skipped (and
/// logged); it stays for an operator.
pub async fn claim(
    tx: &mut Transaction<'_, Postgres>,
) -> Result<Vec<(uuid::Uuid, Batch)>, DbError> {
    let rows = sqlx::query(
        "SELECT id, org_id, idem_key, ttl_ms, specs, compensation FROM replay_outbox \
         ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(CLAIM_AT_MOST)
    .fetch_all(&mut **tx)
    .await?;
    let mut batches = Vec::with_capacity(rows.len());
    for row in rows {
        let id: uuid::Uuid = row.try_get("id")?;
        let org: String = row.try_get("org_id")?;
        let Ok(org) = OrgId::parse(&org) else {
            tracing::error!(%id, "replay outbox row with an invalid org id; left in place");
            continue;
        };
        let specs: sqlx::types::Json<Vec<crate::store::KeySpec>> = row.try_get("specs")?;
        let ttl: i64 = row.try_get("ttl_ms")?;
        batches.push((
            id,
            Batch {
                org,
                key: row.try_get("idem_key")?,
                ttl_ms: u64::try_from(ttl).unwrap_or(0),
                specs: specs.0,
                compensation: row.try_get("compensation")?,
            },
        ));
    }
    Ok(batches)
}

pub async fn remove(tx: &mut Transaction<'_, Postgres>, ids: &[uuid::Uuid]) -> Result<(), DbError> {
    sqlx::query("DELETE FROM replay_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
