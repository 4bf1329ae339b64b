//! The `api_keys` table. Only SHA-256 hashes of keys are stored; a lookup hashes the presented
//! key and finds it by the unique hash index, so no key comparison happens in application code.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::DbError;
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

/// The org of a live (unrevoked) key.
pub async fn find_org(pool: &PgPool, key: &str) -> Result<Option<String>, DbError> {
    let org: Option<String> = sqlx::query_scalar(
        "SELECT org_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash_key(key))
    .fetch_optional(pool)
    .await?;
    Ok(org)
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
