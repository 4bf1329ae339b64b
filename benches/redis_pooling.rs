//! Multiplexed connection vs. connection pool on the hot path.
//!
//! 64 concurrent tasks run the decide script (two limits, as a metered request does) for a few
//! seconds through (a) one multiplexed `ConnectionManager`, where concurrent commands are
//! pipelined on one socket, and (b) `deadpool-redis` pools, where each connection carries one
//! command at a time. Prints requests/s of each and the ratio. Needs Redis on 127.0.0.1:6379
//! (or `QG_BENCH_REDIS_URL`). Run: `cargo bench --bench redis_pooling`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TASKS: usize = 64;
const SECONDS: u64 = 5;

fn decide_cmd(script: &redis::Script, i: usize) -> redis::Cmd {
    // Two limits of one org (a monthly quota and a 1 s rate), spread over 1000 orgs.
    let org = i % 1000;
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(2)
        .arg(format!("qgbench-pool:{{o{org}}}:c:requests:month:0"))
        .arg(format!("qgbench-pool:{{o{org}}}:r:requests:1000"))
        .arg(now_us)
        .arg("check")
        .arg(0)
        .arg(0)
        .arg("c")
        .arg(1)
        .arg(1_000_000_000_000u64)
        .arg("1")
        .arg(now_us / 1000 + 3_600_000)
        .arg("r")
        .arg(1)
        .arg(1_000_000_000u64)
        .arg("1")
        .arg(1_000_000);
    cmd
}

async fn drive<F, Fut>(name: &str, call: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = redis::RedisResult<Vec<i64>>> + Send,
{
    let call = Arc::new(call);
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (call, done, errors) = (call.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while Instant::now() < deadline {
                match call(i).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                i += TASKS;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let rps = done.load(Ordering::Relaxed) as f64 / SECONDS as f64;
    println!(
        "{name:<40} {rps:>10.0} req/s   errors: {}",
        errors.load(Ordering::Relaxed)
    );
    rps
}

#[tokio::main]
async fn main() {
    let url =
        std::env::var("QG_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let script = Arc::new(redis::Script::new(include_str!("../src/store/decide.lua")));
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let mut setup = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis reachable");
    script.load_async(&mut setup).await.expect("script loads");

    let manager = client
        .get_connection_manager()
        .await
        .expect("connection manager");
    let multiplexed = {
        let script = script.clone();
        drive("multiplexed ConnectionManager (1 socket)", move |i| {
            let mut conn = manager.clone();
            let cmd = decide_cmd(&script, i);
            async move { cmd.query_async(&mut conn).await }
        })
        .await
    };
    let mut best_pool: f64 = 0.0;
    for size in [16usize, 64] {
        let cfg = deadpool_redis::Config::from_url(url.clone());
        let pool = cfg
            .builder()
            .expect("pool config")
            .max_size(size)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .expect("pool");
        let script = script.clone();
        let rps = drive(&format!("deadpool-redis, {size} connections"), move |i| {
            let pool = pool.clone();
            let cmd = decide_cmd(&script, i);
            async move {
                let mut conn = pool.get().await.map_err(|e| {
                    redis::RedisError::from((redis::ErrorKind::Io, "pool", e.to_string()))
                })?;
                cmd.query_async(&mut *conn).await
            }
        })
        .await;
        best_pool = best_pool.max(rps);
    }
    println!("multiplexed / best pool: {:.2}", multiplexed / best_pool);
    let mut cleanup = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("qgbench-pool:*")
        .query_async(&mut cleanup)
        .await
        .unwrap_or_default();
    for k in keys {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(k).query_async(&mut cleanup).await;
    }
}
