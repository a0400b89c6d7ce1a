//! Errors as `application/problem+json` (RFC 9457), one stable `type` per error.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An API error; each variant maps to one status and one stable `type`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the resource does not exist")]
    NotFound,
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid-request", "The request is invalid"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "The request body is too large"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Temporarily unavailable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let detail = match &self {
            // Infrastructure detail stays in the logs.
            ApiError::Unavailable(why) => {
                tracing::warn!(%why, "answering 503");
                "A dependency did not answer in time; retry with the same Idempotency-Key.".to_owned()
            }
            other => other.to_string(),
        };
        let body = json!({
            "type": format!("https://homelink.dev/problems/{kind}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        });
        (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
    }
}
