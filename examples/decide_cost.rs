//! What one exact decision costs Redis: `usec_per_call` of `EVALSHA` and the commands the
//! script runs inside Redis per call, from `INFO commandstats`, for decisions made through the
//! real store code (`Store::run`, the path `/v1/check` and the proxy take).
//!
//!   cargo run --release --example decide_cost -- REDIS_URL [DECISIONS]
//!
//! Point it at a Redis nothing else uses (`benches/decide_cost.sh` starts a private one): it
//! resets the server's statistics. Two scenarios, each on an org of its own, after a warm-up:
//!   quota+rate          a monthly quota of 10^12 and a rate of 10^9/s on `requests` (the load
//!                       benchmark's plan), one request per decision, far from both limits
//!   quota+rate+credits  the same for an org holding one credit grant of `requests`
//! Prints one line per scenario: µs of Redis CPU per `EVALSHA`, and calls per decision of
//! every command the script ran.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use quota_gateway::domain::decision::{Limit, Mode, OnRedisError, Target};
use quota_gateway::domain::level::Scope;
use quota_gateway::domain::org::OrgId;
use quota_gateway::domain::period::{self, Period};
use quota_gateway::domain::plan::{Metric, MetricKind, Overage};
use quota_gateway::metrics::Metrics;
use quota_gateway::store::{RedisMode, RedisSettings, Store};

/// Decisions in flight at once, as on a busy replica's multiplexed connection.
const CONCURRENCY: usize = 32;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(url) = args.first().cloned() else {
        eprintln!("usage: decide_cost REDIS_URL [DECISIONS]");
        std::process::exit(64);
    };
    let decisions: usize = args
        .get(1)
        .map_or(50_000, |n| n.parse().expect("DECISIONS"));
    let prefix = format!("qgcost-{}", std::process::id());
    let settings = RedisSettings {
        url: url.clone().into(),
        key_prefix: prefix.clone(),
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        on_error: OnRedisError::Closed,
        local_share: 1.0,
        mode: RedisMode::Standalone,
        require_noeviction: false,
    };
    let store = Arc::new(Store::new(&settings, Arc::new(Metrics::new())).expect("store"));
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");

    let metric = Arc::new(Metric {
        id: "requests".into(),
        unit: "request".into(),
        kind: MetricKind::Counter,
        leases: true,
    });
    for (name, credits) in [("quota+rate", false), ("quota+rate+credits", true)] {
        let org = OrgId::parse(&format!("cost-{}", usize::from(credits))).expect("org id");
        let now = Utc::now();
        // The org's data is in Redis (as after its first decision): the restore marker and the
        // resident key are there, and with credits one grant far larger than what is spent.
        store.restore(&org, now, &[], &[]).await.expect("restore");
        if credits {
            let field = quota_gateway::domain::credit::field(10, None, "grant-1");
            let value = quota_gateway::domain::credit::value(1_000_000_000, 1_000_000_000);
            store
                .add_grant(&org, &metric.id, &field, &value)
                .await
                .expect("grant")
                .expect("resident");
        }
        // A warm-up creates the counters, then the statistics start from zero.
        run(&store, &org, &metric, 1_000).await;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut admin)
            .await
            .expect("CONFIG RESETSTAT");
        run(&store, &org, &metric, decisions).await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut admin)
            .await
            .expect("INFO");
        report(name, &info);
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut admin)
        .await
        .expect("KEYS");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut admin)
            .await
            .expect("DEL");
    }
}

/// `n` decisions of one request each, `CONCURRENCY` at a time.
async fn run(store: &Arc<Store>, org: &OrgId, metric: &Arc<Metric>, n: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (store, org, metric, next) =
                (store.clone(), org.clone(), metric.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let now = Utc::now();
                    let limits = [
                        Limit {
                            metric: &metric,
                            target: Target::Counter {
                                period: Period::Month,
                                window: period::calendar_month(now),
                            },
                            amount: 1,
                            limit: Some(1_000_000_000_000),
                            overage: Overage::Block,
                            notify_at: &[],
                            headroom: false,
                            scope: Scope::Org,
                        },
                        Limit {
                            metric: &metric,
                            target: Target::Rate {
                                window: Duration::from_secs(1),
                                label: "1s",
                            },
                            amount: 1,
                            limit: Some(1_000_000_000),
                            overage: Overage::Block,
                            notify_at: &[],
                            headroom: false,
                            scope: Scope::Org,
                        },
                    ];
                    store
                        .run(&org, &limits, Mode::Check, now, None)
                        .await
                        .expect("decision");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
}

/// One line: µs per `EVALSHA` and the calls per `EVALSHA` of each command run inside it.
fn report(name: &str, info: &str) {
    let mut evalsha = (0f64, 0f64);
    let mut inner = Vec::new();
    for line in info.lines() {
        let Some((cmd, stats)) = line
            .trim()
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |name: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        match cmd {
            "evalsha" => evalsha = (field("calls"), field("usec_per_call")),
            c if c == "info" || c == "script" || c.starts_with("config") => {}
            _ => inner.push((cmd.to_string(), field("calls"))),
        }
    }
    inner.sort_by(|a, b| a.0.cmp(&b.0));
    let per: Vec<String> = inner
        .iter()
        .map(|(c, n)| format!("{c} {:.2}", n / evalsha.0.max(1.0)))
        .collect();
    let total: f64 = inner.iter().map(|(_, n)| n).sum::<f64>() / evalsha.0.max(1.0);
    println!(
        "{name:<20} {:>9.0} evalsha  {:>6.2} µs/call  {total:.2} commands/call: {}",
        evalsha.0,
        evalsha.1,
        per.join(", ")
    );
}
