//! Prepaid credits end to end: the admin API, spending past hard quotas inside the decision (two
//! replicas on one Redis and Postgres), refunds, the order of grants, a Redis loss, and grants
//! from billing webhooks. Real Redis, Postgres and HTTP throughout.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use quota_gateway::config::{BillingProvider, BillingSettings, ProviderKind};
use quota_gateway::webhooks::GrantTemplate;
use quota_gateway::webhooks::signature::{sign_standard, sign_stripe};
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestOptions, json, spawn_app_with, usage_entry};

const PLANS: &str = r#"
default_plan = "metered"
upgrade_url = "https://example.com/upgrade?org={org_id}&plan={plan}"

[metrics]
tokens = { unit = "token" }
requests = { unit = "request" }
seats = { unit = "seat", kind = "gauge" }

[plans.metered]
name = "Metered"
upgrade_to = "big"
quotas = { tokens = { limit = 100, period = "month" } }

[plans.daily]
name = "Daily"
quotas = { tokens = [{ limit = 10, period = "day" }, { limit = 100, period = "month" }] }

[plans.soft]
name = "Soft"
quotas = { tokens = { limit = 100, period = "month", overage = "allow" } }

[plans.shadowed]
name = "Shadowed"
enforcement = "shadow"
quotas = { tokens = { limit = 100, period = "month" } }

[plans.big]
name = "Big"
quotas = { tokens = { limit = 100000, period = "month" } }
"#;

const STANDARD_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const STRIPE_SECRET: &str = "whsec_stripe_test_secret_0001";

async fn app() -> TestApp {
    spawn_app_with(TestOptions {
        plans: PLANS.into(),
        ..Default::default()
    })
    .await
}

async fn grant(app: &TestApp, org: &str, body: Value) -> reqwest::Response {
    app.admin(
        Method::POST,
        &format!("/admin/orgs/{org}/grants"),
        Some(&body),
    )
    .await
}

async fn grants(app: &TestApp, org: &str) -> Vec<Value> {
    let r = app
        .admin(Method::GET, &format!("/admin/orgs/{org}/grants"), None)
        .await;
    assert_eq!(r.status(), 200);
    json(r).await["grants"].as_array().unwrap().clone()
}

fn remaining_of(list: &[Value], id: &str) -> i64 {
    list.iter()
        .find(|g| g["id"] == id)
        .unwrap_or_else(|| panic!("grant {id} listed"))["remaining"]
        .as_i64()
        .unwrap()
}

async fn tokens(app: &TestApp, org: &str, amount: i64) -> reqwest::Response {
    app.check(json!({"org_id": org, "metric": "tokens", "amount": amount}))
        .await
}

fn credits_of(body: &Value) -> Value {
    usage_entry(body, "metric", "tokens")["credits_remaining"].clone()
}

#[tokio::test]
async fn grant_requests_are_validated_and_idempotent_by_grant_id() {
    let app = app().await;
    let past = (app.clock_now() - chrono::Duration::days(1)).to_rfc3339();
    for (body, field) in [
        (json!({"metric": "tokens", "amount": 0}), "amount"),
        (json!({"metric": "tokens", "amount": -5}), "amount"),
        (json!({"metric": "nope", "amount": 5}), "metric"),
        (json!({"metric": "seats", "amount": 5}), "metric"),
        (
            json!({"metric": "tokens", "amount": 5, "priority": 100000}),
            "priority",
        ),
        (
            json!({"metric": "tokens", "amount": 5, "priority": -1}),
            "priority",
        ),
        (
            json!({"metric": "tokens", "amount": 5, "expires_at": past}),
            "expires_at",
        ),
        (
            json!({"metric": "tokens", "amount": 5, "expires_at": "soon"}),
            "expires_at",
        ),
        (
            json!({"metric": "tokens", "amount": 5, "grant_id": "has space"}),
            "grant_id",
        ),
        (json!({"amount": 5}), "metric"),
        (
            json!({"metric": "tokens", "amount": 5, "color": "red"}),
            "color",
        ),
    ] {
        let r = grant(&app, "acme", body.clone()).await;
        assert_eq!(r.status(), 422, "{body}");
        let b = json(r).await;
        assert!(
            b["message"].as_str().unwrap().contains(field),
            "{body}: {b}"
        );
        assert!(b["error"].is_string());
    }
    let r = app
        .client
        .post(app.url("/admin/orgs/acme/grants"))
        .json(&json!({"metric": "tokens", "amount": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "admin token required");

    let body = json!({"metric": "tokens", "amount": 50, "grant_id": "order-1", "reason": "pack"});
    let r = grant(&app, "acme", body.clone()).await;
    assert_eq!(r.status(), 201);
    let first = json(r).await;
    assert_eq!(first["id"], "order-1");
    assert_eq!(first["remaining"], 50);
    assert_eq!(first["priority"], 10, "the default priority");
    let r = grant(&app, "acme", body).await;
    assert_eq!(r.status(), 200, "a repeat is the same grant");
    assert_eq!(json(r).await["id"], "order-1");
    let r = grant(
        &app,
        "acme",
        json!({"metric": "tokens", "amount": 60, "grant_id": "order-1"}),
    )
    .await;
    assert_eq!(r.status(), 409, "the same id with other terms");
    assert_eq!(json(r).await["error"], "grant_conflict");
    let list = grants(&app, "acme").await;
    assert_eq!(list.len(), 1, "{list:?}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM credit_grants WHERE org_id = 'acme'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);

    let r = app
        .admin(Method::DELETE, "/admin/orgs/acme/grants/nope", None)
        .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn quota_plus_credits_are_spent_exactly_across_two_replicas() {
    let a = app().await;
    let b = a.spawn_peer().await;
    let r = grant(
        &a,
        "acme",
        json!({"metric": "tokens", "amount": 50, "grant_id": "g1"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    // 100 of quota and 50 of credits: 150 of 240 one-token requests, whichever replica serves.
    let calls = (0..240).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move { tokens(app, "acme", 1).await.status().as_u16() }
    });
    let statuses = join_all(calls).await;
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let denied = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((allowed, denied), (150, 90), "{statuses:?}");

    let r = tokens(&b, "acme", 1).await;
    assert_eq!(r.status(), 402);
    let body = json(r).await;
    assert_eq!(body["credits"], json!({"remaining": 0}), "{body}");
    assert!(body["upgrade"].is_object(), "the upgrade hint stays");
    assert_eq!(remaining_of(&grants(&a, "acme").await, "g1"), 0);

    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(a.stored_usage("acme", "tokens").await, Some(150));
    let (remaining, version): (i64, i64) = sqlx::query_as(
        "SELECT remaining, version FROM credit_grants WHERE org_id = 'acme' AND id = 'g1'",
    )
    .fetch_one(&a.pool)
    .await
    .unwrap();
    assert_eq!(remaining, 0, "the spending reached Postgres");
    assert!(version > 0);
}

#[tokio::test]
async fn with_leases_an_org_with_credits_is_decided_exactly() {
    // An org with grants of a metric gets no blocks of its hard quotas: every decision reaches
    // Redis, where the credits are, and none is drawn for units a block reserves.
    let a = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        leases: quota_gateway::config::LeaseSettings {
            enabled: true,
            ttl: std::time::Duration::from_secs(1),
            max_block: 100,
            checkpoint: true,
        },
        ..Default::default()
    })
    .await;
    let b = a.spawn_peer().await;
    let r = grant(
        &a,
        "acme",
        json!({"metric": "tokens", "amount": 30, "grant_id": "g"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let calls = (0..200).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move { tokens(app, "acme", 1).await.status().as_u16() }
    });
    let statuses = join_all(calls).await;
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(allowed, 130, "quota and credits, exactly");
    let held: i64 = {
        let mut c = a.redis.clone();
        let fields: Vec<String> = redis::cmd("HVALS")
            .arg(format!(
                "{}:{{acme}}:c:tokens:month:{}:l",
                a.prefix,
                quota_gateway::domain::period::calendar_month(a.clock_now())
                    .start
                    .timestamp()
            ))
            .query_async(&mut c)
            .await
            .unwrap();
        fields.len() as i64
    };
    assert_eq!(held, 0, "no blocks while the org has credits of the metric");
    a.state.quota.settle_leases(true).await;
    b.state.quota.settle_leases(true).await;
    let usage = json(a.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(usage_entry(&usage, "metric", "tokens")["current"], 130);
    assert_eq!(remaining_of(&grants(&a, "acme").await, "g"), 0);
}

#[tokio::test]
async fn grants_are_spent_by_priority_then_expiry_and_expired_ones_not_at_all() {
    let app = app().await;
    let now = app.clock_now();
    for body in [
        json!({"metric": "tokens", "amount": 5, "grant_id": "late"}),
        json!({"metric": "tokens", "amount": 5, "grant_id": "soon",
               "expires_at": (now + chrono::Duration::days(1)).to_rfc3339()}),
        json!({"metric": "tokens", "amount": 5, "grant_id": "first", "priority": 0,
               "expires_at": (now + chrono::Duration::days(30)).to_rfc3339()}),
    ] {
        assert_eq!(grant(&app, "acme", body).await.status(), 201);
    }
    let r = tokens(&app, "acme", 100).await;
    assert_eq!(r.status(), 200, "the quota itself");
    assert_eq!(
        credits_of(&json(r).await),
        15,
        "nothing drawn within the quota"
    );
    let r = tokens(&app, "acme", 7).await;
    assert_eq!(r.status(), 200, "7 past the quota, paid by credits");
    assert_eq!(credits_of(&json(r).await), 8);
    let list = grants(&app, "acme").await;
    assert_eq!(remaining_of(&list, "first"), 0, "priority 0 first");
    assert_eq!(remaining_of(&list, "soon"), 3, "then the earlier expiry");
    assert_eq!(remaining_of(&list, "late"), 5);

    app.clock.advance(chrono::Duration::days(2));
    let r = tokens(&app, "acme", 6).await;
    assert_eq!(r.status(), 402, "the expired grant's 3 no longer count");
    assert_eq!(json(r).await["credits"]["remaining"], 5);
    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(credits_of(&usage), 5);
    assert_eq!(tokens(&app, "acme", 5).await.status(), 200);
    let list = grants(&app, "acme").await;
    assert_eq!(remaining_of(&list, "late"), 0);
    assert_eq!(remaining_of(&list, "soon"), 3, "left in the expired grant");
    assert_eq!(
        list.iter().find(|g| g["id"] == "soon").unwrap()["status"],
        "expired"
    );
}

#[tokio::test]
async fn refunds_give_credits_back_and_voiding_takes_what_is_left() {
    let app = app().await;
    assert_eq!(
        grant(
            &app,
            "acme",
            json!({"metric": "tokens", "amount": 20, "grant_id": "g"})
        )
        .await
        .status(),
        201
    );
    assert_eq!(tokens(&app, "acme", 110).await.status(), 200);
    assert_eq!(remaining_of(&grants(&app, "acme").await, "g"), 10);
    // Taking back 15 units takes the 10 above the quota (paid by credits) and 5 of the quota.
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/adjustments",
            Some(&json!({"metric": "tokens", "amount": -15, "reason": "failed job"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let body = json(r).await;
    assert_eq!(credits_of(&body), 20, "{body}");
    assert_eq!(usage_entry(&body, "metric", "tokens")["current"], 95);
    assert_eq!(remaining_of(&grants(&app, "acme").await, "g"), 20);

    // Within the quota nothing is drawn; past it again, from the grant.
    assert_eq!(tokens(&app, "acme", 8).await.status(), 200);
    assert_eq!(remaining_of(&grants(&app, "acme").await, "g"), 17);

    let r = app
        .admin(Method::DELETE, "/admin/orgs/acme/grants/g", None)
        .await;
    assert_eq!(r.status(), 200);
    let voided = json(r).await;
    assert_eq!(voided["status"], "voided");
    assert_eq!(voided["voided"], 17);
    assert_eq!(voided["remaining"], 0);
    let r = tokens(&app, "acme", 1).await;
    assert_eq!(r.status(), 402, "nothing left to spend");
    let r = app
        .admin(Method::DELETE, "/admin/orgs/acme/grants/g", None)
        .await;
    assert_eq!(r.status(), 200, "voiding again changes nothing");
    assert_eq!(json(r).await["voided"], 17);
}

#[tokio::test]
async fn credits_compose_with_day_and_month_quotas_soft_limits_shadow_and_dry_runs() {
    let app = app().await;
    for (org, plan) in [("daily", "daily"), ("soft", "soft"), ("shadow", "shadowed")] {
        app.set_plan(org, plan).await;
        let r = grant(
            &app,
            org,
            json!({"metric": "tokens", "amount": 20, "grant_id": "g"}),
        )
        .await;
        assert_eq!(r.status(), 201);
    }
    // Day 10, month 100: 12 passes the day quota by 2, paid once.
    assert_eq!(tokens(&app, "daily", 12).await.status(), 200);
    assert_eq!(remaining_of(&grants(&app, "daily").await, "g"), 18);
    // Everything of the next 5 is above the day quota.
    assert_eq!(tokens(&app, "daily", 5).await.status(), 200);
    assert_eq!(remaining_of(&grants(&app, "daily").await, "g"), 13);
    let r = tokens(&app, "daily", 14).await;
    assert_eq!(
        r.status(),
        402,
        "13 of credits cannot pay 14 above the day quota"
    );
    assert_eq!(json(r).await["credits"]["remaining"], 13);

    // A soft quota needs no credits.
    assert_eq!(tokens(&app, "soft", 150).await.status(), 200);
    assert_eq!(remaining_of(&grants(&app, "soft").await, "g"), 20);

    // A dry run draws nothing.
    let r = app
        .check(json!({"org_id": "daily", "metric": "tokens", "amount": 3, "consume": false}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(remaining_of(&grants(&app, "daily").await, "g"), 13);

    // Shadow: credits are spent as they would be when enforced; what they cannot pay is
    // counted (never blocked) and draws nothing.
    let r = tokens(&app, "shadow", 105).await;
    assert_eq!(r.status(), 200);
    assert!(
        json(r).await.get("would_deny").is_none(),
        "credits paid for it"
    );
    assert_eq!(remaining_of(&grants(&app, "shadow").await, "g"), 15);
    let r = tokens(&app, "shadow", 30).await;
    assert_eq!(r.status(), 200);
    assert!(json(r).await["would_deny"].is_object());
    assert_eq!(remaining_of(&grants(&app, "shadow").await, "g"), 15);
}

#[tokio::test]
async fn a_redis_loss_restores_balances_from_postgres() {
    let app = app().await;
    assert_eq!(
        grant(
            &app,
            "acme",
            json!({"metric": "tokens", "amount": 50, "grant_id": "g"})
        )
        .await
        .status(),
        201
    );
    assert_eq!(tokens(&app, "acme", 120).await.status(), 200);
    app.flush().await.unwrap();

    app.lose_redis().await;
    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(
        credits_of(&usage),
        30,
        "restored with the counters: {usage}"
    );
    let r = tokens(&app, "acme", 31).await;
    assert_eq!(r.status(), 402, "30 left, not 50");
    assert_eq!(tokens(&app, "acme", 30).await.status(), 200);
    app.flush().await.unwrap();
    let remaining: i64 =
        sqlx::query_scalar("SELECT remaining FROM credit_grants WHERE org_id = 'acme'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(remaining, 0);
    assert_eq!(app.stored_usage("acme", "tokens").await, Some(150));

    // A grant made while Redis holds nothing of the org arrives with the restore.
    app.lose_redis().await;
    assert_eq!(
        grant(
            &app,
            "acme",
            json!({"metric": "tokens", "amount": 7, "grant_id": "g2"})
        )
        .await
        .status(),
        201
    );
    let r = tokens(&app, "acme", 7).await;
    assert_eq!(r.status(), 200);
    assert_eq!(credits_of(&json(r).await), 0);
}

#[tokio::test]
async fn a_grant_made_through_another_replica_is_spent_at_the_next_decision() {
    // A decides without grants first (its counters exist, and no credit hash), so nothing of
    // the grant B makes can be a leftover of an earlier read: the very next decision on A must
    // see it, and the one after must see what that one drew.
    let a = app().await;
    let b = a.spawn_peer().await;
    assert_eq!(tokens(&a, "acme", 100).await.status(), 200);
    let r = tokens(&a, "acme", 1).await;
    assert_eq!(r.status(), 402, "the quota is used up");
    assert_eq!(json(r).await["credits"], Value::Null, "no grants yet");
    assert_eq!(
        grant(
            &b,
            "acme",
            json!({"metric": "tokens", "amount": 5, "grant_id": "late"})
        )
        .await
        .status(),
        201
    );
    let r = tokens(&a, "acme", 3).await;
    assert_eq!(r.status(), 200, "paid by the grant made through B");
    assert_eq!(credits_of(&json(r).await), 2);
    let r = tokens(&b, "acme", 3).await;
    assert_eq!(r.status(), 402, "2 left, not 5");
    assert_eq!(json(r).await["credits"], json!({"remaining": 2}));
}

#[tokio::test]
async fn after_a_redis_loss_the_first_decision_restores_counters_and_balances() {
    let app = app().await;
    assert_eq!(
        grant(
            &app,
            "acme",
            json!({"metric": "tokens", "amount": 50, "grant_id": "g"})
        )
        .await
        .status(),
        201
    );
    assert_eq!(tokens(&app, "acme", 120).await.status(), 200);
    app.flush().await.unwrap();

    // Redis loses everything of this gateway; the first thing to reach it is a decision.
    app.lose_redis().await;
    let r = tokens(&app, "acme", 31).await;
    assert_eq!(
        r.status(),
        402,
        "120 used and 30 of credits left, as before the loss"
    );
    assert_eq!(json(r).await["credits"], json!({"remaining": 30}));
    let r = tokens(&app, "acme", 30).await;
    assert_eq!(r.status(), 200);
    assert_eq!(credits_of(&json(r).await), 0);
    app.flush().await.unwrap();
    assert_eq!(app.stored_usage("acme", "tokens").await, Some(150));
}

fn billing() -> BillingSettings {
    let grants: BTreeMap<String, GrantTemplate> = [(
        "price_1k".to_string(),
        GrantTemplate {
            metric: "tokens".into(),
            amount: 1000,
            expires_in: Some(std::time::Duration::from_secs(365 * 86_400)),
            priority: 10,
        },
    )]
    .into_iter()
    .collect();
    BillingSettings {
        grace_period: std::time::Duration::from_secs(3600),
        auto_downgrade: true,
        providers: vec![
            BillingProvider {
                kind: ProviderKind::Stripe,
                secrets: vec![SecretString::from(STRIPE_SECRET)],
                org_id_from: "metadata.org_id".into(),
                plans: BTreeMap::new(),
                grants,
            },
            BillingProvider {
                kind: ProviderKind::Standard("inhouse".into()),
                secrets: vec![SecretString::from(STANDARD_SECRET)],
                org_id_from: "metadata.org_id".into(),
                plans: BTreeMap::new(),
                grants: BTreeMap::new(),
            },
        ],
    }
}

async fn send_standard(app: &TestApp, id: &str, body: &Value) -> Value {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(STANDARD_SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let raw = serde_json::to_vec(body).unwrap();
    let t = app.clock_now().timestamp();
    let r = app
        .client
        .post(app.url("/webhooks/standard/inhouse"))
        .header("webhook-id", id)
        .header("webhook-timestamp", t.to_string())
        .header("webhook-signature", sign_standard(&key, id, t, &raw))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    json(r).await
}

async fn send_stripe(app: &TestApp, body: &Value) -> Value {
    let raw = serde_json::to_vec(body).unwrap();
    let t = app.clock_now().timestamp();
    let r = app
        .client
        .post(app.url("/webhooks/stripe"))
        .header(
            "stripe-signature",
            sign_stripe(STRIPE_SECRET.as_bytes(), t, &raw),
        )
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    json(r).await
}

#[tokio::test]
async fn billing_webhooks_grant_once_by_event_and_by_grant_id() {
    let app = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        billing: Some(billing()),
        ..Default::default()
    })
    .await;
    let event = json!({"type": "credits.granted", "data": {
        "grant_id": "inv_42", "org_id": "acme", "metric": "tokens", "amount": 300,
        "expires_at": (app.clock_now() + chrono::Duration::days(90)).to_rfc3339()}});
    assert_eq!(
        send_standard(&app, "msg_1", &event).await["outcome"],
        "credited"
    );
    assert_eq!(
        send_standard(&app, "msg_1", &event).await["outcome"],
        "duplicate",
        "the same delivery"
    );
    assert_eq!(
        send_standard(&app, "msg_2", &event).await["outcome"],
        "credited",
        "another delivery of the same grant: the same grant"
    );
    let list = grants(&app, "acme").await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["amount"], 300);
    assert_eq!(list[0]["source"], "webhook:standard:inhouse");

    // Stripe: a paid one-time checkout of a configured price.
    let mut session: Value = serde_json::from_str(include_str!(
        "../fixtures/webhooks/stripe/checkout.session.completed.json"
    ))
    .unwrap();
    session["id"] = json!("evt_credits_1");
    session["created"] = json!(app.clock_now().timestamp());
    let o = &mut session["data"]["object"];
    o["id"] = json!("cs_credits_1");
    o["mode"] = json!("payment");
    o["payment_status"] = json!("paid");
    o["subscription"] = Value::Null;
    o["metadata"] = json!({"org_id": "acme", "price_id": "price_1k"});
    assert_eq!(send_stripe(&app, &session).await["outcome"], "credited");
    session["id"] = json!("evt_credits_2");
    assert_eq!(
        send_stripe(&app, &session).await["outcome"],
        "credited",
        "a second event for the same session grants nothing new"
    );
    let list = grants(&app, "acme").await;
    assert_eq!(list.len(), 2, "{list:?}");
    let stripe = list
        .iter()
        .find(|g| g["id"] == "stripe:cs_credits_1:price_1k")
        .expect("the Stripe grant");
    assert_eq!(stripe["amount"], 1000);
    assert!(stripe["expires_at"].is_string());

    // Both are spendable at once past the quota.
    assert_eq!(tokens(&app, "acme", 1400).await.status(), 200);
    let r = tokens(&app, "acme", 1).await;
    assert_eq!(r.status(), 402);
}
