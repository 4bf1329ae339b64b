//! Refusing a Redis that may evict keys.
//!
//! Under any `maxmemory-policy` but `noeviction`, a Redis that runs out of memory deletes keys on
//! its own: an evicted counter reads as zero and silently gives an org its budget back, and an
//! evicted month marker or gauge is indistinguishable from one that never existed. With
//! `noeviction` Redis refuses writes instead, which the gateway sees as errors and handles like
//! any Redis fault. So the policy is checked on every primary at start-up, after reconnects and
//! once a minute, and while one may evict `/readyz` answers 503 (unless `[redis]
//! require_noeviction = false`). `INFO memory` is used rather than `CONFIG GET`, which managed
//! Redis services often disable.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// How often the policy is read again when nothing else prompts it.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// How often the loop wakes to see whether a check is due (reconnects, a failed first check).
const TICK: Duration = Duration::from_secs(5);
/// At most one log line per this interval while the finding stays the same.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A primary whose policy lets Redis evict keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicting {
    /// `host:port` in a cluster; empty for a standalone Redis (its URL may hold a password).
    pub node: String,
    pub policy: String,
}

impl Evicting {
    /// For `/readyz` and the log: names the setting, its value and why it matters.
    pub fn problem(&self) -> String {
        let on = if self.node.is_empty() {
            String::new()
        } else {
            format!(" on {}", self.node)
        };
        format!(
            "Redis maxmemory-policy is \"{}\"{on}; the gateway requires \"noeviction\": \
             an evicted counter would silently reset a budget",
            self.policy
        )
    }
}

/// What the last successful check found.
pub struct EvictionWatch {
    required: bool,
    evicting: Mutex<Option<Evicting>>,
}

impl EvictionWatch {
    pub fn new(required: bool) -> Self {
        Self {
            required,
            evicting: Mutex::new(None),
        }
    }

    /// `[redis] require_noeviction`: whether an evicting Redis makes the gateway not ready.
    pub fn required(&self) -> bool {
        self.required
    }

    /// A primary that may evict keys, as of the last successful check (a failed check keeps
    /// the previous finding: an unreachable Redis is reported as such, not as a policy).
    pub fn evicting(&self) -> Option<Evicting> {
        self.evicting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, finding: Option<Evicting>) -> Option<Evicting> {
        std::mem::replace(
            &mut *self.evicting.lock().unwrap_or_else(|e| e.into_inner()),
            finding,
        )
    }
}

impl Store {
    /// `maxmemory_policy` of every primary (of the one Redis in standalone mode), as
    /// (node, policy).
    pub async fn eviction_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn.clone();
        // In a cluster, INFO goes to every primary and comes back as a map node → answer.
        let value: Value = self
            .bounded(redis::cmd("INFO").arg("memory").query_async(&mut conn))
            .await?;
        match value {
            Value::Map(nodes) => nodes
                .into_iter()
                .map(|(node, info)| Ok((text(node)?, policy_in(&text(info)?)?)))
                .collect(),
            other => Ok(vec![(String::new(), policy_in(&text(other)?)?)]),
        }
    }

    /// Read the policy of every primary once and record what was found (the gauge, the state
    /// `/readyz` reads). Returns the primary that may evict, if any.
    pub async fn check_eviction(&self) -> Result<Option<Evicting>, StoreError> {
        let evicting = self
            .eviction_policies()
            .await?
            .into_iter()
            .find(|(_, policy)| policy != "noeviction")
            .map(|(node, policy)| Evicting { node, policy });
        self.metrics
            .redis_eviction_policy_ok
            .set(i64::from(evicting.is_none()));
        self.eviction.set(evicting.clone());
        Ok(evicting)
    }

    pub fn eviction(&self) -> &EvictionWatch {
        &self.eviction
    }
}

fn text(value: Value) -> Result<String, StoreError> {
    redis::from_redis_value(value).map_err(|e| StoreError::Protocol(format!("INFO memory: {e}")))
}

fn policy_in(info: &str) -> Result<String, StoreError> {
    info.lines()
        .find_map(|l| l.strip_prefix("maxmemory_policy:"))
        .map(|p| p.trim().to_string())
        .ok_or_else(|| StoreError::Protocol("INFO memory has no maxmemory_policy".into()))
}

/// Check at start-up, after every reconnect and once a minute, until `stop`; log an evicting
/// Redis once a minute (an error when it is refused, a warning when accepted).
pub async fn watch(store: Store, stop: CancellationToken) {
    let mut last_ok: Option<Instant> = None;
    let mut seen_reconnects = store.metrics.redis_reconnects.get();
    let mut logged: Option<(Instant, Evicting)> = None;
    let mut warned_unreadable: Option<Instant> = None;
    loop {
        let reconnects = store.metrics.redis_reconnects.get();
        if last_ok.is_none_or(|t| t.elapsed() >= CHECK_EVERY) || reconnects != seen_reconnects {
            seen_reconnects = reconnects;
            match store.check_eviction().await {
                Ok(found) => {
                    last_ok = Some(Instant::now());
                    match found {
                        Some(e) => {
                            let due = logged
                                .as_ref()
                                .is_none_or(|(at, was)| *was != e || at.elapsed() >= LOG_EVERY);
                            if due {
                                report(&e, store.eviction.required());
                                logged = Some((Instant::now(), e));
                            }
                        }
                        None => {
                            if logged.take().is_some() {
                                tracing::info!("Redis maxmemory-policy is noeviction now");
                            }
                        }
                    }
                }
                // Unreachable is reported by `/readyz` and the degraded gauge; a Redis that
                // answers but will not tell its policy is worth a warning of its own.
                Err(e) if e.is_unavailable() => {
                    tracing::debug!(error = %e, "cannot read Redis maxmemory-policy yet");
                }
                Err(e) => {
                    if warned_unreadable.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        tracing::warn!(error = %e, "cannot read Redis maxmemory-policy from INFO memory");
                        warned_unreadable = Some(Instant::now());
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

fn report(e: &Evicting, required: bool) {
    let problem = e.problem();
    if required {
        tracing::error!(
            policy = %e.policy,
            node = %e.node,
            "{problem}; /readyz answers 503 until it is changed (or [redis] require_noeviction = false)"
        );
    } else {
        tracing::warn!(
            policy = %e.policy,
            node = %e.node,
            "{problem} ([redis] require_noeviction = false accepts this)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_is_read_from_info_memory() {
        let info = "# Memory\r\nused_memory:1\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(policy_in(info).unwrap(), "allkeys-lru");
        assert!(policy_in("# Memory\r\nused_memory:1\r\n").is_err());
        let e = Evicting {
            node: "10.0.0.1:6379".into(),
            policy: "volatile-lru".into(),
        };
        assert!(
            e.problem()
                .contains("maxmemory-policy is \"volatile-lru\" on 10.0.0.1:6379")
        );
    }
}
