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

use std::sync::Arc;

use http::HeaderMap;
use http::header::{self, HeaderName};
use sqlx::PgPool;

use super::headers::X_API_KEY;
use crate::cache::ChangeCache;
use crate::db::{self, DbError};
use crate::directory::{OrgCache, OrgDirectory};
use crate::domain::level::check_user_id;
use crate::domain::org::OrgId;
use crate::proxy::settings::{IdentityMode, IdentitySettings};

/// Past this many cached keys the cache starts over (bounds memory under key spraying).
const MAX_CACHED_KEYS: usize = 100_000;

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
    /// The API key's id (`api_key` mode), for `per = "key"` limits.
    pub key_id: Option<Arc<str>>,
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
            entries: ChangeCache::new(MAX_CACHED_KEYS),
        });
        directory.register(keys.clone());
        Self { settings, keys }
    }

    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    /// The end user a request is for, from `[identity] user_header` when configured and sent
    /// (`per = "user"` limits); an invalid id is an error, a missing one is no user.
    pub fn user(&self, headers: &HeaderMap) -> Result<Option<Arc<str>>, String> {
        let Some(name) = &self.settings.user_header else {
            return Ok(None);
        };
        let Some(raw) = headers.get(name) else {
            return Ok(None);
        };
        let id = raw
            .to_str()
            .map_err(|_| format!("{name}: must be visible ASCII"))
            .and_then(|v| check_user_id(v.trim()).map_err(|e| format!("{name}: {e}")))?;
        Ok(Some(Arc::from(id)))
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
                    key_id: None,
                })
            }
            IdentityMode::ApiKey => {
                let (key, from) = presented_key(headers).ok_or(IdentityError::Unauthorized(
                    "missing API key (send Authorization: Bearer <key> or x-api-key)",
                ))?;
                let (org, id) = self
                    .keys
                    .org_of(key)
                    .await?
                    .ok_or(IdentityError::Unauthorized("unknown or revoked API key"))?;
                Ok(Identified {
                    org,
                    credential_header: Some(from),
                    key_id: Some(id),
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
    /// Indexed by the key's SHA-256: the plaintext is never kept. Value: the key's org and id.
    entries: ChangeCache<Vec<u8>, (OrgId, Arc<str>)>,
}

impl KeyCache {
    async fn org_of(&self, key: &str) -> Result<Option<(OrgId, Arc<str>)>, DbError> {
        let hash = db::api_keys::hash_key(key);
        self.entries
            .get_or_load(&hash, self.directory.is_subscribed(), || async {
                let Some((raw, id)) = db::api_keys::find_org(&self.pool, key).await? else {
                    return Ok(None);
                };
                match OrgId::parse(&raw) {
                    Ok(org) => Ok(Some((org, Arc::from(id.to_string())))),
                    Err(_) => {
                        tracing::error!(
                            "an api key belongs to an org id that is not valid; refusing it"
                        );
                        Ok(None)
                    }
                }
            })
            .await
    }
}

impl OrgCache for KeyCache {
    fn invalidate_org(&self, org: &str) {
        self.entries.retain(|_, (o, _)| o.as_str() != org);
    }

    fn invalidate_all(&self) {
        self.entries.clear();
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
