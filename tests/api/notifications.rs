//! Outbound events (`usage.threshold_crossed`, `plan.changed`): a real HTTP receiver on loopback
//! that verifies every Standard Webhooks signature, against real Redis and Postgres.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{
    ChaosProxy, TestApp, TestOptions, eventually, host_port, json, keys_matching,
    skip_in_cluster_mode, spawn_app_with, test_redis_url,
};
use quota_gateway::config::{NotifySettings, OnRedisError};
use quota_gateway::webhooks::signature::{StandardKeyEncoding, standard_key, verify_standard};

const PLANS: &str = r#"
default_plan = "free"
upgrade_url = "https://example.com/upgrade?org={org_id}&plan={plan}"
notify_at = [50, 100]

[metrics]
requests = { unit = "request" }
projects = { unit = "project", kind = "gauge" }

[plans.free]
name = "Free"
upgrade_to = "pro"
quotas = { requests = { limit = 20, period = "month" }, projects = { limit = 4 } }

[plans.pro]
name = "Pro"
quotas = { requests = { limit = 1000, period = "month" } }

[plans.quiet]
name = "Quiet"
notify_at = []
quotas = { requests = { limit = 20, period = "month" } }
"#;

/// The global receiver's secret (base64 of 24 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver took.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    body: Value,
    /// What the receiver answered.
    status: u16,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Requests whose signature did not verify (answered 401).
    bad_signatures: usize,
    /// Answer this status to the next `fail_next` requests (then 200s).
    fail_next: usize,
    fail_status: u16,
}

/// A Standard Webhooks receiver on loopback that verifies each delivery with its key.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    key: Arc<Mutex<Vec<u8>>>,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    async fn start(secret: &str) -> Self {
        let key = standard_key(secret, StandardKeyEncoding::Base64AfterWhsecPrefix).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            addr: listener.local_addr().unwrap(),
            key: Arc::new(Mutex::new(key)),
            state: Arc::new(Mutex::new(ReceiverState::default())),
        };
        let r = receiver.clone();
        let app = axum::Router::new().route(
            "/hooks/quota",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let r = r.clone();
                    async move { r.take(&headers, &body) }
                },
            ),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/quota", self.addr)
    }

    fn set_key(&self, secret: &str) {
        *self.key.lock().unwrap() =
            standard_key(secret, StandardKeyEncoding::Base64AfterWhsecPrefix).unwrap();
    }

    fn take(&self, headers: &axum::http::HeaderMap, body: &[u8]) -> axum::http::StatusCode {
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
        let key = self.key.lock().unwrap().clone();
        let now = chrono::Utc::now().timestamp();
        let mut st = self.state.lock().unwrap();
        let verified = verify_standard(
            h("webhook-id"),
            h("webhook-timestamp"),
            h("webhook-signature"),
            body,
            &[&key],
            now,
            300,
        );
        if verified.is_err() {
            st.bad_signatures += 1;
            return axum::http::StatusCode::UNAUTHORIZED;
        }
        let status = if st.fail_next > 0 {
            st.fail_next -= 1;
            st.fail_status
        } else {
            200
        };
        st.received.push(Received {
            id: h("webhook-id").to_string(),
            body: serde_json::from_slice(body).unwrap(),
            status,
        });
        axum::http::StatusCode::from_u16(status).unwrap()
    }

    fn fail(&self, times: usize, status: u16) {
        let mut st = self.state.lock().unwrap();
        st.fail_next = times;
        st.fail_status = status;
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    fn bad_signatures(&self) -> usize {
        self.state.lock().unwrap().bad_signatures
    }

    /// Events of `type_` answered 2xx.
    fn delivered(&self, type_: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.status / 100 == 2 && r.body["type"] == type_)
            .collect()
    }

    /// Wait until `n` events of `type_` were delivered (panics after 15 s).
    async fn wait_for(&self, type_: &str, n: usize) -> Vec<Received> {
        for _ in 0..300 {
            let got = self.delivered(type_);
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} {type_} events; received {:?}",
            self.received()
        );
    }
}

/// Delivery settings fast enough for tests.
fn settings(receiver: Option<&Receiver>) -> NotifySettings {
    NotifySettings {
        url: receiver.map(Receiver::url),
        secret: receiver.map(|_| SecretString::from(SECRET)),
        max_age: Duration::from_secs(3600),
        timeout: Duration::from_secs(2),
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        poll_interval: Duration::from_millis(50),
    }
}

async fn spawn(receiver: Option<&Receiver>) -> TestApp {
    spawn_app_with(TestOptions {
        plans: PLANS.into(),
        notifications: Some(settings(receiver)),
        ..Default::default()
    })
    .await
}

fn thresholds(events: &[Received], org: &str) -> BTreeSet<u64> {
    events
        .iter()
        .filter(|e| e.body["data"]["org_id"] == org)
        .map(|e| e.body["data"]["threshold"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn thresholds_fire_once_each_across_two_replicas_and_100_concurrent_requests() {
    let receiver = Receiver::start(SECRET).await;
    let app = spawn(Some(&receiver)).await;
    let peer = app.spawn_peer().await;
    let responses = join_all((0..100).map(|i| {
        let target = if i % 2 == 0 { &app } else { &peer };
        target.check(json!({"org_id": "acme", "metric": "requests"}))
    }))
    .await;
    let admitted = responses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(admitted, 20, "the hard limit holds");

    let events = receiver.wait_for("usage.threshold_crossed", 2).await;
    // Let any duplicate that might still be on its way arrive.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let events = {
        let again = receiver.delivered("usage.threshold_crossed");
        assert_eq!(again.len(), events.len());
        again
    };
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(thresholds(&events, "acme"), BTreeSet::from([50, 100]));
    let ids: BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "each event has its own webhook-id");

    let at_100 = events
        .iter()
        .find(|e| e.body["data"]["threshold"] == 100)
        .unwrap();
    let data = &at_100.body["data"];
    assert_eq!(data["metric"], "requests");
    assert_eq!(data["unit"], "request");
    assert_eq!(data["current"], 20);
    assert_eq!(data["limit"], 20);
    assert_eq!(data["period"], "month");
    assert_eq!(data["plan"], json!({"id": "free", "name": "Free"}));
    assert_eq!(data["upgrade"]["plan"], "pro");
    assert_eq!(data["upgrade"]["limit"], 1000);
    assert_eq!(
        data["upgrade"]["url"],
        "https://example.com/upgrade?org=acme&plan=pro"
    );
    let month = quota_gateway::domain::period::calendar_month(app.clock_now());
    assert_eq!(
        data["period_start"],
        quota_gateway::domain::render::rfc3339(month.start)
    );
    assert_eq!(
        data["resets_at"],
        quota_gateway::domain::render::rfc3339(month.end)
    );
    let at_50 = events
        .iter()
        .find(|e| e.body["data"]["threshold"] == 50)
        .unwrap();
    assert_eq!(at_50.body["data"]["current"], 10);
    assert_eq!(receiver.bad_signatures(), 0);

    // The admin view lists both as delivered.
    let r = app
        .admin(Method::GET, "/admin/orgs/acme/notifications", None)
        .await;
    assert_eq!(r.status(), 200);
    let view = json(r).await;
    let listed = view["events"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|e| e["status"] == "delivered"));
}

#[tokio::test]
async fn a_receiver_failing_twice_gets_the_event_once_with_the_same_webhook_id() {
    let receiver = Receiver::start(SECRET).await;
    receiver.fail(2, 500);
    let app = spawn(Some(&receiver)).await;
    app.set_plan("acme", "pro").await;
    let delivered = receiver.wait_for("plan.changed", 1).await;
    assert_eq!(delivered.len(), 1);
    let all = receiver.received();
    assert_eq!(all.len(), 3, "two failures, then the delivery: {all:?}");
    assert!(
        all.iter().all(|r| r.id == delivered[0].id),
        "same webhook-id"
    );
    let data = &delivered[0].body["data"];
    assert_eq!(data["org_id"], "acme");
    assert!(data["from"].is_null());
    assert_eq!(data["to"], "pro");
    assert_eq!(data["cause"], "admin");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 3, "nothing after the 2xx");
    let view = json(
        app.admin(Method::GET, "/admin/orgs/acme/notifications", None)
            .await,
    )
    .await;
    let event = &view["events"][0];
    assert_eq!(event["id"], delivered[0].id);
    assert_eq!(event["status"], "delivered");
    assert_eq!(event["attempts"], 3);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            "quota_gateway_notifications_total{outcome=\"retried\",type=\"plan.changed\"} 2"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn pending_events_are_delivered_after_a_restart() {
    let receiver = Receiver::start(SECRET).await;
    receiver.fail(usize::MAX, 503);
    let app = spawn(Some(&receiver)).await;
    let responses =
        join_all((0..10).map(|_| app.check(json!({"org_id": "acme", "metric": "requests"})))).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    // Attempted and refused at least once: pending in the outbox.
    for _ in 0..200 {
        if !receiver.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(receiver.delivered("usage.threshold_crossed").is_empty());
    let app = app.restart().await;
    receiver.fail(0, 200);
    let events = receiver.wait_for("usage.threshold_crossed", 1).await;
    assert_eq!(thresholds(&events, "acme"), BTreeSet::from([50]));
    let ids: BTreeSet<String> = receiver.received().into_iter().map(|r| r.id).collect();
    assert_eq!(
        ids.len(),
        1,
        "every attempt, before and after the restart, has one id"
    );
    drop(app);
}

#[tokio::test]
async fn a_new_period_re_arms_thresholds_and_a_refund_does_not() {
    let receiver = Receiver::start(SECRET).await;
    let app = spawn(Some(&receiver)).await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
        .await;
    assert_eq!(r.status(), 200);
    receiver.wait_for("usage.threshold_crossed", 1).await;

    // Back below 50 % and across it again, in the same period: not again.
    let r = app
        .admin(
            Method::POST,
            "/admin/orgs/acme/adjustments",
            Some(&json!({"metric": "requests", "amount": -5, "reason": "refund"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 6}))
        .await;
    assert_eq!(r.status(), 200);

    // The next month: the same threshold fires again.
    app.clock.advance(chrono::Duration::days(32));
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
        .await;
    assert_eq!(r.status(), 200);
    let events = receiver.wait_for("usage.threshold_crossed", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events_after = receiver.delivered("usage.threshold_crossed");
    assert_eq!(events_after.len(), 2, "{events_after:?}");
    assert_eq!(events.len(), 2);
    let starts: BTreeSet<&str> = events_after
        .iter()
        .map(|e| e.body["data"]["period_start"].as_str().unwrap())
        .collect();
    assert_eq!(starts.len(), 2, "one per month");
    assert!(
        events_after
            .iter()
            .all(|e| e.body["data"]["threshold"] == 50)
    );
}

#[tokio::test]
async fn gauges_cross_and_re_arm_when_the_level_falls_back() {
    let receiver = Receiver::start(SECRET).await;
    let app = spawn(Some(&receiver)).await;
    let report = |amount: i64| {
        let body = json!({"org_id": "acme", "metric": "projects", "amount": amount});
        let app = &app;
        async move { app.post("/v1/usage", &body).await }
    };
    assert_eq!(report(2).await.status(), 200);
    let events = receiver.wait_for("usage.threshold_crossed", 1).await;
    assert_eq!(events[0].body["data"]["metric"], "projects");
    assert!(events[0].body["data"]["period"].is_null());
    assert_eq!(events[0].body["data"]["current"], 2);
    assert_eq!(report(-1).await.status(), 200);
    assert_eq!(report(1).await.status(), 200);
    receiver.wait_for("usage.threshold_crossed", 2).await;
}

#[tokio::test]
async fn no_threshold_event_for_a_plan_with_an_empty_notify_at() {
    let receiver = Receiver::start(SECRET).await;
    let app = spawn(Some(&receiver)).await;
    app.set_plan("calm", "quiet").await;
    let responses =
        join_all((0..25).map(|_| app.check(json!({"org_id": "calm", "metric": "requests"})))).await;
    assert_eq!(responses.iter().filter(|r| r.status() == 200).count(), 20);
    // An org on a plan with thresholds, after: its event arriving means the pipeline ran.
    app.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
        .await;
    let events = receiver.wait_for("usage.threshold_crossed", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events_after = receiver.delivered("usage.threshold_crossed");
    assert_eq!(events_after.len(), events.len());
    assert!(thresholds(&events_after, "calm").is_empty());
    assert!(
        keys_matching(&format!("{}:{{calm}}:*:n", app.prefix))
            .await
            .is_empty(),
        "no threshold state in Redis for the plan"
    );
    // Its plan change was told, though.
    let changes = receiver.wait_for("plan.changed", 1).await;
    assert_eq!(changes[0].body["data"]["to"], "quiet");
}

#[tokio::test]
async fn an_org_endpoint_gets_its_own_events_signed_with_its_secret_and_410_disables_it() {
    let global = Receiver::start(SECRET).await;
    let own = Receiver::start(SECRET).await;
    let app = spawn(Some(&global)).await;
    let r = app
        .admin(
            Method::PUT,
            "/admin/orgs/acme/notifications",
            Some(&json!({"url": own.url()})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["url"], own.url());
    let secret = body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    own.set_key(&secret);
    let view = json(
        app.admin(Method::GET, "/admin/orgs/acme/notifications", None)
            .await,
    )
    .await;
    assert_eq!(view["endpoint"]["url"], own.url());
    assert!(
        !view.to_string().contains(&secret),
        "the secret is shown once"
    );

    app.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
        .await;
    app.check(json!({"org_id": "other", "metric": "requests", "amount": 10}))
        .await;
    global.wait_for("usage.threshold_crossed", 2).await;
    let mine = own.wait_for("usage.threshold_crossed", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mine_after = own.delivered("usage.threshold_crossed");
    assert_eq!(mine_after.len(), mine.len());
    assert_eq!(thresholds(&mine_after, "acme"), BTreeSet::from([50]));
    assert!(thresholds(&mine_after, "other").is_empty());
    assert_eq!(own.bad_signatures(), 0);
    assert_eq!(global.bad_signatures(), 0);

    // 410 Gone: the endpoint is disabled; the global receiver still gets everything.
    own.fail(usize::MAX, 410);
    app.check(json!({"org_id": "acme", "metric": "requests", "amount": 10}))
        .await;
    global.wait_for("usage.threshold_crossed", 3).await;
    for _ in 0..100 {
        let view = json(
            app.admin(Method::GET, "/admin/orgs/acme/notifications", None)
                .await,
        )
        .await;
        if view["endpoint"]["disabled"] == true {
            let r = app
                .admin(Method::DELETE, "/admin/orgs/acme/notifications", None)
                .await;
            assert_eq!(r.status(), 204);
            let r = app
                .admin(Method::DELETE, "/admin/orgs/acme/notifications", None)
                .await;
            assert_eq!(r.status(), 404);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("a 410 did not disable the endpoint");
}

#[tokio::test]
async fn a_relative_or_malformed_endpoint_is_refused_with_422() {
    let app = spawn(None).await;
    for url in ["/hook", "not a url", "ftp://example.com/hook"] {
        let r = app
            .admin(
                Method::PUT,
                "/admin/orgs/acme/notifications",
                Some(&json!({ "url": url })),
            )
            .await;
        assert_eq!(r.status(), 422, "{url}");
    }
}

/// An https receiver is spoken to in TLS: here one that answers plain HTTP, so the handshake
/// fails, the event stays pending with the TLS error, and nothing reaches it in clear text.
#[tokio::test]
async fn an_https_endpoint_is_reached_over_tls() {
    let receiver = Receiver::start(SECRET).await;
    let app = spawn(None).await;
    let url = receiver.url().replacen("http://", "https://", 1);
    let r = app
        .admin(
            Method::PUT,
            "/admin/orgs/acme/notifications",
            Some(&json!({ "url": url })),
        )
        .await;
    assert_eq!(r.status(), 200, "https is accepted");
    app.set_plan("acme", "pro").await;
    let mut last_error = String::new();
    for _ in 0..100 {
        let view = json(
            app.admin(Method::GET, "/admin/orgs/acme/notifications", None)
                .await,
        )
        .await;
        if let Some(e) = view["events"][0]["last_error"].as_str() {
            last_error = e.to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !last_error.is_empty(),
        "the delivery to an https endpoint that does not speak TLS failed with an error"
    );
    // rustls's word for a plain-HTTP answer to its ClientHello: TLS was spoken.
    assert!(
        last_error.contains("cannot connect") && last_error.contains("corrupt message"),
        "a TLS failure, not a refused connection: {last_error}"
    );
    assert!(
        receiver.received().is_empty(),
        "nothing was delivered in clear text"
    );
}

#[tokio::test]
async fn usage_admitted_while_redis_was_unreachable_crosses_when_the_replay_reaches_redis() {
    if skip_in_cluster_mode(
        "usage_admitted_while_redis_was_unreachable_crosses_when_the_replay_reaches_redis",
    ) {
        return;
    }
    let receiver = Receiver::start(SECRET).await;
    let proxy = ChaosProxy::start(&host_port(&test_redis_url())).await;
    let app = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        notifications: Some(settings(Some(&receiver))),
        redis_url: Some(format!("redis://{}/0", proxy.addr)),
        on_error: OnRedisError::Local,
        ..Default::default()
    })
    .await;
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 8}))
        .await;
    assert_eq!(r.status(), 200);
    proxy.cut();
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 4}))
        .await;
    assert_eq!(r.status(), 200, "admitted locally");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        receiver.delivered("usage.threshold_crossed").is_empty(),
        "not detected while deciding locally"
    );
    proxy.restore();
    let ready = eventually(Duration::from_secs(10), || async {
        let r = app.get("/readyz").await;
        r.status() == 200 && json(r).await["status"] == "ready"
    })
    .await;
    assert!(ready.is_some(), "the gateway leaves degraded mode");
    let events = receiver.wait_for("usage.threshold_crossed", 1).await;
    assert_eq!(events[0].body["data"]["threshold"], 50);
    assert_eq!(events[0].body["data"]["current"], 12);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.delivered("usage.threshold_crossed").len(), 1);
}

#[tokio::test]
async fn with_leases_a_threshold_is_reported_once_when_the_blocks_settle() {
    let receiver = Receiver::start(SECRET).await;
    let plans = r#"
default_plan = "free"
notify_at = [10, 50]
[metrics]
requests = { unit = "request" }
[plans.free]
quotas = { requests = { limit = 1000, period = "month" } }
"#;
    let app = spawn_app_with(TestOptions {
        plans: plans.into(),
        notifications: Some(settings(Some(&receiver))),
        leases: quota_gateway::config::LeaseSettings {
            enabled: true,
            ttl: Duration::from_secs(1),
            max_block: 100,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let peer = app.spawn_peer().await;
    let responses = join_all((0..150).map(|i| {
        let target = if i % 2 == 0 { &app } else { &peer };
        target.check(json!({"org_id": "acme", "metric": "requests"}))
    }))
    .await;
    assert!(responses.iter().all(|r| r.status() == 200));
    for a in [&app, &peer] {
        a.state.quota.settle_leases(true).await;
    }
    let events = receiver.wait_for("usage.threshold_crossed", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events_after = receiver.delivered("usage.threshold_crossed");
    assert_eq!(events_after.len(), 1, "{events_after:?}");
    assert_eq!(events[0].body["data"]["threshold"], 10);
    let current = events[0].body["data"]["current"].as_i64().unwrap();
    assert!(
        (100..=150).contains(&current),
        "consumed units, never reserved ones: {current}"
    );
}

#[tokio::test]
async fn settled_events_are_pruned_after_the_retention_and_pending_ones_never() {
    let app = spawn(None).await;
    for (status, age_days) in [
        ("delivered", 40),
        ("failed", 40),
        ("delivered", 1),
        ("pending", 40),
    ] {
        sqlx::query(
            "INSERT INTO notifications (id, org_id, type, payload, status, created_at, updated_at) \
             VALUES ($1, 'acme', 'plan.changed', '{}', $2, now() - make_interval(days => $3), \
                     now() - make_interval(days => $3))",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(status)
        .bind(age_days)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let removed =
        quota_gateway::db::notifications::prune(&app.pool, Duration::from_secs(30 * 86_400))
            .await
            .unwrap();
    assert_eq!(removed, 2);
    let left: Vec<String> = sqlx::query_scalar("SELECT status FROM notifications ORDER BY status")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, ["delivered", "pending"]);
}

#[tokio::test]
async fn a_crossing_while_postgres_is_unreachable_is_held_and_delivered_once_it_is_back() {
    let receiver = Receiver::start(SECRET).await;
    let app = spawn_app_with(TestOptions {
        plans: PLANS.into(),
        notifications: Some(settings(Some(&receiver))),
        postgres_proxy: true,
        ..Default::default()
    })
    .await;
    let pg = app.pg_proxy.clone().unwrap();
    // The org is cached: decisions need no Postgres.
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 5}))
        .await;
    assert_eq!(r.status(), 200);
    pg.cut();
    let r = app
        .check(json!({"org_id": "acme", "metric": "requests", "amount": 5}))
        .await;
    assert_eq!(r.status(), 200, "a crossing never waits for Postgres");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(receiver.delivered("usage.threshold_crossed").is_empty());
    pg.restore();
    let events = receiver.wait_for("usage.threshold_crossed", 1).await;
    assert_eq!(events[0].body["data"]["threshold"], 50);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.delivered("usage.threshold_crossed").len(), 1);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            "quota_gateway_notifications_total{outcome=\"queued\",type=\"usage.threshold_crossed\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "quota_gateway_notifications_total{outcome=\"dropped\",type=\"usage.threshold_crossed\"} 0"
    ));
}
