//! Collapse concurrent cache misses for the same key into one lookup.
//!
//! The org directory and the API-key cache both fall back to Postgres on a miss. Misses come in
//! herds: the first burst of traffic after start-up, every cache clear after a pub/sub
//! resubscription, and, while the subscription is down, every entry's one-second expiry. Without
//! this, each concurrent request of the herd ran its own identical query (64 at once in the load
//! benchmark's first millisecond, which was its slowest 0.1 % of requests). With it, one request
//! queries and the others wait for its answer.
//!
//! Callers put their invalidation epoch in the key, so a request that misses after an
//! invalidation never joins a lookup that started before it.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

pub struct SingleFlight<K, V> {
    flights: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            flights: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// Run `lookup` for `key` unless a lookup for it is already under way, in which case wait for
    /// that one's value. An error is not shared: it goes to the caller whose lookup failed, and a
    /// waiting caller then runs its own (so does one whose leader was cancelled).
    pub async fn run<F, Fut, E>(&self, key: K, lookup: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.entry(key.clone()).or_default().clone()
        };
        let result = flight.get_or_try_init(lookup).await.cloned();
        // The first caller back removes the flight, so the next miss looks up afresh (the caches
        // above decide what to keep) and failed keys do not pile up here. Callers still waiting
        // hold their own handle to it.
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights
            .get(&key)
            .is_some_and(|current| Arc::ptr_eq(current, &flight))
        {
            flights.remove(&key);
        }
        result
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.flights.lock().map(|f| f.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_misses_makes_one_lookup() {
        let flights = Arc::new(SingleFlight::<&str, u32>::default());
        let lookups = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let flights = flights.clone();
                let lookups = lookups.clone();
                tokio::spawn(async move {
                    flights
                        .run("key", || async {
                            lookups.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, ()>(7)
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(7));
        }
        assert_eq!(lookups.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0);
        // Finished flights are not a cache: the next miss looks up again.
        let again = flights
            .run("key", || async {
                lookups.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(8)
            })
            .await;
        assert_eq!(again, Ok(8));
        assert_eq!(lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn different_keys_do_not_wait_for_each_other() {
        let flights = SingleFlight::<(u64, &str), u32>::default();
        let lookups = AtomicUsize::new(0);
        let lookup = |v| {
            let lookups = &lookups;
            move || async move {
                lookups.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<_, ()>(v)
            }
        };
        // Same name, another epoch: a separate lookup.
        let (a, b) = tokio::join!(
            flights.run((1, "key"), lookup(1)),
            flights.run((2, "key"), lookup(2))
        );
        assert_eq!((a, b), (Ok(1), Ok(2)));
        assert_eq!(lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_lookup_is_not_shared() {
        let flights = SingleFlight::<&str, u32>::default();
        let calls = AtomicUsize::new(0);
        let (a, b) = tokio::join!(
            flights.run("key", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err::<u32, &str>("database down")
            }),
            async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                flights
                    .run("key", || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, &str>(3)
                    })
                    .await
            }
        );
        assert_eq!(a, Err("database down"));
        assert_eq!(b, Ok(3));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(flights.in_flight(), 0);
    }
}
