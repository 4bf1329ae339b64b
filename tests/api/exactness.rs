//! Exactness when Redis is slow or away: a call Redis applies after its deadline is counted
//! once, usage reports keep their idempotency through degraded mode, and usage admitted while
//! Redis is unreachable survives a SIGTERM through the replay outbox.
//!
//! Faults that stop a whole Redis use a private `redis-server` (`PrivateRedis`); the shared one
//! keeps serving the other tests.

use std::time::Duration;

use futures_util::future::join_all;
use quota_gateway::config::OnRedisError;
use serde_json::json;

use crate::helpers::{
    ChaosProxy, PrivateRedis, TestApp, TestOptions, eventually, host_port, json, metric_value,
    skip_in_cluster_mode, spawn_app_with, test_redis_url,
};

async fn app_on(redis: &PrivateRedis, on_error: OnRedisError) -> TestApp {
    spawn_app_with(TestOptions {
        redis_url: Some(redis.url()),
        redis_timeout: Some(Duration::from_millis(200)),
        on_error,
        ..Default::default()
    })
    .await
}

/// Stop every client of `redis` for `ms`: Redis makes no progress at all, then runs what queued.
async fn pause(redis: &PrivateRedis, ms: u64) {
    let mut c = redis.conn().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .unwrap();
}

async fn report(app: &TestApp, amount: i64, key: Option<String>) -> serde_json::Value {
    let mut body = json!({"org_id": "acme", "metric": "tokens", "amount": amount});
    if let Some(k) = key {
        body["idempotency_key"] = json!(k);
    }
    let r = app.post("/v1/usage", &body).await;
    assert_eq!(r.status(), 200);
    json(r).await
}

async fn settled(app: &TestApp, in_doubt: f64) {
    let ok = eventually(Duration::from_secs(15), || async {
        let learned = metric_value(app, "quota_gateway_in_doubt_total{outcome=\"applied\"}").await
            + metric_value(app, "quota_gateway_in_doubt_total{outcome=\"not_applied\"}").await
            + metric_value(app, "quota_gateway_in_doubt_total{outcome=\"unknown\"}").await;
        learned >= in_doubt
            && metric_value(app, "quota_gateway_degraded").await == 0.0
            && app.state.quota.local().pending_units() == 0
    })
    .await;
    assert!(
        ok.is_some(),
        "calls in doubt are settled and degraded mode ends"
    );
}

const TOKENS: &str = "*{acme}:c:tokens:month:*";

/// A paused Redis answers late, after the deadline: the request is decided locally, and when
/// Redis's answer arrives it says the units are already counted, so they are not replayed.
/// Counting them on the local path as well would bill each one twice.
#[tokio::test]
async fn calls_redis_applies_after_the_deadline_are_counted_once() {
    let redis = PrivateRedis::start(&[]).await;
    let app = app_on(&redis, OnRedisError::Local).await;
    report(&app, 1, None).await;
    pause(&redis, 1500).await;
    let answers = join_all((0..40).map(|_| report(&app, 1, None))).await;
    assert!(answers.iter().all(|a| a["recorded"] == true));
    settled(&app, 40.0).await;
    assert_eq!(
        metric_value(&app, "quota_gateway_in_doubt_total{outcome=\"applied\"}").await,
        40.0,
        "Redis applied every call in doubt once it ran again"
    );
    assert_eq!(
        redis.value_of(TOKENS).await,
        41,
        "each unit once, not twice"
    );
    app.flush().await.unwrap();
    assert_eq!(app.stored_usage("acme", "tokens").await, Some(41));
}

/// Usage reports keep their idempotency keys through degraded mode: a resend during the outage
/// is answered as a duplicate by the replica, and the replay carries the client's own keys, so
/// resends after it are duplicates in Redis too.
#[tokio::test]
async fn idempotency_keys_hold_through_an_outage_and_its_replay() {
    let redis = PrivateRedis::start(&[]).await;
    let app = app_on(&redis, OnRedisError::Local).await;
    report(&app, 1, Some("before".into())).await;
    pause(&redis, 2000).await;
    let first = join_all((0..30).map(|i| report(&app, 2, Some(format!("k{i}"))))).await;
    assert!(first.iter().all(|a| a["duplicate"] == false));
    let again = join_all((0..30).map(|i| report(&app, 2, Some(format!("k{i}"))))).await;
    assert!(
        again.iter().all(|a| a["duplicate"] == true),
        "the replica remembers the keys it accepted while degraded"
    );
    assert_eq!(
        report(&app, 1, Some("before".into())).await["recorded"],
        true,
        "a key from before the outage cannot be checked until Redis is back"
    );
    settled(&app, 30.0).await;
    assert_eq!(
        redis.value_of(TOKENS).await,
        1 + 60,
        "the resent key from before is a duplicate in Redis"
    );
    let after = join_all((0..30).map(|i| report(&app, 2, Some(format!("k{i}"))))).await;
    assert!(after.iter().all(|a| a["duplicate"] == true));
    assert_eq!(redis.value_of(TOKENS).await, 61);
}

/// SIGTERM while Redis is unreachable: what the replica admitted goes to the replay outbox in
/// Postgres, and another replica applies it once Redis is back, exactly once.
#[tokio::test]
async fn usage_admitted_during_an_outage_survives_sigterm_through_the_outbox() {
    if skip_in_cluster_mode("usage_admitted_during_an_outage_survives_sigterm_through_the_outbox") {
        return;
    }
    let proxy = ChaosProxy::start(&host_port(&test_redis_url())).await;
    let app = spawn_app_with(TestOptions {
        redis_url: Some(format!("redis://{}/0", proxy.addr)),
        redis_timeout: Some(Duration::from_millis(200)),
        on_error: OnRedisError::Open,
        ..Default::default()
    })
    .await;
    report(&app, 1, None).await;
    let peer = app.spawn_peer().await;
    proxy.cut();
    for i in 0..5 {
        report(&app, 5, Some(format!("cut{i}"))).await;
        report(&app, 1, None).await;
    }
    let pool = app.pool.clone();
    let guard = app.shutdown().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM replay_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(rows > 0, "the stopped replica left its usage in the outbox");
    proxy.restore();
    let applied = eventually(Duration::from_secs(20), || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM replay_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        left == 0
    })
    .await;
    assert!(applied.is_some(), "the other replica applies the outbox");
    let key = peer
        .redis_keys()
        .await
        .into_iter()
        .find(|k| k.contains("{acme}:c:tokens:month:"))
        .unwrap();
    assert_eq!(peer.redis_get(&key).await.as_deref(), Some("31"));
    peer.flush().await.unwrap();
    assert_eq!(peer.stored_usage("acme", "tokens").await, Some(31));
    drop(guard);
}
