//! `quota-gateway demo-upstream`: a stand-in product API to put the proxy in front of, so the
//! quick start shows the gateway's main job without anyone writing a service first.
//!
//! It answers the way an API the gateway meters usually does, and nothing more:
//! - `GET|POST /v1/hello`: JSON naming the org and plan the gateway identified (`x-org-id`,
//!   `x-plan-id`), so a reader sees what the upstream is told;
//! - `POST /v1/chat/completions`: a canned answer with `usage.total_tokens` in the body and the
//!   same number in `x-usage-tokens`, the header a route's `report` reads;
//! - `GET|POST /v1/chat/stream`: the same answer as server-sent events, one word per event, the
//!   last event carrying `{"usage":{"total_tokens":N}}` (and `x-usage-tokens` up front: the
//!   canned answer's length is known before it streams);
//! - `POST /v1/images`: a fake generated image, for a route charging a metric of its own;
//! - `GET /health`: `ok`.
//!
//! Not for production: it keeps no state and trusts every header it is sent.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The canned answer of the chat routes.
const ANSWER: &str =
    "Hello from the demo upstream. Every word you read here went through the gateway.";

/// Pause between two events of the stream, so a reader sees them arrive one by one.
const EVENT_GAP: Duration = Duration::from_millis(50);

pub fn router() -> Router {
    Router::new()
        .route("/v1/hello", get(hello).post(hello))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/chat/stream", get(stream).post(stream))
        .route("/v1/images", post(image))
        .route("/health", get(|| async { "ok" }))
        .fallback(not_found)
}

/// Serve the demo upstream on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, stop: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Bind `addr` and serve until `stop` fires; logs the address it got.
pub async fn run(addr: SocketAddr, stop: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the demo upstream on {addr}"))?;
    let bound = listener.local_addr()?;
    eprintln!(
        "demo upstream on http://{bound}: GET|POST /v1/hello, POST /v1/chat/completions, \
         GET|POST /v1/chat/stream (SSE), POST /v1/images, GET /health"
    );
    serve(listener, stop).await?;
    Ok(())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn hello(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    axum::Json(json!({
        "message": "hello from the demo upstream",
        "method": method.as_str(),
        "path": uri.path(),
        "org_id": header_str(&headers, "x-org-id"),
        "plan": header_str(&headers, "x-plan-id"),
    }))
    .into_response()
}

/// Tokens of an exchange: words of the request body plus words of the answer. Deterministic, so
/// the usage the gateway records can be predicted.
fn tokens(body: &[u8]) -> usize {
    let prompt = String::from_utf8_lossy(body);
    prompt.split_whitespace().count() + ANSWER.split_whitespace().count()
}

async fn chat(body: Bytes) -> Response {
    let total = tokens(&body);
    (
        [("x-usage-tokens", total.to_string())],
        axum::Json(json!({
            "id": format!("demo-{}", uuid::Uuid::new_v4().simple()),
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}}],
            "usage": {"total_tokens": total},
        })),
    )
        .into_response()
}

async fn stream(body: Bytes) -> Response {
    let total = tokens(&body);
    let mut events: Vec<String> = ANSWER
        .split_whitespace()
        .map(|w| format!("data: {}\n\n", json!({ "delta": w })))
        .collect();
    events.push(format!(
        "data: {}\n\n",
        json!({ "usage": { "total_tokens": total } })
    ));
    let body = futures_util::stream::unfold(events.into_iter(), |mut rest| async move {
        let next = rest.next()?;
        tokio::time::sleep(EVENT_GAP).await;
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(next)), rest))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-usage-tokens", total.to_string())
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn image(headers: HeaderMap) -> Response {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (
        StatusCode::CREATED,
        axum::Json(json!({
            "id": format!("img_{}", &id[..12]),
            "org_id": header_str(&headers, "x-org-id"),
            "url": format!("https://example.com/demo/{}.png", &id[..12]),
        })),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "error": "not_found",
            "message": format!("the demo upstream has no {}", uri.path()),
        })),
    )
        .into_response()
}
