//! Free text from clients: key names, adjustment reasons, idempotency keys.
//!
//! Postgres cannot store NUL in `text`, and control characters in a name or reason end up in log
//! lines and operator screens. Rather than let such input fail deep inside a query (where it
//! looks like a database outage), it is refused while the request body is parsed, and the
//! message names the rule, so the JSON extractor can name the field.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Text of 1 to `MAX` characters with no control characters (C0, DEL, C1).
#[derive(Clone, PartialEq, Eq)]
pub struct Text<const MAX: usize>(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error("must not contain control characters (such as NUL, tab or newline)")]
    ControlCharacter,
}

impl<const MAX: usize> Text<MAX> {
    pub fn parse(raw: &str) -> Result<Self, TextError> {
        if raw.is_empty() {
            return Err(TextError::Empty);
        }
        if raw.chars().count() > MAX {
            return Err(TextError::TooLong(MAX));
        }
        if raw.chars().any(char::is_control) {
            return Err(TextError::ControlCharacter);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Whether `raw` may be stored as text: no NUL, no other control character. For strings that do
/// not pass through [`Text`] (verified webhook payloads).
pub fn is_storable(raw: &str) -> bool {
    !raw.chars().any(char::is_control)
}

impl<'de, const MAX: usize> Deserialize<'de> for Text<MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Text::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl<const MAX: usize> fmt::Display for Text<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const MAX: usize> fmt::Debug for Text<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// `#[serde(default, deserialize_with = "present")]`: an optional field that may be left out but
/// not sent as `null` (the schema says absent, not nullable).
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Name = Text<5>;

    #[test]
    fn accepts_printable_text_up_to_the_bound() {
        assert_eq!(Name::parse("héllo").unwrap().as_str(), "héllo");
        assert_eq!(Name::parse("a b").unwrap().as_str(), "a b");
    }

    #[test]
    fn refuses_empty_too_long_and_control_characters() {
        assert_eq!(Name::parse(""), Err(TextError::Empty));
        assert_eq!(Name::parse("abcdef"), Err(TextError::TooLong(5)));
        for bad in ["a\0b", "a\nb", "\t", "a\u{7f}", "a\u{85}"] {
            assert_eq!(
                Name::parse(bad),
                Err(TextError::ControlCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert!(Name::parse("ééééé").is_ok());
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default, deserialize_with = "present")]
        name: Option<Name>,
    }

    #[test]
    fn deserialises_with_a_message_naming_the_rule() {
        let err = serde_json::from_str::<Body>(r#"{"name": "a\u0000b"}"#).unwrap_err();
        assert!(err.to_string().contains("control characters"), "{err}");
        let ok: Body = serde_json::from_str(r#"{"name": "abc"}"#).unwrap();
        assert_eq!(ok.name.unwrap().as_str(), "abc");
    }

    #[test]
    fn an_absent_field_is_none_and_null_is_refused() {
        let absent: Body = serde_json::from_str("{}").unwrap();
        assert!(absent.name.is_none());
        let err = serde_json::from_str::<Body>(r#"{"name": null}"#).unwrap_err();
        assert!(err.to_string().contains("invalid type: null"), "{err}");
    }

    #[test]
    fn storable_means_no_control_characters() {
        assert!(is_storable("evt_123"));
        assert!(!is_storable("evt\0"));
    }
}
