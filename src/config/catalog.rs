//! `plans.toml`: metrics and plans parsed and validated, problems collected in one report.

use super::*;
use crate::domain::plan::Per;

// ---- plan catalog ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricRaw {
    unit: String,
    #[serde(default)]
    kind: Option<MetricKindRaw>,
    #[serde(default)]
    leases: Option<bool>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum MetricKindRaw {
    Counter,
    Gauge,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanRaw {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    upgrade_to: Option<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    quotas: BTreeMap<String, toml::Value>,
    #[serde(default)]
    rates: BTreeMap<String, toml::Value>,
    #[serde(default)]
    enforcement: Enforcement,
    #[serde(default)]
    leases: Option<bool>,
    #[serde(default)]
    notify_at: Option<Vec<i64>>,
    #[serde(default)]
    concurrency: Option<ConcurrencyRaw>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConcurrencyRaw {
    requests: i64,
}

/// The most requests in flight a plan may allow: one slot is one member of a Redis sorted set
/// that every decision of the org sweeps, so the set must stay small.
pub(super) const MAX_CONCURRENCY: i64 = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuotaRaw {
    limit: i64,
    #[serde(default)]
    period: Option<Period>,
    #[serde(default)]
    overage: Option<OverageRaw>,
    #[serde(default)]
    per: Per,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum OverageRaw {
    Block,
    Allow,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateRaw {
    limit: i64,
    window: String,
    #[serde(default)]
    per: Per,
}

/// `notify_at`: percentages of a limit, 1-1000, strictly ascending (so unique).
pub(super) fn notify_at(r: &mut Report<'_>, key: &str, raw: Vec<i64>) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        match u16::try_from(p).ok().filter(|p| (1..=1000).contains(p)) {
            None => r.add(
                format!("{key}[{i}]"),
                "must be a whole percentage from 1 to 1000",
            ),
            Some(p) if out.last().is_some_and(|&l| l >= p) => r.add(
                format!("{key}[{i}]"),
                "thresholds must be ascending, each once",
            ),
            Some(p) => out.push(p),
        }
    }
    out
}

/// Ids of metrics and plans end up in Redis keys and HTTP headers: keep them plain.
pub(super) fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub(super) const ID_RULE: &str = "must be 1-64 characters of A-Z, a-z, 0-9, '_', '-' or '.'";

/// A quota or rate entry may be one table or an array of tables (e.g. a daily and a monthly cap).
pub(super) fn one_or_many(v: toml::Value) -> Vec<(Option<usize>, toml::Value)> {
    match v {
        toml::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (Some(i), v))
            .collect(),
        other => vec![(None, other)],
    }
}

/// Parse a catalog from text; `path` only names the source in error messages.
pub fn catalog_from_str(path: &Path, text: &str) -> Result<Catalog, ConfigError> {
    let mut problems = Vec::new();
    let catalog = parse_table(path, text, &mut problems)
        .and_then(|t| catalog_from_table(path, t, &mut problems));
    match catalog {
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(ConfigError { problems }),
    }
}

pub(super) fn load_catalog_into(path: &Path, problems: &mut Vec<Problem>) -> Option<Catalog> {
    let table = read_table(path, problems)?;
    catalog_from_table(path, table, problems)
}

/// Take the table under `key`, reporting it as `wrong` (not a table) or `missing`; an empty
/// table stands in so the other checks still run.
pub(super) fn required_table(
    r: &mut Report<'_>,
    table: &mut toml::Table,
    key: &str,
    wrong: &str,
    missing: &str,
) -> toml::Table {
    match table.remove(key) {
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            r.add(key, wrong);
            toml::Table::new()
        }
        None => {
            r.add(key, missing);
            toml::Table::new()
        }
    }
}

pub(super) fn catalog_from_table(
    path: &Path,
    mut table: toml::Table,
    problems: &mut Vec<Problem>,
) -> Option<Catalog> {
    let mut r = Report {
        file: path,
        problems,
        catalog: None,
    };
    let before = r.problems.len();

    let default_plan = match table.remove("default_plan") {
        Some(toml::Value::String(s)) => Some(s),
        Some(_) => {
            r.add("default_plan", "must be a string");
            None
        }
        None => {
            r.add("default_plan", "missing: the plan of orgs with no plan set");
            None
        }
    };
    let upgrade_url = match table.remove("upgrade_url") {
        Some(toml::Value::String(s)) => {
            if !(s.starts_with("https://") || s.starts_with("http://")) {
                r.add("upgrade_url", "must be an http:// or https:// URL");
            }
            Some(s)
        }
        Some(_) => {
            r.add("upgrade_url", "must be a string");
            None
        }
        None => None,
    };
    let default_notify = match table.remove("notify_at") {
        Some(toml::Value::Array(items)) => {
            let mut raw = Vec::with_capacity(items.len());
            for (i, v) in items.into_iter().enumerate() {
                match v {
                    toml::Value::Integer(n) => raw.push(n),
                    _ => r.add(format!("notify_at[{i}]"), "must be a whole number"),
                }
            }
            notify_at(&mut r, "notify_at", raw)
        }
        Some(_) => {
            r.add("notify_at", "must be a list of percentages, e.g. [80, 100]");
            Vec::new()
        }
        None => Vec::new(),
    };
    let metrics_t = required_table(
        &mut r,
        &mut table,
        "metrics",
        "must be a table of metric definitions",
        "missing: declare at least one metric under [metrics]",
    );
    let plans_t = required_table(
        &mut r,
        &mut table,
        "plans",
        "must be a table of plans",
        "missing: define at least one plan under [plans.<id>]",
    );
    for key in table.keys() {
        r.add(key.clone(), "unknown key");
    }

    // Names declared in the file, even when their definition has an error: cross-references to
    // them must not produce a second, misleading "unknown" problem.
    let declared_metrics: BTreeSet<String> = metrics_t.keys().cloned().collect();
    let declared_plans: BTreeSet<String> = plans_t.keys().cloned().collect();
    let mut metrics = BTreeMap::new();
    for (id, v) in metrics_t {
        let key = format!("metrics.{id}");
        if !valid_id(&id) {
            r.add(&key, format!("metric id {ID_RULE}"));
        }
        if let Some(m) = r.parse::<MetricRaw>(&key, v) {
            if m.unit.trim().is_empty() {
                r.add(format!("{key}.unit"), "must not be empty");
            }
            let kind = match m.kind {
                Some(MetricKindRaw::Gauge) => MetricKind::Gauge,
                _ => MetricKind::Counter,
            };
            metrics.insert(
                id.clone(),
                Metric {
                    id,
                    unit: m.unit,
                    kind,
                    leases: m.leases.unwrap_or(true),
                },
            );
        }
    }

    let mut plans = BTreeMap::new();
    for (id, v) in plans_t {
        let key = format!("plans.{id}");
        if !valid_id(&id) {
            r.add(&key, format!("plan id {ID_RULE}"));
        }
        let Some(raw) = r.parse::<PlanRaw>(&key, v) else {
            continue;
        };
        let mut quotas = Vec::new();
        for (metric_id, v) in raw.quotas {
            let metric = metrics.get(&metric_id);
            if !declared_metrics.contains(&metric_id) {
                r.add(
                    format!("{key}.quotas.{metric_id}"),
                    "undeclared metric (declare it under [metrics])",
                );
            }
            for (idx, v) in one_or_many(v) {
                let qkey = match idx {
                    Some(i) => format!("{key}.quotas.{metric_id}[{i}]"),
                    None => format!("{key}.quotas.{metric_id}"),
                };
                let Some(q) = r.parse::<QuotaRaw>(&qkey, v) else {
                    continue;
                };
                if q.limit <= 0 {
                    r.add(format!("{qkey}.limit"), "must be greater than 0");
                    continue;
                }
                let Some(metric) = metric else { continue };
                match (metric.kind, q.period) {
                    (MetricKind::Counter, None) => {
                        r.add(
                            format!("{qkey}.period"),
                            "missing: a counter quota needs a period (minute, hour, day, month or billing_month)",
                        );
                        continue;
                    }
                    (MetricKind::Gauge, Some(_)) => {
                        r.add(
                            format!("{qkey}.period"),
                            "a gauge is a level, not a count per period: remove the period",
                        );
                        continue;
                    }
                    (MetricKind::Gauge, None) if q.per != Per::Org => {
                        r.add(
                            format!("{qkey}.per"),
                            "a gauge is the org's level: only counters have per-key or per-user quotas",
                        );
                        continue;
                    }
                    _ => {}
                }
                if quotas.iter().any(|e: &Quota| {
                    e.metric == metric_id && e.period == q.period && e.per == q.per
                }) {
                    r.add(&qkey, "a second quota for the same metric, period and per");
                    continue;
                }
                quotas.push(Quota {
                    metric: metric_id.clone(),
                    limit: q.limit as u64,
                    period: q.period,
                    overage: match q.overage {
                        Some(OverageRaw::Allow) => Overage::Allow,
                        _ => Overage::Block,
                    },
                    per: q.per,
                });
            }
        }
        let mut rates = Vec::new();
        for (metric_id, v) in raw.rates {
            let metric = metrics.get(&metric_id);
            match metric {
                None if declared_metrics.contains(&metric_id) => {}
                None => r.add(
                    format!("{key}.rates.{metric_id}"),
                    "undeclared metric (declare it under [metrics])",
                ),
                Some(m) if m.kind == MetricKind::Gauge => r.add(
                    format!("{key}.rates.{metric_id}"),
                    "a gauge cannot have a rate limit",
                ),
                _ => {}
            }
            for (idx, v) in one_or_many(v) {
                let rkey = match idx {
                    Some(i) => format!("{key}.rates.{metric_id}[{i}]"),
                    None => format!("{key}.rates.{metric_id}"),
                };
                let Some(rr) = r.parse::<RateRaw>(&rkey, v) else {
                    continue;
                };
                if rr.limit <= 0 {
                    r.add(format!("{rkey}.limit"), "must be greater than 0");
                    continue;
                }
                let window = match parse_duration(&rr.window) {
                    Ok(w) => w,
                    Err(e) => {
                        r.add(format!("{rkey}.window"), e);
                        continue;
                    }
                };
                // The GCRA state is kept in integer microseconds scaled by the limit, which
                // must stay exact in a Lua double.
                if (window.as_micros() as f64) * (rr.limit as f64) > 2f64.powi(52) {
                    r.add(
                        &rkey,
                        "limit × window is too large (keep it under 2^52 units·µs)",
                    );
                    continue;
                }
                if window > Duration::from_secs(86_400) {
                    r.add(
                        format!("{rkey}.window"),
                        "must be at most 1d (use a quota for longer periods)",
                    );
                    continue;
                }
                if rates
                    .iter()
                    .any(|e: &Rate| e.metric == metric_id && e.window == window && e.per == rr.per)
                {
                    r.add(&rkey, "a second rate for the same metric, window and per");
                    continue;
                }
                if metric.is_some() {
                    rates.push(Rate {
                        metric: metric_id.clone(),
                        limit: rr.limit as u64,
                        window,
                        window_label: rr.window.trim().to_string(),
                        per: rr.per,
                    });
                }
            }
        }
        let plan_notify = match raw.notify_at {
            Some(list) => notify_at(&mut r, &format!("{key}.notify_at"), list),
            None => default_notify.clone(),
        };
        let concurrency = match raw.concurrency {
            Some(c) if !(1..=MAX_CONCURRENCY).contains(&c.requests) => {
                r.add(
                    format!("{key}.concurrency.requests"),
                    format!("must be from 1 to {MAX_CONCURRENCY}"),
                );
                None
            }
            Some(c) => Some(Concurrency {
                requests: c.requests as u64,
            }),
            None => None,
        };
        for (i, f) in raw.features.iter().enumerate() {
            if !valid_id(f) {
                r.add(format!("{key}.features[{i}]"), format!("feature {ID_RULE}"));
            }
        }
        plans.insert(
            id.clone(),
            Plan {
                name: raw.name.unwrap_or_else(|| id.clone()),
                enforcement: raw.enforcement,
                id,
                upgrade_to: raw.upgrade_to,
                features: raw.features.into_iter().collect::<BTreeSet<_>>(),
                quotas,
                rates,
                concurrency,
                notify_at: plan_notify,
                leases: raw.leases.unwrap_or(true),
            },
        );
    }

    if let Some(d) = &default_plan
        && !declared_plans.contains(d)
    {
        r.add("default_plan", format!("unknown plan `{d}`"));
    }
    for (id, plan) in &plans {
        if let Some(up) = &plan.upgrade_to
            && !declared_plans.contains(up)
        {
            r.add(
                format!("plans.{id}.upgrade_to"),
                format!("unknown plan `{up}`"),
            );
        }
    }
    for id in plans.keys() {
        if let Some(cycle) = upgrade_cycle(&plans, id)
            && cycle.first() == Some(id)
        {
            r.add(
                format!("plans.{id}.upgrade_to"),
                format!("upgrade cycle: {}", cycle.join(" -> ")),
            );
        }
    }

    if r.problems.len() > before {
        return None;
    }
    Some(Catalog {
        default_plan: default_plan?,
        upgrade_url,
        metrics,
        plans,
    })
}

/// The cycle reachable from `start` through `upgrade_to`, if `start` is on one (reported once,
/// by the smallest id on the cycle).
pub(super) fn upgrade_cycle(plans: &BTreeMap<String, Plan>, start: &String) -> Option<Vec<String>> {
    let mut seen = vec![start.clone()];
    let mut cur = plans.get(start)?.upgrade_to.clone();
    while let Some(next) = cur {
        if &next == start {
            seen.push(next);
            let min = seen.iter().min()?;
            return (min == start).then_some(seen);
        }
        if seen.contains(&next) {
            return None;
        }
        cur = plans.get(&next).and_then(|p| p.upgrade_to.clone());
        seen.push(next);
    }
    None
}
