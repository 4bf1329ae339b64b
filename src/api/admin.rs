//! `/admin/*`: operator actions. Every change is written to Postgres first and then announced to
//! all replicas, so a plan change or a revocation takes effect everywhere within a second. Once
//! Postgres committed a change the answer is a success: announcing it and reading the usage for
//! the response are best effort (see `org_view`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::v1::{MAX_AMOUNT, parse_org};
use super::{ApiJson, SharedState};
use crate::db::{self, adjustments::NewAdjustment};
use crate::directory::Change;
use crate::domain::decision::Charge;
use crate::domain::org::OrgId;
use crate::domain::period;
use crate::domain::render::{self, PlanRef, UsageEntry};
use crate::domain::text::{Text, present};
use crate::error::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutOrg {
    plan: String,
}

/// `PUT /admin/orgs/{org_id}` `{"plan": "pro"}`.
pub async fn put_org(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<PutOrg>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let catalog = state.quota.catalog();
    if catalog.plan(&req.plan).is_none() {
        return Err(ApiError::invalid(format!(
            "plan: unknown plan `{}` (plans: {})",
            req.plan,
            catalog
                .plans
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let previous = db::orgs::set_plan(&state.pool, &org, &req.plan, "admin", None).await?;
    state.quota.announce(Change::Org(&org));
    tracing::info!(org = %org, from = previous.as_deref().unwrap_or("-"), to = %req.plan, "plan changed by admin");
    org_view(&state, &org, View::AfterWrite).await
}

/// Whether the org view answers a read or a write that Postgres already committed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum View {
    Read,
    /// The usage comes from Redis; if Redis cannot answer, the committed write still succeeded,
    /// and the view says so with `"usage": null` instead of a 503.
    AfterWrite,
}

/// `GET /admin/orgs/{org_id}`.
pub async fn get_org(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    org_view(&state, &org, View::Read).await
}

async fn org_view(state: &SharedState, org: &OrgId, view: View) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    // Read Postgres directly: an operator wants the stored truth, not a cache.
    let record = db::orgs::get(&state.pool, org).await?;
    let plan = catalog.plan_or_default(record.plan_id.as_deref());
    let keys = db::api_keys::list_for_org(&state.pool, org).await?;
    let changes = db::orgs::recent_plan_changes(&state.pool, org, 20).await?;
    let subscriptions: Vec<serde_json::Value> =
        db::billing::org_subscriptions(&state.pool, org.as_str())
            .await?
            .into_iter()
            .map(|s| {
                json!({
                    "provider": s.provider,
                    "subscription_id": s.subscription_id,
                    "customer_id": s.customer_id,
                    "product_id": s.product_id,
                    "plan_if_active": s.state.plan_if_active,
                    "status": s.state.status.as_str(),
                    "terminal": s.state.terminal,
                    "current_period_end": s.state.current_period_end,
                    "cancel_at_period_end": s.state.cancel_at_period_end,
                    "status_since": s.state.status_since,
                    "last_event_at": s.state.last_event_at,
                    "next_change_at": s.next_change_at,
                })
            })
            .collect();
    let usage = match state.quota.usage(&catalog, org).await {
        Ok((_, states)) => Some(states),
        Err(crate::quota::QuotaError::Store(e)) if view == View::AfterWrite => {
            tracing::warn!(org = %org, error = %e, "plan changed; usage not readable for the response");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let usage: Option<Vec<UsageEntry<'_>>> = usage
        .as_ref()
        .map(|states| states.iter().map(UsageEntry::from_state).collect());
    Ok(Json(json!({
        "org_id": org.as_str(),
        "plan": PlanRef::from(plan),
        "assigned_plan": record.plan_id,
        "plan_source": if record.plan_id.as_deref().is_some_and(|p| catalog.plan(p).is_some()) { "assigned" } else { "default" },
        "billing_anchor": record.billing_anchor,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "keys": keys,
        "plan_changes": changes,
        "subscriptions": subscriptions,
        "usage": usage,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    #[serde(default, deserialize_with = "present")]
    name: Option<Text<MAX_KEY_NAME>>,
}

/// Longest API key name, in characters.
pub const MAX_KEY_NAME: usize = 200;
/// Longest adjustment reason, in characters.
pub const MAX_REASON: usize = 1000;

/// `POST /admin/orgs/{org_id}/keys` → 201 with the key, shown this once.
pub async fn create_key(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<NewKeyRequest>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let name = req
        .name
        .map_or_else(|| "default".to_owned(), Text::into_string);
    let key = db::api_keys::create(&state.pool, &org, &name).await?;
    tracing::info!(org = %org, key_id = %key.id, key_prefix = %key.key_prefix, "api key created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": key.id,
            "org_id": org.as_str(),
            "name": name,
            "key": key.key,
            "key_prefix": key.key_prefix,
            "created_at": key.created_at,
        })),
    )
        .into_response())
}

/// `DELETE /admin/keys/{id}` → 204; 404 when no live key has that id.
pub async fn revoke_key(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::invalid("id: not a key id (UUID)"))?;
    match db::api_keys::revoke(&state.pool, id).await? {
        Some(org) => {
            if let Ok(org) = OrgId::parse(&org) {
                state.quota.announce(Change::Org(&org));
            }
            tracing::info!(key_id = %id, "api key revoked");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        None => Err(ApiError::NotFound(format!("no live key with id {id}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    metric: String,
    amount: i64,
    reason: Text<MAX_REASON>,
}

/// `POST /admin/orgs/{org_id}/adjustments`: credit back (negative) or charge usage in the current
/// period, recorded with its reason.
pub async fn adjust(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<AdjustmentRequest>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let catalog = state.quota.catalog();
    let metric = catalog
        .metric(&req.metric)
        .ok_or_else(|| ApiError::invalid(format!("metric: unknown metric `{}`", req.metric)))?;
    if req.amount == 0 || req.amount.unsigned_abs() > MAX_AMOUNT.unsigned_abs() {
        return Err(ApiError::invalid(
            "amount: must be a non-zero integer between -9007199254740991 and 9007199254740991 (2^53 - 1)",
        ));
    }
    let reason = req.reason.as_str().trim();
    if reason.is_empty() {
        return Err(ApiError::invalid("reason: must not be blank"));
    }
    let period_start = period::calendar_month(state.quota.now()).start;
    // The row commits only after Redis applied the adjustment: a failure leaves neither.
    let mut tx = state.pool.begin().await.map_err(db::DbError::from)?;
    let id = db::adjustments::insert(
        &mut tx,
        &NewAdjustment {
            org: &org,
            metric: &metric.id,
            amount: req.amount,
            reason,
            period_start,
        },
    )
    .await?;
    let decision = state
        .quota
        .adjust(
            &catalog,
            &org,
            Charge {
                metric,
                amount: req.amount,
            },
        )
        .await?;
    tx.commit().await.map_err(db::DbError::from)?;
    tracing::info!(org = %org, metric = %metric.id, amount = req.amount, "usage adjusted");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "org_id": org.as_str(),
            "metric": metric.id,
            "amount": req.amount,
            "reason": reason,
            "period_start": render::rfc3339(period_start),
            "usage": render::usage_entries(&decision.eval),
        })),
    )
        .into_response())
}
