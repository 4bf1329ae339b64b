//! The quick start's wiring: the shipped `config/gateway.toml` (its `[proxy]`, `[identity]` and
//! routes, read by the gateway's own loader) and `config/plans.toml`, in front of the demo
//! upstream (`quota-gateway demo-upstream`), isolated like every other test.

use std::path::PathBuf;
use std::time::Duration;

use quota_gateway::config::{self, EnvOverrides};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, TestOptions, eventually, json, spawn_app_with, usage_entry};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The demo upstream on a free port; stopped when the token is dropped by the caller.
async fn demo_upstream() -> (std::net::SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(quota_gateway::demo_upstream::serve(listener, stop.clone()));
    (addr, stop)
}

/// A gateway with the example config's proxy section in front of a demo upstream.
async fn quick_start_app() -> (TestApp, CancellationToken) {
    let (upstream, stop) = demo_upstream().await;
    // The environment overrides are how docker-compose points the same file elsewhere.
    let env = EnvOverrides {
        proxy_listen: Some("127.0.0.1:0".into()),
        proxy_upstream: Some(format!("http://{upstream}")),
        ..Default::default()
    };
    let (settings, _) = config::load(&repo().join("config/gateway.toml"), &env)
        .unwrap_or_else(|e| panic!("the example config is invalid: {e}"));
    let app = spawn_app_with(TestOptions {
        proxy: Some(settings.proxy.expect("the example config runs the proxy")),
        plans_file: Some(repo().join("config/plans.toml")),
        ..Default::default()
    })
    .await;
    (app, stop)
}

async fn post_through(app: &TestApp, path: &str, key: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.proxy_url(path))
        .header("x-api-key", key)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_demo_upstream_is_metered_through_the_example_routes() {
    let (app, _stop) = quick_start_app().await;
    let (_, key) = app.create_key("acme").await;

    // The upstream is told who called, and the request is counted.
    let r = app.proxy_get("/v1/hello", &key).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("ratelimit-policy"));
    let body = json(r).await;
    assert_eq!(body["org_id"], "acme");
    assert_eq!(body["plan"], "free");
    assert_eq!(app.usage_of("acme", "requests").await, 1);

    // Chat: the upstream's x-usage-tokens header becomes usage and never reaches the client.
    let r = post_through(&app, "/v1/chat/completions", &key, "tell me a joke").await;
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("x-usage-tokens"));
    let body = json(r).await;
    let reported = body["usage"]["total_tokens"].as_i64().unwrap();
    assert!(reported > 3, "{body}");
    let recorded = eventually(Duration::from_secs(5), || async {
        app.usage_of("acme", "tokens").await == reported
    })
    .await;
    assert!(recorded.is_some(), "the reported tokens were recorded");

    // The SSE stream passes through as events, the last one carrying the usage.
    let r = post_through(&app, "/v1/chat/stream", &key, "stream it").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert!(events.len() > 2, "{text}");
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let streamed = last["usage"]["total_tokens"].as_i64().unwrap();
    let recorded = eventually(Duration::from_secs(5), || async {
        app.usage_of("acme", "tokens").await == reported + streamed
    })
    .await;
    assert!(recorded.is_some(), "the stream's tokens were recorded");

    // Unmetered health check: no key needed.
    let r = app
        .client
        .get(app.proxy_url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_example_plans_give_a_429_and_a_402_with_an_upgrade_hint() {
    let (app, _stop) = quick_start_app().await;
    let (_, key) = app.create_key("acme").await;

    // A burst past the Free plan's per-second rate.
    let mut statuses = Vec::new();
    let mut denied = None;
    for _ in 0..20 {
        let r = app.proxy_get("/v1/hello", &key).await;
        statuses.push(r.status().as_u16());
        if r.status() == 429 && denied.is_none() {
            denied = Some(r);
        }
    }
    assert_eq!(statuses[0], 200);
    let r = denied.unwrap_or_else(|| panic!("no 429 in {statuses:?}"));
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(json(r).await["error"], "rate_limited");

    // The Free plan's image quota, then the upgrade hint.
    let free_images = app.catalog_limit("free", "images");
    for _ in 0..free_images {
        assert_eq!(
            post_through(&app, "/v1/images", &key, "").await.status(),
            201
        );
    }
    let r = post_through(&app, "/v1/images", &key, "").await;
    assert_eq!(r.status(), 402);
    let body = json(r).await;
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["upgrade"]["plan"], "pro");
    assert!(
        body["upgrade"]["url"]
            .as_str()
            .unwrap()
            .contains("org=acme")
    );

    // The upgrade through the admin API applies at once on this replica.
    app.set_plan("acme", "pro").await;
    assert_eq!(
        post_through(&app, "/v1/images", &key, "").await.status(),
        201
    );
    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(usage["plan"]["id"], "pro");
    assert_eq!(
        usage_entry(&usage, "metric", "images")["current"],
        json!(free_images + 1)
    );
}

impl TestApp {
    /// The monthly limit of a metric on a plan of the catalog this app runs.
    fn catalog_limit(&self, plan: &str, metric: &str) -> u64 {
        self.catalog
            .plan(plan)
            .unwrap()
            .quotas_for(metric)
            .next()
            .unwrap_or_else(|| panic!("{plan} has a quota on {metric}"))
            .limit
    }
}
