//! `/v1/reservations`: reserve, settle, release, and expiry across two replicas, against real
//! Redis and Postgres.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, json, metric_value, spawn_app};

async fn reserve(app: &TestApp, body: Value) -> reqwest::Response {
    app.post("/v1/reservations", &body).await
}

async fn reserve_tokens(app: &TestApp, amount: i64, ttl: &str) -> String {
    let r = reserve(
        app,
        json!({"org_id": "acme", "charges": [{"metric": "tokens", "amount": amount}], "ttl": ttl}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let body = json(r).await;
    body["id"].as_str().unwrap().to_string()
}

async fn settle(app: &TestApp, id: &str, actual: Value) -> reqwest::Response {
    app.post(
        &format!("/v1/reservations/{id}/settle"),
        &json!({ "actual": actual }),
    )
    .await
}

async fn release(app: &TestApp, id: &str) -> reqwest::Response {
    app.client
        .delete(app.url(&format!("/v1/reservations/{id}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn reserve_then_settle_down_up_and_release() {
    let app = spawn_app().await;
    let r = reserve(
        &app,
        json!({"org_id": "acme", "charges": [{"metric": "tokens", "amount": 300}, {"metric": "requests"}]}),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("ratelimit-policy"));
    let body = json(r).await;
    let id = body["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("rsv_") && id.ends_with("_acme"), "{id}");
    assert!(body["expires_at"].is_string());
    assert_eq!(body["allowed"], true);
    assert_eq!(body["plan"]["id"], "free");
    assert_eq!(
        app.usage_of("acme", "tokens").await,
        300,
        "reserved at once"
    );

    // Settle below: 180 given back; requests keep their reserved 1.
    let r = settle(&app, &id, json!([{"metric": "tokens", "amount": 120}])).await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["status"], "settled");
    let tokens = body["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["metric"] == "tokens")
        .unwrap()
        .clone();
    assert_eq!(tokens["current"], 120);
    assert_eq!(app.usage_of("acme", "requests").await, 1);

    // Settling twice is a 409; the counters do not move.
    let r = settle(&app, &id, json!([{"metric": "tokens", "amount": 1}])).await;
    assert_eq!(r.status(), 409);
    assert_eq!(json(r).await["error"], "reservation_ended");
    let r = release(&app, &id).await;
    assert_eq!(r.status(), 409);
    assert_eq!(app.usage_of("acme", "tokens").await, 120);

    // Settle above: never denied, even past the quota (1000 tokens on free).
    let id = reserve_tokens(&app, 100, "5m").await;
    let r = settle(&app, &id, json!([{"metric": "tokens", "amount": 950}])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.usage_of("acme", "tokens").await, 1070);
    assert_eq!(
        metric_value(&app, "quota_gateway_settle_overshoot_units_total").await,
        850.0
    );

    // The ledger has every unit once.
    app.flush().await.unwrap();
    assert_eq!(app.stored_usage("acme", "tokens").await, Some(1070));
}

#[tokio::test]
async fn release_gives_everything_back_and_errors_are_clear() {
    let app = spawn_app().await;
    let id = reserve_tokens(&app, 400, "30s").await;
    let r = release(&app, &id).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["status"], "released");
    assert_eq!(app.usage_of("acme", "tokens").await, 0);
    let r = settle(&app, &id, json!([{"metric": "tokens", "amount": 5}])).await;
    assert_eq!(r.status(), 409);

    // Unknown ids (well-formed or not).
    for bad in [
        "rsv_0123456789abcdef0123456789abcdef_acme",
        "nope",
        "rsv_zz_acme",
    ] {
        let r = settle(&app, bad, json!([{"metric": "tokens", "amount": 1}])).await;
        assert_eq!(r.status(), 404, "{bad}");
        assert_eq!(json(r).await["error"], "reservation_not_found");
        assert_eq!(release(&app, bad).await.status(), 404);
    }
    // Bad bodies.
    for body in [
        json!({"org_id": "acme", "charges": []}),
        json!({"org_id": "acme", "charges": [{"metric": "nope"}]}),
        json!({"org_id": "acme", "charges": [{"metric": "tokens", "amount": -1}]}),
        json!({"org_id": "acme", "charges": [{"metric": "tokens"}], "ttl": "forever"}),
        json!({"org_id": "acme", "charges": [{"metric": "tokens"}], "ttl": "2d"}),
        json!({"org_id": "acme", "charges": [{"metric": "tokens"}], "extra": 1}),
    ] {
        let r = reserve(&app, body.clone()).await;
        assert_eq!(r.status(), 422, "{body}");
        assert!(json(r).await["message"].is_string());
    }
    let id = reserve_tokens(&app, 1, "1m").await;
    let r = settle(&app, &id, json!([{"metric": "tokens", "amount": -3}])).await;
    assert_eq!(r.status(), 422);
}

#[tokio::test]
async fn a_reservation_that_does_not_fit_is_the_check_document() {
    let app = spawn_app().await;
    let r = reserve(
        &app,
        json!({"org_id": "acme", "charges": [{"metric": "tokens", "amount": 1001}]}),
    )
    .await;
    assert_eq!(r.status(), 402);
    let body = json(r).await;
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["upgrade"]["plan"], "pro");
    assert_eq!(app.usage_of("acme", "tokens").await, 0);
    assert!(
        app.redis_keys().await.iter().all(|k| !k.contains(":rsv:")),
        "no record for a denied reservation"
    );
}

/// The sweepers of two replicas race for every expired reservation: each is ended exactly
/// once (reserved amounts kept, or given back once with `reservation_expiry = "release"`), and
/// its record says so.
#[tokio::test]
async fn expired_reservations_are_settled_once_across_two_replicas() {
    use quota_gateway::domain::reservation::OnExpiry;
    for on_expiry in [OnExpiry::Settle, OnExpiry::Release] {
        expire_across_two_replicas(on_expiry).await;
    }
}

async fn expire_across_two_replicas(on_expiry: quota_gateway::domain::reservation::OnExpiry) {
    let a = crate::helpers::spawn_app_with(crate::helpers::TestOptions {
        reservation_expiry: on_expiry,
        ..Default::default()
    })
    .await;
    let b = a.spawn_peer().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let app = if i % 2 == 0 { &a } else { &b };
        ids.push(reserve_tokens(app, 10 + i, "1s").await);
    }
    // One is released before it expires (given back once), one settled.
    assert_eq!(release(&a, &ids[0]).await.status(), 200);
    assert_eq!(
        settle(&b, &ids[1], json!([{"metric": "tokens", "amount": 1}]))
            .await
            .status(),
        200
    );
    let want: i64 = (2..10).map(|i| 10 + i).sum::<i64>() + 1;
    assert_eq!(a.usage_of("acme", "tokens").await, want);

    a.clock.advance(chrono::Duration::seconds(2));
    // Both replicas sweep at once, several times.
    for _ in 0..3 {
        let (x, y) = tokio::join!(
            a.state.reservations.sweep_once(),
            b.state.reservations.sweep_once()
        );
        let _ = (x.unwrap(), y.unwrap());
    }
    let settled = metric_value(
        &a,
        "quota_gateway_settlements_total{path=\"api\",source=\"expired\"}",
    )
    .await
        + metric_value(
            &b,
            "quota_gateway_settlements_total{path=\"api\",source=\"expired\"}",
        )
        .await;
    assert_eq!(settled, 8.0, "each expired reservation ended once");
    let want = match on_expiry {
        quota_gateway::domain::reservation::OnExpiry::Settle => want,
        quota_gateway::domain::reservation::OnExpiry::Release => 1,
    };
    assert_eq!(a.usage_of("acme", "tokens").await, want, "{on_expiry:?}");

    // Redis: every record ended and done, nothing left listed.
    let mut conn = a.redis.clone();
    for id in &ids {
        let key = format!("{}:{{acme}}:rsv:{id}", a.prefix);
        let (ending, done): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("ending")
            .arg("done")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ending.is_some(), "{id}");
        assert_eq!(done.as_deref(), Some("1"), "{id}");
    }
    let listed: i64 = redis::cmd("ZCARD")
        .arg(format!("{}:reservations:due", a.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(listed, 0);

    // Late calls are told it expired.
    let r = settle(&a, &ids[5], json!([{"metric": "tokens", "amount": 1}])).await;
    assert_eq!(r.status(), 410);
    assert_eq!(json(r).await["error"], "reservation_expired");

    // Postgres: the ledger holds the same total once.
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(a.stored_usage("acme", "tokens").await, Some(want));
}

/// `reservation_expiry = "release"`: an expired reservation is given back, once, by whichever
/// call notices first (here a settle that arrives late, before any sweep).
#[tokio::test]
async fn expiry_can_release_and_a_late_settle_notices_it() {
    let app = crate::helpers::spawn_app_with(crate::helpers::TestOptions {
        reservation_expiry: quota_gateway::domain::reservation::OnExpiry::Release,
        ..Default::default()
    })
    .await;
    let id = reserve_tokens(&app, 77, "1s").await;
    assert_eq!(app.usage_of("acme", "tokens").await, 77);
    app.clock.advance(chrono::Duration::seconds(5));
    let r = settle(&app, &id, json!([{"metric": "tokens", "amount": 10}])).await;
    assert_eq!(r.status(), 410);
    assert!(
        json(r).await["message"]
            .as_str()
            .unwrap()
            .contains("released")
    );
    assert_eq!(app.usage_of("acme", "tokens").await, 0);
    assert_eq!(app.state.reservations.sweep_once().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(app.usage_of("acme", "tokens").await, 0, "given back once");
}
