//! Who is calling: the org behind a proxied request.
//!
//! In `api_key` mode the key comes from `Authorization: Bearer <key>` or `x-api-key` and is
//! resolved through `api_keys` in Postgres. Resolving on every request would put Postgres on the
//! hot path, so each replica caches key → org, indexed by the key's SHA-256 (the plaintext is
//! never kept). The cache is registered with the `OrgDirectory`, so the same `org:<id>` message
//! that announces a plan change also drops the org's keys: a revocation made on any replica is
//! honoured everywhere as soon as the message arrives (well under a second). While the change
//! subscription is down, an entry is trusted for at most a second, like the directory's own.
//! Unknown keys are not cached: a key created a moment ago must work at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::{self, HeaderName};
use sqlx::PgPool;

use super::headers::X_API_KEY;
use crate::config::{IdentityMode, IdentitySettings};
use crate::db::{self, DbError};
use crate::directory::{OrgCache, OrgDirectory};
use crate::domain::org::OrgId;
use crate::singleflight::SingleFlight;

/// Past this many cached keys the cache starts over (bounds memory under key spraying).
const MAX_CACHED_KEYS: usize = 100_000;

/// How long a cached key is trusted while no change notifications can arrive.
const UNSUBSCRIBED_MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The identified caller and the request header that carried its credential (removed before
/// forwarding so the upstream never sees the gateway's key).
pub struct Identified {
    pub org: OrgId,
    pub credential_header: Option<HeaderName>,
}

pub struct Identifier {
    settings: IdentitySettings,
    keys: Arc<KeyCache>,
}

impl Identifier {
    pub fn new(settings: IdentitySettings, pool: PgPool, directory: &Arc<OrgDirectory>) -> Self {
        let keys = Arc::new(KeyCache {
            pool,
            directory: directory.clone(),
            entries: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            lookups: SingleFlight::default(),
        });
        directory.register(keys.clone());
        Self { settings, keys }
    }

    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    pub async fn identify(&self, headers: &HeaderMap) -> Result<Identified, IdentityError> {
        match self.settings.mode {
            IdentityMode::Header => {
                let raw = headers
                    .get(&self.settings.header)
                    .and_then(|v| v.to_str().ok())
                    .ok_or(IdentityError::Unauthorized(
                        "missing org header (set by the auth layer in front of the gateway)",
                    ))?;
                let org = OrgId::parse(raw)
                    .map_err(|_| IdentityError::Unauthorized("invalid org id in the org header"))?;
                Ok(Identified {
                    org,
                    credential_header: None,
                })
            }
            IdentityMode::ApiKey => {
                let (key, from) = presented_key(headers).ok_or(IdentityError::Unauthorized(
                    "missing API key (send Authorization: Bearer <key> or x-api-key)",
                ))?;
                let org = self
                    .keys
                    .org_of(key)
                    .await?
                    .ok_or(IdentityError::Unauthorized("unknown or revoked API key"))?;
                Ok(Identified {
                    org,
                    credential_header: Some(from),
                })
            }
        }
    }
}

/// The key a client presented and the header it came in.
fn presented_key(headers: &HeaderMap) -> Option<(&str, HeaderName)> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = v.trim().splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
            && !token.trim().is_empty()
        {
            return Some((token.trim(), header::AUTHORIZATION));
        }
    }
    headers
        .get(&X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| (k, X_API_KEY.clone()))
}

struct KeyCache {
    pool: PgPool,
    directory: Arc<OrgDirectory>,
    entries: RwLock<HashMap<Vec<u8>, (OrgId, Instant)>>,
    /// Bumped on every invalidation; a lookup that raced one does not insert what it read.
    epoch: AtomicU64,
    /// Concurrent misses for one key (at one epoch) share a single query.
    lookups: SingleFlight<(u64, Vec<u8>), Option<OrgId>>,
}

impl KeyCache {
    async fn org_of(&self, key: &str) -> Result<Option<OrgId>, DbError> {
        let hash = db::api_keys::hash_key(key);
        if let Some(org) = self.cached(&hash) {
            return Ok(Some(org));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let found = self
            .lookups
            .run((epoch, hash.clone()), || async {
                let Some(raw) = db::api_keys::find_org(&self.pool, key).await? else {
                    return Ok::<_, DbError>(None);
                };
                match OrgId::parse(&raw) {
                    Ok(org) => Ok(Some(org)),
                    Err(_) => {
                        tracing::error!(
                            "an api key belongs to an org id that is not valid; refusing it"
                        );
                        Ok(None)
                    }
                }
            })
            .await?;
        let Some(org) = found else {
            return Ok(None);
        };
        if let Ok(mut entries) = self.entries.write()
            && self.epoch.load(Ordering::Acquire) == epoch
        {
            if entries.len() >= MAX_CACHED_KEYS {
                entries.clear();
            }
            entries.insert(hash, (org.clone(), Instant::now()));
        }
        Ok(Some(org))
    }

    fn cached(&self, hash: &[u8]) -> Option<OrgId> {
        let entries = self.entries.read().ok()?;
        let (org, loaded) = entries.get(hash)?;
        if !self.directory.is_subscribed() && loaded.elapsed() > UNSUBSCRIBED_MAX_AGE {
            return None;
        }
        Some(org.clone())
    }
}

impl OrgCache for KeyCache {
    fn invalidate_org(&self, org: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut entries) = self.entries.write() {
            entries.retain(|_, (o, _)| o.as_str() != org);
        }
    }

    fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn finds_bearer_or_api_key_header() {
        let mut h = HeaderMap::new();
        assert!(presented_key(&h).is_none());
        h.insert(X_API_KEY.clone(), HeaderValue::from_static("qg_b"));
        assert_eq!(presented_key(&h).unwrap().0, "qg_b");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer qg_a"),
        );
        let (k, from) = presented_key(&h).unwrap();
        assert_eq!((k, from), ("qg_a", header::AUTHORIZATION));
        // Another scheme is someone else's credential: fall back to x-api-key.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eHg="),
        );
        assert_eq!(presented_key(&h).unwrap().0, "qg_b");
    }
}
