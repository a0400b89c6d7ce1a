//! `device_commands`: each command's lifecycle, from the request to its
//! confirmation, with the time of every step.
//!
//! Each event records its step's columns only (times the earliest seen,
//! the earliest ack's status), and the status is then derived from the
//! columns by one rule, [`STATUS`], so it is a function of the set of the
//! command's events, never of their arrival order (issue 15):
//!
//! | status | rank ([`Rank`]) | when |
//! |---|---|---|
//! | `confirmed` | 4 | the shadow fold confirmed it: acked `ok` and every value reported after the ack ([`confirm`]) |
//! | `ok` / `rejected` / `failed` | 3 | the device acked it (its word beats the platform's) |
//! | `rejected` (by the platform) | 3 | `DeviceCommandRevoked`: its sender may no longer send it |
//! | `superseded` | 3 | a newer request, before its expiry, sets every one of its capabilities |
//! | `expired` | 3 | `DeviceCommandExpired` (the bridge's timer) |
//! | `delivered` | 2 | `DeviceCommandDelivered` (the broker took it for a connected device) |
//! | `requested` / `queued` (device offline when accepted) | 0 / 1 | `DeviceCommandRequested` |
//!
//! The first row that holds decides. Superseded is set-based too: a command's
//! `superseded_by` is the earliest newer covering request, whichever of the
//! two arrived first.

use chrono::{DateTime, Utc};
use homelink_events::event::{
    DeviceCommandAcked, DeviceCommandDelivered, DeviceCommandExpired, DeviceCommandRequested, DeviceCommandRevoked,
};
use homelink_events::topics::CommandChanged;
use homelink_events::Event;
use homelink_kit::reader::Located;
use homelink_read_model::lifecycle::Rank;
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// Returns the commands whose rows the batch touched (their statuses are
/// read once the batch's confirmations are in: [`changed`]).
pub async fn apply(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)]) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut touched: Vec<Uuid> = Vec::new();
    for (l, ev) in work {
        if let Some(id) = command_of(ev) {
            touched.push(id);
        }
        let env = &l.envelope;
        match ev {
            Event::DeviceCommandRequested(DeviceCommandRequested { command_id, device_id, set, expires_at, queued }) => {
                let (status, rank) = if *queued { ("queued", Rank::Queued) } else { ("requested", Rank::Requested) };
                sqlx::query(
                    r#"INSERT INTO device_commands (command_id, household_id, device_id, set_values, status, status_rank, actor, requested_at, expires_at, queued,
                                                   caused_by)
                       VALUES ($1, $2, $3, $4, $8, $9, $5, $6, $7, $10, $11)
                       ON CONFLICT (command_id) DO UPDATE SET set_values = EXCLUDED.set_values, actor = EXCLUDED.actor,
                         requested_at = EXCLUDED.requested_at, expires_at = EXCLUDED.expires_at, queued = EXCLUDED.queued,
                         caused_by = EXCLUDED.caused_by
                       WHERE device_commands.device_id = EXCLUDED.device_id"#,
                )
                .bind(command_id)
                .bind(env.household_id)
                .bind(device_id)
                .bind(Value::Object(set.clone()))
                .bind(serde_json::to_value(&env.actor).unwrap_or(Value::Null))
                .bind(env.occurred_at)
                .bind(expires_at)
                .bind(status)
                .bind(rank.value())
                .bind(queued)
                .bind(env.causation_id)
                .execute(&mut **tx)
                .await?;
                let keys: Vec<&String> = set.keys().collect();
                // Older commands of the device, not expired by this request's
                // time, all of whose capabilities this one sets: superseded by
                // the earliest such newer request…
                let superseded: Vec<Uuid> = sqlx::query_scalar(
                    r#"UPDATE device_commands o SET superseded_at = $4, superseded_by = $2
                       WHERE o.device_id = $1 AND o.command_id <> $2 AND o.set_values IS NOT NULL
                         AND (o.requested_at, o.command_id) < ($4, $2) AND $4 < o.expires_at
                         AND NOT EXISTS (SELECT 1 FROM jsonb_object_keys(o.set_values) AS k WHERE k <> ALL($3::text[]))
                         AND (o.superseded_at IS NULL OR (o.superseded_at, o.superseded_by) > ($4, $2))
                       RETURNING o.command_id"#,
                )
                .bind(device_id)
                .bind(command_id)
                .bind(&keys)
                .bind(env.occurred_at)
                .fetch_all(&mut **tx)
                .await?;
                touched.extend(superseded);
                // …and this one, when a newer one arrived before it.
                sqlx::query(
                    r#"UPDATE device_commands c SET superseded_at = n.requested_at, superseded_by = n.command_id
                       FROM (SELECT command_id, requested_at FROM device_commands
                              WHERE device_id = $1 AND command_id <> $2 AND (requested_at, command_id) > ($4, $2) AND requested_at < $5
                                AND set_values ?& $3::text[]
                              ORDER BY requested_at, command_id LIMIT 1) n
                       WHERE c.command_id = $2
                         AND (c.superseded_at IS NULL OR (c.superseded_at, c.superseded_by) > (n.requested_at, n.command_id))"#,
                )
                .bind(device_id)
                .bind(command_id)
                .bind(&keys)
                .bind(env.occurred_at)
                .bind(expires_at)
                .execute(&mut **tx)
                .await?;
            }
            Event::DeviceCommandDelivered(DeviceCommandDelivered { command_id, device_id }) => {
                step(tx, *command_id, env.household_id, *device_id, Step::Delivered, env.occurred_at).await?;
            }
            Event::DeviceCommandExpired(DeviceCommandExpired { command_id, device_id, .. }) => {
                step(tx, *command_id, env.household_id, *device_id, Step::Expired, env.occurred_at).await?;
            }
            Event::SceneActivated(a) => {
                sqlx::query(
                    "INSERT INTO scene_activations (activation_id, household_id, scene_id, actor, at, commands, skipped)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (activation_id) DO NOTHING",
                )
                .bind(a.activation_id)
                .bind(env.household_id)
                .bind(a.scene_id)
                .bind(serde_json::to_value(&env.actor).unwrap_or(Value::Null))
                .bind(env.occurred_at)
                .bind(serde_json::to_value(&a.commands).unwrap_or(Value::Null))
                .bind(serde_json::to_value(&a.skipped).unwrap_or(Value::Null))
                .execute(&mut **tx)
                .await?;
            }
            Event::DeviceCommandRevoked(DeviceCommandRevoked { command_id, device_id, reason, .. }) => {
                // The reason shown is the device's when it acked, else the revocation's.
                sqlx::query(
                    r#"INSERT INTO device_commands (command_id, household_id, device_id, status, status_rank, reason, revoked_at)
                       VALUES ($1, $2, $3, 'rejected', $6, $4, $5)
                       ON CONFLICT (command_id) DO UPDATE SET
                         reason = CASE WHEN device_commands.ack_status IS NULL
                                        AND (device_commands.revoked_at IS NULL OR EXCLUDED.revoked_at < device_commands.revoked_at)
                                       THEN EXCLUDED.reason ELSE device_commands.reason END,
                         revoked_at = LEAST(device_commands.revoked_at, EXCLUDED.revoked_at)
                       WHERE device_commands.device_id = EXCLUDED.device_id"#,
                )
                .bind(command_id)
                .bind(env.household_id)
                .bind(device_id)
                .bind(reason)
                .bind(env.occurred_at)
                .bind(Rank::Ended.value())
                .execute(&mut **tx)
                .await?;
            }
            Event::DeviceCommandAcked(DeviceCommandAcked { command_id, device_id, status, reason }) => {
                sqlx::query(
                    // The earliest ack decides (then the lowest status name, for equal times).
                    r#"INSERT INTO device_commands (command_id, household_id, device_id, status, status_rank, reason, acked_at, ack_status)
                       VALUES ($1, $2, $3, $4, $7, $5, $6, $4)
                       ON CONFLICT (command_id) DO UPDATE SET
                         reason = CASE WHEN (device_commands.ack_status IS NULL OR (EXCLUDED.acked_at, EXCLUDED.ack_status) < (device_commands.acked_at, device_commands.ack_status))
                                       THEN EXCLUDED.reason ELSE device_commands.reason END,
                         ack_status = CASE WHEN (device_commands.ack_status IS NULL OR (EXCLUDED.acked_at, EXCLUDED.ack_status) < (device_commands.acked_at, device_commands.ack_status))
                                           THEN EXCLUDED.ack_status ELSE device_commands.ack_status END,
                         acked_at = LEAST(device_commands.acked_at, EXCLUDED.acked_at)
                       WHERE device_commands.device_id = EXCLUDED.device_id"#,
                )
                .bind(command_id)
                .bind(env.household_id)
                .bind(device_id)
                .bind(status.as_str())
                .bind(reason)
                .bind(env.occurred_at)
                .bind(Rank::Ended.value())
                .execute(&mut **tx)
                .await?;
            }
            _ => {}
        }
    }
    Ok(touched)
}

fn command_of(ev: &Event) -> Option<Uuid> {
    match ev {
        Event::DeviceCommandRequested(c) => Some(c.command_id),
        Event::DeviceCommandDelivered(c) => Some(c.command_id),
        Event::DeviceCommandAcked(c) => Some(c.command_id),
        Event::DeviceCommandExpired(c) => Some(c.command_id),
        Event::DeviceCommandRevoked(c) => Some(c.command_id),
        _ => None,
    }
}

/// A command's status from its columns: the first row of the table in the
/// module documentation that holds.
pub const STATUS: &str = "CASE WHEN confirmed_at IS NOT NULL THEN 'confirmed'
       WHEN ack_status IS NOT NULL THEN ack_status
       WHEN revoked_at IS NOT NULL THEN 'rejected'
       WHEN superseded_at IS NOT NULL THEN 'superseded'
       WHEN expired_at IS NOT NULL THEN 'expired'
       WHEN delivered_at IS NOT NULL THEN 'delivered'
       WHEN queued THEN 'queued' ELSE 'requested' END";

/// The statuses of the commands a batch touched, as the batch leaves them
/// (derived again from their columns): one change each for the household
/// subscription.
pub async fn changed(tx: &mut Transaction<'_, Postgres>, touched: &[Uuid]) -> Result<Vec<CommandChanged>, sqlx::Error> {
    if touched.is_empty() {
        return Ok(Vec::new());
    }
    let rank = homelink_read_model::lifecycle::rank_sql();
    sqlx::query(&format!(
        "UPDATE device_commands SET status = {STATUS}, status_rank = {rank}
          WHERE command_id = ANY($1) AND (status, status_rank) IS DISTINCT FROM ({STATUS}, {rank})"
    ))
    .bind(touched)
    .execute(&mut **tx)
    .await?;
    let rows: Vec<(Uuid, Uuid, Uuid, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT household_id, device_id, command_id, status, caused_by FROM device_commands WHERE command_id = ANY($1) ORDER BY command_id",
    )
    .bind(touched)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(household_id, device_id, command_id, status, caused_by)| CommandChanged {
            household_id,
            device_id,
            command_id,
            status,
            change_seq: 0,
            caused_by,
        })
        .collect())
}

enum Step {
    Delivered,
    Expired,
}

/// Records a step that may arrive before the request itself (another path).
async fn step(
    tx: &mut Transaction<'_, Postgres>,
    command_id: Uuid,
    household_id: Uuid,
    device_id: Uuid,
    step: Step,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let (status, rank, column) = match step {
        Step::Delivered => ("delivered", Rank::Delivered, "delivered_at"),
        Step::Expired => ("expired", Rank::Ended, "expired_at"),
    };
    let sql = format!(
        r#"INSERT INTO device_commands (command_id, household_id, device_id, status, status_rank, {column})
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (command_id) DO UPDATE SET
             {column} = LEAST(device_commands.{column}, EXCLUDED.{column})
           WHERE device_commands.device_id = EXCLUDED.device_id"#
    );
    sqlx::query(&sql)
        .bind(command_id)
        .bind(household_id)
        .bind(device_id)
        .bind(status)
        .bind(rank.value())
        .bind(at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Commands the shadow fold confirmed (acked `ok`, every value reported
/// after the ack, never refused), with the time of the report that
/// completed each: the earliest is kept.
pub async fn confirm(tx: &mut Transaction<'_, Postgres>, confirmed: &[(Uuid, DateTime<Utc>)]) -> Result<(), sqlx::Error> {
    if confirmed.is_empty() {
        return Ok(());
    }
    let (ids, ats): (Vec<Uuid>, Vec<DateTime<Utc>>) = confirmed.iter().copied().unzip();
    sqlx::query(
        r#"UPDATE device_commands c SET confirmed_at = LEAST(c.confirmed_at, u.at)
           FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, at)
           WHERE c.command_id = u.id"#,
    )
    .bind(&ids)
    .bind(&ats)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
