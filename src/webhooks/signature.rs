//! Webhook signature verification for the two schemes the gateway accepts:
//! Stripe's `Stripe-Signature` header and the Standard Webhooks spec
//! (<https://www.standardwebhooks.com>, used by Dodo Payments, Polar and Svix).
//!
//! Everything here works on the raw request bytes: re-serialising parsed JSON
//! would change whitespace or key order and break the MAC, so callers must
//! verify before they parse.
//!
//! Errors never carry secrets, signatures or body bytes, so they are safe to log
//! and to return to the sender.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Default replay window, in seconds, for both schemes (the providers' own default).
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Prefix Standard Webhooks (and Stripe) put in front of their secrets.
const WHSEC_PREFIX: &str = "whsec_";

/// Why a webhook was rejected.
///
/// Variants carry only static text so an error can be logged or echoed back
/// without leaking key material or payload content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing header: {0}")]
    MissingHeader(&'static str),
    #[error("malformed signature data: {0}")]
    Malformed(&'static str),
    #[error("timestamp outside the allowed tolerance")]
    TimestampOutOfTolerance,
    #[error("no signature matched any configured secret")]
    NoMatchingSignature,
    #[error("webhook secret is empty or not in the expected encoding")]
    BadSecret,
}

/// How a Standard Webhooks provider turns its displayed secret into HMAC key bytes.
///
/// Providers disagree here, and picking the wrong one makes every signature fail,
/// so it is configured per provider rather than guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandardKeyEncoding {
    /// The spec's rule (Dodo, Svix): drop an optional `whsec_` prefix, base64-decode the rest.
    Base64AfterWhsecPrefix,
    /// Polar signs with the UTF-8 bytes of the secret exactly as shown to the user.
    Utf8Bytes,
}

/// Derives the HMAC key for a Standard Webhooks provider from its configured secret.
pub fn standard_key(secret: &str, enc: StandardKeyEncoding) -> Result<Vec<u8>, SignatureError> {
    let key = match enc {
        StandardKeyEncoding::Base64AfterWhsecPrefix => {
            let encoded = secret.strip_prefix(WHSEC_PREFIX).unwrap_or(secret);
            BASE64
                .decode(encoded.trim())
                .map_err(|_| SignatureError::BadSecret)?
        }
        StandardKeyEncoding::Utf8Bytes => secret.as_bytes().to_vec(),
    };
    if key.is_empty() {
        return Err(SignatureError::BadSecret);
    }
    Ok(key)
}

/// HMAC-SHA256 over the concatenation of `parts`, so the signed content never
/// has to be copied into one buffer.
fn mac(key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, SignatureError> {
    if key.is_empty() {
        return Err(SignatureError::BadSecret);
    }
    let mut m = HmacSha256::new_from_slice(key).map_err(|_| SignatureError::BadSecret)?;
    for p in parts {
        m.update(p);
    }
    Ok(m.finalize().into_bytes().to_vec())
}

/// True if any candidate equals any expected tag. Each comparison is constant time;
/// stopping at the first match only reveals that the request was authentic.
fn any_match(expected: &[Vec<u8>], candidates: &[Vec<u8>]) -> bool {
    expected
        .iter()
        .any(|e| candidates.iter().any(|c| bool::from(e.as_slice().ct_eq(c))))
}

/// Verifies a `Stripe-Signature` header against the raw body.
///
/// `secrets` holds every currently valid `whsec_...` string as bytes (the whole
/// string, prefix included, is the key: Stripe does not decode it). More than one
/// secret is how rotation works: during Stripe's overlap window either may sign.
///
/// Only timestamps older than `now_unix - tolerance_secs` are rejected; like
/// Stripe's own libraries we accept future timestamps, because a sender clock
/// that runs ahead is not a replay.
///
/// Returns the signed timestamp so callers can log or store it.
pub fn verify_stripe(
    header: &str,
    body: &[u8],
    secrets: &[&[u8]],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<i64, SignatureError> {
    if header.trim().is_empty() {
        return Err(SignatureError::MissingHeader("Stripe-Signature"));
    }
    if secrets.is_empty() || secrets.iter().any(|s| s.is_empty()) {
        return Err(SignatureError::BadSecret);
    }

    let mut timestamp: Option<i64> = None;
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    let mut saw_v1 = false;
    for item in header.split(',') {
        // Like Stripe's libraries, skip items that are not `key=value` instead of
        // failing: the outcome still hinges on a valid t and a matching v1.
        let Some((key, value)) = item.split_once('=') else {
            continue;
        };
        match key.trim() {
            "t" => {
                if timestamp.is_some() {
                    // Two timestamps make it ambiguous which one was signed.
                    return Err(SignatureError::Malformed("duplicate t in Stripe-Signature"));
                }
                let t = value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed("t is not an integer"))?;
                timestamp = Some(t);
            }
            "v1" => {
                saw_v1 = true;
                // A v1 that is not 32 bytes of hex can never match; skip it rather
                // than failing, so one odd entry cannot mask a valid one.
                if let Ok(sig) = hex::decode(value.trim()) {
                    candidates.push(sig);
                }
            }
            // v0 (test-mode legacy) and any future scheme are deliberately ignored:
            // accepting them would let a downgrade bypass v1.
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed("missing t in Stripe-Signature"))?;
    if !saw_v1 {
        return Err(SignatureError::Malformed(
            "no v1 signature in Stripe-Signature",
        ));
    }

    let t_str = t.to_string();
    let expected = secrets
        .iter()
        .map(|s| mac(s, &[t_str.as_bytes(), b".", body]))
        .collect::<Result<Vec<_>, _>>()?;
    if !any_match(&expected, &candidates) {
        return Err(SignatureError::NoMatchingSignature);
    }
    // Checked after the MAC so a forged request reports a bad signature, and
    // only authentic-but-old deliveries report the timestamp.
    if t < now_unix.saturating_sub(tolerance_secs) {
        return Err(SignatureError::TimestampOutOfTolerance);
    }
    Ok(t)
}

/// Produces a full `Stripe-Signature` header value exactly as Stripe would, for tests
/// and for tooling that replays events.
pub fn sign_stripe(secret: &[u8], t: i64, body: &[u8]) -> String {
    let tag = mac(secret, &[t.to_string().as_bytes(), b".", body]).unwrap_or_default();
    format!("t={t},v1={}", hex::encode(tag))
}

/// Verifies a Standard Webhooks delivery given its three header values.
///
/// `keys` are already-derived HMAC keys (see [`standard_key`]); several may be
/// given during rotation. Unlike Stripe, the spec rejects timestamps too far in
/// the future as well as too old, so both directions are checked.
pub fn verify_standard(
    id: &str,
    timestamp: &str,
    signature_header: &str,
    body: &[u8],
    keys: &[&[u8]],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<i64, SignatureError> {
    if id.trim().is_empty() {
        return Err(SignatureError::MissingHeader("webhook-id"));
    }
    if timestamp.trim().is_empty() {
        return Err(SignatureError::MissingHeader("webhook-timestamp"));
    }
    if signature_header.trim().is_empty() {
        return Err(SignatureError::MissingHeader("webhook-signature"));
    }
    if keys.is_empty() || keys.iter().any(|k| k.is_empty()) {
        return Err(SignatureError::BadSecret);
    }
    let t = timestamp
        .trim()
        .parse::<i64>()
        .map_err(|_| SignatureError::Malformed("webhook-timestamp is not an integer"))?;

    let mut candidates: Vec<Vec<u8>> = Vec::new();
    let mut saw_v1 = false;
    for entry in signature_header.split_ascii_whitespace() {
        // Entries without a version are skipped, as the reference libraries do.
        let Some((version, sig)) = entry.split_once(',') else {
            continue;
        };
        // v1a (asymmetric) and future versions are not ours to check.
        if version == "v1" {
            saw_v1 = true;
            if let Ok(sig) = BASE64.decode(sig) {
                candidates.push(sig);
            }
        }
    }
    if !saw_v1 {
        return Err(SignatureError::Malformed(
            "no v1 signature in webhook-signature",
        ));
    }

    // Sign the header text as received: re-formatting the integer could differ
    // (e.g. leading zeros) from what the sender signed.
    let ts = timestamp.trim().as_bytes();
    let expected = keys
        .iter()
        .map(|k| mac(k, &[id.as_bytes(), b".", ts, b".", body]))
        .collect::<Result<Vec<_>, _>>()?;
    if !any_match(&expected, &candidates) {
        return Err(SignatureError::NoMatchingSignature);
    }
    if t < now_unix.saturating_sub(tolerance_secs) || t > now_unix.saturating_add(tolerance_secs) {
        return Err(SignatureError::TimestampOutOfTolerance);
    }
    Ok(t)
}

/// Produces a `webhook-signature` header value (`v1,<base64>`) as a Standard
/// Webhooks sender would, for tests and replay tooling.
pub fn sign_standard(key: &[u8], id: &str, t: i64, body: &[u8]) -> String {
    let tag = mac(
        key,
        &[id.as_bytes(), b".", t.to_string().as_bytes(), b".", body],
    )
    .unwrap_or_default();
    format!("v1,{}", BASE64.encode(tag))
}

/// The three Standard Webhooks header values of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardHeaders<'a> {
    pub id: &'a str,
    pub timestamp: &'a str,
    pub signature: &'a str,
}

/// Collects the Standard Webhooks headers through `lookup` (called with lower-case
/// names; HTTP header maps are case-insensitive).
///
/// Svix-hosted senders use `svix-` instead of `webhook-`. The prefix is chosen
/// once for all three headers, never mixed, so a stray header of one family cannot
/// be combined with the other family's signature.
pub fn standard_headers<'a, F>(lookup: F) -> Result<StandardHeaders<'a>, SignatureError>
where
    F: Fn(&str) -> Option<&'a str>,
{
    let webhook = ["webhook-id", "webhook-timestamp", "webhook-signature"];
    let svix = ["svix-id", "svix-timestamp", "svix-signature"];
    let names = if webhook.iter().any(|n| lookup(n).is_some()) {
        webhook
    } else if svix.iter().any(|n| lookup(n).is_some()) {
        svix
    } else {
        return Err(SignatureError::MissingHeader("webhook-signature"));
    };
    let get = |i: usize| {
        lookup(names[i])
            .filter(|v| !v.trim().is_empty())
            .ok_or(SignatureError::MissingHeader(names[i]))
    };
    Ok(StandardHeaders {
        id: get(0)?,
        timestamp: get(1)?,
        signature: get(2)?,
    })
}

/// [`standard_headers`] followed by [`verify_standard`]; returns the verified
/// headers so the caller can use the id for deduplication and the timestamp as
/// a fallback event time.
pub fn verify_standard_headers<'a, F>(
    lookup: F,
    body: &[u8],
    keys: &[&[u8]],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(StandardHeaders<'a>, i64), SignatureError>
where
    F: Fn(&str) -> Option<&'a str>,
{
    let h = standard_headers(lookup)?;
    let t = verify_standard(
        h.id,
        h.timestamp,
        h.signature,
        body,
        keys,
        now_unix,
        tolerance_secs,
    )?;
    Ok((h, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const SPEC_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const SPEC_TS: i64 = 1649367553;
    const SPEC_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SPEC_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    const STRIPE_SECRET: &[u8] = b"whsec_test_secret_for_unit_tests";
    const STRIPE_BODY: &[u8] = br#"{"id":"evt_1","object":"event"}"#;
    const STRIPE_T: i64 = 1_700_000_000;

    fn spec_key() -> Vec<u8> {
        standard_key(SPEC_SECRET, StandardKeyEncoding::Base64AfterWhsecPrefix).unwrap()
    }

    /// Independent of `mac`/`sign_*`: a straight HMAC call over the documented content.
    fn independent_stripe_hex(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut m = HmacSha256::new_from_slice(secret).unwrap();
        m.update(format!("{t}.").as_bytes());
        m.update(body);
        m.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    // ---- Standard Webhooks ----

    #[test]
    fn spec_test_vector_signs_and_verifies() {
        let key = spec_key();
        assert_eq!(sign_standard(&key, SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
        let t = verify_standard(
            SPEC_ID,
            &SPEC_TS.to_string(),
            SPEC_SIG,
            SPEC_BODY,
            &[&key],
            SPEC_TS,
            300,
        );
        assert_eq!(t, Ok(SPEC_TS));
    }

    #[test]
    fn standard_key_without_prefix_is_same_key() {
        let a = standard_key(
            "C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            StandardKeyEncoding::Base64AfterWhsecPrefix,
        )
        .unwrap();
        assert_eq!(a, spec_key());
    }

    #[test]
    fn standard_key_rejects_bad_base64_and_empty() {
        assert_eq!(
            standard_key(
                "whsec_not*base64!",
                StandardKeyEncoding::Base64AfterWhsecPrefix
            ),
            Err(SignatureError::BadSecret)
        );
        assert_eq!(
            standard_key("whsec_", StandardKeyEncoding::Base64AfterWhsecPrefix),
            Err(SignatureError::BadSecret)
        );
        assert_eq!(
            standard_key("", StandardKeyEncoding::Utf8Bytes),
            Err(SignatureError::BadSecret)
        );
    }

    #[test]
    fn utf8_key_is_the_secret_bytes_verbatim() {
        let k = standard_key("polar_whs_abc", StandardKeyEncoding::Utf8Bytes).unwrap();
        assert_eq!(k, b"polar_whs_abc");
        let sig = sign_standard(&k, "id1", 100, b"{}");
        assert_eq!(
            verify_standard("id1", "100", &sig, b"{}", &[&k], 100, 300),
            Ok(100)
        );
    }

    #[test]
    fn standard_wrong_secret() {
        let other = standard_key(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            StandardKeyEncoding::Base64AfterWhsecPrefix,
        )
        .unwrap();
        let r = verify_standard(
            SPEC_ID,
            "1649367553",
            SPEC_SIG,
            SPEC_BODY,
            &[&other],
            SPEC_TS,
            300,
        );
        assert_eq!(r, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn standard_tampered_body() {
        let key = spec_key();
        let body = br#"{"email":"test@example.com","username":"test_user2"}"#;
        let r = verify_standard(SPEC_ID, "1649367553", SPEC_SIG, body, &[&key], SPEC_TS, 300);
        assert_eq!(r, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn standard_tampered_id_or_timestamp() {
        let key = spec_key();
        let r = verify_standard(
            "msg_other",
            "1649367553",
            SPEC_SIG,
            SPEC_BODY,
            &[&key],
            SPEC_TS,
            300,
        );
        assert_eq!(r, Err(SignatureError::NoMatchingSignature));
        let r = verify_standard(
            SPEC_ID,
            "1649367554",
            SPEC_SIG,
            SPEC_BODY,
            &[&key],
            SPEC_TS,
            300,
        );
        assert_eq!(r, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn standard_tolerance_both_directions() {
        let key = spec_key();
        let v = |now| {
            verify_standard(
                SPEC_ID,
                "1649367553",
                SPEC_SIG,
                SPEC_BODY,
                &[&key],
                now,
                300,
            )
        };
        // Boundaries are inclusive.
        assert_eq!(v(SPEC_TS + 300), Ok(SPEC_TS));
        assert_eq!(v(SPEC_TS - 300), Ok(SPEC_TS));
        // Stale.
        assert_eq!(
            v(SPEC_TS + 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
        // Too far in the future.
        assert_eq!(
            v(SPEC_TS - 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
    }

    #[test]
    fn standard_rotation_second_key_matches() {
        let old = b"old-key-bytes".to_vec();
        let new = spec_key();
        let r = verify_standard(
            SPEC_ID,
            "1649367553",
            SPEC_SIG,
            SPEC_BODY,
            &[&old, &new],
            SPEC_TS,
            300,
        );
        assert_eq!(r, Ok(SPEC_TS));
    }

    #[test]
    fn standard_multiple_entries_and_other_versions() {
        let key = spec_key();
        let header = format!(
            "v1a,AAAA v1,bm90IHRoZSByaWdodCBzaWduYXR1cmUhISEhISEhISEhISE= v2,xyz {SPEC_SIG}"
        );
        let r = verify_standard(
            SPEC_ID,
            "1649367553",
            &header,
            SPEC_BODY,
            &[&key],
            SPEC_TS,
            300,
        );
        assert_eq!(r, Ok(SPEC_TS));
        // Entries without a version are skipped, not fatal.
        let header = format!("junk {SPEC_SIG}");
        assert_eq!(
            verify_standard(
                SPEC_ID,
                "1649367553",
                &header,
                SPEC_BODY,
                &[&key],
                SPEC_TS,
                300
            ),
            Ok(SPEC_TS)
        );
        // Undecodable v1 entries are skipped, not fatal.
        let header = format!("v1,%%% {SPEC_SIG}");
        let r = verify_standard(
            SPEC_ID,
            "1649367553",
            &header,
            SPEC_BODY,
            &[&key],
            SPEC_TS,
            300,
        );
        assert_eq!(r, Ok(SPEC_TS));
    }

    #[test]
    fn standard_only_other_versions_is_malformed() {
        let key = spec_key();
        let sig_only = SPEC_SIG.trim_start_matches("v1,");
        let header = format!("v1a,{sig_only}");
        let r = verify_standard(
            SPEC_ID,
            "1649367553",
            &header,
            SPEC_BODY,
            &[&key],
            SPEC_TS,
            300,
        );
        assert!(matches!(r, Err(SignatureError::Malformed(_))));
    }

    #[test]
    fn standard_malformed_headers() {
        let key = spec_key();
        let k: &[&[u8]] = &[&key];
        assert_eq!(
            verify_standard("", "1", SPEC_SIG, SPEC_BODY, k, 1, 300),
            Err(SignatureError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            verify_standard(SPEC_ID, " ", SPEC_SIG, SPEC_BODY, k, 1, 300),
            Err(SignatureError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            verify_standard(SPEC_ID, "1", "", SPEC_BODY, k, 1, 300),
            Err(SignatureError::MissingHeader("webhook-signature"))
        );
        assert!(matches!(
            verify_standard(SPEC_ID, "12x", SPEC_SIG, SPEC_BODY, k, 1, 300),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify_standard(SPEC_ID, "1", "garbage", SPEC_BODY, k, 1, 300),
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            verify_standard(SPEC_ID, "1", SPEC_SIG, SPEC_BODY, &[], 1, 300),
            Err(SignatureError::BadSecret)
        );
    }

    #[test]
    fn standard_header_lookup_prefers_one_family() {
        let ts = SPEC_TS.to_string();
        let webhook = |n: &str| match n {
            "webhook-id" => Some(SPEC_ID),
            "webhook-timestamp" => Some(ts.as_str()),
            "webhook-signature" => Some(SPEC_SIG),
            _ => None,
        };
        let key = spec_key();
        let (h, t) = verify_standard_headers(webhook, SPEC_BODY, &[&key], SPEC_TS, 300).unwrap();
        assert_eq!((h.id, t), (SPEC_ID, SPEC_TS));

        let svix = |n: &str| match n {
            "svix-id" => Some(SPEC_ID),
            "svix-timestamp" => Some(ts.as_str()),
            "svix-signature" => Some(SPEC_SIG),
            _ => None,
        };
        assert!(verify_standard_headers(svix, SPEC_BODY, &[&key], SPEC_TS, 300).is_ok());

        // A partial webhook-* set is not completed from svix-* headers.
        let mixed = |n: &str| match n {
            "webhook-id" => Some(SPEC_ID),
            "svix-timestamp" => Some(ts.as_str()),
            "svix-signature" => Some(SPEC_SIG),
            _ => None,
        };
        assert_eq!(
            standard_headers(mixed),
            Err(SignatureError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            standard_headers(|_| None),
            Err(SignatureError::MissingHeader("webhook-signature"))
        );
    }

    // ---- Stripe ----

    /// Fixed vector, computed once outside this crate with:
    /// `printf '%s' '1700000000.{"id":"evt_1","object":"event"}' | openssl dgst -sha256 -hmac 'whsec_test_secret_for_unit_tests'`
    const STRIPE_FIXED_V1: &str =
        "c95d2c29e0fceebf124a2db532226742af5916fc30252ef348bcea6ff08c905d";

    #[test]
    fn stripe_fixed_vector() {
        assert_eq!(
            sign_stripe(STRIPE_SECRET, STRIPE_T, STRIPE_BODY),
            format!("t={STRIPE_T},v1={STRIPE_FIXED_V1}")
        );
        let header = format!("t={STRIPE_T},v1={STRIPE_FIXED_V1}");
        assert_eq!(
            verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300),
            Ok(STRIPE_T)
        );
    }

    #[test]
    fn stripe_independent_hmac_matches() {
        let hex = independent_stripe_hex(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        let header = format!("t={STRIPE_T},v1={hex}");
        assert_eq!(header, sign_stripe(STRIPE_SECRET, STRIPE_T, STRIPE_BODY));
        assert_eq!(
            verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T + 10, 300),
            Ok(STRIPE_T)
        );
    }

    #[test]
    fn stripe_wrong_secret() {
        let header = sign_stripe(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        let r = verify_stripe(&header, STRIPE_BODY, &[b"whsec_other"], STRIPE_T, 300);
        assert_eq!(r, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn stripe_tampered_body() {
        let header = sign_stripe(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        let r = verify_stripe(
            &header,
            br#"{"id":"evt_2","object":"event"}"#,
            &[STRIPE_SECRET],
            STRIPE_T,
            300,
        );
        assert_eq!(r, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn stripe_tampered_timestamp() {
        let hex = independent_stripe_hex(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        let header = format!("t={},v1={hex}", STRIPE_T + 1);
        let r = verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300);
        assert_eq!(r, Err(SignatureError::NoMatchingSignature));
    }

    #[test]
    fn stripe_stale_rejected_future_accepted() {
        let header = sign_stripe(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        let v = |now| verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], now, 300);
        assert_eq!(v(STRIPE_T + 300), Ok(STRIPE_T));
        assert_eq!(
            v(STRIPE_T + 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
        // An hour in the future is still fine for Stripe.
        assert_eq!(v(STRIPE_T - 3600), Ok(STRIPE_T));
    }

    #[test]
    fn stripe_rotation_second_secret_matches() {
        let header = sign_stripe(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        let r = verify_stripe(
            &header,
            STRIPE_BODY,
            &[b"whsec_old", STRIPE_SECRET],
            STRIPE_T,
            300,
        );
        assert_eq!(r, Ok(STRIPE_T));
    }

    #[test]
    fn stripe_multiple_v1_and_v0_ignored() {
        let good = independent_stripe_hex(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        let bad = independent_stripe_hex(b"whsec_other", STRIPE_T, STRIPE_BODY);
        let header = format!("t={STRIPE_T},v1={bad},v1=zz,v0={good},v1={good}");
        assert_eq!(
            verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300),
            Ok(STRIPE_T)
        );
        // A matching v0 alone must not be accepted.
        let header = format!("t={STRIPE_T},v1={bad},v0={good}");
        assert_eq!(
            verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300),
            Err(SignatureError::NoMatchingSignature)
        );
        // Items that are not key=value are skipped.
        let header = format!("t={STRIPE_T},junk,v1={good}");
        assert_eq!(
            verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300),
            Ok(STRIPE_T)
        );
        // Whitespace after commas (seen from some proxies) is tolerated.
        let header = format!("t={STRIPE_T}, v1={good}");
        assert_eq!(
            verify_stripe(&header, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300),
            Ok(STRIPE_T)
        );
    }

    #[test]
    fn stripe_malformed_headers() {
        let s: &[&[u8]] = &[STRIPE_SECRET];
        let good = independent_stripe_hex(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        assert_eq!(
            verify_stripe("", STRIPE_BODY, s, STRIPE_T, 300),
            Err(SignatureError::MissingHeader("Stripe-Signature"))
        );
        for header in [
            format!("v1={good}"),
            format!("t=abc,v1={good}"),
            format!("t={STRIPE_T},t={STRIPE_T},v1={good}"),
            format!("t={STRIPE_T},v0={good}"),
            format!("t={STRIPE_T};v1={good}"),
            "garbage".to_string(),
        ] {
            assert!(
                matches!(
                    verify_stripe(&header, STRIPE_BODY, s, STRIPE_T, 300),
                    Err(SignatureError::Malformed(_))
                ),
                "{header}"
            );
        }
        assert_eq!(
            verify_stripe(
                &format!("t={STRIPE_T},v1={good}"),
                STRIPE_BODY,
                &[],
                STRIPE_T,
                300
            ),
            Err(SignatureError::BadSecret)
        );
        assert_eq!(
            verify_stripe(
                &format!("t={STRIPE_T},v1={good}"),
                STRIPE_BODY,
                &[b""],
                STRIPE_T,
                300
            ),
            Err(SignatureError::BadSecret)
        );
    }

    #[test]
    fn errors_do_not_echo_inputs() {
        let msg = SignatureError::NoMatchingSignature.to_string();
        assert!(!msg.contains("whsec"));
        let msg = SignatureError::Malformed("t is not an integer").to_string();
        assert_eq!(msg, "malformed signature data: t is not an integer");
    }

    #[test]
    fn stripe_hex_is_read_in_either_case_and_malformed_hex_is_no_match() {
        let header = sign_stripe(STRIPE_SECRET, STRIPE_T, STRIPE_BODY);
        assert_eq!(
            header,
            format!(
                "t={STRIPE_T},v1={}",
                independent_stripe_hex(STRIPE_SECRET, STRIPE_T, STRIPE_BODY)
            )
        );
        let upper = format!(
            "t={STRIPE_T},v1={}",
            header.split_once("v1=").unwrap().1.to_uppercase()
        );
        assert_eq!(
            verify_stripe(&upper, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300),
            Ok(STRIPE_T)
        );
        for bad in ["0", "zz"] {
            let h = format!("t={STRIPE_T},v1={bad}");
            assert!(verify_stripe(&h, STRIPE_BODY, &[STRIPE_SECRET], STRIPE_T, 300).is_err());
        }
    }
}
