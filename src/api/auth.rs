//! Bearer-token checks for `/admin/*` (always) and `/v1/*` (when a service token is set).
//!
//! Tokens are compared as SHA-256 digests with `subtle`, so neither the content nor the length of
//! the configured token leaks through timing.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::SharedState;
use crate::http::error::ApiError;

pub fn tokens_match(presented: &str, expected: &SecretString) -> bool {
    let expected = expected.expose_secret();
    if expected.is_empty() {
        return false;
    }
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub async fn require_tokens(
    State(state): State<SharedState>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let required = if path.starts_with("/admin/") {
        Some((
            &state.admin_token,
            "a valid admin token is required (Authorization: Bearer ...)",
        ))
    } else if path.starts_with("/v1/") {
        state.service_token.as_ref().map(|t| {
            (
                t,
                "a valid service token is required (Authorization: Bearer ...)",
            )
        })
    } else {
        None
    };
    if let Some((token, message)) = required {
        let ok = bearer(&req).is_some_and(|presented| tokens_match(presented, token));
        if !ok {
            return ApiError::Unauthorized(message).into_response();
        }
    }
    next.run(req).await
}
