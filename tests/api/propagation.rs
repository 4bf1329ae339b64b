//! A plan change made through one replica is seen by another within a second.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{eventually, json, spawn_app};

#[tokio::test]
async fn a_plan_change_reaches_a_second_gateway_within_one_second() {
    let a = spawn_app().await;
    let b = a.spawn_peer().await;
    // B has the org cached on Free.
    let r = b
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(json(r).await["plan"]["id"], "free");

    a.set_plan("acme", "pro").await;
    let took = eventually(Duration::from_secs(1), || async {
        let r = b
            .check(json!({"org_id": "acme", "metric": "requests", "consume": false}))
            .await;
        json(r).await["plan"]["id"] == "pro"
    })
    .await;
    assert!(took.is_some(), "replica B still on Free after 1 s");
}

#[tokio::test]
async fn replicas_share_counters_exactly() {
    let a = spawn_app().await;
    let b = a.spawn_peer().await;
    let mut handles = Vec::new();
    for i in 0..40 {
        let body = json!({"org_id": "acme", "metric": "tokens", "amount": 50});
        let target = if i % 2 == 0 {
            a.url("/v1/check")
        } else {
            b.url("/v1/check")
        };
        let client = a.client.clone();
        handles.push(tokio::spawn(async move {
            client
                .post(target)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut ok = 0;
    for h in handles {
        if h.await.unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 20, "1000 tokens / 50 per check, across both replicas");
}
