//! Shared test harness: a real gateway on port 0 against the real Redis and Postgres.
//!
//! Isolation: every `spawn_app` gets its own Postgres database (created here, migrated by the
//! gateway itself, dropped when the last handle goes away) and its own Redis key prefix (all
//! keys deleted at the end). Peers made with `spawn_peer` share both, like replicas in
//! production. Set `QG_TEST_DATABASE_URL` / `QG_TEST_REDIS_URL` to point elsewhere.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use quota_gateway::clock::Clock;
use quota_gateway::config::{
    self, ApiSettings, DatabaseSettings, LogFormat, LogSettings, RedisSettings, Settings,
    UsageSettings,
};
use quota_gateway::config::{IdentitySettings, ProxySettings, RefundOn};
use quota_gateway::domain::plan::Catalog;
use quota_gateway::proxy::ProxyState;
use quota_gateway::proxy::routes::{ChargeSpec, RouteAction, RouteTable};
use quota_gateway::startup::{Application, Options};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn test_database_url() -> String {
    std::env::var("QG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn test_redis_url() -> String {
    std::env::var("QG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Seed URLs of a Redis Cluster to run the suite against (`QG_TEST_REDIS_CLUSTER`, a comma-
/// separated list, as printed by `scripts/redis-cluster.sh`); `None`: a standalone Redis.
pub fn cluster_seeds() -> Option<Vec<String>> {
    std::env::var("QG_TEST_REDIS_CLUSTER")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
}

/// Tests that put a TCP proxy in front of Redis cannot work against a cluster (nodes announce
/// their own addresses); they say so and return.
pub fn skip_in_cluster_mode(test: &str) -> bool {
    if cluster_seeds().is_some() {
        eprintln!("{test}: skipped against a Redis Cluster (it proxies a single Redis)");
        return true;
    }
    false
}

/// A connection for assertions: to the same Redis (or cluster) the gateway uses.
pub async fn test_redis_conn() -> quota_gateway::store::Conn {
    let conn = match cluster_seeds() {
        Some(seeds) => quota_gateway::store::Conn::cluster(
            &seeds,
            Duration::from_secs(2),
            Duration::from_secs(5),
        ),
        None => quota_gateway::store::Conn::standalone(
            redis::Client::open(test_redis_url()).unwrap(),
            Duration::from_secs(2),
            Duration::from_secs(5),
        ),
    };
    conn.unwrap()
}

/// Every key matching `pattern`, on every node.
pub async fn keys_matching(pattern: &str) -> Vec<String> {
    let nodes = cluster_seeds().unwrap_or_else(|| vec![test_redis_url()]);
    let mut keys = Vec::new();
    for node in nodes {
        let Ok(client) = redis::Client::open(node.as_str()) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        keys.extend(found);
    }
    keys.sort();
    keys
}

/// The catalog most tests use: small limits so they are reached quickly.
pub const PLANS: &str = r#"
default_plan = "free"
upgrade_url = "https://example.com/upgrade?org={org_id}&plan={plan}"

[metrics]
requests = { unit = "request" }
tokens   = { unit = "token" }
projects = { unit = "project", kind = "gauge" }

[plans.free]
name = "Free"
upgrade_to = "pro"
features = ["export_md"]
quotas = { requests = { limit = 20, period = "month" }, tokens = { limit = 1000, period = "month" }, projects = { limit = 3 } }
rates  = { requests = { limit = 10, window = "1s" } }

[plans.pro]
name = "Pro"
upgrade_to = "enterprise"
features = ["export_md", "export_pdf"]
quotas = { requests = { limit = 1000, period = "month" }, projects = { limit = 50 } }

[plans.enterprise]
name = "Enterprise"
features = ["export_md", "export_pdf", "sso"]
"#;

/// A clock tests move by hand. It starts at the real time (counter expiries are absolute
/// timestamps, so a clock in the past would make Redis expire keys at once) and only moves on
/// when told.
pub struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(Utc::now())))
    }

    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap() = t;
    }

    pub fn advance(&self, d: chrono::Duration) {
        *self.0.lock().unwrap() += d;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

/// Drops the test database and the Redis keys when the last app handle goes away.
struct Resources {
    db_name: String,
    prefix: String,
}

impl Drop for Resources {
    fn drop(&mut self) {
        let db_name = self.db_name.clone();
        let prefix = self.prefix.clone();
        // Drop runs inside the test's runtime, which cannot block on async work: clean up on a
        // thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(pool) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&test_database_url())
                    .await
                {
                    let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
                let mut conn = test_redis_conn().await;
                for key in keys_matching(&format!("{prefix}:*")).await {
                    // One key per command: keys of different orgs live in different slots.
                    let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
                }
            });
        })
        .join();
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub prefix: String,
    pub db_url: String,
    pub pool: PgPool,
    pub redis: quota_gateway::store::Conn,
    pub clock: Arc<TestClock>,
    pub settings: Settings,
    pub catalog: Catalog,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    resources: Arc<Resources>,
    /// The reverse proxy's address when `TestOptions::proxy` was set.
    pub proxy_addr: Option<SocketAddr>,
    pub proxy_state: Option<Arc<ProxyState>>,
    /// The application's shared state, for calling background steps directly.
    pub state: quota_gateway::api::SharedState,
    /// The proxy in front of Postgres when `TestOptions::postgres_proxy` was set.
    pub pg_proxy: Option<Arc<ChaosProxy>>,
}

pub struct TestOptions {
    pub plans: String,
    pub service_token: Option<String>,
    /// Redis URL the gateway uses (e.g. through a `ChaosProxy`); the harness itself always
    /// talks to the real server for assertions and clean-up.
    pub redis_url: Option<String>,
    /// Load the catalog from this file (and reload it from there) instead of `plans`.
    pub plans_file: Option<PathBuf>,
    /// `[enforcement] mode = "shadow"`.
    pub shadow: bool,
    /// `[redis] on_error` and `local_share`.
    pub on_error: quota_gateway::config::OnRedisError,
    pub local_share: f64,
    /// `[api] guard_per_second` and `guard_burst`.
    pub guard: Option<(u32, u32)>,
    /// Run the reverse proxy with these settings (see `proxy_settings`).
    pub proxy: Option<ProxySettings>,
    /// `[billing]` for the webhook endpoints.
    pub billing: Option<quota_gateway::config::BillingSettings>,
    /// Reach Postgres through a `ChaosProxy` (kept in `TestApp::pg_proxy`).
    pub postgres_proxy: bool,
    /// `[redis] timeout` (the harness default is 2 s).
    pub redis_timeout: Option<Duration>,
    /// `[redis] require_noeviction = false`.
    pub allow_eviction: bool,
    /// Seed URLs (comma-separated) of a Redis Cluster the gateway uses instead of the shared
    /// Redis; the harness still asserts and cleans up on the shared one.
    pub redis_cluster: Option<String>,
    /// `[api.conn]` (timeouts and connection cap of the API listener).
    pub api_conn: Option<quota_gateway::config::ConnSettings>,
    /// `[notifications]`.
    pub notifications: Option<quota_gateway::config::NotifySettings>,
    /// `[leases]` (off by default, as in production).
    pub leases: quota_gateway::config::LeaseSettings,
    /// `[usage] reservation_expiry`.
    pub reservation_expiry: quota_gateway::domain::reservation::OnExpiry,
    /// `[concurrency]` (slot lease TTL).
    pub concurrency: quota_gateway::config::SlotSettings,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            plans: PLANS.into(),
            service_token: None,
            redis_url: None,
            plans_file: None,
            shadow: false,
            on_error: Default::default(),
            local_share: 1.0,
            guard: None,
            proxy: None,
            billing: None,
            postgres_proxy: false,
            redis_timeout: None,
            allow_eviction: false,
            redis_cluster: None,
            api_conn: None,
            notifications: None,
            leases: Default::default(),
            reservation_expiry: Default::default(),
            concurrency: Default::default(),
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

pub async fn spawn_app_with(opts: TestOptions) -> TestApp {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("qg_test_{id}");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&test_database_url())
        .await
        .expect("test Postgres reachable (QG_TEST_DATABASE_URL)");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{db_name}\""
    )))
    .execute(&admin)
    .await
    .expect("create test database");
    admin.close().await;
    let db_url = replace_db_name(&test_database_url(), &db_name);
    let prefix = format!("qgt-{}", &id[..12]);
    let catalog = match &opts.plans_file {
        Some(path) => config::load_catalog(path),
        None => config::catalog_from_str(&PathBuf::from("test-plans.toml"), &opts.plans),
    }
    .unwrap_or_else(|e| panic!("test catalog invalid: {e}"));
    let mut settings = test_settings(&db_url, &prefix, opts.service_token.as_deref());
    if let Some(seeds) = cluster_seeds() {
        settings.redis.mode = quota_gateway::config::RedisMode::Cluster;
        settings.redis.url = SecretString::from(seeds.join(","));
    }
    if let Some(url) = opts.redis_url {
        settings.redis.url = SecretString::from(url);
        settings.redis.mode = quota_gateway::config::RedisMode::Standalone;
    }
    if let Some(seeds) = opts.redis_cluster {
        settings.redis.url = SecretString::from(seeds);
        settings.redis.mode = quota_gateway::config::RedisMode::Cluster;
    }
    if let Some(path) = opts.plans_file {
        settings.plans_path = path;
    }
    if let Some((per_second, burst)) = opts.guard {
        settings.api.guard_per_second = std::num::NonZeroU32::new(per_second).unwrap();
        settings.api.guard_burst = std::num::NonZeroU32::new(burst).unwrap();
    }
    settings.proxy = opts.proxy;
    settings.billing = opts.billing;
    if let Some(conn) = opts.api_conn {
        settings.api.conn = conn;
    }
    if let Some(n) = opts.notifications {
        settings.notifications = n;
    }
    let pg_proxy = if opts.postgres_proxy {
        let proxy = ChaosProxy::start(&host_port(&test_database_url())).await;
        let through = db_url.replacen(&host_port(&test_database_url()), &proxy.addr.to_string(), 1);
        settings.database.url = SecretString::from(through);
        Some(Arc::new(proxy))
    } else {
        None
    };
    if let Some(timeout) = opts.redis_timeout {
        settings.redis.timeout = timeout;
    }
    settings.redis.on_error = opts.on_error;
    settings.redis.require_noeviction = !opts.allow_eviction;
    settings.redis.local_share = opts.local_share;
    settings.leases = opts.leases;
    settings.usage.reservation_expiry = opts.reservation_expiry;
    settings.concurrency = opts.concurrency;
    if opts.shadow {
        settings.enforcement = quota_gateway::domain::plan::Enforcement::Shadow;
    }
    let resources = Arc::new(Resources {
        db_name,
        prefix: prefix.clone(),
    });
    let mut app = start(settings, catalog, TestClock::new(), resources).await;
    app.pg_proxy = pg_proxy;
    app
}

impl TestApp {
    /// A second replica: same database, same Redis prefix, same clock, its own listener.
    pub async fn spawn_peer(&self) -> TestApp {
        start(
            self.settings.clone(),
            self.catalog.clone(),
            self.clock.clone(),
            self.resources.clone(),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.expect("request")
    }

    pub async fn check(&self, body: Value) -> reqwest::Response {
        self.post("/v1/check", &body).await
    }

    pub async fn set_plan(&self, org: &str, plan: &str) {
        let r = self
            .admin(
                reqwest::Method::PUT,
                &format!("/admin/orgs/{org}"),
                Some(&serde_json::json!({ "plan": plan })),
            )
            .await;
        assert_eq!(r.status(), 200, "set plan: {}", r.text().await.unwrap());
    }

    /// The raw value of a Redis key (`None` when absent).
    pub async fn redis_get(&self, key: &str) -> Option<String> {
        let mut c = self.redis.clone();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// One flush of this replica's changed counters to Postgres, now.
    pub async fn flush(
        &self,
    ) -> Result<quota_gateway::flush::FlushOutcome, quota_gateway::flush::FlushError> {
        quota_gateway::flush::try_flush_once(
            self.state.quota.store(),
            &self.state.pool,
            &self.state.metrics,
            self.clock_now(),
        )
        .await
    }

    /// The `usage_counters` quantity of a metric in the current month (None: no row).
    pub async fn stored_usage(&self, org: &str, metric: &str) -> Option<i64> {
        let month = quota_gateway::domain::period::calendar_month(self.clock_now()).start;
        sqlx::query_scalar(
            "SELECT quantity FROM usage_counters WHERE org_id = $1 AND metric = $2 AND period_start = $3",
        )
        .bind(org)
        .bind(metric)
        .bind(month)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    /// Keys holding usage (counters, gauges, rate state), without version keys, restore
    /// markers or idempotency markers.
    pub async fn usage_keys(&self) -> Vec<String> {
        self.redis_keys()
            .await
            .into_iter()
            .filter(|k| {
                !k.ends_with(":v")
                    && !k.ends_with(":l")
                    && !k.contains("}:restored:")
                    && !k.contains("}:idem:")
            })
            .collect()
    }

    /// Every key of this test's prefix.
    pub async fn redis_keys(&self) -> Vec<String> {
        keys_matching(&format!("{}:*", self.prefix)).await
    }

    /// Delete every key of this gateway from Redis, as a restart without persistence or a
    /// failover to an empty replica would.
    pub async fn lose_redis(&self) {
        let mut conn = self.redis.clone();
        for key in self.redis_keys().await {
            let _: () = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    /// Stop this replica as SIGTERM does and start a new one on the same database, Redis prefix
    /// and clock (a restart).
    pub async fn restart(self) -> TestApp {
        let settings = self.settings.clone();
        let catalog = self.catalog.clone();
        let clock = self.clock.clone();
        let resources = self.resources.clone();
        let _kept = self.shutdown().await;
        start(settings, catalog, clock, resources).await
    }

    /// Stop serving and wait for the background tasks (what SIGTERM does in production).
    /// Returns a guard that keeps the test's database and keys alive while the caller checks
    /// what the stopped gateway left behind.
    pub async fn shutdown(mut self) -> Box<dyn std::any::Any + Send + Sync> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
        Box::new(self.resources.clone())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(
    settings: Settings,
    catalog: Catalog,
    clock: Arc<TestClock>,
    resources: Arc<Resources>,
) -> TestApp {
    let app = Application::build(
        settings.clone(),
        catalog.clone(),
        Options {
            migrate: true,
            clock: clock.clone(),
        },
    )
    .await
    .expect("application builds");
    let addr = app.api_addr();
    let proxy_addr = app.proxy_addr();
    let proxy_state = app.proxy_state();
    let state = app.state().clone();
    let stop = app.stop_token();
    let task = tokio::spawn(app.run_until_stopped(std::future::pending()));
    // The harness talks to Postgres directly, even when the gateway goes through a proxy.
    let direct_db_url = replace_db_name(&test_database_url(), &resources.db_name);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&direct_db_url)
        .await
        .unwrap();
    let redis = test_redis_conn().await;
    TestApp {
        pg_proxy: None,
        state,
        addr,
        client: reqwest::Client::new(),
        prefix: settings.redis.key_prefix.clone(),
        db_url: settings_db_url(&settings),
        pool,
        redis,
        clock,
        settings,
        catalog,
        stop,
        task: Some(task),
        resources,
        proxy_addr,
        proxy_state,
    }
}

fn settings_db_url(s: &Settings) -> String {
    use secrecy::ExposeSecret;
    s.database.url.expose_secret().to_string()
}

pub fn test_settings(db_url: &str, prefix: &str, service_token: Option<&str>) -> Settings {
    Settings {
        config_path: PathBuf::from("test-gateway.toml"),
        plans_path: PathBuf::from("test-plans.toml"),
        api: ApiSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: SecretString::from(ADMIN_TOKEN),
            service_token: service_token.map(SecretString::from),
            guard_per_second: std::num::NonZeroU32::new(100).unwrap(),
            guard_burst: std::num::NonZeroU32::new(200).unwrap(),
            conn: Default::default(),
        },
        redis: RedisSettings {
            url: SecretString::from(test_redis_url()),
            key_prefix: prefix.into(),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            on_error: Default::default(),
            local_share: 1.0,
            mode: Default::default(),
            require_noeviction: true,
        },
        database: DatabaseSettings {
            url: SecretString::from(db_url.to_string()),
            max_connections: 5,
            connect_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(10),
        },
        log: LogSettings {
            format: LogFormat::Pretty,
            level: "warn".into(),
        },
        usage: UsageSettings {
            idempotency_ttl: Duration::from_secs(48 * 3600),
            reservation_expiry: Default::default(),
        },
        enforcement: Default::default(),
        proxy: None,
        billing: None,
        flush: Default::default(),
        notifications: Default::default(),
        leases: Default::default(),
        concurrency: Default::default(),
    }
}

fn replace_db_name(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Poll `f` until it returns true or `timeout` passes; returns how long it took.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

pub async fn json(r: reqwest::Response) -> Value {
    r.json().await.expect("JSON body")
}

impl TestApp {
    pub fn clock_now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

/// RFC 3339 of the first instant of the month after `t`.
pub fn next_month_start(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, TimeZone};
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A TCP proxy the test controls, placed between the gateway and Redis or Postgres to cut the
/// connection without touching the shared server (other tests keep using it). It can also delay
/// what goes towards the server (`set_delay`), to make a server slow rather than down.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
    /// Per-chunk delay towards the target, in ms: (min, max); (0, 0) means none.
    delay: Arc<Mutex<(u64, u64)>>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosProxy {
    pub async fn start(target: &str) -> ChaosProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let delay = Arc::new(Mutex::new((0, 0)));
        let target = target.to_string();
        let task = tokio::spawn({
            let open = open.clone();
            let cuts = cuts.clone();
            let delay = delay.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !open.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    let target = target.clone();
                    let delay = delay.clone();
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                            return;
                        };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (in_read, mut in_write) = inbound.into_split();
                        let (mut out_read, out_write) = outbound.into_split();
                        tokio::select! {
                            _ = delayed_copy(in_read, out_write, delay) => {}
                            _ = tokio::io::copy(&mut out_read, &mut in_write) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        ChaosProxy {
            addr,
            open,
            cuts,
            delay,
            task,
        }
    }

    /// Drop every open connection and refuse new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cuts.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Hold every chunk sent towards the target for a random time in `[min, max]`, on open
    /// connections too. A chunk never overtakes the one before it (bytes stay in order), so the
    /// server sees a slow link, not a broken one. `(0, 0)` removes the delay.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        *self.delay.lock().unwrap() = (min.as_millis() as u64, max.as_millis() as u64);
    }
}

/// Copy `from` to `to`, each chunk released no earlier than its own jittered deadline and never
/// before the chunk ahead of it. Returns when either side closes.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<Mutex<(u64, u64)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut last_due = tokio::time::Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (min, max) = *delay.lock().unwrap();
            let now = tokio::time::Instant::now();
            let wait = if max == 0 {
                0
            } else {
                rand::random_range(min..=max.max(min))
            };
            last_due = last_due.max(now + Duration::from_millis(wait));
            if tx.send((last_due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    // The writer finishes what the reader queued before the connection ends.
    tokio::join!(reader, writer);
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `host:port` of a redis:// or postgres:// URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

/// The entry of a `usage` array whose `field` equals `value` (e.g. `"metric", "tokens"`).
pub fn usage_entry(body: &Value, field: &str, value: &str) -> Value {
    body["usage"]
        .as_array()
        .unwrap_or_else(|| panic!("no usage array in {body}"))
        .iter()
        .find(|u| u[field] == value)
        .unwrap_or_else(|| panic!("no usage entry with {field} = {value} in {body}"))
        .clone()
}

// ---- reverse proxy ------------------------------------------------------------------------

/// Proxy settings for tests: port 0, short timeouts, every request charged one `requests`.
pub fn proxy_settings(upstream: SocketAddr) -> ProxySettings {
    ProxySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: format!("http://{upstream}").parse().unwrap(),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        conn: Default::default(),
        refund_on: RefundOn::default(),
        identity: IdentitySettings::default(),
        routes: RouteTable {
            routes: Vec::new(),
            default_route: Some(RouteAction {
                upstream: None,
                charges: vec![ChargeSpec {
                    metric: "requests".into(),
                    amount: 1,
                }],
                report: Vec::new(),
                reserve: None,
                unmetered: false,
            }),
        },
    }
}

/// A port nothing listens on (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

impl TestApp {
    /// A GET through the proxy with the key in `x-api-key`, the most common proxied request.
    pub async fn proxy_get(&self, path: &str, key: &str) -> reqwest::Response {
        self.client
            .get(self.proxy_url(path))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.proxy_addr.expect("app spawned with a proxy"),
            path
        )
    }

    /// Create an API key for `org` through the admin API; returns (key id, key).
    pub async fn create_key(&self, org: &str) -> (String, String) {
        let r = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/orgs/{org}/keys"),
                Some(&serde_json::json!({ "name": "test" })),
            )
            .await;
        assert_eq!(r.status(), 201, "create key");
        let v = json(r).await;
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    }

    /// `current` of one metric in the org's usage view (read from Redis).
    pub async fn usage_of(&self, org: &str, metric: &str) -> i64 {
        let v = json(self.get(&format!("/v1/orgs/{org}/usage")).await).await;
        v["usage"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["metric"] == metric)
            .unwrap_or_else(|| panic!("no usage entry for {metric}: {v}"))["current"]
            .as_i64()
            .unwrap()
    }

    /// Cancel the stop token (what SIGTERM does) without waiting.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Wait for `run_until_stopped` to return (after `stop`).
    pub async fn wait_stopped(&mut self, timeout: Duration) -> Option<anyhow::Result<()>> {
        let task = self.task.take()?;
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(r)) => Some(r),
            _ => None,
        }
    }
}

/// One request as the test upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    /// Collected only on echo paths.
    pub body: Vec<u8>,
}

/// A small real HTTP/1.1 upstream on 127.0.0.1:0. Paths:
/// `/tiny` (answers "ok", not recorded), `/stream` (body driven by `stream_sender`),
/// `/echo-stream` (streams the request body back as it arrives), `/sink` (counts the request body),
/// `/download/<bytes>`, `/status/<code>`, `/slow/<ms>`, `/report/<value>` (answers
/// `x-usage-tokens: <value>`), `/sse/<total>[/<events>/<pad>]` (server-sent events ending with
/// `usage.total_tokens`), `/trailer/<value>` (the trailer `x-usage-tokens`), `/hop` (answers with hop-by-hop headers), `/ws` (WebSocket echo);
/// anything else echoes the request body.
pub struct TestUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stream: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>>,
    stop: CancellationToken,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestUpstream {
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn last(&self) -> Received {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received a request")
    }

    /// The sender feeding the next `/stream` response; dropping it ends that body.
    pub fn stream_sender(&self) -> tokio::sync::mpsc::Sender<bytes::Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        *self.stream.lock().unwrap() = Some(rx);
        tx
    }
}

pub async fn spawn_upstream() -> TestUpstream {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = TestUpstream {
        addr,
        received: Arc::new(Mutex::new(Vec::new())),
        stream: Arc::new(Mutex::new(None)),
        stop: CancellationToken::new(),
    };
    let received = up.received.clone();
    let stream = up.stream.clone();
    let stop = up.stop.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let received = received.clone();
            let stream = stream.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    upstream_handle(req, received.clone(), stream.clone())
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .with_upgrades();
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    up
}

async fn upstream_handle(
    mut req: http::Request<hyper::body::Incoming>,
    received: Arc<Mutex<Vec<Received>>>,
    stream: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>>,
) -> Result<http::Response<axum::body::Body>, std::convert::Infallible> {
    use axum::body::Body;
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let mut record = Received {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
        body: Vec::new(),
    };
    let arg = |prefix: &str| path.strip_prefix(prefix).map(str::to_string);
    let response = if path == "/tiny" {
        // Not recorded: load tests send this path by the hundred thousand.
        http::Response::new(Body::from("ok"))
    } else if path == "/echo-stream" {
        // Echo the request body frame by frame while it is still arriving.
        received.lock().unwrap().push(record);
        http::Response::new(Body::new(req.into_body()))
    } else if path == "/stream" {
        received.lock().unwrap().push(record);
        let rx = stream.lock().unwrap().take().expect("stream_sender set");
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        });
        http::Response::new(Body::from_stream(body))
    } else if path == "/sink" {
        received.lock().unwrap().push(record);
        let mut body = req.into_body();
        let mut n: u64 = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map(|f| f.into_data()) {
                n += data.map(|d| d.len() as u64).unwrap_or(0);
            } else {
                break;
            }
        }
        http::Response::new(Body::from(n.to_string()))
    } else if let Some(n) = arg("/download/") {
        received.lock().unwrap().push(record);
        let total: u64 = n.parse().unwrap();
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        let body = futures_util::stream::unfold(0u64, move |sent| {
            let chunk = chunk.clone();
            async move {
                if sent >= total {
                    return None;
                }
                let len = (total - sent).min(chunk.len() as u64) as usize;
                Some((
                    Ok::<_, std::convert::Infallible>(chunk.slice(..len)),
                    sent + len as u64,
                ))
            }
        });
        http::Response::new(Body::from_stream(body))
    } else if let Some(code) = arg("/status/") {
        received.lock().unwrap().push(record);
        let mut r = http::Response::new(Body::from("upstream says no"));
        *r.status_mut() = http::StatusCode::from_u16(code.parse().unwrap()).unwrap();
        r
    } else if let Some(ms) = arg("/slow/") {
        received.lock().unwrap().push(record);
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        http::Response::new(Body::from("finally"))
    } else if let Some(rest) = arg("/sse/") {
        // Server-sent events, OpenAI style: `<events>` content events of `<pad>` bytes each,
        // then one carrying `usage.total_tokens = <total>`, then `[DONE]`:
        // `/sse/<total>` or `/sse/<total>/<events>/<pad>`.
        received.lock().unwrap().push(record);
        let mut parts = rest.split('/').map(|p| p.parse::<u64>().unwrap());
        let total = parts.next().unwrap();
        let events = parts.next().unwrap_or(3);
        let pad = parts.next().unwrap_or(10) as usize;
        let content = bytes::Bytes::from(format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(pad)
        ));
        let body = futures_util::stream::unfold(0u64, move |i| {
            let content = content.clone();
            async move {
                let frame = if i < events {
                    content
                } else if i == events {
                    bytes::Bytes::from(format!(
                        "data: {{\"usage\":{{\"prompt_tokens\":1,\"total_tokens\":{total}}}}}\n\n"
                    ))
                } else if i == events + 1 {
                    bytes::Bytes::from_static(b"data: [DONE]\n\n")
                } else {
                    return None;
                };
                Some((Ok::<_, std::convert::Infallible>(frame), i + 1))
            }
        });
        http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(body))
            .unwrap()
    } else if let Some(v) = arg("/trailer/") {
        // A chunked body, then the trailer `x-usage-tokens: <value>` (sent when the request
        // says `TE: trailers`).
        received.lock().unwrap().push(record);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-usage-tokens", v.parse().unwrap());
        let frames: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
            Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"part one, ",
            ))),
            Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"part two",
            ))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        http::Response::builder()
            .header("trailer", "x-usage-tokens")
            .body(Body::new(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            )))
            .unwrap()
    } else if let Some(v) = arg("/report/") {
        received.lock().unwrap().push(record);
        http::Response::builder()
            .header("x-usage-tokens", v)
            .body(Body::from("reported"))
            .unwrap()
    } else if path == "/hop" {
        received.lock().unwrap().push(record);
        http::Response::builder()
            .header("connection", "x-up-hop")
            .header("x-up-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-up-normal", "1")
            .body(Body::from("hop"))
            .unwrap()
    } else if path == "/ws" {
        received.lock().unwrap().push(record);
        let key = req
            .headers()
            .get("sec-websocket-key")
            .cloned()
            .expect("websocket key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        http::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Body::empty())
            .unwrap()
    } else {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        record.body = body.to_vec();
        received.lock().unwrap().push(record);
        http::Response::builder()
            .header("x-upstream", "yes")
            .body(Body::from(body))
            .unwrap()
    };
    Ok(response)
}

/// A `redis-server` of the test's own on a loopback port, without persistence, for faults that must
/// not touch the shared one: pausing it, reconfiguring it, killing it and starting it again empty on
/// the same port. Killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    extra: Vec<String>,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// On a free port, with `extra` arguments for `redis-server` (e.g. `--maxmemory-policy`).
    pub async fn start(extra: &[&str]) -> PrivateRedis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        Self::start_on(port, extra).await
    }

    pub async fn start_on(port: u16, extra: &[&str]) -> PrivateRedis {
        let mut redis = PrivateRedis {
            port,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        redis.spawn().await;
        redis
    }

    async fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let up = eventually(Duration::from_secs(10), || async {
            match self.conn().await {
                Ok(mut c) => redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
        .await;
        assert!(
            up.is_some(),
            "private redis-server on port {} came up",
            self.port
        );
    }

    /// SIGKILL the server: every key is gone with it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// Start it again, empty, on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// The value of the only key matching `pattern`, version keys aside (0 when none).
    pub async fn value_of(&self, pattern: &str) -> i64 {
        let mut c = self.conn().await.unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .unwrap();
        keys.retain(|k| !k.ends_with(":v"));
        assert!(keys.len() <= 1, "{pattern} matches {keys:?}");
        match keys.first() {
            Some(k) => redis::cmd("GET")
                .arg(k)
                .query_async::<Option<i64>>(&mut c)
                .await
                .unwrap()
                .unwrap_or(0),
            None => 0,
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of a metric line on `/metrics` (`name{labels}` exactly as exposed); 0 when absent.
pub async fn metric_value(app: &TestApp, series: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
