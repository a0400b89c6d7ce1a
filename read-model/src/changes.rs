//! The household change feed as the query API's subscriptions read it back
//! (the projector writes `household_changes`, numbered per household without
//! a gap, and `household_change_seqs`, each household's last number): where
//! a resume may start, and the retained changes to replay.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// The number of the household's last committed change (`None`: none yet).
pub async fn last_seq(pool: &PgPool, household: Uuid) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT last_seq FROM household_change_seqs WHERE household_id = $1").bind(household).fetch_optional(pool).await
}

/// The number of the household's first retained change after `after`
/// (`None`: none retained).
pub async fn first_after(pool: &PgPool, household: Uuid, after: i64) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(change_seq) FROM household_changes WHERE household_id = $1 AND change_seq > $2")
        .bind(household)
        .bind(after)
        .fetch_one(pool)
        .await
}

/// Whether the household's change `seq` happened before `user` joined it;
/// also `true` when that change is not retained or `user` is no member.
pub async fn before_joining(pool: &PgPool, household: Uuid, seq: i64, user: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT c.at < m.joined_at FROM household_changes c
                                        JOIN household_members m ON m.household_id = c.household_id AND m.user_id = $3
                                       WHERE c.household_id = $1 AND c.change_seq = $2), true)",
    )
    .bind(household)
    .bind(seq)
    .bind(user)
    .fetch_one(pool)
    .await
}

/// A retained change: its kind (`shadow`, `registry`, `command`) and the
/// change as notified.
#[derive(Debug, sqlx::FromRow)]
pub struct ChangeRow {
    pub kind: String,
    pub change: Value,
}

/// The household's retained changes numbered `after + 1 ..= upto`, in order
/// (a number no longer retained is missing).
pub async fn between(pool: &PgPool, household: Uuid, after: i64, upto: i64) -> Result<Vec<ChangeRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kind, change FROM household_changes WHERE household_id = $1 AND change_seq > $2 AND change_seq <= $3 ORDER BY change_seq",
    )
    .bind(household)
    .bind(after)
    .bind(upto)
    .fetch_all(pool)
    .await
}
