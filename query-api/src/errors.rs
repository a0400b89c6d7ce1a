//! Every error code this API answers with, in one place, and the
//! constructors resolvers use.

use async_graphql::ErrorExtensions;

/// Stable `extensions.code` values of the errors this API returns.
pub mod codes {
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const FORBIDDEN: &str = "FORBIDDEN";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const BAD_USER_INPUT: &str = "BAD_USER_INPUT";
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "TOO_MANY_SUBSCRIPTIONS";
    pub const TOO_MANY_ALIASES: &str = "TOO_MANY_ALIASES";
    pub const QUERY_TOO_DEEP: &str = "QUERY_TOO_DEEP";
    pub const QUERY_TOO_COMPLEX: &str = "QUERY_TOO_COMPLEX";
    /// A query that would read more rows than one request may
    /// ([`crate::reads::RowBudget`]); the whole request fails.
    pub const QUERY_TOO_EXPENSIVE: &str = "QUERY_TOO_EXPENSIVE";
    pub const GRAPHQL_VALIDATION_FAILED: &str = "GRAPHQL_VALIDATION_FAILED";
    pub const INTERNAL: &str = "INTERNAL";
    /// Answered before execution, over HTTP only.
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    pub const BATCH_NOT_SUPPORTED: &str = "BATCH_NOT_SUPPORTED";
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    /// A read given a consistency token the read models did not reach in time.
    pub const CONSISTENCY_TIMEOUT: &str = "CONSISTENCY_TIMEOUT";
    /// A subscription asked to resume after a change that is no longer retained.
    pub const RESUME_TOO_OLD: &str = "RESUME_TOO_OLD";
}

pub fn error(code: &'static str, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
}

pub fn unavailable(e: sqlx::Error) -> async_graphql::Error {
    tracing::warn!(error = %e, "read model query failed");
    error(codes::UNAVAILABLE, "the read models are unavailable")
}

pub fn not_found() -> async_graphql::Error {
    error(codes::NOT_FOUND, "no such household")
}
