//! Who is asking: the authenticated caller (and their client, for the audit
//! log) as an extractor, and path ids.

use crate::auth::Authenticated;
use crate::problem::ApiError;
use crate::AppState;
use axum::http::request::Parts;
use homelink_events::{Actor, RequestMeta, Role};
use std::sync::Arc;
use uuid::Uuid;

/// Who is asking, as the audit log records it.
#[derive(Debug, Clone)]
pub struct Requester {
    pub user: Uuid,
    pub client: Option<String>,
}

impl Requester {
    pub fn actor(&self) -> Actor {
        Actor::User(self.user.to_string())
    }

    pub fn meta(&self, role: Option<Role>) -> RequestMeta {
        RequestMeta { role, client: self.client.clone() }
    }
}

/// Extracts the authenticated caller and their client.
pub struct Caller(pub Requester);

impl axum::extract::FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let Authenticated(c) = Authenticated::from_request_parts(parts, s).await?;
        Ok(Caller(Requester { user: c.user_id, client: crate::auth::client_of(parts) }))
    }
}

/// A parsed path id; a malformed one is simply a resource that does not exist.
pub fn path_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::NotFound)
}
