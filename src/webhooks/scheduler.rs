//! The scheduled half of the lifecycle: downgrades that fall due without a new event (a
//! cancellation at period end, a past-due grace that expired), and forgetting subscription
//! events kept unlinked for longer than `UNLINKED_KEPT`. `try_apply_due_once` and
//! `prune_unlinked_once` are the steps; `run` only calls them every minute. Safe on several replicas at once: due rows are taken with
//! `FOR UPDATE SKIP LOCKED`, and settling an org twice is a no-op.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::db::DbError;
use crate::directory::Change;
use crate::domain::org::OrgId;
use crate::webhooks::Webhooks;
use crate::webhooks::apply::{Policy, settle_org};

const EVERY: Duration = Duration::from_secs(60);
/// Orgs settled per transaction.
const BATCH: i64 = 200;
/// How long a subscription event whose customer no org has claimed is kept for the event that
/// links it (a checkout delivered late, a retry days later): providers retry for about three
/// days, and a link that has not come in a month is not coming.
pub const UNLINKED_KEPT: chrono::Duration = chrono::Duration::days(30);
/// Kept events forgotten per step.
const PRUNE_BATCH: i64 = 1000;

/// Forget the unlinked events received more than `UNLINKED_KEPT` before `now`; returns how many.
pub async fn prune_unlinked_once(state: &Webhooks, now: DateTime<Utc>) -> Result<u64, DbError> {
    crate::db::billing::prune_unlinked(&state.pool, now - UNLINKED_KEPT, PRUNE_BATCH).await
}

/// Apply every downgrade due at `now`; returns the orgs whose plan changed.
pub async fn try_apply_due_once(
    state: &Webhooks,
    now: DateTime<Utc>,
) -> Result<Vec<OrgId>, DbError> {
    let Some(billing) = state.billing.as_ref() else {
        return Ok(Vec::new());
    };
    if !billing.auto_downgrade {
        return Ok(Vec::new());
    }
    let catalog = state.quota.catalog();
    let policy = Policy::new(&catalog, billing);
    let mut tx = state.pool.begin().await?;
    let mut changed = Vec::new();
    for org in crate::db::billing::lock_due_orgs(&mut tx, now, BATCH).await? {
        let Ok(org) = OrgId::parse(&org) else {
            continue;
        };
        if settle_org(&mut tx, &org, &policy, now, "schedule", None).await? {
            changed.push(org);
        }
    }
    tx.commit().await?;
    for org in &changed {
        state.quota.announce(Change::Org(org));
    }
    Ok(changed)
}

pub async fn run(state: Webhooks, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match try_apply_due_once(&state, state.quota.now()).await {
            Ok(changed) if !changed.is_empty() => {
                tracing::info!(orgs = changed.len(), "scheduled plan changes applied")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "scheduled plan changes failed; retrying next minute")
            }
        }
        match prune_unlinked_once(&state, state.quota.now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                events = n,
                "forgot subscription events never linked to an org"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "forgetting old unlinked events failed; retrying next minute")
            }
        }
    }
}
