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
