//! Every Redis key and channel name the gateway uses is built here, and only here.
//!
//! Layout: `{prefix}:{<org_id>}:<kind>:...`. The `{org_id}` part is a Redis Cluster hash tag, so
//! all keys of one org live in one slot and a single Lua script may touch all of them (no
//! CROSSSLOT). The prefix lets several gateways (or test runs) share one Redis without colliding.
//! Org ids cannot contain braces (see `domain::org`), and the prefix is validated to have none.

use sha2::{Digest, Sha256};

use crate::domain::decision::{Limit, Target};
use crate::domain::level::Scope;
use crate::domain::org::OrgId;
use crate::domain::period::Period;

/// What `Keys::parse_limit` reads from a key: org, metric, and for a counter its period and
/// period start (Unix seconds).
pub type ParsedLimit = (OrgId, String, Option<(Period, i64)>);

/// What `Keys::parse_durable` reads from a key: org, metric, and for a counter its period
/// (`month` or `billing_month`) and period start (Unix seconds).
pub type ParsedDurable = ParsedLimit;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// A `SCAN MATCH` pattern for every key of this gateway (reconciliation).
    pub fn scan_pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }

    fn org_base(&self, org: &OrgId, extra: usize) -> String {
        let mut s = String::with_capacity(self.prefix.len() + org.as_str().len() + 4 + extra);
        s.push_str(&self.prefix);
        s.push_str(":{");
        s.push_str(org.as_str());
        s.push_str("}:");
        s
    }

    /// `c:<metric>:<period>:<period start, unix seconds>` for counters,
    /// `g:<metric>` for gauges, `r:<metric>:<window ms>` for rates; a key's or an end user's
    /// limit puts `lk:<key id>:` or `lu:<user id>:` before that (so no parser of the org's own
    /// keys mistakes one for the org's meter).
    pub fn limit(&self, org: &OrgId, limit: &Limit<'_>) -> String {
        let metric = &limit.metric.id;
        let subject = limit.scope.subject().map_or(0, |s| s.len() + 4);
        let mut s = self.org_base(org, metric.len() + 24 + subject);
        match limit.scope {
            Scope::Org => {}
            Scope::Key(id) => {
                s.push_str("lk:");
                s.push_str(id);
                s.push(':');
            }
            Scope::User(id) => {
                s.push_str("lu:");
                s.push_str(id);
                s.push(':');
            }
        }
        let mut num = itoa::Buffer::new();
        match &limit.target {
            Target::Counter { period, window } => {
                s.push_str("c:");
                s.push_str(metric);
                s.push(':');
                s.push_str(period.as_str());
                s.push(':');
                s.push_str(num.format(window.start.timestamp()));
            }
            Target::Gauge => {
                s.push_str("g:");
                s.push_str(metric);
            }
            Target::Rate { window, .. } => {
                s.push_str("r:");
                s.push_str(metric);
                s.push(':');
                s.push_str(num.format(window.as_millis()));
            }
        }
        s
    }

    /// `inflight`: the sorted set of the org's concurrency slots (member: a slot id, score: its
    /// expiry in Unix ms), in the org's slot so the decision that takes one is the same script.
    pub fn in_flight(&self, org: &OrgId) -> String {
        let mut s = self.org_base(org, 8);
        s.push_str("inflight");
        s
    }

    /// The idempotency marker of a usage report. The client's key is hashed so its length and
    /// alphabet never matter.
    pub fn idempotency(&self, org: &OrgId, client_key: &str) -> String {
        let digest = Sha256::digest(client_key.as_bytes());
        let mut s = self.org_base(org, 5 + 64);
        s.push_str("idem:");
        s.push_str(&hex::encode(digest));
        s
    }

    /// The version key of a durable counter or gauge (incremented when its value goes down; see
    /// "Versions" in `decide.lua`).
    pub fn version(value_key: &str) -> String {
        let mut s = String::with_capacity(value_key.len() + 2);
        Self::version_into(&mut s, value_key);
        s
    }

    /// `version` into a reused buffer (the hot path builds one per durable limit).
    pub fn version_into(buf: &mut String, value_key: &str) {
        buf.clear();
        buf.push_str(value_key);
        buf.push_str(":v");
    }

    /// The "fired" hash of a limit's notification thresholds (field: percent), beside its value
    /// key and in the same slot: per period for counters (a new period has a new key), so a
    /// threshold re-arms when the period resets (see `decide.lua`).
    pub fn fired_into(buf: &mut String, value_key: &str) {
        buf.clear();
        buf.push_str(value_key);
        buf.push_str(":n");
    }

    /// The org, metric and, for counters, (period, period start in Unix seconds) of a counter or
    /// gauge key built by `limit` (not rates).
    pub fn parse_limit(&self, key: &str) -> Option<ParsedLimit> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (org, rest) = rest.split_once("}:")?;
        let org = OrgId::parse(org).ok()?;
        let parts: Vec<&str> = rest.split(':').collect();
        match parts.as_slice() {
            ["c", metric, period, start] => {
                let period = Period::parse(period)?;
                Some((org, metric.to_string(), Some((period, start.parse().ok()?))))
            }
            ["g", metric] => Some((org, metric.to_string(), None)),
            _ => None,
        }
    }

    /// The lease hash of a limit (see "Leases" in `decide.lua`), into a reused buffer: it sits
    /// beside the limit's key, so under the org's hash tag too.
    pub fn lease_into(buf: &mut String, value_key: &str) {
        buf.clear();
        buf.push_str(value_key);
        buf.push_str(":l");
    }

    /// Marks that an org's durable counters of the month starting at `month_start` are complete
    /// in Redis (see `restore.lua`).
    pub fn restore_marker(&self, org: &OrgId, month_start: i64) -> String {
        let mut s = self.org_base(org, 24);
        s.push_str("restored:");
        s.push_str(itoa::Buffer::new().format(month_start));
        s
    }

    /// The record of a `/v1/reservations` reservation, in the org's slot (`reservation.lua`).
    pub fn reservation(&self, org: &OrgId, id: &str) -> String {
        let mut s = self.org_base(org, 4 + id.len());
        s.push_str("rsv:");
        s.push_str(id);
        s
    }

    /// Every open reservation's id, scored by its expiry (Unix ms): what the sweepers of all
    /// replicas look at. One key for the whole gateway (not in any org's slot).
    pub fn reservations_due(&self) -> String {
        format!("{}:reservations:due", self.prefix)
    }

    /// Says that Redis still holds everything of the org a restore put there, plus what was
    /// counted since: set by `restore.lua`, refreshed with every month marker, and gone with any
    /// loss of Redis data. With it a new month needs no restore (see `decide.lua`). It sits
    /// under `restored:` with the month markers, so whatever skips those skips it too.
    pub fn resident(&self, org: &OrgId) -> String {
        let mut s = self.org_base(org, 17);
        s.push_str("restored:resident");
        s
    }

    /// The org, metric and (for counters) period and period start of a durable key built by
    /// `limit`: `{prefix}:{org}:c:<metric>:month:<start>`,
    /// `{prefix}:{org}:c:<metric>:billing_month:<start>` or `{prefix}:{org}:g:<metric>`.
    pub fn parse_durable(&self, key: &str) -> Option<ParsedDurable> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (org, rest) = rest.split_once("}:")?;
        let org = OrgId::parse(org).ok()?;
        let mut parts = rest.split(':');
        match (
            parts.next()?,
            parts.next()?,
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            ("c", metric, Some(p @ ("month" | "billing_month")), Some(start), None) => Some((
                org,
                metric.to_string(),
                Some((Period::parse(p)?, start.parse().ok()?)),
            )),
            ("g", metric, None, None, None) => Some((org, metric.to_string(), None)),
            _ => None,
        }
    }

    /// The credit hash of an org's grants of one metric (see "Credits" in `decide.lua`):
    /// `{prefix}:{org}:k:<metric>`, with a version key beside it like durable counters.
    pub fn credits(&self, org: &OrgId, metric: &str) -> String {
        let mut s = self.org_base(org, 2 + metric.len());
        s.push_str("k:");
        s.push_str(metric);
        s
    }

    /// The credit hash that goes with a counter key built by `limit`, into a reused buffer
    /// (the hot path builds one per charged counter metric); false for other keys.
    pub fn credits_for_into(buf: &mut String, value_key: &str) -> bool {
        let Some(metric) = Self::counter_metric(value_key) else {
            return false;
        };
        let Some(tag_end) = value_key.find("}:") else {
            return false;
        };
        buf.clear();
        buf.push_str(&value_key[..tag_end + 2]);
        buf.push_str("k:");
        buf.push_str(metric);
        true
    }

    /// The metric of a counter key built by `limit` (`...}:c:<metric>:...`), without copying.
    pub fn counter_metric(value_key: &str) -> Option<&str> {
        let rest = &value_key[value_key.find("}:")? + 2..];
        let rest = rest.strip_prefix("c:")?;
        rest.split(':').next()
    }

    /// The org and metric of a credit hash built by `credits`.
    pub fn parse_credits(&self, key: &str) -> Option<(OrgId, String)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (org, rest) = rest.split_once("}:")?;
        let metric = rest.strip_prefix("k:")?;
        if metric.is_empty() || metric.contains(':') {
            return None;
        }
        Some((OrgId::parse(org).ok()?, metric.to_string()))
    }

    /// Pub/sub channel on which plan (and key) changes are announced to every replica.
    pub fn org_changes_channel(&self) -> String {
        format!("{}:events:org-changes", self.prefix)
    }

    /// Pattern matching every key of this prefix (tests and clean-up only, never per request).
    pub fn all_keys_pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::decision::{Limit, Target};
    use crate::domain::period;
    use crate::domain::plan::{Metric, MetricKind, Overage};
    use chrono::{TimeZone, Utc};

    #[test]
    fn keys_carry_prefix_and_org_hash_tag() {
        let keys = Keys::new("qg");
        let org = OrgId::parse("acme").unwrap();
        let m = Metric {
            id: "requests".into(),
            unit: "request".into(),
            kind: MetricKind::Counter,
            leases: true,
        };
        let now = Utc.with_ymd_and_hms(2026, 11, 25, 6, 0, 0).unwrap();
        let limit = Limit {
            metric: &m,
            target: Target::Counter {
                period: Period::Month,
                window: period::calendar_month(now),
            },
            amount: 1,
            limit: None,
            overage: Overage::Allow,
            notify_at: &[],
            headroom: false,
            scope: Scope::Org,
        };
        assert_eq!(
            keys.limit(&org, &limit),
            "qg:{acme}:c:requests:month:1793491200"
        );
        // A key's and an end user's limits live in the org's slot, and are never taken for the
        // org's meter: not durable, no metric for the credit section.
        for (scope, expected) in [
            (
                Scope::Key("k-1"),
                "qg:{acme}:lk:k-1:c:requests:month:1793491200",
            ),
            (
                Scope::User("a@b.c"),
                "qg:{acme}:lu:a@b.c:c:requests:month:1793491200",
            ),
        ] {
            let scoped = Limit {
                scope,
                ..limit.clone()
            };
            let key = keys.limit(&org, &scoped);
            assert_eq!(key, expected);
            assert_eq!(keys.parse_durable(&key), None);
            assert_eq!(keys.parse_limit(&key), None);
            assert_eq!(Keys::counter_metric(&key), None);
        }
        let meter = keys.limit(&org, &limit);
        assert_eq!(
            keys.parse_durable(&meter),
            Some((
                org.clone(),
                "requests".to_string(),
                Some((Period::Month, 1793491200))
            ))
        );
        assert_eq!(
            keys.parse_durable("qg:{acme}:c:requests:billing_month:1793491200"),
            Some((
                org.clone(),
                "requests".to_string(),
                Some((Period::BillingMonth, 1793491200))
            ))
        );
        assert_eq!(
            keys.parse_durable("qg:{a:b.c}:g:seats"),
            Some((OrgId::parse("a:b.c").unwrap(), "seats".to_string(), None))
        );
        assert_eq!(keys.parse_durable("qg:{acme}:c:requests:day:1"), None);
        assert_eq!(
            keys.parse_limit("qg:{acme}:c:requests:day:1"),
            Some((org.clone(), "requests".to_string(), Some((Period::Day, 1))))
        );
        assert_eq!(
            keys.parse_limit("qg:{acme}:g:seats"),
            Some((org.clone(), "seats".to_string(), None))
        );
        assert_eq!(keys.parse_limit("qg:{acme}:r:requests:1000"), None);
        let mut fired = String::new();
        Keys::fired_into(&mut fired, &meter);
        assert_eq!(keys.parse_durable(&fired), None, "not flushed");
        assert_eq!(keys.parse_durable("other:{acme}:g:seats"), None);
        let credits = keys.credits(&org, "requests");
        assert_eq!(credits, "qg:{acme}:k:requests");
        let mut buf = String::new();
        assert!(Keys::credits_for_into(&mut buf, &meter));
        assert_eq!(buf, credits);
        assert!(!Keys::credits_for_into(&mut buf, "qg:{acme}:g:seats"));
        assert_eq!(
            keys.parse_credits(&credits),
            Some((org.clone(), "requests".to_string()))
        );
        assert_eq!(keys.parse_credits(&Keys::version(&credits)), None);
        assert_eq!(keys.parse_durable(&credits), None);
        let idem = keys.idempotency(&org, "abc");
        assert!(idem.starts_with("qg:{acme}:idem:"));
        assert_eq!(idem.len(), "qg:{acme}:idem:".len() + 64);
    }
}
