//! `POST /v1/check`: decisions, denial bodies and headers, against real Redis and Postgres.

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{TestOptions, json, spawn_app, spawn_app_with, usage_entry};

const QUOTA_ONLY: &str = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
quotas = { requests = { limit = 50, period = "month" } }
"#;

const RATE_ONLY: &str = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
upgrade_to = "pro"
rates = { requests = { limit = 10, window = "1s" } }
[plans.pro]
rates = { requests = { limit = 100, window = "1s" } }
"#;

#[tokio::test]
async fn exactly_the_limit_is_admitted_out_of_twice_as_many_concurrent_checks() {
    let app = spawn_app_with(TestOptions {
        plans: QUOTA_ONLY.into(),
        ..Default::default()
    })
    .await;
    let responses =
        join_all((0..100).map(|_| app.check(json!({"org_id": "acme", "metric": "requests"}))))
            .await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let denied = responses.iter().filter(|r| r.status() == 402).count();
    assert_eq!((ok, denied), (50, 50));
    let keys = app.usage_keys().await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(app.redis_get(&keys[0]).await.as_deref(), Some("50"));
}

#[tokio::test]
async fn a_burst_admits_exactly_the_rate_limit_then_429_with_retry_after() {
    let app = spawn_app_with(TestOptions {
        plans: RATE_ONLY.into(),
        ..Default::default()
    })
    .await;
    // The clock does not move: the whole burst falls in one instant.
    let responses =
        join_all((0..25).map(|_| app.check(json!({"org_id": "acme", "metric": "requests"})))).await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 15);

    let denied = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(denied.status(), 429);
    assert_eq!(denied.headers()["retry-after"], "1");
    // Every header tells the same wait as Retry-After.
    assert_eq!(denied.headers()["x-ratelimit-reset"], "1");
    assert_eq!(denied.headers()["x-ratelimit-remaining"], "0");
    let rl = denied.headers()["ratelimit"].to_str().unwrap();
    assert!(rl.contains("\"requests-1s\";r=0;t=1"), "{rl}");
    assert_eq!(denied.headers()["content-type"], "application/problem+json");
    let body = json(denied).await;
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["allowed"], false);
    assert_eq!(body["status"], 429);
    assert_eq!(
        body["rate"],
        json!({"metric": "requests", "limit": 10, "window": "1s"})
    );
    assert_eq!(body["retry_after_seconds"], 1);
    assert_eq!(body["upgrade"]["plan"], "pro");
    assert_eq!(body["upgrade"]["limit"], 100);

    // A tenth of the window later, one unit has been replenished: exactly one more fits.
    app.clock.advance(chrono::Duration::milliseconds(100));
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 429);
    // A full window later the bucket is full again.
    app.clock.advance(chrono::Duration::seconds(1));
    let ok =
        join_all((0..10).map(|_| app.check(json!({"org_id": "acme", "metric": "requests"})))).await;
    assert!(ok.iter().all(|r| r.status() == 200));
}

#[tokio::test]
async fn quota_denial_has_the_documented_body_and_headers() {
    let app = spawn_app().await;
    // Free: 20 requests a month, 10 per second. Spend 20 in steps the rate allows.
    for _ in 0..2 {
        let r = app
            .check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
            .await;
        assert_eq!(r.status(), 200);
        app.clock.advance(chrono::Duration::seconds(1));
    }
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 402);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(r.headers().get("retry-after").is_none());
    let policy = r.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(policy.starts_with("\"requests-month\";q=20;w="), "{policy}");
    assert!(policy.contains("\"requests-1s\";q=10;w=1"), "{policy}");
    let rl = r.headers()["ratelimit"].to_str().unwrap().to_string();
    assert!(rl.starts_with("\"requests-month\";r=0;t="), "{rl}");
    // A second after the last burst the rate has refilled, and says so.
    assert!(rl.contains("\"requests-1s\";r=10;t=0"), "{rl}");
    assert_eq!(r.headers()["x-ratelimit-limit"], "20");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let body = json(r).await;
    assert_eq!(body["type"], "urn:quota-gateway:problem:quota-exceeded");
    assert_eq!(body["title"], "Quota exceeded");
    assert_eq!(body["status"], 402);
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["allowed"], false);
    assert_eq!(body["quota"]["metric"], "requests");
    assert_eq!(body["quota"]["current"], 20);
    assert_eq!(body["quota"]["limit"], 20);
    assert_eq!(body["quota"]["percentage"], 100.0);
    assert_eq!(body["quota"]["period"], "month");
    assert!(
        body["quota"]["resets_at"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );
    assert_eq!(body["plan"], json!({"id": "free", "name": "Free"}));
    assert_eq!(body["upgrade"]["plan"], "pro");
    assert_eq!(body["upgrade"]["name"], "Pro");
    assert_eq!(body["upgrade"]["limit"], 1000);
    assert_eq!(
        body["upgrade"]["url"],
        "https://example.com/upgrade?org=acme&plan=pro"
    );
    let message = body["message"].as_str().unwrap();
    for part in ["acme", "requests", "20 of 20", "month", "Free"] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    assert_eq!(body["detail"], body["message"]);
}

#[tokio::test]
async fn allowed_answers_carry_usage_and_rate_limit_headers() {
    let app = spawn_app().await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 3}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-ratelimit-limit"],
        "10",
        "the 1s rate is nearest exhaustion"
    );
    assert_eq!(r.headers()["x-ratelimit-remaining"], "7");
    assert_eq!(r.headers()["x-ratelimit-reset"], "1");
    let rl = r.headers()["ratelimit"].to_str().unwrap().to_string();
    assert!(rl.contains("\"requests-month\";r=17;t="), "{rl}");
    assert!(rl.contains("\"requests-1s\";r=7;t=1"), "{rl}");
    let body = json(r).await;
    assert_eq!(body["allowed"], true);
    assert_eq!(body["org_id"], "acme");
    assert_eq!(body["plan"]["id"], "free");
    let usage = &body["usage"][0];
    assert_eq!(usage["metric"], "requests");
    assert_eq!(usage["current"], 3);
    assert_eq!(usage["limit"], 20);
    assert_eq!(usage["remaining"], 17);
    assert_eq!(usage["percentage"], 15.0);
    assert_eq!(usage["unlimited"], false);
    assert_eq!(usage["period"], "month");
}

#[tokio::test]
async fn a_quota_wins_over_a_rate_when_both_are_exhausted() {
    let app = spawn_app().await;
    // 10 now (rate full), 10 a second later (quota full and rate full again).
    app.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
        .await;
    app.clock.advance(chrono::Duration::seconds(1));
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(
        r.status(),
        402,
        "retrying cannot help, so 402 rather than 429"
    );
}

#[tokio::test]
async fn dry_runs_consume_nothing_but_answer_denials_the_same_way() {
    let app = spawn_app().await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 5, "consume": false}))
        .await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["dry_run"], true);
    assert_eq!(body["usage"][0]["current"], 0);
    assert!(
        app.usage_keys().await.is_empty(),
        "a dry run writes nothing"
    );

    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 21, "consume": false}))
        .await;
    assert_eq!(r.status(), 402);
    assert_eq!(json(r).await["error"], "quota_exceeded");
    // More than the rate's burst (10 a second) can never fit: a 402, not a 429 to retry.
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 11, "consume": false}))
        .await;
    assert_eq!(r.status(), 402);
    assert_eq!(json(r).await["error"], "charge_exceeds_burst");
    assert!(app.usage_keys().await.is_empty());
}

#[tokio::test]
async fn several_charges_are_all_or_nothing() {
    let app = spawn_app().await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "tokens", "amount": 990}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .check(json!({"org_id": "acme", "charges": [
            {"metric": "requests", "amount": 1},
            {"metric": "tokens", "amount": 20}
        ]}))
        .await;
    assert_eq!(r.status(), 402);
    let body = json(r).await;
    assert_eq!(body["quota"]["metric"], "tokens");
    assert_eq!(body["quota"]["current"], 990);
    assert!(
        body["upgrade"]["limit"].is_null(),
        "tokens are unlimited on Pro"
    );

    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    let requests = usage_entry(&usage, "metric", "requests");
    assert_eq!(requests["current"], 0, "the request charge was not applied");

    let r = app
        .check(json!({"org_id": "acme", "charges": [
            {"metric": "requests", "amount": 1},
            {"metric": "tokens", "amount": 10}
        ]}))
        .await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    let currents: Vec<i64> = body["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["current"].as_i64().unwrap())
        .collect();
    assert_eq!(currents, [1, 1000]);
}

#[tokio::test]
async fn soft_limits_record_and_report_but_never_deny() {
    let plans = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
quotas = { requests = { limit = 5, period = "day", overage = "allow" } }
"#;
    let app = spawn_app_with(TestOptions {
        plans: plans.into(),
        ..Default::default()
    })
    .await;
    for _ in 0..7 {
        let r = app
            .check(json!({"org_id": "acme", "metric": "requests"}))
            .await;
        assert_eq!(r.status(), 200);
    }
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    let day = usage_entry(&body, "period", "day");
    assert_eq!(day["current"], 8);
    assert_eq!(day["remaining"], 0);
    assert_eq!(day["overage"], "allow");
    assert_eq!(day["percentage"], 160.0);
}

#[tokio::test]
async fn period_counters_roll_over_with_the_clock() {
    let plans = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
[plans.free]
quotas = { requests = [{ limit = 3, period = "minute" }, { limit = 5, period = "month" }] }
"#;
    let app = spawn_app_with(TestOptions {
        plans: plans.into(),
        ..Default::default()
    })
    .await;
    use chrono::{Datelike, TimeZone, Timelike};
    // Start just before a minute boundary.
    let now = app.clock_now();
    let start = chrono::Utc
        .with_ymd_and_hms(
            now.year(),
            now.month(),
            now.day(),
            now.hour(),
            now.minute(),
            58,
        )
        .unwrap()
        + chrono::Duration::minutes(1);
    app.clock.set(start);
    for _ in 0..3 {
        assert_eq!(
            app.check(json!({"org_id": "acme", "metric": "requests"}))
                .await
                .status(),
            200
        );
    }
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 402);
    assert_eq!(json(r).await["quota"]["period"], "minute");
    // Two seconds later a new minute starts: the minute counter is fresh, the month's is not.
    app.clock.advance(chrono::Duration::seconds(2));
    for _ in 0..2 {
        assert_eq!(
            app.check(json!({"org_id": "acme", "metric": "requests"}))
                .await
                .status(),
            200
        );
    }
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 402);
    assert_eq!(json(r).await["quota"]["period"], "month");
    let minute_keys = app
        .redis_keys()
        .await
        .into_iter()
        .filter(|k| k.contains(":minute:"))
        .count();
    assert_eq!(minute_keys, 2, "one counter per minute window");

    // Next month: everything starts over.
    let next_month = if start.month() == 12 {
        chrono::Utc.with_ymd_and_hms(start.year() + 1, 1, 1, 0, 0, 0)
    } else {
        chrono::Utc.with_ymd_and_hms(start.year(), start.month() + 1, 1, 0, 0, 0)
    }
    .unwrap();
    app.clock.set(next_month);
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    let month = usage_entry(&body, "period", "month");
    assert_eq!(month["current"], 1);
    assert_eq!(
        month["resets_at"].as_str().unwrap(),
        crate::helpers::next_month_start(next_month)
    );
}

#[tokio::test]
async fn gauges_go_up_and_down_and_never_below_zero() {
    let app = spawn_app().await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "projects", "amount": 2}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .check(json!({"org_id": "acme", "metric": "projects", "amount": 2}))
        .await;
    assert_eq!(r.status(), 402, "3 projects on Free");
    let body = json(r).await;
    assert_eq!(body["quota"]["current"], 2);
    assert!(body["quota"]["period"].is_null());
    assert_eq!(body["upgrade"]["limit"], 50);

    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "projects", "amount": -1}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .check(json!({"org_id": "acme", "metric": "projects", "amount": 2}))
        .await;
    assert_eq!(r.status(), 200, "after a release there is room for two");
    let r = app
        .post(
            "/v1/usage",
            &json!({"org_id": "acme", "metric": "projects", "amount": -10}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let usage = json(app.get("/v1/orgs/acme/usage").await).await;
    let projects = usage_entry(&usage, "metric", "projects");
    assert_eq!(projects["current"], 0);
    assert_eq!(projects["kind"], "gauge");

    // A gauge is a level, not a monthly count: a new month does not reset it.
    let r = app
        .check(json!({"org_id": "acme", "metric": "projects", "amount": 3}))
        .await;
    assert_eq!(r.status(), 200);
    app.clock.advance(chrono::Duration::days(40));
    let r = app
        .check(json!({"org_id": "acme", "metric": "projects"}))
        .await;
    assert_eq!(r.status(), 402);
}

#[tokio::test]
async fn changing_plan_keeps_usage() {
    let app = spawn_app().await;
    for _ in 0..2 {
        app.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
            .await;
        app.clock.advance(chrono::Duration::seconds(1));
    }
    assert_eq!(
        app.check(json!({"org_id": "acme", "metric": "requests"}))
            .await
            .status(),
        402
    );
    app.set_plan("acme", "pro").await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["plan"]["id"], "pro");
    assert_eq!(body["usage"][0]["current"], 21);
    assert_eq!(body["usage"][0]["limit"], 1000);
    app.set_plan("acme", "free").await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests"}))
        .await;
    assert_eq!(
        r.status(),
        402,
        "back on Free, the same usage is over the limit"
    );
}

#[tokio::test]
async fn metrics_without_a_quota_are_unlimited_but_metered() {
    let app = spawn_app().await;
    app.set_plan("acme", "pro").await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "tokens", "amount": 5000}))
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("ratelimit-policy").is_none(),
        "no limit applied"
    );
    let body = json(r).await;
    assert_eq!(body["usage"][0]["unlimited"], true);
    assert!(body["usage"][0]["limit"].is_null());
    assert_eq!(body["usage"][0]["current"], 5000);
    let keys = app.redis_keys().await;
    assert!(
        keys.iter().any(|k| k.contains(":c:tokens:month:")),
        "{keys:?}"
    );
}
