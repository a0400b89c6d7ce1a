//! `household_snapshots`: stored folds of a household's past (query-api's
//! `householdAt`), derived from the log and safe to delete.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// A stored fold: the state at `at` and where the log continues after it.
#[derive(Debug, sqlx::FromRow)]
pub struct Snapshot {
    pub at: DateTime<Utc>,
    pub cursor: String,
    pub events: i64,
    pub state: Value,
}

/// The latest snapshot of `household` at or before `at`.
pub async fn latest_at_or_before(pool: &PgPool, household: Uuid, at: DateTime<Utc>) -> Result<Option<Snapshot>, sqlx::Error> {
    sqlx::query_as(
        r#"SELECT at, "cursor", events, state FROM household_snapshots
           WHERE household_id = $1 AND at <= $2 ORDER BY at DESC LIMIT 1"#,
    )
    .bind(household)
    .bind(at)
    .fetch_optional(pool)
    .await
}

/// Stores a snapshot (a second one for the same instant is the same fold: kept once).
pub async fn store(pool: &PgPool, household: Uuid, s: &Snapshot) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"INSERT INTO household_snapshots (household_id, at, "cursor", events, state) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (household_id, at) DO NOTHING"#,
    )
    .bind(household)
    .bind(s.at)
    .bind(&s.cursor)
    .bind(s.events)
    .bind(&s.state)
    .execute(pool)
    .await
    .map(|_| ())
}
