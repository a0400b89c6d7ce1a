//! The audit log as the query API pages through it, newest first (the
//! projector writes `audit_log`). Owners only: the caller checks the role.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// One row of `audit_log`.
#[derive(Debug, sqlx::FromRow)]
pub struct AuditRow {
    pub event_id: Uuid,
    pub at: DateTime<Utc>,
    pub actor_kind: String,
    pub actor_id: String,
    pub role: Option<String>,
    pub client: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub status: i32,
    pub detail: Option<String>,
}

/// Which entries a page holds; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor_id: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<String>,
    /// From this time on (inclusive).
    pub since: Option<DateTime<Utc>>,
    /// Before this time.
    pub until: Option<DateTime<Utc>>,
    /// The previous page's last entry (at, id): the page starts after it.
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

/// A page of the household's audit log, newest first: the entries that pass
/// `filter`, at most `limit`.
pub async fn page(pool: &PgPool, household: Uuid, filter: &AuditFilter, limit: i64) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, at, actor_kind, actor_id, role, client, action, target, outcome, status, detail FROM audit_log
                 WHERE household_id = $1
                   AND ($2::text IS NULL OR actor_id = $2) AND ($3::text IS NULL OR action = $3) AND ($4::text IS NULL OR outcome = $4)
                   AND ($5::timestamptz IS NULL OR at >= $5) AND ($6::timestamptz IS NULL OR at < $6)
                   AND ($7::timestamptz IS NULL OR (at, event_id) < ($7, $8))
                 ORDER BY at DESC, event_id DESC LIMIT $9",
    )
    .bind(household)
    .bind(&filter.actor_id)
    .bind(&filter.action)
    .bind(&filter.outcome)
    .bind(filter.since)
    .bind(filter.until)
    .bind(filter.after.map(|a| a.0))
    .bind(filter.after.map(|a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Whether `user` was a member of `household` and is no longer one (their
/// removal or departure is in the audit log): such a caller knows the
/// household exists, so a refusal may say 403 instead of 404.
pub async fn is_former_member(pool: &PgPool, household: Uuid, user: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM audit_log WHERE household_id = $1 AND action IN ('member.remove', 'member.leave')
                          AND target = 'user/' || $2::text AND outcome = 'accepted')
            AND NOT EXISTS (SELECT 1 FROM household_members WHERE household_id = $1 AND user_id = $2)",
    )
    .bind(household)
    .bind(user)
    .fetch_one(pool)
    .await
}
