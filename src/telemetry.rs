//! The tracing subscriber: JSON lines for machines, pretty output for people.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Install the global subscriber. `RUST_LOG`, when set, wins over `[log] level`.
pub fn init(settings: &LogSettings) {
    // Postgres notices (`relation "_sqlx_migrations" already exists, skipping` on every start)
    // arrive at INFO; they say nothing an operator needs.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},sqlx::postgres::notice=warn", settings.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: in a file or a log collector they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
