//! The household aggregate as the read models hold it: command-api decides
//! household commands against it.

use homelink_events::household::{Automation, Household, Invitation, Presence, RegisteredDevice, Role};
use homelink_events::scene::Scene;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// The household aggregate as the read models hold it, with its members and
/// (when asked for) one invitation.
pub async fn load_household(db: &mut PgConnection, household: Uuid, invitation: Option<Uuid>) -> Result<Household, sqlx::Error> {
    let mut h = Household::default();
    let Some(row) =
        sqlx::query("SELECT version, time_zone FROM households WHERE household_id = $1").bind(household).fetch_optional(&mut *db).await?
    else {
        return Ok(h);
    };
    h.exists = true;
    h.version = row.get::<i64, _>(0).max(0) as u64;
    h.time_zone = row.get(1);
    let automations = sqlx::query("SELECT automation_id, name, enabled, created_by, definition FROM automations WHERE household_id = $1")
        .bind(household)
        .fetch_all(&mut *db)
        .await?;
    for r in automations {
        if let Ok(definition) = serde_json::from_value(r.get::<serde_json::Value, _>(4)) {
            h.automations.insert(r.get(0), Automation { name: r.get(1), enabled: r.get(2), created_by: r.get(3), definition });
        }
    }
    let members = sqlx::query("SELECT user_id, role, presence FROM household_members WHERE household_id = $1")
        .bind(household)
        .fetch_all(&mut *db)
        .await?;
    for m in members {
        if let Ok(role) = m.get::<String, _>(1).parse::<Role>() {
            h.members.insert(m.get(0), role);
        }
        if let Some(Ok(p)) = m.get::<Option<String>, _>(2).map(|p| p.parse::<Presence>()) {
            h.presence.insert(m.get(0), p);
        }
    }
    let scenes = sqlx::query("SELECT scene_id, name, devices, child_allowed FROM scenes WHERE household_id = $1")
        .bind(household)
        .fetch_all(&mut *db)
        .await?;
    for r in scenes {
        if let Ok(targets) = serde_json::from_value(r.get::<serde_json::Value, _>(2)) {
            h.scenes.insert(r.get(0), Scene { name: r.get(1), targets, child_allowed: r.get(3) });
        }
    }
    let rooms = sqlx::query("SELECT room_id, name FROM rooms WHERE household_id = $1").bind(household).fetch_all(&mut *db).await?;
    for r in rooms {
        h.rooms.insert(r.get(0), r.get(1));
    }
    let devices = sqlx::query("SELECT device_id, kind, room_id, removed_at IS NOT NULL FROM devices WHERE household_id = $1")
        .bind(household)
        .fetch_all(&mut *db)
        .await?;
    for d in devices {
        if let Ok(kind) = d.get::<String, _>(1).parse() {
            h.devices.insert(d.get(0), RegisteredDevice { kind, room_id: d.get(2), removed: d.get(3) });
        }
    }
    if let Some(inv) = invitation {
        let row = sqlx::query(
            "SELECT role, code_hash, expires_at, used_by IS NOT NULL FROM household_invitations WHERE invitation_id = $1 AND household_id = $2",
        )
        .bind(inv)
        .bind(household)
        .fetch_optional(&mut *db)
        .await?;
        if let Some(r) = row {
            if let Ok(role) = r.get::<String, _>(0).parse::<Role>() {
                h.invitations.insert(inv, Invitation { role, code_hash: r.get(1), expires_at: r.get(2), used: r.get(3) });
            }
        }
    }
    Ok(h)
}
