//! Households, members, invitations, rooms and the device registry in the
//! read models.
//!
//! Household-stream events are folded one by one in log order through the
//! pure aggregate ([`Household::apply`]), which refuses an event decided on a
//! stale version or breaking an invariant; a refused event changes nothing but
//! is recorded in `household_refused_events`. The same fold runs on every
//! rebuild, so the result is the same.

use homelink_events::household::Household;
use homelink_events::topics::{MembershipChanged, RegistryChanged, MEMBERSHIP_CHANGED_CHANNEL};
use homelink_events::Event;
use homelink_kit::reader::Located;
use homelink_read_model::load_household;
use sqlx::{Postgres, Transaction};
use std::collections::HashSet;
use uuid::Uuid;

pub struct Folded {
    /// `(channel, payload)` notifications to send on commit.
    pub notifications: Vec<(&'static str, String)>,
    /// Registry changes, announced once they have their change sequence numbers.
    pub registry: Vec<RegistryChanged>,
    /// Event ids the fold refused.
    pub refused: HashSet<Uuid>,
}

/// Applies the household-stream events of a batch in log order.
pub async fn fold(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)]) -> Result<Folded, sqlx::Error> {
    let mut out = Folded { notifications: Vec::new(), registry: Vec::new(), refused: HashSet::new() };
    for (l, ev) in work {
        let Some(he) = ev.household_event() else {
            continue;
        };
        let env = &l.envelope;
        let h = env.household_id;
        let invitation = match ev {
            Event::MemberJoined(j) => j.invitation_id,
            _ => None,
        };
        let mut agg: Household = load_household(tx, h, invitation).await?;
        if let Err(v) = agg.apply(&he, env.seq, env.occurred_at) {
            tracing::warn!(household = %h, event = %env.event_id, reason = %v, "household event refused by the fold");
            sqlx::query(
                "INSERT INTO household_refused_events (event_id, household_id, event_type, reason, occurred_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
            )
            .bind(env.event_id)
            .bind(h)
            .bind(&env.event_type)
            .bind(v.to_string())
            .bind(env.occurred_at)
            .execute(&mut **tx)
            .await?;
            out.refused.insert(env.event_id);
            continue;
        }
        let version = agg.version as i64;
        let mut changed_member = None;
        let mut registry: Option<(Option<Uuid>, Option<Uuid>)> = None;
        let mut presence = None;
        let mut scene = None;
        let mut automation = None;
        match ev {
            Event::HouseholdCreated(c) => {
                sqlx::query(
                    "INSERT INTO households (household_id, name, created_at, version, log_partition) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (household_id) DO NOTHING",
                )
                .bind(h)
                .bind(&c.name)
                .bind(env.occurred_at)
                .bind(version)
                .bind(l.partition)
                .execute(&mut **tx)
                .await?;
                if let Some(owner) = c.created_by {
                    insert_member(tx, h, owner, "owner", env.occurred_at).await?;
                    changed_member = Some(owner);
                }
            }
            Event::MemberInvited(i) => {
                sqlx::query(
                    "INSERT INTO household_invitations (invitation_id, household_id, role, code_hash, expires_at, created_by, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                )
                .bind(i.invitation_id)
                .bind(h)
                .bind(i.role.as_str())
                .bind(&i.code_hash)
                .bind(i.expires_at)
                .bind(super::audit::actor_id(&env.actor))
                .bind(env.occurred_at)
                .execute(&mut **tx)
                .await?;
            }
            Event::MemberJoined(j) => {
                insert_member(tx, h, j.user_id, j.role.as_str(), env.occurred_at).await?;
                if let Some(inv) = j.invitation_id {
                    sqlx::query("UPDATE household_invitations SET used_by = $2, used_at = $3 WHERE invitation_id = $1")
                        .bind(inv)
                        .bind(j.user_id)
                        .bind(env.occurred_at)
                        .execute(&mut **tx)
                        .await?;
                }
                changed_member = Some(j.user_id);
            }
            Event::MemberRoleChanged(r) => {
                sqlx::query("UPDATE household_members SET role = $3 WHERE household_id = $1 AND user_id = $2")
                    .bind(h)
                    .bind(r.user_id)
                    .bind(r.role.as_str())
                    .execute(&mut **tx)
                    .await?;
                changed_member = Some(r.user_id);
            }
            Event::MemberRemoved(r) => {
                sqlx::query("DELETE FROM household_members WHERE household_id = $1 AND user_id = $2")
                    .bind(h)
                    .bind(r.user_id)
                    .execute(&mut **tx)
                    .await?;
                changed_member = Some(r.user_id);
            }
            Event::PresenceChanged(p) => {
                sqlx::query(
                    "UPDATE household_members
                        SET presence_since = CASE WHEN presence IS DISTINCT FROM $3 THEN $4 ELSE presence_since END, presence = $3
                      WHERE household_id = $1 AND user_id = $2",
                )
                .bind(h)
                .bind(p.user_id)
                .bind(p.presence.as_str())
                .bind(env.occurred_at)
                .execute(&mut **tx)
                .await?;
                presence = Some((p.user_id, p.presence));
            }
            Event::SceneCreated(c) => {
                upsert_scene(tx, h, c.scene_id, &c.name, &c.devices, c.child_allowed, env.occurred_at).await?;
                registry = Some((None, None));
                scene = Some(c.scene_id);
            }
            Event::SceneChanged(c) => {
                upsert_scene(tx, h, c.scene_id, &c.name, &c.devices, c.child_allowed, env.occurred_at).await?;
                registry = Some((None, None));
                scene = Some(c.scene_id);
            }
            Event::SceneDeleted(d) => {
                sqlx::query("DELETE FROM scenes WHERE scene_id = $1 AND household_id = $2")
                    .bind(d.scene_id)
                    .bind(h)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((None, None));
                scene = Some(d.scene_id);
            }
            Event::AutomationCreated(a) => {
                sqlx::query(
                    "INSERT INTO automations (automation_id, household_id, name, enabled, created_by, definition, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT (automation_id) DO NOTHING",
                )
                .bind(a.automation_id)
                .bind(h)
                .bind(&a.name)
                .bind(a.enabled)
                .bind(a.created_by)
                .bind(serde_json::to_value(&a.definition).unwrap_or_default())
                .bind(env.occurred_at)
                .execute(&mut **tx)
                .await?;
                registry = Some((None, None));
                automation = Some(a.automation_id);
            }
            Event::AutomationChanged(a) => {
                sqlx::query(
                    "UPDATE automations SET name = $3, enabled = $4, definition = $5, updated_at = $6
                      WHERE automation_id = $1 AND household_id = $2",
                )
                .bind(a.automation_id)
                .bind(h)
                .bind(&a.name)
                .bind(a.enabled)
                .bind(serde_json::to_value(&a.definition).unwrap_or_default())
                .bind(env.occurred_at)
                .execute(&mut **tx)
                .await?;
                registry = Some((None, None));
                automation = Some(a.automation_id);
            }
            Event::AutomationDeleted(a) => {
                sqlx::query("DELETE FROM automations WHERE automation_id = $1 AND household_id = $2")
                    .bind(a.automation_id)
                    .bind(h)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((None, None));
                automation = Some(a.automation_id);
            }
            Event::HouseholdTimeZoneSet(t) => {
                sqlx::query("UPDATE households SET time_zone = $2 WHERE household_id = $1")
                    .bind(h)
                    .bind(&t.time_zone)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((None, None));
            }
            Event::DeviceRegistered(d) => {
                sqlx::query(
                    "INSERT INTO devices (device_id, household_id, kind, name, room, registered_at, room_id, serial, cert_serial, broker,
                                          report_interval_secs)
                     VALUES ($1, $2, $3, $4, NULL, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
                )
                .bind(d.device_id)
                .bind(h)
                .bind(d.kind.as_str())
                .bind(&d.name)
                .bind(env.occurred_at)
                .bind(d.room_id)
                .bind(&d.serial)
                .bind(&d.cert_serial)
                .bind(d.broker.unwrap_or(0) as i16)
                .bind(d.report_interval_secs.unwrap_or(homelink_events::shadow::DEFAULT_REPORT_INTERVAL_SECS) as i32)
                .execute(&mut **tx)
                .await?;
                registry = Some((Some(d.device_id), d.room_id));
            }
            Event::DeviceRemoved(d) => {
                sqlx::query("UPDATE devices SET removed_at = $3 WHERE device_id = $1 AND household_id = $2")
                    .bind(d.device_id)
                    .bind(h)
                    .bind(env.occurred_at)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((Some(d.device_id), None));
            }
            Event::DeviceRenamed(d) => {
                sqlx::query("UPDATE devices SET name = $3 WHERE device_id = $1 AND household_id = $2")
                    .bind(d.device_id)
                    .bind(h)
                    .bind(&d.name)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((Some(d.device_id), None));
            }
            Event::DeviceMoved(d) => {
                sqlx::query("UPDATE devices SET room_id = $3 WHERE device_id = $1 AND household_id = $2")
                    .bind(d.device_id)
                    .bind(h)
                    .bind(d.room_id)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((Some(d.device_id), d.room_id));
            }
            Event::RoomCreated(r) => {
                sqlx::query("INSERT INTO rooms (room_id, household_id, name, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                    .bind(r.room_id)
                    .bind(h)
                    .bind(&r.name)
                    .bind(env.occurred_at)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((None, Some(r.room_id)));
            }
            Event::RoomRenamed(r) => {
                sqlx::query("UPDATE rooms SET name = $3 WHERE room_id = $1 AND household_id = $2")
                    .bind(r.room_id)
                    .bind(h)
                    .bind(&r.name)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((None, Some(r.room_id)));
            }
            Event::RoomDeleted(r) => {
                sqlx::query("UPDATE devices SET room_id = NULL WHERE household_id = $1 AND room_id = $2")
                    .bind(h)
                    .bind(r.room_id)
                    .execute(&mut **tx)
                    .await?;
                sqlx::query("DELETE FROM rooms WHERE room_id = $1 AND household_id = $2")
                    .bind(r.room_id)
                    .bind(h)
                    .execute(&mut **tx)
                    .await?;
                registry = Some((None, Some(r.room_id)));
            }
            _ => {}
        }
        sqlx::query("UPDATE households SET version = $2 WHERE household_id = $1").bind(h).bind(version).execute(&mut **tx).await?;
        if let Some(user_id) = changed_member {
            let n = serde_json::to_string(&MembershipChanged { household_id: h, user_id }).unwrap_or_default();
            out.notifications.push((MEMBERSHIP_CHANGED_CHANNEL, n));
        }
        if let Some((device_id, room_id)) = registry {
            out.registry.push(RegistryChanged {
                household_id: h,
                change: env.event_type.clone(),
                device_id,
                room_id,
                version: agg.version,
                change_seq: 0,
                user_id: None,
                presence: None,
                scene_id: scene,
                automation_id: automation,
            });
        }
        if let Some((user_id, p)) = presence {
            out.registry.push(RegistryChanged {
                household_id: h,
                change: env.event_type.clone(),
                device_id: None,
                room_id: None,
                version: agg.version,
                change_seq: 0,
                user_id: Some(user_id),
                presence: Some(p.as_str().to_owned()),
                scene_id: None,
                automation_id: None,
            });
        }
    }
    Ok(out)
}

async fn insert_member(
    tx: &mut Transaction<'_, Postgres>,
    h: Uuid,
    user: Uuid,
    role: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO household_members (household_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
        .bind(h)
        .bind(user)
        .bind(role)
        .bind(at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn upsert_scene(
    tx: &mut Transaction<'_, Postgres>,
    h: Uuid,
    scene: Uuid,
    name: &str,
    devices: &[homelink_events::scene::SceneTarget],
    child_allowed: bool,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO scenes (scene_id, household_id, name, devices, child_allowed, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (scene_id) DO UPDATE SET name = EXCLUDED.name, devices = EXCLUDED.devices,
           child_allowed = EXCLUDED.child_allowed, updated_at = EXCLUDED.updated_at
         WHERE scenes.household_id = EXCLUDED.household_id",
    )
    .bind(scene)
    .bind(h)
    .bind(name)
    .bind(serde_json::to_value(devices).unwrap_or_default())
    .bind(child_allowed)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
