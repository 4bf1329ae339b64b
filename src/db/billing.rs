//! `webhook_events`, `subscriptions` and `billing_customers`: what payment providers told us.
//! Every function takes the caller's transaction, so one event is applied all at once or not
//! at all (a failure leaves the event unrecorded and the provider retries).

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};

use super::DbError;
use crate::domain::subscription::{StoredSubscription, SubscriptionStatus};

type Tx<'a, 'b> = &'a mut Transaction<'b, Postgres>;

/// Record a delivery; `false` when (provider, event id) was seen before.
pub async fn insert_event(
    tx: Tx<'_, '_>,
    provider: &str,
    event_id: &str,
    event_type: &str,
) -> Result<bool, DbError> {
    let inserted = sqlx::query(
        "INSERT INTO webhook_events (provider, event_id, event_type, status) \
         VALUES ($1, $2, $3, 'received') ON CONFLICT (provider, event_id) DO NOTHING",
    )
    .bind(provider)
    .bind(event_id)
    .bind(event_type)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

pub async fn set_event_status(
    tx: Tx<'_, '_>,
    provider: &str,
    event_id: &str,
    status: &str,
    org_id: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE webhook_events SET status = $3, org_id = $4 WHERE provider = $1 AND event_id = $2",
    )
    .bind(provider)
    .bind(event_id)
    .bind(status)
    .bind(org_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn link_customer(
    tx: Tx<'_, '_>,
    provider: &str,
    customer_id: &str,
    org_id: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO billing_customers (provider, customer_id, org_id) VALUES ($1, $2, $3) \
         ON CONFLICT (provider, customer_id) DO UPDATE SET org_id = EXCLUDED.org_id",
    )
    .bind(provider)
    .bind(customer_id)
    .bind(org_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn customer_org(
    tx: Tx<'_, '_>,
    provider: &str,
    customer_id: &str,
) -> Result<Option<String>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT org_id FROM billing_customers WHERE provider = $1 AND customer_id = $2",
    )
    .bind(provider)
    .bind(customer_id)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Serialise, until the transaction ends, every event touching this provider's customer or
/// subscription `id` (`kind`: "customer" or "subscription"). Without it an event kept as unlinked
/// and the event linking its customer could commit side by side, each unable to see the other,
/// and the kept event would wait for a link that already happened. Callers take subscription
/// before customer locks; should two events still wait on each other (settling kept events of
/// another subscription), Postgres breaks the deadlock, one answers 500 and its provider retries.
pub async fn lock_billing_key(
    tx: Tx<'_, '_>,
    provider: &str,
    kind: &str,
    id: &str,
) -> Result<(), DbError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2 || ':' || $3, 0))")
        .bind(provider)
        .bind(kind)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Keep a subscription event whose org is not known yet (see `webhooks::apply`): its normalized
/// state only, never the payload.
pub async fn keep_unlinked(tx: Tx<'_, '_>, ev: &KeptEvent<'_>) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO unlinked_subscription_events \
           (provider, event_id, subscription_id, customer_id, occurred_at, event) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb) ON CONFLICT (provider, event_id) DO NOTHING",
    )
    .bind(ev.provider)
    .bind(ev.event_id)
    .bind(ev.subscription_id)
    .bind(ev.customer_id)
    .bind(ev.occurred_at)
    .bind(ev.state_json)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A subscription event kept until its org is known.
pub struct KeptEvent<'a> {
    pub provider: &'a str,
    pub event_id: &'a str,
    pub subscription_id: &'a str,
    pub customer_id: Option<&'a str>,
    pub occurred_at: DateTime<Utc>,
    /// The normalized event as JSON.
    pub state_json: &'a str,
}

/// Take (remove and return) the kept events of `customer` or `subscription`, oldest first:
/// (event id, normalized event as JSON).
pub async fn take_unlinked(
    tx: Tx<'_, '_>,
    provider: &str,
    customer: Option<&str>,
    subscription: Option<&str>,
) -> Result<Vec<(String, String)>, DbError> {
    let mut rows: Vec<(String, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "DELETE FROM unlinked_subscription_events \
         WHERE provider = $1 AND (customer_id = $2 OR subscription_id = $3) \
         RETURNING event_id, event::text, occurred_at, received_at",
    )
    .bind(provider)
    .bind(customer)
    .bind(subscription)
    .fetch_all(&mut **tx)
    .await?;
    rows.sort_by_key(|r| (r.2, r.3));
    Ok(rows.into_iter().map(|(id, ev, ..)| (id, ev)).collect())
}

/// Delete at most `limit` kept events received before `before` (never linked: their customer
/// never reached an org). Returns how many went. Safe on several replicas at once.
pub async fn prune_unlinked(
    pool: &sqlx::PgPool,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<u64, DbError> {
    let done = sqlx::query(
        "DELETE FROM unlinked_subscription_events WHERE (provider, event_id) IN ( \
           SELECT provider, event_id FROM unlinked_subscription_events \
           WHERE received_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(before)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A subscription row as stored, with its org.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub provider: String,
    pub subscription_id: String,
    pub org_id: String,
    pub customer_id: Option<String>,
    pub product_id: Option<String>,
    pub state: StoredSubscription,
    pub next_change_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "provider, subscription_id, org_id, customer_id, product_id, plan_if_active, \
     status, terminal, current_period_end, cancel_at_period_end, status_since, last_event_at, \
     next_change_at";

fn row_to_subscription(r: &sqlx::postgres::PgRow) -> Result<SubscriptionRow, DbError> {
    let status: String = r.try_get("status")?;
    Ok(SubscriptionRow {
        provider: r.try_get("provider")?,
        subscription_id: r.try_get("subscription_id")?,
        org_id: r.try_get("org_id")?,
        customer_id: r.try_get("customer_id")?,
        product_id: r.try_get("product_id")?,
        state: StoredSubscription {
            plan_if_active: r.try_get("plan_if_active")?,
            status: SubscriptionStatus::parse(&status).unwrap_or(SubscriptionStatus::Canceled),
            terminal: r.try_get("terminal")?,
            current_period_end: r.try_get("current_period_end")?,
            cancel_at_period_end: r.try_get("cancel_at_period_end")?,
            status_since: r.try_get("status_since")?,
            last_event_at: r.try_get("last_event_at")?,
        },
        next_change_at: r.try_get("next_change_at")?,
    })
}

/// The subscription, locked until the transaction ends (events of one subscription apply one at
/// a time, whatever replica receives them).
pub async fn lock_subscription(
    tx: Tx<'_, '_>,
    provider: &str,
    subscription_id: &str,
) -> Result<Option<SubscriptionRow>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE provider = $1 AND subscription_id = $2 FOR UPDATE"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(provider)
        .bind(subscription_id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(row_to_subscription).transpose()
}

pub async fn upsert_subscription(tx: Tx<'_, '_>, s: &SubscriptionRow) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO subscriptions (provider, subscription_id, org_id, customer_id, product_id, \
           plan_if_active, status, terminal, current_period_end, cancel_at_period_end, \
           status_since, last_event_at, next_change_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (provider, subscription_id) DO UPDATE SET \
           org_id = EXCLUDED.org_id, customer_id = EXCLUDED.customer_id, \
           product_id = EXCLUDED.product_id, plan_if_active = EXCLUDED.plan_if_active, \
           status = EXCLUDED.status, terminal = EXCLUDED.terminal, \
           current_period_end = EXCLUDED.current_period_end, \
           cancel_at_period_end = EXCLUDED.cancel_at_period_end, \
           status_since = EXCLUDED.status_since, last_event_at = EXCLUDED.last_event_at, \
           next_change_at = EXCLUDED.next_change_at, updated_at = now()",
    )
    .bind(&s.provider)
    .bind(&s.subscription_id)
    .bind(&s.org_id)
    .bind(&s.customer_id)
    .bind(&s.product_id)
    .bind(&s.state.plan_if_active)
    .bind(s.state.status.as_str())
    .bind(s.state.terminal)
    .bind(s.state.current_period_end)
    .bind(s.state.cancel_at_period_end)
    .bind(s.state.status_since)
    .bind(s.state.last_event_at)
    .bind(s.next_change_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn set_next_change(
    tx: Tx<'_, '_>,
    provider: &str,
    subscription_id: &str,
    next: Option<DateTime<Utc>>,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE subscriptions SET next_change_at = $3 WHERE provider = $1 AND subscription_id = $2",
    )
    .bind(provider)
    .bind(subscription_id)
    .bind(next)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every subscription of an org (an org's plan is the best any of them grants), inside a
/// transaction or not.
pub async fn org_subscriptions<'e>(
    db: impl sqlx::PgExecutor<'e>,
    org_id: &str,
) -> Result<Vec<SubscriptionRow>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE org_id = $1 ORDER BY provider, subscription_id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(org_id)
        .fetch_all(db)
        .await?;
    rows.iter().map(row_to_subscription).collect()
}

/// Orgs with a subscription whose plan may change by `now`, locked so that replicas running
/// the job at once each take different ones.
pub async fn lock_due_orgs(
    tx: Tx<'_, '_>,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT org_id FROM subscriptions WHERE next_change_at <= $1 \
         ORDER BY next_change_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    let mut orgs = rows;
    orgs.sort();
    orgs.dedup();
    Ok(orgs)
}
