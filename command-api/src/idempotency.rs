//! `Idempotency-Key` on every write (POST, PUT, PATCH, DELETE under `/v1`,
//! except the identity routes, whose answers are secrets that must not be
//! stored).
//!
//! Per caller and key the first request is recorded with a hash of its method,
//! path and body (JSON canonicalized, so key order and spacing do not matter)
//! before it runs; its response is stored when it completes. A retry with the
//! same key and request gets the stored response (`Idempotent-Replayed: true`)
//! and has no second effect; the same key with another request gets 422; a
//! retry while the first is still running gets 409 with `Retry-After`.
//! A handler that has not finished within the answer deadline gets the client
//! a 503 but runs on, holding the claim until its outcome is known (see
//! [`layer`]). While it runs, its claim is a lease it renews, so the stale
//! takeover (a crashed process's key) never runs beside a live handler, and
//! every wait of a handler is bounded. A 5xx outcome is stored like any
//! other once the handler appended something (the write happened: the retry
//! must answer it, not run again); a 5xx with nothing appended releases the
//! key. A write that creates a resource derives its id from the key
//! ([`derived_id`]), so even a retry after an append whose fate Kafka could
//! not tell (a delivery timeout that was in fact written) names the same
//! resource and has no second effect.
//! Records are kept 24 hours. A response may name what to keep instead of its
//! body ([`StoreInstead`]): a generated private key is shown once and never
//! stored, so its replay answers without it.

use crate::problem::ApiError;
use crate::AppState;
use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;

pub const HEADER: &str = "idempotency-key";
const REPLAYED: &str = "idempotent-replayed";
/// A first request that has not completed after this long is presumed dead
/// (its process crashed) and the key may be taken over. Longer than any
/// handler can run: librdkafka's delivery timeout (30 s) plus the waits of
/// the household write path.
const STALE_AFTER_SECONDS: f64 = 120.0;
/// How often a running handler renews its claim's lease.
const RENEW_EVERY: Duration = Duration::from_secs(30);

/// A response extension: the body the idempotency record keeps instead of
/// the one sent (the sent one holds a secret shown once).
#[derive(Debug, Clone)]
pub struct StoreInstead(pub Vec<u8>);

fn applies(req: &Request) -> bool {
    matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
        && req.uri().path().starts_with("/v1/")
        && !req.uri().path().starts_with("/v1/auth/")
}

use crate::validate::idempotency_key as valid_key;

/// The request's fingerprint: method, path and canonical body.
fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let canonical = match serde_json::from_slice::<serde_json::Value>(body) {
        // `Value` objects are ordered maps: re-encoding sorts keys and drops spacing.
        Ok(v) => serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec()),
        Err(_) => body.to_vec(),
    };
    let mut buf = format!("{method} {path}\n").into_bytes();
    buf.extend_from_slice(&canonical);
    crate::auth::sha256_hex(&buf)
}

/// Every `/v1` write goes through here. The handler runs as a task of its
/// own, so the client's answer is bounded by `answer_within` (then 503,
/// "outcome not known yet") while the handler goes on until the outcome *is*
/// known — an append Kafka has not acknowledged yet keeps waiting for
/// librdkafka's delivery report. With an `Idempotency-Key`, the claim is held
/// until then: a retry meanwhile gets 409 (`Retry-After`), and afterwards the
/// original answer (delivered) or a fresh run (failed, 5xx: the claim is
/// released). So a key never yields two effects, however slow the broker.
pub async fn layer(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !applies(&req) || !s.routed(&req) {
        // Not a write, or a method this path does not have (the router answers 405).
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    // Authentication first: without a valid caller the route answers 401 itself.
    let Some(caller) = crate::auth::caller_of(&parts, &s.keys.verifier) else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let key = match parts.headers.get(HEADER).map(|v| v.to_str()) {
        None => return run_detached(&s, None, next, Request::from_parts(parts, body)).await,
        Some(Ok(k)) if valid_key(k) => k.to_owned(),
        Some(_) => return ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into()).into_response(),
    };
    let bytes = match to_bytes(body, crate::MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return ApiError::TooLarge(crate::MAX_BODY_BYTES).into_response(),
    };
    let scope = caller.user_id.to_string();
    let hash = fingerprint(&parts.method, parts.uri.path(), &bytes);
    match claim(&s, &scope, &key, &hash).await {
        Err(e) => return e.into_response(),
        Ok(Claim::Replay(r)) => return r,
        Ok(Claim::Mine) => {}
    }
    run_detached(&s, Some((scope, key)), next, Request::from_parts(parts, Body::from(bytes))).await
}

/// What the running write appended: whether anything, and what its
/// consistency token names.
#[derive(Default)]
pub struct Collected {
    appended: bool,
    written: homelink_kit::consistency::Written,
}

tokio::task_local! {
    /// What the running write appended (its consistency token).
    pub static WRITTEN: std::sync::Arc<std::sync::Mutex<Collected>>;
    /// The running write's claim `(scope, key)`, if it has one.
    static KEY: Option<(String, String)>;
}

/// A response extension: the write appended to the log before it answered.
#[derive(Debug, Clone, Copy)]
struct Appended;

/// The id a resource created by the running write gets when the write has
/// an `Idempotency-Key`: a function of the caller, the key and `what`, so a
/// retry creates nothing new. `None` without a key (the caller picks a fresh id).
pub fn derived_id(what: &str) -> Option<uuid::Uuid> {
    KEY.try_with(|k| k.as_ref().map(|(scope, key)| key_id(scope, key, what))).ok().flatten()
}

/// A version-4-shaped id from a hash of the claim and `what`.
fn key_id(scope: &str, key: &str, what: &str) -> uuid::Uuid {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("homelink-idempotent-id\n{scope}\n{key}\n{what}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// Records an event the current write appended (`household_event`: on the
/// households topic, where its seq is the household's new version), for its
/// consistency token.
pub fn wrote(household_event: bool, env: &homelink_events::Envelope) {
    let _ = WRITTEN.try_with(|w| {
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        w.appended = true;
        match (household_event, env.seq, env.event()) {
            (true, Some(v), _) => w.written.household_version(env.household_id, v),
            (false, _, Ok(homelink_events::Event::DeviceCommandRequested(c))) => w.written.command(env.household_id, c.command_id),
            _ => {}
        }
    });
}

/// Runs the handler with a fresh [`WRITTEN`]; a response to a write that
/// appended something carries its signed token in `HomeLink-Consistency-Token`.
async fn run_collecting(s: Arc<AppState>, key: Option<(String, String)>, next: Next, req: Request) -> Response {
    let user = crate::auth::caller_of_request(&req, &s.keys.verifier);
    let collected = std::sync::Arc::new(std::sync::Mutex::new(Collected::default()));
    let mut r = KEY.scope(key, WRITTEN.scope(collected.clone(), next.run(req))).await;
    let Collected { appended, written } = std::mem::take(&mut *collected.lock().unwrap_or_else(|e| e.into_inner()));
    if appended {
        r.extensions_mut().insert(Appended);
    }
    if let Some(token) = user.and_then(|u| s.keys.sign_consistency(u, &written)) {
        if let Ok(v) = HeaderValue::from_str(&token) {
            r.headers_mut().insert(homelink_kit::consistency::HEADER, v);
        }
    }
    r
}

/// Runs the handler as its own task; answers its response if it comes within
/// `answer_within`, else 503 while the task goes on and records its outcome
/// under the claim `(scope, key)` when it comes.
async fn run_detached(s: &Arc<AppState>, claimed: Option<(String, String)>, next: Next, req: Request) -> Response {
    let mut handler = tokio::spawn(run_collecting(s.clone(), claimed.clone(), next, req));
    let lease = claimed.clone().map(|(scope, key)| tokio::spawn(renew(s.pool.clone(), scope, key)));
    let stop_lease = move || {
        if let Some(l) = lease {
            l.abort();
        }
    };
    match tokio::time::timeout(s.answer_within, &mut handler).await {
        Ok(done) => {
            stop_lease();
            settle(s, claimed.as_ref(), done).await
        }
        Err(_) => {
            s.metrics.errors.with_label_values(&["answer_deadline"]).inc();
            let s = s.clone();
            tokio::spawn(async move {
                let done = handler.await;
                stop_lease();
                let _ = settle(&s, claimed.as_ref(), done).await;
            });
            ApiError::Unavailable("the outcome is not known within the answer deadline; it is still being decided".into()).into_response()
        }
    }
}

/// Renews a running handler's claim every [`RENEW_EVERY`] until aborted.
async fn renew(pool: sqlx::PgPool, scope: String, key: String) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let r = sqlx::query("UPDATE idempotency_keys SET created_at = now() WHERE scope = $1 AND key = $2 AND status IS NULL")
            .bind(&scope)
            .bind(&key)
            .execute(&pool)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "renewing an idempotency claim failed");
        }
    }
}

async fn settle(s: &AppState, claimed: Option<&(String, String)>, done: Result<Response, tokio::task::JoinError>) -> Response {
    let response = done.unwrap_or_else(|e| ApiError::Internal(format!("handler failed: {e}")).into_response());
    match claimed {
        Some((scope, key)) => record(s, scope, key, response).await,
        None => response,
    }
}

enum Claim {
    /// This request is the first with the key: run it.
    Mine,
    /// The stored answer of an earlier identical request.
    Replay(Response),
}

async fn claim(s: &AppState, scope: &str, key: &str, hash: &str) -> Result<Claim, ApiError> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (scope, key) DO UPDATE SET request_hash = EXCLUDED.request_hash, created_at = now()
           WHERE idempotency_keys.status IS NULL AND idempotency_keys.created_at < now() - make_interval(secs => $4)
             AND idempotency_keys.request_hash = EXCLUDED.request_hash
         RETURNING 1",
    )
    .bind(scope)
    .bind(key)
    .bind(hash)
    .bind(STALE_AFTER_SECONDS)
    .fetch_optional(&s.pool)
    .await
    .map_err(ApiError::db)?;
    if inserted.is_some() {
        return Ok(Claim::Mine);
    }
    let row = sqlx::query("SELECT request_hash, status, content_type, body FROM idempotency_keys WHERE scope = $1 AND key = $2")
        .bind(scope)
        .bind(key)
        .fetch_optional(&s.pool)
        .await
        .map_err(ApiError::db)?
        .ok_or(ApiError::IdempotencyInProgress)?;
    if row.get::<String, _>(0) != hash {
        return Err(ApiError::IdempotencyKeyReused);
    }
    let Some(status) = row.get::<Option<i32>, _>(1) else {
        return Err(ApiError::IdempotencyInProgress);
    };
    let status = axum::http::StatusCode::from_u16(status as u16).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut r = (status, row.get::<Option<Vec<u8>>, _>(3).unwrap_or_default()).into_response();
    if let Some(ct) = row.get::<Option<String>, _>(2).and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
    s.metrics.messages_in.with_label_values(&["idempotent_replay"]).inc();
    Ok(Claim::Replay(r))
}

/// Stores a completed response; a 5xx only when the write appended
/// something (else nothing happened and the key is released for a retry).
async fn record(s: &AppState, scope: &str, key: &str, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, 1024 * 1024).await else {
        return ApiError::Internal("response too large to record".into()).into_response();
    };
    let result = if parts.status.is_server_error() && parts.extensions.get::<Appended>().is_none() {
        sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2").bind(scope).bind(key).execute(&s.pool).await
    } else {
        let ct = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let kept = parts.extensions.get::<StoreInstead>().map_or_else(|| bytes.to_vec(), |s| s.0.clone());
        sqlx::query("UPDATE idempotency_keys SET status = $3, content_type = $4, body = $5 WHERE scope = $1 AND key = $2")
            .bind(scope)
            .bind(key)
            .bind(i32::from(parts.status.as_u16()))
            .bind(ct)
            .bind(kept)
            .execute(&s.pool)
            .await
    };
    if let Err(e) = result {
        // The effect happened; only the record is missing. The key stays
        // "in progress" until it goes stale; log it.
        tracing::warn!(error = %e, "could not record an idempotent response");
        s.metrics.errors.with_label_values(&["idempotency_record"]).inc();
    }
    let mut r = Response::from_parts(parts, Body::from(bytes));
    r.headers_mut().insert(REPLAYED, HeaderValue::from_static("false"));
    r
}

/// Deletes idempotency records and rate-limit windows older than a day,
/// every ten minutes, until cancelled.
pub async fn expire(pool: sqlx::PgPool, cancel: homelink_kit::shutdown::CancellationToken) {
    loop {
        if let Err(e) = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - interval '24 hours'").execute(&pool).await {
            tracing::warn!(error = %e, "expiring idempotency keys failed");
        }
        if let Err(e) = sqlx::query("DELETE FROM identity_rate_limits WHERE window_start < now() - interval '1 day'").execute(&pool).await {
            tracing::warn!(error = %e, "expiring rate-limit windows failed");
        }
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(600)) => {} }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_ignores_json_key_order_and_spacing_but_not_values() {
        let a = fingerprint(&Method::POST, "/v1/x", br#"{"a": 1, "b": [1, 2]}"#);
        let b = fingerprint(&Method::POST, "/v1/x", br#"{"b":[1,2],"a":1}"#);
        let c = fingerprint(&Method::POST, "/v1/x", br#"{"b":[2,1],"a":1}"#);
        let d = fingerprint(&Method::POST, "/v1/y", br#"{"a": 1, "b": [1, 2]}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn an_id_derived_from_a_key_depends_on_the_caller_the_key_and_the_resource() {
        let a = key_id("u1", "k", "household");
        assert_eq!(a, key_id("u1", "k", "household"));
        assert_ne!(a, key_id("u2", "k", "household"));
        assert_ne!(a, key_id("u1", "k2", "household"));
        assert_ne!(a, key_id("u1", "k", "device"));
        assert_eq!(a.get_version_num(), 4);
    }

    #[test]
    fn keys_are_short_visible_ascii() {
        assert!(valid_key("3f1c-retry_1"));
        assert!(!valid_key(""));
        assert!(!valid_key("with space"));
        assert!(!valid_key(&"k".repeat(256)));
    }
}
