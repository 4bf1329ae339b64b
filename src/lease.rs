//! Leases: blocks of a limit reserved in Redis, from which this replica admits requests without
//! a round trip.
//!
//! Redis keeps the guarantees (see "Leases" in `store/decide.lua`): a block counts against its
//! limit from the moment it is granted, so however many replicas hold blocks, admitted units
//! never pass a hard limit; blocks shrink with the headroom, and near the limit there are none,
//! so every decision there is exact. This module is the replica's side: the blocks it holds,
//! what it admitted from each, and when to settle them (a block spent, expired, or the process
//! stopping). A decision is served here only when every limit it touches has a live block (or
//! needs none: a counter without a hard limit only accumulates what to settle); otherwise it goes
//! to Redis as a lease call, which settles this org's blocks for those limits, decides the
//! request exactly and takes new blocks, in the decision's one round trip.
//!
//! Consumed units reach Redis (and so usage reads, the flusher and Postgres) when their block
//! settles: within `ttl` of being admitted, or at once on shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::domain::decision::LimitReply;
use crate::domain::org::OrgId;
use crate::store::{KeySpec, LeaseArg, LeaseCall, Reply, SpecKind, Status};

/// `[leases]` in gateway.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub enabled: bool,
    /// How long this replica admits from a block before settling it. Redis keeps the block
    /// reserved twice as long, so replicas whose clocks disagree by less than `ttl` never see a
    /// live block as expired.
    pub ttl: Duration,
    /// The largest block of one limit one replica takes at once (Redis grants less as the
    /// headroom falls).
    pub max_block: u64,
    /// Settle what a block consumed every quarter `ttl` while keeping the block, so a replica
    /// killed without a shutdown loses at most a quarter `ttl` of admissions rather than
    /// whole blocks. Costs at most four Redis calls per org with traffic, per replica and
    /// `ttl`.
    pub checkpoint: bool,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: Duration::from_secs(1),
            max_block: 1000,
            checkpoint: true,
        }
    }
}

/// A block this replica holds (or, for a limit that never denies, the usage it accumulates).
struct Held {
    /// The limit as it was leased: a plan change (a different limit) ends the lease.
    spec: KeySpec,
    granted: u64,
    /// Admitted since the block was granted; settled with it.
    consumed: u64,
    /// Counters: the counter plus others' reservations when the block was granted (after the
    /// request that took it). Rates: units left to others then.
    base: i64,
    millis: i64,
    until: Instant,
}

impl Held {
    /// A block is needed to admit against this limit (a hard limit); otherwise usage is only
    /// accumulated.
    fn reserves(&self) -> bool {
        self.spec.block && self.spec.limit > 0
    }
}

#[derive(Default)]
struct OrgLeases {
    held: HashMap<String, Held>,
    /// A lease call of this org is in flight: others that cannot be served here go to Redis
    /// without settling (one settlement at a time keeps the accounting simple).
    refilling: bool,
}

/// Settlement of blocks this replica took out of its table for a call: what each consumed. Once
/// the call is answered, `Leases::install` or `Leases::abandon` must see it (they free the
/// org's refill slot).
pub struct Taken {
    pub org: OrgId,
    /// The limits with what they consumed as `amount` (only those that consumed any).
    pub consumed: Vec<KeySpec>,
    /// Whether this call holds the org's refill slot (to give back when it ends).
    refill: bool,
}

pub struct Leases {
    settings: LeaseSettings,
    holder: Arc<str>,
    orgs: DashMap<OrgId, Arc<Mutex<OrgLeases>>>,
}

impl Leases {
    pub fn new(settings: LeaseSettings) -> Self {
        Self {
            settings,
            holder: Arc::from(uuid::Uuid::new_v4().simple().to_string()),
            orgs: DashMap::new(),
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    fn org(&self, org: &OrgId) -> Arc<Mutex<OrgLeases>> {
        if let Some(o) = self.orgs.get(org) {
            return o.clone();
        }
        self.orgs.entry(org.clone()).or_default().clone()
    }

    /// Admit `specs` (a check's limits) from the blocks held, or `None` when one is missing,
    /// spent, expired or leased under another limit.
    pub fn admit(&self, org: &OrgId, specs: &[KeySpec]) -> Option<Vec<LimitReply>> {
        if specs.is_empty() || specs.iter().any(|s| !s.kind.leasable() || s.amount < 0) {
            return None;
        }
        let org = self.orgs.get(org)?.clone();
        let mut o = lock(&org);
        let now = Instant::now();
        for spec in specs {
            let h = o.held.get(&spec.key)?;
            let fits = !h.reserves() || h.granted - h.consumed >= spec.amount as u64;
            if h.until <= now || !same_limit(&h.spec, spec) || !fits {
                return None;
            }
        }
        Some(
            specs
                .iter()
                .map(|spec| {
                    let h = o.held.get_mut(&spec.key).expect("checked above");
                    let before = h.consumed;
                    h.consumed += spec.amount as u64;
                    match spec.kind {
                        SpecKind::Rate => LimitReply {
                            denied: false,
                            value: h.base + (h.granted - h.consumed) as i64,
                            millis: h.millis,
                        },
                        _ => LimitReply {
                            denied: false,
                            value: h.base.saturating_add(before as i64),
                            millis: 0,
                        },
                    }
                })
                .collect(),
        )
    }

    /// The lease part of a Redis call for `specs`. `refill`: the call may settle this org's
    /// blocks of these limits and take new ones (a check without an idempotency key); else it
    /// only sees every reservation. Settling what was taken is the caller's to account for
    /// when the call fails (see `Taken`).
    pub fn call(
        &self,
        org: &OrgId,
        specs: &[KeySpec],
        refill: bool,
        now: chrono::DateTime<chrono::Utc>,
    ) -> (LeaseCall, Taken) {
        let mut taken = Taken {
            org: org.clone(),
            consumed: Vec::new(),
            refill: false,
        };
        let mut args = vec![LeaseArg::LOOK; specs.len()];
        if refill {
            let org_leases = self.org(org);
            let mut o = lock(&org_leases);
            if !o.refilling {
                o.refilling = true;
                taken.refill = true;
                for (spec, arg) in specs.iter().zip(args.iter_mut()) {
                    if !spec.kind.leasable() {
                        continue;
                    }
                    let consumed = o.held.remove(&spec.key).map_or(0, |h| h.consumed);
                    if consumed > 0 {
                        taken.consumed.push(KeySpec {
                            amount: consumed as i64,
                            ..spec.clone()
                        });
                    }
                    *arg = LeaseArg {
                        consumed: Some(consumed),
                        want: self.settings.max_block,
                        checkpoint: false,
                    };
                }
            }
        }
        (self.lease_call(now, args), taken)
    }

    fn lease_call(&self, now: chrono::DateTime<chrono::Utc>, args: Vec<LeaseArg>) -> LeaseCall {
        LeaseCall {
            holder: self.holder.clone(),
            expiry_us: now.timestamp_micros() + 2 * self.settings.ttl.as_micros() as i64,
            args,
        }
    }

    /// Keep the blocks a call granted. `reply`: Redis's answer (its status says whether the
    /// request's own amounts were applied).
    pub fn install(&self, taken: &Taken, specs: &[KeySpec], reply: &Reply) {
        if !taken.refill {
            return;
        }
        let org_leases = self.org(&taken.org);
        let mut o = lock(&org_leases);
        o.refilling = false;
        if reply.status != Status::Applied {
            return;
        }
        let until = Instant::now() + self.settings.ttl;
        for ((spec, limit), lease) in specs.iter().zip(&reply.limits).zip(&reply.leases) {
            if !spec.kind.leasable() {
                continue;
            }
            let held = Held {
                spec: KeySpec {
                    amount: 0,
                    ..spec.clone()
                },
                granted: lease.granted,
                consumed: 0,
                base: match spec.kind {
                    SpecKind::Rate => (limit.value - lease.granted as i64).max(0),
                    _ => limit.value.saturating_add(spec.amount),
                },
                millis: limit.millis,
                until,
            };
            if lease.granted > 0 || !held.reserves() {
                o.held.insert(spec.key.clone(), held);
            }
        }
    }

    /// A call that carried `taken` failed: free the org's refill slot. The consumed units are
    /// the caller's to count (they were admitted).
    pub fn abandon(&self, taken: &Taken) {
        if taken.refill
            && let Some(o) = self.orgs.get(&taken.org)
        {
            lock(&o).refilling = false;
        }
    }

    /// Blocks to settle now: those expired here (all of them when `all`, at shutdown), taken
    /// out of the table, per org: the limits as leased, and the lease call that settles them.
    /// With `checkpoint`, the same call also settles what the live blocks consumed, keeping
    /// them (their consumed units leave the block here as they leave the lease in Redis).
    /// Each org's refill slot is held until `abandon` (after the call): a refill running
    /// meanwhile would release this holder's lease, and the settlement would then release the
    /// refill's new one.
    pub fn expired(
        &self,
        all: bool,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Vec<(Vec<KeySpec>, LeaseCall, Taken)> {
        let instant = Instant::now();
        let mut out = Vec::new();
        self.orgs.retain(|org, org_leases| {
            let mut o = lock(org_leases);
            if o.refilling {
                return true;
            }
            let checkpoint = self.settings.checkpoint && !all;
            let due: Vec<(String, bool)> = o
                .held
                .iter()
                .filter_map(|(k, h)| {
                    if all || h.until <= instant {
                        Some((k.clone(), false))
                    } else if checkpoint && h.consumed > 0 {
                        Some((k.clone(), true))
                    } else {
                        None
                    }
                })
                .collect();
            if !due.is_empty() {
                o.refilling = true;
                let mut specs = Vec::with_capacity(due.len());
                let mut args = Vec::with_capacity(due.len());
                let mut consumed = Vec::new();
                for (key, keep) in due {
                    let (spec, units) = if keep {
                        let h = o.held.get_mut(&key).expect("listed above");
                        let units = std::mem::take(&mut h.consumed);
                        h.granted = h.granted.saturating_sub(units);
                        if h.spec.kind != SpecKind::Rate {
                            // the counter now holds them
                            h.base = h.base.saturating_add(units as i64);
                        }
                        (h.spec.clone(), units)
                    } else {
                        let h = o.held.remove(&key).expect("listed above");
                        (h.spec, h.consumed)
                    };
                    if units > 0 {
                        consumed.push(KeySpec {
                            amount: units as i64,
                            ..spec.clone()
                        });
                    }
                    args.push(LeaseArg {
                        consumed: Some(units),
                        want: 0,
                        checkpoint: keep,
                    });
                    specs.push(spec);
                }
                out.push((
                    specs,
                    self.lease_call(now, args),
                    Taken {
                        org: org.clone(),
                        consumed,
                        refill: true,
                    },
                ));
            }
            o.refilling || !o.held.is_empty()
        });
        out
    }

    /// Take credits (negative amounts: a refund) out of what this replica's blocks consumed and
    /// has not settled yet, where a block holds at least that much: Redis never saw those units,
    /// and a credit sent there first would be clamped at zero and then the settlement would add
    /// them back. Returns, per spec, whether it was taken here.
    pub fn give_back(&self, org: &OrgId, specs: &[KeySpec]) -> Vec<bool> {
        let Some(org_leases) = self.orgs.get(org).map(|o| o.clone()) else {
            return vec![false; specs.len()];
        };
        let mut o = lock(&org_leases);
        specs
            .iter()
            .map(|spec| {
                let credit = spec.amount.unsigned_abs();
                match o.held.get_mut(&spec.key) {
                    Some(h) if spec.amount < 0 && h.consumed >= credit => {
                        h.consumed -= credit;
                        true
                    }
                    _ => false,
                }
            })
            .collect()
    }
}

/// The same limit as when it was leased (a plan change or a catalog reload may change it).
fn same_limit(held: &KeySpec, now: &KeySpec) -> bool {
    held.kind == now.kind
        && held.limit == now.limit
        && held.block == now.block
        && held.param == now.param
}

fn lock(m: &Mutex<OrgLeases>) -> std::sync::MutexGuard<'_, OrgLeases> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// How often expired blocks are looked for: a quarter of their life, so a block is settled
/// within 1.25 `ttl` of being granted.
pub fn settle_every(settings: &LeaseSettings) -> Duration {
    (settings.ttl / 4).max(Duration::from_millis(20))
}
