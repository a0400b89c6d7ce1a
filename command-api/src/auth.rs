//! User identity: sign-up, sign-in, refresh, sign-out, the signing keys and
//! their JWKS document, and the extractor that authenticates every other route.
//!
//! - Passwords: argon2id (the crate's defaults: 19 MiB, 2 passes), hashed on
//!   the blocking pool, at most `hashing_permits` at once ([`Hashing`]: the
//!   hash holds the permit, not the request). An unknown e-mail costs the
//!   same hash as a wrong password, so timing does not tell which.
//! - Access tokens: EdDSA JWTs, minutes long, with `kid`, `iss`, `aud`, `exp`,
//!   `iat`, `sub`, `jti`. Verified by [`homelink_kit::auth::Verifier`].
//! - Refresh tokens: 32 random bytes, stored as SHA-256, rotated on every use;
//!   a spent token presented again revokes its whole family.
//! - Signing keys: in `identity_signing_keys`; [`rotate`] adds a key that is
//!   published at once and signs after `publish_delay`, and retires the
//!   current one, which keeps verifying until its last tokens expired.

use crate::problem::{ApiError, Problem};
use crate::AppState;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use homelink_kit::auth::{Caller, Claims, Jwk, JwkSet, Verifier, ALGORITHM, AUDIENCE, ISSUER};
use homelink_kit::metrics::ServiceMetrics;
use homelink_read_model::locks::Lock;
use jsonwebtoken::{EncodingKey, Header};
use prometheus::{IntCounter, IntGauge};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use utoipa::ToSchema;
use uuid::Uuid;

/// Token lifetimes and key timing.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// How often the key set is re-read from Postgres.
    pub key_refresh: Duration,
    /// How long a new key is published before it signs; must exceed every
    /// verifier's JWKS refresh interval.
    pub publish_delay: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            access_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            key_refresh: Duration::from_secs(5),
            publish_delay: Duration::from_secs(30),
        }
    }
}

struct Signer {
    kid: String,
    key: EncodingKey,
}

/// The current signing key and the published key set.
#[derive(Clone)]
pub struct Keys {
    signer: Arc<RwLock<Option<Arc<Signer>>>>,
    jwks: Arc<RwLock<JwkSet>>,
    pub verifier: Verifier,
}

impl Keys {
    pub fn new() -> Self {
        Self { signer: Arc::default(), jwks: Arc::default(), verifier: Verifier::default() }
    }

    /// Re-reads the keys: the newest active key signs; every key not retired
    /// longer ago than an access token lives is published and verifies.
    pub async fn reload(&self, pool: &PgPool, access_ttl: Duration) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT kid, private_pem, public_x, activates_at <= now() FROM identity_signing_keys
             WHERE retires_at IS NULL OR retires_at > now() - make_interval(secs => $1)
             ORDER BY activates_at DESC",
        )
        .bind(access_ttl.as_secs_f64() + 60.0)
        .fetch_all(pool)
        .await?;
        let mut set = JwkSet::default();
        let mut signer = None;
        for r in rows {
            let (kid, pem, x, active): (String, String, String, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
            if active && signer.is_none() {
                match EncodingKey::from_ed_pem(pem.as_bytes()) {
                    Ok(key) => signer = Some(Arc::new(Signer { kid: kid.clone(), key })),
                    Err(e) => tracing::error!(%kid, error = %e, "unusable signing key"),
                }
            }
            set.keys.push(Jwk::ed25519(&kid, &x));
        }
        self.verifier.set_keys(&set);
        *self.jwks.write().unwrap_or_else(|e| e.into_inner()) = set;
        *self.signer.write().unwrap_or_else(|e| e.into_inner()) = signer;
        Ok(())
    }

    pub fn jwks(&self) -> JwkSet {
        self.jwks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Signs an access token for `user`; `None` when no key is active yet.
    pub fn issue(&self, user: Uuid, ttl: Duration) -> Option<(String, String)> {
        let signer = self.signer.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        let now = Utc::now().timestamp();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: user.to_string(),
            iat: now,
            exp: now + ttl.as_secs() as i64,
            jti: Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(signer.kid.clone());
        jsonwebtoken::encode(&header, &claims, &signer.key).ok().map(|t| (t, signer.kid.clone()))
    }

    /// Signs a consistency token for `user`'s write (see
    /// `homelink_kit::consistency`); `None` when nothing was written or no
    /// key is active yet.
    pub fn sign_consistency(&self, user: Uuid, written: &homelink_kit::consistency::Written) -> Option<String> {
        let claims = homelink_kit::consistency::Claims::new(user, written, Utc::now().timestamp())?;
        let signer = self.signer.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(signer.kid.clone());
        jsonwebtoken::encode(&header, &claims, &signer.key).ok()
    }

    /// Re-reads the keys every `every` until cancelled.
    pub async fn keep_fresh(self, pool: PgPool, cfg: TokenConfig, cancel: homelink_kit::shutdown::CancellationToken) {
        loop {
            tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(cfg.key_refresh) => {} }
            if let Err(e) = self.reload(&pool, cfg.access_ttl).await {
                tracing::warn!(error = %e, "reloading signing keys failed");
            }
        }
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

/// Generates an Ed25519 key pair: (kid, private PEM, public x).
fn generate_key() -> anyhow::Result<(String, String, String)> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let kid = format!("k{}", Uuid::now_v7().simple());
    Ok((kid, kp.serialize_pem(), URL_SAFE_NO_PAD.encode(kp.public_key_raw())))
}

/// Creates the first signing key if there is none (active at once).
pub async fn ensure_key(pool: &PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(Lock::SigningKeys.key()).execute(&mut *tx).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM identity_signing_keys").fetch_one(&mut *tx).await?;
    if n == 0 {
        let (kid, pem, x) = generate_key()?;
        sqlx::query(
            "INSERT INTO identity_signing_keys (kid, algorithm, private_pem, public_x, activates_at) VALUES ($1, 'EdDSA', $2, $3, now())",
        )
        .bind(&kid)
        .bind(&pem)
        .bind(&x)
        .execute(&mut *tx)
        .await?;
        tracing::info!(%kid, "created the first token signing key");
    }
    tx.commit().await?;
    Ok(())
}

/// Rotates the signing key: the new key is published now and signs after
/// `publish_delay`; the keys before it retire at that moment. Returns its kid.
pub async fn rotate(pool: &PgPool, publish_delay: Duration) -> anyhow::Result<String> {
    let (kid, pem, x) = generate_key()?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(Lock::SigningKeys.key()).execute(&mut *tx).await?;
    let activates: DateTime<Utc> = Utc::now() + ChronoDuration::from_std(publish_delay)?;
    sqlx::query("UPDATE identity_signing_keys SET retires_at = $1 WHERE retires_at IS NULL").bind(activates).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO identity_signing_keys (kid, algorithm, private_pem, public_x, activates_at) VALUES ($1, 'EdDSA', $2, $3, $4)")
        .bind(&kid)
        .bind(&pem)
        .bind(&x)
        .bind(activates)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(kid)
}

/// The authenticated caller of a route: a valid bearer access token, or 401.
pub struct Authenticated(pub Caller);

impl FromRequestParts<Arc<AppState>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        caller_of(parts, &s.keys.verifier).map(Authenticated).ok_or(ApiError::Unauthorized)
    }
}

/// The caller named by the request's bearer token, if it verifies.
pub fn caller_of(parts: &Parts, verifier: &Verifier) -> Option<Caller> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = homelink_kit::auth::bearer(value)?;
    match verifier.verify(token) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::info!(reason = %e, "access token refused");
            None
        }
    }
}

/// The user of a request's valid access token, quietly (its refusal, if
/// any, is logged by the route).
pub fn caller_of_request(req: &axum::extract::Request, verifier: &Verifier) -> Option<Uuid> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    verifier.verify(homelink_kit::auth::bearer(value)?).ok().map(|c| c.user_id)
}

/// The client a request came from (its User-Agent), for the audit log.
pub fn client_of(parts: &Parts) -> Option<String> {
    let ua = parts.headers.get(header::USER_AGENT)?.to_str().ok()?;
    Some(ua.chars().take(120).collect())
}

// ---- routes ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignUp {
    /// Used to sign in; compared case-insensitively.
    #[schema(
        max_length = 254,
        pattern = r"^[^@\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+@[^@.\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^@\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*\.[^@\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"
    )]
    pub email: String,
    /// 10 to 128 characters.
    #[schema(min_length = 10, max_length = 128)]
    pub password: String,
    /// 1 to 80 characters, no control characters, no whitespace at either end.
    #[schema(
        min_length = 1,
        max_length = 80,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$"
    )]
    pub display_name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignIn {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// A token pair.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tokens {
    pub user_id: Uuid,
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Opaque; spend it once at `/v1/auth/refresh`.
    pub refresh_token: String,
}

const MIN_PASSWORD: usize = 10;
const MAX_PASSWORD: usize = 128;

fn hash_password(password: &str) -> Result<String, ApiError> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A hash of a password nobody has, so an unknown e-mail costs a verification too.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2V3lFzxMmNpBn9yhhXlHMsvOeOdC1Ab5k1fEKjzcmsU";

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh opaque secret: 32 random bytes, base64url.
pub fn secret() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

async fn issue_pair(s: &AppState, user: Uuid, family: Uuid) -> Result<Tokens, ApiError> {
    let (access, _kid) = s.keys.issue(user, s.tokens.access_ttl).ok_or_else(|| ApiError::Unavailable("no active signing key".into()))?;
    let refresh = secret();
    sqlx::query(
        "INSERT INTO identity_refresh_tokens (token_hash, family_id, user_id, expires_at) VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
    )
    .bind(sha256_hex(refresh.as_bytes()))
    .bind(family)
    .bind(user)
    .bind(s.tokens.refresh_ttl.as_secs_f64())
    .execute(&s.pool)
    .await
    .map_err(ApiError::db)?;
    Ok(Tokens {
        user_id: user,
        access_token: access,
        token_type: "Bearer".into(),
        expires_in: s.tokens.access_ttl.as_secs(),
        refresh_token: refresh,
    })
}

/// Creates an account and signs it in.
#[utoipa::path(post, path = "/v1/auth/sign-up", tag = "identity", request_body = SignUp,
    responses((status = 201, body = Tokens), (status = 400, body = Problem, content_type = "application/problem+json"), (status = 409, description = "e-mail taken", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many sign-ups from this address", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "too many sign-ins at once", body = Problem, content_type = "application/problem+json")))]
pub async fn sign_up(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: crate::problem::Body<SignUp>,
) -> Result<(StatusCode, Json<Tokens>), ApiError> {
    let req = body.0;
    let email = crate::validate::email(&req.email)?;
    let n = req.password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
        return Err(ApiError::BadRequest(format!("password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")));
    }
    let name = crate::validate::name(&req.display_name, "displayName")?;
    let name = name.as_str();
    let budget = s.identity.sign_ups_per_address_per_hour;
    if !spend(&s.pool, &format!("sign-up/address/{}", peer.ip()), budget, Duration::from_secs(3600)).await? {
        s.metrics.errors.with_label_values(&["sign_up_throttled"]).inc();
        return Err(ApiError::TooManyAttempts);
    }
    let password = req.password;
    let hash = s.hashing.run(s.identity.hashing_wait, move || hash_password(&password)).await??;
    let user = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO identity_users (user_id, email, display_name, password_hash) VALUES ($1, $2, $3, $4) ON CONFLICT (email) DO NOTHING",
    )
    .bind(user)
    .bind(&email)
    .bind(name)
    .bind(&hash)
    .execute(&s.pool)
    .await
    .map_err(ApiError::db)?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict("email-taken", "an account with this e-mail exists".into()));
    }
    Ok((StatusCode::CREATED, Json(issue_pair(&s, user, Uuid::now_v7()).await?)))
}

/// Limits on identity work: password hashing is memory-hard (19 MiB and tens
/// of milliseconds each), so how many run at once is bounded, and attempts are
/// budgeted per e-mail and per client address.
#[derive(Debug, Clone)]
pub struct IdentityLimits {
    /// Password hashes (sign-up, sign-in) running at once.
    pub hashing_permits: usize,
    /// How long a request waits for a hashing permit before 503.
    pub hashing_wait: Duration,
    /// Failed sign-ins per e-mail (known or not) within `window`, then 429
    /// without checking the password.
    pub failures_per_email: i32,
    /// Failed sign-ins per client address within `window`.
    pub failures_per_address: i32,
    pub window: Duration,
    /// Sign-ups per client address per hour.
    pub sign_ups_per_address_per_hour: i32,
}

impl Default for IdentityLimits {
    fn default() -> Self {
        Self {
            hashing_permits: 4,
            hashing_wait: Duration::from_secs(2),
            failures_per_email: 10,
            failures_per_address: 100,
            window: Duration::from_secs(15 * 60),
            sign_ups_per_address_per_hour: 20,
        }
    }
}

/// Counts one attempt against `key`'s budget of `limit` per `window`;
/// `false` when the budget was already spent. One statement: concurrent
/// attempts are counted one after the other by the row lock.
async fn spend(pool: &sqlx::PgPool, key: &str, limit: i32, window: Duration) -> Result<bool, ApiError> {
    let n: i32 = sqlx::query_scalar(
        "INSERT INTO identity_rate_limits (key, window_start, count) VALUES ($1, now(), 1)
         ON CONFLICT (key) DO UPDATE SET
           window_start = CASE WHEN identity_rate_limits.window_start < now() - make_interval(secs => $2) THEN now()
                               ELSE identity_rate_limits.window_start END,
           count = CASE WHEN identity_rate_limits.window_start < now() - make_interval(secs => $2) THEN 1
                        ELSE identity_rate_limits.count + 1 END
         RETURNING count",
    )
    .bind(key)
    .bind(window.as_secs_f64())
    .fetch_one(pool)
    .await
    .map_err(ApiError::db)?;
    Ok(n <= limit)
}

/// Gives one attempt back (it succeeded).
async fn refund(pool: &sqlx::PgPool, key: &str) -> Result<(), ApiError> {
    sqlx::query("UPDATE identity_rate_limits SET count = GREATEST(count - 1, 0) WHERE key = $1")
        .bind(key)
        .execute(pool)
        .await
        .map_err(ApiError::db)?;
    Ok(())
}

/// The bound on password hashing (`IdentityLimits::hashing_permits`). The
/// permit is moved into the hashing itself, on the blocking pool: it is
/// released when the hash ends, not when the request does — a client that
/// disconnects drops its handler, but the hash it started runs on and keeps
/// its permit, so at most `hashing_permits` hashes ever run at once.
///
/// Exported as `homelink_command_api_password_hashes_running` (now) and
/// `homelink_command_api_password_hashes_running_peak` (the most at once
/// since the process started).
#[derive(Clone)]
pub struct Hashing {
    permits: Arc<tokio::sync::Semaphore>,
    tally: Arc<Mutex<HashTally>>,
    running: IntGauge,
    peak: IntGauge,
    busy: IntCounter,
}

#[derive(Default)]
struct HashTally {
    running: i64,
    peak: i64,
}

impl Hashing {
    /// `permits` hashes at once (at least 1), its gauges registered in `metrics`.
    pub fn new(permits: usize, metrics: &ServiceMetrics) -> Self {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            metrics.registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(permits.max(1))),
            tally: Arc::default(),
            running: gauge("homelink_command_api_password_hashes_running", "Password hashes running now"),
            peak: gauge("homelink_command_api_password_hashes_running_peak", "Most password hashes running at once since the start"),
            busy: metrics.errors.with_label_values(&["hashing_busy"]),
        }
    }

    /// Runs `work` (a password hash) on the blocking pool once a permit is
    /// free; 503 when none frees up within `wait`. The permit is released
    /// when `work` returns, even if the caller stopped waiting for it.
    pub async fn run<T: Send + 'static>(&self, wait: Duration, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let Ok(Ok(permit)) = tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await else {
            self.busy.inc();
            return Err(ApiError::Busy("too many sign-ins at once; retry shortly".into()));
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // Dropped in reverse order: the count goes down before the permit is released.
            let _permit = permit;
            let _running = this.started();
            work()
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn started(&self) -> HashRunning<'_> {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.running += 1;
        t.peak = t.peak.max(t.running);
        self.running.set(t.running);
        self.peak.set(t.peak);
        HashRunning(self)
    }
}

/// One hash running; counted down when dropped.
struct HashRunning<'a>(&'a Hashing);

impl Drop for HashRunning<'_> {
    fn drop(&mut self) {
        let mut t = self.0.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.running -= 1;
        self.0.running.set(t.running);
    }
}

/// Signs in with e-mail and password. After 10 failures for an e-mail (or
/// 100 from a client address) within 15 minutes, attempts get 429 until the
/// window passes; the password is not checked then.
#[utoipa::path(post, path = "/v1/auth/sign-in", tag = "identity", request_body = SignIn,
    responses((status = 200, body = Tokens), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many failed attempts", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "too many sign-ins at once", body = Problem, content_type = "application/problem+json")))]
pub async fn sign_in(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: crate::problem::Body<SignIn>,
) -> Result<Json<Tokens>, ApiError> {
    let req = body.0;
    if req.password.chars().count() > MAX_PASSWORD {
        return Err(ApiError::InvalidCredentials);
    }
    let email = req.email.trim().to_lowercase();
    if email.len() > 254 {
        return Err(ApiError::InvalidCredentials);
    }
    let limits = &s.identity;
    // Every attempt is counted before the password is checked, and given
    // back when it succeeds: parallel guesses cannot slip past the budget.
    let (email_key, address_key) = (format!("sign-in/email/{email}"), format!("sign-in/address/{}", peer.ip()));
    if !spend(&s.pool, &email_key, limits.failures_per_email, limits.window).await?
        || !spend(&s.pool, &address_key, limits.failures_per_address, limits.window).await?
    {
        s.metrics.errors.with_label_values(&["sign_in_throttled"]).inc();
        return Err(ApiError::TooManyAttempts);
    }
    let row = sqlx::query("SELECT user_id, password_hash FROM identity_users WHERE email = $1")
        .bind(&email)
        .fetch_optional(&s.pool)
        .await
        .map_err(ApiError::db)?;
    let (user, hash) = match row {
        Some(r) => (Some(r.get::<Uuid, _>(0)), r.get::<String, _>(1)),
        None => (None, DUMMY_HASH.to_owned()),
    };
    let password = req.password;
    let ok = s.hashing.run(limits.hashing_wait, move || verify_password(&password, &hash)).await?;
    match user {
        Some(u) if ok => {
            // A success clears the e-mail's failures and does not count against the address.
            sqlx::query("DELETE FROM identity_rate_limits WHERE key = $1").bind(&email_key).execute(&s.pool).await.map_err(ApiError::db)?;
            refund(&s.pool, &address_key).await?;
            Ok(Json(issue_pair(&s, u, Uuid::now_v7()).await?))
        }
        _ => Err(ApiError::InvalidCredentials),
    }
}

/// Spends a refresh token for a new pair. A spent token presented again
/// revokes every token of its family.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "identity", request_body = RefreshRequest,
    responses((status = 200, body = Tokens), (status = 401, body = Problem, content_type = "application/problem+json")))]
pub async fn refresh(State(s): State<Arc<AppState>>, body: crate::problem::Body<RefreshRequest>) -> Result<Json<Tokens>, ApiError> {
    let hash = sha256_hex(body.0.refresh_token.as_bytes());
    let mut tx = s.pool.begin().await.map_err(ApiError::db)?;
    let row = sqlx::query(
        "SELECT family_id, user_id, used_at IS NOT NULL, revoked_at IS NOT NULL, expires_at <= now()
         FROM identity_refresh_tokens WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await
    .map_err(ApiError::db)?;
    let Some(r) = row else {
        return Err(ApiError::InvalidRefreshToken);
    };
    let (family, user, used, revoked, expired): (Uuid, Uuid, bool, bool, bool) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    if used && !revoked {
        // Reuse: someone holds a copy. End the whole family.
        sqlx::query("UPDATE identity_refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL")
            .bind(family)
            .execute(&mut *tx)
            .await
            .map_err(ApiError::db)?;
        tx.commit().await.map_err(ApiError::db)?;
        tracing::warn!(%user, %family, "refresh token reused: family revoked");
        s.metrics.errors.with_label_values(&["refresh_token_reuse"]).inc();
        return Err(ApiError::InvalidRefreshToken);
    }
    if used || revoked || expired {
        return Err(ApiError::InvalidRefreshToken);
    }
    sqlx::query("UPDATE identity_refresh_tokens SET used_at = now() WHERE token_hash = $1")
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::db)?;
    tx.commit().await.map_err(ApiError::db)?;
    Ok(Json(issue_pair(&s, user, family).await?))
}

/// Ends a session: revokes the refresh token's family. Access tokens already
/// issued stay valid until they expire (minutes).
#[utoipa::path(post, path = "/v1/auth/sign-out", tag = "identity", request_body = RefreshRequest,
    responses((status = 204, description = "signed out"), (status = 401, body = Problem, content_type = "application/problem+json")))]
pub async fn sign_out(State(s): State<Arc<AppState>>, body: crate::problem::Body<RefreshRequest>) -> Result<StatusCode, ApiError> {
    let hash = sha256_hex(body.0.refresh_token.as_bytes());
    let r = sqlx::query(
        "UPDATE identity_refresh_tokens SET revoked_at = now() WHERE family_id = (SELECT family_id FROM identity_refresh_tokens WHERE token_hash = $1)
         AND revoked_at IS NULL",
    )
    .bind(&hash)
    .execute(&s.pool)
    .await
    .map_err(ApiError::db)?;
    if r.rows_affected() == 0 {
        return Err(ApiError::InvalidRefreshToken);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The public keys that verify access tokens.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "identity", responses((status = 200, description = "JWKS (RFC 7517)")))]
pub async fn jwks(State(s): State<Arc<AppState>>) -> ([(header::HeaderName, &'static str); 1], Json<JwkSet>) {
    ([(header::CACHE_CONTROL, "public, max-age=60")], Json(s.keys.jwks()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defect 9 of issue 15: callers that give up (a client that closed its
    /// socket drops its handler) must not free the permit of a hash that is
    /// still running. With the permit held by the caller's future, every
    /// caller that gave up let the next hash start beside its own: 20 callers
    /// that each wait 10 ms for a 150 ms hash ran ~20 at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_keeps_the_permit_until_its_hash_ends() {
        let metrics = ServiceMetrics::new("command_api");
        let hashing = Hashing::new(2, &metrics);
        let mut callers = Vec::new();
        for _ in 0..20 {
            let h = hashing.clone();
            callers.push(tokio::spawn(async move {
                let slow_hash = || std::thread::sleep(Duration::from_millis(150));
                let _ = tokio::time::timeout(Duration::from_millis(10), h.run(Duration::from_secs(10), slow_hash)).await;
            }));
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        for c in callers {
            c.await.expect("caller");
        }
        // Every hash that started runs to its end.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hashing.running.get() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(hashing.running.get(), 0);
        let peak = hashing.peak.get();
        assert!((1..=2).contains(&peak), "at most 2 hashes at once, saw {peak}");
        let text = metrics.render();
        assert!(text.contains("homelink_command_api_password_hashes_running 0"), "{text}");
        assert!(text.contains(&format!("homelink_command_api_password_hashes_running_peak {peak}")), "{text}");
    }

    #[tokio::test]
    async fn no_permit_within_the_wait_is_busy() {
        let hashing = Hashing::new(1, &ServiceMetrics::new("command_api"));
        let h = hashing.clone();
        let first = tokio::spawn(async move { h.run(Duration::from_secs(1), || std::thread::sleep(Duration::from_millis(300))).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(hashing.run(Duration::from_millis(10), || ()).await, Err(ApiError::Busy(_))));
        assert_eq!(hashing.busy.get(), 1);
        first.await.expect("first").expect("hashed");
        assert!(hashing.run(Duration::from_millis(10), || ()).await.is_ok());
    }
}
