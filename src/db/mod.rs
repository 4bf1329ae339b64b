//! The Postgres adapter: org state, API keys, the plan-change audit trail and adjustments.
//!
//! Queries are checked at run time (`sqlx::query`, not the `query!` macros) so the crate builds
//! without a live database; every query is exercised by the integration tests instead.

pub mod adjustments;
pub mod api_keys;
pub mod billing;
pub mod credits;
pub mod notifications;
pub mod orgs;
pub mod outbox;
pub mod usage;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "Postgres at {target} did not answer within {waited}s ({source}); is it running, and is \
         [database] url right? ([database] start_timeout sets how long to wait)"
    )]
    Unreachable {
        target: String,
        waited: u64,
        source: sqlx::Error,
    },
}

/// `host:port/database` of a connection URL, for messages (never the password).
pub fn describe_target(settings: &DatabaseSettings) -> String {
    match settings.url.expose_secret().parse::<PgConnectOptions>() {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("postgres")
        ),
        Err(_) => "the configured URL".into(),
    }
}

/// Errors worth waiting out at start-up: nothing listening yet, or a server still starting.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // 57P03: starting up or shutting down; 57P01: shut down by an administrator (a
        // restart); 53300: too many connections for now.
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("57P03" | "57P01" | "53300"))
        }
        _ => false,
    }
}

/// Create the database if needed, waiting for Postgres with a doubling back-off (logged, capped
/// at 5 s between attempts) for up to `[database] start_timeout`. A mistake that waiting cannot
/// fix (a wrong password, say) fails at once.
pub async fn wait_and_create(settings: &DatabaseSettings) -> Result<(), DbError> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(250);
    let mut attempt = 1u32;
    loop {
        // Each attempt is bounded too: a host that drops packets would otherwise hold one
        // attempt for the kernel's TCP timeout, whatever `start_timeout` says.
        let left = settings.start_timeout.saturating_sub(started.elapsed());
        let bound = settings
            .connect_timeout
            .min(left)
            .max(Duration::from_millis(100));
        let attempt_result = match tokio::time::timeout(bound, create_if_missing(settings)).await {
            Ok(r) => r,
            Err(_) => Err(DbError::Sqlx(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} ms", bound.as_millis()),
            )))),
        };
        match attempt_result {
            Ok(()) => return Ok(()),
            Err(DbError::Sqlx(e)) if is_transient(&e) => {
                let waited = started.elapsed();
                if waited + pause > settings.start_timeout {
                    return Err(DbError::Unreachable {
                        target: describe_target(settings),
                        waited: settings.start_timeout.as_secs(),
                        source: e,
                    });
                }
                tracing::warn!(
                    postgres = %describe_target(settings),
                    error = %e,
                    attempt,
                    retry_in_ms = pause.as_millis() as u64,
                    "Postgres is not reachable yet; waiting"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

impl DbError {
    /// Postgres refused a value (SQLSTATE class 22, "data exception": NUL in text, a string or
    /// number out of range, an impossible date). Retrying cannot help; the input was wrong.
    pub fn is_data_exception(&self) -> bool {
        matches!(self, DbError::Sqlx(sqlx::Error::Database(e))
            if e.code().is_some_and(|c| c.starts_with("22")))
    }
}

/// A lazily connecting pool: start-up does not fail when Postgres is briefly away (the plan
/// cache and `/readyz` report it), and the first query connects.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = settings.url.expose_secret().parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.connect_timeout)
        .connect_lazy_with(options))
}

/// Create the configured database when it does not exist yet, so a fresh Postgres needs no
/// manual step before the first `serve` or `migrate`.
pub async fn create_if_missing(settings: &DatabaseSettings) -> Result<(), DbError> {
    use sqlx::migrate::MigrateDatabase;
    let url = settings.url.expose_secret();
    if !sqlx::Postgres::database_exists(url).await? {
        match sqlx::Postgres::create_database(url).await {
            Ok(()) => tracing::info!("created the database"),
            // 42P04: another replica starting at the same moment created it first.
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Apply pending migrations; returns those this call applied (version and description), in
/// order, so `migrate` and start-up can say what changed.
pub async fn migrate(pool: &PgPool) -> Result<Vec<(i64, String)>, DbError> {
    // Absent before the first run: everything is pending then.
    let before: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    MIGRATOR.run(pool).await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !before.contains(&m.version))
        .map(|m| (m.version, m.description.to_string()))
        .collect())
}

pub async fn ping(pool: &PgPool) -> Result<(), DbError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub max_connections: u32,
    pub connect_timeout: Duration,
    /// How long `serve` and `migrate` wait for Postgres at start-up before giving up:
    /// orchestrators start services in any order.
    pub start_timeout: Duration,
}
