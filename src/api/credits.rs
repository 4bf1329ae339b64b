//! `/admin/orgs/{org_id}/grants`: prepaid credits (see `crate::credits` and README "Credits").

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::admin::MAX_REASON;
use super::v1::parse_org;
use super::{ApiJson, SharedState};
use crate::domain::credit::{DEFAULT_PRIORITY, NewGrant};
use crate::domain::text::Text;
use crate::http::error::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    metric: String,
    amount: i64,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    reason: Option<Text<MAX_REASON>>,
    /// The client's id for the grant: a repeat with the same id is the same grant.
    #[serde(default)]
    grant_id: Option<String>,
}

/// `POST /admin/orgs/{org_id}/grants`: 201 with a new grant, 200 with the same one for a repeat
/// of its `grant_id`, 409 when that id names a grant with other terms.
pub async fn create(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<GrantRequest>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let grant = NewGrant {
        id: req
            .grant_id
            .unwrap_or_else(|| format!("g_{}", uuid::Uuid::now_v7().simple())),
        metric: req.metric,
        amount: req.amount,
        priority: req.priority.unwrap_or(DEFAULT_PRIORITY),
        expires_at: req.expires_at,
        reason: req
            .reason
            .map(|r| r.as_str().trim().to_string())
            .filter(|r| !r.is_empty()),
    };
    grant
        .validate(state.quota.now())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let granted = crate::credits::grant(&state.quota, &org, &grant, "admin").await?;
    let status = if granted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(granted.grant)).into_response())
}

/// `GET /admin/orgs/{org_id}/grants`: every grant with what it has left.
pub async fn list(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let (grants, live) = crate::credits::list(&state.quota, &org).await?;
    Ok(Json(json!({
        "org_id": org.as_str(),
        "grants": grants,
        "live": live,
    }))
    .into_response())
}

/// `DELETE /admin/orgs/{org_id}/grants/{id}`: void what is left; 200 with the grant.
pub async fn void(
    State(state): State<SharedState>,
    Path((org_id, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let grant = crate::credits::void(&state.quota, &org, &id).await?;
    Ok(Json(grant).into_response())
}
