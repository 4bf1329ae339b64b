//! The Postgres adapter: org state, API keys, the plan-change audit trail and adjustments.
//!
//! Queries are checked at run time (`sqlx::query`, not the `query!` macros) so the crate builds
//! without a live database; every query is exercised by the integration tests instead.

pub mod adjustments;
pub mod api_keys;
pub mod billing;
pub mod orgs;
pub mod outbox;
pub mod usage;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
        sqlx::Postgres::create_database(url).await?;
        tracing::info!("created the database");
    }
    Ok(())
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

pub async fn ping(pool: &PgPool) -> Result<(), DbError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
