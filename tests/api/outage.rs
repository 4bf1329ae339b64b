//! Redis faults: a lost connection answers 503 JSON and recovers by itself; a flushed script
//! cache is reloaded transparently.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    ChaosProxy, TestOptions, eventually, host_port, json, spawn_app, spawn_app_with, test_redis_url,
};

#[tokio::test]
async fn redis_loss_answers_503_and_recovers_without_a_restart() {
    let proxy = ChaosProxy::start(&host_port(&test_redis_url())).await;
    let app = spawn_app_with(TestOptions {
        redis_url: Some(format!("redis://{}/0", proxy.addr)),
        ..Default::default()
    })
    .await;
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
    assert_eq!(app.get("/readyz").await.status(), 200);
    // Exactly the two admitted checks were counted (the failed one was not).
    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    let requests = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["metric"] == "requests")
        .unwrap()
        .clone();
    assert_eq!(requests["current"], 2);
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
}
