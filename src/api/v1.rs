//! `/v1/*`: what product services call. Checks (optionally consuming), post-hoc usage reports,
//! the usage view and entitlements.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::try_join_all;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiJson, SharedState};
use crate::domain::decision::Mode;
use crate::domain::decision::{Charge, MAX_COUNTER};
use crate::domain::level::{Caller, Scope, check_user_id};
use crate::domain::org::OrgId;
use crate::domain::period::Period;
use crate::domain::plan::{Catalog, MetricKind};
use crate::domain::render::{self, PlanRef, UsageEntry};
use crate::domain::text::{Text, present};
use crate::http::error::ApiError;
use crate::http::respond;
use crate::quota::Recorded;

/// Amounts travel through JSON and Lua doubles: keep them exactly representable. One charge may
/// be as large as a counter may ever get.
pub const MAX_AMOUNT: i64 = MAX_COUNTER;
pub const MAX_CHARGES: usize = 100;
/// The largest `/v1/usage` batch. Each org's events reach Redis as one pipeline, so a full
/// batch costs one round trip per org, not one per event.
pub const MAX_EVENTS: usize = 10_000;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

pub fn parse_org(raw: &str, field: &str) -> Result<OrgId, ApiError> {
    OrgId::parse(raw).map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

/// Resolve a metric name and validate an amount for it. Negative amounts are releases and only
/// make sense for gauges, and only where `allow_release` (usage reports).
pub fn resolve_charge<'c>(
    catalog: &'c Catalog,
    metric: &str,
    amount: i64,
    allow_release: bool,
    field: &str,
) -> Result<Charge<'c>, ApiError> {
    let m = catalog.metric(metric).ok_or_else(|| {
        ApiError::invalid(format!(
            "{field}.metric: unknown metric `{metric}` (declared: {})",
            catalog
                .metrics
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let release_ok = allow_release && m.kind == MetricKind::Gauge;
    let valid = if release_ok {
        amount != 0 && amount.unsigned_abs() <= MAX_AMOUNT.unsigned_abs()
    } else {
        amount > 0 && amount <= MAX_AMOUNT
    };
    if !valid {
        let rule = if release_ok {
            "must be a non-zero integer between -9007199254740991 and 9007199254740991 (2^53 - 1; negative releases a gauge)"
        } else {
            "must be an integer between 1 and 9007199254740991 (2^53 - 1)"
        };
        return Err(ApiError::invalid(format!("{field}.amount: {rule}")));
    }
    Ok(Charge { metric: m, amount })
}

fn field_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    org_id: String,
    #[serde(default, deserialize_with = "present")]
    metric: Option<String>,
    #[serde(default, deserialize_with = "present")]
    amount: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    consume: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    charges: Option<Vec<ChargeIn>>,
    #[serde(default, deserialize_with = "present")]
    key_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    user_id: Option<String>,
}

/// The levels below the org a `/v1` caller names (`key_id`, `user_id`): `prefix` names the
/// fields in errors (`events[3].user_id`).
pub(super) fn caller_from(
    key_id: Option<&str>,
    user_id: Option<&str>,
    prefix: &str,
) -> Result<Caller, ApiError> {
    let key = match key_id {
        None => None,
        Some(raw) => {
            let id = uuid::Uuid::parse_str(raw).map_err(|_| {
                ApiError::invalid(format!(
                    "{}: must be the id of an API key (a UUID, as `POST /admin/orgs/{{id}}/keys` returns it)",
                    field_name(prefix, "key_id")
                ))
            })?;
            Some(std::sync::Arc::from(id.to_string()))
        }
    };
    let user = match user_id {
        None => None,
        Some(raw) => Some(std::sync::Arc::from(check_user_id(raw).map_err(|e| {
            ApiError::invalid(format!("{}: {e}", field_name(prefix, "user_id")))
        })?)),
    };
    Ok(Caller { key, user })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeIn {
    pub(super) metric: String,
    #[serde(default, deserialize_with = "present")]
    pub(super) amount: Option<i64>,
}

/// The body of an allowed check (also inside a reservation's 201).
#[derive(Serialize)]
pub(super) struct AllowedBody<'a> {
    pub(super) allowed: bool,
    pub(super) dry_run: bool,
    pub(super) org_id: &'a str,
    pub(super) plan: PlanRef<'a>,
    pub(super) usage: Vec<UsageEntry<'a>>,
}

#[derive(Serialize)]
struct ShadowBody<'a> {
    allowed: bool,
    shadow: bool,
    dry_run: bool,
    org_id: &'a str,
    plan: PlanRef<'a>,
    usage: Vec<UsageEntry<'a>>,
    would_deny: render::DenialBody<'a>,
}

/// `POST /v1/check`: may this org spend these charges? Consumes them unless `consume: false`.
pub async fn check(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CheckRequest>,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let org = parse_org(&req.org_id, "org_id")?;
    let charges: Vec<Charge<'_>> = match (req.metric, req.charges) {
        (Some(metric), None) => {
            vec![
                resolve_charge(&catalog, &metric, req.amount.unwrap_or(1), false, "")
                    .map_err(strip_leading_dot)?,
            ]
        }
        (None, Some(list)) => {
            if req.amount.is_some() {
                return Err(ApiError::invalid(
                    "amount: give amounts inside `charges`, not beside it",
                ));
            }
            if list.is_empty() || list.len() > MAX_CHARGES {
                return Err(ApiError::invalid(format!(
                    "charges: must hold 1 to {MAX_CHARGES} charges"
                )));
            }
            list.iter()
                .enumerate()
                .map(|(i, c)| {
                    resolve_charge(
                        &catalog,
                        &c.metric,
                        c.amount.unwrap_or(1),
                        false,
                        &format!("charges[{i}]"),
                    )
                })
                .collect::<Result<_, _>>()?
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "metric: give either `metric` (one charge) or `charges` (several), not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "metric: missing; give `metric` (one charge) or `charges` (several)",
            ));
        }
    };
    let caller = caller_from(req.key_id.as_deref(), req.user_id.as_deref(), "")?;
    let consume = req.consume.unwrap_or(true);
    let mode = if consume { Mode::Check } else { Mode::DryRun };
    let decision = state
        .quota
        .decide(&catalog, &org, &caller.levels(), &charges, mode, None)
        .await?;
    let headers = render::ratelimit_headers(&decision.eval);
    let outcome = decision.eval.outcome.label();
    state.metrics.decision(
        "check",
        outcome,
        &decision.plan.id,
        charges.iter().map(|c| c.metric.id.as_str()),
    );
    if let Some(body) = render::denial_body(&catalog, org.as_str(), decision.plan, &decision.eval) {
        if decision.shadow {
            let mut headers = headers;
            respond::shadow_denial(&mut headers, org.as_str(), &decision.plan.id, outcome);
            let body = ShadowBody {
                allowed: true,
                shadow: true,
                dry_run: !consume,
                org_id: org.as_str(),
                plan: decision.plan.into(),
                usage: render::usage_entries(&decision.eval),
                would_deny: body,
            };
            return Ok(respond::allowed(&body, &headers));
        }
        return Ok(respond::denial(&body, &headers));
    }
    let body = AllowedBody {
        allowed: true,
        dry_run: !consume,
        org_id: org.as_str(),
        plan: decision.plan.into(),
        usage: render::usage_entries(&decision.eval),
    };
    Ok(respond::allowed(&body, &headers))
}

/// Error messages of a top-level charge name fields without a prefix (`metric`, not `.metric`).
fn strip_leading_dot(e: ApiError) -> ApiError {
    match e {
        ApiError::Invalid { code, message } => ApiError::Invalid {
            code,
            message: message.trim_start_matches('.').to_string(),
        },
        other => other,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRequest {
    #[serde(default, deserialize_with = "present")]
    org_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    metric: Option<String>,
    #[serde(default, deserialize_with = "present")]
    amount: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    idempotency_key: Option<IdempotencyKey>,
    #[serde(default, deserialize_with = "present")]
    events: Option<Vec<UsageEvent>>,
    #[serde(default, deserialize_with = "present")]
    key_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    user_id: Option<String>,
}

/// A client's idempotency key: it becomes part of a Redis key and a Postgres outbox row.
type IdempotencyKey = Text<MAX_IDEMPOTENCY_KEY_LEN>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageEvent {
    org_id: String,
    metric: String,
    #[serde(default, deserialize_with = "present")]
    amount: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    idempotency_key: Option<IdempotencyKey>,
    #[serde(default, deserialize_with = "present")]
    key_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    user_id: Option<String>,
}

struct ValidEvent<'c> {
    org: OrgId,
    charge: Charge<'c>,
    idempotency_key: Option<String>,
    caller: Caller,
}

fn validate_event<'c>(
    catalog: &'c Catalog,
    ev: UsageEvent,
    prefix: &str,
) -> Result<ValidEvent<'c>, ApiError> {
    let org = parse_org(&ev.org_id, &field_name(prefix, "org_id"))?;
    let charge = resolve_charge(catalog, &ev.metric, ev.amount.unwrap_or(1), true, prefix)
        .map_err(strip_leading_dot)?;
    let caller = caller_from(ev.key_id.as_deref(), ev.user_id.as_deref(), prefix)?;
    Ok(ValidEvent {
        org,
        charge,
        idempotency_key: ev.idempotency_key.map(Text::into_string),
        caller,
    })
}

/// `POST /v1/usage`: record usage after the fact. Never denies; a repeated idempotency key is
/// not counted again.
pub async fn usage(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<UsageRequest>,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let single_fields = req.org_id.is_some()
        || req.metric.is_some()
        || req.amount.is_some()
        || req.idempotency_key.is_some()
        || req.key_id.is_some()
        || req.user_id.is_some();
    match req.events {
        Some(events) => {
            if single_fields {
                return Err(ApiError::invalid(
                    "events: give either one event's fields or `events`, not both",
                ));
            }
            if events.is_empty() {
                return Err(ApiError::invalid("events: must hold at least one event"));
            }
            if events.len() > MAX_EVENTS {
                return Err(ApiError::PayloadTooLarge(format!(
                    "events: {} events in one batch; at most {MAX_EVENTS} (split the batch)",
                    events.len()
                )));
            }
            // Validate everything before recording anything: a batch with a bad event is
            // rejected whole, so a client can fix and resend it.
            let valid: Vec<ValidEvent<'_>> = events
                .into_iter()
                .enumerate()
                .map(|(i, ev)| validate_event(&catalog, ev, &format!("events[{i}]")))
                .collect::<Result<_, _>>()?;
            // Amounts of one counter that add up past the largest counter value can never all
            // be counted: refuse the batch before recording any of it.
            let mut totals: std::collections::HashMap<(&str, &str), i64> = Default::default();
            for (i, ev) in valid.iter().enumerate() {
                if ev.charge.amount > 0 {
                    let total = totals
                        .entry((ev.org.as_str(), ev.charge.metric.id.as_str()))
                        .or_insert(0);
                    *total = total.saturating_add(ev.charge.amount);
                    if *total > MAX_COUNTER {
                        return Err(ApiError::counter_overflow(format!(
                            "events[{i}].amount: the batch's amounts for this org and metric add up past {MAX_COUNTER}, the largest counter value; nothing was recorded"
                        )));
                    }
                }
            }
            // A key repeated within the batch is a duplicate of its first occurrence, decided
            // here: sent concurrently, the two would race and either could be the one counted.
            let mut seen = std::collections::HashSet::new();
            let mut outcomes: Vec<Recorded> = valid
                .iter()
                .map(|ev| {
                    if ev
                        .idempotency_key
                        .as_deref()
                        .is_some_and(|k| !seen.insert((ev.org.as_str(), k)))
                    {
                        Recorded::Duplicate
                    } else {
                        Recorded::Counted
                    }
                })
                .collect();
            // One pipeline per org, the orgs concurrently.
            let mut by_org: std::collections::HashMap<&OrgId, Vec<usize>> = Default::default();
            for (i, ev) in valid.iter().enumerate() {
                if outcomes[i] == Recorded::Counted {
                    by_org.entry(&ev.org).or_default().push(i);
                }
            }
            let decided = try_join_all(by_org.into_iter().map(|(org, indices)| {
                let items: Vec<_> = indices
                    .iter()
                    .map(|i| {
                        let ev = &valid[*i];
                        (ev.charge, ev.idempotency_key.as_deref(), ev.caller.levels())
                    })
                    .collect();
                let quota = &state.quota;
                let catalog = &catalog;
                async move {
                    let recorded = quota.record_many(catalog, org, &items).await?;
                    Ok::<_, crate::quota::QuotaError>((indices, recorded))
                }
            }))
            .await?;
            for (indices, recorded) in decided {
                for (i, r) in indices.into_iter().zip(recorded) {
                    outcomes[i] = r;
                }
            }
            let overflowed: Vec<String> = outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| **o == Recorded::Overflow)
                .map(|(i, _)| format!("events[{i}]"))
                .collect();
            if !overflowed.is_empty() {
                // Each event is its own atomic step in Redis: the others of the batch were
                // counted (or were duplicates), so the message says exactly which were not.
                return Err(ApiError::counter_overflow(format!(
                    "{}: would take a counter past {MAX_COUNTER}, the largest counter value, and {} not recorded; the batch's other events were recorded",
                    overflowed.join(", "),
                    if overflowed.len() == 1 { "was" } else { "were" }
                )));
            }
            let results: Vec<_> = outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| match o {
                    Recorded::Deferred => {
                        json!({ "index": i, "duplicate": false, "deferred": true })
                    }
                    _ => json!({ "index": i, "duplicate": *o == Recorded::Duplicate }),
                })
                .collect();
            let count = |r: Recorded| outcomes.iter().filter(|o| **o == r).count();
            Ok(Json(json!({
                "recorded": count(Recorded::Counted),
                "duplicates": count(Recorded::Duplicate),
                "deferred": count(Recorded::Deferred),
                "results": results,
            }))
            .into_response())
        }
        None => {
            let ev = UsageEvent {
                org_id: req.org_id.ok_or_else(|| {
                    ApiError::invalid("org_id: missing (or send a batch as `events`)")
                })?,
                metric: req
                    .metric
                    .ok_or_else(|| ApiError::invalid("metric: missing"))?,
                amount: req.amount,
                idempotency_key: req.idempotency_key,
                key_id: req.key_id,
                user_id: req.user_id,
            };
            let ev = validate_event(&catalog, ev, "")?;
            let d = state
                .quota
                .decide(
                    &catalog,
                    &ev.org,
                    &ev.caller.levels(),
                    std::slice::from_ref(&ev.charge),
                    Mode::Record,
                    ev.idempotency_key.as_deref(),
                )
                .await?;
            let usage = render::usage_entries(&d.eval);
            Ok(Json(json!({
                "recorded": !d.duplicate,
                "duplicate": d.duplicate,
                "org_id": ev.org.as_str(),
                "metric": ev.charge.metric.id,
                "amount": ev.charge.amount,
                "usage": usage,
            }))
            .into_response())
        }
    }
}

/// `GET /v1/orgs/{org_id}/usage[?period=YYYY-MM]`: one entry per declared metric, for the
/// current period from Redis, or for a given month from Postgres.
pub async fn org_usage(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let org = parse_org(&org_id, "org_id")?;
    let (mut period, mut key_id, mut user_id) = (None, None, None);
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("period", v)) => period = Some(v.to_string()),
            Some(("key_id", v)) => key_id = Some(v.to_string()),
            Some(("user_id", v)) => user_id = Some(percent_decoded(v, "user_id")?),
            _ => {
                return Err(ApiError::invalid(format!(
                    "{}: unknown query parameter (`period`, `key_id` or `user_id` are accepted)",
                    pair.split('=').next().unwrap_or(pair)
                )));
            }
        }
    }
    if key_id.is_some() || user_id.is_some() {
        if period.is_some() || (key_id.is_some() && user_id.is_some()) {
            return Err(ApiError::invalid(
                "key_id: give one of `key_id` or `user_id`, without `period` (the usage of a key or end user is kept for the current periods only)",
            ));
        }
        let caller = caller_from(key_id.as_deref(), user_id.as_deref(), "")?;
        let levels = caller.levels();
        let scope = levels.scopes().next().unwrap_or_default();
        let (plan, states) = state.quota.level_usage(&catalog, &org, scope).await?;
        let usage: Vec<UsageEntry<'_>> = states.iter().map(UsageEntry::from_state).collect();
        let mut body = json!({
            "org_id": org.as_str(),
            "plan": PlanRef::from(plan),
            "usage": usage,
        });
        match scope {
            Scope::Key(id) => body["key_id"] = json!(id),
            Scope::User(id) => body["user_id"] = json!(id),
            Scope::Org => {}
        }
        return Ok(Json(body).into_response());
    }
    if let Some(period) = period {
        let month = parse_month(&period).ok_or_else(|| {
            ApiError::invalid("period: expected a month as YYYY-MM (month 01 to 12)")
        })?;
        let (plan, record) = state.quota.org(&catalog, &org).await?;
        let rows = crate::db::usage::month(&state.pool, org.as_str(), month.start).await?;
        // Billing months starting in that month, and the one after (it ends the last of them).
        let billing = crate::db::usage::billing_periods(
            &state.pool,
            org.as_str(),
            month.start,
            month.end + chrono::Duration::days(62),
        )
        .await?;
        let cycle = record.billing_cycle();
        let usage: Vec<serde_json::Value> = catalog
            .metrics
            .values()
            .map(|m| {
                if let Some(q) = plan
                    .quotas_for(&m.id)
                    .find(|q| q.period == Some(Period::BillingMonth))
                {
                    let w = billing_month_in(&cycle, &billing, &m.id, month);
                    let current = billing
                        .iter()
                        .find(|(metric, start, _)| metric == &m.id && *start == w.start)
                        .map_or(0, |(.., q)| *q);
                    return json!({
                        "metric": m.id,
                        "unit": m.unit,
                        "kind": m.kind.as_str(),
                        "current": current,
                        "limit": q.limit,
                        "remaining": q.limit.saturating_sub(current.max(0) as u64),
                        "percentage": current as f64 * 100.0 / q.limit as f64,
                        "unlimited": false,
                        "period": Period::BillingMonth.as_str(),
                        "period_start": render::rfc3339(w.start),
                        "resets_at": render::rfc3339(w.end),
                    });
                }
                let current = rows
                    .iter()
                    .find(|(metric, _)| metric == &m.id)
                    .map_or(0, |(_, q)| *q);
                let quota = plan
                    .quotas_for(&m.id)
                    .find(|q| q.period.is_none() || q.period == Some(Period::Month));
                let limit = quota.map(|q| q.limit);
                json!({
                    "metric": m.id,
                    "unit": m.unit,
                    "kind": m.kind.as_str(),
                    "current": current,
                    "limit": limit,
                    "remaining": limit.map(|l| l.saturating_sub(current.max(0) as u64)),
                    "percentage": limit.map(|l| current as f64 * 100.0 / l as f64),
                    "unlimited": limit.is_none(),
                    "period": if m.kind == MetricKind::Gauge { None } else { Some("month") },
                    "resets_at": render::rfc3339(month.end),
                })
            })
            .collect();
        return Ok(Json(json!({
            "org_id": org.as_str(),
            "period": period,
            "plan": PlanRef::from(plan),
            "usage": usage,
        }))
        .into_response());
    }
    let (plan, states) = state.quota.usage(&catalog, &org).await?;
    let credits = crate::credits::remaining(&state.quota, &catalog, &org).await?;
    let usage: Vec<UsageEntry<'_>> = states
        .iter()
        .map(|s| {
            let metric = &s.limit.metric.id;
            UsageEntry::from_state(s)
                .with_credits(credits.iter().find(|(m, _)| m == metric).map(|(_, r)| *r))
        })
        .collect();
    Ok(Json(json!({
        "org_id": org.as_str(),
        "plan": PlanRef::from(plan),
        "usage": usage,
    }))
    .into_response())
}

/// The org's billing month of `metric` that starts in `month` (the last one, when an anchor
/// change made two start there), as the ledger recorded it, else as the org's cycle has it now.
/// Its end is the next recorded start of that metric when the cycle has changed since.
fn billing_month_in(
    cycle: &crate::domain::period::BillingCycle,
    recorded: &[(String, chrono::DateTime<chrono::Utc>, i64)],
    metric: &str,
    month: crate::domain::period::Window,
) -> crate::domain::period::Window {
    use crate::domain::period::{BillingCycle, Window};
    let starts: Vec<_> = recorded
        .iter()
        .filter(|(m, ..)| m == metric)
        .map(|(_, start, _)| *start)
        .collect();
    let start = match starts.iter().rev().find(|s| **s < month.end) {
        Some(s) => *s,
        None => {
            let w = cycle.window(month.start);
            if w.start < month.start {
                w.end
            } else {
                w.start
            }
        }
    };
    let end = if cycle.starts_at(start) {
        cycle.window(start).end
    } else {
        starts
            .iter()
            .find(|s| **s > start)
            .copied()
            .unwrap_or_else(|| BillingCycle::new(Some(start), None).window(start).end)
    };
    Window { start, end }
}

/// `YYYY-MM` → that calendar month (UTC). Accepts exactly what the OpenAPI pattern
/// `^[0-9]{4}-(0[1-9]|1[0-2])$` describes: any four-digit year (0000 is 1 BC, proleptic
/// Gregorian, as in ISO 8601), months 01 to 12.
pub fn parse_month(s: &str) -> Option<crate::domain::period::Window> {
    use chrono::TimeZone;
    let (y, m) = s.split_once('-')?;
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(y, 4) || !digits(m, 2) {
        return None;
    }
    let start = chrono::Utc
        .with_ymd_and_hms(y.parse().ok()?, m.parse().ok()?, 1, 0, 0, 0)
        .single()?;
    Some(crate::domain::period::calendar_month(start))
}

/// `GET /v1/orgs/{org_id}/entitlements`: every feature any plan names, true or false.
pub async fn entitlements(
    State(state): State<SharedState>,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let catalog = state.quota.catalog();
    let org = parse_org(&org_id, "org_id")?;
    let (plan, _) = state.quota.org(&catalog, &org).await?;
    let features: serde_json::Map<String, serde_json::Value> = catalog
        .all_features()
        .into_iter()
        .map(|f| (f.to_string(), plan.features.contains(f).into()))
        .collect();
    Ok(Json(json!({
        "org_id": org.as_str(),
        "plan": PlanRef::from(plan),
        "features": features,
    }))
    .into_response())
}

/// A query parameter's value, percent-decoded (`+` stays a plus: ids, not form text).
fn percent_decoded(raw: &str, name: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| ApiError::invalid(format!("{name}: not UTF-8 once percent-decoded")))
}
