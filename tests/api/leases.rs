//! Leases (`[leases] enabled`): replicas admit from blocks reserved in Redis. However many
//! replicas and however they interleave, admitted units never pass a hard limit; once the blocks
//! are settled, Redis and the ledger hold exactly what was admitted, and what was reserved but
//! not spent is back in the limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{TestApp, TestOptions, metric_value, spawn_app_with};

fn leases_on() -> quota_gateway::config::LeaseSettings {
    quota_gateway::config::LeaseSettings {
        enabled: true,
        ttl: Duration::from_secs(1),
        max_block: 100,
        checkpoint: true,
    }
}

/// The units the lease hash of the org's month counter holds for all holders.
async fn reserved_in_redis(app: &TestApp, org: &str) -> i64 {
    let start = quota_gateway::domain::period::calendar_month(app.clock_now())
        .start
        .timestamp();
    let hash = format!("{}:{{{org}}}:c:requests:month:{start}:l", app.prefix);
    let mut conn = app.redis.clone();
    let values: Vec<String> = redis::cmd("HVALS")
        .arg(&hash)
        .query_async(&mut conn)
        .await
        .unwrap();
    values
        .iter()
        .map(|v| v.split(':').next().unwrap().parse::<i64>().unwrap())
        .sum()
}

fn plans(quota: i64, rate: Option<(i64, &str)>) -> String {
    let rates = rate.map_or(String::new(), |(limit, window)| {
        format!("rates = {{ requests = {{ limit = {limit}, window = \"{window}\" }} }}\n")
    });
    format!(
        "default_plan = \"metered\"\nupgrade_url = \"https://example.com/up\"\n\
         [metrics]\nrequests = {{ unit = \"request\" }}\n\
         [plans.metered]\nupgrade_to = \"big\"\n\
         quotas = {{ requests = {{ limit = {quota}, period = \"month\" }} }}\n{rates}\
         [plans.big]\nquotas = {{ requests = {{ limit = 100000, period = \"month\" }} }}\n\
         [plans.small]\nquotas = {{ requests = {{ limit = 10, period = \"month\" }} }}\n"
    )
}

async fn spawn(plans: String) -> TestApp {
    spawn_app_with(TestOptions {
        plans,
        leases: leases_on(),
        ..Default::default()
    })
    .await
}

/// The org's calendar-month counter in Redis.
async fn month_counter(app: &TestApp, org: &str) -> i64 {
    let start = quota_gateway::domain::period::calendar_month(app.clock_now())
        .start
        .timestamp();
    let key = format!("{}:{{{org}}}:c:requests:month:{start}", app.prefix);
    app.redis_get(&key)
        .await
        .map_or(0, |v| v.parse().expect("an integer counter"))
}

/// `n` checks of one `requests` each, every one admitted.
async fn admit(app: &TestApp, org: &str, n: usize) {
    for _ in 0..n {
        let r = app
            .check(json!({ "org_id": org, "metric": "requests" }))
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

/// One series summed over replicas.
async fn sum_over(apps: &[&TestApp], series: &str) -> f64 {
    let mut total = 0.0;
    for app in apps {
        total += metric_value(app, series).await;
    }
    total
}

/// Settle every block of every replica, as graceful shutdown does.
async fn settle_all(apps: &[&TestApp]) {
    for app in apps {
        app.state.quota.settle_leases(true).await;
    }
}

/// `n` clients per replica, each checking random amounts (1..=max) until told no `stop_after`
/// times in a row. Returns the units admitted.
async fn hammer(apps: &[&TestApp], org: &str, clients: usize, max: i64) -> i64 {
    let admitted = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        for c in 0..clients {
            let url = app.url("/v1/check");
            let client = app.client.clone();
            let admitted = admitted.clone();
            let org = org.to_string();
            tasks.push(tokio::spawn(async move {
                let mut denials = 0;
                let mut n = (i * 31 + c * 7) as i64;
                while denials < 5 {
                    n = (n * 1103515245 + 12345) % 2147483648;
                    let amount = 1 + n % max;
                    let r = client
                        .post(&url)
                        .json(&json!({ "org_id": org, "metric": "requests", "amount": amount }))
                        .send()
                        .await
                        .expect("request");
                    match r.status().as_u16() {
                        200 => {
                            admitted.fetch_add(amount, Ordering::Relaxed);
                            denials = 0;
                        }
                        402 | 429 => denials += 1,
                        other => panic!("unexpected status {other}: {}", r.text().await.unwrap()),
                    }
                }
            }));
        }
    }
    for t in join_all(tasks).await {
        t.unwrap();
    }
    admitted.load(Ordering::Relaxed)
}

/// After the blocks are settled, what is left of the quota can still be used to the unit: one
/// replica takes it one unit at a time.
async fn take_the_rest(app: &TestApp, org: &str) -> i64 {
    let mut taken = 0;
    loop {
        let r = app
            .check(json!({ "org_id": org, "metric": "requests" }))
            .await;
        match r.status().as_u16() {
            200 => taken += 1,
            402 => return taken,
            other => panic!("unexpected status {other}"),
        }
    }
}

#[tokio::test]
async fn three_replicas_never_pass_the_quota_and_count_exactly_what_they_admitted() {
    let quota = 2000;
    let a = spawn(plans(quota, None)).await;
    let b = a.spawn_peer().await;
    let c = a.spawn_peer().await;
    let admitted = hammer(&[&a, &b, &c], "acme", 8, 7).await;
    assert!(
        admitted <= quota,
        "admitted {admitted} units against a quota of {quota}"
    );
    let local = sum_over(
        &[&a, &b, &c],
        "quota_gateway_lease_decisions_total{path=\"local\"}",
    )
    .await;
    let remote = sum_over(
        &[&a, &b, &c],
        "quota_gateway_lease_decisions_total{path=\"redis\"}",
    )
    .await;
    assert!(
        local > remote,
        "leases served {local} decisions locally and sent {remote} to Redis"
    );
    settle_all(&[&a, &b, &c]).await;
    assert_eq!(
        month_counter(&a, "acme").await,
        admitted,
        "Redis holds what was admitted once the blocks are settled"
    );
    // Nothing reserved stays lost: the rest of the quota is there, to the unit.
    let rest = take_the_rest(&b, "acme").await;
    assert_eq!(admitted + rest, quota, "admitted {admitted} + rest {rest}");
    settle_all(&[&a, &b, &c]).await;
    for app in [&a, &b, &c] {
        app.flush().await.expect("flush");
    }
    assert_eq!(a.stored_usage("acme", "requests").await, Some(quota));
    assert_eq!(a.usage_of("acme", "requests").await, quota);
    // The lease hash is empty again: every block was returned.
    let start = quota_gateway::domain::period::calendar_month(a.clock_now())
        .start
        .timestamp();
    let hash = format!("{}:{{acme}}:c:requests:month:{start}:l", a.prefix);
    let mut conn = a.redis.clone();
    let left: i64 = redis::cmd("HLEN")
        .arg(&hash)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "no lease left in {hash}");
}

#[tokio::test]
async fn rate_leases_never_pass_the_rate() {
    // The test clock stands still, so a rate of 300 a minute admits 300 in all, never more.
    let a = spawn(plans(1_000_000, Some((300, "1m")))).await;
    let b = a.spawn_peer().await;
    let admitted = hammer(&[&a, &b], "acme", 6, 3).await;
    assert!(admitted <= 300, "admitted {admitted} against a rate of 300");
    settle_all(&[&a, &b]).await;
    let mut rest = 0;
    loop {
        let r = a
            .check(json!({ "org_id": "acme", "metric": "requests" }))
            .await;
        match r.status().as_u16() {
            200 => rest += 1,
            429 => break,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted + rest, 300, "admitted {admitted} + rest {rest}");
    assert_eq!(month_counter(&a, "acme").await, 300);
}

#[tokio::test]
async fn usage_shows_consumed_units_not_reserved_ones() {
    let a = spawn(plans(1000, None)).await;
    admit(&a, "acme", 5).await;
    // The first check took a block; the usage view does not count it as usage.
    let seen = a.usage_of("acme", "requests").await;
    assert!(seen <= 5, "usage shows {seen} before the blocks settle");
    settle_all(&[&a]).await;
    assert_eq!(a.usage_of("acme", "requests").await, 5);
    assert!(metric_value(&a, "quota_gateway_lease_decisions_total{path=\"local\"}").await >= 4.0);
}

#[tokio::test]
async fn blocks_settle_on_their_own_within_the_lease_ttl() {
    let a = spawn(plans(1000, None)).await;
    admit(&a, "acme", 7).await;
    // No call from the test: the settler returns the block after `ttl`.
    let settled = crate::helpers::eventually(Duration::from_secs(5), || async {
        month_counter(&a, "acme").await == 7
    })
    .await;
    assert!(settled.is_some(), "the counter reached 7 within 5 s");
    assert!(metric_value(&a, "quota_gateway_lease_settlements_total").await >= 1.0);
}

/// A checkpoint settles what a block consumed while the replica keeps the rest of it: a replica
/// killed later loses only what it admitted since. The lease ttl is long here, so nothing but
/// a checkpoint can move the counter within the test.
#[tokio::test]
async fn checkpoints_settle_consumed_units_and_keep_the_block() {
    let long = |checkpoint| quota_gateway::config::LeaseSettings {
        ttl: Duration::from_secs(30),
        checkpoint,
        ..leases_on()
    };
    let a = spawn_app_with(TestOptions {
        plans: plans(1000, None),
        leases: long(true),
        ..Default::default()
    })
    .await;
    admit(&a, "acme", 7).await;
    let block = reserved_in_redis(&a, "acme").await;
    assert!(block > 7, "a block of {block} units was taken");
    // The settler checkpoints within a quarter ttl (7.5 s).
    let settled = crate::helpers::eventually(Duration::from_secs(10), || async {
        month_counter(&a, "acme").await == 7
    })
    .await;
    assert!(settled.is_some(), "the counter reached 7 within 10 s");
    assert_eq!(
        reserved_in_redis(&a, "acme").await,
        block - 6,
        "the block keeps its unconsumed units (the first check was decided in Redis, 6 from the block)"
    );
    // ...and is still used: the next checks are admitted here without Redis.
    let local = "quota_gateway_lease_decisions_total{path=\"local\"}";
    let before = metric_value(&a, local).await;
    admit(&a, "acme", 3).await;
    assert_eq!(metric_value(&a, local).await, before + 3.0);
    settle_all(&[&a]).await;
    assert_eq!(month_counter(&a, "acme").await, 10);
    assert_eq!(reserved_in_redis(&a, "acme").await, 0);

    // Without checkpoints the block's usage waits for its expiry (or a refill).
    let b = spawn_app_with(TestOptions {
        plans: plans(1000, None),
        leases: long(false),
        ..Default::default()
    })
    .await;
    admit(&b, "acme", 7).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        month_counter(&b, "acme").await,
        1,
        "only the check that took the block is counted"
    );
    settle_all(&[&b]).await;
    assert_eq!(month_counter(&b, "acme").await, 7);
}

#[tokio::test]
async fn a_dead_replicas_lease_returns_to_the_limit_when_it_expires() {
    let a = spawn(plans(100, None)).await;
    // A replica that died holding 90 of the 100 units (its lease ends one second from now).
    let start = quota_gateway::domain::period::calendar_month(a.clock_now())
        .start
        .timestamp();
    let hash = format!("{}:{{acme}}:c:requests:month:{start}:l", a.prefix);
    let expiry = a.clock_now().timestamp_micros() + 1_000_000;
    let mut conn = a.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg("dead-replica")
        .arg(format!("90:{expiry}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    // While it lives, only 10 units are left.
    let r = a
        .check(json!({ "org_id": "acme", "metric": "requests", "amount": 11 }))
        .await;
    assert_eq!(r.status(), 402);
    assert!(metric_value(&a, "quota_gateway_lease_underadmissions_total").await >= 1.0);
    // Once it expires, the first decision returns its units.
    a.clock.advance(chrono::Duration::seconds(2));
    let r = a
        .check(json!({ "org_id": "acme", "metric": "requests", "amount": 60 }))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        metric_value(&a, "quota_gateway_lease_swept_units_total").await,
        90.0
    );
    settle_all(&[&a]).await;
    assert_eq!(month_counter(&a, "acme").await, 60);
}

#[tokio::test]
async fn a_plan_change_ends_the_lease_and_the_new_limit_holds() {
    let a = spawn(plans(1000, None)).await;
    let b = a.spawn_peer().await;
    for app in [&a, &b] {
        admit(app, "acme", 3).await;
    }
    a.set_plan("acme", "small").await;
    // Both replicas hear of it (pub/sub, well within this); their blocks were taken under the
    // old limit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admitted = hammer(&[&a, &b], "acme", 4, 2).await;
    settle_all(&[&a, &b]).await;
    let total = month_counter(&a, "acme").await;
    assert_eq!(total, 6 + admitted, "Redis holds every admitted unit");
    assert!(
        total <= 10,
        "{total} units counted under a plan of 10 (6 before the change)"
    );
}

#[tokio::test]
async fn a_block_taken_in_one_month_settles_into_that_month() {
    let a = spawn(plans(1000, None)).await;
    admit(&a, "acme", 4).await;
    let first = quota_gateway::domain::period::calendar_month(a.clock_now()).start;
    let next = quota_gateway::domain::period::calendar_month(a.clock_now()).end;
    a.clock.set(next + chrono::Duration::seconds(1));
    admit(&a, "acme", 2).await;
    settle_all(&[&a]).await;
    let key = |t: chrono::DateTime<chrono::Utc>| {
        format!("{}:{{acme}}:c:requests:month:{}", a.prefix, t.timestamp())
    };
    assert_eq!(a.redis_get(&key(first)).await.as_deref(), Some("4"));
    assert_eq!(a.redis_get(&key(next)).await.as_deref(), Some("2"));
}

#[tokio::test]
async fn shadow_mode_and_idempotent_checks_take_no_blocks() {
    let a = spawn_app_with(TestOptions {
        plans: plans(5, None),
        leases: leases_on(),
        shadow: true,
        ..Default::default()
    })
    .await;
    // Shadow mode never blocks.
    admit(&a, "acme", 8).await;
    assert_eq!(month_counter(&a, "acme").await, 8, "counted at once");
    assert_eq!(
        metric_value(&a, "quota_gateway_lease_decisions_total{path=\"local\"}").await,
        0.0
    );
}

#[tokio::test]
async fn through_the_proxy_blocks_count_refunds_and_headers_stay_conservative() {
    let up = crate::helpers::spawn_upstream().await;
    let a = spawn_app_with(TestOptions {
        plans: plans(1000, None),
        leases: leases_on(),
        proxy: Some(crate::helpers::proxy_settings(up.addr)),
        ..Default::default()
    })
    .await;
    let (_, key) = a.create_key("acme").await;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = a.proxy_get("/x", &key).await;
        assert_eq!(r.status(), 200);
        let header = r.headers()["ratelimit"].to_str().unwrap().to_string();
        let left: i64 = header
            .split(";r=")
            .nth(1)
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no remaining in {header}"));
        remaining.push(left);
    }
    // Each answer says what is left to this replica, one less each time, never more than
    // the quota minus what it admitted.
    assert!(remaining[0] <= 999, "{remaining:?}");
    assert_eq!(remaining[1], remaining[0] - 1, "{remaining:?}");
    assert_eq!(remaining[2], remaining[1] - 1, "{remaining:?}");
    // Refunded (5xx) requests are taken back from the block, not lost to a clamp at zero.
    for _ in 0..2 {
        assert_eq!(a.proxy_get("/status/503", &key).await.status(), 503);
    }
    assert_eq!(a.proxy_get("/status/404", &key).await.status(), 404);
    assert!(metric_value(&a, "quota_gateway_lease_decisions_total{path=\"local\"}").await >= 4.0);
    settle_all(&[&a]).await;
    assert_eq!(month_counter(&a, "acme").await, 4, "3 served + one 404");
    a.flush().await.expect("flush");
    assert_eq!(a.stored_usage("acme", "requests").await, Some(4));
}

#[tokio::test]
async fn a_plan_or_a_metric_with_leases_off_never_takes_a_block() {
    let plans = "default_plan = \"leased\"\n\
         [metrics]\nrequests = { unit = \"request\" }\ntokens = { unit = \"token\", leases = false }\n\
         [plans.leased]\nquotas = { requests = { limit = 100000, period = \"month\" }, tokens = { limit = 100000, period = \"month\" } }\n\
         [plans.exact]\nleases = false\nquotas = { requests = { limit = 40, period = \"month\" } }\n"
        .to_string();
    let a = spawn(plans).await;
    let b = a.spawn_peer().await;
    let local = "quota_gateway_lease_decisions_total{path=\"local\"}";
    async fn check(app: &TestApp, org: &str, metric: &str) -> u16 {
        app.check(json!({ "org_id": org, "metric": metric }))
            .await
            .status()
            .as_u16()
    }
    // The leased plan admits from blocks.
    for _ in 0..20 {
        assert_eq!(check(&a, "lv-leased", "requests").await, 200);
    }
    let served_locally = metric_value(&a, local).await;
    assert!(served_locally > 0.0, "the leased plan never used a block");
    assert!(reserved_in_redis(&a, "lv-leased").await > 0);

    // A metric with leases = false: every decision charging it goes to Redis.
    for _ in 0..20 {
        assert_eq!(check(&a, "lv-leased", "tokens").await, 200);
    }
    assert_eq!(metric_value(&a, local).await, served_locally);

    // A plan with leases = false: no block, and its quota is exact over two replicas.
    a.set_plan("lv-exact", "exact").await;
    let statuses =
        join_all((0..60).map(|i| check(if i % 2 == 0 { &a } else { &b }, "lv-exact", "requests")))
            .await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 40);
    assert!(statuses.iter().all(|s| *s == 200 || *s == 402));
    assert_eq!(reserved_in_redis(&a, "lv-exact").await, 0);
    assert_eq!(month_counter(&a, "lv-exact").await, 40);
    assert_eq!(metric_value(&a, local).await, served_locally);
    assert_eq!(metric_value(&b, local).await, 0.0);
}
