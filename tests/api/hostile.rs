//! Hostile input at the edges: whatever a client sends, a mistake of the client's is a 4xx that
//! names the field, never a 5xx that looks like an outage. A payment provider's verified event
//! that can never be applied is acknowledged, not retried forever; a counter refuses to pass the
//! largest value it can hold; an admin write Postgres committed answers success even while Redis
//! is slow.

use std::collections::BTreeMap;
use std::time::Duration;

use quota_gateway::config::{BillingProvider, BillingSettings, OnRedisError, ProviderKind};
use quota_gateway::domain::decision::MAX_COUNTER;
use quota_gateway::webhooks::signature::sign_stripe;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::Row;

use crate::helpers::{
    ChaosProxy, TestApp, TestOptions, eventually, host_port, json, metric_value,
    skip_in_cluster_mode, spawn_app, spawn_app_with, test_redis_url,
};

const STRIPE_SECRET: &str = "whsec_hostile_test_secret";

async fn assert_422_naming(r: reqwest::Response, field: &str) -> Value {
    let status = r.status();
    let body = json(r).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.starts_with(field), "names `{field}`: {message}");
    body
}

#[tokio::test]
async fn nul_in_an_adjustment_reason_is_422_naming_the_field() {
    let app = spawn_app().await;
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/adjustments",
            Some(&json!({"metric": "requests", "amount": 5, "reason": "credit\u{0}back"})),
        )
        .await;
    let body = assert_422_naming(r, "reason").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("control characters"),
        "{body}"
    );
    let rows: i64 = sqlx::query("SELECT count(*) AS n FROM usage_adjustments")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(rows, 0, "nothing recorded");
    assert_eq!(app.usage_of("acme", "requests").await, 0, "nothing applied");
}

#[tokio::test]
async fn control_characters_in_a_key_name_are_422_naming_the_field() {
    let app = spawn_app().await;
    for name in ["ci\u{0}key", "line\nbreak", "bell\u{7}"] {
        let r = app
            .admin(
                Method::POST,
                "/admin/orgs/acme/keys",
                Some(&json!({ "name": name })),
            )
            .await;
        assert_422_naming(r, "name").await;
    }
    let keys: i64 = sqlx::query("SELECT count(*) AS n FROM api_keys")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(keys, 0);
}

#[tokio::test]
async fn null_where_the_schema_forbids_it_is_422() {
    let app = spawn_app().await;
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/keys",
            Some(&json!({ "name": null })),
        )
        .await;
    assert_422_naming(r, "name").await;
    // Left out, the name still defaults.
    let r = app
        .admin(Method::POST, "/admin/orgs/acme/keys", Some(&json!({})))
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(json(r).await["name"], "default");

    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "charges": null}))
        .await;
    assert_422_naming(r, "charges").await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": null}))
        .await;
    assert_422_naming(r, "amount").await;
    let r = app
        .check(json!({"org_id": "acme", "charges": {"metric": "requests"}}))
        .await;
    assert_422_naming(r, "charges").await;
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "idempotency_key": null}),
        )
        .await;
    assert_422_naming(r, "idempotency_key").await;
    let r = app
        .post(
            "/v1/usage",
            &json!({"events": [{"org_id": "acme", "metric": "tokens", "idempotency_key": "a\u{0}b"}]}),
        )
        .await;
    assert_422_naming(r, "events[0].idempotency_key").await;
}

/// Every value of the org's usage keys in Redis, by key.
async fn usage_values(app: &TestApp) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for k in app.usage_keys().await {
        let v = app.redis_get(&k).await;
        out.insert(k, v);
    }
    out
}

#[tokio::test]
async fn a_report_that_would_overflow_a_counter_is_422_and_changes_nothing() {
    let app = spawn_app().await;
    app.set_plan("acme", "pro").await; // tokens: metered, no limit
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": MAX_COUNTER - 10}),
        )
        .await;
    assert_eq!(r.status(), 200, "up to the largest counter value is fine");
    let before = usage_values(&app).await;
    assert!(!before.is_empty());

    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": 11, "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let body = json(r).await;
    assert_eq!(body["error"], "counter_overflow", "{body}");
    assert_eq!(usage_values(&app).await, before, "nothing applied");
    assert_eq!(app.usage_of("acme", "tokens").await, MAX_COUNTER - 10);

    // The idempotency key was not spent on the refused report.
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": 10, "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["duplicate"], false);
    assert_eq!(app.usage_of("acme", "tokens").await, MAX_COUNTER);

    // A check and an adjustment past it are refused the same way.
    let r = app
        .check(json!({"org_id": "acme", "metric": "tokens", "amount": 1}))
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(json(r).await["error"], "counter_overflow");
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/adjustments",
            Some(&json!({"metric": "tokens", "amount": 1, "reason": "manual"})),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(json(r).await["error"], "counter_overflow");
    let rows: i64 = sqlx::query("SELECT count(*) AS n FROM usage_adjustments")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(rows, 0, "the adjustment row rolled back with it");
    assert_eq!(app.usage_of("acme", "tokens").await, MAX_COUNTER);
}

#[tokio::test]
async fn amounts_past_the_largest_counter_value_are_refused_at_the_edge() {
    let app = spawn_app().await;
    app.set_plan("acme", "pro").await;
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": MAX_COUNTER + 1}),
        )
        .await;
    assert_422_naming(r, "amount").await;
    // 1,024 reports of 2^53 in one batch: refused whole, before anything is recorded.
    let events: Vec<Value> = (0..1024)
        .map(|_| json!({"org_id": "acme", "metric": "tokens", "amount": MAX_COUNTER}))
        .collect();
    let r = app.post("/v1/usage", &json!({ "events": events })).await;
    assert_eq!(r.status(), 422);
    let body = json(r).await;
    assert_eq!(body["error"], "counter_overflow", "{body}");
    assert!(body["message"].as_str().unwrap().starts_with("events[1]"));
    assert_eq!(app.usage_of("acme", "tokens").await, 0);
}

#[tokio::test]
async fn a_batch_names_the_events_a_counter_could_not_take() {
    let app = spawn_app().await;
    app.set_plan("acme", "pro").await;
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": MAX_COUNTER - 1}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .post(
            "/v1/usage",
            &json!({"events": [
                {"org_id": "acme", "metric": "requests", "amount": 3},
                {"org_id": "acme", "metric": "tokens", "amount": 2},
            ]}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let body = json(r).await;
    assert_eq!(body["error"], "counter_overflow");
    let message = body["message"].as_str().unwrap();
    assert!(message.starts_with("events[1]:"), "{message}");
    assert!(message.contains("other events were recorded"), "{message}");
    assert_eq!(app.usage_of("acme", "tokens").await, MAX_COUNTER - 1);
    assert_eq!(app.usage_of("acme", "requests").await, 3);
}

fn stripe_billing() -> BillingSettings {
    BillingSettings {
        grace_period: Duration::from_secs(72 * 3600),
        auto_downgrade: true,
        providers: vec![BillingProvider {
            kind: ProviderKind::Stripe,
            secrets: vec![SecretString::from(STRIPE_SECRET)],
            org_id_from: "metadata.org_id".into(),
            plans: [("price_pro".to_string(), "pro".to_string())]
                .into_iter()
                .collect(),
            grants: Default::default(),
        }],
    }
}

async fn send_stripe(app: &TestApp, raw: &[u8]) -> reqwest::Response {
    let t = chrono::Utc::now().timestamp();
    app.client
        .post(app.url("/webhooks/stripe"))
        .header(
            "stripe-signature",
            sign_stripe(STRIPE_SECRET.as_bytes(), t, raw),
        )
        .header("content-type", "application/json")
        .body(raw.to_vec())
        .send()
        .await
        .unwrap()
}

fn subscription_event(id: &str, ty: &str, customer: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "object": "event",
        "type": ty,
        "created": chrono::Utc::now().timestamp(),
        "data": {"object": {
            "id": "sub_1",
            "object": "subscription",
            "customer": customer,
            "status": "active",
            "metadata": {"org_id": "acme"},
            "items": {"data": [{"price": {"id": "price_pro"}}]},
        }},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_verified_stripe_event_with_nul_is_acknowledged_as_invalid_on_every_delivery() {
    let app = spawn_app_with(TestOptions {
        billing: Some(stripe_billing()),
        ..Default::default()
    })
    .await;
    let cases = [
        subscription_event("evt_1", "customer.subscription.updated\u{0}", "cus_1"),
        subscription_event("evt_\u{0}2", "customer.subscription.updated", "cus_1"),
        subscription_event("evt_3", "customer.subscription.updated", "cus\u{0}1"),
        br#"{"id": "evt_4", "type": 7, "data": []}"#.to_vec(),
    ];
    for raw in &cases {
        for delivery in 1..=2 {
            let r = send_stripe(&app, raw).await;
            assert_eq!(r.status(), 200, "delivery {delivery}");
            assert_eq!(
                json(r).await,
                json!({"received": true, "outcome": "invalid"}),
                "delivery {delivery}"
            );
        }
    }
    let stored: i64 = sqlx::query("SELECT count(*) AS n FROM webhook_events")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(stored, 0, "nothing stored");
    let plan: Option<String> = sqlx::query("SELECT plan_id FROM orgs WHERE org_id = 'acme'")
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        .and_then(|r| r.get("plan_id"));
    assert_eq!(plan, None, "no plan change");
    assert_eq!(
        metric_value(
            &app,
            "quota_gateway_webhooks_total{outcome=\"invalid\",provider=\"stripe\"}"
        )
        .await,
        8.0
    );
    // A well-formed event still applies.
    let r = send_stripe(
        &app,
        &subscription_event("evt_5", "customer.subscription.updated", "cus_1"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["outcome"], "processed");
}

#[tokio::test]
async fn an_admin_plan_change_answers_success_while_redis_is_slow() {
    if skip_in_cluster_mode("an_admin_plan_change_answers_success_while_redis_is_slow") {
        return;
    }
    let proxy = ChaosProxy::start(&host_port(&test_redis_url())).await;
    let app = spawn_app_with(TestOptions {
        redis_url: Some(format!("redis://{}/0", proxy.addr)),
        redis_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    assert_eq!(app.usage_of("acme", "requests").await, 0);
    proxy.set_delay(Duration::from_millis(3000), Duration::from_millis(3000));
    let r = app
        .admin(
            Method::PUT,
            "/admin/orgs/acme",
            Some(&json!({"plan": "pro"})),
        )
        .await;
    let status = r.status();
    let body = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["assigned_plan"], "pro", "{body}");
    assert_eq!(
        body["usage"],
        Value::Null,
        "usage not readable in time: {body}"
    );
    let plan: String = sqlx::query("SELECT plan_id FROM orgs WHERE org_id = 'acme'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        .get("plan_id");
    assert_eq!(plan, "pro", "committed in Postgres");
    proxy.set_delay(Duration::ZERO, Duration::ZERO);
}

#[tokio::test]
async fn a_replay_redis_refuses_as_overflow_is_settled_not_retried() {
    if skip_in_cluster_mode("a_replay_redis_refuses_as_overflow_is_settled_not_retried") {
        return;
    }
    let proxy = ChaosProxy::start(&host_port(&test_redis_url())).await;
    let app = spawn_app_with(TestOptions {
        redis_url: Some(format!("redis://{}/0", proxy.addr)),
        on_error: OnRedisError::Local,
        ..Default::default()
    })
    .await;
    app.set_plan("acme", "pro").await;
    let report = |amount: i64| json!({"org_id": "acme", "metric": "tokens", "amount": amount});
    assert_eq!(
        app.post("/v1/usage", &report(MAX_COUNTER - 5))
            .await
            .status(),
        200
    );
    proxy.cut();
    // Degraded: the replica does not know the unlimited counter's value and admits the report.
    let r = app.post("/v1/usage", &report(10)).await;
    assert_eq!(r.status(), 200);
    proxy.restore();
    let settled = eventually(Duration::from_secs(10), || async {
        metric_value(&app, "quota_gateway_replay_overflow_units_total").await == 10.0
    })
    .await;
    assert!(settled.is_some(), "the refused replay is counted");
    let recovered = eventually(Duration::from_secs(10), || async {
        let r = app.get("/readyz").await;
        r.status() == 200 && json(r).await["status"] == "ready"
    })
    .await;
    assert!(recovered.is_some(), "and the replica leaves degraded mode");
    assert_eq!(
        app.state.quota.local().pending_units(),
        0,
        "nothing left to retry"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        metric_value(&app, "quota_gateway_replay_overflow_units_total").await,
        10.0,
        "not retried"
    );
    assert_eq!(app.usage_of("acme", "tokens").await, MAX_COUNTER - 5);
}
