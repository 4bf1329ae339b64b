//! Decision → HTTP: status, rate-limit headers and body, shared by `/v1/check` and the proxy so
//! both answer a denial with the same bytes.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::render::{DenialBody, RateLimitHeaders};

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Add the rate-limit headers of a decision (none when no limit applied).
pub fn insert_ratelimit_headers(headers: &mut HeaderMap, h: &RateLimitHeaders) {
    if h.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&h.policy) {
        headers.insert(RATELIMIT_POLICY.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&h.ratelimit) {
        headers.insert(RATELIMIT.clone(), v);
    }
    if let Some(v) = h.x_limit {
        headers.insert(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(v));
    }
    if let Some(v) = h.x_remaining {
        headers.insert(X_RATELIMIT_REMAINING.clone(), HeaderValue::from(v));
    }
    if let Some(v) = h.x_reset {
        headers.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from(v));
    }
    if let Some(v) = h.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(v));
    }
}

/// Shadow enforcement: a would-be denial is counted and logged, never answered; the caller goes
/// on as if allowed, and its headers lose `Retry-After` (nothing has to wait).
pub fn shadow_denial(headers: &mut RateLimitHeaders, org: &str, plan: &str, outcome: &str) {
    tracing::info!(org, plan, outcome, "shadow mode: would deny");
    headers.retry_after = None;
}

/// A 402/429 problem document with its headers. Its status is the document's own `status`
/// member (RFC 9457), set by `domain::render` from the outcome.
pub fn denial(body: &DenialBody<'_>, headers: &RateLimitHeaders) -> Response {
    let status = StatusCode::from_u16(body.status).unwrap_or(StatusCode::PAYMENT_REQUIRED);
    json_with(status, body, headers, "application/problem+json")
}

/// An allowed decision's JSON body with its headers.
pub fn allowed<T: Serialize>(body: &T, headers: &RateLimitHeaders) -> Response {
    json_with(StatusCode::OK, body, headers, "application/json")
}

fn json_with<T: Serialize>(
    status: StatusCode,
    body: &T,
    h: &RateLimitHeaders,
    content_type: &'static str,
) -> Response {
    let bytes = match serde_json::to_vec(body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a decision body");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let mut response = (status, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    insert_ratelimit_headers(headers, h);
    response
}
