//! The `api_keys` table. Only SHA-256 hashes of keys are stored; a lookup hashes the presented
//! key and finds it by the unique hash index, so no key comparison happens in application code.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use std::collections::BTreeMap;

use super::DbError;
use crate::domain::level::{KeyLimits, KeyQuota};
use crate::domain::org::OrgId;

/// Every key starts with this, so leaked keys are recognisable by secret scanners.
pub const KEY_PREFIX: &str = "qg_";

/// A freshly generated key: the only moment the plaintext exists.
pub struct NewKey {
    pub id: Uuid,
    pub key: String,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: String,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// `qg_` followed by 32 random bytes in hex (256 bits from the OS RNG).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

pub async fn create(pool: &PgPool, org: &OrgId, name: &str) -> Result<NewKey, DbError> {
    let key = generate_key();
    let id = Uuid::now_v7();
    let key_prefix: String = key.chars().take(KEY_PREFIX.len() + 8).collect();
    let mut tx = pool.begin().await?;
    super::orgs::ensure(&mut *tx, org).await?;
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO api_keys (id, org_id, name, key_hash, key_prefix) \
         VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
    )
    .bind(id)
    .bind(org.as_str())
    .bind(name)
    .bind(hash_key(&key))
    .bind(&key_prefix)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(NewKey {
        id,
        key,
        key_prefix,
        created_at,
    })
}

/// Revoke a key; returns its org when a live key was revoked, `None` when there was none.
pub async fn revoke(pool: &PgPool, id: Uuid) -> Result<Option<String>, DbError> {
    let org: Option<String> = sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL \
         RETURNING org_id",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(org)
}

/// The org and id of a live (unrevoked) key.
pub async fn find_org(pool: &PgPool, key: &str) -> Result<Option<(String, Uuid)>, DbError> {
    let row: Option<(String, Uuid)> = sqlx::query_as(
        "SELECT org_id, id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash_key(key))
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

pub async fn list_for_org(pool: &PgPool, org: &OrgId) -> Result<Vec<KeyInfo>, DbError> {
    let rows = sqlx::query(
        "SELECT id, name, key_prefix, created_at, revoked_at FROM api_keys \
         WHERE org_id = $1 ORDER BY created_at",
    )
    .bind(org.as_str())
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(KeyInfo {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                key_prefix: r.try_get("key_prefix")?,
                created_at: r.try_get("created_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .collect()
}

/// A key's own quotas (`None`: the plan's per-key quotas apply) and its org, for a live key;
/// `None` when there is no live key with that id.
pub async fn limits(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<(String, Option<Vec<KeyQuota>>)>, DbError> {
    let row =
        sqlx::query("SELECT org_id, limits FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Option<serde_json::Value> = row.try_get("limits")?;
    Ok(Some((row.try_get("org_id")?, stored.map(parse_stored))))
}

/// Set (`Some`) or clear (`None`) a live key's own quotas; returns its org, or `None` when there
/// is no live key with that id.
pub async fn set_limits(
    pool: &PgPool,
    id: Uuid,
    quotas: Option<&[KeyQuota]>,
) -> Result<Option<String>, DbError> {
    let value = quotas.map(|q| serde_json::to_value(q).unwrap_or_default());
    let org: Option<String> = sqlx::query_scalar(
        "UPDATE api_keys SET limits = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING org_id",
    )
    .bind(id)
    .bind(value)
    .fetch_optional(pool)
    .await?;
    Ok(org)
}

/// The own quotas of every live key of an org that has some, by key id: read with the org's
/// record, so every replica sees a change with the org's next change message.
pub async fn limits_of_org(
    pool: &PgPool,
    org: &OrgId,
) -> Result<BTreeMap<String, KeyLimits>, DbError> {
    let rows = sqlx::query(
        "SELECT id, limits FROM api_keys \
         WHERE org_id = $1 AND revoked_at IS NULL AND limits IS NOT NULL",
    )
    .bind(org.as_str())
    .fetch_all(pool)
    .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let id: Uuid = r.try_get("id")?;
        let stored: serde_json::Value = r.try_get("limits")?;
        out.insert(
            id.to_string(),
            KeyLimits::from_stored(&parse_stored(stored)),
        );
    }
    Ok(out)
}

fn parse_stored(v: serde_json::Value) -> Vec<KeyQuota> {
    serde_json::from_value(v).unwrap_or_default()
}
