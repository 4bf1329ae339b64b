//! The per-replica cache behind both org lookups: org → record (`directory`) and API key → org
//! (`proxy::identity`).
//!
//! Both are kept current the same way, so the rules live here once:
//! - a load that started before an invalidation must not re-insert the stale value it read, so a
//!   load only inserts when no invalidation happened meanwhile (an epoch counter);
//! - while the change subscription is down, an entry is trusted for at most a second;
//! - concurrent misses for one key share a single lookup (`SingleFlight`), keyed by epoch too,
//!   so a miss after an invalidation never joins a lookup that started before it;
//! - past `capacity` entries the cache starts over, bounding memory under key spraying.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::singleflight::SingleFlight;

/// How long a cached entry is trusted while no change notifications can arrive.
pub const UNSUBSCRIBED_MAX_AGE: Duration = Duration::from_secs(1);

pub struct ChangeCache<K, V> {
    entries: RwLock<HashMap<K, (V, Instant)>>,
    /// Bumped on every invalidation.
    epoch: AtomicU64,
    lookups: SingleFlight<(u64, K), Option<V>>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> ChangeCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            lookups: SingleFlight::default(),
            capacity,
        }
    }

    /// The cached value of `key`, else what `lookup` finds. `Ok(None)` from `lookup` (nothing
    /// there) is passed on but not cached, so something created a moment later is found at once.
    /// `subscribed`: whether change notifications are arriving (else entries age out after
    /// `UNSUBSCRIBED_MAX_AGE`).
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: &K,
        subscribed: bool,
        lookup: F,
    ) -> Result<Option<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        if let Some(hit) = self.cached(key, subscribed) {
            return Ok(Some(hit));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let found = self.lookups.run((epoch, key.clone()), lookup).await?;
        if let Some(value) = &found
            && let Ok(mut entries) = self.entries.write()
            && self.epoch.load(Ordering::Acquire) == epoch
        {
            if entries.len() >= self.capacity {
                entries.clear();
            }
            entries.insert(key.clone(), (value.clone(), Instant::now()));
        }
        Ok(found)
    }

    fn cached(&self, key: &K, subscribed: bool) -> Option<V> {
        let entries = self.entries.read().ok()?;
        let (value, loaded) = entries.get(key)?;
        if !subscribed && loaded.elapsed() > UNSUBSCRIBED_MAX_AGE {
            return None;
        }
        Some(value.clone())
    }

    /// Forget the entries `keep` rejects.
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut entries) = self.entries.write() {
            entries.retain(|k, (v, _)| keep(k, v));
        }
    }

    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn load(cache: &ChangeCache<&'static str, u32>, value: Option<u32>) -> Option<u32> {
        cache
            .get_or_load(&"k", true, || async { Ok::<_, ()>(value) })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn caches_found_values_only_and_forgets_on_invalidation() {
        let cache = ChangeCache::new(10);
        assert_eq!(load(&cache, None).await, None);
        assert_eq!(load(&cache, Some(1)).await, Some(1));
        // Cached now: the lookup's new answer is not asked for.
        assert_eq!(load(&cache, Some(2)).await, Some(1));
        cache.retain(|_, v| *v != 1);
        assert_eq!(load(&cache, Some(3)).await, Some(3));
        cache.clear();
        assert_eq!(load(&cache, Some(4)).await, Some(4));
    }

    #[tokio::test]
    async fn a_load_that_raced_an_invalidation_is_not_cached() {
        let cache = ChangeCache::new(10);
        let stale = cache
            .get_or_load(&"k", true, || async {
                cache.clear();
                Ok::<_, ()>(Some(1))
            })
            .await;
        assert_eq!(stale, Ok(Some(1)));
        assert_eq!(load(&cache, Some(2)).await, Some(2));
    }

    #[tokio::test]
    async fn unsubscribed_entries_age_out() {
        let cache = ChangeCache::new(10);
        assert_eq!(load(&cache, Some(1)).await, Some(1));
        tokio::time::sleep(UNSUBSCRIBED_MAX_AGE + Duration::from_millis(50)).await;
        let fresh = cache
            .get_or_load(&"k", false, || async { Ok::<_, ()>(Some(2)) })
            .await;
        assert_eq!(fresh, Ok(Some(2)));
    }
}
