//! Hot reload of the plan catalog (file change and SIGHUP) and shadow enforcement.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::helpers::{TestOptions, eventually, json, spawn_app_with};

const PLANS_5: &str = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
quotas = { requests = { limit = 5, period = "month" } }
"#;

/// Replace a file the way editors and config managers do (write aside, rename), so the poller
/// never sees a half-written file.
fn replace_file(path: &std::path::Path, content: &str) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, content).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn temp_plans(content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qg-reload-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plans.toml");
    std::fs::write(&path, content).unwrap();
    path
}

#[tokio::test]
async fn a_changed_catalog_is_applied_under_traffic_and_a_broken_one_rejected() {
    let path = temp_plans(PLANS_5);
    let app = spawn_app_with(TestOptions {
        plans_file: Some(path.clone()),
        ..Default::default()
    })
    .await;
    let body = json!({"org_id": "acme", "metric": "requests"});
    for _ in 0..5 {
        assert_eq!(app.check(body.clone()).await.status(), 200);
    }
    assert_eq!(app.check(body.clone()).await.status(), 402);

    // Background traffic on another org for the whole reload: no request may fail.
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/check");
        let stop = stop.clone();
        async move {
            let mut statuses = Vec::new();
            while !stop.is_cancelled() {
                let r = client
                    .post(&url)
                    .json(&json!({"org_id": "busy", "metric": "requests", "consume": false}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(r.status().as_u16());
            }
            statuses
        }
    });

    replace_file(&path, &PLANS_5.replace("limit = 5", "limit = 10"));
    let applied = eventually(Duration::from_secs(5), || async {
        app.check(json!({"org_id": "acme", "metric": "requests", "consume": false}))
            .await
            .status()
            == 200
    })
    .await;
    assert!(applied.is_some(), "the new limit applies without a restart");

    replace_file(&path, "default_plan = \"free\"\n[plans.free]\nquotas = 7\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 5}))
        .await;
    assert_eq!(
        r.status(),
        200,
        "the last valid catalog (limit 10) is still in force"
    );
    assert_eq!(json(r).await["usage"][0]["limit"], 10);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("quota_gateway_catalog_reloads_total{outcome=\"rejected\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("quota_gateway_catalog_reloads_total{outcome=\"ok\"} 1"));

    stop.cancel();
    let statuses = traffic.await.unwrap();
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn shadow_mode_counts_and_reports_but_never_blocks() {
    let app = spawn_app_with(TestOptions {
        plans: PLANS_5.into(),
        shadow: true,
        ..Default::default()
    })
    .await;
    let body = json!({"org_id": "acme", "metric": "requests"});
    for _ in 0..5 {
        assert_eq!(app.check(body.clone()).await.status(), 200);
    }
    let r = app.check(body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let b = json(r).await;
    assert_eq!(b["allowed"], true);
    assert_eq!(b["shadow"], true);
    assert_eq!(b["would_deny"]["error"], "quota_exceeded");
    assert_eq!(b["would_deny"]["status"], 402);
    assert_eq!(b["would_deny"]["quota"]["current"], 5);
    assert_eq!(b["usage"][0]["current"], 6, "shadow mode still counts");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(
        "quota_gateway_decisions_total{metric=\"requests\",outcome=\"quota_exceeded\",plan=\"free\",source=\"check\"} 1"
    ), "{metrics}");
}

#[tokio::test]
async fn a_plan_can_be_in_shadow_mode_while_others_enforce() {
    let plans = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
quotas = { requests = { limit = 1, period = "month" } }
[plans.trial]
enforcement = "shadow"
quotas = { requests = { limit = 1, period = "month" } }
"#;
    let app = spawn_app_with(TestOptions {
        plans: plans.into(),
        ..Default::default()
    })
    .await;
    app.set_plan("tester", "trial").await;
    for org in ["acme", "tester"] {
        assert_eq!(
            app.check(json!({"org_id": org, "metric": "requests"}))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests"}))
            .await
            .status(),
        402
    );
    let r = app
        .check(json!({"org_id": "tester", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["would_deny"]["error"], "quota_exceeded");
}
