//! Durable usage: counters flushed to Postgres exactly, through concurrent replicas, Postgres
//! outages, Redis data loss and shutdown; past months served from Postgres and exported.

use std::process::Command;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{TestApp, TestOptions, json, spawn_app, spawn_app_with, usage_entry};

const QUOTA_50: &str = r#"
default_plan = "free"
[metrics]
requests = { unit = "request" }
seats = { unit = "seat", kind = "gauge" }
[plans.free]
upgrade_to = "pro"
quotas = { requests = { limit = 50, period = "month" }, seats = { limit = 10 } }
[plans.pro]
quotas = { requests = { limit = 1000, period = "month" } }
"#;

async fn quota_app() -> TestApp {
    spawn_app_with(TestOptions {
        plans: QUOTA_50.into(),
        ..Default::default()
    })
    .await
}

fn check() -> serde_json::Value {
    json!({"org_id": "acme", "metric": "requests"})
}

#[tokio::test]
async fn concurrent_checks_on_two_replicas_end_up_exactly_in_postgres() {
    let a = quota_app().await;
    let b = a.spawn_peer().await;
    let responses = join_all((0..100).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.check(check())
    }))
    .await;
    let admitted = responses.iter().filter(|r| r.status() == 200).count() as i64;
    assert_eq!(admitted, 50);
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(a.stored_usage("acme", "requests").await, Some(admitted));
}

#[tokio::test]
async fn two_flushers_at_once_stay_exact_and_never_go_backwards() {
    let a = quota_app().await;
    let b = a.spawn_peer().await;
    let mut last = 0;
    for round in 0..8 {
        join_all((0..3).map(|i| if i % 2 == 0 { &a } else { &b }.check(check()))).await;
        if round == 4 {
            // A credit lowers the counter: a newer, lower value must still land.
            a.admin(
                reqwest::Method::POST,
                "/admin/orgs/acme/adjustments",
                Some(&json!({"metric": "requests", "amount": -2, "reason": "credit"})),
            )
            .await;
        }
        let (ra, rb) = tokio::join!(a.flush(), b.flush());
        ra.unwrap();
        rb.unwrap();
        let stored = a.stored_usage("acme", "requests").await.unwrap();
        let live = json(a.get("/v1/orgs/acme/usage").await).await;
        assert_eq!(
            stored,
            usage_entry(&live, "metric", "requests")["current"]
                .as_i64()
                .unwrap()
        );
        if round != 4 {
            assert!(stored >= last, "round {round}: {stored} < {last}");
        }
        last = stored;
    }
    assert_eq!(last, 8 * 3 - 2);
}

#[tokio::test]
async fn a_postgres_outage_delays_flushes_but_loses_nothing() {
    let app = spawn_app_with(TestOptions {
        plans: QUOTA_50.into(),
        postgres_proxy: true,
        ..Default::default()
    })
    .await;
    let pg = app.pg_proxy.clone().unwrap();
    for _ in 0..5 {
        assert_eq!(app.check(check()).await.status(), 200);
    }
    pg.cut();
    assert!(app.flush().await.is_err(), "Postgres is unreachable");
    // Decisions go on (the org is cached) and keep counting.
    for _ in 0..5 {
        assert_eq!(app.check(check()).await.status(), 200);
    }
    assert!(app.flush().await.is_err());
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("quota_gateway_flush_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    // Ours, plus the background flusher if its turn came while Postgres was cut.
    assert!(failures >= 2.0, "{metrics}");
    pg.restore();
    let mut flushed = false;
    for _ in 0..50 {
        if app.flush().await.is_ok() {
            flushed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(flushed, "the flush succeeds once Postgres is back");
    assert_eq!(app.stored_usage("acme", "requests").await, Some(10));
}

#[tokio::test]
async fn after_a_redis_loss_the_next_decision_restores_from_postgres() {
    let app = quota_app().await;
    for _ in 0..5 {
        app.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
            .await;
    }
    app.check(json!({"org_id": "acme", "metric": "seats", "amount": 4}))
        .await;
    assert_eq!(app.check(check()).await.status(), 402, "at the limit");
    app.flush().await.unwrap();

    // Redis loses everything of this gateway (a restart without persistence, a failover).
    app.lose_redis().await;
    let view = json(app.get("/v1/orgs/acme/usage").await).await;
    assert_eq!(
        usage_entry(&view, "metric", "requests")["current"],
        50,
        "the usage view restores too"
    );
    let r = app.check(check()).await;
    assert_eq!(r.status(), 402, "still at the limit after the loss");
    assert_eq!(json(r).await["quota"]["current"], 50);
    let r = app
        .check(json!({"org_id": "acme", "metric": "seats", "amount": 7}))
        .await;
    assert_eq!(
        r.status(),
        402,
        "the gauge level came back too (4 + 7 > 10)"
    );

    app.set_plan("acme", "pro").await;
    let r = app.check(check()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        json(r).await["usage"][0]["current"],
        51,
        "counting continues from the restored value"
    );
    app.flush().await.unwrap();
    assert_eq!(app.stored_usage("acme", "requests").await, Some(51));
}

#[tokio::test]
async fn a_graceful_stop_flushes_everything_counted_before_it() {
    let app = quota_app().await;
    let pool = app.pool.clone();
    let month = quota_gateway::domain::period::calendar_month(app.clock_now()).start;
    for _ in 0..7 {
        assert_eq!(app.check(check()).await.status(), 200);
    }
    app.post(
        "/v1/usage",
        &json!({"org_id": "globex", "metric": "requests", "amount": 3}),
    )
    .await;
    let _kept = app.shutdown().await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT org_id, quantity FROM usage_counters WHERE metric = 'requests' AND period_start = $1 ORDER BY org_id",
    )
    .bind(month)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows, [("acme".to_string(), 7), ("globex".to_string(), 3)]);
}

#[tokio::test]
async fn past_months_are_served_from_postgres_and_exported() {
    let app = spawn_app().await;
    app.set_plan("acme", "free").await;
    sqlx::query(
        "INSERT INTO usage_counters (org_id, metric, period_start, quantity, version) VALUES \
         ('acme', 'requests', '2026-10-01T00:00:00Z', 17, 17), \
         ('acme', 'tokens', '2026-10-01T00:00:00Z', 900, 3), \
         ('globex', 'requests', '2026-10-01T00:00:00Z', 5, 5), \
         ('acme', 'requests', '2026-09-01T00:00:00Z', 1, 1)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let r = app.get("/v1/orgs/acme/usage?period=2026-10").await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["period"], "2026-10");
    let requests = usage_entry(&body, "metric", "requests");
    assert_eq!(requests["current"], 17);
    assert_eq!(requests["limit"], 20);
    assert_eq!(requests["remaining"], 3);
    assert_eq!(requests["resets_at"], "2026-11-01T00:00:00Z");
    assert_eq!(usage_entry(&body, "metric", "tokens")["current"], 900);
    assert_eq!(usage_entry(&body, "metric", "projects")["current"], 0);
    let bad = app.get("/v1/orgs/acme/usage?period=October").await;
    assert_eq!(bad.status(), 422);
    let bad = app.get("/v1/orgs/acme/usage?month=2026-10").await;
    assert_eq!(bad.status(), 422);

    // The export command, run as billing would, against this test's database.
    let dir = std::env::temp_dir().join(format!("qg-export-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plans.toml"), crate::helpers::PLANS).unwrap();
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:0\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n[database]\nurl = \"{}\"\n",
            app.db_url
        ),
    )
    .unwrap();
    let export = |period: &str, format: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_quota-gateway"))
            .args(["export", "--period", period, "--format", format, "--config"])
            .arg(dir.join("gateway.toml"))
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let run = |format: &str| export("2026-10", format).0;
    // A summary on stderr (stdout stays the export alone); an empty month says so.
    let (_, summary) = export("2026-10", "csv");
    assert!(
        summary.contains("2026-10: 3 rows, 2 orgs, 922 units in all"),
        "{summary}"
    );
    let (empty, said) = export("2025-01", "csv");
    assert_eq!(empty, "org_id,metric,period_start,quantity\n");
    assert!(said.contains("2025-01: no usage recorded"), "{said}");
    assert_eq!(
        run("csv"),
        "org_id,metric,period_start,quantity\n\
         acme,requests,2026-10-01T00:00:00Z,17\n\
         acme,tokens,2026-10-01T00:00:00Z,900\n\
         globex,requests,2026-10-01T00:00:00Z,5\n"
    );
    let exported: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    assert_eq!(exported.as_array().unwrap().len(), 3);
    assert_eq!(
        exported[2],
        json!({"org_id": "globex", "metric": "requests", "period_start": "2026-10-01T00:00:00Z", "quantity": 5})
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn counters_of_a_replica_that_died_before_flushing_are_found_by_reconciliation() {
    let a = quota_app().await;
    let b = a.spawn_peer().await;
    // B's own start-up scan must be behind it, or it would find A's counts itself.
    let scanned = crate::helpers::eventually(std::time::Duration::from_secs(20), || async {
        crate::helpers::metric_value(&b, "quota_gateway_flush_reconciliations_total").await >= 1.0
    })
    .await;
    assert!(scanned.is_some(), "B's start-up reconciliation ran");
    for _ in 0..6 {
        assert_eq!(a.check(check()).await.status(), 200);
    }
    // Replica A dies: what it remembered to flush is gone, the counts are still in Redis.
    let _ = a.state.quota.store().dirty().take();
    assert_eq!(
        b.flush().await.unwrap().keys,
        0,
        "B never touched the counter"
    );
    // Nothing reached Postgres before reconciliation (A's own flusher did not get there first).
    assert_eq!(b.stored_usage("acme", "requests").await, None);
    let seeds =
        crate::helpers::cluster_seeds().unwrap_or_else(|| vec![crate::helpers::test_redis_url()]);
    let marked = quota_gateway::flush::reconcile(b.state.quota.store(), &seeds)
        .await
        .unwrap();
    assert!(marked >= 1);
    b.flush().await.unwrap();
    assert_eq!(b.stored_usage("acme", "requests").await, Some(6));
}

/// The first instant of the month after the one `app`'s clock is in.
fn next_month(app: &TestApp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(&crate::helpers::next_month_start(app.clock_now()))
        .unwrap()
        .to_utc()
}

/// Three requests and four seats in the last seconds of a month, flushed; the clock stays
/// there. Returns the first instant of the next month.
async fn used_until_month_end(app: &TestApp) -> chrono::DateTime<chrono::Utc> {
    let boundary = next_month(app);
    app.clock.set(boundary - chrono::Duration::seconds(30));
    for _ in 0..3 {
        assert_eq!(app.check(check()).await.status(), 200);
    }
    let seats = json!({"org_id": "acme", "metric": "seats", "amount": 4});
    assert_eq!(app.check(seats).await.status(), 200);
    app.flush().await.unwrap();
    assert_eq!(app.stored_usage("acme", "requests").await, Some(3));
    boundary
}

async fn flush_when_postgres_is_back(app: &TestApp) {
    let flushed = crate::helpers::eventually(Duration::from_secs(10), || async {
        app.flush().await.is_ok()
    })
    .await;
    assert!(
        flushed.is_some(),
        "the flush succeeds once Postgres is back"
    );
}

#[tokio::test]
async fn a_new_month_begins_without_postgres_while_redis_kept_its_data() {
    let app = spawn_app_with(TestOptions {
        plans: QUOTA_50.into(),
        postgres_proxy: true,
        ..Default::default()
    })
    .await;
    let boundary = used_until_month_end(&app).await;
    let pg = app.pg_proxy.clone().unwrap();
    pg.cut();
    app.clock.set(boundary + chrono::Duration::seconds(1));

    // The usage view first: nothing has been decided in the new month yet.
    let r = app.get("/v1/orgs/acme/usage").await;
    assert_eq!(r.status(), 200, "the usage view needs no Postgres");
    let view = json(r).await;
    assert_eq!(usage_entry(&view, "metric", "requests")["current"], 0);
    assert_eq!(usage_entry(&view, "metric", "seats")["current"], 4);
    for i in 1..=4 {
        let r = app.check(check()).await;
        assert_eq!(r.status(), 200, "decision {i} of the new month");
        assert_eq!(
            json(r).await["usage"][0]["current"],
            i,
            "the new month counts from zero"
        );
    }
    let r = app
        .check(json!({"org_id": "acme", "metric": "seats", "amount": 7}))
        .await;
    assert_eq!(r.status(), 402, "the gauge level carries over (4 + 7 > 10)");
    let r = app
        .check(json!({"org_id": "acme", "metric": "seats", "amount": 6}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app.get("/v1/orgs/acme/usage").await;
    assert_eq!(r.status(), 200);
    let view = json(r).await;
    assert_eq!(usage_entry(&view, "metric", "requests")["current"], 4);
    assert_eq!(usage_entry(&view, "metric", "seats")["current"], 10);
    assert!(app.flush().await.is_err(), "Postgres is still unreachable");

    pg.restore();
    flush_when_postgres_is_back(&app).await;
    assert_eq!(app.stored_usage("acme", "requests").await, Some(4));
    let seats: i64 = sqlx::query_scalar(
        "SELECT quantity FROM usage_counters WHERE org_id = 'acme' AND metric = 'seats' \
         AND period_start = $1",
    )
    .bind(boundary)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(seats, 10);
    let last_month: i64 = sqlx::query_scalar(
        "SELECT quantity FROM usage_counters WHERE org_id = 'acme' AND metric = 'requests' \
         AND period_start < $1",
    )
    .bind(boundary)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(last_month, 3, "the month before keeps its own count");
}

#[tokio::test]
async fn a_redis_that_lost_its_data_restores_at_a_new_month_once_postgres_answers() {
    let app = spawn_app_with(TestOptions {
        plans: QUOTA_50.into(),
        postgres_proxy: true,
        ..Default::default()
    })
    .await;
    let boundary = used_until_month_end(&app).await;
    // Redis loses everything of this gateway (a restart without persistence, a failover).
    app.lose_redis().await;
    let pg = app.pg_proxy.clone().unwrap();
    pg.cut();
    app.clock.set(boundary + chrono::Duration::seconds(1));

    let seats = json!({"org_id": "acme", "metric": "seats", "amount": 7});
    assert_eq!(
        app.check(seats.clone()).await.status(),
        503,
        "without the restore the gauge would restart at zero"
    );
    assert_eq!(app.check(check()).await.status(), 503);
    assert_eq!(app.get("/v1/orgs/acme/usage").await.status(), 503);
    assert!(
        app.usage_keys().await.is_empty(),
        "nothing was counted without the restore"
    );

    pg.restore();
    let restored = crate::helpers::eventually(Duration::from_secs(10), || async {
        app.check(seats.clone()).await.status() != 503
    })
    .await;
    assert!(restored.is_some(), "decisions resume once Postgres is back");
    let r = app.check(seats).await;
    assert_eq!(r.status(), 402, "the gauge level was restored (4 + 7 > 10)");
    let r = app.check(check()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["usage"][0]["current"], 1);
    flush_when_postgres_is_back(&app).await;
    assert_eq!(app.stored_usage("acme", "requests").await, Some(1));
}

#[tokio::test]
async fn the_ledger_keeps_the_newest_version_and_quantity_and_never_goes_backwards() {
    // decide.lua moves a durable key's version only when its value goes down, so between two
    // moves reads are ordered by quantity alone: (version, quantity) decides which read is newer.
    use quota_gateway::db::usage::{CounterRow, upsert};
    let app = spawn_app().await;
    let row = |quantity, version| CounterRow {
        org_id: "acme".into(),
        metric: "requests".into(),
        period_start: "2026-10-01T00:00:00Z".parse().unwrap(),
        quantity,
        version,
        gauge: false,
    };
    let stored = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT quantity, version FROM usage_counters WHERE org_id = 'acme'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    assert_eq!(upsert(&app.pool, &[row(5, 0)]).await.unwrap(), 1);
    assert_eq!(
        upsert(&app.pool, &[row(7, 0)]).await.unwrap(),
        1,
        "more usage, same version"
    );
    assert_eq!(
        upsert(&app.pool, &[row(6, 0)]).await.unwrap(),
        0,
        "an older read"
    );
    assert_eq!(
        upsert(&app.pool, &[row(7, 0)]).await.unwrap(),
        0,
        "the same read again"
    );
    assert_eq!(stored().await, (7, 0));
    assert_eq!(
        upsert(&app.pool, &[row(4, 1)]).await.unwrap(),
        1,
        "a refund moved the version"
    );
    assert_eq!(
        upsert(&app.pool, &[row(7, 0)]).await.unwrap(),
        0,
        "a read from before it"
    );
    assert_eq!(stored().await, (4, 1));
}
