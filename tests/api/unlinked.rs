//! Subscription events that arrive before their customer is linked to an org: kept, then applied
//! for the org by the event that links it, whatever the delivery order. Real signed webhooks
//! through the HTTP API, real Postgres and Redis.

use serde_json::{Value, json};

use crate::helpers::{TestApp, json};
use crate::webhooks::{
    STANDARD_SECRET, STRIPE_SECRET, app, base64_key, now_unix, plan_of, send_standard, send_stripe,
    stripe_subscription,
};

const CUSTOMER: &str = "cus_SLTUXsrP3XAm5X";
const SUBSCRIPTION: &str = "sub_1RQmZyQxu7lNeOGtEBsBLdgd";

/// `customer.subscription.created` for the pro price, with no org id in its metadata.
fn subscription_without_org(event_id: &str, created: i64, price: &str) -> Value {
    let mut e = stripe_subscription(
        "customer.subscription.created",
        event_id,
        created,
        "",
        "active",
        false,
        created + 86_400 * 30,
    );
    e["data"]["object"]["metadata"] = json!({});
    e["data"]["object"]["items"]["data"][0]["price"]["id"] = json!(price);
    e
}

/// `checkout.session.completed` (the documented example) naming `org` for the customer.
fn checkout(event_id: &str, created: i64, org: &str) -> Value {
    let mut e: Value = serde_json::from_str(include_str!(
        "../fixtures/webhooks/stripe/checkout.session.completed.json"
    ))
    .unwrap();
    e["id"] = json!(event_id);
    e["created"] = json!(created);
    e["data"]["object"]["metadata"]["org_id"] = json!(org);
    e
}

async fn outcome(app: &TestApp, body: &Value, t: i64) -> String {
    let r = send_stripe(app, body, STRIPE_SECRET, t).await;
    assert_eq!(r.status(), 200);
    json(r).await["outcome"].as_str().unwrap().to_string()
}

async fn event_status(app: &TestApp, event_id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, org_id FROM webhook_events WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn kept(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM unlinked_subscription_events")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// 25 requests: over the free plan's 20 a month, well within pro's 1000.
async fn spend_25(app: &TestApp, org: &str) -> u16 {
    app.check(json!({"org_id": org, "metric": "requests", "amount": 25, "consume": false}))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn stripe_subscription_before_checkout_ends_on_the_plan_of_checkout_first() {
    let app = app(true).await;
    let t = now_unix(&app);
    assert_eq!(spend_25(&app, "acme").await, 402, "free to begin with");

    // Subscription first: nobody knows the customer yet, so it is kept.
    let sub = subscription_without_org("evt_sub", t, crate::webhooks::STRIPE_PRO_PRICE);
    assert_eq!(outcome(&app, &sub, t).await, "unlinked");
    assert_eq!(plan_of(&app, "acme").await, "free");
    assert_eq!(kept(&app).await, 1);
    // The checkout links the customer and settles the kept subscription in its transaction.
    assert_eq!(
        outcome(&app, &checkout("evt_co", t + 1, "acme"), t).await,
        "linked"
    );
    assert_eq!(plan_of(&app, "acme").await, "pro");
    assert_eq!(kept(&app).await, 0);
    assert_eq!(
        event_status(&app, "evt_sub").await,
        ("processed".into(), Some("acme".into()))
    );
    assert_eq!(
        spend_25(&app, "acme").await,
        200,
        "the gateway decides on pro"
    );
    let view = json(
        app.admin(reqwest::Method::GET, "/admin/orgs/acme", None)
            .await,
    )
    .await;
    assert_eq!(view["subscriptions"][0]["subscription_id"], SUBSCRIPTION);
    assert_eq!(view["subscriptions"][0]["customer_id"], CUSTOMER);

    // The other order, for another org and customer: the same plan.
    let other = app;
    let t = now_unix(&other);
    let mut co = checkout("evt_co2", t, "beta");
    co["data"]["object"]["customer"] = json!("cus_beta");
    co["data"]["object"]["subscription"] = json!("sub_beta");
    assert_eq!(outcome(&other, &co, t).await, "linked");
    let mut sub = subscription_without_org("evt_sub2", t + 1, crate::webhooks::STRIPE_PRO_PRICE);
    sub["data"]["object"]["customer"] = json!("cus_beta");
    sub["data"]["object"]["id"] = json!("sub_beta");
    assert_eq!(outcome(&other, &sub, t).await, "processed");
    assert_eq!(plan_of(&other, "beta").await, "pro");
    assert_eq!(spend_25(&other, "beta").await, 200);
    assert_eq!(kept(&other).await, 0);
}

#[tokio::test]
async fn a_kept_event_older_than_the_applied_state_is_stale_when_settled() {
    let app = app(true).await;
    let t = now_unix(&app);
    // Created (pro) is kept; a later update naming the org moves the subscription to
    // enterprise. Settling the kept creation afterwards must not take the org back to pro.
    let created = subscription_without_org("evt_old", t, crate::webhooks::STRIPE_PRO_PRICE);
    assert_eq!(outcome(&app, &created, t).await, "unlinked");
    let mut updated = stripe_subscription(
        "customer.subscription.updated",
        "evt_new",
        t + 10,
        "acme",
        "active",
        false,
        t + 86_400 * 30,
    );
    updated["data"]["object"]["items"]["data"][0]["price"]["id"] = json!("price_ent");
    assert_eq!(outcome(&app, &updated, t).await, "processed");
    assert_eq!(plan_of(&app, "acme").await, "enterprise");
    assert_eq!(event_status(&app, "evt_old").await.0, "stale");
    assert_eq!(kept(&app).await, 0);

    // Kept events of one customer are settled oldest first: the newest state wins.
    let t = t + 100;
    let mut a = subscription_without_org("evt_a", t, "price_ent");
    let mut b = subscription_without_org("evt_b", t + 5, crate::webhooks::STRIPE_PRO_PRICE);
    for e in [&mut a, &mut b] {
        e["data"]["object"]["customer"] = json!("cus_gamma");
        e["data"]["object"]["id"] = json!("sub_gamma");
    }
    // Delivered newest first.
    assert_eq!(outcome(&app, &b, t).await, "unlinked");
    assert_eq!(outcome(&app, &a, t).await, "unlinked");
    let mut co = checkout("evt_co_gamma", t + 6, "gamma");
    co["data"]["object"]["customer"] = json!("cus_gamma");
    co["data"]["object"]["subscription"] = json!("sub_gamma");
    assert_eq!(outcome(&app, &co, t).await, "linked");
    assert_eq!(
        plan_of(&app, "gamma").await,
        "pro",
        "the later (pro) state wins"
    );
    assert_eq!(event_status(&app, "evt_b").await.0, "processed");
}

#[tokio::test]
async fn standard_webhooks_settle_kept_events_when_a_later_event_links_the_customer() {
    async fn send(app: &TestApp, id: &str, t: i64, data: Value) -> String {
        let body = json!({"type": "subscription.created", "data": data});
        let r = send_standard(
            app,
            "/webhooks/standard/inhouse",
            &base64_key(STANDARD_SECRET),
            id,
            t,
            &body,
        )
        .await;
        assert_eq!(r.status(), 200);
        json(r).await["outcome"].as_str().unwrap().to_string()
    }
    let unlinked = json!({"subscription_id": "s1", "customer_id": "c1", "status": "active",
                          "product_id": "prod_ent"});
    let linking = json!({"subscription_id": "s2", "customer_id": "c1", "org_id": "acme",
                         "status": "active", "product_id": "prod_pro"});

    // Unlinked first, then the event that names the org for the customer.
    let app = app(true).await;
    let t = now_unix(&app);
    assert_eq!(send(&app, "msg_1", t, unlinked.clone()).await, "unlinked");
    assert_eq!(plan_of(&app, "acme").await, "free");
    assert_eq!(send(&app, "msg_2", t, linking.clone()).await, "processed");
    assert_eq!(plan_of(&app, "acme").await, "enterprise");
    let first_order = plan_of(&app, "acme").await;

    // The other order, on a fresh gateway: the same plan.
    let app = crate::webhooks::app(true).await;
    let t = now_unix(&app);
    assert_eq!(send(&app, "msg_2", t, linking).await, "processed");
    assert_eq!(send(&app, "msg_1", t, unlinked).await, "processed");
    assert_eq!(plan_of(&app, "acme").await, first_order);
}

#[tokio::test]
async fn a_subscription_and_its_checkout_delivered_at_the_same_time_end_on_the_plan() {
    let app = app(true).await;
    let t = now_unix(&app);
    let rounds = 12;
    let sends = (0..rounds).map(|i| {
        let app = &app;
        async move {
            let (customer, sub_id, org) =
                (format!("cus_{i}"), format!("sub_{i}"), format!("org{i}"));
            let mut sub = subscription_without_org(
                &format!("evt_s{i}"),
                t,
                crate::webhooks::STRIPE_PRO_PRICE,
            );
            sub["data"]["object"]["customer"] = json!(customer);
            sub["data"]["object"]["id"] = json!(sub_id);
            let mut co = checkout(&format!("evt_c{i}"), t, &org);
            co["data"]["object"]["customer"] = json!(customer);
            co["data"]["object"]["subscription"] = json!(sub_id);
            let (a, b) = tokio::join!(
                send_stripe(app, &sub, STRIPE_SECRET, t),
                send_stripe(app, &co, STRIPE_SECRET, t)
            );
            assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
            org
        }
    });
    for org in futures_util::future::join_all(sends).await {
        assert_eq!(plan_of(&app, &org).await, "pro", "{org}");
    }
    assert_eq!(kept(&app).await, 0);
}

#[tokio::test]
async fn events_never_linked_are_forgotten_after_thirty_days() {
    let app = crate::helpers::spawn_app().await;
    let now = app.clock_now();
    for (id, age_days) in [("evt_old", 31), ("evt_recent", 29)] {
        sqlx::query(
            "INSERT INTO unlinked_subscription_events \
               (provider, event_id, subscription_id, customer_id, occurred_at, event, received_at) \
             VALUES ('stripe', $1, 'sub_1', 'cus_1', $2, '{}'::jsonb, $2)",
        )
        .bind(id)
        .bind(now - chrono::Duration::days(age_days))
        .execute(&app.pool)
        .await
        .unwrap();
    }
    // The replica's own scheduler may get there first (it looks every minute): what is left
    // is what counts.
    let pruned = quota_gateway::webhooks::scheduler::prune_unlinked_once(&app.state.webhooks, now)
        .await
        .unwrap();
    assert!(pruned <= 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT event_id FROM unlinked_subscription_events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, ["evt_recent"]);
}
