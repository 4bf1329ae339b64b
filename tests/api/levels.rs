//! Per-key and per-user limits (`per = "key"`, `per = "user"`, a key's own quotas): checked and
//! charged with the org's own limits in one decision, exact under concurrency across replicas,
//! named in denials, readable per level, and never mistaken for the org's billed usage.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, TestOptions, eventually, json, proxy_settings, spawn_app_with, spawn_upstream,
};

const PLANS: &str = r#"
default_plan = "team"
upgrade_url = "https://example.com/up"
[metrics]
requests = { unit = "request" }
tokens = { unit = "token" }
[plans.team]
upgrade_to = "big"
quotas.requests = [
  { limit = 100000, period = "month" },
  { limit = 20, period = "month", per = "key" },
]
quotas.tokens = [
  { limit = 100000, period = "month" },
  { limit = 100, period = "day", per = "user" },
]
[plans.big]
quotas.requests = [
  { limit = 100000, period = "month" },
  { limit = 200, period = "month", per = "key" },
]
"#;

fn month_start(app: &TestApp) -> i64 {
    quota_gateway::domain::period::calendar_month(app.clock_now())
        .start
        .timestamp()
}

async fn redis_int(app: &TestApp, key: &str) -> i64 {
    let mut conn = app.redis.clone();
    let v: Option<i64> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    v.unwrap_or(0)
}

async fn proxied_app() -> (TestApp, crate::helpers::TestUpstream) {
    let upstream = spawn_upstream().await;
    let mut proxy = proxy_settings(upstream.addr);
    proxy.identity.user_header = Some(http::HeaderName::from_static("x-end-user-id"));
    let app = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        proxy: Some(proxy),
        ..Default::default()
    })
    .await;
    (app, upstream)
}

#[tokio::test]
async fn each_key_gets_exactly_its_quota_across_two_replicas() {
    let (a, upstream) = proxied_app().await;
    let b = a.spawn_peer().await;
    let org = "lv-keys";
    let (id1, key1) = a.create_key(org).await;
    let (id2, key2) = a.create_key(org).await;
    // 40 requests per key at once, alternating replicas: the per-key quota is 20.
    let sends = (0..80).map(|i| {
        let (app, key) = match i % 4 {
            0 => (&a, &key1),
            1 => (&b, &key1),
            2 => (&a, &key2),
            _ => (&b, &key2),
        };
        let url = app.proxy_url("/work");
        let client = app.client.clone();
        let key = key.clone();
        async move {
            let r = client.get(url).bearer_auth(&key).send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = if status == 200 {
                Value::Null
            } else {
                r.json().await.unwrap()
            };
            (key, status, body)
        }
    });
    let results = join_all(sends).await;
    for (id, key) in [(&id1, &key1), (&id2, &key2)] {
        let mine: Vec<_> = results.iter().filter(|(k, ..)| k == key).collect();
        let ok = mine.iter().filter(|(_, s, _)| *s == 200).count();
        assert_eq!(ok, 20, "key {id}: admitted");
        for (_, status, body) in mine.iter().filter(|(_, s, _)| *s != 200) {
            assert_eq!(*status, 402, "{body}");
            assert_eq!(body["error"], "quota_exceeded");
            assert_eq!(body["scope"], "key");
            assert_eq!(body["key_id"], id.as_str());
            assert_eq!(body["quota"]["limit"], 20);
            // The next plan's per-key quota, not its org quota.
            assert_eq!(body["upgrade"]["limit"], 200);
            assert!(
                body["message"].as_str().unwrap().contains("API key"),
                "{body}"
            );
        }
        let counter = format!(
            "{}:{{{org}}}:lk:{id}:c:requests:month:{}",
            a.prefix,
            month_start(&a)
        );
        assert_eq!(redis_int(&a, &counter).await, 20, "{counter}");
    }
    assert_eq!(upstream.count(), 40, "requests that reached the upstream");
    // The org is billed for what it was admitted, once; the per-key counters are limits, not
    // ledger rows.
    assert_eq!(a.usage_of(org, "requests").await, 40);
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(a.stored_usage(org, "requests").await, Some(40));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_counters WHERE org_id = $1")
        .bind(org)
        .fetch_one(&a.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "one ledger row: the org's meter");
    // Per-key usage reads.
    let v = json(a.get(&format!("/v1/orgs/{org}/usage?key_id={id1}")).await).await;
    assert_eq!(v["key_id"], id1.as_str());
    let entry = &v["usage"][0];
    assert_eq!(
        (
            &entry["metric"],
            &entry["current"],
            &entry["limit"],
            &entry["scope"]
        ),
        (&json!("requests"), &json!(20), &json!(20), &json!("key"))
    );
    // A key on the bigger plan gets that plan's per-key quota at once.
    a.set_plan(org, "big").await;
    let r = a
        .client
        .get(a.proxy_url("/work"))
        .bearer_auth(&key1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let policy = r.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(policy.contains("requests-month-key"), "{policy}");
}

#[tokio::test]
async fn each_end_user_gets_exactly_its_quota_and_settles_at_its_level() {
    let app = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        ..Default::default()
    })
    .await;
    let peer = app.spawn_peer().await;
    let org = "lv-users";
    // 30 checks of 10 tokens per user at once over two replicas; each user has 100 a day.
    let sends = (0..60).map(|i| {
        let user = if i % 2 == 0 { "ada@example.com" } else { "bob" };
        let target = if i % 3 == 0 { &app } else { &peer };
        async move {
            let r = target
                .check(json!({ "org_id": org, "metric": "tokens", "amount": 10, "user_id": user }))
                .await;
            (user, r.status().as_u16(), json(r).await)
        }
    });
    let results = join_all(sends).await;
    for user in ["ada@example.com", "bob"] {
        let mine: Vec<_> = results.iter().filter(|(u, ..)| *u == user).collect();
        assert_eq!(
            mine.iter().filter(|(_, s, _)| *s == 200).count(),
            10,
            "{user}: allowed"
        );
        for (_, status, body) in mine.iter().filter(|(_, s, _)| *s != 200) {
            assert_eq!(*status, 402);
            assert_eq!(body["scope"], "user");
            assert_eq!(body["user_id"], *user);
            assert_eq!(body["quota"]["period"], "day");
        }
    }
    assert_eq!(app.usage_of(org, "tokens").await, 200);
    let v = json(
        app.get(&format!("/v1/orgs/{org}/usage?user_id=ada%40example.com"))
            .await,
    )
    .await;
    assert_eq!(v["user_id"], "ada@example.com");
    assert_eq!(v["usage"][0]["current"], 100);
    assert_eq!(v["usage"][0]["scope"], "user");

    // Reported usage is never denied, and counts at the user's level too.
    let r = app
        .post(
            "/v1/usage",
            &json!({ "org_id": org, "metric": "tokens", "amount": 5, "user_id": "bob" }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v = json(app.get(&format!("/v1/orgs/{org}/usage?user_id=bob")).await).await;
    assert_eq!(v["usage"][0]["current"], 105);

    // A reservation charges the user's level and settles there.
    let r = app
        .post(
            "/v1/reservations",
            &json!({ "org_id": org, "charges": [{ "metric": "tokens", "amount": 80 }], "user_id": "carol" }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let id = json(r).await["id"].as_str().unwrap().to_string();
    let v = json(
        app.get(&format!("/v1/orgs/{org}/usage?user_id=carol"))
            .await,
    )
    .await;
    assert_eq!(v["usage"][0]["current"], 80);
    let r = peer
        .post(
            &format!("/v1/reservations/{id}/settle"),
            &json!({ "actual": [{ "metric": "tokens", "amount": 30 }] }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v = json(
        app.get(&format!("/v1/orgs/{org}/usage?user_id=carol"))
            .await,
    )
    .await;
    assert_eq!(v["usage"][0]["current"], 30);
    assert_eq!(app.usage_of(org, "tokens").await, 235);

    // Bad ids are named.
    for (body, field) in [
        (
            json!({ "org_id": org, "metric": "tokens", "user_id": "a b" }),
            "user_id",
        ),
        (
            json!({ "org_id": org, "metric": "tokens", "key_id": "ci" }),
            "key_id",
        ),
    ] {
        let r = app.check(body).await;
        assert_eq!(r.status(), 422);
        let v = json(r).await;
        assert!(v["message"].as_str().unwrap().starts_with(field), "{v}");
    }
    let r = app
        .get(&format!("/v1/orgs/{org}/usage?user_id=bob&period=2026-11"))
        .await;
    assert_eq!(r.status(), 422);
}

#[tokio::test]
async fn a_keys_own_quotas_reach_every_replica_and_can_be_removed() {
    let app = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        ..Default::default()
    })
    .await;
    let peer = app.spawn_peer().await;
    let org = "lv-own";
    let (id, _) = app.create_key(org).await;
    // The key's limit as a replica sees it (its usage read, which answers even when a check
    // would be denied).
    let key_limit = |app: &TestApp| {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/v1/orgs/{org}/usage?key_id={id}")),
        );
        async move {
            let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            let requests = v["usage"]
                .as_array()?
                .iter()
                .find(|u| u["metric"] == "requests")?;
            Some(requests["limit"].clone())
        }
    };
    assert_eq!(key_limit(&peer).await, Some(json!(20)));

    let path = format!("/admin/keys/{id}/limits");
    let own = json!({ "quotas": [{ "metric": "requests", "limit": 3, "period": "day" }] });
    let r = app.admin(Method::PUT, &path, Some(&own)).await;
    assert_eq!(r.status(), 200);
    let v = json(app.admin(Method::GET, &path, None).await).await;
    assert_eq!(v["org_id"], org);
    assert_eq!(v["quotas"][0]["limit"], 3);
    assert_eq!(v["quotas"][0]["overage"], "block");
    // The other replica sees them within a second (the org's change message).
    assert!(
        eventually(Duration::from_secs(2), || async {
            key_limit(&peer).await == Some(json!(3))
        })
        .await
        .is_some(),
        "the peer never applied the key's own quotas"
    );
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = peer
            .check(json!({ "org_id": org, "metric": "requests", "key_id": id }))
            .await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 402, 402]);
    // Another key of the org is not touched by this one's quotas.
    let (other, _) = app.create_key(org).await;
    let r = peer
        .check(json!({ "org_id": org, "metric": "requests", "key_id": other }))
        .await;
    assert_eq!(r.status(), 200);

    let r = app.admin(Method::DELETE, &path, None).await;
    assert_eq!(r.status(), 204);
    assert!(
        eventually(Duration::from_secs(2), || async {
            key_limit(&peer).await == Some(json!(20))
        })
        .await
        .is_some(),
        "the peer kept the removed quotas"
    );

    // Mistakes are named; unknown keys are 404.
    for (body, needle) in [
        (
            json!({ "quotas": [{ "metric": "nope", "limit": 3, "period": "day" }] }),
            "quotas[0].metric",
        ),
        (
            json!({ "quotas": [{ "metric": "requests", "limit": 0, "period": "day" }] }),
            "quotas[0].limit",
        ),
        (
            json!({ "quotas": [
                { "metric": "requests", "limit": 3, "period": "day" },
                { "metric": "requests", "limit": 4, "period": "day" },
            ] }),
            "quotas[1]",
        ),
        (
            json!({ "quotas": [{ "metric": "requests", "limit": 3, "period": "day", "overage": "maybe" }] }),
            "quotas[0].overage",
        ),
    ] {
        let r = app.admin(Method::PUT, &path, Some(&body)).await;
        assert_eq!(r.status(), 422);
        let v = json(r).await;
        assert!(v["message"].as_str().unwrap().starts_with(needle), "{v}");
    }
    let unknown = format!("/admin/keys/{}/limits", uuid::Uuid::new_v4());
    let r = app.admin(Method::PUT, &unknown, Some(&own)).await;
    assert_eq!(r.status(), 404);
    let r = app.admin(Method::GET, &unknown, None).await;
    assert_eq!(r.status(), 404);
    // Without the admin token: 401.
    let r = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn the_proxy_reads_the_end_user_from_its_header() {
    let (app, upstream) = proxied_app().await;
    let org = "lv-header";
    let (_, key) = app.create_key(org).await;
    let send = |user: &'static str| {
        let req = app
            .client
            .get(app.proxy_url("/work"))
            .bearer_auth(&key)
            .header("x-end-user-id", user);
        async move { req.send().await.unwrap() }
    };
    let r = send("not valid").await;
    assert_eq!(r.status(), 400);
    let v = json(r).await;
    assert_eq!(v["error"], "invalid_user_id");
    assert!(
        v["message"].as_str().unwrap().contains("x-end-user-id"),
        "{v}"
    );
    assert_eq!(upstream.count(), 0);
    let r = send("user-7").await;
    assert_eq!(r.status(), 200);
    // The upstream still sees who the request is for.
    assert_eq!(upstream.last().headers["x-end-user-id"], "user-7");
}

#[test]
fn per_level_limits_are_validated_with_the_catalog() {
    let text = r#"
default_plan = "p"
[metrics]
requests = { unit = "request" }
seats = { unit = "seat", kind = "gauge" }
[plans.p]
quotas.seats = { limit = 3, per = "user" }
quotas.requests = [
  { limit = 10, period = "month", per = "key" },
  { limit = 11, period = "month", per = "key" },
  { limit = 12, period = "month", per = "team" },
]
"#;
    let err = quota_gateway::config::catalog_from_str(&PathBuf::from("plans.toml"), text)
        .expect_err("invalid");
    let problems: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    let all = problems.join("\n");
    assert!(all.contains("plans.p.quotas.seats.per"), "{all}");
    assert!(
        all.contains("plans.p.quotas.requests[1]") && all.contains("same metric, period and per"),
        "{all}"
    );
    assert!(all.contains("plans.p.quotas.requests[2]"), "{all}");
}

#[tokio::test]
async fn the_rust_client_names_the_caller_and_reads_the_level_that_denied() {
    use quota_gateway_client::{Caller, Charge, Client, Error, UsageEvent};
    let app = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        ..Default::default()
    })
    .await;
    let gw = Client::builder(format!("http://{}", app.addr))
        .build()
        .unwrap();
    let org = "lv-client";
    let dora = Caller::user("dora");
    gw.check_as(org, &dora, &[Charge::new("tokens", 90)])
        .await
        .unwrap();
    gw.report(UsageEvent::new(org, "tokens", 10).caller(dora.clone()))
        .await
        .unwrap();
    match gw.check_as(org, &dora, &[Charge::new("tokens", 1)]).await {
        Err(Error::QuotaExceeded(denial)) => {
            assert_eq!(denial.scope, "user");
            assert_eq!(denial.user_id.as_deref(), Some("dora"));
        }
        other => panic!("expected the user's 402, got {other:?}"),
    }
    // The org itself, and another user, still have room.
    gw.check(org, &[Charge::new("tokens", 1)]).await.unwrap();
    gw.check_as(org, &Caller::user("eve"), &[Charge::new("tokens", 1)])
        .await
        .unwrap();
}

#[tokio::test]
async fn with_leases_a_keys_quota_is_never_passed_and_counts_what_was_admitted() {
    let leases = quota_gateway::config::LeaseSettings {
        enabled: true,
        ttl: Duration::from_secs(1),
        max_block: 100,
        checkpoint: true,
    };
    let plans = "default_plan = \"team\"\n[metrics]\nrequests = { unit = \"request\" }\n\
         [plans.team]\nquotas.requests = [{ limit = 100000, period = \"month\" }, { limit = 300, period = \"month\", per = \"key\" }]\n"
        .to_string();
    let a = spawn_app_with(TestOptions {
        plans,
        leases,
        ..Default::default()
    })
    .await;
    let b = a.spawn_peer().await;
    let org = "lv-leased";
    let (id, _) = a.create_key(org).await;
    // Eight clients per replica, sequential checks of 3 units, until three denials in a row.
    let clients = (0..16).map(|c| {
        let app = if c % 2 == 0 { &a } else { &b };
        let id = id.clone();
        async move {
            let mut admitted = 0;
            let mut denied_in_a_row = 0;
            while denied_in_a_row < 3 {
                let r = app
                    .check(
                        json!({ "org_id": org, "metric": "requests", "amount": 3, "key_id": id }),
                    )
                    .await;
                match r.status().as_u16() {
                    200 => {
                        admitted += 3;
                        denied_in_a_row = 0;
                    }
                    402 => {
                        // Past the lease ttl before giving up: blocks other clients hold come
                        // back within 1.25 × ttl.
                        denied_in_a_row += 1;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    s => panic!("unexpected {s}"),
                }
            }
            admitted
        }
    });
    let admitted: i64 = join_all(clients).await.into_iter().sum();
    assert!(admitted <= 300, "admitted {admitted} against the key's 300");
    assert!(
        admitted >= 270,
        "admitted only {admitted}: blocks held back too much"
    );
    assert!(
        crate::helpers::metric_value(&a, "quota_gateway_lease_decisions_total{path=\"local\"}")
            .await
            > 0.0,
        "no decision used a block"
    );
    a.state.quota.settle_leases(true).await;
    b.state.quota.settle_leases(true).await;
    let counter = format!(
        "{}:{{{org}}}:lk:{id}:c:requests:month:{}",
        a.prefix,
        month_start(&a)
    );
    assert_eq!(redis_int(&a, &counter).await, admitted);
    assert_eq!(a.usage_of(org, "requests").await, admitted);
}
