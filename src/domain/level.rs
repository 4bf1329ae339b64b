//! The levels below an org that a request is also counted at: the API key it came with and the
//! end user it is for.
//!
//! A plan limits them with `per = "key"` and `per = "user"` quotas and rates; an admin may give
//! one key its own quotas (`PUT /admin/keys/{id}/limits`), which replace the plan's per-key quotas
//! of the metrics they name. Every level of a request is checked and charged in the same single
//! decision as the org's own limits (all keys of an org share its hash tag), all or nothing.

use std::sync::Arc;

use super::period::Period;
use super::plan::{Overage, Per, Quota};

/// The most bytes of an end-user id (it becomes part of a Redis key).
pub const MAX_USER_ID_LEN: usize = 128;

/// Which level a limit counts: the org itself, one of its API keys (by key id), or one end user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope<'a> {
    #[default]
    Org,
    Key(&'a str),
    User(&'a str),
}

impl<'a> Scope<'a> {
    pub fn per(self) -> Per {
        match self {
            Scope::Org => Per::Org,
            Scope::Key(_) => Per::Key,
            Scope::User(_) => Per::User,
        }
    }

    /// The key id or user id; `None` for the org.
    pub fn subject(self) -> Option<&'a str> {
        match self {
            Scope::Org => None,
            Scope::Key(id) | Scope::User(id) => Some(id),
        }
    }
}

/// What a decision knows about the caller below the org.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Levels<'a> {
    /// The API key's id, when the request came with one (or a `/v1` caller named it).
    pub key: Option<&'a str>,
    /// The end user, when the request names one.
    pub user: Option<&'a str>,
}

impl<'a> Levels<'a> {
    /// No level below the org (admin adjustments, callers that name neither).
    pub const ORG: Levels<'static> = Levels {
        key: None,
        user: None,
    };

    /// The levels below the org this decision charges, in a fixed order (key, then user).
    pub fn scopes(&self) -> impl Iterator<Item = Scope<'a>> + 'a {
        let key = self.key.map(Scope::Key);
        let user = self.user.map(Scope::User);
        key.into_iter().chain(user)
    }
}

/// `Levels` that own their ids, for work that outlives the request (a settlement or a report
/// recorded after the response, a reservation ended later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub key: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
}

impl Caller {
    pub fn levels(&self) -> Levels<'_> {
        Levels {
            key: self.key.as_deref(),
            user: self.user.as_deref(),
        }
    }
}

/// The quotas of `metric` at `scope`: the key's own quotas of the metric when it has any (`own`),
/// else the plan's quotas for that level (`plan`, passed in so this stays free of the catalog).
/// An iterator, not a list: it runs for every request that names a key or user.
pub fn quotas_at<'q>(
    scope: Scope<'_>,
    metric: &'q str,
    own: Option<&'q KeyLimits>,
    plan: impl Iterator<Item = &'q Quota>,
) -> impl Iterator<Item = &'q Quota> {
    let own = own
        .filter(|o| matches!(scope, Scope::Key(_)) && o.quotas.iter().any(|q| q.metric == metric));
    let from_own = own
        .into_iter()
        .flat_map(move |o| o.quotas.iter().filter(move |q| q.metric == metric));
    from_own.chain(plan.filter(move |_| own.is_none()))
}

/// One API key's own quotas, set by an admin: they replace the plan's `per = "key"` quotas of
/// the metrics they name (a smaller budget for a CI key, or a budget where the plan sets none).
/// The plan's per-key rates still apply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyLimits {
    pub quotas: Vec<Quota>,
}

/// One quota of a key, as the admin API takes it and as `api_keys.limits` stores it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyQuota {
    pub metric: String,
    pub limit: u64,
    pub period: Period,
    /// `"block"` (the default) or `"allow"` (a soft limit: reported, never denied).
    #[serde(default)]
    pub overage: Overage,
}

impl KeyLimits {
    /// From what `api_keys.limits` stores (validated when it was set); an entry that no longer
    /// reads is skipped rather than locking the key out.
    pub fn from_stored(quotas: &[KeyQuota]) -> Self {
        Self {
            quotas: quotas
                .iter()
                .filter(|q| q.limit > 0)
                .map(|q| Quota {
                    metric: q.metric.clone(),
                    limit: q.limit,
                    period: Some(q.period),
                    overage: q.overage,
                    per: Per::Key,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_USER_ID_LEN} bytes")]
    TooLong,
    #[error("may only contain A-Z, a-z, 0-9 and . _ : - @ + = /")]
    InvalidCharacter,
}

/// Check an end-user id: it names a Redis key, so its length and alphabet are bounded (an email
/// address, a UUID, `tenant:123` all fit).
pub fn check_user_id(raw: &str) -> Result<&str, UserIdError> {
    if raw.is_empty() {
        return Err(UserIdError::Empty);
    }
    if raw.len() > MAX_USER_ID_LEN {
        return Err(UserIdError::TooLong);
    }
    let ok = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'_' | b':' | b'-' | b'@' | b'+' | b'=' | b'/')
    };
    if !raw.bytes().all(ok) {
        return Err(UserIdError::InvalidCharacter);
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::period::Period;
    use crate::domain::plan::Overage;

    fn quota(metric: &str, limit: u64, per: Per) -> Quota {
        Quota {
            metric: metric.into(),
            limit,
            period: Some(Period::Month),
            overage: Overage::Block,
            per,
        }
    }

    #[test]
    fn user_ids_are_bounded() {
        assert_eq!(check_user_id("ada@example.com"), Ok("ada@example.com"));
        assert_eq!(check_user_id("tenant:42/user=7"), Ok("tenant:42/user=7"));
        assert_eq!(check_user_id(""), Err(UserIdError::Empty));
        assert_eq!(check_user_id(&"u".repeat(129)), Err(UserIdError::TooLong));
        for bad in ["a b", "{x}", "é", "a\n", "a*"] {
            assert_eq!(
                check_user_id(bad),
                Err(UserIdError::InvalidCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_keys_own_quotas_replace_the_plans_for_the_metrics_they_name() {
        let plan = [
            quota("tokens", 1000, Per::Key),
            quota("requests", 50, Per::Key),
        ];
        let own = KeyLimits {
            quotas: vec![quota("tokens", 10, Per::Key)],
        };
        let levels = Levels {
            key: Some("k1"),
            user: Some("u1"),
        };
        let scopes: Vec<_> = levels.scopes().collect();
        assert_eq!(scopes, [Scope::Key("k1"), Scope::User("u1")]);
        let key = Scope::Key("k1");
        let tokens = quotas_at(key, "tokens", Some(&own), plan.iter().take(1));
        assert_eq!(tokens.map(|q| q.limit).collect::<Vec<_>>(), [10]);
        let requests = quotas_at(key, "requests", Some(&own), plan.iter().skip(1));
        assert_eq!(requests.map(|q| q.limit).collect::<Vec<_>>(), [50]);
        // A user's quotas never come from a key's own.
        let user = quotas_at(Scope::User("u1"), "tokens", Some(&own), plan.iter().take(1));
        assert_eq!(user.map(|q| q.limit).collect::<Vec<_>>(), [1000]);
    }
}
