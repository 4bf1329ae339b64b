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
