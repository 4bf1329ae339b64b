//! `/admin/*`: operator actions. Every change is written to Postgres first and then announced to
//! all replicas, so a plan change or a revocation takes effect everywhere within a second. Once
//! Postgres committed a change the answer is a success: announcing it and reading the usage for
//! the response are best effort (see `org_view`). The org list reads Postgres for who is on which
//! plan and Redis for usage, and answers without the latter when Redis cannot (see `list_orgs`).

use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::v1::{MAX_AMOUNT, parse_org};
use super::{ApiJson, SharedState};
use crate::db::orgs::{AnchorSource, OrgRecord, PlanFilter};
use crate::db::{self, adjustments::NewAdjustment};
use crate::directory::Change;
use crate::domain::decision::{Charge, MAX_COUNTER};
use crate::domain::level::KeyQuota;
use crate::domain::org::OrgId;
use crate::domain::period;
use crate::domain::plan::{Catalog, MetricKind};
use crate::domain::render::{self, PlanRef, UsageEntry};
use crate::domain::text::{Text, present};
use crate::http::error::ApiError;
use crate::quota::QuotaError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutOrg {
    #[serde(default)]
    plan: Option<String>,
    /// Absent: unchanged; `null`: removed (billing months follow the calendar again).
    #[serde(default, deserialize_with = "present")]
    billing_anchor: Option<Option<DateTime<Utc>>>,
}

/// `PUT /admin/orgs/{org_id}` `{"plan": "pro", "billing_anchor": "2026-01-31T10:00:00Z"}`, either
/// or both. A new anchor never resets usage: the billing month in progress keeps its start and
/// runs until the new anchor's next boundary (see `domain::period`).
pub async fn put_org(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<PutOrg>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let catalog = state.quota.catalog();
    if req.plan.is_none() && req.billing_anchor.is_none() {
        return Err(ApiError::invalid(
            "body: give `plan`, `billing_anchor` or both",
        ));
    }
    if let Some(plan) = &req.plan
        && catalog.plan(plan).is_none()
    {
        return Err(unknown_plan(&catalog, plan));
    }
    let now = state.quota.now();
    let mut tx = state.pool.begin().await.map_err(db::DbError::from)?;
    let previous = db::orgs::lock_plan(&mut tx, &org).await?;
    if let Some(plan) = &req.plan
        && previous.as_deref() != Some(plan.as_str())
    {
        db::orgs::write_plan(&mut tx, &org, previous.as_deref(), plan, "admin", None).await?;
    }
    let anchor_changed = match req.billing_anchor {
        Some(anchor) => {
            db::orgs::set_billing_anchor(&mut tx, &org, AnchorSource::Anchor(anchor), now).await?
        }
        None => false,
    };
    tx.commit().await.map_err(db::DbError::from)?;
    state.quota.announce(Change::Org(&org));
    if let Some(plan) = &req.plan {
        tracing::info!(org = %org, from = previous.as_deref().unwrap_or("-"), to = %plan, "plan changed by admin");
    }
    if anchor_changed {
        tracing::info!(org = %org, "billing anchor changed by admin");
    }
    org_view(&state, &org, View::AfterWrite).await
}

/// A plan id the catalog does not declare: 422 naming it and the plans there are.
fn unknown_plan(catalog: &Catalog, id: &str) -> ApiError {
    ApiError::invalid(format!(
        "plan: unknown plan `{id}` (plans: {})",
        catalog
            .plans
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// `assigned` when the org's stored plan is one the catalog declares, else `default` (no plan
/// stored, or one since removed from the catalog: the gateway then applies the default plan).
fn plan_source(catalog: &Catalog, record: &OrgRecord) -> &'static str {
    if record
        .plan_id
        .as_deref()
        .is_some_and(|p| catalog.plan(p).is_some())
    {
        "assigned"
    } else {
        "default"
    }
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

/// Default and largest page of `GET /admin/orgs`.
pub const LIST_DEFAULT_LIMIT: i64 = 50;
pub const LIST_MAX_LIMIT: i64 = 500;
/// Orgs of one page whose counters are read from Redis at the same time. Each org is its own
/// read (its keys share a Cluster hash slot, orgs do not), so a 500-org page costs at most
/// 500 / 8 round trips in sequence, and an unreachable Redis at most one timeout (see below).
const LIST_USAGE_READS_IN_FLIGHT: usize = 8;

/// `GET /admin/orgs?plan=&limit=&cursor=`: stored orgs in id order, a page at a time, each with
/// its plan and current-period usage.
///
/// Postgres is the truth about who is on which plan, so the list answers even when Redis cannot:
/// an org whose usage could not be read shows `"usage": null`, and after the first failed read
/// the page's remaining orgs are not tried (one timeout, not one per org).
pub async fn list_orgs(
    State(state): State<SharedState>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let query = ListQuery::parse(&uri)?;
    let known: Vec<String> = catalog.plans.keys().cloned().collect();
    let filter = match query.plan.as_deref() {
        None => PlanFilter::Any,
        Some(id) if catalog.plan(id).is_none() => return Err(unknown_plan(&catalog, id)),
        Some(id) if id == catalog.default_plan => PlanFilter::Default { id, known: &known },
        Some(id) => PlanFilter::Assigned(id),
    };
    // One row more than the page tells whether another page follows.
    let mut rows = db::orgs::list(
        &state.pool,
        query.after.as_ref().map(OrgId::as_str),
        query.limit + 1,
        filter,
    )
    .await?;
    let more = rows.len() as i64 > query.limit;
    rows.truncate(query.limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|r| encode_cursor(&r.org_id)))
        .flatten();

    let store_down = AtomicBool::new(false);
    // Indices rather than `&rows` items: a stream of borrowed items trips the compiler's
    // `Send` check for handlers (higher-ranked lifetimes).
    let usage: Vec<Option<Vec<UsageEntry<'_>>>> = stream::iter(0..rows.len())
        .map(|i| {
            let (catalog, store_down, quota, row) = (&catalog, &store_down, &state.quota, &rows[i]);
            async move {
                if store_down.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                // Stored ids went through `OrgId::parse` on their way in.
                let Ok(org) = OrgId::parse(&row.org_id) else {
                    return Ok(None);
                };
                let plan = catalog.plan_or_default(row.record.plan_id.as_deref());
                match quota.usage_on(catalog, &org, plan, &row.record).await {
                    Ok(states) => Ok(Some(states.iter().map(UsageEntry::from_state).collect())),
                    Err(QuotaError::Store(e)) => {
                        if !store_down.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "org list: usage not readable, listed without it");
                        }
                        Ok(None)
                    }
                    Err(e) => Err(ApiError::from(e)),
                }
            }
        })
        .buffered(LIST_USAGE_READS_IN_FLIGHT)
        .try_collect()
        .await?;

    let orgs: Vec<ListedOrgView<'_>> = rows
        .iter()
        .zip(usage)
        .map(|(row, usage)| ListedOrgView {
            org_id: &row.org_id,
            plan: catalog
                .plan_or_default(row.record.plan_id.as_deref())
                .into(),
            assigned_plan: row.record.plan_id.as_deref(),
            plan_source: plan_source(&catalog, &row.record),
            billing_anchor: row.record.billing_anchor,
            created_at: row.record.created_at,
            updated_at: row.record.updated_at,
            usage,
        })
        .collect();
    Ok(Json(json!({ "orgs": orgs, "next_cursor": next_cursor })).into_response())
}

#[derive(Serialize)]
struct ListedOrgView<'a> {
    org_id: &'a str,
    plan: PlanRef<'a>,
    assigned_plan: Option<&'a str>,
    plan_source: &'static str,
    billing_anchor: Option<DateTime<Utc>>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    usage: Option<Vec<UsageEntry<'a>>>,
}

/// The query of `GET /admin/orgs`, validated.
struct ListQuery {
    plan: Option<String>,
    limit: i64,
    after: Option<OrgId>,
}

impl ListQuery {
    fn parse(uri: &axum::http::Uri) -> Result<Self, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?;
        let (mut plan, mut limit, mut cursor) = (None, None, None);
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "plan" => &mut plan,
                "limit" => &mut limit,
                "cursor" => &mut cursor,
                _ => {
                    return Err(ApiError::invalid(format!(
                        "{name}: unknown query parameter (only `plan`, `limit` and `cursor` are accepted)"
                    )));
                }
            };
            if slot.replace(value).is_some() {
                return Err(ApiError::invalid(format!("{name}: given more than once")));
            }
        }
        let limit = match limit {
            None => LIST_DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=LIST_MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "limit: must be an integer between 1 and {LIST_MAX_LIMIT}"
                    ))
                })?,
        };
        let after = cursor.map(|c| decode_cursor(&c)).transpose()?;
        Ok(Self { plan, limit, after })
    }
}

/// The cursor is the last org id of a page, base64url-encoded: opaque to clients, so its form
/// may change, and a keyset position, so pages stay put while orgs are added.
fn encode_cursor(org_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(org_id)
}

fn decode_cursor(raw: &str) -> Result<OrgId, ApiError> {
    URL_SAFE_NO_PAD
        .decode(raw)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|id| OrgId::parse(&id).ok())
        .ok_or_else(|| {
            ApiError::invalid(
                "cursor: not a cursor from this API (pass the previous page's `next_cursor` unchanged)",
            )
        })
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
        "plan_source": plan_source(&catalog, &record),
        "billing_anchor": record.billing_anchor,
        "billing_period": billing_period(&record, state.quota.now()),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "keys": keys,
        "plan_changes": changes,
        "subscriptions": subscriptions,
        "usage": usage,
    }))
    .into_response())
}

/// The org's billing month at `now`: what `billing_month` quotas count in.
fn billing_period(record: &OrgRecord, now: DateTime<Utc>) -> serde_json::Value {
    let w = record.billing_cycle().window(now);
    json!({
        "start": render::rfc3339(w.start),
        "end": render::rfc3339(w.end),
        "carried": record.billing_carry == Some(w),
    })
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

/// The most quotas one key may have of its own.
const MAX_KEY_QUOTAS: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimitsRequest {
    quotas: Vec<KeyQuota>,
}

/// `PUT /admin/keys/{id}/limits`: give one API key quotas of its own, replacing the plan's
/// per-key quotas of the metrics they name (e.g. a CI key with a smaller budget). Every replica
/// applies them with the org's next change message (well under a second).
pub async fn put_key_limits(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<KeyLimitsRequest>,
) -> Result<Response, ApiError> {
    let id = key_id(&id)?;
    let catalog = state.quota.catalog();
    if req.quotas.len() > MAX_KEY_QUOTAS {
        return Err(ApiError::invalid(format!(
            "quotas: at most {MAX_KEY_QUOTAS} quotas per key"
        )));
    }
    for (i, q) in req.quotas.iter().enumerate() {
        let field = |name: &str| format!("quotas[{i}].{name}");
        match catalog.metric(&q.metric) {
            None => {
                return Err(ApiError::invalid(format!(
                    "{}: unknown metric `{}`",
                    field("metric"),
                    q.metric
                )));
            }
            Some(m) if m.kind != MetricKind::Counter => {
                return Err(ApiError::invalid(format!(
                    "{}: `{}` is a gauge; a key's quotas are of counters",
                    field("metric"),
                    q.metric
                )));
            }
            Some(_) => {}
        }
        if q.limit == 0 || q.limit > MAX_COUNTER as u64 {
            return Err(ApiError::invalid(format!(
                "{}: must be from 1 to {MAX_COUNTER}",
                field("limit")
            )));
        }
        if req.quotas[..i]
            .iter()
            .any(|o| o.metric == q.metric && o.period == q.period)
        {
            return Err(ApiError::invalid(format!(
                "quotas[{i}]: a second quota for the same metric and period"
            )));
        }
    }
    let Some(org) = db::api_keys::set_limits(&state.pool, id, Some(&req.quotas)).await? else {
        return Err(ApiError::NotFound(format!("no live key with id {id}")));
    };
    announce_key_change(&state, &org);
    tracing::info!(key_id = %id, quotas = req.quotas.len(), "api key limits set");
    Ok(Json(json!({ "key_id": id, "org_id": org, "quotas": req.quotas })).into_response())
}

/// `GET /admin/keys/{id}/limits`: the key's own quotas (empty: the plan's per-key quotas apply).
pub async fn get_key_limits(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = key_id(&id)?;
    let Some((org, quotas)) = db::api_keys::limits(&state.pool, id).await? else {
        return Err(ApiError::NotFound(format!("no live key with id {id}")));
    };
    Ok(Json(json!({
        "key_id": id,
        "org_id": org,
        "quotas": quotas.unwrap_or_default(),
    }))
    .into_response())
}

/// `DELETE /admin/keys/{id}/limits` → 204: the plan's per-key quotas apply again.
pub async fn delete_key_limits(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = key_id(&id)?;
    let Some(org) = db::api_keys::set_limits(&state.pool, id, None).await? else {
        return Err(ApiError::NotFound(format!("no live key with id {id}")));
    };
    announce_key_change(&state, &org);
    tracing::info!(key_id = %id, "api key limits removed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn key_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::invalid("id: not a key id (UUID)"))
}

/// A key's limits live in its org's record: the org's change message reloads it everywhere.
fn announce_key_change(state: &SharedState, org: &str) {
    if let Ok(org) = OrgId::parse(org) {
        state.quota.directory().invalidate(org.as_str());
        state.quota.announce(Change::Org(&org));
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

/// Longest notification endpoint URL accepted.
pub const MAX_URL: usize = 2000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutNotifications {
    url: Text<MAX_URL>,
}

/// `PUT /admin/orgs/{org_id}/notifications` `{"url": "..."}`: the org's own receiver of its
/// events, with a new Standard Webhooks secret, shown only in this answer (a PUT replaces the
/// secret and re-enables an endpoint disabled by a 410).
pub async fn put_notifications(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<PutNotifications>,
) -> Result<Response, ApiError> {
    use base64::engine::general_purpose::STANDARD;
    let org = parse_org(&org_id, "org_id")?;
    let url = req.url.as_str();
    if let Some(reason) = crate::notify::url_problem(url) {
        return Err(ApiError::invalid(format!("url: {reason}")));
    }
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let secret = format!("whsec_{}", STANDARD.encode(bytes));
    db::notifications::put_endpoint(&state.pool, org.as_str(), url, &secret).await?;
    tracing::info!(org = %org, "notification endpoint set");
    Ok(Json(json!({ "url": url, "secret": secret })).into_response())
}

/// `DELETE /admin/orgs/{org_id}/notifications`: 204, or 404 when the org has no endpoint.
pub async fn delete_notifications(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    if db::notifications::delete_endpoint(&state.pool, org.as_str()).await? {
        tracing::info!(org = %org, "notification endpoint removed");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound(format!(
            "org {org} has no notification endpoint"
        )))
    }
}

/// Events listed by `GET /admin/orgs/{org_id}/notifications`.
const RECENT_EVENTS: i64 = 50;

/// `GET /admin/orgs/{org_id}/notifications`: the org's endpoint (never its secret) and its
/// recent events with their delivery status, attempts and last error (never their payload).
pub async fn get_notifications(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org_id, "org_id")?;
    let endpoint = db::notifications::endpoint(&state.pool, org.as_str()).await?;
    let events = db::notifications::recent(&state.pool, org.as_str(), RECENT_EVENTS).await?;
    Ok(Json(json!({
        "org_id": org.as_str(),
        "endpoint": endpoint,
        "events": events,
    }))
    .into_response())
}
