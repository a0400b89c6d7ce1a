//! `device_commands`: each command's lifecycle, from the request to its
//! confirmation, with the time of every step.
//!
//! | status | rank | set by |
//! |---|---|---|
//! | `requested` / `queued` (device offline when accepted) | 0 / 1 | `DeviceCommandRequested` |
//! | `delivered` | 2 | `DeviceCommandDelivered` (the broker took it for a connected device) |
//! | `ok` / `rejected` / `failed` | 3 | `DeviceCommandAcked` |
//! | `expired` | 3 | `DeviceCommandExpired` (the bridge's timer) |
//! | `superseded` | 3 | a newer request setting every one of its capabilities before it was acked |
//! | `confirmed` | 4 | a report carrying every value it set ([`confirm`], from the shadow fold) |
//!
//! The status only moves to a higher rank, whatever order the paths deliver
//! in; every step's time is recorded even when it no longer changes the
//! status (an ack arriving after the expiry keeps `acked_at` and `ack_status`).

use chrono::{DateTime, Utc};
use homelink_events::event::{DeviceCommandAcked, DeviceCommandDelivered, DeviceCommandExpired, DeviceCommandRequested};
use homelink_events::topics::CommandChanged;
use homelink_events::Event;
use homelink_kit::push::Located;
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
                let (status, rank): (&str, i16) = if *queued { ("queued", 1) } else { ("requested", 0) };
                sqlx::query(
                    r#"INSERT INTO device_commands (command_id, household_id, device_id, set_values, status, status_rank, actor, requested_at, expires_at, queued)
                       VALUES ($1, $2, $3, $4, $8, $9, $5, $6, $7, $10)
                       ON CONFLICT (command_id) DO UPDATE SET set_values = EXCLUDED.set_values, actor = EXCLUDED.actor,
                         requested_at = EXCLUDED.requested_at, expires_at = EXCLUDED.expires_at, queued = EXCLUDED.queued,
                         status = CASE WHEN device_commands.status_rank < EXCLUDED.status_rank THEN EXCLUDED.status ELSE device_commands.status END,
                         status_rank = GREATEST(device_commands.status_rank, EXCLUDED.status_rank)"#,
                )
                .bind(command_id)
                .bind(env.household_id)
                .bind(device_id)
                .bind(Value::Object(set.clone()))
                .bind(serde_json::to_value(&env.actor).unwrap_or(Value::Null))
                .bind(env.occurred_at)
                .bind(expires_at)
                .bind(status)
                .bind(rank)
                .bind(queued)
                .execute(&mut **tx)
                .await?;
                let keys: Vec<&String> = set.keys().collect();
                // Older open commands of the device all of whose capabilities this one sets…
                let superseded: Vec<Uuid> = sqlx::query_scalar(
                    r#"UPDATE device_commands o SET status = 'superseded', status_rank = 3,
                         superseded_at = COALESCE(o.superseded_at, $4), superseded_by = COALESCE(o.superseded_by, $2)
                       WHERE o.device_id = $1 AND o.command_id <> $2 AND o.status_rank < 3 AND o.requested_at < $4
                         AND NOT EXISTS (SELECT 1 FROM jsonb_object_keys(o.set_values) AS k WHERE k <> ALL($3::text[]))
                       RETURNING o.command_id"#,
                )
                .bind(device_id)
                .bind(command_id)
                .bind(&keys)
                .bind(env.occurred_at)
                .fetch_all(&mut **tx)
                .await?;
                touched.extend(superseded);
                // …and this one, when a newer one was applied before it.
                sqlx::query(
                    r#"UPDATE device_commands c SET status = 'superseded', status_rank = 3,
                         superseded_at = COALESCE(c.superseded_at, n.requested_at), superseded_by = COALESCE(c.superseded_by, n.command_id)
                       FROM (SELECT command_id, requested_at FROM device_commands
                              WHERE device_id = $1 AND command_id <> $2 AND requested_at > $4 AND set_values ?& $3::text[]
                              ORDER BY requested_at LIMIT 1) n
                       WHERE c.command_id = $2 AND c.status_rank < 3"#,
                )
                .bind(device_id)
                .bind(command_id)
                .bind(&keys)
                .bind(env.occurred_at)
                .execute(&mut **tx)
                .await?;
            }
            Event::DeviceCommandDelivered(DeviceCommandDelivered { command_id, device_id }) => {
                step(tx, *command_id, env.household_id, *device_id, Step::Delivered, env.occurred_at).await?;
            }
            Event::DeviceCommandExpired(DeviceCommandExpired { command_id, device_id, .. }) => {
                step(tx, *command_id, env.household_id, *device_id, Step::Expired, env.occurred_at).await?;
            }
            Event::DeviceCommandAcked(DeviceCommandAcked { command_id, device_id, status, reason }) => {
                sqlx::query(
                    r#"INSERT INTO device_commands (command_id, household_id, device_id, status, status_rank, reason, acked_at, ack_status)
                       VALUES ($1, $2, $3, $4, 3, $5, $6, $4)
                       ON CONFLICT (command_id) DO UPDATE SET
                         status = CASE WHEN device_commands.status_rank < 3 THEN EXCLUDED.status ELSE device_commands.status END,
                         status_rank = GREATEST(device_commands.status_rank, 3),
                         reason = COALESCE(device_commands.reason, EXCLUDED.reason),
                         acked_at = COALESCE(device_commands.acked_at, EXCLUDED.acked_at),
                         ack_status = COALESCE(device_commands.ack_status, EXCLUDED.ack_status)
                       WHERE device_commands.device_id = EXCLUDED.device_id"#,
                )
                .bind(command_id)
                .bind(env.household_id)
                .bind(device_id)
                .bind(status.as_str())
                .bind(reason)
                .bind(env.occurred_at)
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
        _ => None,
    }
}

/// The statuses of the commands a batch touched, as the batch leaves them:
/// one change each for the household subscription.
pub async fn changed(tx: &mut Transaction<'_, Postgres>, touched: &[Uuid]) -> Result<Vec<CommandChanged>, sqlx::Error> {
    if touched.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Uuid, Uuid, Uuid, String)> = sqlx::query_as(
        "SELECT household_id, device_id, command_id, status FROM device_commands WHERE command_id = ANY($1) ORDER BY command_id",
    )
    .bind(touched)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(household_id, device_id, command_id, status)| CommandChanged { household_id, device_id, command_id, status, change_seq: 0 })
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
        Step::Delivered => ("delivered", 2i16, "delivered_at"),
        Step::Expired => ("expired", 3i16, "expired_at"),
    };
    let sql = format!(
        r#"INSERT INTO device_commands (command_id, household_id, device_id, status, status_rank, {column})
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (command_id) DO UPDATE SET
             status = CASE WHEN device_commands.status_rank < EXCLUDED.status_rank THEN EXCLUDED.status ELSE device_commands.status END,
             status_rank = GREATEST(device_commands.status_rank, EXCLUDED.status_rank),
             {column} = COALESCE(device_commands.{column}, EXCLUDED.{column})
           WHERE device_commands.device_id = EXCLUDED.device_id"#
    );
    sqlx::query(&sql).bind(command_id).bind(household_id).bind(device_id).bind(status).bind(rank).bind(at).execute(&mut **tx).await?;
    Ok(())
}

/// Commands whose values a report has now carried: `confirmed`, unless it
/// already ended otherwise (rejected, failed, expired, superseded).
pub async fn confirm(tx: &mut Transaction<'_, Postgres>, confirmed: &[(Uuid, DateTime<Utc>)]) -> Result<(), sqlx::Error> {
    if confirmed.is_empty() {
        return Ok(());
    }
    let (ids, ats): (Vec<Uuid>, Vec<DateTime<Utc>>) = confirmed.iter().copied().unzip();
    sqlx::query(
        r#"UPDATE device_commands c SET status = 'confirmed', status_rank = 4, confirmed_at = COALESCE(c.confirmed_at, u.at)
           FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, at)
           WHERE c.command_id = u.id AND (c.status_rank < 3 OR c.status = 'ok')"#,
    )
    .bind(&ids)
    .bind(&ats)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
