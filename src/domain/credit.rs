//! Prepaid credits: grants of units of one metric that pay for what passes a hard quota.
//!
//! The rules live in `decide.lua` (they must run inside the decision's one atomic call); this
//! module holds what the rest of the gateway needs of them without I/O: what a valid grant is,
//! how a grant is spelled as a field of the org's credit hash in Redis (so that the plain string
//! order of the fields is the spending order), and how a balance is read back from those fields.

use chrono::{DateTime, Utc};

use super::decision::MAX_COUNTER;

/// The priority a grant gets when none is given; 0 is spent first.
pub const DEFAULT_PRIORITY: u32 = 10;
/// The largest priority: five digits in the field name.
pub const MAX_PRIORITY: u32 = 99_999;
/// Longest grant id, in bytes.
pub const MAX_GRANT_ID_LEN: usize = 128;
/// The expiry written for a grant that never expires (Unix ms, 15 digits: year 33658).
const NEVER: i64 = 999_999_999_999_999;
/// Below this share of what was granted, a metric's balance is "low" (`credits.low`).
pub const LOW_PERCENT: u64 = 10;

/// A grant as asked for, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    pub id: String,
    pub metric: String,
    pub amount: i64,
    pub priority: u32,
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

/// Why a grant cannot be made; the text is the message a client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("amount: must be a whole number from 1 to {MAX_COUNTER}")]
    Amount,
    #[error("priority: must be a whole number from 0 to {MAX_PRIORITY}")]
    Priority,
    #[error("expires_at: must be in the future")]
    Expired,
    #[error(
        "grant_id: must be 1 to {MAX_GRANT_ID_LEN} characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
    )]
    Id,
}

impl NewGrant {
    /// Check a grant against the rules that do not need the catalog (the metric is the caller's).
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), GrantError> {
        if self.amount < 1 || self.amount > MAX_COUNTER {
            return Err(GrantError::Amount);
        }
        if self.priority > MAX_PRIORITY {
            return Err(GrantError::Priority);
        }
        if self.expires_at.is_some_and(|e| e <= now) {
            return Err(GrantError::Expired);
        }
        if !valid_id(&self.id) {
            return Err(GrantError::Id);
        }
        Ok(())
    }
}

/// The same alphabet as org ids: it ends up in a Redis hash field and in URLs.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_GRANT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The grant's field in the credit hash: `<priority:5>:<expiry ms:15>:<id>`. Fixed widths make
/// the string order of fields the spending order (lowest priority, then earliest expiry).
pub fn field(priority: u32, expires_at: Option<DateTime<Utc>>, id: &str) -> String {
    let expiry = expires_at.map_or(NEVER, |e| e.timestamp_millis().clamp(0, NEVER));
    format!("{priority:05}:{expiry:015}:{id}")
}

/// The field's value: `<remaining>:<amount>`.
pub fn value(remaining: i64, amount: i64) -> String {
    format!("{remaining}:{amount}")
}

/// One field of a credit hash, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub id: String,
    /// Unix ms; `None`: never.
    pub expires_ms: Option<i64>,
    pub remaining: i64,
    pub amount: i64,
}

impl Balance {
    pub fn parse(field: &str, value: &str) -> Option<Self> {
        let expiry: i64 = field.get(6..21)?.parse().ok()?;
        let id = field.get(22..)?.to_string();
        let (remaining, amount) = value.split_once(':')?;
        Some(Balance {
            id,
            expires_ms: (expiry != NEVER).then_some(expiry),
            remaining: remaining.parse().ok()?,
            amount: amount.parse().ok()?,
        })
    }

    pub fn live(&self, now: DateTime<Utc>) -> bool {
        self.expires_ms.is_none_or(|e| e > now.timestamp_millis())
    }
}

/// What the unexpired grants of a metric hold, and what they were granted; `None` when there are
/// no grants at all (the `credits_remaining` member is then left out).
pub fn totals(balances: &[Balance], now: DateTime<Utc>) -> Option<(u64, u64)> {
    if balances.is_empty() {
        return None;
    }
    let (left, granted) = balances
        .iter()
        .filter(|b| b.live(now))
        .fold((0i64, 0i64), |(l, g), b| (l + b.remaining, g + b.amount));
    Some((left.max(0) as u64, granted.max(0) as u64))
}

/// Whether a balance of `left` out of `granted` is below `LOW_PERCENT`.
pub fn is_low(left: u64, granted: u64) -> bool {
    granted > 0 && u128::from(left) * 100 < u128::from(granted) * u128::from(LOW_PERCENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 3, 12, 0, 0).unwrap()
    }

    #[test]
    fn field_order_is_spending_order() {
        let soon = Some(now() + chrono::Duration::days(1));
        let later = Some(now() + chrono::Duration::days(30));
        let mut fields = [
            field(10, None, "a"),
            field(10, later, "b"),
            field(0, None, "c"),
            field(10, soon, "d"),
            field(2, later, "e"),
        ];
        fields.sort();
        let ids: Vec<_> = fields
            .iter()
            .map(|f| Balance::parse(f, "1:1").unwrap().id)
            .collect();
        assert_eq!(ids, ["c", "e", "d", "b", "a"]);
    }

    #[test]
    fn balances_read_back_and_expired_ones_hold_nothing() {
        let past = now() - chrono::Duration::seconds(1);
        let a = Balance::parse(&field(3, None, "x:y"), "7:10").unwrap();
        assert_eq!(a.id, "x:y");
        assert_eq!((a.remaining, a.amount, a.expires_ms), (7, 10, None));
        let mut b = Balance::parse(&field(3, Some(now()), "z"), "5:5").unwrap();
        b.expires_ms = Some(past.timestamp_millis());
        assert!(!b.live(now()));
        assert_eq!(totals(&[a.clone(), b], now()), Some((7, 10)));
        assert_eq!(totals(&[], now()), None);
        assert!(is_low(9, 100));
        assert!(!is_low(10, 100));
        assert!(!is_low(0, 0));
    }

    #[test]
    fn validation_names_the_field() {
        let ok = NewGrant {
            id: "g-1".into(),
            metric: "tokens".into(),
            amount: 5,
            priority: 10,
            expires_at: None,
            reason: None,
        };
        assert_eq!(ok.validate(now()), Ok(()));
        let bad = |f: fn(&mut NewGrant)| {
            let mut g = ok.clone();
            f(&mut g);
            g.validate(now()).unwrap_err()
        };
        assert_eq!(bad(|g| g.amount = 0), GrantError::Amount);
        assert_eq!(bad(|g| g.amount = MAX_COUNTER + 1), GrantError::Amount);
        assert_eq!(bad(|g| g.priority = 100_000), GrantError::Priority);
        assert_eq!(bad(|g| g.expires_at = Some(now())), GrantError::Expired);
        assert_eq!(bad(|g| g.id = "a b".into()), GrantError::Id);
        assert_eq!(bad(|g| g.id = String::new()), GrantError::Id);
    }
}
