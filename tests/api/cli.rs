//! What the one-shot commands tell the person running them.

use std::process::Command;

use sqlx::postgres::PgPoolOptions;

use crate::helpers::{test_database_url, test_redis_url};

fn migrate(config: &std::path::Path, db_url: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quota-gateway"))
        .args(["migrate", "--config"])
        .arg(config)
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", test_redis_url())
        .env_remove("QG_ADMIN_TOKEN")
        .env_remove("QG_API_LISTEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn migrate_says_what_it_applied_and_then_that_nothing_was_pending() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("qg_test_{id}");
    let db_url = {
        let base = test_database_url();
        format!("{}/{db_name}", &base[..base.rfind('/').unwrap()])
    };
    let config = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let migrations = quota_gateway::db::MIGRATOR.iter().count();

    let (ok, first) = migrate(&config, &db_url);
    assert!(ok, "{first}");
    let applied: Vec<&str> = first
        .lines()
        .filter(|l| l.starts_with("applied "))
        .collect();
    assert_eq!(applied.len(), migrations, "{first}");
    let last = quota_gateway::db::MIGRATOR.iter().last().unwrap();
    assert!(
        first.contains(&format!("applied {} {}", last.version, last.description)),
        "{first}"
    );
    assert!(
        first.contains(&format!("applied {migrations} of {migrations} migrations")),
        "{first}"
    );

    let (ok, second) = migrate(&config, &db_url);
    assert!(ok, "{second}");
    assert_eq!(
        second.trim(),
        format!("database up to date: all {migrations} migrations were applied before")
    );

    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&test_database_url())
        .await
        .unwrap();
    let drop = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(drop))
        .execute(&admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn export_streams_a_large_month_with_progress_and_a_summary() {
    let app = crate::helpers::spawn_app().await;
    // More rows than one progress step: org i/7, metric i%7, quantity i.
    let n: i64 = 100_001;
    sqlx::query(
        "INSERT INTO usage_counters (org_id, metric, period_start, quantity) \
         SELECT 'org-' || lpad((i / 7)::text, 6, '0'), 'm' || (i % 7), \
                '2026-09-01T00:00:00Z'::timestamptz, i \
         FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(n)
    .execute(&app.pool)
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("qg-export-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plans.toml"), crate::helpers::PLANS).unwrap();
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "plans = \"plans.toml\"\n[api]\nlisten = \"127.0.0.1:0\"\n[redis]\nurl = \"{}\"\n\
             [database]\nurl = \"{}\"\n",
            test_redis_url(),
            app.db_url
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quota-gateway"))
        .args(["export", "--period", "2026-09", "--config"])
        .arg(dir.join("gateway.toml"))
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count() as i64,
        n + 1,
        "a header and every row"
    );
    assert_eq!(
        stdout.lines().nth(1),
        Some("org-000000,m0,2026-09-01T00:00:00Z,0")
    );

    let orgs_in_first = |rows: i64| (rows - 1) / 7 + 1;
    let (orgs, total): (i64, i64) = (orgs_in_first(n), (0..n).sum());
    let step = 100_000;
    assert!(
        stderr.contains(&format!(
            "2026-09: {step} rows ({} orgs) written so far",
            orgs_in_first(step)
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "2026-09: {n} rows, {orgs} orgs, {total} units in all"
        )),
        "{stderr}"
    );
}
