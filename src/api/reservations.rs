//! `/v1/reservations`: reserve now, settle the actual or release later, for services that are
//! not behind the proxy (the use case is `crate::reservations`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::v1::{AllowedBody, ChargeIn, MAX_CHARGES, parse_org, resolve_charge};
use super::{ApiJson, SharedState};
use crate::domain::decision::Charge;
use crate::domain::plan::Catalog;
use crate::domain::render::{self, UsageEntry};
use crate::domain::reservation::{DEFAULT_TTL, Ending, MAX_TTL, ReservationId};
use crate::domain::text::present;
use crate::http::error::ApiError;
use crate::http::respond;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    org_id: String,
    charges: Vec<ChargeIn>,
    /// `"30s"`, `"5m"`, … or whole seconds.
    #[serde(default, deserialize_with = "present")]
    ttl: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    key_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    user_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    actual: Vec<ChargeIn>,
}

#[derive(Serialize)]
struct ReservedBody<'a> {
    id: String,
    expires_at: String,
    #[serde(flatten)]
    check: AllowedBody<'a>,
}

#[derive(Serialize)]
struct EndedBody<'a> {
    id: String,
    status: &'static str,
    org_id: &'a str,
    usage: Vec<UsageEntry<'a>>,
}

fn charges<'c>(
    catalog: &'c Catalog,
    list: &[ChargeIn],
    field: &str,
    zero_ok: bool,
) -> Result<Vec<Charge<'c>>, ApiError> {
    if list.is_empty() || list.len() > MAX_CHARGES {
        return Err(ApiError::invalid(format!(
            "{field}: must hold 1 to {MAX_CHARGES} entries"
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let name = format!("{field}[{i}]");
            let amount = c.amount.unwrap_or(1);
            if zero_ok && amount == 0 {
                // An actual of zero: resolve the metric with any valid amount, then zero it.
                return resolve_charge(catalog, &c.metric, 1, false, &name)
                    .map(|ch| Charge { amount: 0, ..ch });
            }
            resolve_charge(catalog, &c.metric, amount, false, &name)
        })
        .collect()
}

fn ttl_of(raw: Option<serde_json::Value>) -> Result<std::time::Duration, ApiError> {
    let ttl = match raw {
        None => return Ok(DEFAULT_TTL),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .filter(|s| *s > 0)
            .map(std::time::Duration::from_secs)
            .ok_or_else(|| ApiError::invalid("ttl: whole seconds above zero, or e.g. \"5m\""))?,
        Some(serde_json::Value::String(s)) => {
            crate::config::parse_duration(&s).map_err(|e| ApiError::invalid(format!("ttl: {e}")))?
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "ttl: whole seconds above zero, or e.g. \"5m\"",
            ));
        }
    };
    if ttl < std::time::Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(ApiError::invalid("ttl: must be between 1s and 24h"));
    }
    Ok(ttl)
}

fn reservation_id(raw: &str) -> Result<ReservationId, ApiError> {
    // A malformed id can name no reservation.
    ReservationId::parse(raw).ok_or(ApiError::ReservationNotFound)
}

/// `POST /v1/reservations`: charge now, as `/v1/check` does; 201 with the id, or the same
/// 402/429 document.
pub async fn create(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<ReserveRequest>,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let org = parse_org(&req.org_id, "org_id")?;
    let charges = charges(&catalog, &req.charges, "charges", false)?;
    let ttl = ttl_of(req.ttl)?;
    let caller = super::v1::caller_from(req.key_id.as_deref(), req.user_id.as_deref(), "")?;
    let reserved = state
        .reservations
        .create(&catalog, &org, &caller.levels(), &charges, ttl)
        .await?;
    let decision = &reserved.decision;
    let headers = render::ratelimit_headers(&decision.eval);
    let outcome = decision.eval.outcome.label();
    state.metrics.decision(
        "reservation",
        outcome,
        &decision.plan.id,
        charges.iter().map(|c| c.metric.id.as_str()),
    );
    let Some(id) = reserved.id else {
        return match render::denial_body(&catalog, org.as_str(), decision.plan, &decision.eval) {
            Some(body) => Ok(respond::denial(&body, &headers)),
            None => Err(ApiError::Store(crate::store::StoreError::Protocol(
                "a reservation was neither applied nor denied".into(),
            ))),
        };
    };
    let body = ReservedBody {
        id: id.to_string(),
        expires_at: render::rfc3339(reserved.expires_at),
        check: AllowedBody {
            allowed: true,
            dry_run: false,
            org_id: org.as_str(),
            plan: decision.plan.into(),
            usage: render::usage_entries(&decision.eval),
        },
    };
    let mut response = respond::allowed(&body, &headers);
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

/// The org's usage of the reservation's metrics after it ended.
async fn ended(
    state: &SharedState,
    catalog: &Catalog,
    id: &ReservationId,
    status: &'static str,
    metrics: &[String],
) -> Result<Response, ApiError> {
    let (_, usage) = state.quota.usage(catalog, &id.org).await?;
    let usage: Vec<UsageEntry<'_>> = usage
        .iter()
        .filter(|s| metrics.contains(&s.limit.metric.id))
        .map(UsageEntry::from_state)
        .collect();
    Ok(axum::Json(EndedBody {
        id: id.to_string(),
        status,
        org_id: id.org.as_str(),
        usage,
    })
    .into_response())
}

/// `POST /v1/reservations/{id}/settle`: the actual amounts; the difference is given back or
/// charged (never denied).
pub async fn settle(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SettleRequest>,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let actual = charges(&catalog, &req.actual, "actual", true)?;
    let id = reservation_id(&id)?;
    let actual: Vec<(String, i64)> = crate::domain::decision::merge_charges(&actual)
        .iter()
        .map(|c| (c.metric.id.clone(), c.amount))
        .collect();
    let mut metrics = state
        .reservations
        .end(
            &catalog,
            &id,
            Ending::Settled {
                actual: actual.clone(),
            },
        )
        .await?
        .into_iter()
        .map(|(m, _)| m)
        .collect::<Vec<_>>();
    metrics.extend(actual.into_iter().map(|(m, _)| m));
    ended(&state, &catalog, &id, "settled", &metrics).await
}

/// `DELETE /v1/reservations/{id}`: give every reserved unit back.
pub async fn release(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let id = reservation_id(&id)?;
    let metrics: Vec<String> = state
        .reservations
        .end(&catalog, &id, Ending::Released)
        .await?
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    ended(&state, &catalog, &id, "released", &metrics).await
}
