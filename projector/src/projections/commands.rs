//! `device_commands`: each command's lifecycle, from the request to the
//! device's acknowledgement.

use homelink_events::event::{DeviceCommandAcked, DeviceCommandRequested};
use homelink_events::Event;
use homelink_kit::push::Located;
use serde_json::Value;
use sqlx::{Postgres, Transaction};

/// Command lifecycle: requested (rank 0) → acked ok / rejected / failed (rank 2).
/// Status only moves forward, whatever order the two paths deliver in.
pub async fn apply(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)]) -> Result<(), sqlx::Error> {
    for (l, ev) in work {
        let env = &l.envelope;
        match ev {
            Event::DeviceCommandRequested(DeviceCommandRequested { command_id, device_id, set, expires_at }) => {
                sqlx::query(
                    r#"INSERT INTO device_commands (command_id, household_id, device_id, set_values, status, status_rank, actor, requested_at, expires_at)
                       VALUES ($1, $2, $3, $4, 'requested', 0, $5, $6, $7)
                       ON CONFLICT (command_id) DO UPDATE SET set_values = EXCLUDED.set_values, actor = EXCLUDED.actor,
                         requested_at = EXCLUDED.requested_at, expires_at = EXCLUDED.expires_at"#,
                )
                .bind(command_id)
                .bind(env.household_id)
                .bind(device_id)
                .bind(Value::Object(set.clone()))
                .bind(serde_json::to_value(&env.actor).unwrap_or(Value::Null))
                .bind(env.occurred_at)
                .bind(expires_at)
                .execute(&mut **tx)
                .await?;
            }
            Event::DeviceCommandAcked(DeviceCommandAcked { command_id, device_id, status, reason }) => {
                sqlx::query(
                    r#"INSERT INTO device_commands (command_id, household_id, device_id, status, status_rank, reason, acked_at)
                       VALUES ($1, $2, $3, $4, 2, $5, $6)
                       ON CONFLICT (command_id) DO UPDATE SET status = EXCLUDED.status, status_rank = 2, reason = EXCLUDED.reason, acked_at = EXCLUDED.acked_at
                       WHERE device_commands.status_rank < 2 AND device_commands.device_id = EXCLUDED.device_id"#,
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
    Ok(())
}
