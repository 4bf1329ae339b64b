//! `/admin/*`: auth, plans, keys, adjustments; health and the service token.

use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{
    ChaosProxy, TestApp, TestOptions, eventually, host_port, json, skip_in_cluster_mode, spawn_app,
    spawn_app_with, test_redis_url,
};

#[tokio::test]
async fn admin_endpoints_require_the_admin_token() {
    let app = spawn_app().await;
    let paths = [
        (Method::GET, "/admin/orgs"),
        (Method::GET, "/admin/orgs?plan=pro&limit=3"),
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

/// `GET /admin/orgs` with this query: status and body.
async fn list(app: &TestApp, query: &str) -> (u16, Value) {
    let r = app
        .admin(Method::GET, &format!("/admin/orgs{query}"), None)
        .await;
    (r.status().as_u16(), json(r).await)
}

fn ids(page: &Value) -> Vec<String> {
    page["orgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["org_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_org_list_pages_by_cursor_and_new_orgs_do_not_shift_pages() {
    let app = spawn_app().await;
    let all: Vec<String> = (1..=7).map(|i| format!("org-{i}")).collect();
    for (i, org) in all.iter().enumerate() {
        app.set_plan(org, ["free", "pro", "enterprise"][i % 3])
            .await;
    }

    let (status, first) = list(&app, "?limit=3").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), ["org-1", "org-2", "org-3"]);
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    // Orgs added between pages, before and after the cursor: the next pages neither repeat nor
    // skip an org that was already there.
    app.set_plan("org-0", "pro").await;
    app.set_plan("org-35", "pro").await;
    let (_, second) = list(&app, &format!("?limit=3&cursor={cursor}")).await;
    let (_, third) = list(
        &app,
        &format!(
            "?limit=3&cursor={}",
            second["next_cursor"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(ids(&second), ["org-35", "org-4", "org-5"]);
    assert_eq!(ids(&third), ["org-6", "org-7"]);
    assert!(third["next_cursor"].is_null(), "the last page says so");

    // Without inserts: 3 + 3 + 1 over seven orgs, every org once.
    let app = spawn_app().await;
    for org in &all {
        app.set_plan(org, "pro").await;
    }
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut query = "?limit=3".to_string();
    loop {
        let (status, page) = list(&app, &query).await;
        assert_eq!(status, 200, "{page}");
        sizes.push(page["orgs"].as_array().unwrap().len());
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, all, "each org once, in id order");
    let (_, whole) = list(&app, "").await;
    assert_eq!(ids(&whole), all, "the default page (50) holds them all");
    assert!(whole["next_cursor"].is_null());
}

#[tokio::test]
async fn the_org_list_filters_by_the_plan_an_org_is_on() {
    let app = spawn_app().await;
    app.set_plan("a-pro", "pro").await;
    app.set_plan("b-enterprise", "enterprise").await;
    app.set_plan("c-free", "free").await;
    // A stored org with no plan (it got a key) and one whose plan left the catalog: both are on
    // the default plan, as the gateway treats them.
    let r = app
        .admin(Method::POST, "/admin/orgs/d-keyed/keys", Some(&json!({})))
        .await;
    assert_eq!(r.status(), 201);
    sqlx::query("INSERT INTO orgs (org_id, plan_id) VALUES ('e-legacy', 'legacy')")
        .execute(&app.pool)
        .await
        .unwrap();
    // Only checked, never stored: on the default plan, but the list cannot know of it.
    assert_eq!(
        app.check(json!({"org_id": "f-implicit", "metric": "requests"}))
            .await
            .status(),
        200
    );

    let (_, free) = list(&app, "?plan=free").await;
    assert_eq!(ids(&free), ["c-free", "d-keyed", "e-legacy"]);
    let by_id = |page: &Value, id: &str| {
        page["orgs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["org_id"] == id)
            .cloned()
            .unwrap()
    };
    let legacy = by_id(&free, "e-legacy");
    assert_eq!(legacy["plan"], json!({"id": "free", "name": "Free"}));
    assert_eq!(legacy["assigned_plan"], "legacy");
    assert_eq!(legacy["plan_source"], "default");
    assert_eq!(by_id(&free, "c-free")["plan_source"], "assigned");
    assert!(by_id(&free, "d-keyed")["assigned_plan"].is_null());

    let (_, pro) = list(&app, "?plan=pro").await;
    assert_eq!(ids(&pro), ["a-pro"]);
    assert_eq!(pro["orgs"][0]["plan"], json!({"id": "pro", "name": "Pro"}));
    assert!(pro["orgs"][0]["updated_at"].is_string());
    let (_, all) = list(&app, "").await;
    assert_eq!(
        ids(&all),
        ["a-pro", "b-enterprise", "c-free", "d-keyed", "e-legacy"]
    );

    // The filter and the cursor together.
    let (_, p1) = list(&app, "?plan=free&limit=2").await;
    assert_eq!(ids(&p1), ["c-free", "d-keyed"]);
    let (_, p2) = list(
        &app,
        &format!(
            "?plan=free&limit=2&cursor={}",
            p1["next_cursor"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(ids(&p2), ["e-legacy"]);
    assert!(p2["next_cursor"].is_null());

    // An unknown plan is a mistake, as for PUT: 422 naming it and the plans there are.
    let (status, body) = list(&app, "?plan=platinum").await;
    assert_eq!(status, 422);
    assert_eq!(body["error"], "invalid_request");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("plan: unknown plan `platinum`"),
        "{message}"
    );
    assert!(message.contains("enterprise, free, pro"), "{message}");
}

#[tokio::test]
async fn the_org_list_shows_what_checks_spent_this_period() {
    let app = spawn_app().await;
    app.set_plan("acme", "free").await;
    app.set_plan("globex", "pro").await;
    for body in [
        json!({"org_id": "acme", "metric": "requests", "amount": 5}),
        json!({"org_id": "acme", "charges": [{"metric": "tokens", "amount": 300}, {"metric": "requests", "amount": 2}]}),
        json!({"org_id": "acme", "metric": "projects", "amount": 2}),
        json!({"org_id": "globex", "metric": "requests", "amount": 40}),
    ] {
        assert_eq!(app.check(body.clone()).await.status(), 200, "{body}");
    }
    let (status, page) = list(&app, "").await;
    assert_eq!(status, 200, "{page}");
    let usage = |org: usize, metric: &str| {
        page["orgs"][org]["usage"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["metric"] == metric)
            .cloned()
            .unwrap()
    };
    assert_eq!(page["orgs"][0]["org_id"], "acme");
    let requests = usage(0, "requests");
    assert_eq!(
        (
            &requests["current"],
            &requests["limit"],
            &requests["period"]
        ),
        (&json!(7), &json!(20), &json!("month"))
    );
    let tokens = usage(0, "tokens");
    assert_eq!(
        (&tokens["current"], &tokens["limit"]),
        (&json!(300), &json!(1000))
    );
    let projects = usage(0, "projects");
    assert_eq!(
        (
            &projects["current"],
            &projects["limit"],
            &projects["period"]
        ),
        (&json!(2), &json!(3), &Value::Null)
    );
    let globex = usage(1, "requests");
    assert_eq!(
        (&globex["current"], &globex["limit"]),
        (&json!(40), &json!(1000))
    );
    let unlimited = usage(1, "tokens");
    assert_eq!(
        (&unlimited["current"], &unlimited["limit"]),
        (&json!(0), &Value::Null)
    );

    // The same numbers as the org's own usage view.
    let own = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(page["orgs"][0]["usage"], own["usage"]);
}

#[tokio::test]
async fn the_org_list_refuses_bad_queries_naming_the_parameter() {
    let app = spawn_app().await;
    app.set_plan("acme", "pro").await;
    for (query, names) in [
        ("?limit=0", "limit:"),
        ("?limit=501", "limit:"),
        ("?limit=-1", "limit:"),
        ("?limit=ten", "limit:"),
        ("?limit=", "limit:"),
        ("?limit=2&limit=3", "limit: given more than once"),
        ("?page=2", "page: unknown query parameter"),
        ("?offset=10&limit=3", "offset: unknown query parameter"),
        ("?cursor=not%20base64", "cursor:"),
        ("?cursor=", "cursor:"),
        // Valid base64url of something that is no org id.
        ("?cursor=Pz8_", "cursor:"),
        ("?plan=", "plan: unknown plan"),
    ] {
        let (status, body) = list(&app, query).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["error"], "invalid_request", "{query}");
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with(names), "{query}: {message}");
    }
    for query in ["?limit=1", "?limit=500", "?limit=050"] {
        let (status, body) = list(&app, query).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(ids(&body), ["acme"]);
    }
}

#[tokio::test]
async fn the_org_list_answers_without_usage_while_redis_is_unreachable() {
    if skip_in_cluster_mode("the_org_list_answers_without_usage_while_redis_is_unreachable") {
        return;
    }
    let proxy = ChaosProxy::start(&host_port(&test_redis_url())).await;
    let timeout = Duration::from_millis(500);
    let app = spawn_app_with(TestOptions {
        redis_url: Some(format!("redis://{}/0", proxy.addr)),
        redis_timeout: Some(timeout),
        ..Default::default()
    })
    .await;
    let orgs: Vec<String> = (0..20).map(|i| format!("org-{i:02}")).collect();
    for org in &orgs {
        app.set_plan(org, "pro").await;
    }
    assert_eq!(
        app.check(json!({"org_id": "org-00", "metric": "requests", "amount": 3}))
            .await
            .status(),
        200
    );
    let (_, before) = list(&app, "?limit=20").await;
    let requests = before["orgs"][0]["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["metric"] == "requests")
        .cloned()
        .unwrap();
    assert_eq!(requests["current"], 3);

    proxy.cut();
    let started = Instant::now();
    let (status, page) = list(&app, "?limit=20").await;
    let took = started.elapsed();
    assert_eq!(
        status, 200,
        "Postgres still knows who is on which plan: {page}"
    );
    assert_eq!(ids(&page), orgs);
    for org in page["orgs"].as_array().unwrap() {
        assert!(org["usage"].is_null(), "{org}");
        assert_eq!(org["plan"]["id"], "pro");
    }
    println!("org list of 20 with Redis cut: {took:?} (redis timeout {timeout:?})");
    assert!(
        took < timeout * 3,
        "one failed read stops the others: {took:?}"
    );
    let ids: BTreeSet<String> = ids(&page).into_iter().collect();
    assert_eq!(ids.len(), 20);

    // A slow Redis rather than a gone one: the page waits for one timeout, not one per batch.
    proxy.restore();
    let back = eventually(Duration::from_secs(10), || async {
        list(&app, "?limit=1").await.1["orgs"][0]["usage"].is_array()
    })
    .await;
    assert!(back.is_some(), "usage is listed again once Redis is back");
    proxy.set_delay(timeout * 4, timeout * 4);
    let started = Instant::now();
    let (status, page) = list(&app, "?limit=20").await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{page}");
    assert!(
        page["orgs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["usage"].is_null())
    );
    println!("org list of 20 with Redis slower than its timeout: {took:?}");
    assert!(took < timeout * 2, "one timeout for the page: {took:?}");
}
