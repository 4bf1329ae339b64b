//! The one place where errors become HTTP responses.
//!
//! Policy: modules that cross a boundary return their own `thiserror` enum (`StoreError`,
//! `DbError`, `QuotaError`, `ConfigError`); handlers convert them into `ApiError`, and only
//! `ApiError::into_response` decides the status of an error, for the API and the proxy alike
//! (a decision's 402/429 is its problem document's own, see `respond`). Client mistakes get a
//! 4xx with a message that names the field; infrastructure faults get an opaque 5xx body, with
//! the detail in the log.
//! `anyhow` is for `main` and background loops only.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::db::DbError;
use crate::quota::QuotaError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request (not JSON, wrong content type): 400.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// Well-formed but invalid (wrong types, unknown metric, bad amount): 422.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what exists (a grant id reused with other terms): 409.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body too large")]
    /// What was too large, and the bound.
    PayloadTooLarge(String),
    /// Proxy: a request path that has no single canonical form (see `proxy::path`): 400.
    #[error("{0}")]
    BadPath(String),
    /// Duplicate `Host`, or a `Host` that disagrees with an absolute-form target (RFC 9112): 400.
    #[error("{0}")]
    BadHost(&'static str),
    /// The client stopped sending its request body for longer than `body_idle_timeout`: 408.
    #[error("the request body stopped arriving; send it without long pauses")]
    RequestTimeout,
    /// The proxy found no route for a request and has no default route.
    #[error("no proxy route matches this request")]
    NoRoute,
    /// Proxy: the upstream could not be reached (502).
    #[error("the upstream service could not be reached")]
    UpstreamUnavailable,
    /// Proxy: the upstream closed the connection before its response headers (502).
    #[error("the upstream service closed the connection without a response")]
    UpstreamBroken,
    /// Proxy: no response headers within `request_timeout` (504).
    #[error("the upstream service did not answer in time")]
    UpstreamTimeout,
    /// A proxy route charges a metric the (reloaded) catalog no longer declares (503).
    #[error("the gateway's route configuration does not match its plan catalog")]
    Misconfigured,
    /// `/v1/reservations/{id}`: no such reservation (never made, or forgotten a day after it
    /// ended): 404.
    #[error("no such reservation")]
    ReservationNotFound,
    /// Settled or released before: 409.
    #[error("the reservation was already {0}")]
    ReservationEnded(&'static str),
    /// It expired first and was settled per `[usage] reservation_expiry`: 410.
    #[error("the reservation expired")]
    ReservationExpired(crate::domain::reservation::OnExpiry),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::Invalid {
            code: "invalid_request",
            message: message.into(),
        }
    }

    /// A charge or report that would take a counter past `MAX_COUNTER`: 422, nothing applied.
    pub fn counter_overflow(message: impl Into<String>) -> Self {
        ApiError::Invalid {
            code: "counter_overflow",
            message: message.into(),
        }
    }

    /// A malformed request with its own error code: 400.
    pub fn bad_request_code(code: &'static str, message: impl std::fmt::Display) -> Self {
        ApiError::BadRequest {
            code,
            message: message.to_string(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl From<crate::reservations::ReservationError> for ApiError {
    fn from(e: crate::reservations::ReservationError) -> Self {
        use crate::reservations::ReservationError as E;
        match e {
            E::NotFound => ApiError::ReservationNotFound,
            E::Ended(how) => ApiError::ReservationEnded(how),
            E::Expired(on) => ApiError::ReservationExpired(on),
            E::Quota(e) => e.into(),
            E::Store(e) => ApiError::Store(e),
            E::Corrupt(reason) => ApiError::Store(StoreError::Protocol(reason)),
        }
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Store(StoreError::CounterOverflow) => ApiError::counter_overflow(format!(
                "amount: would take a counter past {}, the largest counter value; nothing was applied",
                crate::domain::decision::MAX_COUNTER
            )),
            QuotaError::Store(e) => ApiError::Store(e),
            QuotaError::Db(e) => ApiError::Db(e),
        }
    }
}

impl From<crate::credits::CreditError> for ApiError {
    fn from(e: crate::credits::CreditError) -> Self {
        use crate::credits::CreditError;
        match e {
            CreditError::Invalid(_)
            | CreditError::UnknownMetric(_)
            | CreditError::GaugeMetric(_) => ApiError::invalid(e.to_string()),
            CreditError::Conflict(_) => ApiError::Conflict {
                code: "grant_conflict",
                message: e.to_string(),
            },
            CreditError::NotFound(_) => ApiError::NotFound(e.to_string()),
            CreditError::Quota(e) => e.into(),
        }
    }
}

/// The JSON shape of every non-decision error: `{"error": "...", "message": "..."}`.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    pub message: &'a str,
}

pub fn error_response(status: StatusCode, error: &str, message: &str) -> Response {
    (status, Json(ErrorBody { error, message })).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::BadRequest { code, message } => {
                error_response(StatusCode::BAD_REQUEST, code, message)
            }
            ApiError::Invalid { code, message } => {
                error_response(StatusCode::UNPROCESSABLE_ENTITY, code, message)
            }
            ApiError::Unauthorized(message) => {
                let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized", message);
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
                r
            }
            ApiError::NotFound(message) => {
                error_response(StatusCode::NOT_FOUND, "not_found", message)
            }
            ApiError::ReservationNotFound => error_response(
                StatusCode::NOT_FOUND,
                "reservation_not_found",
                "no such reservation (unknown id, or ended more than a day ago)",
            ),
            ApiError::ReservationEnded(how) => error_response(
                StatusCode::CONFLICT,
                "reservation_ended",
                &format!("the reservation was already {how}; it ends once"),
            ),
            ApiError::ReservationExpired(on_expiry) => error_response(
                StatusCode::GONE,
                "reservation_expired",
                match on_expiry {
                    crate::domain::reservation::OnExpiry::Settle => {
                        "the reservation expired and was settled at its reserved amounts"
                    }
                    crate::domain::reservation::OnExpiry::Release => {
                        "the reservation expired and was released"
                    }
                },
            ),
            ApiError::Conflict { code, message } => {
                error_response(StatusCode::CONFLICT, code, message)
            }
            ApiError::MethodNotAllowed => error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            ),
            ApiError::PayloadTooLarge(message) => {
                error_response(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            ApiError::BadPath(message) => {
                error_response(StatusCode::BAD_REQUEST, "bad_path", message)
            }
            ApiError::BadHost(message) => {
                error_response(StatusCode::BAD_REQUEST, "bad_host", message)
            }
            ApiError::RequestTimeout => {
                let mut r = error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    &self.to_string(),
                );
                r.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                r
            }
            ApiError::NoRoute => {
                error_response(StatusCode::NOT_FOUND, "no_route", &self.to_string())
            }
            ApiError::UpstreamUnavailable => error_response(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                &self.to_string(),
            ),
            ApiError::UpstreamBroken => {
                error_response(StatusCode::BAD_GATEWAY, "upstream_error", &self.to_string())
            }
            ApiError::UpstreamTimeout => error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                &self.to_string(),
            ),
            ApiError::Misconfigured => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "misconfigured",
                &self.to_string(),
            ),
            ApiError::Store(StoreError::CounterOverflow) => error_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "counter_overflow",
                &self.to_string(),
            ),
            // Defence in depth: input Postgres cannot store (a value the request types let
            // through) is the client's, not an outage. Which field is unknown here; the request
            // types name it wherever they can.
            ApiError::Db(e) if e.is_data_exception() => {
                tracing::warn!(error = %e, "request refused by the database as invalid data");
                error_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    "a value in the request cannot be stored",
                )
            }
            ApiError::Store(e) => {
                tracing::error!(error = %e, "redis unavailable");
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the usage store is unavailable; retry shortly",
                )
            }
            ApiError::Db(e) => {
                tracing::error!(error = %e, "database unavailable");
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable; retry shortly",
                )
            }
        }
    }
}
