//! What the drills are made of: a paced load of many clients that keeps its own books, readers of
//! the Redis counter and the Postgres ledger, real gateway processes, and a private Redis.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use quota_gateway::config::{EnvOverrides, RedisSettings};
use quota_gateway::store::Conn;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::helpers::{self, test_database_url, test_redis_url};

/// How big the drills are: `QG_DRILL_SCALE=short` (the default, what `cargo test` runs) or `full`.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub name: &'static str,
    pub clients: usize,
    /// Requests per load, over `load`.
    pub requests: usize,
    /// The monthly quota, far below the demand.
    pub quota: i64,
    pub load: Duration,
    /// How long a fault lasts.
    pub outage: Duration,
    /// Longest a drill may take before it is reported as hung.
    pub limit: Duration,
}

impl Scale {
    pub fn from_env() -> Scale {
        match std::env::var("QG_DRILL_SCALE").as_deref() {
            Ok("full") => Scale {
                name: "full",
                clients: 200,
                requests: 50_000,
                quota: 5_000,
                load: Duration::from_secs(30),
                outage: Duration::from_secs(8),
                limit: Duration::from_secs(600),
            },
            Ok("short") | Err(_) => Scale {
                name: "short",
                clients: 200,
                requests: 5_000,
                quota: 500,
                load: Duration::from_secs(3),
                outage: Duration::from_millis(1200),
                limit: Duration::from_secs(60),
            },
            Ok(other) => panic!("QG_DRILL_SCALE: `{other}` is neither `short` nor `full`"),
        }
    }
}

/// The catalog of every drill: one monthly quota on `requests`; `tokens` metered, unlimited.
pub fn plans(quota: i64) -> String {
    format!(
        "default_plan = \"metered\"\n[metrics]\nrequests = {{ unit = \"request\" }}\n\
         tokens = {{ unit = \"token\" }}\n[plans.metered]\n\
         quotas = {{ requests = {{ limit = {quota}, period = \"month\" }} }}\n"
    )
}

/// `[redis]` as a deployment gets it when it sets nothing (timeout, outage mode, share): the
/// drills run what users run, not the harness's generous test settings.
pub fn production_redis() -> RedisSettings {
    let dir = temp_dir("qg-drill-defaults");
    std::fs::write(dir.join("plans.toml"), plans(1)).unwrap();
    std::fs::write(
        dir.join("gateway.toml"),
        "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"t\"\n\
         [redis]\nurl = \"redis://127.0.0.1:6379\"\n\
         [database]\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\n",
    )
    .unwrap();
    let (settings, _) =
        quota_gateway::config::load(&dir.join("gateway.toml"), &EnvOverrides::default())
            .unwrap_or_else(|e| panic!("default configuration: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    settings.redis
}

pub fn temp_dir(stem: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{stem}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    quota_gateway::domain::period::calendar_month(t).start
}

// ---- load ---------------------------------------------------------------------------------

/// One kind of request a client sends.
#[derive(Clone, Debug)]
pub enum Call {
    /// `POST /v1/check` of one `requests` for `org`.
    Check { url: String, org: String },
    /// `GET` through the reverse proxy with an API key; each request is charged one `requests`.
    Proxy { url: String, key: String },
}

/// The clients' books, kept as answers arrive.
#[derive(Default, Debug)]
pub struct Tally {
    /// Units the gateway said were admitted (200).
    pub admitted: AtomicI64,
    /// Denied (402, 429).
    pub denied: AtomicI64,
    /// Answered with anything else, or the connection failed after the request left: the
    /// client cannot know whether it was counted.
    pub in_doubt: AtomicI64,
    /// Never reached a gateway (connection refused): certainly not counted.
    pub refused: AtomicI64,
    pub started: AtomicI64,
    pub finished: AtomicI64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Books {
    pub admitted: i64,
    pub denied: i64,
    pub in_doubt: i64,
    pub refused: i64,
}

impl Tally {
    pub fn books(&self) -> Books {
        Books {
            admitted: self.admitted.load(Ordering::SeqCst),
            denied: self.denied.load(Ordering::SeqCst),
            in_doubt: self.in_doubt.load(Ordering::SeqCst),
            refused: self.refused.load(Ordering::SeqCst),
        }
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> i64 {
        self.started.load(Ordering::SeqCst) - self.finished.load(Ordering::SeqCst)
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// `clients` concurrent clients sending `requests` in all, evenly paced over `duration`, client
/// `i`'s `j`-th request going to `calls[(i + j) % calls.len()]`.
pub struct Load {
    pub tally: Arc<Tally>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    pub fn start(calls: Vec<Call>, clients: usize, requests: usize, duration: Duration) -> Load {
        let tally = Arc::new(Tally::default());
        let client = http_client();
        let calls = Arc::new(calls);
        let per_client = requests.div_ceil(clients);
        let interval = duration / per_client.max(1) as u32;
        let t0 = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(clients);
        for i in 0..clients {
            let n = requests / clients + usize::from(i < requests % clients);
            let (tally, client, calls) = (tally.clone(), client.clone(), calls.clone());
            // Stagger the clients so the load is smooth rather than 200 at once.
            let offset = interval.mul_f64(i as f64 / clients as f64);
            tasks.push(tokio::spawn(async move {
                for j in 0..n {
                    tokio::time::sleep_until(t0 + offset + interval * j as u32).await;
                    let call = &calls[(i + j) % calls.len()];
                    tally.started.fetch_add(1, Ordering::SeqCst);
                    send(&client, call, &tally).await;
                    tally.finished.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        let task = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
        Load { tally, task }
    }

    /// Wait until the clients were admitted `units` (or the load ended).
    pub async fn until_admitted(&self, units: i64) {
        while self.tally.admitted.load(Ordering::SeqCst) < units && !self.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub async fn finish(self) -> Books {
        let _ = self.task.await;
        self.tally.books()
    }
}

async fn send(client: &reqwest::Client, call: &Call, tally: &Tally) {
    let result = match call {
        Call::Check { url, org } => {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(format!(r#"{{"org_id":"{org}","metric":"requests"}}"#))
                .send()
                .await
        }
        Call::Proxy { url, key } => client.get(url).header("x-api-key", key).send().await,
    };
    match result {
        Ok(r) => {
            let status = r.status().as_u16();
            // Read the body: a proxied answer is only whole once its body arrived.
            let body = r.bytes().await;
            match (status, body) {
                (200, Ok(_)) => tally.admitted.fetch_add(1, Ordering::SeqCst),
                (402 | 429, _) => tally.denied.fetch_add(1, Ordering::SeqCst),
                _ => tally.in_doubt.fetch_add(1, Ordering::SeqCst),
            };
        }
        Err(e) if e.is_connect() => {
            tally.refused.fetch_add(1, Ordering::SeqCst);
        }
        Err(_) => {
            tally.in_doubt.fetch_add(1, Ordering::SeqCst);
        }
    }
}

// ---- the numbers --------------------------------------------------------------------------

/// Reads the month counter in Redis and the ledger row in Postgres, directly.
pub struct Ledger {
    pub prefix: String,
    pub redis: Conn,
    pub pool: PgPool,
}

impl Ledger {
    /// The `metric` counter of `org` for the month starting at `month`, in Redis (0: no key).
    pub async fn redis_month(&self, org: &str, metric: &str, month: DateTime<Utc>) -> i64 {
        let key = format!(
            "{}:{{{org}}}:c:{metric}:month:{}",
            self.prefix,
            month.timestamp()
        );
        let mut c = self.redis.clone();
        let v: Option<i64> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("reading {key}: {e}"));
        v.unwrap_or(0)
    }

    /// The `usage_counters` quantity (0: no row).
    pub async fn ledger_month(&self, org: &str, metric: &str, month: DateTime<Utc>) -> i64 {
        let q: Option<i64> = sqlx::query_scalar(
            "SELECT quantity FROM usage_counters WHERE org_id = $1 AND metric = $2 AND period_start = $3",
        )
        .bind(org)
        .bind(metric)
        .bind(month)
        .fetch_optional(&self.pool)
        .await
        .unwrap();
        q.unwrap_or(0)
    }
}

/// A connection to the standalone Redis at `url`.
pub fn redis_at(url: &str) -> Conn {
    Conn::standalone(
        redis::Client::open(url).unwrap(),
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .unwrap()
}

/// The sum of `quota_gateway_in_doubt_total` over its labels on one replica (0 while the
/// gateway does not export it).
pub async fn in_doubt_metric(base: &str) -> i64 {
    let Ok(r) = http_client().get(format!("{base}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    // Decisions of unknown outcome (a unit each in the drills), and the units lease
    // settlements carried on calls of unknown outcome.
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("quota_gateway_in_doubt_total{outcome=\"unknown\"} ")
                .or_else(|| l.strip_prefix("quota_gateway_lease_unknown_units_total "))
        })
        .filter_map(|v| v.parse::<f64>().ok())
        .sum::<f64>() as i64
}

/// Wait until the replica at `base` says it is ready (not degraded); false after `timeout`.
pub async fn wait_ready(base: &str, timeout: Duration) -> bool {
    let client = http_client();
    helpers::eventually(timeout, || async {
        match client.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status() == 200 => r
                .json::<Value>()
                .await
                .is_ok_and(|v| v["status"] == "ready"),
            _ => false,
        }
    })
    .await
    .is_some()
}

// ---- real processes -----------------------------------------------------------------------

/// A database and a key prefix for gateway processes, dropped at the end like the harness's.
pub struct Deployment {
    pub dir: PathBuf,
    pub db_name: String,
    pub prefix: String,
    pub pool: PgPool,
    pub plans: String,
    /// `[redis] url` the processes use (possibly through a `ChaosProxy`).
    pub redis_url: String,
    /// Extra `[redis]` lines (e.g. `local_share = 0.5`).
    pub redis_extra: String,
}

impl Deployment {
    pub async fn new(plans: String, redis_url: String, redis_extra: &str) -> Deployment {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("qg_test_{id}");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&test_database_url())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{db_name}\""
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db_url(&db_name))
            .await
            .unwrap();
        Deployment {
            dir: temp_dir("qg-drill"),
            db_name,
            prefix: format!("qgt-{}", &id[..12]),
            pool,
            plans,
            redis_url,
            redis_extra: redis_extra.to_string(),
        }
    }

    pub fn ledger(&self) -> Ledger {
        Ledger {
            prefix: self.prefix.clone(),
            redis: redis_at(&test_redis_url()),
            pool: self.pool.clone(),
        }
    }

    /// Start one gateway process listening on `port` and wait until it serves.
    pub async fn start(&self, name: &str, port: u16) -> Replica {
        std::fs::write(self.dir.join("plans.toml"), &self.plans).unwrap();
        let config = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:{port}\"\nadmin_token = \"t\"\n\
                 [redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\n{}\n[database]\nurl = \"{}\"\n\
                 [log]\nformat = \"json\"\nlevel = \"info\"\n",
                self.redis_url,
                self.prefix,
                self.redis_extra,
                db_url(&self.db_name)
            ),
        )
        .unwrap();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_quota-gateway"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env_remove("QG_API_LISTEN")
            .env_remove("QG_ADMIN_TOKEN")
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let replica = Replica {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = http_client();
        let up = helpers::eventually(Duration::from_secs(30), || async {
            client
                .get(format!("{}/readyz", replica.url))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(up.is_some(), "gateway process {name} came up");
        replica
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let db_name = self.db_name.clone();
        let prefix = self.prefix.clone();
        let dir = self.dir.clone();
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
                // The processes always use the standalone Redis, even when the suite runs
                // against a cluster.
                let mut conn = redis_at(&test_redis_url());
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{prefix}:*"))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                for key in keys {
                    let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
                }
            });
        })
        .join();
        if std::env::var_os("QG_DRILL_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn db_url(db_name: &str) -> String {
    let base = test_database_url();
    let cut = base.rfind('/').unwrap();
    format!("{}/{db_name}", &base[..cut])
}

/// A gateway process.
pub struct Replica {
    child: Option<Child>,
    pub url: String,
}

impl Replica {
    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
    }

    /// SIGKILL: no drain, no final flush.
    pub async fn kill(&mut self) {
        self.signal("-KILL");
        if let Some(mut child) = self.child.take() {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// SIGTERM, then wait for the exit; its exit code (`None`: killed after 30 s).
    pub async fn term(&mut self) -> Option<i32> {
        self.signal("-TERM");
        let mut child = self.child.take()?;
        let waited = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(status)) = child.try_wait() {
                    return status.code();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            None
        });
        waited.await.ok().flatten()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
