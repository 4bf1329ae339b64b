//! Org → plan lookups with a per-replica cache, kept current through Redis pub/sub.
//!
//! The request path must not ask Postgres on every decision, so each replica caches what it read.
//! A change made anywhere (admin API, webhooks) is written to Postgres first and then announced on
//! the `org-changes` channel; every replica drops its cached entry and reads the new state on the
//! next request. Messages published while a replica's subscription was down are lost, so every
//! (re)subscription clears the whole cache, and while the subscription is down an entry is trusted
//! for at most one second (`cache::ChangeCache` holds the rules shared with the API-key cache).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cache::ChangeCache;
use crate::db::{self, DbError, orgs::OrgRecord};
use crate::domain::org::OrgId;
use crate::store::Store;

/// Past this many cached orgs the cache starts over, bounding memory on a replica that sees
/// many one-off orgs.
const MAX_CACHED_ORGS: usize = 200_000;

pub struct OrgDirectory {
    pool: PgPool,
    cache: ChangeCache<OrgId, Arc<OrgRecord>>,
    subscribed: AtomicBool,
    dependents: RwLock<Vec<Arc<dyn OrgCache>>>,
}

/// Another per-org cache that must forget an org whenever the directory does (the proxy's API-key
/// cache), so one announcement on the change channel covers both.
pub trait OrgCache: Send + Sync {
    fn invalidate_org(&self, org: &str);
    fn invalidate_all(&self);
}

/// What is announced on the channel.
pub enum Change<'a> {
    Org(&'a OrgId),
    Everything,
}

impl Change<'_> {
    pub fn payload(&self) -> String {
        match self {
            Change::Org(org) => format!("org:{org}"),
            Change::Everything => "all".into(),
        }
    }
}

impl OrgDirectory {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            cache: ChangeCache::new(MAX_CACHED_ORGS),
            subscribed: AtomicBool::new(false),
            dependents: RwLock::new(Vec::new()),
        }
    }

    /// Have `cache` invalidated together with this directory.
    pub fn register(&self, cache: Arc<dyn OrgCache>) {
        if let Ok(mut d) = self.dependents.write() {
            d.push(cache);
        }
    }

    fn dependents(&self) -> Vec<Arc<dyn OrgCache>> {
        self.dependents
            .read()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn get(&self, org: &OrgId) -> Result<Arc<OrgRecord>, DbError> {
        let record = self
            .cache
            .get_or_load(org, self.is_subscribed(), || async {
                let mut record = db::orgs::get(&self.pool, org).await?;
                if record.created_at.is_some() {
                    // A key belongs to a stored org: no row, no keys to look at.
                    record.key_limits = db::api_keys::limits_of_org(&self.pool, org).await?;
                }
                Ok::<_, DbError>(Some(Arc::new(record)))
            })
            .await?;
        Ok(record.unwrap_or_default())
    }

    pub fn invalidate(&self, org: &str) {
        self.cache.retain(|k, _| k.as_str() != org);
        for d in self.dependents() {
            d.invalidate_org(org);
        }
    }

    pub fn invalidate_all(&self) {
        self.cache.clear();
        for d in self.dependents() {
            d.invalidate_all();
        }
    }

    /// Whether the change subscription is live (false while reconnecting).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    fn apply(&self, payload: &str) {
        match payload.strip_prefix("org:") {
            Some(org) => self.invalidate(org),
            None => self.invalidate_all(),
        }
    }

    /// Follow the change channel until `stop` fires, reconnecting with backoff. Returns after the
    /// first successful subscription has been reported through `ready` (if given).
    pub async fn follow_changes(
        self: Arc<Self>,
        store: Store,
        stop: CancellationToken,
        ready: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let channel = store.keys().org_changes_channel();
        let mut ready = ready;
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = async {
                let mut pubsub = store.client().get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                _ = stop.cancelled() => return,
                r = attempt => r,
            };
            match pubsub {
                Ok(mut pubsub) => {
                    // Anything published while we were not listening is lost: start clean.
                    self.invalidate_all();
                    self.subscribed.store(true, Ordering::Release);
                    backoff = Duration::from_millis(100);
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                    tracing::debug!(%channel, "following org changes");
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            msg = messages.next() => match msg {
                                Some(msg) => {
                                    let payload: String = msg.get_payload().unwrap_or_default();
                                    self.apply(&payload);
                                }
                                None => break,
                            }
                        }
                    }
                    self.subscribed.store(false, Ordering::Release);
                    tracing::warn!("org change subscription lost; reconnecting");
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot subscribe to org changes");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
