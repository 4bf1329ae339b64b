//! The `notifications` outbox and `notification_endpoints` (an org's own receiver).
//!
//! Delivery claims due rows with `FOR UPDATE SKIP LOCKED` and, in the same statement, pushes
//! their next attempt out by a lease: the claim commits at once (no transaction held open over
//! HTTP), no other replica takes the rows while they are being sent, and a replica that dies
//! mid-delivery only delays them by the lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::DbError;

/// Postgres intervals hold microseconds; a jittered wait has nanoseconds.
fn micros(d: Duration) -> Duration {
    Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// An event to write to the outbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// UUID v7: the `webhook-id` of every attempt.
    pub id: uuid::Uuid,
    pub org_id: String,
    pub type_: &'static str,
    pub payload: serde_json::Value,
}

/// Write events in one transaction.
pub async fn put(pool: &PgPool, events: &[NewEvent]) -> Result<(), DbError> {
    let mut tx = pool.begin().await?;
    for e in events {
        put_in(&mut tx, e).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Write an event inside the caller's transaction (a plan change and its event commit together).
pub async fn put_in(tx: &mut Transaction<'_, Postgres>, e: &NewEvent) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO notifications (id, org_id, type, payload) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(e.id)
    .bind(&e.org_id)
    .bind(e.type_)
    .bind(&e.payload)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A claimed event and where it may go.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: uuid::Uuid,
    pub org_id: String,
    pub type_: String,
    /// The exact body to send.
    pub body: String,
    /// Including this one.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    /// Destinations that already answered 2xx.
    pub delivered_to: Vec<String>,
    /// The org's own endpoint (url, secret) when it has an enabled one.
    pub endpoint: Option<(String, secrecy::SecretString)>,
}

/// Claim up to `limit` due events for `lease`.
pub async fn claim(pool: &PgPool, limit: i64, lease: Duration) -> Result<Vec<Claimed>, DbError> {
    let rows = sqlx::query(
        "WITH due AS ( \
             SELECT id FROM notifications \
             WHERE status = 'pending' AND next_attempt_at <= now() \
             ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
         UPDATE notifications n \
         SET attempts = n.attempts + 1, next_attempt_at = now() + $2, updated_at = now() \
         FROM due WHERE n.id = due.id \
         RETURNING n.id, n.org_id, n.type, n.payload::text AS body, n.attempts, n.created_at, \
                   n.delivered_to, \
                   (SELECT url FROM notification_endpoints e \
                    WHERE e.org_id = n.org_id AND e.disabled_at IS NULL) AS endpoint_url, \
                   (SELECT secret FROM notification_endpoints e \
                    WHERE e.org_id = n.org_id AND e.disabled_at IS NULL) AS endpoint_secret",
    )
    .bind(limit)
    .bind(micros(lease))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let url: Option<String> = r.try_get("endpoint_url")?;
            let secret: Option<String> = r.try_get("endpoint_secret")?;
            Ok(Claimed {
                id: r.try_get("id")?,
                org_id: r.try_get("org_id")?,
                type_: r.try_get("type")?,
                body: r.try_get("body")?,
                attempts: r.try_get("attempts")?,
                created_at: r.try_get("created_at")?,
                delivered_to: r.try_get("delivered_to")?,
                endpoint: url.zip(secret.map(secrecy::SecretString::from)),
            })
        })
        .collect()
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Delivered,
    /// Try again after this long.
    Retry(Duration),
    Failed,
}

/// Record an attempt: the destinations that now have it, the row's new state, the last error.
pub async fn settle(
    pool: &PgPool,
    id: uuid::Uuid,
    delivered_to: &[String],
    outcome: &Settled,
    last_error: Option<&str>,
) -> Result<(), DbError> {
    let (status, wait) = match outcome {
        Settled::Delivered => ("delivered", Duration::ZERO),
        Settled::Retry(d) => ("pending", *d),
        Settled::Failed => ("failed", Duration::ZERO),
    };
    sqlx::query(
        "UPDATE notifications SET status = $2, delivered_to = $3, last_error = $4, \
         next_attempt_at = now() + $5, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(delivered_to)
    .bind(last_error)
    .bind(micros(wait))
    .execute(pool)
    .await?;
    Ok(())
}

/// Remove delivered and failed events settled more than `retain` ago; returns how many.
pub async fn prune(pool: &PgPool, retain: Duration) -> Result<u64, DbError> {
    let done = sqlx::query(
        "DELETE FROM notifications WHERE status <> 'pending' AND updated_at < now() - $1",
    )
    .bind(micros(retain))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Seconds since the oldest pending event was written (0 when none).
pub async fn oldest_pending_age(pool: &PgPool) -> Result<f64, DbError> {
    let age: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM notifications \
         WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    Ok(age.unwrap_or(0.0).max(0.0))
}

/// One event as the admin API lists it (never its payload).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub id: uuid::Uuid,
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

pub async fn recent(pool: &PgPool, org_id: &str, limit: i64) -> Result<Vec<Listed>, DbError> {
    let rows = sqlx::query(
        "SELECT id, type, status, attempts, last_error, created_at, next_attempt_at \
         FROM notifications WHERE org_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
    )
    .bind(org_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let status: String = r.try_get("status")?;
            let next: DateTime<Utc> = r.try_get("next_attempt_at")?;
            Ok(Listed {
                id: r.try_get("id")?,
                type_: r.try_get("type")?,
                next_attempt_at: (status == "pending").then_some(next),
                status,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// An org's endpoint as the admin API shows it (never its secret).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoint {
    pub url: String,
    /// True after it answered 410 Gone: nothing more is sent until it is set again.
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
}

/// Set (or replace, re-enabling it) an org's endpoint and its secret.
pub async fn put_endpoint(
    pool: &PgPool,
    org_id: &str,
    url: &str,
    secret: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO notification_endpoints (org_id, url, secret) VALUES ($1, $2, $3) \
         ON CONFLICT (org_id) DO UPDATE SET url = $2, secret = $3, disabled_at = NULL, \
         created_at = now()",
    )
    .bind(org_id)
    .bind(url)
    .bind(secret)
    .execute(pool)
    .await?;
    Ok(())
}

/// Remove an org's endpoint; false when it had none.
pub async fn delete_endpoint(pool: &PgPool, org_id: &str) -> Result<bool, DbError> {
    let done = sqlx::query("DELETE FROM notification_endpoints WHERE org_id = $1")
        .bind(org_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub async fn endpoint(pool: &PgPool, org_id: &str) -> Result<Option<Endpoint>, DbError> {
    let row = sqlx::query(
        "SELECT url, disabled_at IS NOT NULL AS disabled, created_at \
         FROM notification_endpoints WHERE org_id = $1",
    )
    .bind(org_id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Endpoint {
            url: r.try_get("url")?,
            disabled: r.try_get("disabled")?,
            created_at: r.try_get("created_at")?,
        })
    })
    .transpose()
}

/// The endpoint answered 410 Gone: stop sending to it (only if it is still the same URL).
pub async fn disable_endpoint(pool: &PgPool, org_id: &str, url: &str) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE notification_endpoints SET disabled_at = now() \
         WHERE org_id = $1 AND url = $2 AND disabled_at IS NULL",
    )
    .bind(org_id)
    .bind(url)
    .execute(pool)
    .await?;
    Ok(())
}
