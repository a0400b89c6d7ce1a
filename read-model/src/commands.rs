//! Device commands as the device bridge reads them back from
//! `device_commands`: whether one is known, a device's open ones (the
//! offline queue), what the sweeps take (expiry; a scene's or automation's
//! command left unanswered or unconfirmed), and which of a batch need not
//! go out again; and, for command-api, a sender's open ones (revoked when
//! their role no longer allows them).
//!
//! A rank is written into a statement, not bound, where a partial index of
//! `device_commands` (`status_rank < 2`, `< 3`) must serve it: the planner
//! uses one only when it sees the number.

use crate::lifecycle::Rank;
use crate::locks::Lock;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::{PgPool, Row};
use std::time::Duration;
use uuid::Uuid;

/// A command's request as stored: enough to publish it again.
#[derive(Debug, Clone)]
pub struct StoredCommand {
    pub command_id: Uuid,
    pub household_id: Uuid,
    pub device_id: Uuid,
    pub set: Map<String, Value>,
    pub expires_at: DateTime<Utc>,
    pub requested_at: Option<DateTime<Utc>>,
    /// Who sent it (an `events::Actor` as JSON), authorized again before it goes out.
    pub actor: Option<Value>,
    /// What it was sent for (a scene's activation, an automation's run), when read.
    pub caused_by: Option<Uuid>,
}

fn stored(r: &sqlx::postgres::PgRow) -> Option<StoredCommand> {
    let Value::Object(set) = r.get::<Value, _>("set_values") else { return None };
    Some(StoredCommand {
        command_id: r.get("command_id"),
        household_id: r.get("household_id"),
        device_id: r.get("device_id"),
        set,
        expires_at: r.get("expires_at"),
        requested_at: r.get("requested_at"),
        actor: r.get("actor"),
        caused_by: r.try_get("caused_by").ok().flatten(),
    })
}

/// Whether the read model knows `command` as a request to `device`.
pub async fn is_known(pool: &PgPool, command: Uuid, device: Uuid) -> Result<bool, sqlx::Error> {
    let known: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM device_commands WHERE command_id = $1 AND device_id = $2 AND set_values IS NOT NULL")
            .bind(command)
            .bind(device)
            .fetch_optional(pool)
            .await?;
    Ok(known.is_some())
}

/// The device's newest `limit` open commands (requested or queued, not
/// delivered, not expired), oldest first: its offline queue.
pub async fn open_for_device(pool: &PgPool, household: Uuid, device: Uuid, limit: i64) -> Result<Vec<StoredCommand>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT * FROM (SELECT command_id, household_id, device_id, set_values, expires_at, requested_at, actor FROM device_commands
          WHERE device_id = $1 AND household_id = $2 AND status_rank < {open} AND expires_at > now() AND set_values IS NOT NULL
          ORDER BY requested_at DESC LIMIT $3) newest ORDER BY requested_at",
        open = Rank::Delivered.value()
    ))
    .bind(device)
    .bind(household)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().filter_map(stored).collect())
}

/// Runs `query` under a sweep's advisory lock (`None`: another bridge holds it).
async fn under_lock(
    pool: &PgPool,
    lock: Lock,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<Option<Vec<sqlx::postgres::PgRow>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(lock.key()).fetch_one(&mut *tx).await?;
    if !mine {
        return Ok(None);
    }
    let rows = query.fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(Some(rows))
}

/// For the expiry sweep, under its lock: open commands (and those acked
/// `ok`, not confirmed) past their expiry, not in `skip` (expired a moment
/// ago, not applied yet), at most 1,000: command, household, device, expiry.
pub async fn due_for_expiry(pool: &PgPool, skip: &[Uuid]) -> Result<Option<Vec<(Uuid, Uuid, Uuid, DateTime<Utc>)>>, sqlx::Error> {
    let sql = format!(
        "SELECT command_id, household_id, device_id, expires_at FROM device_commands
          WHERE expired_at IS NULL AND (status_rank < {ended} OR status = 'ok') AND expires_at <= now() AND command_id <> ALL($1)
          ORDER BY expires_at LIMIT 1000",
        ended = Rank::Ended.value()
    );
    let rows = under_lock(pool, Lock::ExpirySweep, sqlx::query(&sql).bind(skip)).await?;
    Ok(rows.map(|rows| rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()))
}

/// For the resend sweep, under its lock: commands with a cause (a scene's,
/// an automation's) delivered more than `after` ago and not answered, alive
/// for a second more, not in `skip`, at most 200.
pub async fn unanswered(pool: &PgPool, after: Duration, skip: &[Uuid]) -> Result<Option<Vec<StoredCommand>>, sqlx::Error> {
    let sql = format!(
        "SELECT command_id, household_id, device_id, set_values, expires_at, requested_at, actor FROM device_commands
          WHERE status_rank = {delivered} AND caused_by IS NOT NULL AND set_values IS NOT NULL
            AND expires_at > now() + interval '1 second' AND delivered_at < now() - make_interval(secs => $1)
            AND command_id <> ALL($2)
          ORDER BY delivered_at LIMIT 200",
        delivered = Rank::Delivered.value()
    );
    let rows = under_lock(pool, Lock::ResendSweep, sqlx::query(&sql).bind(after.as_secs_f64()).bind(skip)).await?;
    Ok(rows.map(|rows| rows.iter().filter_map(stored).collect()))
}

/// For the resend sweep, under its lock: commands with a cause acked `ok`
/// more than `after` ago whose reports have not shown their values (the
/// device reported something else, or nothing), not superseded, alive for a
/// second more, not in `skip`, at most 200.
pub async fn unconfirmed(pool: &PgPool, after: Duration, skip: &[Uuid]) -> Result<Option<Vec<StoredCommand>>, sqlx::Error> {
    let sql = "SELECT command_id, household_id, device_id, set_values, expires_at, requested_at, actor, caused_by FROM device_commands
          WHERE caused_by IS NOT NULL AND ack_status = 'ok' AND confirmed_at IS NULL AND expired_at IS NULL AND superseded_at IS NULL
            AND set_values IS NOT NULL AND acked_at < now() - make_interval(secs => $1)
            AND expires_at > now() + interval '1 second' AND command_id <> ALL($2)
          ORDER BY acked_at LIMIT 200";
    let rows = under_lock(pool, Lock::ResendSweep, sqlx::query(sql).bind(after.as_secs_f64()).bind(skip)).await?;
    Ok(rows.map(|rows| rows.iter().filter_map(stored).collect()))
}

/// Which of `ids` the read model knows as commands.
pub async fn known(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT command_id FROM device_commands WHERE command_id = ANY($1) AND set_values IS NOT NULL")
        .bind(ids)
        .fetch_all(pool)
        .await
}

/// Which of `ids` were delivered or ended (superseded, expired, answered):
/// they need not go out again.
pub async fn delivered_or_ended(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT command_id FROM device_commands WHERE command_id = ANY($1) AND status_rank >= $2")
        .bind(ids)
        .bind(Rank::Delivered.value())
        .fetch_all(pool)
        .await
}

/// An open command of a sender, with what decides whether they may still
/// send it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SentCommand {
    pub command_id: Uuid,
    pub device_id: Uuid,
    pub set_values: Option<Value>,
    /// The device's kind.
    pub kind: String,
    /// The sender's role in the household now (`None`: no longer a member).
    pub role: Option<String>,
}

/// For command-api, after a membership change of `user` in `household`:
/// the open commands `user` sent there (not delivered yet, not expired).
pub async fn open_of_sender(pool: &PgPool, household: Uuid, user: Uuid) -> Result<Vec<SentCommand>, sqlx::Error> {
    // The rank in the statement, not bound: the planner sees it (partial indexes).
    let sql = format!(
        "SELECT c.command_id, c.device_id, c.set_values, d.kind, m.role FROM device_commands c
           JOIN devices d ON d.device_id = c.device_id
           LEFT JOIN household_members m ON m.household_id = c.household_id AND m.user_id = $2
         WHERE c.household_id = $1 AND c.status_rank < {open} AND c.expires_at > now()
           AND c.actor->>'kind' = 'user' AND c.actor->>'id' = $2::text",
        open = Rank::Delivered.value()
    );
    sqlx::query_as(&sql).bind(household).bind(user).fetch_all(pool).await
}
