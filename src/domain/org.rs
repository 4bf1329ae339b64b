//! Organization identifiers.
//!
//! Org ids end up inside Redis keys (as the `{org_id}` Cluster hash tag), in Postgres rows and in
//! upstream headers, so the accepted alphabet is deliberately small: it can never contain a brace
//! (which would break the hash tag), whitespace or a header-unsafe byte.

use std::fmt;
use std::sync::Arc;

/// Longest accepted org id, in bytes (all accepted characters are ASCII).
pub const MAX_ORG_ID_LEN: usize = 128;

/// A validated organization id: 1–128 characters of `A-Za-z0-9._:-`.
///
/// Cheap to clone (`Arc<str>`) because the same id is handed to the store, the plan cache and the
/// response on every decision.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrgIdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_ORG_ID_LEN} characters")]
    TooLong,
    #[error("may contain only A-Z, a-z, 0-9, '.', '_', ':' and '-'")]
    InvalidCharacter,
}

impl OrgId {
    pub fn parse(raw: &str) -> Result<Self, OrgIdError> {
        if raw.is_empty() {
            return Err(OrgIdError::Empty);
        }
        if raw.len() > MAX_ORG_ID_LEN {
            return Err(OrgIdError::TooLong);
        }
        if !raw.bytes().all(is_org_id_byte) {
            return Err(OrgIdError::InvalidCharacter);
        }
        Ok(Self(Arc::from(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_org_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrgId({})", &self.0)
    }
}

impl AsRef<str> for OrgId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for OrgId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(OrgId::parse("acme").is_ok());
        assert!(OrgId::parse("org_1.eu-west:prod").is_ok());
        assert!(OrgId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(OrgId::parse(""), Err(OrgIdError::Empty));
        assert_eq!(OrgId::parse(&"a".repeat(129)), Err(OrgIdError::TooLong));
        for bad in ["a b", "{acme}", "acme/1", "é", "a\n", "a*"] {
            assert_eq!(
                OrgId::parse(bad),
                Err(OrgIdError::InvalidCharacter),
                "{bad:?}"
            );
        }
    }
}
