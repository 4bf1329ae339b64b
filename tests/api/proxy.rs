//! The reverse proxy, end to end: a real gateway (API + proxy listeners), a real upstream on
//! loopback, real Redis and Postgres.

use std::time::Duration;

use futures_util::future::join_all;
use quota_gateway::config::{IdentityMode, RefundOn};
use quota_gateway::proxy::routes::{ChargeSpec, PathPattern, ReportSpec, Route, RouteAction};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    PLANS, TestApp, TestOptions, TestUpstream, closed_port, eventually, json, proxy_settings,
    spawn_app_with, spawn_upstream,
};

async fn app_with(
    upstream: &TestUpstream,
    edit: impl FnOnce(&mut quota_gateway::config::ProxySettings),
) -> TestApp {
    let mut p = proxy_settings(upstream.addr);
    edit(&mut p);
    spawn_app_with(TestOptions {
        proxy: Some(p),
        ..TestOptions::default()
    })
    .await
}

fn route(path: &str, action: RouteAction) -> Route {
    Route {
        method: None,
        path: PathPattern::parse(path).unwrap(),
        action,
    }
}

fn requests(amount: i64) -> Vec<ChargeSpec> {
    vec![ChargeSpec {
        metric: "requests".into(),
        amount,
    }]
}

#[tokio::test]
async fn passes_method_path_query_headers_and_body_through() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();

    let r = app
        .client
        .patch(app.proxy_url("/v1/things/a%20b?x=1&y=%2F&x=3"))
        .header("x-api-key", &key)
        .header("x-custom", "v1")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("x-request-id", "req-42")
        .body(body.clone())
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "yes");
    assert_eq!(r.headers()["x-request-id"], "req-42");
    assert!(r.headers().contains_key("ratelimit-policy"));
    assert!(r.headers().contains_key("ratelimit"));
    assert_eq!(r.headers()["x-ratelimit-limit"], "10");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "9");
    assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());

    let got = up.last();
    assert_eq!(got.method, http::Method::PATCH);
    assert_eq!(got.uri.to_string(), "/v1/things/a%20b?x=1&y=%2F&x=3");
    assert_eq!(got.body, body);
    assert_eq!(got.headers["x-custom"], "v1");
    let multi: Vec<_> = got.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, vec!["a", "b"]);
    assert_eq!(got.headers["x-org-id"], "acme");
    assert_eq!(got.headers["x-plan-id"], "free");
    assert_eq!(got.headers["x-request-id"], "req-42");
    assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(got.headers["x-forwarded-proto"], "http");
    let proxy_host = app.proxy_addr.unwrap().to_string();
    assert_eq!(got.headers["host"], proxy_host.as_str());
    assert_eq!(got.headers["x-forwarded-host"], proxy_host.as_str());
    assert!(
        got.headers.get("x-api-key").is_none(),
        "the gateway's key must not reach the upstream"
    );
    assert_eq!(app.usage_of("acme", "requests").await, 1);
}

#[tokio::test]
async fn bearer_keys_work_and_are_not_forwarded_and_request_ids_are_generated() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let r = app
        .client
        .get(app.proxy_url("/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = up.last();
    assert!(got.headers.get("authorization").is_none());
    let id = got.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a generated uuid: {id}");
    assert_eq!(r.headers()["x-request-id"], id.as_str());
}

#[tokio::test]
async fn streams_the_response_as_it_arrives() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let tx = up.stream_sender();

    let mut r = app.proxy_get("/stream", &key).await;
    assert_eq!(r.status(), 200);
    tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
    // The upstream has not finished (the sender is alive), yet the first chunk arrives.
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("first chunk before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(first.as_ref(), b"first");
    tx.send(bytes::Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"second");
}

#[tokio::test]
async fn streams_the_request_body_as_it_is_sent() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let upload = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(hyper::body::Frame::data(b)), rx))
    });
    let request = app
        .client
        .post(app.proxy_url("/echo-stream"))
        .header("x-api-key", &key)
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(upload)))
        .send();
    let pending = tokio::spawn(request);
    tx.send(bytes::Bytes::from_static(b"ping")).await.unwrap();
    // The upload is still open, yet its first chunk made it to the upstream and back.
    let mut r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("response headers before the upload finished")
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("echoed chunk before the upload finished")
        .unwrap()
        .unwrap();
    assert_eq!(first.as_ref(), b"ping");
    tx.send(bytes::Bytes::from_static(b"pong")).await.unwrap();
    drop(tx);
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"pong");
}

#[tokio::test]
async fn missing_unknown_and_revoked_keys_get_401_and_nothing_is_forwarded() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (id, key) = app.create_key("acme").await;

    let missing = app.client.get(app.proxy_url("/x")).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(json(missing).await["error"], "unauthorized");

    let unknown = app.proxy_get("/x", "qg_0000").await;
    assert_eq!(unknown.status(), 401);
    assert_eq!(json(unknown).await["error"], "unauthorized");
    assert_eq!(up.count(), 0);

    let ok = app.proxy_get("/x", &key).await;
    assert_eq!(ok.status(), 200, "the key works (and is now cached)");
    let r = app
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(r.status(), 204);
    let revoked = app.proxy_get("/x", &key).await;
    assert_eq!(revoked.status(), 401);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn revocation_is_seen_by_a_second_gateway_within_a_second() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let peer = app.spawn_peer().await;
    let (id, key) = app.create_key("acme").await;
    let call = |app: &TestApp| {
        app.client
            .get(app.proxy_url("/x"))
            .header("x-api-key", &key)
            .send()
    };
    assert_eq!(
        call(&peer).await.unwrap().status(),
        200,
        "peer caches the key"
    );
    let r = app
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(r.status(), 204);
    let took = eventually(Duration::from_secs(1), || async {
        call(&peer).await.unwrap().status() == 401
    })
    .await;
    assert!(took.is_some(), "peer still accepts a revoked key after 1s");
}

#[tokio::test]
async fn quota_denials_are_exact_under_concurrency_and_match_v1_check() {
    let plans = PLANS.replace(
        r#"quotas = { requests = { limit = 20, period = "month" }, tokens = { limit = 1000, period = "month" }, projects = { limit = 3 } }
rates  = { requests = { limit = 10, window = "1s" } }"#,
        r#"quotas = { requests = { limit = 5, period = "month" } }"#,
    );
    assert_ne!(plans, PLANS);
    let up = spawn_upstream().await;
    let app = spawn_app_with(TestOptions {
        plans,
        proxy: Some(proxy_settings(up.addr)),
        ..TestOptions::default()
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    let responses = join_all((0..15).map(|_| {
        app.client
            .post(app.proxy_url("/work"))
            .header("x-api-key", &key)
            .body("x")
            .send()
    }))
    .await;
    let mut ok = 0;
    let mut denied = Vec::new();
    for r in responses {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            402 => denied.push(r),
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(denied.len(), 10);
    assert_eq!(up.count(), 5, "denied requests never reach the upstream");
    let d = denied.pop().unwrap();
    assert_eq!(d.headers()["content-type"], "application/problem+json");
    assert!(d.headers().contains_key("ratelimit-policy"));
    let proxied: Value = json(d).await;
    // Same bytes as /v1/check for the same denial.
    let check = app
        .check(serde_json::json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(check.status(), 402);
    assert_eq!(json(check).await, proxied);
    assert_eq!(proxied["error"], "quota_exceeded");
    assert_eq!(proxied["quota"]["current"], 5);
}

#[tokio::test]
async fn rate_denials_are_exact_under_concurrency() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    // The test clock stands still, so the whole burst falls in one window: exactly 10 pass.
    let responses = join_all((0..25).map(|_| {
        app.client
            .get(app.proxy_url("/work"))
            .header("x-api-key", &key)
            .send()
    }))
    .await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| r.as_ref().unwrap().status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 15);
    let limited = responses
        .into_iter()
        .map(Result::unwrap)
        .find(|r| r.status() == 429)
        .unwrap();
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(json(limited).await["error"], "rate_limited");
    assert_eq!(up.count(), 10);
}

#[tokio::test]
async fn connect_errors_are_502_and_refunded() {
    let up = spawn_upstream().await;
    let dead = closed_port().await;
    let app = app_with(&up, |p| {
        p.upstream = format!("http://{dead}").parse().unwrap();
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    let r = app.proxy_get("/x", &key).await;
    assert_eq!(r.status(), 502);
    let body = json(r).await;
    assert_eq!(body["error"], "upstream_unavailable");
    assert!(body["message"].is_string());
    assert_eq!(app.usage_of("acme", "requests").await, 0);
}

#[tokio::test]
async fn without_refund_on_a_failed_request_stays_charged() {
    let up = spawn_upstream().await;
    let dead = closed_port().await;
    let app = app_with(&up, |p| {
        p.upstream = format!("http://{dead}").parse().unwrap();
        p.refund_on = RefundOn {
            server_error: false,
            connect_error: false,
            timeout: false,
        };
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    let r = app.proxy_get("/x", &key).await;
    assert_eq!(r.status(), 502);
    assert_eq!(app.usage_of("acme", "requests").await, 1);
    let r = app.proxy_get("/x", &key).await;
    assert_eq!(r.status(), 502);
    assert_eq!(app.usage_of("acme", "requests").await, 2);
}

#[tokio::test]
async fn timeouts_are_504_and_refunded() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| p.request_timeout = Duration::from_millis(300)).await;
    let (_, key) = app.create_key("acme").await;
    let r = app.proxy_get("/slow/3000", &key).await;
    assert_eq!(r.status(), 504);
    assert_eq!(json(r).await["error"], "upstream_timeout");
    assert_eq!(app.usage_of("acme", "requests").await, 0);
    let r = app.proxy_get("/slow/10", &key).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.usage_of("acme", "requests").await, 1);
}

#[tokio::test]
async fn upstream_5xx_passes_through_and_is_refunded_but_4xx_is_charged() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let r = app.proxy_get("/status/503", &key).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "upstream says no");
    assert_eq!(app.usage_of("acme", "requests").await, 0);
    let r = app.proxy_get("/status/404", &key).await;
    assert_eq!(r.status(), 404);
    assert_eq!(app.usage_of("acme", "requests").await, 1);
    assert_eq!(
        app.proxy_state
            .as_ref()
            .unwrap()
            .stats
            .refunds
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

fn report_route() -> Route {
    route(
        "/report/*",
        RouteAction {
            upstream: None,
            charges: requests(1),
            report: vec![ReportSpec {
                header: http::HeaderName::from_static("x-usage-tokens"),
                metric: "tokens".into(),
            }],
            reserve: None,
            unmetered: false,
        },
    )
}

#[tokio::test]
async fn reported_usage_is_recorded_and_stripped() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| p.routes.routes.push(report_route())).await;
    let (_, key) = app.create_key("acme").await;
    let r = app.proxy_get("/report/42", &key).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-usage-tokens").is_none());
    let recorded = eventually(Duration::from_secs(3), || async {
        app.usage_of("acme", "tokens").await == 42
    })
    .await;
    assert!(recorded.is_some(), "reported tokens recorded in Redis");
    // The Redis counter itself holds it.
    let keys = app.redis_keys().await;
    let token_key = keys
        .iter()
        .find(|k| k.contains("tokens") && k.contains("month"))
        .unwrap_or_else(|| panic!("a tokens month counter among {keys:?}"));
    assert_eq!(app.redis_get(token_key).await.as_deref(), Some("42"));

    let r = app.proxy_get("/report/8", &key).await;
    assert_eq!(r.status(), 200);
    let recorded = eventually(Duration::from_secs(3), || async {
        app.usage_of("acme", "tokens").await == 50
    })
    .await;
    assert!(
        recorded.is_some(),
        "each exchange is recorded once, separately"
    );
    // Redis holds counters, not a record of each exchange: memory grows with orgs and metrics,
    // never with requests.
    for n in 1..=5 {
        let r = app.proxy_get(&format!("/report/{n}"), &key).await;
        assert_eq!(r.status(), 200);
    }
    let recorded = eventually(Duration::from_secs(5), || async {
        app.usage_of("acme", "tokens").await == 50 + 15
    })
    .await;
    assert!(recorded.is_some(), "all five recorded");
    let per_exchange: Vec<String> = app
        .redis_keys()
        .await
        .into_iter()
        .filter(|k| k.contains(":idem:"))
        .collect();
    assert!(per_exchange.is_empty(), "{per_exchange:?}");
}

#[tokio::test]
async fn malformed_reports_are_counted_not_failed() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| p.routes.routes.push(report_route())).await;
    let (_, key) = app.create_key("acme").await;
    for bad in ["abc", "-5", "1.5"] {
        let r = app
            .client
            .get(app.proxy_url(&format!("/report/{bad}")))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{bad}");
        assert!(r.headers().get("x-usage-tokens").is_none());
    }
    let state = app.proxy_state.as_ref().unwrap();
    assert_eq!(
        state
            .stats
            .malformed_reports
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(app.usage_of("acme", "tokens").await, 0);
    assert_eq!(app.usage_of("acme", "requests").await, 3);
}

#[tokio::test]
async fn spoofed_identity_headers_are_replaced_in_api_key_mode() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let r = app
        .client
        .get(app.proxy_url("/x"))
        .header("x-api-key", &key)
        .header("x-org-id", "victim")
        .header("x-plan-id", "enterprise")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = up.last();
    let orgs: Vec<_> = got.headers.get_all("x-org-id").iter().collect();
    assert_eq!(orgs, vec!["acme"]);
    let plans: Vec<_> = got.headers.get_all("x-plan-id").iter().collect();
    assert_eq!(plans, vec!["free"]);
    assert_eq!(app.usage_of("victim", "requests").await, 0);
}

#[tokio::test]
async fn header_mode_takes_the_org_from_the_trusted_header() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| {
        p.identity.mode = IdentityMode::Header;
        p.identity.header = http::HeaderName::from_static("x-tenant");
    })
    .await;
    let r = app
        .client
        .get(app.proxy_url("/x"))
        .header("x-tenant", "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().headers["x-org-id"], "globex");
    assert_eq!(app.usage_of("globex", "requests").await, 1);
    let r = app.client.get(app.proxy_url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .get(app.proxy_url("/x"))
        .header("x-tenant", "not valid!")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn unmetered_routes_need_no_key_and_unmatched_requests_without_default_are_404() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| {
        p.routes.routes.push(route(
            "/health",
            RouteAction {
                upstream: None,
                charges: vec![],
                report: vec![],
                reserve: None,
                unmetered: true,
            },
        ));
        p.routes.routes.push(route(
            "/v1/*",
            RouteAction {
                upstream: None,
                charges: requests(3),
                report: vec![],
                reserve: None,
                unmetered: false,
            },
        ));
        p.routes.default_route = None;
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    let r = app
        .client
        .get(app.proxy_url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("ratelimit").is_none());
    let r = app.proxy_get("/v1/a", &key).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.usage_of("acme", "requests").await, 3);
    let r = app.proxy_get("/elsewhere", &key).await;
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["error"], "no_route");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    // A raw request: reqwest would manage Connection itself.
    let mut sock = tokio::net::TcpStream::connect(app.proxy_addr.unwrap())
        .await
        .unwrap();
    let req = format!(
        "GET /hop HTTP/1.1\r\nHost: example.test\r\nx-api-key: {key}\r\n\
         Connection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
         TE: trailers\r\nProxy-Authorization: Basic eHg=\r\nX-Kept: yes\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-up-normal: 1"), "{text}");
    assert!(!text.contains("x-up-hop"), "{text}");
    assert!(!text.contains("keep-alive: timeout"), "{text}");

    let got = up.last();
    assert_eq!(got.headers["x-kept"], "yes");
    assert_eq!(got.headers["host"], "example.test");
    for gone in [
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-api-key",
    ] {
        assert!(got.headers.get(gone).is_none(), "{gone} was forwarded");
    }
    assert!(
        got.headers.get("connection").is_none_or(|v| !v
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("secret")),
        "the client's Connection header was forwarded"
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let responses = join_all((0..3).map(|i| {
        h2.post(app.proxy_url(&format!("/h2?i={i}")))
            .header("x-api-key", &key)
            .body(format!("body-{i}"))
            .send()
    }))
    .await;
    for (i, r) in responses.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("ratelimit"));
        assert_eq!(r.text().await.unwrap(), format!("body-{i}"));
    }
    let got = up.last();
    assert_eq!(
        got.headers["host"],
        app.proxy_addr.unwrap().to_string().as_str()
    );
    assert_eq!(app.usage_of("acme", "requests").await, 3);
}

#[tokio::test]
async fn websockets_pass_through_and_are_charged_once() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let up = spawn_upstream().await;
    let app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let mut req = format!("ws://{}/ws", app.proxy_addr.unwrap())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-api-key", key.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.close(None).await.unwrap();
    assert_eq!(app.usage_of("acme", "requests").await, 1);

    let denied =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", app.proxy_addr.unwrap())).await;
    assert!(denied.is_err(), "no key, no upgrade");
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_stops() {
    let up = spawn_upstream().await;
    let mut app = app_with(&up, |_| {}).await;
    let (_, key) = app.create_key("acme").await;
    let in_flight = tokio::spawn({
        let client = app.client.clone();
        let url = app.proxy_url("/slow/700");
        let key = key.clone();
        async move { client.get(url).header("x-api-key", key).send().await }
    });
    eventually(Duration::from_secs(3), || async { up.count() == 1 }).await;
    app.stop();
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request finished");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "finally");
    let ended = app.wait_stopped(Duration::from_secs(5)).await;
    assert!(
        matches!(ended, Some(Ok(()))),
        "run_until_stopped returned Ok"
    );
    let refused = reqwest::Client::new()
        .get(app.proxy_url("/x"))
        .header("x-api-key", &key)
        .send()
        .await;
    assert!(refused.is_err(), "no longer accepting");
}

#[tokio::test]
async fn drain_time_bounds_shutdown() {
    let up = spawn_upstream().await;
    let mut app = app_with(&up, |p| {
        p.drain_timeout = Duration::from_millis(300);
        p.request_timeout = Duration::from_secs(30);
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    let in_flight = tokio::spawn({
        let client = app.client.clone();
        let url = app.proxy_url("/slow/20000");
        async move { client.get(url).header("x-api-key", key).send().await }
    });
    assert!(
        eventually(Duration::from_secs(3), || async { up.count() == 1 })
            .await
            .is_some(),
        "the slow request never reached the upstream: nothing would be in flight"
    );
    app.stop();
    let ended = app.wait_stopped(Duration::from_secs(5)).await;
    assert!(
        matches!(ended, Some(Ok(()))),
        "stopped after the drain time, not after the slow request"
    );
    assert!(in_flight.await.unwrap().is_err(), "cut at the drain time");
}

/// Read this process's resident set size in KiB.
pub(crate) fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 1 GiB up and 1 GiB down through the proxy; prints the RSS growth. Slow: run with
/// `cargo test --release --test api one_gib -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn one_gib_each_way_with_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| p.request_timeout = Duration::from_secs(600)).await;
    let (_, key) = app.create_key("acme").await;
    // Warm up so allocator pools and connections exist before measuring.
    let _ = app
        .client
        .get(app.proxy_url("/download/1048576"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .bytes()
        .await;
    let before = rss_kib();

    let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let upload = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            (sent < GIB).then(|| {
                (
                    Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk)),
                    sent + 64 * 1024,
                )
            })
        }
    });
    let r = app
        .client
        .post(app.proxy_url("/sink"))
        .header("x-api-key", &key)
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(upload)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), GIB.to_string());
    let after_up = rss_kib();

    let mut r = app
        .client
        .get(app.proxy_url(&format!("/download/{GIB}")))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    let mut got = 0u64;
    while let Some(c) = r.chunk().await.unwrap() {
        got += c.len() as u64;
    }
    assert_eq!(got, GIB);
    let after_down = rss_kib();
    println!(
        "RSS before {before} KiB, after 1 GiB upload {after_up} KiB (+{} KiB), after 1 GiB download {after_down} KiB (+{} KiB)",
        after_up.saturating_sub(before),
        after_down.saturating_sub(before)
    );
    assert!(
        after_down.saturating_sub(before) < 64 * 1024,
        "RSS grew by more than 64 MiB"
    );
}

fn wrk(url: &str, header: Option<&str>) -> String {
    let mut cmd = std::process::Command::new("wrk");
    cmd.args(["-t2", "-c32", "-d8s", "--latency"]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("wrk installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wrk_requests(out: &str) -> u64 {
    out.lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Total calls per command from `INFO commandstats`.
async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(String, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// Requests/s and latency straight to the upstream and through the proxy in one run, plus Redis
/// commands per proxied request, against a private `redis-server` so other suites sharing the
/// main Redis do not skew the counts. Prints figures; asserts nothing about speed. Run with
/// `cargo test --release --test api measure_with_wrk -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_with_wrk() {
    let port = closed_port().await.port();
    let mut redis_server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server installed");
    let redis_url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = None;
    for _ in 0..50 {
        if let Ok(c) = client.get_multiplexed_async_connection().await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = conn.expect("private redis up");

    let up = spawn_upstream().await;
    let app = spawn_app_with(TestOptions {
        proxy: Some(proxy_settings(up.addr)),
        redis_url: Some(redis_url),
        ..TestOptions::default()
    })
    .await;
    app.set_plan("acme", "enterprise").await;
    let (_, key) = app.create_key("acme").await;
    let header = format!("x-api-key: {key}");
    let warm = app.proxy_get("/tiny", &key).await;
    assert_eq!(warm.status(), 200);

    let direct_url = format!("http://{}/tiny", up.addr);
    let direct = tokio::task::spawn_blocking(move || wrk(&direct_url, None))
        .await
        .unwrap();
    let before = commandstats(&mut conn).await;
    let proxied_url = app.proxy_url("/tiny");
    let proxied = tokio::task::spawn_blocking(move || wrk(&proxied_url, Some(&header)))
        .await
        .unwrap();
    let after = commandstats(&mut conn).await;

    let proxied_requests = wrk_requests(&proxied);
    let mut delta: Vec<(String, u64)> = after
        .iter()
        .map(|(name, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b == name)
                .map_or(0, |(_, c)| *c);
            (name.clone(), n - was)
        })
        .filter(|(name, n)| *n > 0 && name != "info")
        .collect();
    delta.sort();
    // Commands a script runs are counted too; round trips are the EVALSHA calls.
    let total: u64 = delta.iter().map(|(_, n)| n).sum();
    let evalsha = delta
        .iter()
        .find(|(name, _)| name == "evalsha")
        .map_or(0, |(_, n)| *n);
    println!(
        "EVALSHA (round trips) per proxied request: {:.3}",
        evalsha as f64 / proxied_requests.max(1) as f64
    );
    println!("--- direct to upstream ---\n{direct}");
    println!("--- through the proxy ---\n{proxied}");
    println!(
        "redis commands during the proxied run: {delta:?}; {total} for {proxied_requests} requests = {:.3} per request",
        total as f64 / proxied_requests.max(1) as f64
    );
    // wrk drops what is in flight when it stops, so the gateway may have metered a few more.
    assert!(
        app.usage_of("acme", "requests").await as u64 > proxied_requests,
        "every proxied request was metered"
    );
    let _ = redis_server.kill();
    let _ = redis_server.wait();
}

#[tokio::test]
async fn a_client_that_leaves_early_leaves_nothing_behind() {
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| p.request_timeout = Duration::from_secs(30)).await;
    let (_, key) = app.create_key("acme").await;
    let state = app.proxy_state.clone().unwrap();
    let in_flight = || {
        state
            .stats
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // Waiting for response headers: the client hangs up, the exchange is dropped.
    let mut sock = tokio::net::TcpStream::connect(app.proxy_addr.unwrap())
        .await
        .unwrap();
    sock.write_all(
        format!("GET /slow/20000 HTTP/1.1\r\nHost: t\r\nx-api-key: {key}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(3), || async { up.count() == 1 }).await;
    assert_eq!(in_flight(), 1);
    drop(sock);
    let gone = eventually(Duration::from_secs(2), || async { in_flight() == 0 }).await;
    assert!(gone.is_some(), "the request future outlived its client");

    // Mid-body: the upstream's response is abandoned, so its writes start failing.
    let tx = up.stream_sender();
    let client = reqwest::Client::new();
    let mut r = client
        .get(app.proxy_url("/stream"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
    assert_eq!(r.chunk().await.unwrap().unwrap().as_ref(), b"first");
    drop(r);
    drop(client);
    let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while tx.send(chunk.clone()).await.is_ok() {}
    })
    .await;
    assert!(
        closed.is_ok(),
        "the upstream body is still being pulled after the client left"
    );
}

#[tokio::test]
async fn an_http10_upstream_does_not_downgrade_the_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let up = spawn_upstream().await;
    let app = app_with(&up, |p| {
        p.upstream = format!("http://{addr}").parse().unwrap()
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    let r = app.proxy_get("/old", &key).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_11);
    assert_eq!(r.text().await.unwrap(), "ok");
}
