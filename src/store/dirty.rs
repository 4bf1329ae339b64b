//! Which durable keys this replica changed since they were last flushed to Postgres.
//!
//! The flusher must not scan Redis for changes, and a Redis Cluster script cannot add to a global
//! set (it would live in another slot), so each replica remembers the keys its own calls changed.
//! A replica that dies loses its set; the values stay in Redis and reach Postgres with the next
//! change to the same key (see the README on the loss bound).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct DirtySet {
    /// Value key → when it first changed since the last successful flush.
    keys: Mutex<HashMap<String, Instant>>,
}

impl DirtySet {
    pub fn mark(&self, key: &str) {
        if let Ok(mut keys) = self.keys.lock()
            && !keys.contains_key(key)
        {
            keys.insert(key.to_owned(), Instant::now());
        }
    }

    /// Take everything marked so far (the flusher puts back what it could not write).
    pub fn take(&self) -> HashMap<String, Instant> {
        self.keys
            .lock()
            .map(|mut k| std::mem::take(&mut *k))
            .unwrap_or_default()
    }

    /// Put back keys a failed flush took, keeping the oldest change time.
    pub fn restore(&self, taken: HashMap<String, Instant>) {
        if let Ok(mut keys) = self.keys.lock() {
            for (k, at) in taken {
                let e = keys.entry(k).or_insert(at);
                if at < *e {
                    *e = at;
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.keys.lock().map(|k| k.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the oldest unflushed change happened.
    pub fn oldest(&self) -> Option<Instant> {
        self.keys.lock().ok()?.values().min().copied()
    }
}
