//! The plan catalog: metrics, plans and their limits, already validated.
//!
//! Values of these types only exist after `config::load_catalog` has checked every cross-reference
//! (declared metrics, `upgrade_to` targets, no cycles), so the decision code can index freely and
//! never has to handle a dangling name on the request path.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::period::Period;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Accumulates within a period (requests, tokens, bytes).
    Counter,
    /// A level that goes up and down (projects, seats, storage); never reset by a period.
    Gauge,
}

impl MetricKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub id: String,
    pub unit: String,
    pub kind: MetricKind,
    /// `leases = false`: decisions charging this metric never admit from lease blocks (see
    /// `[leases]`); every one of them is one Redis call.
    pub leases: bool,
}

/// What happens when a quota is used up (`"block"` or `"allow"` where it is read or written
/// as JSON: a key's own quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overage {
    #[default]
    /// Deny with 402 (a hard limit).
    Block,
    /// Record and report usage past the limit, never deny (a soft limit).
    Allow,
}

/// Whom a quota or rate caps. `Key` and `User` split one org's allowance among its API keys
/// and its end users (a CI key with a smaller budget, one user of a customer's product unable to
/// spend the whole org's quota); every level of a request is checked in the same decision, and
/// the org's own limits always apply too.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    #[default]
    Org,
    /// Each API key of the org (the proxy knows it from the key; `/v1/*` callers name it).
    Key,
    /// Each end user, named by `[identity] user_header` or a request's `user_id`.
    User,
}

impl Per {
    pub fn as_str(self) -> &'static str {
        match self {
            Per::Org => "org",
            Per::Key => "key",
            Per::User => "user",
        }
    }
}

/// A cap on a metric's total: per period for counters, on the level for gauges (`period: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub metric: String,
    pub limit: u64,
    pub period: Option<Period>,
    pub overage: Overage,
    pub per: Per,
}

/// A cap on how fast a metric may be spent: `limit` units per `window`, enforced with GCRA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub metric: String,
    pub limit: u64,
    pub window: Duration,
    /// The window as configured (`"1s"`, `"1m"`), used in headers and denial bodies.
    pub window_label: String,
    pub per: Per,
}

/// A cap on an org's requests in flight through the proxy at once, across all replicas
/// (`concurrency = { requests = N }`). A slot is taken in the decision's one Redis call and
/// held until the response body ends or the client goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    pub requests: u64,
}

/// Whether limits block, or are only counted and reported (for safe roll-outs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    #[default]
    Enforce,
    /// Count and report (headers, metrics, logs) what would be denied, but never deny.
    Shadow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub enforcement: Enforcement,
    pub upgrade_to: Option<String>,
    pub features: BTreeSet<String>,
    pub quotas: Vec<Quota>,
    pub rates: Vec<Rate>,
    /// Requests in flight at once; `None`: unlimited.
    pub concurrency: Option<Concurrency>,
    /// `leases = false`: this plan's orgs never admit from lease blocks, whatever `[leases]`
    /// says (a plan with small limits, or one that must see every request in Redis).
    pub leases: bool,
    /// Percentages of each quota's limit at which the product is told (`notify_at`: the plan's
    /// own, else the catalog's), ascending; empty: no threshold events for this plan.
    pub notify_at: Vec<u16>,
}

impl Plan {
    /// The org's own quotas of `metric` (not those per key or per user).
    pub fn quotas_for<'a>(&'a self, metric: &'a str) -> impl Iterator<Item = &'a Quota> + 'a {
        self.quotas_per(metric, Per::Org)
    }

    /// The org's own rates of `metric`.
    /// Whether decisions of this plan charging `metrics` may admit from lease blocks.
    pub fn leases_for<'m>(&self, metrics: impl IntoIterator<Item = &'m Metric>) -> bool {
        self.leases && metrics.into_iter().all(|m| m.leases)
    }

    pub fn rates_for<'a>(&'a self, metric: &'a str) -> impl Iterator<Item = &'a Rate> + 'a {
        self.rates_per(metric, Per::Org)
    }

    pub fn quotas_per<'a>(
        &'a self,
        metric: &'a str,
        per: Per,
    ) -> impl Iterator<Item = &'a Quota> + 'a {
        self.quotas
            .iter()
            .filter(move |q| q.metric == metric && q.per == per)
    }

    pub fn rates_per<'a>(
        &'a self,
        metric: &'a str,
        per: Per,
    ) -> impl Iterator<Item = &'a Rate> + 'a {
        self.rates
            .iter()
            .filter(move |r| r.metric == metric && r.per == per)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub default_plan: String,
    /// Template with `{org_id}` and `{plan}` placeholders.
    pub upgrade_url: Option<String>,
    pub metrics: BTreeMap<String, Metric>,
    pub plans: BTreeMap<String, Plan>,
}

impl Catalog {
    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.get(id)
    }

    /// The plan an org is on: its assigned plan if it still exists in the catalog, else the
    /// default. A plan removed from the catalog must not lock its orgs out.
    pub fn plan_or_default(&self, id: Option<&str>) -> &Plan {
        id.and_then(|id| self.plans.get(id))
            .or_else(|| self.plans.get(&self.default_plan))
            .expect("validated catalog always contains its default plan")
    }

    pub fn metric(&self, id: &str) -> Option<&Metric> {
        self.metrics.get(id)
    }

    /// Every feature named by any plan, so entitlements can answer `false` explicitly.
    pub fn all_features(&self) -> BTreeSet<&str> {
        self.plans
            .values()
            .flat_map(|p| p.features.iter().map(String::as_str))
            .collect()
    }

    /// How far up the `upgrade_to` chains a plan sits: 0 for a plan nothing upgrades to, one
    /// more than the plan below it otherwise. A move to a lower rank is a downgrade.
    pub fn rank(&self, id: &str) -> usize {
        self.plans
            .values()
            .filter_map(|start| {
                let mut cur = Some(start);
                let mut steps = 0;
                while let Some(p) = cur {
                    if p.id == id {
                        return Some(steps);
                    }
                    steps += 1;
                    if steps > self.plans.len() {
                        return None;
                    }
                    cur = p.upgrade_to.as_deref().and_then(|u| self.plans.get(u));
                }
                None
            })
            .max()
            .unwrap_or(0)
    }

    /// The upgrade URL for an org and a suggested plan, with placeholders filled in.
    pub fn upgrade_url_for(&self, org_id: &str, plan: &str) -> Option<String> {
        self.upgrade_url
            .as_ref()
            .map(|t| t.replace("{org_id}", org_id).replace("{plan}", plan))
    }
}
