//! `POST /webhooks/{stripe,dodo,polar}` and `/webhooks/standard/{name}`.
//!
//! The body is taken as raw bytes and the signature verified over exactly those bytes before any
//! JSON parsing. Answers: 200 for anything verified and stored (including duplicates and events
//! we ignore, so the provider stops retrying); 200 with outcome `invalid` for a verified payload
//! that can never be applied (a shape we do not understand, a control character in an id, a
//! value Postgres refuses), since a redelivery would fail the same way forever; 400 for a bad
//! signature (nothing stored); 404 for a provider that is not configured; 500 when the database
//! fails, so the provider retries later (the event is not marked processed). Payloads are never
//! logged: they carry customer data.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use serde_json::json;

use crate::directory::Change;
use crate::http::error::error_response;
use crate::webhooks::Webhooks;
use crate::webhooks::apply::{self, Applied, Policy};
use crate::webhooks::event::{ParsedEvent, PayloadError};
use crate::webhooks::signature::{
    self, DEFAULT_TOLERANCE_SECS, SignatureError, StandardKeyEncoding,
};
use crate::webhooks::{BillingProvider, ProviderKind};
use crate::webhooks::{standard, stripe};

pub async fn stripe_hook(
    State(state): State<Webhooks>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receive(&state, ProviderKind::Stripe, &headers, &body).await
}

pub async fn dodo_hook(State(state): State<Webhooks>, headers: HeaderMap, body: Bytes) -> Response {
    receive(&state, ProviderKind::Dodo, &headers, &body).await
}

pub async fn polar_hook(
    State(state): State<Webhooks>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receive(&state, ProviderKind::Polar, &headers, &body).await
}

pub async fn standard_hook(
    State(state): State<Webhooks>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receive(&state, ProviderKind::Standard(name), &headers, &body).await
}

enum Rejected {
    Signature(SignatureError),
    Payload(PayloadError),
}

/// Verify, then parse. Nothing here touches the database.
fn verify_and_parse(
    provider: &BillingProvider,
    headers: &HeaderMap,
    body: &[u8],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<ParsedEvent, Rejected> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now_unix = now.timestamp();
    match &provider.kind {
        ProviderKind::Stripe => {
            let sig = header("stripe-signature").ok_or(Rejected::Signature(
                SignatureError::MissingHeader("stripe-signature"),
            ))?;
            let keys: Vec<&[u8]> = provider
                .secrets
                .iter()
                .map(|s| s.expose_secret().as_bytes())
                .collect();
            signature::verify_stripe(sig, body, &keys, now_unix, DEFAULT_TOLERANCE_SECS)
                .map_err(Rejected::Signature)?;
            stripe::parse(body, &provider.org_id_from).map_err(Rejected::Payload)
        }
        kind => {
            let encoding = kind
                .key_encoding()
                .unwrap_or(StandardKeyEncoding::Base64AfterWhsecPrefix);
            let keys: Vec<Vec<u8>> = provider
                .secrets
                .iter()
                .filter_map(|s| signature::standard_key(s.expose_secret(), encoding).ok())
                .collect();
            let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let (h, t) = signature::verify_standard_headers(
                header,
                body,
                &key_refs,
                now_unix,
                DEFAULT_TOLERANCE_SECS,
            )
            .map_err(Rejected::Signature)?;
            let fallback = chrono::DateTime::from_timestamp(t, 0).unwrap_or(now);
            let parsed = match kind {
                ProviderKind::Dodo => {
                    standard::parse_dodo(h.id, body, &provider.org_id_from, fallback)
                }
                ProviderKind::Polar => {
                    standard::parse_polar(h.id, body, &provider.org_id_from, fallback)
                }
                _ => standard::parse_normalized(h.id, body, &provider.org_id_from, fallback),
            };
            parsed.map_err(Rejected::Payload)
        }
    }
}

async fn receive(
    state: &Webhooks,
    kind: ProviderKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let label = kind.metric_label();
    let count = |outcome: &str| {
        state
            .metrics
            .webhooks
            .with_label_values(&[label, outcome])
            .inc();
    };
    let Some(billing) = state.billing.as_ref() else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "billing webhooks are not configured",
        );
    };
    let Some(provider) = billing.provider(&kind) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "this webhook provider is not configured",
        );
    };
    let now = state.quota.now();
    let event = match verify_and_parse(provider, headers, body, now) {
        Ok(e) => e,
        Err(Rejected::Signature(e)) => {
            count("invalid_signature");
            tracing::warn!(provider = %kind.key(), reason = %e, "webhook rejected");
            return error_response(StatusCode::BAD_REQUEST, "invalid_signature", &e.to_string());
        }
        Err(Rejected::Payload(e)) => {
            count("invalid");
            tracing::warn!(provider = %kind.key(), reason = %e, "verified webhook payload not understood; acknowledged as invalid");
            return invalid();
        }
    };
    if !event.is_storable() {
        count("invalid");
        tracing::warn!(provider = %kind.key(), "verified webhook carries control characters in an id or type; acknowledged as invalid");
        return invalid();
    }
    // Credits are granted before the event is recorded, so a failure here is retried by the
    // provider and a recorded event always has its grants (see `credits`).
    match super::credits::grant(&state.quota, &state.pool, provider, &event.normalized, now).await {
        Ok(super::credits::Outcome::Nothing | super::credits::Outcome::Granted(..)) => {}
        Ok(super::credits::Outcome::Unlinked) => {
            count("unlinked");
            tracing::warn!(provider = %kind.key(), event_id = %event.event_id, "credit event names no known org; acknowledged without granting");
            return Json(json!({"received": true, "outcome": "unlinked"})).into_response();
        }
        Ok(super::credits::Outcome::Invalid(reason)) => {
            count("invalid");
            tracing::warn!(provider = %kind.key(), event_id = %event.event_id, reason, "credit event cannot be granted; acknowledged as invalid");
            return invalid();
        }
        Err(e) => {
            count("error");
            tracing::error!(provider = %kind.key(), event_id = %event.event_id, error = %e, "credits not granted; the provider will retry");
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the credits could not be granted; retry later",
            );
        }
    }
    let catalog = state.quota.catalog();
    let policy = Policy::new(&catalog, billing);
    match apply::apply(&state.pool, provider, &policy, &event, now).await {
        Ok(applied) => {
            count(applied.label());
            tracing::info!(
                provider = %kind.key(),
                event_id = %event.event_id,
                event_type = %event.event_type,
                outcome = applied.label(),
                "webhook"
            );
            if let Applied::Processed {
                org,
                plan_changed,
                left,
            } = &applied
            {
                if *plan_changed {
                    state.quota.announce(Change::Org(org));
                }
                if let Some(left) = left {
                    state.quota.announce(Change::Org(left));
                }
            }
            Json(json!({"received": true, "outcome": applied.label()})).into_response()
        }
        Err(e) if e.is_data_exception() => {
            count("invalid");
            tracing::warn!(provider = %kind.key(), event_id = %event.event_id, error = %e, "verified webhook holds a value the database refuses; acknowledged as invalid");
            invalid()
        }
        Err(e) => {
            count("error");
            tracing::error!(provider = %kind.key(), event_id = %event.event_id, error = %e, "webhook not applied; the provider will retry");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the event could not be stored; retry later",
            )
        }
    }
}

/// A verified event that can never be applied: acknowledged, so the provider stops redelivering
/// it, and counted in `quota_gateway_webhooks_total{outcome="invalid"}`.
fn invalid() -> Response {
    Json(json!({"received": true, "outcome": "invalid"})).into_response()
}
