//! A JSON extractor whose rejections use the gateway's error shape and name the offending field.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::http::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(map_rejection(rejection)),
        }
    }
}

fn map_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::Invalid {
            code: "invalid_request",
            // serde_path_to_error's message starts with the field path ("amount: invalid type").
            message: strip_axum_prefix(&e.body_text()),
        },
        JsonRejection::JsonSyntaxError(e) => ApiError::BadRequest {
            code: "invalid_json",
            message: strip_axum_prefix(&e.body_text()),
        },
        JsonRejection::MissingJsonContentType(_) => ApiError::BadRequest {
            code: "invalid_content_type",
            message: "expected `Content-Type: application/json`".into(),
        },
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("the request body is too large (at most 2 MiB)".into())
        }
        other => ApiError::bad_request(other.body_text()),
    }
}

fn strip_axum_prefix(text: &str) -> String {
    for prefix in [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
    ] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    text.to_string()
}
