//! `/admin/*`: auth, plans, keys, adjustments; health and the service token.

use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::helpers::{TestOptions, json, spawn_app, spawn_app_with};

#[tokio::test]
async fn admin_endpoints_require_the_admin_token() {
    let app = spawn_app().await;
    let paths = [
        (Method::PUT, "/admin/orgs/acme"),
        (Method::GET, "/admin/orgs/acme"),
        (Method::POST, "/admin/orgs/acme/keys"),
        (
            Method::DELETE,
            "/admin/keys/018f0000-0000-7000-8000-000000000000",
        ),
        (Method::POST, "/admin/orgs/acme/adjustments"),
    ];
    for (method, path) in paths {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("test-admin-token"),
            Some("Basic dGVzdA=="),
        ] {
            let mut req = app
                .client
                .request(method.clone(), app.url(path))
                .json(&json!({"plan": "pro"}));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            assert_eq!(json(r).await["error"], "unauthorized");
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orgs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing was changed");
}

#[tokio::test]
async fn plans_are_set_audited_and_validated() {
    let app = spawn_app().await;
    let r = app
        .admin(
            Method::PUT,
            "/admin/orgs/acme",
            Some(&json!({"plan": "platinum"})),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert!(json(r).await["message"].as_str().unwrap().contains("plan"));

    app.set_plan("acme", "pro").await;
    app.set_plan("acme", "pro").await;
    app.set_plan("acme", "enterprise").await;
    let r = app.admin(Method::GET, "/admin/orgs/acme", None).await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(
        body["plan"],
        json!({"id": "enterprise", "name": "Enterprise"})
    );
    assert_eq!(body["plan_source"], "assigned");
    let changes = body["plan_changes"].as_array().unwrap();
    assert_eq!(
        changes.len(),
        2,
        "setting the same plan twice is one change"
    );
    assert_eq!(changes[0]["from_plan"], "pro");
    assert_eq!(changes[0]["to_plan"], "enterprise");
    assert_eq!(changes[0]["cause"], "admin");

    let r = app.admin(Method::GET, "/admin/orgs/newcomer", None).await;
    let body = json(r).await;
    assert_eq!(body["plan"]["id"], "free");
    assert_eq!(body["plan_source"], "default");
}

#[tokio::test]
async fn keys_are_shown_once_stored_hashed_and_revocable() {
    let app = spawn_app().await;
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/keys",
            Some(&json!({"name": "ci"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let created = json(r).await;
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("qg_") && key.len() == 3 + 64, "{key}");
    let id = created["id"].as_str().unwrap().to_string();

    let row = sqlx::query("SELECT key_hash, name, org_id FROM api_keys")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let hash: Vec<u8> = row.get("key_hash");
    assert_eq!(hash, Sha256::digest(key.as_bytes()).to_vec());
    assert_eq!(row.get::<String, _>("name"), "ci");
    let dump: String = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(!dump.contains(&key[3..]), "the plaintext key is not stored");

    let body = json(app.admin(Method::GET, "/admin/orgs/acme", None).await).await;
    assert_eq!(body["keys"][0]["name"], "ci");
    assert!(body["keys"][0].get("key").is_none());
    assert!(body["keys"][0]["revoked_at"].is_null());

    let r = app
        .admin(Method::DELETE, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(r.status(), 204);
    let revoked: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(revoked.is_some());
    let r = app
        .admin(Method::DELETE, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(r.status(), 404);
    let r = app
        .admin(Method::DELETE, "/admin/keys/not-a-uuid", None)
        .await;
    assert_eq!(r.status(), 422);
}

#[tokio::test]
async fn adjustments_credit_and_charge_the_current_period_with_a_reason() {
    let app = spawn_app().await;
    app.check(json!({"org_id": "acme", "metric": "requests", "amount": 8}))
        .await;
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/adjustments",
            Some(&json!({"metric": "requests", "amount": -5, "reason": "outage credit"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let body = json(r).await;
    assert_eq!(body["usage"][0]["current"], 3);
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/adjustments",
            Some(&json!({"metric": "requests", "amount": -50, "reason": "goodwill"})),
        )
        .await;
    assert_eq!(json(r).await["usage"][0]["current"], 0, "never below zero");
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/adjustments",
            Some(&json!({"metric": "requests", "amount": 19, "reason": "manual charge"})),
        )
        .await;
    assert_eq!(json(r).await["usage"][0]["current"], 19);
    app.clock.advance(chrono::Duration::seconds(2));
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests"}))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests"}))
            .await
            .status(),
        402
    );
    let rows = sqlx::query("SELECT metric, amount, reason FROM usage_adjustments ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let rows: Vec<(String, i64, String)> = rows
        .iter()
        .map(|r| (r.get("metric"), r.get("amount"), r.get("reason")))
        .collect();
    assert_eq!(
        rows,
        [
            ("requests".into(), -5, "outage credit".into()),
            ("requests".into(), -50, "goodwill".into()),
            ("requests".into(), 19, "manual charge".into()),
        ]
    );
    for bad in [
        json!({"metric": "requests", "amount": 0, "reason": "x"}),
        json!({"metric": "nope", "amount": 1, "reason": "x"}),
        json!({"metric": "requests", "amount": 1, "reason": "  "}),
        json!({"metric": "requests", "amount": 1}),
    ] {
        let r = app
            .admin(Method::POST, "/admin/orgs/acme/adjustments", Some(&bad))
            .await;
        assert_eq!(r.status(), 422, "{bad}");
    }
}

#[tokio::test]
async fn the_service_token_guards_v1_when_configured() {
    let app = spawn_app_with(TestOptions {
        service_token: Some("svc-secret".into()),
        ..Default::default()
    })
    .await;
    let body = json!({"org_id": "acme", "metric": "requests"});
    let r = app.check(body.clone()).await;
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(app.url("/v1/check"))
        .bearer_auth("svc-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health stays open for probes.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), 200);
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        json(r).await,
        json!({"status": "ready", "redis": "ok", "postgres": "ok"})
    );
}

#[tokio::test]
async fn floods_of_admin_calls_are_limited_per_address_but_checks_are_not() {
    let app = spawn_app_with(TestOptions {
        guard: Some((1, 5)),
        ..Default::default()
    })
    .await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(
            app.admin(Method::GET, "/admin/orgs/acme", None)
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429, 429]);
    let r = app.admin(Method::GET, "/admin/orgs/acme", None).await;
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(json(r).await["error"], "too_many_requests");
    for _ in 0..20 {
        let r = app
            .check(json!({"org_id": "acme", "metric": "requests", "consume": false}))
            .await;
        assert_eq!(r.status(), 200);
    }
}
