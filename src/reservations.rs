//! The `/v1/reservations` use case: reserve amounts now, settle the actual (or release) later.
//!
//! Creating a reservation is an ordinary decision (`Mode::Check`, one round trip), so the
//! reserved units are in the counters from the start, exactly once, like any admitted charge.
//! Its record in Redis (`store::reservations`) says what was reserved and until when. Ending it
//! (settle, release, or expiry noticed by any replica's sweeper) goes through one atomic claim,
//! so exactly one caller ends it; that caller then applies the differences under idempotency
//! keys of the reservation's own (`rsv:<id>:up` / `:down`), and marks the record done. A caller
//! that finds a reservation ended but not done (a crash or a fault in between) applies them
//! again, which the keys make harmless: whatever happens, each unit is counted once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::decision::{Charge, Mode, merge_charges};
use crate::domain::level::Levels;
use crate::domain::plan::Catalog;
use crate::domain::reservation::{Ending, Held, OnExpiry, ReservationId, differences};
use crate::metrics::Metrics;
use crate::quota::{Decision, QuotaError, QuotaService};
use crate::store::StoreError;
use crate::store::reservations::Claimed;

#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    #[error("no such reservation")]
    NotFound,
    /// Settled or released before.
    #[error("the reservation was already {0}")]
    Ended(&'static str),
    /// It expired before this call; how it was settled.
    #[error("the reservation expired")]
    Expired(OnExpiry),
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a reservation record could not be read: {0}")]
    Corrupt(String),
}

/// How many due reservations one sweep looks at.
const SWEEP_BATCH: isize = 100;

pub struct Reservations {
    quota: Arc<QuotaService>,
    metrics: Arc<Metrics>,
    on_expiry: OnExpiry,
}

/// A reservation made: its id and expiry (`None` when the decision denied it).
pub struct Reserved<'c> {
    pub id: Option<ReservationId>,
    pub expires_at: DateTime<Utc>,
    pub decision: Decision<'c>,
}

impl Reservations {
    pub fn new(quota: Arc<QuotaService>, metrics: Arc<Metrics>, on_expiry: OnExpiry) -> Self {
        Self {
            quota,
            metrics,
            on_expiry,
        }
    }

    /// Charge `charges` now (denied like `/v1/check` when they do not fit) and record the
    /// reservation until `ttl` from now.
    pub async fn create<'c>(
        &self,
        catalog: &'c Catalog,
        org: &crate::domain::org::OrgId,
        levels: &Levels<'c>,
        charges: &[Charge<'c>],
        ttl: Duration,
    ) -> Result<Reserved<'c>, ReservationError> {
        let merged = merge_charges(charges);
        let decision = self
            .quota
            .decide(catalog, org, levels, &merged, Mode::Check, None)
            .await?;
        let now = self.quota.now();
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        let denied =
            decision.eval.outcome != crate::domain::decision::Outcome::Allowed && !decision.shadow;
        if denied || !decision.eval.applied {
            return Ok(Reserved {
                id: None,
                expires_at,
                decision,
            });
        }
        let id = ReservationId::new(org.clone());
        let held = Held {
            charges: merged
                .iter()
                .map(|c| (c.metric.id.clone(), c.amount))
                .collect(),
            key_id: levels.key.map(str::to_string),
            user_id: levels.user.map(str::to_string),
        };
        let record = serde_json::to_string(&held).unwrap_or_default();
        if let Err(e) = self
            .quota
            .store()
            .reservation_put(&id, &record, expires_at.timestamp_millis())
            .await
        {
            // Without a record nobody could settle it: give the units back and say it failed.
            if let Err(back) = self.quota.refund(catalog, org, levels, &merged).await {
                tracing::error!(error = %back, org = %org, "cannot give back a reservation whose record failed");
            }
            return Err(e.into());
        }
        Ok(Reserved {
            id: Some(id),
            expires_at,
            decision,
        })
    }

    /// End a reservation with `ending` (settled or released). Returns what was reserved.
    pub async fn end(
        &self,
        catalog: &Catalog,
        id: &ReservationId,
        ending: Ending,
    ) -> Result<Vec<(String, i64)>, ReservationError> {
        let asked = serde_json::to_string(&ending).unwrap_or_default();
        let now = self.quota.now().timestamp_millis();
        let claimed = self
            .quota
            .store()
            .reservation_claim(id, now, Some(&asked), &self.expired())
            .await?;
        match claimed {
            Claimed::Unknown => Err(ReservationError::NotFound),
            Claimed::Open => Err(ReservationError::Corrupt("open after a claim".into())),
            Claimed::Won { charges, ending } => {
                let (reserved, ending) = self.apply(catalog, id, &charges, &ending, true).await?;
                match ending {
                    Ending::Expired { on_expiry } => Err(ReservationError::Expired(on_expiry)),
                    _ => Ok(reserved),
                }
            }
            Claimed::Before {
                charges,
                ending,
                done,
            } => {
                let ending = if done {
                    parse::<Ending>(&ending)?
                } else {
                    self.apply(catalog, id, &charges, &ending, false).await?.1
                };
                Err(match ending {
                    Ending::Expired { on_expiry } => ReservationError::Expired(on_expiry),
                    other => ReservationError::Ended(other.label()),
                })
            }
        }
    }

    fn expired(&self) -> String {
        serde_json::to_string(&Ending::Expired {
            on_expiry: self.on_expiry,
        })
        .unwrap_or_default()
    }

    /// Put an ending's differences in the counters, once (idempotency keys of the
    /// reservation's own), then mark the record done. `won`: this caller's claim ended it (the
    /// metrics count it once; a caller finishing another's ending does not).
    async fn apply(
        &self,
        catalog: &Catalog,
        id: &ReservationId,
        charges: &str,
        ending: &str,
        won: bool,
    ) -> Result<(Vec<(String, i64)>, Ending), ReservationError> {
        let held = Held::parse(charges).map_err(|e| ReservationError::Corrupt(e.to_string()))?;
        let levels = Levels {
            key: held.key_id.as_deref(),
            user: held.user_id.as_deref(),
        };
        let reserved = held.charges.clone();
        let ending: Ending = parse(ending)?;
        let diffs = differences(&reserved, &ending);
        let resolve = |positive: bool| -> Vec<Charge<'_>> {
            diffs
                .iter()
                .filter(|(_, d)| (*d > 0) == positive)
                .filter_map(|(m, d)| {
                    catalog.metric(m).map(|metric| Charge {
                        metric,
                        amount: d.abs(),
                    })
                })
                .collect()
        };
        let (up, down) = (resolve(true), resolve(false));
        if !up.is_empty() {
            // Never denied: the units were spent.
            self.quota
                .decide(
                    catalog,
                    &id.org,
                    &levels,
                    &up,
                    Mode::Record,
                    Some(&format!("{id}:up")),
                )
                .await?;
            if won {
                let over: i64 = up.iter().map(|c| c.amount).sum();
                self.metrics.settle_overshoot_units.inc_by(over as u64);
            }
        }
        if !down.is_empty() {
            self.quota
                .refund_once(
                    catalog,
                    &id.org,
                    &levels,
                    &down,
                    Some(&format!("{id}:down")),
                )
                .await?;
        }
        self.quota.store().reservation_done(id).await?;
        if won {
            self.metrics
                .settlements
                .with_label_values(&["api", ending.label()])
                .inc();
        }
        Ok((reserved, ending))
    }

    /// One sweep: end the reservations that expired (per `on_expiry`) and finish those a
    /// fault interrupted. Safe on every replica at once: the claim picks one. Returns how many
    /// it finished.
    pub async fn sweep_once(&self) -> Result<usize, ReservationError> {
        let store = self.quota.store();
        let now = self.quota.now().timestamp_millis();
        let catalog = self.quota.catalog();
        let expired = self.expired();
        let mut finished = 0;
        for raw in store.reservations_due(now, SWEEP_BATCH).await? {
            let Some(id) = ReservationId::parse(&raw) else {
                store.reservation_unlist(&raw).await?;
                continue;
            };
            let (charges, ending, won) =
                match store.reservation_claim(&id, now, None, &expired).await? {
                    Claimed::Unknown | Claimed::Before { done: true, .. } => {
                        store.reservation_unlist(&raw).await?;
                        continue;
                    }
                    Claimed::Open => continue,
                    Claimed::Won { charges, ending } => (charges, ending, true),
                    Claimed::Before {
                        charges,
                        ending,
                        done: false,
                    } => (charges, ending, false),
                };
            match self.apply(&catalog, &id, &charges, &ending, won).await {
                Ok(_) => finished += usize::from(won),
                // The next sweep tries again; the keys make that harmless.
                Err(e) => {
                    tracing::warn!(org = %id.org, error = %e, "cannot finish an expired reservation yet");
                }
            }
        }
        Ok(finished)
    }

    /// Sweep every `every` until `stop`.
    pub async fn run(self: Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.sweep_once().await {
                        tracing::debug!(error = %e, "reservation sweep failed; trying again");
                    }
                }
            }
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, ReservationError> {
    serde_json::from_str(raw).map_err(|e| ReservationError::Corrupt(e.to_string()))
}
