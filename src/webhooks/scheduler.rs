//! The scheduled half of the lifecycle: downgrades that fall due without a new event (a
//! cancellation at period end, a past-due grace that expired). `try_apply_due_once` is the step;
//! `run` only calls it every minute. Safe on several replicas at once: due rows are taken with
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
    }
}
