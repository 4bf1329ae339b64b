//! One canonical path per request, decided before route matching: pure, no I/O.
//!
//! Route matching and the upstream must agree on what a path means, or a spelling the matcher
//! reads as `/public/…` reaches the upstream as `/v1/…` (`/public/../v1/x`, `/public/%2e%2e/v1/x`)
//! unidentified and uncharged. So the proxy normalises the path once, matches the normal form,
//! and forwards exactly that form: the upstream never sees a spelling the gateway did not match.
//!
//! The rules, in order:
//! - percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, whatever the
//!   case of their hex (`%2e`, `%2E`, `%41`); every other escape is kept, with uppercase hex;
//! - dot-segments are removed as in RFC 3986 §5.2.4, after decoding (`%2e%2e`, `.%2e` count);
//!   a path that would climb above the root is rejected rather than clamped;
//! - empty segments are merged (`//v1` is `/v1`), so a prefix route cannot be sidestepped by an
//!   extra slash, and the upstream gets the merged form;
//! - rejected: encoded slashes and backslashes (`%2F`, `%5C`) and raw backslashes, because
//!   upstreams disagree on whether they separate segments; `;` path parameters anywhere
//!   (`/v1;x/chat`, `..;`), because servlet containers and Spring strip them before routing, so
//!   `/v1;x/chat` is `/v1/chat` to them and an unmatched spelling to a route table; control
//!   characters, raw or escaped (`%00`); malformed escapes (`%zz`, a truncated `%4`); anything
//!   that is not an origin-form path.
//!
//! Decoding happens exactly once: `%252e` stays `%252e` (a literal `%2e` in a segment name, not a
//! dot-segment), which is also what an upstream that decodes once sees. The canonical form is a
//! fixed point: normalising it again changes nothing.
//!
//! The common case, a path that is already canonical, is recognised in one scan and returned
//! borrowed, without allocating.

use std::borrow::Cow;

/// Why a path was refused (the message goes to the client in a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path must start with '/'")]
    NotOriginForm,
    #[error("the request path contains a malformed percent-escape")]
    BadEscape,
    #[error("the request path contains a control character")]
    Control,
    #[error(
        "the request path contains an encoded slash or backslash, or a backslash; upstreams disagree on what they mean"
    )]
    AmbiguousSeparator,
    #[error(
        "the request path has ';' parameters; upstreams disagree on them (servlet containers strip them), so no single match is safe"
    )]
    Parameters,
    #[error("the request path climbs above the root")]
    AboveRoot,
}

/// The canonical form of `path` (see the module docs), borrowed when it already is canonical.
pub fn canonical(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_canonical(path) {
        return Ok(Cow::Borrowed(path));
    }
    normalise(path).map(Cow::Owned)
}

/// True when `normalise` would return `path` unchanged. Conservative: any `%` takes the slow
/// path (escapes are rare in API paths).
fn is_canonical(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    if b.iter()
        .any(|&c| c == b'%' || c == b'\\' || c == b';' || c.is_ascii_control())
    {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg.is_empty() && !last {
            return false;
        }
        if seg == "." || seg == ".." {
            return false;
        }
    }
    true
}

fn normalise(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let decoded = decode_unreserved(path)?;
    // After decoding, '/' only comes from a raw slash: encoded ones were refused.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = decoded[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg.contains(';') {
            return Err(PathError::Parameters);
        }
        trailing_slash = false;
        match seg {
            "." => trailing_slash = last,
            ".." => {
                out.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = last;
            }
            "" => trailing_slash = last,
            _ => out.push(seg),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        result.push('/');
    }
    Ok(result)
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// One pass over the escapes: unreserved ones decoded, the rest kept with uppercase hex.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = hi << 4 | lo;
                if v.is_ascii_control() {
                    return Err(PathError::Control);
                }
                if v == b'/' || v == b'\\' {
                    return Err(PathError::AmbiguousSeparator);
                }
                if is_unreserved(v) {
                    out.push(v);
                } else {
                    out.extend_from_slice(&[b'%', HEX[hi as usize], HEX[lo as usize]]);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::AmbiguousSeparator),
            c if c.is_ascii_control() => return Err(PathError::Control),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    // Only ASCII bytes were added or removed, and escapes of non-ASCII stay escaped.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        use PathError::*;
        let ok = |s: &'static str| -> Result<&'static str, PathError> { Ok(s) };
        let table: &[(&str, Result<&str, PathError>)] = &[
            // already canonical
            ("/", ok("/")),
            ("/v1/chat/completions", ok("/v1/chat/completions")),
            ("/v1/chat/", ok("/v1/chat/")),
            ("/v1/a%20b", ok("/v1/a%20b")),
            ("/v1/x;jsessionid=1", Err(Parameters)),
            ("/public/...", ok("/public/...")),
            ("/public/.x/..y", ok("/public/.x/..y")),
            // dot-segments, every spelling from the report
            ("/public/../v1/chat/completions", ok("/v1/chat/completions")),
            (
                "/public/%2e%2e/v1/chat/completions",
                ok("/v1/chat/completions"),
            ),
            (
                "/public/%2E%2E/v1/chat/completions",
                ok("/v1/chat/completions"),
            ),
            (
                "/public/.%2e/v1/chat/completions",
                ok("/v1/chat/completions"),
            ),
            (
                "/public/%2e./v1/chat/completions",
                ok("/v1/chat/completions"),
            ),
            (
                "/public/./../v1/chat/completions",
                ok("/v1/chat/completions"),
            ),
            ("/public/%2e/%2e%2e/v1/x", ok("/v1/x")),
            ("/public/..%2fv1/chat/completions", Err(AmbiguousSeparator)),
            ("/public/..%2Fv1/chat/completions", Err(AmbiguousSeparator)),
            ("/public/%2e%2e%2fv1/x", Err(AmbiguousSeparator)),
            ("/public/..%5cv1/x", Err(AmbiguousSeparator)),
            ("/public/..%5Cv1/x", Err(AmbiguousSeparator)),
            ("/public/..\\v1/x", Err(AmbiguousSeparator)),
            // trailing dot-segments keep the directory form
            ("/v1/x/.", ok("/v1/x/")),
            ("/v1/x/..", ok("/v1/")),
            ("/v1/..", ok("/")),
            ("/.", ok("/")),
            // above the root: refused, not clamped
            ("/..", Err(AboveRoot)),
            ("/../v1/x", Err(AboveRoot)),
            ("/public/../../v1/x", Err(AboveRoot)),
            ("/%2e%2e/v1/x", Err(AboveRoot)),
            // double encoding is decoded once: a literal "%2e%2e" name, not a dot-segment
            ("/public/%252e%252e/v1/x", ok("/public/%252e%252e/v1/x")),
            ("/public/%252E%252E/v1/x", ok("/public/%252E%252E/v1/x")),
            // ;parameters
            ("/public/..;/v1/x", Err(Parameters)),
            ("/public/..;a=b/v1/x", Err(Parameters)),
            ("/public/.;/v1/x", Err(Parameters)),
            ("/public/%2e%2e;/v1/x", Err(Parameters)),
            ("/public/x;a=1/../v1", Err(Parameters)),
            ("/v1;x/chat/completions", Err(Parameters)),
            ("/v1/chat/completions;x", Err(Parameters)),
            // empty segments are merged
            ("//v1/chat/completions", ok("/v1/chat/completions")),
            ("/public//v1", ok("/public/v1")),
            ("/v1//", ok("/v1/")),
            ("/public//../v1/x", ok("/v1/x")),
            ("/;x/v1", Err(Parameters)),
            // escapes: unreserved decoded, others uppercased
            ("/%76%31/chat/completions", ok("/v1/chat/completions")),
            ("/v1/%41%7e%5f%2D", ok("/v1/A~_-")),
            ("/v1/a%2fb", Err(AmbiguousSeparator)),
            ("/v1/a%3bb%3f", ok("/v1/a%3Bb%3F")),
            ("/v1/%c3%a9", ok("/v1/%C3%A9")),
            ("/v1/%25", ok("/v1/%25")),
            // malformed and control
            ("/v1/%zz", Err(BadEscape)),
            ("/v1/%4", Err(BadEscape)),
            ("/v1/%", Err(BadEscape)),
            ("/v1/%g0", Err(BadEscape)),
            ("/v1/%00/x", Err(Control)),
            ("/v1/%0a", Err(Control)),
            ("/v1/%7F", Err(Control)),
            ("/v1/a\0b", Err(Control)),
            ("/v1/a\tb", Err(Control)),
            // not origin-form
            ("*", Err(NotOriginForm)),
            ("", Err(NotOriginForm)),
            ("v1/x", Err(NotOriginForm)),
        ];
        for (input, want) in table {
            let got = canonical(input);
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                *want,
                "canonical({input:?})"
            );
        }
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in ["/", "/v1/chat/completions", "/a/b/", "/.well-known/x"] {
            assert!(
                matches!(canonical(p), Ok(Cow::Borrowed(_))),
                "{p} allocated"
            );
        }
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        for p in [
            "/public/%2e%2e/v1/%41%c3%a9",
            "/a//b/./c/../d/",
            "/public/%252e%252e/x",
            "/x/%3b/y",
        ] {
            let once = canonical(p).unwrap().into_owned();
            let twice = canonical(&once).unwrap().into_owned();
            assert_eq!(once, twice, "{p}");
        }
    }
}
