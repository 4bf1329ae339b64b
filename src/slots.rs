//! Concurrency slots: the requests of an org in flight through the proxy, across all replicas.
//!
//! A plan's `concurrency = { requests = N }` is checked and the slot taken inside the decision's
//! one `EVALSHA` (kind "s" in `decide.lua`), so it is all or nothing with the org's quotas and
//! rates. What this module adds is the life of a slot after that call:
//! - a [`Slot`] guard lives with the response body and gives the slot back when it is dropped
//!   (the body ended, or the client went away);
//! - the give-back is off the request's path: the guard only queues it, and one task sends the
//!   queued `ZREM`s together (a burst of responses ending costs one pipelined write, and a slow
//!   Redis never holds up a response);
//! - each slot is scored in Redis by an expiry `ttl` ahead, which a task on the live replica
//!   pushes forward every `ttl / 3` while the request lasts. A replica that dies stops renewing,
//!   and the next decision of the org sweeps its slots: within `ttl` of a crash the org has them
//!   back, so a crash never locks it out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::domain::org::OrgId;
use crate::metrics::Metrics;
use crate::store::{SlotCall, Store};

/// `[concurrency]` in gateway.toml.
#[derive(Debug, Clone)]
pub struct SlotSettings {
    /// How long a slot outlives its replica: renewed every `ttl / 3` while its request lasts,
    /// swept by any decision of the org once `ttl` has passed without renewal.
    pub ttl: Duration,
    /// How long a request refused for too many in flight waits for a slot before the 429
    /// (`[concurrency] queue_timeout`); zero: no waiting.
    pub queue_timeout: Duration,
}

impl Default for SlotSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            queue_timeout: Duration::ZERO,
        }
    }
}

/// At most this many releases go out in one round.
const RELEASE_BATCH: usize = 512;

type Held = (Arc<str>, String);

pub struct Slots {
    store: Store,
    clock: Arc<dyn Clock>,
    settings: SlotSettings,
    /// This replica's part of every slot id: slots of two replicas never collide.
    replica: String,
    next: AtomicU64,
    /// The slots this replica holds (by sequence number), for renewal.
    live: Mutex<HashMap<u64, Held>>,
    released: mpsc::UnboundedSender<Held>,
    queue: Mutex<Option<mpsc::UnboundedReceiver<Held>>>,
    metrics: Arc<Metrics>,
}

impl Slots {
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        settings: SlotSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (released, queue) = mpsc::unbounded_channel();
        Self {
            store,
            clock,
            settings,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            next: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            released,
            queue: Mutex::new(Some(queue)),
            metrics,
        }
    }

    pub fn settings(&self) -> &SlotSettings {
        &self.settings
    }

    /// The script arguments of a new slot of `org` (nothing is held until the call applies).
    pub fn call(&self, org: &OrgId, limit: u64) -> SlotCall {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // "s" first: the script tells its threshold tail by a leading "T".
        let mut member = String::with_capacity(2 + self.replica.len() + 20);
        member.push('s');
        member.push_str(&self.replica);
        member.push(':');
        member.push_str(itoa::Buffer::new().format(n));
        SlotCall {
            key: self.store.keys().in_flight(org),
            member,
            limit,
            expiry_ms: self.expiry_ms(),
        }
    }

    fn expiry_ms(&self) -> i64 {
        let ttl = chrono::Duration::from_std(self.settings.ttl).unwrap_or(chrono::Duration::MAX);
        (self.clock.now() + ttl).timestamp_millis()
    }

    /// The decision that carried `call` took its slot: hold it until the guard is dropped.
    pub fn hold(self: &Arc<Self>, call: SlotCall) -> Slot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let held: Held = (Arc::from(call.key), call.member);
        lock(&self.live).insert(id, held);
        self.metrics.concurrency_slots.inc();
        Slot {
            slots: self.clone(),
            id,
        }
    }

    fn release(&self, id: u64) {
        let Some(held) = lock(&self.live).remove(&id) else {
            return;
        };
        self.metrics.concurrency_slots.dec();
        // Only fails once the release task is gone (shutdown): the slot then expires.
        let _ = self.released.send(held);
    }

    /// Give back a slot a call may have taken though nobody holds it (the call's answer was
    /// lost, or its request dropped before it came): removing a slot that was never taken is
    /// harmless.
    pub fn forget(&self, call: &SlotCall) {
        let _ = self
            .released
            .send((Arc::from(call.key.as_str()), call.member.clone()));
    }

    /// Slots this replica holds now.
    pub fn held(&self) -> usize {
        lock(&self.live).len()
    }

    /// Send one batch of releases. Returns how many failed (those slots then expire).
    async fn send(&self, batch: &[Held]) -> usize {
        let failed = self.store.release_slots(batch).await;
        self.metrics
            .concurrency_releases
            .with_label_values(&["released"])
            .inc_by((batch.len() - failed) as u64);
        if failed > 0 {
            self.metrics
                .concurrency_releases
                .with_label_values(&["failed"])
                .inc_by(failed as u64);
            tracing::warn!(
                slots = failed,
                ttl_s = self.settings.ttl.as_secs(),
                "cannot release concurrency slots; they free themselves when their lease expires"
            );
        }
        failed
    }

    /// Push the expiry of every slot held forward by `ttl`. Returns how many were renewed.
    pub async fn renew_once(&self) -> usize {
        let held: Vec<Held> = lock(&self.live).values().cloned().collect();
        if held.is_empty() {
            return 0;
        }
        let failed = self.store.renew_slots(&held, self.expiry_ms()).await;
        if failed > 0 {
            tracing::warn!(
                slots = failed,
                "cannot renew concurrency slots; they free themselves if this goes on past their lease"
            );
        }
        held.len() - failed
    }

    /// The release and renewal tasks, until `stop`; the releases queued by then are sent.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(mut queue) = lock(&self.queue).take() else {
            return;
        };
        // Releases: whatever is queued goes out together; a round in progress is never
        // cancelled (only the wait for the next one is).
        let releases = async {
            let mut batch = Vec::with_capacity(64);
            loop {
                batch.clear();
                tokio::select! {
                    n = queue.recv_many(&mut batch, RELEASE_BATCH) => {
                        if n == 0 {
                            return;
                        }
                    }
                    _ = stop.cancelled() => break,
                }
                self.send(&batch).await;
            }
            queue.close();
            loop {
                batch.clear();
                if queue.recv_many(&mut batch, RELEASE_BATCH).await == 0 {
                    return;
                }
                self.send(&batch).await;
            }
        };
        let renewals = async {
            let mut tick = tokio::time::interval(self.settings.ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                self.renew_once().await;
            }
        };
        tokio::join!(releases, renewals);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A concurrency slot this request holds; dropping it gives the slot back (in the background).
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("id", &self.id).finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(self.id);
    }
}
