//! Exactness drills: real replicas under load and under faults. Each drill compares three
//! numbers: the units the clients were told were admitted, the Redis counter, and the Postgres
//! ledger (`usage_counters`, after a flush). They must be equal, or within the bound the drill
//! states (what the clients could not know: requests whose answer never came).
//!
//! One test runs every drill in turn (they would distort each other's timing on a small machine)
//! and prints one table. `QG_DRILL_SCALE=short|full` (short by default), `QG_DRILL=<substring>`
//! runs only the drills whose name contains it, `QG_DRILL_KEEP_LOGS=1` keeps the logs of the
//! gateway processes in the temp directory.

#[path = "../api/helpers.rs"]
mod helpers;

mod cases;
mod rig;

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::time::{Duration, Instant};

use rig::Scale;

/// One drill's numbers and what was wrong with them.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub drill: String,
    /// Units the clients were told were admitted (or recorded).
    pub admitted: i64,
    /// The Redis counter.
    pub redis: i64,
    /// The Postgres ledger, after a flush.
    pub ledger: i64,
    /// Units whose answer never came (so the client cannot know whether they were counted).
    pub in_doubt: i64,
    /// `quota_gateway_in_doubt_total{outcome="unknown"}`, summed over replicas: decisions whose
    /// Redis call broke with its connection, so the gateway could not learn whether Redis ran
    /// them; each may be counted twice (README, Redis outages).
    pub in_doubt_metric: i64,
    /// Anything worth a line under the table (quota, outage length, bound used).
    pub note: String,
    /// Broken guarantees; empty: the drill passed.
    pub problems: Vec<String>,
    pub took: Duration,
}

impl Row {
    pub fn new(drill: &str) -> Row {
        Row {
            drill: drill.into(),
            ..Default::default()
        }
    }

    /// Record a broken guarantee unless `ok`.
    pub fn expect(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.problems.push(problem.into());
        }
    }

    /// The core contract: the ledger equals Redis; Redis holds every admitted unit and nothing
    /// more than the units in doubt on top: those the clients never heard about, and those the
    /// gateway could not learn about.
    pub fn expect_exact(&mut self) {
        let (a, r, l) = (self.admitted, self.redis, self.ledger);
        let d = self.in_doubt + self.in_doubt_metric;
        self.expect(l == r, format!("ledger {l} != Redis {r}"));
        self.expect(
            r >= a,
            format!("Redis {r} < admitted {a}: admitted usage lost"),
        );
        self.expect(
            r <= a + d,
            format!(
                "Redis {r} > admitted {a} + in doubt {d}: {} units counted that nobody was admitted",
                r - a - d
            ),
        );
    }

    /// No more admitted than the quota (plus `slack` the drill justifies).
    pub fn expect_within_quota(&mut self, quota: i64, slack: i64) {
        let a = self.admitted;
        self.expect(
            a <= quota + slack,
            format!(
                "admitted {a} > quota {quota}{}: over-admission",
                if slack > 0 {
                    format!(" + {slack}")
                } else {
                    String::new()
                }
            ),
        );
    }
}

type DrillFn = fn(Scale) -> Pin<Box<dyn Future<Output = Row> + Send>>;

/// Every drill, in the order they run.
fn drills() -> Vec<(&'static str, DrillFn)> {
    vec![
        ("two replicas, 200 clients", |s| {
            Box::pin(cases::healthy(s, false))
        }),
        ("two replicas, 200 clients, leases", |s| {
            Box::pin(cases::healthy(s, true))
        }),
        ("Redis latency 30-80 ms", |s| Box::pin(cases::jitter(s))),
        ("usage batch 10x + 20x concurrent", |s| {
            Box::pin(cases::usage_batch(s))
        }),
        ("Redis cut, then restored", |s| {
            Box::pin(cases::redis_cut(s, false))
        }),
        ("Redis cut, then restored, leases", |s| {
            Box::pin(cases::redis_cut(s, true))
        }),
        ("Redis restarted empty", |s| {
            Box::pin(cases::redis_restarted_empty(s))
        }),
        ("replica SIGKILL + restart", |s| {
            Box::pin(cases::replica_sigkill(s, false))
        }),
        ("replica SIGKILL + restart, leases", |s| {
            Box::pin(cases::replica_sigkill(s, true))
        }),
        ("Postgres cut", |s| Box::pin(cases::postgres_cut(s))),
        ("SIGTERM under load", |s| {
            Box::pin(cases::sigterm_under_load(s, false))
        }),
        ("SIGTERM under load, leases", |s| {
            Box::pin(cases::sigterm_under_load(s, true))
        }),
        ("SIGTERM, Redis unreachable", |s| {
            Box::pin(cases::sigterm_redis_unreachable(s))
        }),
        ("month boundary, Postgres down", |s| {
            Box::pin(cases::month_boundary_postgres_down(s))
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_keep_counts_exact() {
    let scale = Scale::from_env();
    let only = std::env::var("QG_DRILL").ok().filter(|s| !s.is_empty());
    let mut rows = Vec::new();
    for (name, drill) in drills() {
        if only
            .as_deref()
            .is_some_and(|o| !name.to_lowercase().contains(&o.to_lowercase()))
        {
            continue;
        }
        let started = Instant::now();
        let task = tokio::spawn(drill(scale));
        let mut row = match tokio::time::timeout(scale.limit, task).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => {
                let mut row = Row::new(name);
                let why = match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                    Err(e) => e.to_string(),
                };
                row.problems.push(format!("drill broke: {why}"));
                row
            }
            Err(_) => {
                let mut row = Row::new(name);
                row.problems
                    .push(format!("did not finish within {:?}", scale.limit));
                row
            }
        };
        row.drill = name.into();
        row.took = started.elapsed();
        rows.push(row);
    }
    let table = render(&rows, scale);
    // Straight to stderr, past the test harness's capture: the table is the point of the run.
    let _ = std::io::stderr().write_all(table.as_bytes());
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.problems.is_empty())
        .map(|r| r.drill.as_str())
        .collect();
    assert!(failed.is_empty(), "drills failed: {failed:?} (table above)");
}

fn render(rows: &[Row], scale: Scale) -> String {
    let mut out = format!(
        "\nExactness drills (scale {}: {} clients, {} requests per load, quota {})\n\n\
         | drill | admitted | Redis | ledger | in doubt | in-doubt metric | result | took |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |\n",
        scale.name, scale.clients, scale.requests, scale.quota
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} s |\n",
            r.drill,
            r.admitted,
            r.redis,
            r.ledger,
            r.in_doubt,
            r.in_doubt_metric,
            if r.problems.is_empty() { "ok" } else { "FAIL" },
            r.took.as_secs_f64()
        ));
    }
    out.push('\n');
    for r in rows {
        if !r.note.is_empty() {
            out.push_str(&format!("- {}: {}\n", r.drill, r.note));
        }
        for p in &r.problems {
            out.push_str(&format!("- {}: FAIL: {p}\n", r.drill));
        }
    }
    out
}
