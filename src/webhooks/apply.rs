//! Applying one verified, normalized event to Postgres, in one transaction: record the delivery
//! (a redelivery stops here), lock the subscription, apply the ordering rule, store the new
//! state, and move the org to the best plan its subscriptions grant now. The caller announces a
//! plan change to the replicas only after the commit.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use crate::db::billing::{self as store, SubscriptionRow};
use crate::db::{DbError, orgs};
use crate::domain::org::OrgId;
use crate::domain::plan::Catalog;
use crate::domain::subscription::{
    Ordering, StoredSubscription, SubscriptionStatus, effective_plan, ordering,
};
use crate::webhooks::event::{Normalized, ParsedEvent, SubscriptionEvent};
use crate::webhooks::{BillingProvider, BillingSettings};

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Seen before: no second effect.
    Duplicate,
    /// Authentic but not about subscriptions.
    Ignored,
    /// Linked a provider customer to an org.
    Linked,
    /// Granted credits (see `webhooks::credits`, which does it before the event is recorded).
    Credited,
    /// No org could be found for it (no metadata, no earlier link).
    Unlinked,
    /// Older than what was applied, or after the subscription ended for good.
    Stale,
    Processed {
        org: OrgId,
        plan_changed: bool,
        /// The org the subscription moved away from (its metadata now names `org`), when losing
        /// it changed that org's plan.
        left: Option<OrgId>,
    },
}

impl Applied {
    pub fn label(&self) -> &'static str {
        match self {
            Applied::Duplicate => "duplicate",
            Applied::Ignored => "ignored",
            Applied::Linked => "linked",
            Applied::Credited => "credited",
            Applied::Unlinked => "unlinked",
            Applied::Stale => "stale",
            Applied::Processed { .. } => "processed",
        }
    }
}

/// How plans follow subscriptions.
pub struct Policy<'a> {
    pub catalog: &'a Catalog,
    pub grace: chrono::Duration,
    pub auto_downgrade: bool,
}

impl<'a> Policy<'a> {
    pub fn new(catalog: &'a Catalog, billing: &BillingSettings) -> Self {
        Self {
            catalog,
            grace: chrono::Duration::from_std(billing.grace_period)
                .unwrap_or(chrono::Duration::MAX),
            auto_downgrade: billing.auto_downgrade,
        }
    }
}

pub async fn apply(
    pool: &PgPool,
    provider: &BillingProvider,
    policy: &Policy<'_>,
    event: &ParsedEvent,
    now: DateTime<Utc>,
) -> Result<Applied, DbError> {
    let pkey = provider.kind.key();
    let mut tx = pool.begin().await?;
    if !store::insert_event(&mut tx, &pkey, &event.event_id, &event.event_type).await? {
        return Ok(Applied::Duplicate);
    }
    let applied = match &event.normalized {
        Normalized::Ignored { .. } => Applied::Ignored,
        Normalized::CustomerLink {
            customer_id,
            org_id,
            ..
        } => match OrgId::parse(org_id) {
            Ok(org) => {
                store::link_customer(&mut tx, &pkey, customer_id, org.as_str()).await?;
                Applied::Linked
            }
            Err(_) => Applied::Unlinked,
        },
        Normalized::Subscription(ev) => {
            apply_subscription(&mut tx, &pkey, provider, policy, event, ev, now).await?
        }
        Normalized::Purchase(_) | Normalized::CreditGrant(_) => Applied::Credited,
    };
    let org = match &applied {
        Applied::Processed { org, .. } => Some(org.as_str()),
        _ => None,
    };
    store::set_event_status(&mut tx, &pkey, &event.event_id, applied.label(), org).await?;
    tx.commit().await?;
    Ok(applied)
}

async fn apply_subscription(
    tx: &mut Transaction<'_, Postgres>,
    pkey: &str,
    provider: &BillingProvider,
    policy: &Policy<'_>,
    event: &ParsedEvent,
    ev: &SubscriptionEvent,
    now: DateTime<Utc>,
) -> Result<Applied, DbError> {
    let stored = store::lock_subscription(tx, pkey, &ev.subscription_id).await?;
    let mut org_raw = ev
        .org_id
        .clone()
        .or_else(|| stored.as_ref().map(|s| s.org_id.clone()));
    if org_raw.is_none()
        && let Some(customer) = &ev.customer_id
    {
        org_raw = store::customer_org(tx, pkey, customer).await?;
    }
    let Some(org) = org_raw.and_then(|o| OrgId::parse(&o).ok()) else {
        return Ok(Applied::Unlinked);
    };
    if let (Some(_), Some(customer)) = (&ev.org_id, &ev.customer_id) {
        store::link_customer(tx, pkey, customer, org.as_str()).await?;
    }
    let prev = stored.as_ref().map(|s| &s.state);
    if ordering(prev, ev.occurred_at, ev.terminal) != Ordering::Apply {
        return Ok(Applied::Stale);
    }
    let status = ev
        .status
        .or(prev.map(|p| p.status))
        .unwrap_or(SubscriptionStatus::Active);
    let product_id = ev
        .product_id
        .clone()
        .or_else(|| stored.as_ref().and_then(|s| s.product_id.clone()));
    let plan_if_active = product_id
        .as_ref()
        .and_then(|p| provider.plans.get(p).cloned());
    if let (Some(p), None) = (&product_id, &plan_if_active) {
        tracing::warn!(provider = pkey, product = %p, "product not mapped to a plan; the org gets the default plan");
    }
    let state = StoredSubscription {
        plan_if_active,
        status,
        terminal: prev.is_some_and(|p| p.terminal) || ev.terminal,
        current_period_end: ev
            .current_period_end
            .or(prev.and_then(|p| p.current_period_end)),
        cancel_at_period_end: ev
            .cancel_at_period_end
            .unwrap_or(prev.is_some_and(|p| p.cancel_at_period_end)),
        status_since: match prev {
            Some(p) if p.status == status => p.status_since,
            _ => ev.occurred_at,
        },
        last_event_at: prev.map_or(ev.occurred_at, |p| p.last_event_at.max(ev.occurred_at)),
    };
    let row = SubscriptionRow {
        provider: pkey.to_string(),
        subscription_id: ev.subscription_id.clone(),
        org_id: org.as_str().to_string(),
        customer_id: ev
            .customer_id
            .clone()
            .or_else(|| stored.as_ref().and_then(|s| s.customer_id.clone())),
        product_id,
        next_change_at: None,
        state,
    };
    store::upsert_subscription(tx, &row).await?;
    let plan_changed = settle_org(tx, &org, policy, now, "webhook", Some(&event.event_id)).await?;
    // A subscription that moved to another org no longer counts for the one it left.
    let moved_from = stored
        .as_ref()
        .filter(|s| s.org_id != org.as_str())
        .and_then(|s| OrgId::parse(&s.org_id).ok());
    let mut left = None;
    if let Some(old) = moved_from
        && settle_org(tx, &old, policy, now, "webhook", Some(&event.event_id)).await?
    {
        left = Some(old);
    }
    Ok(Applied::Processed {
        org,
        plan_changed,
        left,
    })
}

/// Move `org` to the best plan any of its subscriptions grants at `now` (never down when
/// `auto_downgrade` is off), and store when each subscription must be looked at again.
/// Returns whether the plan changed.
pub async fn settle_org(
    tx: &mut Transaction<'_, Postgres>,
    org: &OrgId,
    policy: &Policy<'_>,
    now: DateTime<Utc>,
    cause: &str,
    event_id: Option<&str>,
) -> Result<bool, DbError> {
    // Lock the org before reading its subscriptions: a concurrent event for another of them then
    // commits first, and (each statement seeing the latest commits) is read here, instead of this
    // transaction settling the org from a view that was stale by the time it got the lock.
    let assigned = orgs::lock_plan(tx, org).await?;
    let catalog = policy.catalog;
    let default = catalog.default_plan.as_str();
    let mut target: Option<String> = None;
    for sub in store::org_subscriptions(&mut **tx, org.as_str()).await? {
        let eff = effective_plan(&sub.state, default, policy.grace, now);
        if sub.next_change_at != eff.next_change_at {
            store::set_next_change(tx, &sub.provider, &sub.subscription_id, eff.next_change_at)
                .await?;
        }
        if target
            .as_deref()
            .is_none_or(|t| catalog.rank(&eff.plan) > catalog.rank(t))
        {
            target = Some(eff.plan);
        }
    }
    let target = target.unwrap_or_else(|| default.to_string());
    if catalog.plan(&target).is_none() {
        tracing::warn!(org = %org, plan = %target, "mapped plan is not in the catalog; leaving the org as it is");
        return Ok(false);
    }
    let current = catalog.plan_or_default(assigned.as_deref()).id.clone();
    if target == current {
        return Ok(false);
    }
    if !policy.auto_downgrade && catalog.rank(&target) < catalog.rank(&current) {
        tracing::info!(org = %org, from = %current, to = %target, "downgrade held: auto_downgrade is off");
        return Ok(false);
    }
    orgs::write_plan(tx, org, assigned.as_deref(), &target, cause, event_id).await?;
    tracing::info!(org = %org, from = %current, to = %target, cause, "plan changed by billing");
    Ok(true)
}
