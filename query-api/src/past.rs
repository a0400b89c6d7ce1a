//! History in GraphQL (issue 18), read from the log, never the read models:
//! `householdAt(id, at)` — the whole household as it was at an instant
//! (members, rooms, devices and every twin), folded with
//! `events::past::Past` from the household's records up to it — and
//! `Device.history` — one device's timeline, every report, command step
//! and status change as recorded, not merged.

use crate::dry_run::Log;
use crate::errors::{codes, error};
use async_graphql::connection::{Connection, Edge};
use async_graphql::{Json, SimpleObject, ID};
use chrono::{DateTime, Utc};
use homelink_events::household::Action;
use homelink_events::past::Past;
use homelink_events::Role;
use homelink_kit::history::{self, Cursor, Scan};
use serde_json::Value;
use uuid::Uuid;

/// Most timeline entries in one page.
pub const MAX_TIMELINE_PAGE: i32 = 500;

#[derive(SimpleObject)]
pub struct PastHousehold {
    pub id: ID,
    /// The instant asked for.
    pub at: DateTime<Utc>,
    pub name: Option<String>,
    /// IANA name; `null` is UTC.
    pub time_zone: Option<String>,
    /// Events on the household stream up to the instant.
    pub version: i64,
    /// Recorded events up to the instant (from a snapshot and the log).
    pub events_folded: i64,
    /// The instant of the snapshot the fold started from, if one was used.
    pub from_snapshot: Option<DateTime<Utc>>,
    pub members: Vec<PastMember>,
    pub rooms: Vec<PastRoom>,
    /// The devices the viewer's role may see, removed ones included (marked).
    pub devices: Vec<PastDevice>,
}

#[derive(SimpleObject)]
pub struct PastMember {
    pub user_id: ID,
    pub role: String,
    /// `true` home, `false` away, `null` never reported.
    pub home: Option<bool>,
}

#[derive(SimpleObject)]
pub struct PastRoom {
    pub id: ID,
    pub name: String,
}

#[derive(SimpleObject)]
pub struct PastDevice {
    pub id: ID,
    pub kind: String,
    pub name: String,
    pub room_id: Option<ID>,
    pub removed: bool,
    /// Every capability's last reported value.
    pub reported: Json<Value>,
    /// Values commands still wanted (not yet reported, refused or expired).
    pub desired: Json<Value>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
}

/// One recorded event of a device.
#[derive(SimpleObject)]
pub struct TimelineEntry {
    pub event_id: ID,
    pub at: DateTime<Utc>,
    /// e.g. `DeviceStateReported`, `DeviceCommandRequested`, `DeviceCommandAcked`.
    #[graphql(name = "type")]
    pub event_type: String,
    /// `{"kind": "user" | "device" | "system", "id": …}`.
    pub actor: Json<Value>,
    /// The command it belongs to, for command steps.
    pub command_id: Option<ID>,
    /// Where it is in the log: `topic/partition/offset`.
    pub position: String,
    pub payload: Json<Value>,
}

fn log_unavailable(e: homelink_kit::Error) -> async_graphql::Error {
    tracing::warn!(error = %e, "reading the log for history failed");
    error(codes::UNAVAILABLE, "the log is unavailable")
}

/// The household at `at`, as the viewer's role (now) may see it: the
/// latest snapshot at or before `at` (if any) and the log after it, folded.
/// A fold that went more than `snapshot_every` events past its start is
/// stored as a snapshot at `at` (derived; safe to delete).
pub async fn household_at(
    pool: &sqlx::PgPool,
    log: &Log,
    role: Role,
    household: Uuid,
    at: DateTime<Utc>,
) -> async_graphql::Result<PastHousehold> {
    if at > Utc::now() {
        return Err(error(codes::BAD_USER_INPUT, "at is in the future: nothing is recorded there yet"));
    }
    // To the microsecond, as Postgres stores a snapshot's instant: a snapshot
    // holds exactly the events up to the instant it is stored under.
    let at = DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at);
    let topics = vec![log.topics.households(), log.topics.commands(), log.topics.telemetry()];
    let base = homelink_read_model::snapshots::latest_at_or_before(pool, household, at).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading snapshots failed; folding from the start");
        None
    });
    let resumed = base.and_then(|s| {
        let cursor = Cursor::decode(&s.cursor, topics.len())?;
        let past: Past = serde_json::from_value(s.state).ok()?;
        Some((s.at, cursor, past))
    });
    let (from_snapshot, after, mut past) = match resumed {
        Some((when, cursor, past)) => (Some(when), Some(cursor), past),
        None => (None, None, Past::default()),
    };
    let before = past.events;
    let scan = Scan { bootstrap: log.bootstrap.clone(), topics, household, since: None, until: Some(at), device: None, after };
    let done = history::scan(&scan, usize::MAX, |e, _| {
        past.apply(&e.envelope);
        true
    })
    .await
    .map_err(log_unavailable)?;
    if let Some(end) = done.end.filter(|_| past.events - before > log.snapshot_every) {
        let snapshot = homelink_read_model::snapshots::Snapshot {
            at,
            cursor: end.encode(),
            events: i64::try_from(past.events).unwrap_or(i64::MAX),
            state: serde_json::to_value(&past).unwrap_or_default(),
        };
        if let Err(e) = homelink_read_model::snapshots::store(pool, household, &snapshot).await {
            tracing::warn!(error = %e, "storing a snapshot failed");
        }
    }
    let h = &past.household;
    let id = |u: &Uuid| ID(u.to_string());
    let devices = h
        .devices
        .iter()
        .filter(|(_, d)| role.allows(&Action::SeeDevice(d.kind)))
        .map(|(d, reg)| {
            let twin = past.devices.get(d).cloned().unwrap_or_default();
            PastDevice {
                id: id(d),
                kind: reg.kind.as_str().to_owned(),
                name: twin.name.clone(),
                room_id: reg.room_id.as_ref().map(id),
                removed: reg.removed,
                reported: Json(Value::Object(twin.reported.clone())),
                desired: Json(Value::Object(past.desired(*d, at))),
                online: twin.online,
                last_seen: twin.last_seen,
            }
        })
        .collect();
    Ok(PastHousehold {
        id: id(&household),
        at,
        name: past.name.clone(),
        time_zone: h.time_zone.clone(),
        version: i64::try_from(h.version).unwrap_or(i64::MAX),
        events_folded: i64::try_from(past.events).unwrap_or(i64::MAX),
        from_snapshot,
        members: h
            .members
            .iter()
            .map(|(u, r)| PastMember {
                user_id: id(u),
                role: r.to_string(),
                home: h.presence.get(u).map(|p| matches!(p, homelink_events::household::Presence::Home)),
            })
            .collect(),
        rooms: h.rooms.iter().map(|(r, name)| PastRoom { id: id(r), name: name.clone() }).collect(),
        devices,
    })
}

/// A page of one device's timeline, oldest first.
pub async fn timeline(
    log: &Log,
    (household, device): (Uuid, Uuid),
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    first: i32,
    after: Option<String>,
) -> async_graphql::Result<Connection<String, TimelineEntry>> {
    if !(1..=MAX_TIMELINE_PAGE).contains(&first) {
        return Err(error(codes::BAD_USER_INPUT, format!("first must be between 1 and {MAX_TIMELINE_PAGE}")));
    }
    let topics = vec![log.topics.households(), log.topics.commands(), log.topics.telemetry()];
    let after = match after {
        Some(a) => Some(Cursor::decode(&a, topics.len()).ok_or_else(|| error(codes::BAD_USER_INPUT, "invalid cursor"))?),
        None => None,
    };
    let had_after = after.is_some();
    let scan = Scan { bootstrap: log.bootstrap.clone(), topics, household, since, until, device: Some(device), after };
    let mut edges = Vec::new();
    let done = history::scan(&scan, first as usize, |e, cursor| {
        let env = e.envelope;
        let command_id = env.payload.get("commandId").and_then(Value::as_str).map(|c| ID(c.to_owned()));
        edges.push(Edge::new(
            cursor.encode(),
            TimelineEntry {
                event_id: ID(env.event_id.to_string()),
                at: env.occurred_at,
                event_type: env.event_type,
                actor: Json(serde_json::to_value(&env.actor).unwrap_or_default()),
                command_id,
                position: format!("{}/{}/{}", e.topic, e.partition, e.offset),
                payload: Json(env.payload),
            },
        ));
        true
    })
    .await
    .map_err(log_unavailable)?;
    let mut c = Connection::new(had_after, done.next.is_some());
    c.edges = edges;
    Ok(c)
}
