//! `POST /v1/usage` (post-hoc reports), the usage view and entitlements.

use serde_json::json;

use crate::helpers::{json, spawn_app, usage_entry};

fn entry(usage: &serde_json::Value, metric: &str) -> serde_json::Value {
    usage_entry(usage, "metric", metric)
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_not_counted_again() {
    let app = spawn_app().await;
    let report =
        json!({"org_id": "acme", "metric": "tokens", "amount": 500, "idempotency_key": "req-1"});
    let first = json(app.post("/v1/usage", &report).await).await;
    assert_eq!(first["recorded"], true);
    assert_eq!(first["duplicate"], false);
    let again = app.post("/v1/usage", &report).await;
    assert_eq!(again.status(), 200);
    let again = json(again).await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["recorded"], false);
    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(entry(&usage, "tokens")["current"], 500);

    // The same key for another org is a different report.
    let other =
        json!({"org_id": "globex", "metric": "tokens", "amount": 7, "idempotency_key": "req-1"});
    assert_eq!(
        json(app.post("/v1/usage", &other).await).await["duplicate"],
        false
    );

    // The marker lives at least 24 h.
    let keys = app.redis_keys().await;
    let idem = keys.iter().find(|k| k.contains(":idem:")).unwrap();
    let mut c = app.redis.clone();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(idem)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 24 * 3600 * 1000, "ttl {ttl} ms");
}

#[tokio::test]
async fn usage_reports_never_deny_and_show_over_100_percent() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": 1500}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    let tokens = entry(&usage, "tokens");
    assert_eq!(tokens["current"], 1500);
    assert_eq!(tokens["remaining"], 0);
    assert_eq!(tokens["percentage"], 150.0);
    // Now a check is denied.
    let r = app
        .check(json!({"org_id": "acme", "metric": "tokens", "amount": 1}))
        .await;
    assert_eq!(r.status(), 402);
}

#[tokio::test]
async fn batches_record_each_event_once() {
    let app = spawn_app().await;
    let batch = json!({"events": [
        {"org_id": "acme", "metric": "tokens", "amount": 10, "idempotency_key": "a"},
        {"org_id": "acme", "metric": "tokens", "amount": 20, "idempotency_key": "b"},
        {"org_id": "globex", "metric": "requests", "amount": 3},
        {"org_id": "acme", "metric": "tokens", "amount": 10, "idempotency_key": "a"}
    ]});
    let r = app.post("/v1/usage", &batch).await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["recorded"], 3);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(body["results"][3]["duplicate"], true);
    let acme = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(entry(&acme, "tokens")["current"], 30);
    let globex = json(app.get("/v1/orgs/globex/usage").await).await;
    assert_eq!(entry(&globex, "requests")["current"], 3);
}

#[tokio::test]
async fn a_batch_with_one_bad_event_records_nothing() {
    let app = spawn_app().await;
    let batch = json!({"events": [
        {"org_id": "acme", "metric": "tokens", "amount": 10},
        {"org_id": "acme", "metric": "nope", "amount": 1}
    ]});
    let r = app.post("/v1/usage", &batch).await;
    assert_eq!(r.status(), 422);
    let body = json(r).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("events[1].metric"),
        "{body}"
    );
    assert!(app.usage_keys().await.is_empty());
    let too_many: Vec<_> = (0..10_001)
        .map(|_| json!({"org_id": "acme", "metric": "tokens"}))
        .collect();
    let r = app.post("/v1/usage", &json!({"events": too_many})).await;
    assert_eq!(r.status(), 413);
    let body = json(r).await;
    assert_eq!(body["error"], "payload_too_large");
    assert!(
        body["message"].as_str().unwrap().contains("10000"),
        "{body}"
    );
    assert!(app.usage_keys().await.is_empty());
}

/// A full batch reaches Redis as one pipeline per org: it completes without a timeout or
/// degraded mode, counts every event once, and the same batch again is all duplicates.
#[tokio::test]
async fn a_batch_of_ten_thousand_events_counts_each_once_and_again_is_all_duplicates() {
    let app = spawn_app().await;
    let events: Vec<_> = (0..10_000)
        .map(|i| {
            json!({"org_id": if i % 2 == 0 { "acme" } else { "globex" },
                   "metric": "tokens", "amount": 1, "idempotency_key": format!("k{i}")})
        })
        .collect();
    let batch = json!({ "events": events });
    let r = app.post("/v1/usage", &batch).await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["recorded"], 10_000);
    assert_eq!(body["duplicates"], 0);
    let again = json(app.post("/v1/usage", &batch).await).await;
    assert_eq!(again["recorded"], 0);
    assert_eq!(again["duplicates"], 10_000);
    assert_eq!(app.usage_of("acme", "tokens").await, 5_000);
    assert_eq!(app.usage_of("globex", "tokens").await, 5_000);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("quota_gateway_degraded 0"), "{metrics}");
}

#[tokio::test]
async fn the_usage_view_lists_every_declared_metric() {
    let app = spawn_app().await;
    app.check(json!({"org_id": "acme", "metric": "requests", "amount": 4}))
        .await;
    let r = app.get("/v1/orgs/acme/usage").await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["org_id"], "acme");
    assert_eq!(body["plan"], json!({"id": "free", "name": "Free"}));
    let metrics: Vec<&str> = body["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["metric"].as_str().unwrap())
        .collect();
    assert_eq!(metrics, ["projects", "requests", "tokens"]);
    let requests = entry(&body, "requests");
    assert_eq!(requests["current"], 4);
    assert_eq!(requests["limit"], 20);
    assert_eq!(requests["remaining"], 16);
    assert_eq!(requests["percentage"], 20.0);
    assert_eq!(requests["unlimited"], false);
    assert_eq!(requests["period"], "month");
    assert_eq!(
        requests["resets_at"],
        crate::helpers::next_month_start(app.clock_now())
    );

    app.set_plan("acme", "pro").await;
    let body = json(app.get("/v1/orgs/acme/usage").await).await;
    let tokens = entry(&body, "tokens");
    assert_eq!(tokens["unlimited"], true);
    assert!(tokens["limit"].is_null());
    assert!(tokens["remaining"].is_null());
}

#[tokio::test]
async fn entitlements_list_every_feature_of_any_plan() {
    let app = spawn_app().await;
    let body = json(app.get("/v1/orgs/acme/entitlements").await).await;
    assert_eq!(body["plan"]["id"], "free");
    assert_eq!(
        body["features"],
        json!({"export_md": true, "export_pdf": false, "sso": false})
    );
    app.set_plan("acme", "enterprise").await;
    let body = json(app.get("/v1/orgs/acme/entitlements").await).await;
    assert_eq!(
        body["features"],
        json!({"export_md": true, "export_pdf": true, "sso": true})
    );
}

#[tokio::test]
async fn bad_input_gets_4xx_json_naming_the_field() {
    let app = spawn_app().await;
    let cases = [
        (json!({"org_id": "acme", "metric": "nope"}), 422, "metric"),
        (
            json!({"org_id": "acme", "metric": "requests", "amount": 0}),
            422,
            "amount",
        ),
        (
            json!({"org_id": "acme", "metric": "requests", "amount": -1}),
            422,
            "amount",
        ),
        (
            json!({"org_id": "acme", "metric": "requests", "amount": 9007199254740993u64}),
            422,
            "amount",
        ),
        (
            json!({"org_id": "acme", "metric": "requests", "amount": 1.5}),
            422,
            "amount",
        ),
        (
            json!({"org_id": "acme", "metric": "requests", "amount": "1"}),
            422,
            "amount",
        ),
        (
            json!({"org_id": "acme", "metric": "requests", "consume": "yes"}),
            422,
            "consume",
        ),
        (
            json!({"org_id": "a b", "metric": "requests"}),
            422,
            "org_id",
        ),
        (json!({"org_id": "", "metric": "requests"}), 422, "org_id"),
        (
            json!({"org_id": "x".repeat(129), "metric": "requests"}),
            422,
            "org_id",
        ),
        (json!({"metric": "requests"}), 422, "org_id"),
        (json!({"org_id": "acme"}), 422, "metric"),
        (
            json!({"org_id": "acme", "metric": "requests", "charges": []}),
            422,
            "metric",
        ),
        (json!({"org_id": "acme", "charges": []}), 422, "charges"),
        (
            json!({"org_id": "acme", "charges": [{"metric": "requests", "amount": -2}]}),
            422,
            "charges[0].amount",
        ),
        (
            json!({"org_id": "acme", "metric": "requests", "bogus": 1}),
            422,
            "bogus",
        ),
        // Releases are for gauges in usage reports, not in checks.
        (
            json!({"org_id": "acme", "metric": "projects", "amount": -1}),
            422,
            "amount",
        ),
    ];
    for (body, status, field) in cases {
        let r = app.check(body.clone()).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        let b = json(r).await;
        assert!(b["error"].is_string(), "{b}");
        let message = b["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{body} -> {message:?} should name {field}"
        );
    }
    // Usage reports: a negative counter amount is refused, a negative gauge amount is a release.
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": -5}),
        )
        .await;
    assert_eq!(r.status(), 422);
    // Malformed JSON is a 400.
    let r = app
        .client
        .post(app.url("/v1/check"))
        .header("content-type", "application/json")
        .body("{\"org_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(json(r).await["error"], "invalid_json");
    let r = app
        .client
        .post(app.url("/v1/check"))
        .body("org_id=acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Unknown routes and methods are JSON too.
    let r = app.get("/v2/nothing").await;
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["error"], "not_found");
    let r = app.get("/v1/check").await;
    assert_eq!(r.status(), 405);
    assert_eq!(json(r).await["error"], "method_not_allowed");
    let r = app.get("/v1/orgs/a%20b/usage").await;
    assert_eq!(r.status(), 422);
    assert!(app.usage_keys().await.is_empty(), "nothing was counted");
}
