//! The credit use cases shared by the admin API and the billing webhooks: grant, list, void.
//!
//! Postgres first, then Redis: a grant exists in `credit_grants` before any replica can spend
//! it, and a void is marked there before Redis lets go of it, so a restore after a Redis loss
//! never brings back a voided grant nor misses a new one. Spending itself is `decide.lua`'s
//! (see "Credits" there); this module never touches a balance.

use chrono::{DateTime, Utc};

use crate::db::DbError;
use crate::db::credits::{self, GrantRow, Inserted};
use crate::domain::credit::{self, Balance, NewGrant};
use crate::domain::org::OrgId;
use crate::quota::{QuotaError, QuotaService};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CreditError {
    #[error(transparent)]
    Invalid(#[from] credit::GrantError),
    #[error("metric: unknown metric `{0}`")]
    UnknownMetric(String),
    #[error("metric: `{0}` is a gauge; credits pay for counter metrics only")]
    GaugeMetric(String),
    /// A grant with this id exists with other terms.
    #[error("grant_id: a different grant `{0}` exists for this org")]
    Conflict(String),
    #[error("no grant `{0}` for this org")]
    NotFound(String),
    #[error(transparent)]
    Quota(#[from] QuotaError),
}

impl From<DbError> for CreditError {
    fn from(e: DbError) -> Self {
        CreditError::Quota(QuotaError::Db(e))
    }
}

impl From<StoreError> for CreditError {
    fn from(e: StoreError) -> Self {
        CreditError::Quota(QuotaError::Store(e))
    }
}

/// A grant as the API shows it: the row, with its live balance when Redis has it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrantView {
    pub id: String,
    pub grant_id: String,
    pub org_id: String,
    pub metric: String,
    pub amount: i64,
    pub remaining: i64,
    pub spent: i64,
    pub priority: i32,
    pub expires_at: Option<String>,
    pub reason: Option<String>,
    pub source: String,
    pub created_at: String,
    /// active | expired | voided
    pub status: &'static str,
    pub voided_at: Option<String>,
    /// Units that were left when it was voided.
    pub voided: Option<i64>,
}

impl GrantView {
    fn new(row: GrantRow, live: Option<i64>, now: DateTime<Utc>) -> Self {
        let expired = row.expires_at.is_some_and(|e| e <= now);
        let status = if row.voided_at.is_some() {
            "voided"
        } else if expired {
            "expired"
        } else {
            "active"
        };
        let remaining = if row.voided_at.is_some() {
            0
        } else {
            live.unwrap_or(row.remaining)
        };
        let spent = row.amount - remaining - row.voided.unwrap_or(0);
        GrantView {
            grant_id: row.id.clone(),
            id: row.id,
            org_id: row.org_id,
            metric: row.metric,
            amount: row.amount,
            remaining,
            spent: spent.max(0),
            priority: row.priority,
            expires_at: row.expires_at.map(crate::domain::render::rfc3339),
            reason: row.reason,
            source: row.source,
            created_at: crate::domain::render::rfc3339(row.created_at),
            status,
            voided_at: row.voided_at.map(crate::domain::render::rfc3339),
            voided: row.voided,
        }
    }
}

/// What `grant` did.
pub struct Granted {
    pub grant: GrantView,
    /// False: a repeat of an earlier grant with the same id (nothing new was granted).
    pub created: bool,
}

/// Grant credits to `org` (idempotent by `grant.id`: a repeat with the same terms returns the
/// grant, other terms are a conflict). `source`: `admin` or `webhook:<provider>`.
pub async fn grant(
    quota: &QuotaService,
    org: &OrgId,
    grant: &NewGrant,
    source: &str,
) -> Result<Granted, CreditError> {
    let now = quota.now();
    let catalog = quota.catalog();
    let metric = catalog
        .metric(&grant.metric)
        .ok_or_else(|| CreditError::UnknownMetric(grant.metric.clone()))?;
    if metric.kind != crate::domain::plan::MetricKind::Counter {
        return Err(CreditError::GaugeMetric(grant.metric.clone()));
    }
    let pool = quota.directory().pool();
    let (row, created) = match credits::insert(pool, org.as_str(), grant, source).await? {
        Inserted::New(row) => (row, true),
        Inserted::Existing(row) => {
            let same = row.metric == grant.metric
                && row.amount == grant.amount
                && row.priority == grant.priority as i32
                && row.expires_at.map(|e| e.timestamp_millis())
                    == grant.expires_at.map(|e| e.timestamp_millis());
            if !same {
                return Err(CreditError::Conflict(grant.id.clone()));
            }
            (row, false)
        }
    };
    // A repeat also mirrors: the first attempt may have failed after Postgres committed. A voided
    // or expired grant is not put (back) into Redis.
    if row.voided_at.is_none()
        && row.expires_at.is_none_or(|e| e > now)
        && let Err(e) = mirror(quota, org, &row, now).await
    {
        // Not spendable: a new grant is taken back, so an error means nothing was granted (a
        // repeat of an existing one stays, for the next repeat to mirror).
        if created && let Err(undo) = credits::delete_new(pool, org.as_str(), &row.id).await {
            tracing::error!(org = %org, error = %undo, "a grant Redis did not take could not be taken back; repeat it with its grant_id");
        }
        return Err(e);
    }
    if created {
        quota
            .metrics()
            .credit_grants
            .with_label_values(&[if source == "admin" {
                "admin"
            } else {
                "webhook"
            }])
            .inc();
        tracing::info!(org = %org, metric = %row.metric, amount = row.amount, source, "credits granted");
    }
    let live = balances(quota, org, &row.metric)
        .await
        .ok()
        .and_then(|b| b.into_iter().find(|b| b.id == row.id).map(|b| b.remaining));
    Ok(Granted {
        grant: GrantView::new(row, live, now),
        created,
    })
}

/// Put a stored grant into the org's credit hash. Without the org's data in Redis, restore it
/// (which brings every live grant, this one too) and ask again: a restore that read Postgres
/// before this grant was committed then still gets it.
async fn mirror(
    quota: &QuotaService,
    org: &OrgId,
    row: &GrantRow,
    now: DateTime<Utc>,
) -> Result<(), CreditError> {
    let field = credit::field(row.priority.max(0) as u32, row.expires_at, &row.id);
    // A new grant enters whole; a repeat of one Redis already holds changes nothing (HSETNX).
    // GrantError's messages name their field (`amount: ...`), see `domain::credit`.
    let value = credit::value(row.remaining, row.amount);
    let store = quota.store();
    if store
        .add_grant(org, &row.metric, &field, &value)
        .await?
        .is_some()
    {
        return Ok(());
    }
    quota.restore_org(&quota.catalog(), org, now).await?;
    match store.add_grant(org, &row.metric, &field, &value).await? {
        Some(_) => Ok(()),
        None => {
            Err(StoreError::Protocol("resident key missing right after a restore".into()).into())
        }
    }
}

/// The grants of `metric` Redis holds for `org`.
async fn balances(
    quota: &QuotaService,
    org: &OrgId,
    metric: &str,
) -> Result<Vec<Balance>, StoreError> {
    let key = quota.store().keys().credits(org, metric);
    let hashes = quota.store().read_credits(&[key]).await?;
    Ok(hashes
        .into_iter()
        .flat_map(|h| h.fields)
        .filter_map(|(f, v)| Balance::parse(&f, &v))
        .collect())
}

/// Every grant of `org`, with live balances from Redis (from Postgres, as last flushed, when
/// Redis cannot answer: `live` is then false).
pub async fn list(
    quota: &QuotaService,
    org: &OrgId,
) -> Result<(Vec<GrantView>, bool), CreditError> {
    let now = quota.now();
    let rows = credits::list(quota.directory().pool(), org.as_str()).await?;
    let mut metrics: Vec<&str> = rows.iter().map(|r| r.metric.as_str()).collect();
    metrics.dedup();
    let keys: Vec<String> = metrics
        .iter()
        .map(|m| quota.store().keys().credits(org, m))
        .collect();
    let (live, fresh): (Vec<(String, i64)>, bool) = match quota.store().read_credits(&keys).await {
        Ok(hashes) => (
            hashes
                .into_iter()
                .flat_map(|h| h.fields)
                .filter_map(|(f, v)| Balance::parse(&f, &v))
                .map(|b| (b.id, b.remaining))
                .collect(),
            true,
        ),
        Err(e) => {
            tracing::warn!(org = %org, error = %e, "grants listed with balances from Postgres: Redis did not answer");
            (Vec::new(), false)
        }
    };
    let views = rows
        .into_iter()
        .map(|row| {
            let l = live.iter().find(|(id, _)| *id == row.id).map(|(_, r)| *r);
            GrantView::new(row, l, now)
        })
        .collect();
    Ok((views, fresh))
}

/// Void what is left of a grant: 200 with the grant (repeats too).
pub async fn void(quota: &QuotaService, org: &OrgId, id: &str) -> Result<GrantView, CreditError> {
    let now = quota.now();
    let pool = quota.directory().pool();
    let row = credits::void(pool, org.as_str(), id, now)
        .await?
        .ok_or_else(|| CreditError::NotFound(id.to_string()))?;
    if row.voided.is_none() {
        let field = credit::field(row.priority.max(0) as u32, row.expires_at, &row.id);
        let (left, version) = match quota.store().void_grant(org, &row.metric, &field).await? {
            Some(found) => found,
            // Not in Redis (its data lost and not restored yet): what Postgres last knew.
            None => (row.remaining, row.version),
        };
        credits::record_void(pool, org.as_str(), &row.id, left, version).await?;
        tracing::info!(org = %org, metric = %row.metric, left, "credit grant voided");
    }
    let row = credits::get(pool, org.as_str(), id)
        .await?
        .ok_or_else(|| CreditError::NotFound(id.to_string()))?;
    Ok(GrantView::new(row, None, now))
}

/// Units left in the org's unexpired grants, per counter metric it has grants of (one Redis
/// round trip for all of them).
pub async fn remaining(
    quota: &QuotaService,
    catalog: &crate::domain::plan::Catalog,
    org: &OrgId,
) -> Result<Vec<(String, u64)>, CreditError> {
    let now = quota.now();
    let metrics: Vec<&str> = catalog
        .metrics
        .values()
        .filter(|m| m.kind == crate::domain::plan::MetricKind::Counter)
        .map(|m| m.id.as_str())
        .collect();
    let keys: Vec<String> = metrics
        .iter()
        .map(|m| quota.store().keys().credits(org, m))
        .collect();
    let hashes = quota.store().read_credits(&keys).await?;
    Ok(metrics
        .into_iter()
        .zip(hashes)
        .filter_map(|(m, h)| {
            let balances: Vec<Balance> = h
                .fields
                .iter()
                .filter_map(|(f, v)| Balance::parse(f, v))
                .collect();
            credit::totals(&balances, now).map(|(left, _)| (m.to_string(), left))
        })
        .collect())
}
