//! Reservations of the `/v1/reservations` API: ids, how one ends, and what settling it charges
//! or gives back. No I/O: the Redis record and the claim that makes an ending happen once live
//! in `store::reservations`, the use case in `reservations`.

use std::fmt;

use super::org::OrgId;

/// How long a reservation lives when the request gives no `ttl`.
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(300);
/// The longest `ttl` accepted.
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What becomes of a reservation nobody settled or released before it expired
/// (`[usage] reservation_expiry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpiry {
    /// Charged at the reserved amounts (nothing to do: they are in the counters).
    #[default]
    Settle,
    /// Given back.
    Release,
}

/// `rsv_<32 hex>_<org id>`: the org travels in the id, so a settle or release finds the
/// reservation's record (in the org's hash tag) from the id alone. Org ids are URL-safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationId {
    pub org: OrgId,
    token: String,
}

impl ReservationId {
    pub fn new(org: OrgId) -> Self {
        Self {
            org,
            token: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        let rest = raw.strip_prefix("rsv_")?;
        let (token, org) = rest.split_at_checked(32)?;
        let org = org.strip_prefix('_')?;
        if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            org: OrgId::parse(org).ok()?,
            token: token.to_string(),
        })
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rsv_{}_{}", self.token, self.org)
    }
}

/// What a reservation's Redis record holds: the amounts reserved per metric, and the levels
/// below the org they were charged to (so an ending charges or gives back at the same levels).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Held {
    pub charges: Vec<(String, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

impl Held {
    /// A record as written now, or as written before levels existed (the bare list of charges).
    pub fn parse(raw: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<Held>(raw).or_else(|e| {
            serde_json::from_str::<Vec<(String, i64)>>(raw)
                .map(|charges| Held {
                    charges,
                    ..Held::default()
                })
                .map_err(|_| e)
        })
    }
}

/// How a reservation ended; recorded once (the claim), whoever got there first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "how", rename_all = "lowercase")]
pub enum Ending {
    /// Settled with these actual amounts per metric (reserved metrics not named keep their
    /// reserved amount; metrics named that were not reserved are charged in full).
    Settled {
        actual: Vec<(String, i64)>,
    },
    Released,
    /// Nobody ended it before it expired: `OnExpiry` decides.
    Expired {
        on_expiry: OnExpiry,
    },
}

impl Ending {
    pub fn label(&self) -> &'static str {
        match self {
            Ending::Settled { .. } => "settled",
            Ending::Released => "released",
            Ending::Expired { .. } => "expired",
        }
    }
}

/// Per metric, what settling `reserved` with `ending` changes: positive to charge on top of the
/// reservation, negative to give back; metrics that do not change are left out.
pub fn differences(reserved: &[(String, i64)], ending: &Ending) -> Vec<(String, i64)> {
    // Metrics settled that were not reserved are charged in full.
    let extra = match ending {
        Ending::Settled { actual } => actual
            .iter()
            .filter(|(m, a)| *a != 0 && !reserved.iter().any(|(r, _)| r == m))
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    reserved
        .iter()
        .filter_map(|(metric, amount)| {
            let actual = match ending {
                Ending::Settled { actual } => actual
                    .iter()
                    .find(|(m, _)| m == metric)
                    .map_or(*amount, |(_, a)| *a),
                Ending::Released
                | Ending::Expired {
                    on_expiry: OnExpiry::Release,
                } => 0,
                Ending::Expired {
                    on_expiry: OnExpiry::Settle,
                } => *amount,
            };
            (actual != *amount).then(|| (metric.clone(), actual - amount))
        })
        .chain(extra)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_org() {
        let id = ReservationId::new(OrgId::parse("acme-1.eu:x_y").unwrap());
        let text = id.to_string();
        assert_eq!(ReservationId::parse(&text), Some(id));
        for bad in [
            "",
            "rsv_",
            "rsv_0123_acme",
            "rsv_0123456789abcdef0123456789abcdefacme",
            "rsv_0123456789abcdef0123456789abcdeg_acme",
            "rsv_0123456789abcdef0123456789abcdef_",
            "rsv_0123456789abcdef0123456789abcdef_a/b",
        ] {
            assert_eq!(ReservationId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn differences_per_ending() {
        let reserved = vec![("tokens".to_string(), 100), ("requests".to_string(), 1)];
        let settled = Ending::Settled {
            actual: vec![("tokens".into(), 130), ("images".into(), 2)],
        };
        assert_eq!(
            differences(&reserved, &settled),
            vec![("tokens".to_string(), 30), ("images".to_string(), 2)]
        );
        let down = Ending::Settled {
            actual: vec![("tokens".into(), 40), ("requests".into(), 1)],
        };
        assert_eq!(
            differences(&reserved, &down),
            vec![("tokens".to_string(), -60)]
        );
        assert_eq!(
            differences(&reserved, &Ending::Released),
            vec![("tokens".to_string(), -100), ("requests".to_string(), -1)]
        );
        let kept = Ending::Expired {
            on_expiry: OnExpiry::Settle,
        };
        assert!(differences(&reserved, &kept).is_empty());
        let given_back = Ending::Expired {
            on_expiry: OnExpiry::Release,
        };
        assert_eq!(differences(&reserved, &given_back).len(), 2);
    }
}
