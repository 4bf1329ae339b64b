//! Billing-cycle periods through a real gateway (real Redis and Postgres, injected clock):
//! `period = "billing_month"` follows each org's billing anchor in `resets_at`, the RateLimit
//! headers, the usage history and the ledger, and an anchor change never resets usage.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestOptions, json, spawn_app_with, usage_entry};

const PLANS: &str = r#"
default_plan = "free"

[metrics]
requests = { unit = "request" }

[plans.free]
name = "Free"
upgrade_to = "pro"
quotas = { requests = { limit = 20, period = "billing_month" } }

[plans.pro]
name = "Pro"
quotas = { requests = { limit = 1000, period = "billing_month" } }
"#;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

async fn app() -> TestApp {
    spawn_app_with(TestOptions {
        plans: PLANS.into(),
        ..Default::default()
    })
    .await
}

async fn set_anchor(app: &TestApp, org: &str, anchor: Value) -> Value {
    let r = app
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/orgs/{org}"),
            Some(&json!({ "billing_anchor": anchor })),
        )
        .await;
    assert_eq!(r.status(), 200);
    json(r).await
}

async fn spend(app: &TestApp, amount: i64) -> reqwest::Response {
    app.check(json!({"org_id": "acme", "metric": "requests", "amount": amount}))
        .await
}

/// The `t=` (seconds to reset) of `name` in a `RateLimit` header.
fn reset_seconds(r: &reqwest::Response, name: &str) -> i64 {
    let header = r.headers()["ratelimit"].to_str().unwrap().to_string();
    let item = header
        .split(", ")
        .find(|i| i.starts_with(&format!("\"{name}\";")))
        .unwrap_or_else(|| panic!("no {name} in {header}"));
    item.split(';')
        .find_map(|p| p.strip_prefix("t="))
        .unwrap()
        .parse()
        .unwrap()
}

async fn billing_row(app: &TestApp, start: &str) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT quantity FROM billing_usage WHERE org_id = 'acme' AND metric = 'requests' \
         AND period_start = $1",
    )
    .bind(t(start))
    .fetch_optional(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_anchor_on_the_31st_sets_resets_at_headers_history_and_ledger() {
    let app = app().await;
    app.clock.set(t("2027-01-20T12:00:00Z"));
    // A first anchor mid-month: the calendar month in progress runs on to the anchor's next
    // boundary rather than starting over.
    let view = set_anchor(&app, "acme", json!("2026-12-31T10:00:00Z")).await;
    assert_eq!(view["billing_anchor"], "2026-12-31T10:00:00Z");
    assert_eq!(
        view["billing_period"],
        json!({"start": "2027-01-01T00:00:00Z", "end": "2027-01-31T10:00:00Z", "carried": true})
    );

    app.clock.set(t("2027-02-10T00:00:00Z"));
    let r = spend(&app, 5).await;
    assert_eq!(r.status(), 200);
    // Feb 28 10:00 is 18 days and 10 hours away: the short month clamps the 31st.
    assert_eq!(
        reset_seconds(&r, "requests-billing_month"),
        18 * 86_400 + 10 * 3600
    );
    let policy = r.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        policy.contains("\"requests-billing_month\";q=20;w="),
        "{policy}"
    );
    let body = json(r).await;
    let entry = usage_entry(&body, "period", "billing_month");
    assert_eq!(entry["current"], 5);
    assert_eq!(entry["resets_at"], "2027-02-28T10:00:00Z");
    // The calendar meter (what billing exports read) counts the same units once.
    assert_eq!(
        usage_entry(&body, "period", "month")["resets_at"],
        "2027-03-01T00:00:00Z"
    );
    app.flush().await.unwrap();
    assert_eq!(billing_row(&app, "2027-01-31T10:00:00Z").await, Some(5));
    assert_eq!(app.stored_usage("acme", "requests").await, Some(5));

    // One second before the boundary: still the old period.
    app.clock.set(t("2027-02-28T09:59:59Z"));
    let r = spend(&app, 15).await;
    assert_eq!(r.status(), 200);
    assert_eq!(reset_seconds(&r, "requests-billing_month"), 1);
    assert_eq!(spend(&app, 1).await.status(), 402, "20 of 20 used");

    // At the boundary the quota resets; the next one is Mar 31.
    app.clock.set(t("2027-02-28T10:00:00Z"));
    let r = spend(&app, 3).await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    let entry = usage_entry(&body, "period", "billing_month");
    assert_eq!(entry["current"], 3);
    assert_eq!(entry["resets_at"], "2027-03-31T10:00:00Z");
    let view = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(
        usage_entry(&view, "period", "billing_month")["resets_at"],
        "2027-03-31T10:00:00Z"
    );
    app.flush().await.unwrap();
    assert_eq!(billing_row(&app, "2027-01-31T10:00:00Z").await, Some(20));
    assert_eq!(billing_row(&app, "2027-02-28T10:00:00Z").await, Some(3));
    assert_eq!(app.stored_usage("acme", "requests").await, Some(23));

    // The history of a month shows the org's billing month that started in it.
    app.clock.set(t("2027-04-02T00:00:00Z"));
    let jan = json(app.get("/v1/orgs/acme/usage?period=2027-01").await).await;
    let entry = usage_entry(&jan, "metric", "requests");
    assert_eq!(entry["period"], "billing_month");
    assert_eq!(entry["period_start"], "2027-01-31T10:00:00Z");
    assert_eq!(entry["resets_at"], "2027-02-28T10:00:00Z");
    assert_eq!(entry["current"], 20);
    assert_eq!(entry["remaining"], 0);
    let feb = json(app.get("/v1/orgs/acme/usage?period=2027-02").await).await;
    let entry = usage_entry(&feb, "metric", "requests");
    assert_eq!(entry["period_start"], "2027-02-28T10:00:00Z");
    assert_eq!(entry["resets_at"], "2027-03-31T10:00:00Z");
    assert_eq!(entry["current"], 3);
    // A month without usage still names its period; April's billing month ends April 30.
    let apr = json(app.get("/v1/orgs/acme/usage?period=2027-04").await).await;
    let entry = usage_entry(&apr, "metric", "requests");
    assert_eq!(entry["period_start"], "2027-04-30T10:00:00Z");
    assert_eq!(entry["resets_at"], "2027-05-31T10:00:00Z");
    assert_eq!(entry["current"], 0);

    // The billing export lists the billing months that start in the month asked for.
    let dir = std::env::temp_dir().join(format!("qg-export-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plans.toml"), PLANS).unwrap();
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:0\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n[database]\nurl = \"{}\"\n",
            app.db_url
        ),
    )
    .unwrap();
    let export = |period: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_quota-gateway"))
            .args(["export", "--period", period, "--billing-months", "--config"])
            .arg(dir.join("gateway.toml"))
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        export("2027-01"),
        "org_id,metric,period_start,quantity\nacme,requests,2027-01-31T10:00:00Z,20\n"
    );
    assert_eq!(
        export("2027-02"),
        "org_id,metric,period_start,quantity\nacme,requests,2027-02-28T10:00:00Z,3\n"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_leap_day_anchor_resets_on_the_29th_and_feb_28_in_common_years() {
    let app = app().await;
    app.clock.set(t("2028-02-29T00:00:00Z"));
    set_anchor(&app, "acme", json!("2028-02-29T00:00:00Z")).await;
    let r = spend(&app, 20).await;
    let body = json(r).await;
    assert_eq!(
        usage_entry(&body, "period", "billing_month")["resets_at"],
        "2028-03-29T00:00:00Z"
    );
    app.clock.set(t("2029-02-27T23:59:59Z"));
    let body = json(spend(&app, 1).await).await;
    assert_eq!(
        usage_entry(&body, "period", "billing_month")["resets_at"],
        "2029-02-28T00:00:00Z",
        "February 2029 has no 29th"
    );
}

#[tokio::test]
async fn changing_the_anchor_mid_period_never_resets_usage() {
    let app = app().await;
    app.clock.set(t("2027-03-01T00:00:00Z"));
    set_anchor(&app, "acme", json!("2027-01-15T00:00:00Z")).await;
    app.clock.set(t("2027-03-20T00:00:00Z"));
    assert_eq!(spend(&app, 15).await.status(), 200);

    // Move the anchor to the 25th: the March 15 period carries its 15 units to March 25.
    let view = set_anchor(&app, "acme", json!("2027-01-25T00:00:00Z")).await;
    assert_eq!(
        view["billing_period"],
        json!({"start": "2027-03-15T00:00:00Z", "end": "2027-03-25T00:00:00Z", "carried": true})
    );
    assert_eq!(spend(&app, 6).await.status(), 402, "15 + 6 > 20: not reset");
    let r = spend(&app, 5).await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    let entry = usage_entry(&body, "period", "billing_month");
    assert_eq!(entry["current"], 20);
    assert_eq!(entry["resets_at"], "2027-03-25T00:00:00Z");
    // Moving it back and forth within the period changes where it ends, never what it holds.
    set_anchor(&app, "acme", json!("2027-01-10T00:00:00Z")).await;
    let r = spend(&app, 1).await;
    assert_eq!(r.status(), 402);
    let body = json(r).await;
    assert_eq!(body["quota"]["current"], 20);
    assert_eq!(body["quota"]["resets_at"], "2027-04-10T00:00:00Z");

    // From the new boundary on, the periods follow the new anchor.
    app.clock.set(t("2027-04-10T00:00:00Z"));
    let body = json(spend(&app, 20).await).await;
    let entry = usage_entry(&body, "period", "billing_month");
    assert_eq!(entry["current"], 20);
    assert_eq!(entry["resets_at"], "2027-05-10T00:00:00Z");
    app.flush().await.unwrap();
    assert_eq!(billing_row(&app, "2027-03-15T00:00:00Z").await, Some(20));
    assert_eq!(billing_row(&app, "2027-04-10T00:00:00Z").await, Some(20));

    // Removing the anchor brings back the calendar month, carrying the period in progress.
    let view = set_anchor(&app, "acme", Value::Null).await;
    assert_eq!(view["billing_anchor"], Value::Null);
    assert_eq!(view["billing_period"]["end"], "2027-05-01T00:00:00Z");
    assert_eq!(spend(&app, 1).await.status(), 402);
}

#[tokio::test]
async fn billing_months_come_back_after_a_redis_loss() {
    let app = app().await;
    app.clock.set(t("2027-01-10T00:00:00Z"));
    set_anchor(&app, "acme", json!("2027-01-05T06:00:00Z")).await;
    app.clock.set(t("2027-02-10T00:00:00Z"));
    assert_eq!(spend(&app, 18).await.status(), 200);
    app.flush().await.unwrap();

    // Redis loses everything of this gateway (a restart without persistence, a failover).
    app.lose_redis().await;
    assert_eq!(
        spend(&app, 3).await.status(),
        402,
        "18 + 3 > 20 after the loss"
    );
    let body = json(spend(&app, 2).await).await;
    let entry = usage_entry(&body, "period", "billing_month");
    assert_eq!(entry["current"], 20);
    assert_eq!(entry["resets_at"], "2027-03-05T06:00:00Z");
    app.flush().await.unwrap();
    assert_eq!(billing_row(&app, "2027-02-05T06:00:00Z").await, Some(20));
    assert_eq!(app.stored_usage("acme", "requests").await, Some(20));
}

#[tokio::test]
async fn a_bad_anchor_is_refused() {
    let app = app().await;
    for body in [
        json!({"billing_anchor": "the 31st"}),
        json!({"billing_anchor": 5}),
        json!({}),
    ] {
        let r = app
            .admin(reqwest::Method::PUT, "/admin/orgs/acme", Some(&body))
            .await;
        assert_eq!(r.status(), 422, "{body}");
        assert!(json(r).await["message"].is_string());
    }
}

#[tokio::test]
async fn subscription_events_set_the_anchor() {
    use crate::webhooks::{
        STANDARD_SECRET, STRIPE_SECRET, base64_key, now_unix, send_standard, send_stripe,
        stripe_subscription,
    };
    let app = crate::webhooks::app(true).await;
    let t = now_unix(&app);
    let admin_view = |org: &'static str| {
        let app = &app;
        async move {
            json(
                app.admin(reqwest::Method::GET, &format!("/admin/orgs/{org}"), None)
                    .await,
            )
            .await
        }
    };
    // Stripe: `billing_cycle_anchor` is taken as given.
    let mut sub = stripe_subscription(
        "customer.subscription.created",
        "evt_anchor",
        t,
        "acme",
        "active",
        false,
        t + 86_400 * 30,
    );
    sub["data"]["object"]["billing_cycle_anchor"] = json!(1_769_853_600); // 2026-01-31T10:00:00Z
    assert_eq!(
        send_stripe(&app, &sub, STRIPE_SECRET, t).await.status(),
        200
    );
    assert_eq!(
        admin_view("acme").await["billing_anchor"],
        "2026-01-31T10:00:00Z"
    );

    // The normalized event's `current_period_start`: a start the cycle already explains (Feb 28
    // for the 31st) leaves the anchor alone; another one moves it.
    let send = |id: &'static str, start: &'static str| {
        let app = &app;
        async move {
            let body = json!({"type": "subscription.updated", "data": {
                "subscription_id": "s1", "org_id": "beta", "status": "active",
                "product_id": "prod_pro", "current_period_start": start}});
            let r = send_standard(
                app,
                "/webhooks/standard/inhouse",
                &base64_key(STANDARD_SECRET),
                id,
                t,
                &body,
            )
            .await;
            assert_eq!(json(r).await["outcome"], "processed");
        }
    };
    send("msg_1", "2026-01-31T10:00:00Z").await;
    assert_eq!(
        admin_view("beta").await["billing_anchor"],
        "2026-01-31T10:00:00Z"
    );
    send("msg_2", "2026-02-28T10:00:00Z").await;
    assert_eq!(
        admin_view("beta").await["billing_anchor"],
        "2026-01-31T10:00:00Z",
        "Feb 28 is the 31st's February boundary"
    );
    send("msg_3", "2026-03-15T10:00:00Z").await;
    assert_eq!(
        admin_view("beta").await["billing_anchor"],
        "2026-03-15T10:00:00Z"
    );
}
