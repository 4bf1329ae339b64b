//! The `orgs` and `plan_changes` tables (and the `plan.changed` event of each change).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::DbError;
use crate::domain::level::KeyLimits;
use crate::domain::notify::EventType;
use crate::domain::org::OrgId;
use crate::domain::period::{BillingAnchor, BillingCycle, Window};

impl OrgRecord {
    /// The org's billing cycle, which `billing_month` quotas follow.
    pub fn billing_cycle(&self) -> BillingCycle {
        BillingCycle::new(self.billing_anchor, self.billing_carry)
    }
}

fn carry(r: &sqlx::postgres::PgRow) -> Result<Option<Window>, sqlx::Error> {
    let start: Option<DateTime<Utc>> = r.try_get("billing_carry_start")?;
    let end: Option<DateTime<Utc>> = r.try_get("billing_carry_end")?;
    Ok(start.zip(end).map(|(start, end)| Window { start, end }))
}

/// What Postgres knows of an org. `plan_id: None` means the catalog's default plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrgRecord {
    pub plan_id: Option<String>,
    pub billing_anchor: Option<DateTime<Utc>>,
    /// The billing month carried over the last anchor change (see `domain::period`).
    pub billing_carry: Option<Window>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The own quotas of the org's keys that have some, by key id (see `domain::level`); read
    /// by `OrgDirectory` with the row (`db::api_keys::limits_of_org`).
    pub key_limits: BTreeMap<String, KeyLimits>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlanChange {
    pub from_plan: Option<String>,
    pub to_plan: Option<String>,
    pub cause: String,
    pub event_id: Option<String>,
    pub changed_at: DateTime<Utc>,
}

/// The org's row, or a default record when it has none.
pub async fn get(pool: &PgPool, org: &OrgId) -> Result<OrgRecord, DbError> {
    let row = sqlx::query(
        "SELECT plan_id, billing_anchor, billing_carry_start, billing_carry_end, created_at, \
         updated_at FROM orgs WHERE org_id = $1",
    )
    .bind(org.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(r) => OrgRecord {
            plan_id: r.try_get("plan_id")?,
            billing_anchor: r.try_get("billing_anchor")?,
            billing_carry: carry(&r)?,
            created_at: Some(r.try_get("created_at")?),
            updated_at: Some(r.try_get("updated_at")?),
            // Filled by the caller that needs them (`OrgDirectory`).
            key_limits: Default::default(),
        },
        None => OrgRecord::default(),
    })
}

/// Make sure the org has a row (keys reference it) without touching its plan.
pub async fn ensure<'e>(db: impl sqlx::PgExecutor<'e>, org: &OrgId) -> Result<(), DbError> {
    sqlx::query("INSERT INTO orgs (org_id) VALUES ($1) ON CONFLICT (org_id) DO NOTHING")
        .bind(org.as_str())
        .execute(db)
        .await?;
    Ok(())
}

/// Set an org's plan and record the change in `plan_changes`, in one transaction. Returns the
/// previous plan id. A change to the same plan is not recorded again.
pub async fn set_plan(
    pool: &PgPool,
    org: &OrgId,
    plan_id: &str,
    cause: &str,
    event_id: Option<&str>,
) -> Result<Option<String>, DbError> {
    let mut tx = pool.begin().await?;
    let previous = lock_plan(&mut tx, org).await?;
    if previous.as_deref() != Some(plan_id) {
        write_plan(&mut tx, org, previous.as_deref(), plan_id, cause, event_id).await?;
    }
    tx.commit().await?;
    Ok(previous)
}

/// The org's assigned plan, its row created if missing and locked until the transaction ends,
/// so concurrent changes to one org are serialised.
pub async fn lock_plan(
    tx: &mut Transaction<'_, Postgres>,
    org: &OrgId,
) -> Result<Option<String>, DbError> {
    ensure(&mut **tx, org).await?;
    let previous: Option<String> =
        sqlx::query_scalar("SELECT plan_id FROM orgs WHERE org_id = $1 FOR UPDATE")
            .bind(org.as_str())
            .fetch_one(&mut **tx)
            .await?;
    Ok(previous)
}

/// Write a plan change and its audit row inside the caller's transaction (after `lock_plan`).
pub async fn write_plan(
    tx: &mut Transaction<'_, Postgres>,
    org: &OrgId,
    from: Option<&str>,
    to: &str,
    cause: &str,
    event_id: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query("UPDATE orgs SET plan_id = $2, updated_at = now() WHERE org_id = $1")
        .bind(org.as_str())
        .bind(to)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO plan_changes (org_id, from_plan, to_plan, cause, event_id) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(org.as_str())
    .bind(from)
    .bind(to)
    .bind(cause)
    .bind(event_id)
    .execute(&mut **tx)
    .await?;
    // The product hears of every plan change (admin, webhook, scheduled downgrade) through the
    // outbox, committed with the change itself: no change without its event, and no event for
    // a change that rolled back.
    let event = super::notifications::NewEvent {
        id: uuid::Uuid::now_v7(),
        org_id: org.as_str().to_string(),
        type_: EventType::PlanChanged.as_str(),
        payload: crate::domain::notify::plan_changed(
            org.as_str(),
            from,
            to,
            cause,
            event_id,
            Utc::now(),
        ),
    };
    super::notifications::put_in(tx, &event).await?;
    Ok(())
}

/// Where a new billing anchor comes from, which decides how it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnchorSource {
    /// An operator, or a provider's own anchor (Stripe `billing_cycle_anchor`): taken as given.
    Anchor(Option<BillingAnchor>),
    /// A provider that only tells the current period's start: taken unless the org's cycle
    /// already starts a period there (Feb 28 for an anchor on the 31st must not move it).
    PeriodStart(DateTime<Utc>),
}

/// Set the org's billing anchor at `now` inside the caller's transaction (after `lock_plan`,
/// which creates and locks the row), carrying the period in progress (see
/// `BillingCycle::with_anchor`). Returns whether the org's cycle changed.
pub async fn set_billing_anchor(
    tx: &mut Transaction<'_, Postgres>,
    org: &OrgId,
    source: AnchorSource,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT billing_anchor, billing_carry_start, billing_carry_end FROM orgs \
         WHERE org_id = $1 FOR UPDATE",
    )
    .bind(org.as_str())
    .fetch_one(&mut **tx)
    .await?;
    let old = BillingCycle::new(row.try_get("billing_anchor")?, carry(&row)?);
    let anchor = match source {
        AnchorSource::Anchor(a) => a,
        AnchorSource::PeriodStart(start) if old.anchor.is_some() && old.starts_at(start) => {
            return Ok(false);
        }
        AnchorSource::PeriodStart(start) => Some(start),
    };
    if anchor == old.anchor {
        return Ok(false);
    }
    let new = old.with_anchor(anchor, now);
    sqlx::query(
        "UPDATE orgs SET billing_anchor = $2, billing_carry_start = $3, billing_carry_end = $4, \
         updated_at = now() WHERE org_id = $1",
    )
    .bind(org.as_str())
    .bind(new.anchor)
    .bind(new.carry.map(|w| w.start))
    .bind(new.carry.map(|w| w.end))
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

pub async fn recent_plan_changes(
    pool: &PgPool,
    org: &OrgId,
    limit: i64,
) -> Result<Vec<PlanChange>, DbError> {
    let rows = sqlx::query(
        "SELECT from_plan, to_plan, cause, event_id, changed_at FROM plan_changes \
         WHERE org_id = $1 ORDER BY changed_at DESC, id DESC LIMIT $2",
    )
    .bind(org.as_str())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(PlanChange {
                from_plan: r.try_get("from_plan")?,
                to_plan: r.try_get("to_plan")?,
                cause: r.try_get("cause")?,
                event_id: r.try_get("event_id")?,
                changed_at: r.try_get("changed_at")?,
            })
        })
        .collect()
}

/// Which orgs a listing keeps, by the plan they are on as the gateway sees it.
#[derive(Debug, Clone, Copy)]
pub enum PlanFilter<'a> {
    Any,
    /// Orgs assigned this plan (not the default one).
    Assigned(&'a str),
    /// Orgs on the default plan `id`: none assigned, `id` assigned, or a plan the catalog no
    /// longer declares (`known` lists those it does), since the gateway treats all three alike.
    Default {
        id: &'a str,
        known: &'a [String],
    },
}

/// One row of an org listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedOrg {
    pub org_id: String,
    pub record: OrgRecord,
}

/// Up to `limit` stored orgs with ids after `after`, in id order. Keyset pagination: a page
/// starts where the previous one ended whatever was inserted meanwhile, and the primary key's
/// index serves every page in the same time (no OFFSET scan).
pub async fn list(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
    filter: PlanFilter<'_>,
) -> Result<Vec<ListedOrg>, DbError> {
    // $3 = 0: any plan; 1: assigned $4; 2: on the default plan $4, whose known plans are $5.
    let (mode, plan, known): (i32, Option<&str>, &[String]) = match filter {
        PlanFilter::Any => (0, None, &[]),
        PlanFilter::Assigned(id) => (1, Some(id), &[]),
        PlanFilter::Default { id, known } => (2, Some(id), known),
    };
    let rows = sqlx::query(
        "SELECT org_id, plan_id, billing_anchor, billing_carry_start, billing_carry_end, \
                created_at, updated_at FROM orgs \
         WHERE ($1::text IS NULL OR org_id > $1) \
           AND ($3 = 0 \
                OR ($3 = 1 AND plan_id = $4) \
                OR ($3 = 2 AND (plan_id IS NULL OR plan_id = $4 OR plan_id <> ALL($5)))) \
         ORDER BY org_id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(mode)
    .bind(plan)
    .bind(known)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ListedOrg {
                org_id: r.try_get("org_id")?,
                record: OrgRecord {
                    plan_id: r.try_get("plan_id")?,
                    billing_anchor: r.try_get("billing_anchor")?,
                    billing_carry: carry(&r)?,
                    created_at: Some(r.try_get("created_at")?),
                    updated_at: Some(r.try_get("updated_at")?),
                    // A listing shows org-level usage only.
                    key_limits: Default::default(),
                },
            })
        })
        .collect()
}
