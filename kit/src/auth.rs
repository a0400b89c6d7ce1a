//! Access-token verification, shared by every service that serves users.
//!
//! Tokens are JWTs signed with Ed25519 (`EdDSA`) by command-api, which
//! publishes its public keys as a JWKS document. A [`Verifier`] holds the
//! current key set and checks a token against it without any I/O: an unknown
//! `kid` is refused, never fetched, so a hostile token cannot make a service
//! call out. The key set is refreshed on a timer ([`Verifier::refresh_from`]);
//! command-api publishes a new key before it signs with it, so the timer is
//! always ahead of the first token that needs the new key.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use uuid::Uuid;

/// `iss` of every access token.
pub const ISSUER: &str = "https://homelink.dev/auth";
/// `aud` of every access token.
pub const AUDIENCE: &str = "homelink-app";
/// The only algorithm any key is used with.
pub const ALGORITHM: Algorithm = Algorithm::EdDSA;
/// Longest token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 4096;
/// Clock skew tolerated on `exp`/`iat`.
const LEEWAY_SECONDS: u64 = 5;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: String,
    pub exp: i64,
    pub iat: i64,
    /// The token's own id.
    pub jti: String,
}

/// An authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
}

/// A public key as published in the JWKS document (RFC 8037 OKP key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    /// The raw public key, base64url without padding.
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

impl Jwk {
    pub fn ed25519(kid: &str, x: &str) -> Self {
        Self { kty: "OKP".into(), crv: "Ed25519".into(), x: x.into(), kid: kid.into(), alg: "EdDSA".into(), use_: "sig".into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

/// Why a token was refused. Callers answer every variant with the same 401
/// and the same body; the variant goes to logs and metrics only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("unknown key id")]
    UnknownKey,
    #[error("invalid signature or claims: {0}")]
    Invalid(String),
}

/// A key id is short and plain; anything else is refused before a lookup.
pub fn valid_kid(kid: &str) -> bool {
    (1..=64).contains(&kid.len()) && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks access tokens against a key set.
#[derive(Clone, Default)]
pub struct Verifier {
    keys: Arc<RwLock<Arc<HashMap<String, DecodingKey>>>>,
}

impl Verifier {
    /// Replaces the key set; keys that are not Ed25519/EdDSA are ignored.
    pub fn set_keys(&self, set: &JwkSet) {
        let mut keys = HashMap::new();
        for k in &set.keys {
            if k.kty != "OKP" || k.crv != "Ed25519" || k.alg != "EdDSA" || !valid_kid(&k.kid) {
                continue;
            }
            if let Ok(d) = DecodingKey::from_ed_components(&k.x) {
                keys.insert(k.kid.clone(), d);
            }
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    pub fn key_count(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Verifies a token: algorithm pinned to EdDSA, known `kid`, signature,
    /// `iss`, `aud`, `exp`, `iat`, `sub` a user id.
    pub fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        let claims: Claims = self.decode(token, AUDIENCE)?;
        if claims.iat > chrono::Utc::now().timestamp() + LEEWAY_SECONDS as i64 {
            return Err(TokenError::Invalid("issued in the future".into()));
        }
        let user_id = Uuid::parse_str(&claims.sub).map_err(|_| TokenError::Invalid("subject".into()))?;
        Ok(Caller { user_id })
    }

    /// Verifies a consistency token ([`crate::consistency`]) like an access
    /// token, for its own audience; its writer is `sub`.
    pub fn verify_consistency(&self, token: &str) -> Result<(Uuid, crate::consistency::Claims), TokenError> {
        let claims: crate::consistency::Claims = self.decode(token, crate::consistency::AUDIENCE)?;
        let user = Uuid::parse_str(&claims.sub).map_err(|_| TokenError::Invalid("subject".into()))?;
        Ok((user, claims))
    }

    fn decode<C: serde::de::DeserializeOwned>(&self, token: &str, audience: &str) -> Result<C, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != ALGORITHM {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.filter(|k| valid_kid(k)).ok_or(TokenError::UnknownKey)?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let key = keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(ALGORITHM);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        v.leeway = LEEWAY_SECONDS;
        Ok(jsonwebtoken::decode::<C>(token, key, &v).map_err(|e| TokenError::Invalid(e.to_string()))?.claims)
    }

    /// Keeps the key set in step with a JWKS URL until `cancel`; the first
    /// successful fetch is awaited by callers through [`Verifier::key_count`].
    pub async fn refresh_from(self, http: reqwest::Client, url: String, every: Duration, cancel: crate::shutdown::CancellationToken) {
        loop {
            match http.get(&url).timeout(Duration::from_secs(5)).send().await {
                Ok(r) if r.status().is_success() => match r.json::<JwkSet>().await {
                    Ok(set) => self.set_keys(&set),
                    Err(e) => tracing::warn!(error = %e, %url, "undecodable JWKS"),
                },
                Ok(r) => tracing::warn!(status = %r.status(), %url, "JWKS fetch refused"),
                Err(e) => tracing::warn!(error = %e, %url, "JWKS fetch failed"),
            }
            let wait = if self.key_count() == 0 { Duration::from_millis(200) } else { every };
            tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(wait) => {} }
        }
    }
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}
