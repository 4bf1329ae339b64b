//! Per-request latency by route pattern (never the raw path, which holds org ids). Patterns are
//! written `:param` rather than axum's `{param}`: braces inside label values trip up some
//! exposition-format parsers.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::SharedState;

pub async fn requests(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| label_for(p.as_str()));
    let started = Instant::now();
    let response = next.run(req).await;
    let route = route.as_deref().unwrap_or("unmatched");
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    state
        .metrics
        .api_requests
        .with_label_values(&[route, class])
        .observe(started.elapsed().as_secs_f64());
    response
}

fn label_for(pattern: &str) -> String {
    if !pattern.contains('{') {
        return pattern.to_owned();
    }
    pattern.replace('{', ":").replace('}', "")
}
