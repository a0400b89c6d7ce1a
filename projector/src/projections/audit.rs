//! `audit_log`: every command, accepted or refused — who, in which role, from
//! which client, what, on what, with which outcome, when.

use homelink_events::event::CommandDenied;
use homelink_events::{Actor, Event};
use homelink_kit::reader::Located;
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use std::collections::HashSet;
use uuid::Uuid;

pub(crate) fn actor_id(a: &Actor) -> String {
    match a {
        Actor::User(u) => u.clone(),
        Actor::Device(d) => d.to_string(),
        Actor::System(s) => s.clone(),
    }
}

fn actor_kind(a: &Actor) -> &'static str {
    match a {
        Actor::User(_) => "user",
        Actor::Device(_) => "device",
        Actor::System(_) => "system",
    }
}

/// One audit row per command: the accepted ones are their own events, the
/// refused ones `CommandDenied` events. Device-sent events are not commands.
pub async fn apply(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)], refused: &HashSet<Uuid>) -> Result<(), sqlx::Error> {
    let mut cols: [Vec<Option<String>>; 7] = Default::default(); // actor_kind actor_id role client action target detail
    let (mut ids, mut hs, mut ats, mut outcomes, mut statuses) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (l, ev) in work {
        let env = &l.envelope;
        let (action, target, status, detail): (&str, Option<String>, i32, Option<String>) = match ev {
            Event::DeviceCommandRequested(c) => {
                ("device.command", Some(format!("device/{}", c.device_id)), 202, Some(Value::Object(c.set.clone()).to_string()))
            }
            Event::HouseholdCreated(c) => ("household.create", None, 201, Some(c.name.clone())),
            Event::MemberInvited(i) => ("member.invite", Some(format!("invitation/{}", i.invitation_id)), 201, Some(i.role.to_string())),
            Event::MemberJoined(j) => ("invitation.accept", Some(format!("user/{}", j.user_id)), 200, Some(j.role.to_string())),
            Event::MemberRoleChanged(r) => ("member.role", Some(format!("user/{}", r.user_id)), 200, Some(r.role.to_string())),
            Event::MemberRemoved(r) => {
                (if r.left { "member.leave" } else { "member.remove" }, Some(format!("user/{}", r.user_id)), 204, None)
            }
            Event::DeviceRegistered(d) => ("device.register", Some(format!("device/{}", d.device_id)), 201, Some(d.kind.to_string())),
            Event::DeviceRemoved(d) => ("device.remove", Some(format!("device/{}", d.device_id)), 204, None),
            Event::DeviceRenamed(d) => ("device.rename", Some(format!("device/{}", d.device_id)), 200, Some(d.name.clone())),
            Event::DeviceMoved(d) => ("device.move", Some(format!("device/{}", d.device_id)), 200, d.room_id.map(|r| format!("room/{r}"))),
            Event::RoomCreated(r) => ("room.create", Some(format!("room/{}", r.room_id)), 201, Some(r.name.clone())),
            Event::RoomRenamed(r) => ("room.rename", Some(format!("room/{}", r.room_id)), 200, Some(r.name.clone())),
            Event::RoomDeleted(r) => ("room.delete", Some(format!("room/{}", r.room_id)), 204, None),
            Event::PresenceChanged(p) => ("member.presence", Some(format!("user/{}", p.user_id)), 200, Some(p.presence.to_string())),
            Event::SceneCreated(c) => ("scene.create", Some(format!("scene/{}", c.scene_id)), 201, Some(c.name.clone())),
            Event::SceneChanged(c) => ("scene.change", Some(format!("scene/{}", c.scene_id)), 200, Some(c.name.clone())),
            Event::SceneDeleted(d) => ("scene.delete", Some(format!("scene/{}", d.scene_id)), 204, None),
            Event::SceneActivated(a) => (
                "scene.activate",
                Some(format!("scene/{}", a.scene_id)),
                202,
                Some(format!("activation {}: {} commands, {} skipped", a.activation_id, a.commands.len(), a.skipped.len())),
            ),
            Event::AutomationCreated(a) => {
                ("automation.create", Some(format!("automation/{}", a.automation_id)), 201, Some(a.name.clone()))
            }
            Event::AutomationChanged(a) => {
                ("automation.change", Some(format!("automation/{}", a.automation_id)), 200, Some(a.name.clone()))
            }
            Event::AutomationDeleted(a) => ("automation.delete", Some(format!("automation/{}", a.automation_id)), 204, None),
            Event::HouseholdTimeZoneSet(t) => ("household.time-zone", None, 200, Some(t.time_zone.clone())),
            Event::DeviceCommandRevoked(r) => (
                "device.command.revoke",
                Some(format!("device/{}", r.device_id)),
                403,
                Some(format!("command {} of user {}: {}", r.command_id, r.sender, r.reason)),
            ),
            Event::HistoryExported(x) => (
                "history.export",
                x.device.map(|d| format!("device/{d}")),
                200,
                Some(format!(
                    "{} records via {}, from {} to {}",
                    x.records,
                    x.via,
                    x.since.map_or("the start".to_owned(), |t| t.to_rfc3339()),
                    x.until.map_or("now".to_owned(), |t| t.to_rfc3339())
                )),
            ),
            Event::CommandDenied(CommandDenied { action, target, status, reason }) => {
                (action.as_str(), target.clone(), i32::from(*status), Some(reason.clone()))
            }
            _ => continue,
        };
        let outcome = match ev {
            Event::CommandDenied(d) if d.status == 409 => "conflict",
            Event::CommandDenied(_) => "denied",
            Event::DeviceCommandRevoked(_) => "revoked",
            _ if refused.contains(&env.event_id) => "superseded",
            _ => "accepted",
        };
        ids.push(env.event_id);
        hs.push(env.household_id);
        ats.push(env.occurred_at);
        outcomes.push(outcome.to_owned());
        statuses.push(status);
        let meta = env.meta.as_ref();
        let values = [
            Some(actor_kind(&env.actor).to_owned()),
            Some(actor_id(&env.actor)),
            meta.and_then(|m| m.role).map(|r| r.to_string()),
            meta.and_then(|m| m.client.clone()),
            Some(action.to_owned()),
            target,
            detail,
        ];
        for (c, v) in cols.iter_mut().zip(values) {
            c.push(v);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    let [kind, actor, role, client, action, target, detail] = cols;
    sqlx::query(
        r#"INSERT INTO audit_log (event_id, household_id, at, actor_kind, actor_id, role, client, action, target, outcome, status, detail)
           SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                                $9::text[], $10::text[], $11::int[], $12::text[])
           ON CONFLICT (event_id) DO NOTHING"#,
    )
    .bind(&ids)
    .bind(&hs)
    .bind(&ats)
    .bind(&kind)
    .bind(&actor)
    .bind(&role)
    .bind(&client)
    .bind(&action)
    .bind(&target)
    .bind(&outcomes)
    .bind(&statuses)
    .bind(&detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
