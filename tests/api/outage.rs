//! Redis faults, through a TCP proxy the test cuts (the shared Redis keeps serving other tests):
//! `closed` answers 503, `local` enforces per replica, `open` admits; in both of the latter every
//! admitted unit reaches Redis once it is back. A flushed script cache is reloaded transparently.

use std::time::Duration;

use futures_util::future::join_all;
use quota_gateway::config::OnRedisError;
use serde_json::{Value, json};

use crate::helpers::{
    ChaosProxy, TestApp, TestOptions, eventually, host_port, json, skip_in_cluster_mode, spawn_app,
    spawn_app_with, test_redis_url,
};

async fn behind_proxy(
    on_error: OnRedisError,
    local_share: f64,
    plans: Option<&str>,
) -> (ChaosProxy, TestApp) {
    let proxy = ChaosProxy::start(&host_port(&test_redis_url())).await;
    let mut opts = TestOptions {
        redis_url: Some(format!("redis://{}/0", proxy.addr)),
        on_error,
        local_share,
        ..Default::default()
    };
    if let Some(p) = plans {
        opts.plans = p.into();
    }
    let app = spawn_app_with(opts).await;
    (proxy, app)
}

/// The counter of `metric`'s calendar month, read from Redis directly.
async fn redis_month(app: &TestApp, org: &str, metric: &str) -> i64 {
    let keys = app.redis_keys().await;
    let key = keys
        .iter()
        .find(|k| k.contains(&format!("{{{org}}}:c:{metric}:month:")));
    match key {
        Some(k) => app.redis_get(k).await.unwrap().parse().unwrap(),
        None => 0,
    }
}

async fn statuses(app: &TestApp, n: usize, body: Value) -> Vec<u16> {
    join_all((0..n).map(|_| app.check(body.clone())))
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect()
}

async fn wait_recovered(app: &TestApp) {
    let ok = eventually(Duration::from_secs(10), || async {
        let r = app.get("/readyz").await;
        r.status() == 200 && json(r).await["status"] == "ready"
    })
    .await;
    assert!(ok.is_some(), "the gateway leaves degraded mode on its own");
}

#[tokio::test]
async fn closed_mode_answers_503_and_recovers_without_a_restart() {
    if skip_in_cluster_mode("closed_mode_answers_503_and_recovers_without_a_restart") {
        return;
    }
    let (proxy, app) = behind_proxy(OnRedisError::Closed, 1.0, None).await;
    let body = json!({"org_id": "acme", "metric": "requests"});
    assert_eq!(app.check(body.clone()).await.status(), 200);

    proxy.cut();
    let r = app.check(body.clone()).await;
    assert_eq!(r.status(), 503);
    let b = json(r).await;
    assert_eq!(b["error"], "store_unavailable");
    assert!(
        !b["message"].as_str().unwrap().contains("redis://"),
        "no internals leak: {b}"
    );
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    assert_eq!(json(ready).await["redis"], "unreachable");

    proxy.restore();
    let back = eventually(Duration::from_secs(10), || async {
        app.check(body.clone()).await.status() == 200
    })
    .await;
    assert!(back.is_some(), "the gateway reconnects on its own");
    wait_recovered(&app).await;
    assert_eq!(
        redis_month(&app, "acme", "requests").await,
        2,
        "the failed check was not counted"
    );
}

#[tokio::test]
async fn local_mode_enforces_what_was_left_and_replays_every_admitted_unit() {
    if skip_in_cluster_mode("local_mode_enforces_what_was_left_and_replays_every_admitted_unit") {
        return;
    }
    // Free: 20 requests a month, 10 a second; 1000 tokens.
    let (proxy, app) = behind_proxy(OnRedisError::Local, 1.0, None).await;
    let body = json!({"org_id": "acme", "metric": "requests"});
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests", "amount": 9}))
            .await
            .status(),
        200
    );
    app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests", "amount": 6}))
            .await
            .status(),
        200
    );

    proxy.cut();
    let during = statuses(&app, 8, body.clone()).await;
    assert_eq!(
        during.iter().filter(|s| **s == 200).count(),
        5,
        "{during:?}"
    );
    assert_eq!(
        during.iter().filter(|s| **s == 402).count(),
        3,
        "{during:?}"
    );
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "tokens", "amount": 250}),
        )
        .await;
    assert_eq!(r.status(), 200, "usage reports are kept too");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200, "degraded, but still deciding");
    assert_eq!(
        json(ready).await,
        json!({"status": "degraded", "redis": "unreachable", "postgres": "ok"})
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("quota_gateway_degraded 1"), "{metrics}");

    proxy.restore();
    wait_recovered(&app).await;
    assert_eq!(redis_month(&app, "acme", "requests").await, 20);
    assert_eq!(redis_month(&app, "acme", "tokens").await, 250);
    app.flush().await.unwrap();
    assert_eq!(
        app.stored_usage("acme", "requests").await,
        Some(20),
        "and, after a flush, in Postgres"
    );
    assert_eq!(app.stored_usage("acme", "tokens").await, Some(250));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("quota_gateway_degraded 0"));
    app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(
        app.check(body).await.status(),
        402,
        "Redis knows the org is at its limit"
    );
}

#[tokio::test]
async fn local_mode_admits_only_its_share_of_what_was_left() {
    if skip_in_cluster_mode("local_mode_admits_only_its_share_of_what_was_left") {
        return;
    }
    let (proxy, app) = behind_proxy(OnRedisError::Local, 0.5, None).await;
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
            .await
            .status(),
        200
    );
    proxy.cut();
    app.clock.advance(chrono::Duration::seconds(1));
    let during = statuses(&app, 8, json!({"org_id": "acme", "metric": "requests"})).await;
    assert_eq!(
        during.iter().filter(|s| **s == 200).count(),
        5,
        "half of the 10 left: {during:?}"
    );
    proxy.restore();
    wait_recovered(&app).await;
    assert_eq!(redis_month(&app, "acme", "requests").await, 15);
}

#[tokio::test]
async fn local_mode_applies_rates_per_replica() {
    if skip_in_cluster_mode("local_mode_applies_rates_per_replica") {
        return;
    }
    let plans = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
rates = { requests = { limit = 10, window = "10s" } }
"#;
    let (proxy, app) = behind_proxy(OnRedisError::Local, 1.0, Some(plans)).await;
    proxy.cut();
    let during = statuses(&app, 25, json!({"org_id": "acme", "metric": "requests"})).await;
    assert_eq!(
        during.iter().filter(|s| **s == 200).count(),
        10,
        "{during:?}"
    );
    assert_eq!(
        during.iter().filter(|s| **s == 429).count(),
        15,
        "{during:?}"
    );
    proxy.restore();
    wait_recovered(&app).await;
    assert_eq!(redis_month(&app, "acme", "requests").await, 10);
}

#[tokio::test]
async fn open_mode_admits_everything_and_still_counts_it() {
    if skip_in_cluster_mode("open_mode_admits_everything_and_still_counts_it") {
        return;
    }
    let (proxy, app) = behind_proxy(OnRedisError::Open, 1.0, None).await;
    proxy.cut();
    let during = statuses(&app, 30, json!({"org_id": "acme", "metric": "requests"})).await;
    assert!(during.iter().all(|s| *s == 200), "{during:?}");
    assert_eq!(app.get("/readyz").await.status(), 200);
    proxy.restore();
    wait_recovered(&app).await;
    assert_eq!(
        redis_month(&app, "acme", "requests").await,
        30,
        "nothing admitted is lost"
    );
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests"}))
            .await
            .status(),
        402
    );
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_transparently() {
    let app = spawn_app().await;
    let body = json!({"org_id": "acme", "metric": "requests"});
    assert_eq!(app.check(body.clone()).await.status(), 200);
    let mut c = app.redis.clone();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    let r = app.check(body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["usage"][0]["current"], 2);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("quota_gateway_redis_script_reloads_total 1"),
        "{metrics}"
    );
}

/// A keyed batch resent while Redis is unreachable cannot be told from a duplicate: it is
/// answered `deferred`, not `recorded`, and its replay counts nothing twice.
#[tokio::test]
async fn a_keyed_batch_resent_during_an_outage_is_deferred_and_counted_once() {
    if skip_in_cluster_mode("a_keyed_batch_resent_during_an_outage_is_deferred_and_counted_once") {
        return;
    }
    let (proxy, app) = behind_proxy(OnRedisError::Local, 1.0, None).await;
    let batch = json!({"events": [
        {"org_id": "acme", "metric": "tokens", "amount": 30, "idempotency_key": "b-1"},
        {"org_id": "acme", "metric": "tokens", "amount": 12, "idempotency_key": "b-2"},
        {"org_id": "acme", "metric": "tokens", "amount": 5},
    ]});
    let first = json(app.post("/v1/usage", &batch).await).await;
    assert_eq!(first["recorded"], 3, "{first}");
    assert_eq!(first["deferred"], 0, "{first}");

    proxy.cut();
    let again = app.post("/v1/usage", &batch).await;
    assert_eq!(again.status(), 200);
    let again = json(again).await;
    assert_eq!(again["deferred"], 2, "the keyed events: {again}");
    assert_eq!(
        again["recorded"], 1,
        "the unkeyed one is new by definition: {again}"
    );
    assert_eq!(again["results"][0]["deferred"], true, "{again}");
    assert_eq!(again["results"][2].get("deferred"), None, "{again}");

    proxy.restore();
    wait_recovered(&app).await;
    // 30 + 12 + 5 once, and the unkeyed 5 again: the keyed ones were duplicates.
    assert_eq!(redis_month(&app, "acme", "tokens").await, 52);
    let after = json(app.post("/v1/usage", &batch).await).await;
    assert_eq!(after["duplicates"], 2, "{after}");
    assert_eq!(after["deferred"], 0, "{after}");
}
