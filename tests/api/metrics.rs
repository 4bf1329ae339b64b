//! `/metrics`: parsed with a real Prometheus text parser; counters move; no org ids in labels.

use serde_json::json;

use crate::helpers::spawn_app;

async fn scrape(app: &crate::helpers::TestApp) -> prometheus_parse::Scrape {
    let r = app.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid exposition format")
}

fn counter(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn decisions_and_latencies_are_counted_without_org_ids() {
    let app = spawn_app().await;
    let org = "org-with-a-distinctive-id-4711";
    for _ in 0..3 {
        app.check(json!({"org_id": org, "metric": "requests"}))
            .await;
    }
    app.check(json!({"org_id": org, "metric": "tokens", "amount": 5000}))
        .await;
    let s = scrape(&app).await;
    let allowed = [
        ("source", "check"),
        ("outcome", "allowed"),
        ("plan", "free"),
        ("metric", "requests"),
    ];
    assert_eq!(counter(&s, "quota_gateway_decisions_total", &allowed), 3.0);
    let denied = [
        ("source", "check"),
        ("outcome", "quota_exceeded"),
        ("metric", "tokens"),
    ];
    assert_eq!(counter(&s, "quota_gateway_decisions_total", &denied), 1.0);
    assert!(
        counter(&s, "quota_gateway_redis_duration_seconds_count", &[]) >= 4.0,
        "every decision is one timed Redis call"
    );
    assert!(
        counter(
            &s,
            "quota_gateway_api_request_duration_seconds_count",
            &[("route", "/v1/check"), ("status", "2xx")]
        ) >= 3.0
    );
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric == "quota_gateway_degraded"),
        "the degraded gauge is exported"
    );
    assert_eq!(counter(&s, "quota_gateway_degraded", &[]), 0.0);
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric == "process_resident_memory_bytes"),
        "process metrics are exported"
    );

    app.get(&format!("/v1/orgs/{org}/usage")).await;
    let s = scrape(&app).await;
    for sample in &s.samples {
        for (k, v) in sample.labels.iter() {
            assert!(
                !v.contains(org),
                "label {k}={v} on {} holds an org id",
                sample.metric
            );
        }
    }
    assert!(
        counter(
            &s,
            "quota_gateway_api_request_duration_seconds_count",
            &[("route", "/v1/orgs/:org_id/usage")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn proxied_requests_are_counted_and_timed() {
    use crate::helpers::{
        TestOptions, closed_port, proxy_settings, spawn_app_with, spawn_upstream,
    };
    let up = spawn_upstream().await;
    let app = spawn_app_with(TestOptions {
        proxy: Some(proxy_settings(up.addr)),
        ..Default::default()
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    for _ in 0..3 {
        let r = app
            .client
            .get(app.proxy_url("/things"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = app
        .client
        .get(app.proxy_url("/things"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let s = scrape(&app).await;
    let allowed = [
        ("source", "proxy"),
        ("outcome", "allowed"),
        ("plan", "free"),
        ("metric", "requests"),
    ];
    assert_eq!(counter(&s, "quota_gateway_decisions_total", &allowed), 3.0);
    assert_eq!(
        counter(
            &s,
            "quota_gateway_decisions_total",
            &[("source", "proxy"), ("outcome", "unauthorized")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &s,
            "quota_gateway_upstream_responses_total",
            &[("class", "2xx")]
        ),
        3.0
    );
    assert_eq!(
        counter(
            &s,
            "quota_gateway_proxy_request_duration_seconds_count",
            &[]
        ),
        4.0
    );
    assert_eq!(
        counter(&s, "quota_gateway_proxy_overhead_seconds_count", &[]),
        3.0
    );
    assert_eq!(
        counter(&s, "quota_gateway_upstream_duration_seconds_count", &[]),
        3.0
    );

    // An upstream that refuses connections is a connect error, not a 5xx response.
    let dead = spawn_app_with(TestOptions {
        proxy: Some(proxy_settings(closed_port().await)),
        ..Default::default()
    })
    .await;
    let (_, key) = dead.create_key("acme").await;
    let r = dead
        .client
        .get(dead.proxy_url("/things"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let s = scrape(&dead).await;
    assert_eq!(
        counter(
            &s,
            "quota_gateway_upstream_responses_total",
            &[("class", "connect_error")]
        ),
        1.0
    );
}

#[tokio::test]
async fn the_proxy_forwards_in_shadow_mode() {
    use crate::helpers::{TestOptions, proxy_settings, spawn_app_with, spawn_upstream};
    let up = spawn_upstream().await;
    let plans = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
enforcement = "shadow"
quotas = { requests = { limit = 2, period = "month" } }
"#;
    let app = spawn_app_with(TestOptions {
        plans: plans.into(),
        proxy: Some(proxy_settings(up.addr)),
        ..Default::default()
    })
    .await;
    let (_, key) = app.create_key("acme").await;
    for _ in 0..4 {
        let r = app
            .client
            .get(app.proxy_url("/things"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "shadow mode never blocks");
    }
    assert_eq!(up.count(), 4);
    assert_eq!(
        app.usage_of("acme", "requests").await,
        4,
        "and still counts"
    );
    let s = scrape(&app).await;
    assert_eq!(
        counter(
            &s,
            "quota_gateway_decisions_total",
            &[("source", "proxy"), ("outcome", "quota_exceeded")]
        ),
        2.0
    );
}
