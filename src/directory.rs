//! Org → plan lookups with a per-replica cache, kept current through Redis pub/sub.
//!
//! The request path must not ask Postgres on every decision, so each replica caches what it read.
//! A change made anywhere (admin API, webhooks) is written to Postgres first and then announced on
//! the `org-changes` channel; every replica drops its cached entry and reads the new state on the
//! next request. Two races are closed here:
//! - a load that started before an invalidation must not re-insert the stale row it read, so
//!   loads only insert when no invalidation happened meanwhile (an epoch counter);
//! - messages published while a replica's subscription was down are lost, so every
//!   (re)subscription clears the whole cache, and while the subscription is down an entry is
//!   trusted for at most one second (Postgres is then read at most once a second per org).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::{self, DbError, orgs::OrgRecord};
use crate::domain::org::OrgId;
use crate::singleflight::SingleFlight;
use crate::store::Store;

/// Past this many cached orgs the cache starts over, bounding memory on a replica that sees
/// many one-off orgs.
const MAX_CACHED_ORGS: usize = 200_000;

/// How long a cached entry is trusted while no change notifications can arrive.
const UNSUBSCRIBED_MAX_AGE: Duration = Duration::from_secs(1);

pub struct OrgDirectory {
    pool: PgPool,
    cache: RwLock<HashMap<OrgId, (Arc<OrgRecord>, Instant)>>,
    epoch: AtomicU64,
    subscribed: AtomicBool,
    dependents: RwLock<Vec<Arc<dyn OrgCache>>>,
    /// Concurrent misses for one org (at one epoch) share a single query.
    lookups: SingleFlight<(u64, OrgId), Arc<OrgRecord>>,
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
            cache: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            dependents: RwLock::new(Vec::new()),
            lookups: SingleFlight::default(),
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
        if let Some(hit) = self.read_cache(org) {
            return Ok(hit);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let record = self
            .lookups
            .run((epoch, org.clone()), || async {
                Ok::<_, DbError>(Arc::new(db::orgs::get(&self.pool, org).await?))
            })
            .await?;
        if let Ok(mut cache) = self.cache.write()
            && self.epoch.load(Ordering::Acquire) == epoch
        {
            if cache.len() >= MAX_CACHED_ORGS {
                cache.clear();
            }
            cache.insert(org.clone(), (record.clone(), Instant::now()));
        }
        Ok(record)
    }

    fn read_cache(&self, org: &OrgId) -> Option<Arc<OrgRecord>> {
        let cache = self.cache.read().ok()?;
        let (record, loaded) = cache.get(org)?;
        if !self.is_subscribed() && loaded.elapsed() > UNSUBSCRIBED_MAX_AGE {
            return None;
        }
        Some(record.clone())
    }

    pub fn invalidate(&self, org: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut cache) = self.cache.write() {
            cache.retain(|k, _| k.as_str() != org);
        }
        for d in self.dependents() {
            d.invalidate_org(org);
        }
    }

    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut cache) = self.cache.write() {
            cache.clear();
        }
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
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot subscribe to org changes");
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
