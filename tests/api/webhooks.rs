//! Billing webhooks end to end: payloads built from the providers' documented examples, signed
//! exactly as each provider signs, sent to a real gateway with real Postgres and Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use quota_gateway::config::{BillingProvider, BillingSettings, ProviderKind};
use quota_gateway::webhooks::scheduler::try_apply_due_once;
use quota_gateway::webhooks::signature::{sign_standard, sign_stripe};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::Row;

use crate::helpers::{TestApp, TestOptions, eventually, json, spawn_app_with};

const STRIPE_SECRET: &str = "whsec_stripe_test_secret_0001";
const STRIPE_ROTATED: &str = "whsec_stripe_test_secret_0002";
/// The Standard Webhooks spec's published test secret.
const STANDARD_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const DODO_SECRET: &str = "whsec_ZG9kby10ZXN0LXNlY3JldC1rZXktMDAwMQ==";
const POLAR_SECRET: &str = "polar_whs_test_secret_string";

const STRIPE_PRO_PRICE: &str = "price_1RQmYdQxu7lNeOGtPro0Mnth";
const DODO_PRO_PRODUCT: &str = "pdt_3Bq9QdVsz1lC8yYq0vE8m";
const POLAR_PRO_PRODUCT: &str = "d8dd2de1-21b7-4a41-8bc3-ce909c0cfe23";

fn provider(kind: ProviderKind, secrets: &[&str], plans: &[(&str, &str)]) -> BillingProvider {
    BillingProvider {
        kind,
        secrets: secrets.iter().map(|s| SecretString::from(*s)).collect(),
        org_id_from: "metadata.org_id".into(),
        plans: plans
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<BTreeMap<_, _>>(),
        grants: BTreeMap::new(),
    }
}

fn billing(auto_downgrade: bool) -> BillingSettings {
    BillingSettings {
        grace_period: Duration::from_secs(72 * 3600),
        auto_downgrade,
        providers: vec![
            provider(
                ProviderKind::Stripe,
                &[STRIPE_SECRET, STRIPE_ROTATED],
                &[(STRIPE_PRO_PRICE, "pro"), ("price_ent", "enterprise")],
            ),
            provider(
                ProviderKind::Dodo,
                &[DODO_SECRET],
                &[(DODO_PRO_PRODUCT, "pro")],
            ),
            provider(
                ProviderKind::Polar,
                &[POLAR_SECRET],
                &[(POLAR_PRO_PRODUCT, "pro")],
            ),
            provider(
                ProviderKind::Standard("inhouse".into()),
                &[STANDARD_SECRET],
                &[("prod_pro", "pro"), ("prod_ent", "enterprise")],
            ),
        ],
    }
}

async fn app(auto_downgrade: bool) -> TestApp {
    spawn_app_with(TestOptions {
        billing: Some(billing(auto_downgrade)),
        ..Default::default()
    })
    .await
}

fn now_unix(app: &TestApp) -> i64 {
    app.clock_now().timestamp()
}

/// A Stripe subscription event from the documented example, for `org` at `created`.
fn stripe_subscription(
    event_type: &str,
    event_id: &str,
    created: i64,
    org: &str,
    status: &str,
    cancel_at_period_end: bool,
    period_end: i64,
) -> Value {
    let mut e: Value = serde_json::from_str(include_str!(
        "../fixtures/webhooks/stripe/customer.subscription.updated.json"
    ))
    .unwrap();
    e["id"] = json!(event_id);
    e["type"] = json!(event_type);
    e["created"] = json!(created);
    let o = &mut e["data"]["object"];
    o["metadata"]["org_id"] = json!(org);
    o["status"] = json!(status);
    o["cancel_at_period_end"] = json!(cancel_at_period_end);
    o["cancel_at"] = Value::Null;
    o["items"]["data"][0]["current_period_end"] = json!(period_end);
    e
}

async fn send_stripe(app: &TestApp, body: &Value, secret: &str, t: i64) -> reqwest::Response {
    let raw = serde_json::to_vec(body).unwrap();
    app.client
        .post(app.url("/webhooks/stripe"))
        .header("stripe-signature", sign_stripe(secret.as_bytes(), t, &raw))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap()
}

async fn send_standard(
    app: &TestApp,
    path: &str,
    key: &[u8],
    id: &str,
    t: i64,
    body: &Value,
) -> reqwest::Response {
    let raw = serde_json::to_vec(body).unwrap();
    app.client
        .post(app.url(path))
        .header("webhook-id", id)
        .header("webhook-timestamp", t.to_string())
        .header("webhook-signature", sign_standard(key, id, t, &raw))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap()
}

fn base64_key(secret: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap()
}

async fn plan_of(app: &TestApp, org: &str) -> String {
    let body = json(
        app.admin(reqwest::Method::GET, &format!("/admin/orgs/{org}"), None)
            .await,
    )
    .await;
    body["plan"]["id"].as_str().unwrap().to_string()
}

async fn event_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_events")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn stripe_signatures_are_verified_over_the_raw_body() {
    let app = app(true).await;
    let t = now_unix(&app);
    let period_end = t + 30 * 86_400;
    let body = stripe_subscription(
        "customer.subscription.updated",
        "evt_valid_1",
        t,
        "acme",
        "active",
        false,
        period_end,
    );

    let wrong = send_stripe(&app, &body, "whsec_not_ours", t).await;
    assert_eq!(wrong.status(), 400);
    assert_eq!(json(wrong).await["error"], "invalid_signature");

    let raw = serde_json::to_vec(&body).unwrap();
    let header = sign_stripe(STRIPE_SECRET.as_bytes(), t, &raw);
    let mut tampered = raw.clone();
    let pos = tampered.iter().position(|b| *b == b'a').unwrap();
    tampered[pos] = b'b';
    let r = app
        .client
        .post(app.url("/webhooks/stripe"))
        .header("stripe-signature", &header)
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a tampered body fails");

    let stale = send_stripe(&app, &body, STRIPE_SECRET, t - 301).await;
    assert_eq!(stale.status(), 400, "older than the 300 s tolerance");
    let missing = app
        .client
        .post(app.url("/webhooks/stripe"))
        .body(raw.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    assert_eq!(
        event_rows(&app).await,
        0,
        "nothing stored for rejected deliveries"
    );
    assert_eq!(plan_of(&app, "acme").await, "free");

    // Signed with the second (rotated-in) secret: accepted.
    let ok = send_stripe(&app, &body, STRIPE_ROTATED, t).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(json(ok).await["outcome"], "processed");
    assert_eq!(plan_of(&app, "acme").await, "pro");

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(
        "quota_gateway_webhooks_total{outcome=\"invalid_signature\",provider=\"stripe\"} 4"
    ));
}

#[tokio::test]
async fn a_redelivered_event_has_no_second_effect() {
    let app = app(true).await;
    let t = now_unix(&app);
    let body = stripe_subscription(
        "customer.subscription.created",
        "evt_dup",
        t,
        "acme",
        "active",
        false,
        t + 86_400 * 30,
    );
    for expected in ["processed", "duplicate", "duplicate"] {
        let r = send_stripe(&app, &body, STRIPE_SECRET, t).await;
        assert_eq!(r.status(), 200);
        assert_eq!(json(r).await["outcome"], expected);
    }
    let changes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM plan_changes WHERE org_id = 'acme'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(changes, 1);
    let row = sqlx::query("SELECT event_type, status, org_id FROM webhook_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("status"), "processed");
    assert_eq!(
        row.get::<Option<String>, _>("org_id").as_deref(),
        Some("acme")
    );
    let cause: (String, Option<String>) =
        sqlx::query_as("SELECT cause, event_id FROM plan_changes WHERE org_id = 'acme'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(cause, ("webhook".to_string(), Some("evt_dup".to_string())));
}

#[tokio::test]
async fn late_events_never_overwrite_newer_state_and_deletions_stick() {
    let app = app(true).await;
    let t = now_unix(&app) - 100;
    let end = t + 86_400 * 30;
    let created = stripe_subscription(
        "customer.subscription.created",
        "evt_c",
        t,
        "acme",
        "active",
        false,
        end,
    );
    let deleted = stripe_subscription(
        "customer.subscription.deleted",
        "evt_d",
        t + 20,
        "acme",
        "canceled",
        false,
        end,
    );
    let updated = stripe_subscription(
        "customer.subscription.updated",
        "evt_u",
        t + 10,
        "acme",
        "active",
        false,
        end,
    );
    let now = now_unix(&app);
    // Delivered out of order: deleted first, then created and updated (both older).
    assert_eq!(
        json(send_stripe(&app, &deleted, STRIPE_SECRET, now).await).await["outcome"],
        "processed"
    );
    assert_eq!(
        json(send_stripe(&app, &created, STRIPE_SECRET, now).await).await["outcome"],
        "stale"
    );
    assert_eq!(
        json(send_stripe(&app, &updated, STRIPE_SECRET, now).await).await["outcome"],
        "stale"
    );
    assert_eq!(plan_of(&app, "acme").await, "free");

    // A newer non-terminal event cannot revive a deleted subscription either.
    let revived = stripe_subscription(
        "customer.subscription.updated",
        "evt_late",
        t + 30,
        "acme",
        "active",
        false,
        end,
    );
    assert_eq!(
        json(send_stripe(&app, &revived, STRIPE_SECRET, now).await).await["outcome"],
        "stale"
    );
    assert_eq!(plan_of(&app, "acme").await, "free");
}

#[tokio::test]
async fn cancel_at_period_end_keeps_the_plan_until_the_scheduled_job_after_the_period() {
    let app = app(true).await;
    let t = now_unix(&app);
    let period_end = t + 86_400;
    let body = stripe_subscription(
        "customer.subscription.updated",
        "evt_cancel",
        t,
        "acme",
        "active",
        true,
        period_end,
    );
    assert_eq!(
        send_stripe(&app, &body, STRIPE_SECRET, t).await.status(),
        200
    );
    assert_eq!(
        plan_of(&app, "acme").await,
        "pro",
        "paid until the period ends"
    );

    let before_end = app.clock_now() + chrono::Duration::hours(23);
    assert!(
        try_apply_due_once(&app.state.webhooks, before_end)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(plan_of(&app, "acme").await, "pro");

    app.clock.advance(chrono::Duration::hours(25));
    let changed = try_apply_due_once(&app.state.webhooks, app.clock_now())
        .await
        .unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(plan_of(&app, "acme").await, "free");
    let cause: String = sqlx::query_scalar(
        "SELECT cause FROM plan_changes WHERE org_id = 'acme' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(cause, "schedule");
    // Running the job again (or on another replica) changes nothing.
    assert!(
        try_apply_due_once(&app.state.webhooks, app.clock_now())
            .await
            .unwrap()
            .is_empty()
    );
    // The product is told of both changes, each written with the change itself.
    let events: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM notifications WHERE org_id = 'acme' AND type = 'plan.changed' \
         ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let told: Vec<(Value, Value, Value, Value)> = events
        .iter()
        .map(|e| {
            let d = &e["data"];
            (
                d["from"].clone(),
                d["to"].clone(),
                d["cause"].clone(),
                d["event_id"].clone(),
            )
        })
        .collect();
    assert_eq!(
        told,
        [
            (
                Value::Null,
                json!("pro"),
                json!("webhook"),
                json!("evt_cancel")
            ),
            (json!("pro"), json!("free"), json!("schedule"), Value::Null),
        ]
    );
}

#[tokio::test]
async fn past_due_keeps_the_plan_for_the_grace_period_then_downgrades() {
    let app = app(true).await;
    let t = now_unix(&app);
    let created = stripe_subscription(
        "customer.subscription.created",
        "evt_pd0",
        t,
        "acme",
        "active",
        false,
        t + 86_400 * 30,
    );
    assert_eq!(
        send_stripe(&app, &created, STRIPE_SECRET, t).await.status(),
        200
    );
    let mut failed: Value = serde_json::from_str(include_str!(
        "../fixtures/webhooks/stripe/invoice.payment_failed.json"
    ))
    .unwrap();
    failed["id"] = json!("evt_pd1");
    failed["created"] = json!(t + 1);
    failed["data"]["object"]["parent"]["subscription_details"]["metadata"]["org_id"] =
        json!("acme");
    let r = send_stripe(&app, &failed, STRIPE_SECRET, t).await;
    assert_eq!(json(r).await["outcome"], "processed");
    assert_eq!(plan_of(&app, "acme").await, "pro", "grace period");
    let view = json(
        app.admin(reqwest::Method::GET, "/admin/orgs/acme", None)
            .await,
    )
    .await;
    assert_eq!(view["subscriptions"][0]["status"], "past_due");

    let almost = app.clock_now() + chrono::Duration::hours(71);
    assert!(
        try_apply_due_once(&app.state.webhooks, almost)
            .await
            .unwrap()
            .is_empty()
    );
    let after = app.clock_now() + chrono::Duration::hours(73);
    assert_eq!(
        try_apply_due_once(&app.state.webhooks, after)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(plan_of(&app, "acme").await, "free");
}

#[tokio::test]
async fn an_org_at_its_free_quota_is_unblocked_by_an_upgrade_on_every_replica() {
    let a = app(true).await;
    let b = a.spawn_peer().await;
    for _ in 0..2 {
        a.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
            .await;
        a.clock.advance(chrono::Duration::seconds(1));
    }
    let denied = b
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(denied.status(), 402);
    assert_eq!(json(denied).await["upgrade"]["plan"], "pro");

    let t = now_unix(&a);
    let body = stripe_subscription(
        "customer.subscription.created",
        "evt_up",
        t,
        "acme",
        "active",
        false,
        t + 86_400 * 30,
    );
    assert_eq!(send_stripe(&a, &body, STRIPE_SECRET, t).await.status(), 200);
    let took = eventually(Duration::from_secs(1), || async {
        b.check(json!({"org_id": "acme", "metric": "requests", "consume": false}))
            .await
            .status()
            == 200
    })
    .await;
    assert!(
        took.is_some(),
        "the second gateway sees the upgrade within a second"
    );
}

#[tokio::test]
async fn dodo_polar_and_standard_endpoints_use_their_own_key_encodings() {
    let app = app(true).await;
    let t = now_unix(&app);

    let mut dodo: Value = serde_json::from_str(include_str!(
        "../fixtures/webhooks/dodo/subscription.active.json"
    ))
    .unwrap();
    dodo["data"]["metadata"]["org_id"] = json!("dodo-org");
    // Signed with the UTF-8 bytes (Polar's way): Dodo decodes base64, so it must fail.
    let wrong = send_standard(
        &app,
        "/webhooks/dodo",
        DODO_SECRET.as_bytes(),
        "msg_d0",
        t,
        &dodo,
    )
    .await;
    assert_eq!(wrong.status(), 400);
    let r = send_standard(
        &app,
        "/webhooks/dodo",
        &base64_key(DODO_SECRET),
        "msg_d1",
        t,
        &dodo,
    )
    .await;
    assert_eq!(json(r).await["outcome"], "processed");
    assert_eq!(plan_of(&app, "dodo-org").await, "pro");

    let mut polar: Value = serde_json::from_str(include_str!(
        "../fixtures/webhooks/polar/subscription.created.json"
    ))
    .unwrap();
    polar["data"]["metadata"]["org_id"] = json!("polar-org");
    let r = send_standard(
        &app,
        "/webhooks/polar",
        POLAR_SECRET.as_bytes(),
        "msg_p1",
        t,
        &polar,
    )
    .await;
    assert_eq!(json(r).await["outcome"], "processed");
    assert_eq!(plan_of(&app, "polar-org").await, "pro");
    // Stale Standard Webhooks timestamps are refused in both directions.
    for skew in [-301, 301] {
        let r = send_standard(
            &app,
            "/webhooks/polar",
            POLAR_SECRET.as_bytes(),
            "msg_p2",
            t + skew,
            &polar,
        )
        .await;
        assert_eq!(r.status(), 400, "skew {skew}");
    }

    let ours = json!({
        "type": "subscription.updated",
        "timestamp": app.clock_now().to_rfc3339(),
        "data": {
            "subscription_id": "inh_1", "org_id": "inhouse-org", "product_id": "prod_ent",
            "status": "active", "current_period_end": null, "cancel_at_period_end": false
        }
    });
    let r = send_standard(
        &app,
        "/webhooks/standard/inhouse",
        &base64_key(STANDARD_SECRET),
        "msg_s1",
        t,
        &ours,
    )
    .await;
    assert_eq!(json(r).await["outcome"], "processed");
    assert_eq!(plan_of(&app, "inhouse-org").await, "enterprise");
    let unknown = send_standard(
        &app,
        "/webhooks/standard/other",
        &base64_key(STANDARD_SECRET),
        "msg_s2",
        t,
        &ours,
    )
    .await;
    assert_eq!(unknown.status(), 404);

    // Unhandled types are acknowledged and recorded as ignored.
    let ignored =
        json!({"type": "customer.updated", "timestamp": app.clock_now().to_rfc3339(), "data": {}});
    let r = send_standard(
        &app,
        "/webhooks/standard/inhouse",
        &base64_key(STANDARD_SECRET),
        "msg_s3",
        t,
        &ignored,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["outcome"], "ignored");
}

#[tokio::test]
async fn without_auto_downgrade_upgrades_apply_and_downgrades_wait_for_an_operator() {
    let app = app(false).await;
    let t = now_unix(&app);
    let up = stripe_subscription(
        "customer.subscription.created",
        "evt_a1",
        t,
        "acme",
        "active",
        false,
        t + 86_400,
    );
    send_stripe(&app, &up, STRIPE_SECRET, t).await;
    assert_eq!(plan_of(&app, "acme").await, "pro");
    let gone = stripe_subscription(
        "customer.subscription.deleted",
        "evt_a2",
        t + 5,
        "acme",
        "canceled",
        false,
        t + 86_400,
    );
    let r = send_stripe(&app, &gone, STRIPE_SECRET, t).await;
    assert_eq!(json(r).await["outcome"], "processed");
    assert_eq!(
        plan_of(&app, "acme").await,
        "pro",
        "not moved down without an operator"
    );
    let view = json(
        app.admin(reqwest::Method::GET, "/admin/orgs/acme", None)
            .await,
    )
    .await;
    assert_eq!(
        view["subscriptions"][0]["status"], "canceled",
        "the status is still recorded"
    );
    let later = app.clock_now() + chrono::Duration::days(10);
    assert!(
        try_apply_due_once(&app.state.webhooks, later)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(plan_of(&app, "acme").await, "pro");
}

#[tokio::test]
async fn a_database_failure_answers_500_and_the_retry_applies() {
    let app = app(true).await;
    let t = now_unix(&app);
    let body = stripe_subscription(
        "customer.subscription.created",
        "evt_db",
        t,
        "acme",
        "active",
        false,
        t + 86_400,
    );
    sqlx::query("ALTER TABLE subscriptions RENAME TO subscriptions_away")
        .execute(&app.pool)
        .await
        .unwrap();
    let r = send_stripe(&app, &body, STRIPE_SECRET, t).await;
    assert_eq!(r.status(), 500);
    assert_eq!(event_rows(&app).await, 0, "not marked processed");
    sqlx::query("ALTER TABLE subscriptions_away RENAME TO subscriptions")
        .execute(&app.pool)
        .await
        .unwrap();
    let r = send_stripe(&app, &body, STRIPE_SECRET, t).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["outcome"], "processed");
    assert_eq!(plan_of(&app, "acme").await, "pro");
}

#[tokio::test]
async fn a_subscription_moved_to_another_org_stops_counting_for_the_first() {
    let app = app(true).await;
    let t = now_unix(&app);
    let period_end = t + 86_400 * 30;
    let first = stripe_subscription(
        "customer.subscription.created",
        "evt_move_1",
        t,
        "acme",
        "active",
        false,
        period_end,
    );
    assert_eq!(
        send_stripe(&app, &first, STRIPE_SECRET, t).await.status(),
        200
    );
    assert_eq!(plan_of(&app, "acme").await, "pro");
    // The same subscription, now carrying another org in its metadata.
    let moved = stripe_subscription(
        "customer.subscription.updated",
        "evt_move_2",
        t + 60,
        "globex",
        "active",
        false,
        period_end,
    );
    let r = send_stripe(&app, &moved, STRIPE_SECRET, t + 60).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["outcome"], "processed");
    assert_eq!(plan_of(&app, "globex").await, "pro");
    assert_eq!(plan_of(&app, "acme").await, "free");
}

// ---- The samples of README "Try it": examples/webhooks and scripts/send-webhook.sh ----

/// One sample a user sends: the endpoint, the file, and the provider whose secret signs it.
struct Sample {
    path: &'static str,
    /// What `scripts/send-webhook.sh` takes as its PROVIDER argument.
    script_provider: &'static str,
    file: &'static str,
    kind: ProviderKind,
}

fn samples() -> [Sample; 4] {
    [
        Sample {
            path: "/webhooks/stripe",
            script_provider: "stripe",
            file: "stripe-subscription-updated.json",
            kind: ProviderKind::Stripe,
        },
        Sample {
            path: "/webhooks/dodo",
            script_provider: "dodo",
            file: "dodo-subscription-active.json",
            kind: ProviderKind::Dodo,
        },
        Sample {
            path: "/webhooks/polar",
            script_provider: "polar",
            file: "polar-subscription-active.json",
            kind: ProviderKind::Polar,
        },
        Sample {
            path: "/webhooks/standard/inhouse",
            script_provider: "standard",
            file: "standard-subscription-updated.json",
            kind: ProviderKind::Standard("inhouse".into()),
        },
    ]
}

impl Sample {
    fn body(&self) -> Vec<u8> {
        std::fs::read(repo().join("examples/webhooks").join(self.file)).unwrap()
    }
}

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `[billing]` as README tells a user to enable it: the shipped config/gateway.toml with
/// examples/webhooks/billing.toml appended, read by the gateway's own loader.
fn example_billing() -> BillingSettings {
    let dir = std::env::temp_dir().join(format!("qg-try-it-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let gateway = std::fs::read_to_string(repo().join("config/gateway.toml")).unwrap();
    let snippet = std::fs::read_to_string(repo().join("examples/webhooks/billing.toml")).unwrap();
    std::fs::write(dir.join("gateway.toml"), format!("{gateway}\n{snippet}")).unwrap();
    std::fs::copy(repo().join("config/plans.toml"), dir.join("plans.toml")).unwrap();
    let loaded = quota_gateway::config::load(
        &dir.join("gateway.toml"),
        &quota_gateway::config::EnvOverrides::default(),
    );
    std::fs::remove_dir_all(&dir).ok();
    let (settings, _) = loaded.unwrap_or_else(|e| panic!("the Try it config is invalid: {e}"));
    settings.billing.expect("billing.toml enables [billing]")
}

/// A gateway on the shipped plan catalog with the Try it billing config.
async fn try_it_app() -> (TestApp, BillingSettings) {
    let billing = example_billing();
    let app = spawn_app_with(TestOptions {
        billing: Some(billing.clone()),
        plans_file: Some(repo().join("config/plans.toml")),
        ..Default::default()
    })
    .await;
    (app, billing)
}

fn secret_of(billing: &BillingSettings, kind: &ProviderKind) -> String {
    use secrecy::ExposeSecret;
    billing.provider(kind).unwrap().secrets[0]
        .expose_secret()
        .to_string()
}

/// The plan column of the org's row, as the gateway stored it.
async fn stored_plan(app: &TestApp, org: &str) -> Option<String> {
    sqlx::query_scalar("SELECT plan_id FROM orgs WHERE org_id = $1")
        .bind(org)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        .flatten()
}

#[test]
fn readme_shows_the_try_it_billing_config_as_it_is_in_examples() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let snippet = std::fs::read_to_string(repo().join("examples/webhooks/billing.toml")).unwrap();
    let body = &snippet[snippet.find("[billing]").unwrap()..];
    assert!(
        readme.contains(body.trim_end()),
        "README \"Try it\" must show examples/webhooks/billing.toml from [billing] on"
    );
}

#[tokio::test]
async fn every_sample_payload_moves_acme_to_the_plan_its_product_maps_to() {
    for sample in samples() {
        let (app, billing) = try_it_app().await;
        let kind = sample.kind.clone();
        let secret = secret_of(&billing, &kind);
        let raw = sample.body();
        let t = now_unix(&app);
        let request = app
            .client
            .post(app.url(sample.path))
            .header("content-type", "application/json");
        let request = match kind {
            ProviderKind::Stripe => {
                request.header("stripe-signature", sign_stripe(secret.as_bytes(), t, &raw))
            }
            _ => {
                let key = match kind {
                    ProviderKind::Polar => secret.as_bytes().to_vec(),
                    _ => base64_key(&secret),
                };
                request
                    .header("webhook-id", "msg_try_it_1")
                    .header("webhook-timestamp", t.to_string())
                    .header(
                        "webhook-signature",
                        sign_standard(&key, "msg_try_it_1", t, &raw),
                    )
            }
        };
        assert_eq!(stored_plan(&app, "acme").await, None, "{}", sample.file);
        let r = request.body(raw).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", sample.file);
        assert_eq!(
            json(r).await,
            json!({"received": true, "outcome": "processed"}),
            "{}",
            sample.file
        );
        assert_eq!(
            stored_plan(&app, "acme").await.as_deref(),
            Some("pro"),
            "{}",
            sample.file
        );
        assert_eq!(plan_of(&app, "acme").await, "pro", "{}", sample.file);
    }
}

/// The shell tools sign with openssl; without it they cannot run, which is a skip, said aloud.
fn openssl_missing(what: &str) -> bool {
    let found = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: openssl is not installed and {what} needs it");
    }
    !found
}

/// Runs `scripts/send-webhook.sh` off the runtime (the gateway under test shares it) and
/// returns (exit code, stdout).
async fn run_send_webhook(
    provider: &str,
    file: &str,
    url: String,
    secret: Option<String>,
) -> (i32, String) {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(repo().join("scripts/send-webhook.sh"))
        .arg(provider)
        .arg(repo().join("examples/webhooks").join(file))
        .arg(url)
        .env_remove("QG_WEBHOOK_SECRET")
        .env_remove("QG_STRIPE_WEBHOOK_SECRET")
        .env_remove("QG_WEBHOOK_ID");
    if let Some(secret) = secret {
        cmd.env("QG_WEBHOOK_SECRET", secret);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("command not found"),
        "send-webhook.sh: {stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[tokio::test]
async fn send_webhook_script_signs_the_samples_as_the_gateway_verifies_them() {
    if openssl_missing("scripts/send-webhook.sh") {
        return;
    }
    for sample in samples() {
        let (app, billing) = try_it_app().await;
        let secret = secret_of(&billing, &sample.kind);
        // Stripe and Dodo get the secret from the environment; Polar and the normalized
        // endpoint rely on the script's defaults, which must be the secrets of billing.toml.
        let from_env = matches!(sample.kind, ProviderKind::Stripe | ProviderKind::Dodo);
        let url = app.url(sample.path);

        let (code, out) = run_send_webhook(
            sample.script_provider,
            sample.file,
            url.clone(),
            Some("whsec_bm90LXRoZS1yaWdodC1zZWNyZXQ=".into()),
        )
        .await;
        assert_eq!(code, 1, "{}: a wrong secret fails", sample.file);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap()["error"],
            "invalid_signature",
            "{}",
            sample.file
        );

        let secret = from_env.then_some(secret);
        let (code, out) = run_send_webhook(
            sample.script_provider,
            sample.file,
            url.clone(),
            secret.clone(),
        )
        .await;
        assert_eq!(code, 0, "{}: {out}", sample.file);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"received": true, "outcome": "processed"}),
            "{}",
            sample.file
        );
        assert_eq!(
            stored_plan(&app, "acme").await.as_deref(),
            Some("pro"),
            "{}",
            sample.file
        );

        // Sending the same file again is a redelivery: same event id, no second effect.
        let (code, out) = run_send_webhook(sample.script_provider, sample.file, url, secret).await;
        assert_eq!(code, 0, "{}", sample.file);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap()["outcome"],
            "duplicate",
            "{}",
            sample.file
        );
    }
}

#[tokio::test]
async fn the_readme_stripe_one_liner_is_accepted() {
    if openssl_missing("the README one-liner") {
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("S=whsec_example_stripe_test_secret")
        .expect("README shows the Stripe one-liner");
    let end = start + readme[start..].find("\n```").unwrap();
    let (app, _) = try_it_app().await;
    let one_liner = readme[start..end].replace(
        "localhost:9000/webhooks/stripe",
        &app.url("/webhooks/stripe"),
    );
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c").arg(&one_liner).current_dir(repo());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{one_liner}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!({"received": true, "outcome": "processed"}),
        "{one_liner}"
    );
    assert_eq!(stored_plan(&app, "acme").await.as_deref(), Some("pro"));
}
