//! Concurrency limits (`concurrency = { requests = N }`): at most N requests of an org in flight
//! through the proxy across all replicas, counted at a real upstream; slots come back when
//! responses end, when clients go away, and when a replica dies (within the slot TTL).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::helpers::{
    TestApp, TestOptions, eventually, json, metric_value, proxy_settings, spawn_app_with,
};

const LIMIT: usize = 5;

fn plans(limit: usize) -> String {
    format!(
        "default_plan = \"capped\"\nupgrade_url = \"https://example.com/up\"\n\
         [metrics]\nrequests = {{ unit = \"request\" }}\n\
         [plans.capped]\nupgrade_to = \"wide\"\n\
         quotas = {{ requests = {{ limit = 100000, period = \"month\" }} }}\n\
         concurrency = {{ requests = {limit} }}\n\
         [plans.wide]\nconcurrency = {{ requests = 50 }}\n"
    )
}

/// An upstream on loopback that holds every request `delay` before answering, and counts how
/// many it holds at once (the truth about what passed the gateway).
struct SlowUpstream {
    addr: SocketAddr,
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl SlowUpstream {
    async fn start(delay: Duration) -> SlowUpstream {
        use hyper_util::rt::TokioIo;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = SlowUpstream {
            addr: listener.local_addr().unwrap(),
            now: Arc::default(),
            max: Arc::default(),
            total: Arc::default(),
        };
        let (now, max, total) = (up.now.clone(), up.max.clone(), up.total.clone());
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (now, max, total) = (now.clone(), max.clone(), total.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let (now, max, total) = (now.clone(), max.clone(), total.clone());
                        async move {
                            let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(held, Ordering::SeqCst);
                            total.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            now.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                axum::body::Body::from("done"),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        up
    }
}

/// A gateway whose proxy trusts `x-org-id` (the identity is not what is tested here).
async fn gateway(upstream: SocketAddr, limit: usize, ttl: Duration) -> TestApp {
    gateway_with(
        upstream,
        limit,
        quota_gateway::config::SlotSettings {
            ttl,
            ..Default::default()
        },
    )
    .await
}

async fn gateway_with(
    upstream: SocketAddr,
    limit: usize,
    concurrency: quota_gateway::config::SlotSettings,
) -> TestApp {
    let mut proxy = proxy_settings(upstream);
    proxy.identity.mode = quota_gateway::config::IdentityMode::Header;
    proxy.request_timeout = Duration::from_secs(30);
    spawn_app_with(TestOptions {
        plans: plans(limit),
        proxy: Some(proxy),
        concurrency,
        ..Default::default()
    })
    .await
}

async fn get(app: &TestApp, org: &str) -> reqwest::Response {
    app.client
        .get(app.proxy_url("/work"))
        .header("x-org-id", org)
        .send()
        .await
        .unwrap()
}

/// Proxy decisions refused for too many in flight, as `/metrics` counts them.
async fn too_many_in_flight(app: &TestApp) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("quota_gateway_decisions_total{")
                && l.contains("outcome=\"too_many_in_flight\"")
                && l.contains("source=\"proxy\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Slots of `org` in Redis.
async fn slots_in_redis(app: &TestApp, org: &str) -> i64 {
    let mut conn = app.redis.clone();
    redis::cmd("ZCARD")
        .arg(format!("{}:{{{org}}}:inflight", app.prefix))
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_hundred_slow_requests_over_two_replicas_never_pass_the_limit_at_the_upstream() {
    let upstream = SlowUpstream::start(Duration::from_millis(300)).await;
    let a = gateway(upstream.addr, LIMIT, Duration::from_secs(30)).await;
    let b = a.spawn_peer().await;
    let started = Instant::now();
    let answers = join_all((0..100).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move {
            let r = get(app, "acme").await;
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let body = r.text().await.unwrap();
            (status, headers, body)
        }
    }))
    .await;
    let admitted = answers.iter().filter(|(s, ..)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, ..)| *s == 429).collect();
    assert_eq!(admitted + refused.len(), 100, "only 200 and 429 answers");
    assert!(
        upstream.max.load(Ordering::SeqCst) <= LIMIT,
        "{} requests in flight at the upstream, limit {LIMIT}",
        upstream.max.load(Ordering::SeqCst)
    );
    assert_eq!(
        upstream.max.load(Ordering::SeqCst),
        LIMIT,
        "the limit was reached"
    );
    assert_eq!(upstream.total.load(Ordering::SeqCst), admitted);
    // Refused at once, not queued behind the slow ones.
    assert!(started.elapsed() < Duration::from_secs(10));
    let (_, headers, body) = refused.first().expect("some were refused");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"], "too_many_in_flight");
    assert_eq!(body["status"], 429);
    assert_eq!(body["concurrency"]["limit"], LIMIT);
    assert_eq!(body["concurrency"]["in_flight"], LIMIT);
    assert_eq!(body["upgrade"]["plan"], "wide");
    assert_eq!(body["upgrade"]["limit"], 50);
    assert_eq!(headers["retry-after"], "1");
    let policy = headers["ratelimit-policy"].to_str().unwrap();
    assert!(
        policy.contains(&format!("\"concurrency\";q={LIMIT}")),
        "{policy}"
    );
    assert!(
        headers["ratelimit"]
            .to_str()
            .unwrap()
            .contains("\"concurrency\";r=0")
    );
    // Admitted answers carry the policy too.
    let (_, ok_headers, _) = answers.iter().find(|(s, ..)| *s == 200).unwrap();
    assert!(
        ok_headers["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("\"concurrency\";q=5")
    );

    // Every response ended: every slot comes back, and a full round is admitted again.
    let released = eventually(Duration::from_secs(5), || async {
        slots_in_redis(&a, "acme").await == 0
    })
    .await;
    assert!(released.is_some(), "slots released after the responses");
    let again = join_all((0..LIMIT).map(|i| get(if i % 2 == 0 { &a } else { &b }, "acme"))).await;
    assert!(again.iter().all(|r| r.status() == 200));
    let denials = too_many_in_flight(&a).await + too_many_in_flight(&b).await;
    assert_eq!(denials as usize, refused.len());
}

#[tokio::test]
async fn a_client_that_goes_away_gives_its_slot_back() {
    let upstream = SlowUpstream::start(Duration::from_secs(3)).await;
    let app = gateway(upstream.addr, 2, Duration::from_secs(30)).await;
    // Two clients give up long before the upstream answers.
    let gone = join_all((0..2).map(|_| async {
        let r = app
            .client
            .get(app.proxy_url("/work"))
            .header("x-org-id", "acme")
            .timeout(Duration::from_millis(400))
            .send()
            .await;
        assert!(r.is_err(), "timed out on the client's side");
    }));
    gone.await;
    assert_eq!(upstream.total.load(Ordering::SeqCst), 2);
    let released = eventually(Duration::from_secs(2), || async {
        slots_in_redis(&app, "acme").await == 0
    })
    .await;
    assert!(
        released.is_some(),
        "the slots came back when the clients went away, not when the upstream answered"
    );
    let t = Instant::now();
    let r = get(&app, "acme").await;
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_secs(3), "it was forwarded");
    drop(r);
    // Three slots taken, three given back.
    let counted = eventually(Duration::from_secs(2), || async {
        metric_value(
            &app,
            "quota_gateway_concurrency_releases_total{outcome=\"released\"}",
        )
        .await
            == 3.0
            && metric_value(&app, "quota_gateway_concurrency_slots").await == 0.0
    })
    .await;
    assert!(counted.is_some(), "releases counted, no slot held");
}

#[tokio::test]
async fn a_streaming_response_holds_its_slot_until_its_body_ends() {
    let upstream = crate::helpers::spawn_upstream().await;
    let mut proxy = proxy_settings(upstream.addr);
    proxy.identity.mode = quota_gateway::config::IdentityMode::Header;
    let app = spawn_app_with(TestOptions {
        plans: plans(1),
        proxy: Some(proxy),
        ..Default::default()
    })
    .await;
    let tx = upstream.stream_sender();
    let mut streaming = app
        .client
        .get(app.proxy_url("/stream"))
        .header("x-org-id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), 200);
    tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
    assert_eq!(&streaming.chunk().await.unwrap().unwrap()[..], b"first");
    // Headers are out, the body is not: still in flight.
    let r = get(&app, "acme").await;
    assert_eq!(r.status(), 429);
    assert_eq!(json(r).await["error"], "too_many_in_flight");
    drop(tx);
    assert!(streaming.chunk().await.unwrap().is_none());
    let freed = eventually(Duration::from_secs(2), || async {
        get(&app, "acme").await.status() == 200
    })
    .await;
    assert!(freed.is_some(), "the slot came back when the body ended");
}

#[tokio::test]
async fn a_check_takes_no_slot_and_the_plan_without_a_limit_has_no_policy() {
    let upstream = SlowUpstream::start(Duration::from_millis(10)).await;
    let app = gateway(upstream.addr, 1, Duration::from_secs(30)).await;
    for _ in 0..3 {
        let r = app
            .check(serde_json::json!({"org_id": "acme", "metric": "requests", "amount": 1}))
            .await;
        assert_eq!(r.status(), 200);
        assert!(
            !r.headers()["ratelimit-policy"]
                .to_str()
                .unwrap()
                .contains("concurrency")
        );
    }
    assert_eq!(slots_in_redis(&app, "acme").await, 0);
    app.set_plan("acme", "wide").await;
    let r = get(&app, "acme").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("\"concurrency\";q=50")
    );
}

/// Two real gateway processes on one Redis and one database.
struct Processes {
    dir: std::path::PathBuf,
    db_name: String,
    prefix: String,
    children: Vec<std::process::Child>,
}

impl Processes {
    async fn new(upstream: SocketAddr, limit: usize, ttl: &str) -> Processes {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("qg_test_{id}");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&crate::helpers::test_database_url())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{db_name}\""
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
        let dir = std::env::temp_dir().join(format!("qg-slots-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("plans.toml"), plans(limit)).unwrap();
        let base = crate::helpers::test_database_url();
        let db_url = format!("{}/{db_name}", &base[..base.rfind('/').unwrap()]);
        let prefix = format!("qgt-{}", &id[..12]);
        std::fs::write(
            dir.join("common.toml"),
            format!(
                "[redis]\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n[database]\nurl = \"{db_url}\"\n\
                 [concurrency]\nslot_ttl = \"{ttl}\"\n[identity]\nmode = \"header\"\n\
                 [proxy.default_route]\ncharges = [{{ metric = \"requests\", amount = 1 }}]\n",
                crate::helpers::test_redis_url()
            ),
        )
        .unwrap();
        Processes {
            dir,
            db_name,
            prefix,
            children: Vec::new(),
        }
        .with_upstream(upstream)
    }

    fn with_upstream(self, upstream: SocketAddr) -> Self {
        std::fs::write(self.dir.join("upstream"), upstream.to_string()).unwrap();
        self
    }

    /// Start a replica; returns (API URL, proxy URL) once it is ready.
    async fn start(&mut self) -> (String, String) {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (api, proxy) = (free(), free());
        let upstream = std::fs::read_to_string(self.dir.join("upstream")).unwrap();
        let common = std::fs::read_to_string(self.dir.join("common.toml")).unwrap();
        let config = self.dir.join(format!("gateway-{api}.toml"));
        std::fs::write(
            &config,
            format!(
                "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:{api}\"\nadmin_token = \"t\"\n\
                 [proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"http://{upstream}\"\n\
                 request_timeout = \"120s\"\n{common}"
            ),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_quota-gateway"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env_remove("QG_API_LISTEN")
            .env_remove("QG_ADMIN_TOKEN")
            .env_remove("QG_PROXY_LISTEN")
            .env_remove("QG_PROXY_UPSTREAM")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        let api_url = format!("http://127.0.0.1:{api}");
        let client = reqwest::Client::new();
        let up = eventually(Duration::from_secs(30), || async {
            client
                .get(format!("{api_url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(up.is_some(), "the gateway process came up");
        (api_url, format!("http://127.0.0.1:{proxy}"))
    }

    fn kill(&mut self, i: usize) {
        let child = &mut self.children[i];
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let _ = child.wait();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let db_name = self.db_name.clone();
        let prefix = self.prefix.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    if let Ok(admin) = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&crate::helpers::test_database_url())
                        .await
                    {
                        let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
                    }
                    let mut conn = crate::helpers::test_redis_conn().await;
                    for key in crate::helpers::keys_matching(&format!("{prefix}:*")).await {
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
                    }
                })
        })
        .join();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_killed_replicas_slots_free_themselves_within_the_ttl() {
    if crate::helpers::skip_in_cluster_mode("a_killed_replicas_slots_free_themselves") {
        return;
    }
    // The upstream holds every request far longer than the test: only the kill ends them.
    let upstream = SlowUpstream::start(Duration::from_secs(120)).await;
    let ttl = Duration::from_secs(3);
    let mut procs = Processes::new(upstream.addr, 2, "3s").await;
    let (_, doomed) = procs.start().await;
    let (_, survivor) = procs.start().await;
    let client = reqwest::Client::new();
    let send = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(format!("{url}/work"))
                .header("x-org-id", "acme")
                .send()
                .await
        }
    };
    // The doomed replica takes both slots.
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(send(doomed.clone()))).collect();
    let at_upstream = eventually(Duration::from_secs(5), || async {
        upstream.now.load(Ordering::SeqCst) == 2
    })
    .await;
    assert!(at_upstream.is_some(), "both requests reached the upstream");
    let r = send(survivor.clone()).await.unwrap();
    assert_eq!(r.status(), 429, "the org's two slots are taken");

    // Renewal keeps them past the TTL while their replica lives.
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    let r = send(survivor.clone()).await.unwrap();
    assert_eq!(r.status(), 429, "live slots are renewed, not swept");

    procs.kill(0);
    let killed = Instant::now();
    for h in held {
        assert!(
            h.await.unwrap().is_err(),
            "the killed replica's clients lost their answers"
        );
    }
    // Within the TTL (plus one renewal period of slack on the last expiry) the survivor admits.
    let back = tokio::spawn(send(survivor.clone()));
    let freed = eventually(Duration::from_secs(8), || async {
        let r = client
            .get(format!("{survivor}/work"))
            .header("x-org-id", "acme")
            .timeout(Duration::from_millis(500))
            .send()
            .await;
        // Admitted requests hang at the upstream: a timeout here means it was forwarded.
        matches!(r, Err(e) if e.is_timeout())
    })
    .await;
    let waited = killed.elapsed();
    assert!(
        freed.is_some(),
        "the dead replica's slots came back ({waited:?} after the kill)"
    );
    assert!(
        waited <= ttl + Duration::from_secs(2),
        "slots freed {waited:?} after the kill, TTL {ttl:?}"
    );
    back.abort();
}

#[tokio::test]
async fn with_leases_a_request_that_needs_a_slot_still_goes_to_redis() {
    let upstream = SlowUpstream::start(Duration::from_millis(500)).await;
    let mut proxy = proxy_settings(upstream.addr);
    proxy.identity.mode = quota_gateway::config::IdentityMode::Header;
    proxy.request_timeout = Duration::from_secs(30);
    let app = spawn_app_with(TestOptions {
        plans: plans(2),
        proxy: Some(proxy),
        leases: quota_gateway::config::LeaseSettings {
            enabled: true,
            ttl: Duration::from_secs(5),
            max_block: 100,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // Warm the org's blocks: later requests could be admitted from them without Redis.
    for _ in 0..3 {
        assert_eq!(get(&app, "acme").await.status(), 200);
    }
    let answers = join_all((0..10).map(|_| get(&app, "acme"))).await;
    let admitted = answers.iter().filter(|r| r.status() == 200).count();
    assert_eq!(upstream.max.load(Ordering::SeqCst), 2);
    assert!(admitted < 10, "the concurrency limit held with leases on");
    assert_eq!(
        answers.iter().filter(|r| r.status() == 429).count(),
        10 - admitted
    );
}

#[tokio::test]
async fn with_a_queue_timeout_a_refused_request_waits_for_a_slot() {
    let upstream = SlowUpstream::start(Duration::from_millis(150)).await;
    let queued = |queue_timeout: Duration| {
        let settings = quota_gateway::config::SlotSettings {
            ttl: Duration::from_secs(30),
            queue_timeout,
        };
        gateway_with(upstream.addr, LIMIT, settings)
    };
    // Long enough for every request to get its turn: 20 requests over two replicas, 5 at a
    // time, all admitted, never more than 5 at the upstream.
    let a = queued(Duration::from_secs(20)).await;
    let b = a.spawn_peer().await;
    let answers = join_all((0..20).map(|i| get(if i % 2 == 0 { &a } else { &b }, "acme"))).await;
    assert!(
        answers.iter().all(|r| r.status() == 200),
        "{:?}",
        answers.iter().map(|r| r.status()).collect::<Vec<_>>()
    );
    assert_eq!(upstream.total.load(Ordering::SeqCst), 20);
    assert!(upstream.max.load(Ordering::SeqCst) <= LIMIT);
    let waited = metric_value(
        &a,
        "quota_gateway_concurrency_queued_total{outcome=\"admitted\"}",
    )
    .await
        + metric_value(
            &b,
            "quota_gateway_concurrency_queued_total{outcome=\"admitted\"}",
        )
        .await;
    assert!(waited >= 1.0, "no request waited for a slot");
    // Each request was charged once, however often it asked.
    assert_eq!(a.usage_of("acme", "requests").await, 20);

    // A wait much shorter than the responses (150 ms): the ones that get no slot in time are
    // refused.
    let c = queued(Duration::from_millis(20)).await;
    let answers = join_all((0..10).map(|_| get(&c, "org-2"))).await;
    let refused = answers.iter().filter(|r| r.status() == 429).count();
    assert_eq!(refused, 10 - LIMIT);
    assert_eq!(
        metric_value(
            &c,
            "quota_gateway_concurrency_queued_total{outcome=\"timed_out\"}"
        )
        .await,
        (10 - LIMIT) as f64
    );
}
