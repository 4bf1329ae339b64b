//! Liveness, readiness and the API description.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{OPENAPI_JSON, SharedState};
use crate::domain::decision::OnRedisError;

/// Readiness probes must answer fast even when a dependency hangs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when Redis and Postgres both answer, else 503 naming which does not. While Redis is
/// unreachable in the `local` and `open` outage modes the gateway still decides, so it stays 200
/// with `"status": "degraded"`: a load balancer must not drop every replica at once. A Redis
/// that may evict keys is 503 too (see `store::eviction`) unless the operator accepted it: it
/// answers, but cannot keep budgets.
pub async fn readyz(State(state): State<SharedState>) -> Response {
    let redis = tokio::time::timeout(PROBE_TIMEOUT, state.quota.store().ping());
    let pg = tokio::time::timeout(PROBE_TIMEOUT, crate::db::ping(&state.pool));
    let (redis, pg) = tokio::join!(redis, pg);
    let redis_ok = matches!(redis, Ok(Ok(()))) && !state.quota.local().is_degraded();
    let pg_ok = matches!(pg, Ok(Ok(())));
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let serves_without_redis = state.quota.local().on_error() != OnRedisError::Closed;
    let watch = state.quota.store().eviction();
    let evicting = watch.evicting();
    let refused = redis_ok && watch.required() && evicting.is_some();
    let (status, label) = match (redis_ok, pg_ok) {
        _ if refused => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, true) => (StatusCode::OK, "ready"),
        (false, true) if serves_without_redis => (StatusCode::OK, "degraded"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    let mut body = json!({
        "status": label,
        "redis": if refused { "evicting" } else { word(redis_ok) },
        "postgres": word(pg_ok),
    });
    if let Some(e) = evicting {
        body["maxmemory_policy"] = json!(e.policy);
        body["problem"] = json!(e.problem());
    }
    (status, Json(body)).into_response()
}

pub async fn openapi() -> Response {
    let mut r = OPENAPI_JSON.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<SharedState>) -> Response {
    let mut r = state.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
