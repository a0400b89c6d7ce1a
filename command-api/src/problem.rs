//! Errors as `application/problem+json` (RFC 9457), one stable `type` per
//! error, and the JSON body extractor that turns every malformed body into one.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// Where problem types live; a type is this base plus a stable slug.
pub const PROBLEM_BASE: &str = "https://homelink.dev/problems/";

/// The problem+json body every error answers with.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `https://homelink.dev/problems/<slug>`, stable per error.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The JSON pointer of the fault in the request body, when one field is at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// An API error; each variant maps to one status and one stable `type`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// 400 naming the faulty field (`path`, a JSON pointer into the body).
    #[error("{0}: {1}")]
    InvalidAt(String, String),
    /// 422: the field at `path` is well formed but does not fit (a
    /// capability the device's kind lacks).
    #[error("{0}: {1}")]
    UnfitAt(String, String),
    /// Missing, malformed, expired or otherwise invalid access token.
    #[error("a valid access token is required")]
    Unauthorized,
    #[error("the e-mail or the password is wrong")]
    InvalidCredentials,
    #[error("the refresh token is invalid, expired or already used")]
    InvalidRefreshToken,
    #[error("{0}")]
    Forbidden(String),
    #[error("the resource does not exist")]
    NotFound,
    /// The request conflicts with the current state; the slug names the rule.
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// Valid by the document, but not for this resource; the slug names why.
    #[error("{1}")]
    Unprocessable(&'static str, String),
    #[error("a request with this Idempotency-Key is still in progress; retry shortly")]
    IdempotencyInProgress,
    #[error("too many attempts; try again later")]
    TooManyAttempts,
    #[error("{0}")]
    Unavailable(String),
    /// An append whose fate Kafka could not tell (it may still be written):
    /// 503 like [`ApiError::Unavailable`], but whatever it claimed (a
    /// serial) stays claimed.
    #[error("{0}")]
    InDoubt(String),
    /// A write rate limit: 429 with `Retry-After` in seconds.
    #[error("{0}")]
    RateLimited(String, u64),
    /// Bounded work (password hashing) is at capacity.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn db(e: sqlx::Error) -> Self {
        ApiError::Unavailable(format!("postgres: {e}"))
    }

    /// Status, stable slug and title.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidAt(..) => (StatusCode::BAD_REQUEST, "invalid-request", "The request is invalid"),
            ApiError::UnfitAt(..) => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported-capability", "Not applicable to this resource"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Authentication required"),
            ApiError::InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid-credentials", "Sign-in failed"),
            ApiError::InvalidRefreshToken => (StatusCode::UNAUTHORIZED, "invalid-refresh-token", "Refresh failed"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Not allowed for your role"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Conflict(slug, _) => (StatusCode::CONFLICT, slug, "The request conflicts with the current state"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "The request body is too large"),
            ApiError::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused", "Idempotency-Key reused with another request")
            }
            ApiError::Unprocessable(slug, _) => (StatusCode::UNPROCESSABLE_ENTITY, slug, "Not applicable to this resource"),
            ApiError::IdempotencyInProgress => (StatusCode::CONFLICT, "idempotency-in-progress", "Request in progress"),
            ApiError::TooManyAttempts => (StatusCode::TOO_MANY_REQUESTS, "too-many-attempts", "Too many attempts"),
            ApiError::Unavailable(_) | ApiError::InDoubt(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Temporarily unavailable"),
            ApiError::RateLimited(..) => (StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests"),
            ApiError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy", "Busy"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }

    pub fn problem(&self) -> Problem {
        let (status, slug, title) = self.parts();
        let detail = match self {
            // Infrastructure detail stays in the logs.
            ApiError::Unavailable(why) | ApiError::InDoubt(why) => {
                tracing::warn!(%why, "answering 503");
                "A dependency did not answer in time; retry with the same Idempotency-Key.".to_owned()
            }
            ApiError::Internal(why) => {
                tracing::error!(%why, "answering 500");
                "Something went wrong on our side.".to_owned()
            }
            other => other.to_string(),
        };
        let path = match self {
            ApiError::InvalidAt(path, _) | ApiError::UnfitAt(path, _) => Some(path.clone()),
            _ => None,
        };
        Problem { type_: format!("{PROBLEM_BASE}{slug}"), title: title.to_owned(), status: status.as_u16(), detail, path }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.parts().0;
        let body = serde_json::to_string(&self.problem()).unwrap_or_default();
        let mut r = (status, [(header::CONTENT_TYPE, "application/problem+json")], body).into_response();
        if matches!(self, ApiError::Unauthorized | ApiError::InvalidRefreshToken | ApiError::InvalidCredentials) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if matches!(self, ApiError::IdempotencyInProgress | ApiError::Unavailable(_) | ApiError::InDoubt(_) | ApiError::Busy(_)) {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::TooManyAttempts) {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("900"));
        }
        if let ApiError::RateLimited(_, secs) = &self {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(*secs));
        }
        r
    }
}

/// A JSON body: size-limited before parsing, text that no store can hold
/// (a NUL character anywhere, keys included) refused, unknown fields refused
/// by the target type, every rejection a problem+json 400/413/415.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(e) => {
                return Err(match e {
                    JsonRejection::MissingJsonContentType(_) => {
                        ApiError::BadRequest("the body must be JSON (Content-Type: application/json)".into())
                    }
                    e if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(crate::MAX_BODY_BYTES),
                    e => ApiError::BadRequest(e.body_text()),
                })
            }
        };
        if homelink_events::text::value_has_nul(&value) {
            return Err(ApiError::BadRequest("text must not contain the NUL character (\\u0000)".into()));
        }
        serde_json::from_value(value)
            .map(Body)
            .map_err(|e| ApiError::BadRequest(format!("Failed to deserialize the JSON body into the target type: {e}")))
    }
}
