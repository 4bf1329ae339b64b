//! Hot reload of the plan catalog, on SIGHUP or when `plans.toml` changes on disk.
//!
//! A new catalog replaces the old one atomically (`ArcSwap`): requests in flight finish with the
//! catalog they started with, new ones see the new one, none is dropped. An invalid file is
//! rejected with the same `file: key: reason` problems as at start-up, and the old catalog stays.
//! The file is polled (size, mtime, then content) rather than watched with inotify, which misses
//! the rename an editor or a ConfigMap update does.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, Settings};
use crate::metrics::Metrics;
use crate::quota::QuotaService;

const POLL_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    Replaced,
    Unchanged,
}

/// What the file looked like when last read.
#[derive(Default, PartialEq, Eq, Clone)]
struct Seen {
    modified: Option<SystemTime>,
    len: u64,
    digest: Vec<u8>,
    missing: bool,
}

fn stat(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len()))
}

/// Read and validate the catalog at `path` and swap it in when its content changed.
fn reload_if_changed(
    path: &Path,
    settings: &Settings,
    quota: &QuotaService,
    seen: &mut Seen,
    force: bool,
) -> Result<Reloaded, ConfigError> {
    let Some((modified, len)) = stat(path) else {
        if std::mem::replace(&mut seen.missing, true) && !force {
            // Already reported; the file is still missing.
            return Ok(Reloaded::Unchanged);
        }
        return Err(ConfigError {
            problems: vec![config::Problem {
                file: path.to_path_buf(),
                key: String::new(),
                reason: "cannot read file".into(),
            }],
        });
    };
    seen.missing = false;
    if !force && seen.modified == modified && seen.len == len {
        return Ok(Reloaded::Unchanged);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![config::Problem {
            file: path.to_path_buf(),
            key: String::new(),
            reason: format!("cannot read file: {e}"),
        }],
    })?;
    let digest = Sha256::digest(text.as_bytes()).to_vec();
    let unchanged = digest == seen.digest;
    seen.modified = modified;
    seen.len = len;
    if unchanged {
        return Ok(Reloaded::Unchanged);
    }
    seen.digest = digest;
    let catalog = config::catalog_from_str(path, &text)?;
    // The rest of the configuration must still hold with the new catalog (proxy routes name
    // metrics, for instance).
    config::check_against_catalog(settings, &catalog)?;
    quota.replace_catalog(catalog);
    Ok(Reloaded::Replaced)
}

/// Follow SIGHUP and the file until `stop` fires.
pub async fn follow(
    settings: Settings,
    quota: Arc<QuotaService>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let path = settings.plans_path.clone();
    let mut seen = Seen::default();
    if let Ok(text) = std::fs::read(&path) {
        seen.digest = Sha256::digest(&text).to_vec();
        if let Some((modified, len)) = stat(&path) {
            seen.modified = modified;
            seen.len = len;
        }
    }
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    };
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        let force = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            _ = sighup => {
                tracing::info!("SIGHUP received; reloading the plan catalog");
                true
            }
        };
        match reload_if_changed(&path, &settings, &quota, &mut seen, force) {
            Ok(Reloaded::Replaced) => {
                let catalog = quota.catalog();
                metrics.catalog_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    file = %path.display(),
                    plans = catalog.plans.len(),
                    metrics = catalog.metrics.len(),
                    "plan catalog reloaded"
                );
            }
            Ok(Reloaded::Unchanged) => {}
            Err(e) => {
                metrics
                    .catalog_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                for p in &e.problems {
                    tracing::error!(
                        file = %p.file.display(),
                        key = %p.key,
                        reason = %p.reason,
                        "new plan catalog rejected; keeping the current one"
                    );
                }
            }
        }
    }
}
