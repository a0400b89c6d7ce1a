//! GraphQL types that the fan-out ([`crate::hub`]) and the audit log
//! ([`crate::audit`]) produce as well as the schema: plain data, no
//! resolvers, so those modules need not import the schema.

use async_graphql::{InputObject, Json, SimpleObject, ID};
use chrono::{DateTime, Utc};
use homelink_events::shadow::ShadowChanged;
use homelink_events::topics::{CommandChanged, RegistryChanged};
use serde_json::Value;

#[derive(InputObject, Default)]
pub struct AuditFilter {
    /// The acting user's id.
    pub actor_id: Option<String>,
    /// e.g. `device.command`, `member.role`.
    pub action: Option<String>,
    /// `accepted`, `denied`, `conflict` or `superseded`.
    pub outcome: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// One audited command.
#[derive(SimpleObject)]
pub struct AuditEntry {
    pub id: ID,
    pub at: DateTime<Utc>,
    /// `user`, `device` or `system`.
    pub actor_kind: String,
    pub actor_id: String,
    pub role: Option<String>,
    pub client: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    /// The HTTP status the command API answered.
    pub status: i32,
    pub detail: Option<String>,
}

/// A device's last known state.
#[derive(SimpleObject, Clone)]
pub struct Shadow {
    /// Reported capability values.
    pub reported: Json<Value>,
    /// Highest report sequence applied (the device's own counter).
    pub seq: i64,
    /// Bumped on every change of this shadow.
    pub version: i64,
    pub battery: Option<i32>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    /// Desired values the device has not reported yet, each from the latest
    /// command (or `PUT …/desired`) that set it.
    pub desired: Json<Value>,
    /// The desired values that differ from the reported ones: what the
    /// device still has to do.
    pub delta: Json<Value>,
    /// Per property: `reportedAt`, `desiredAt` and the `commandId` that set
    /// the desired value.
    pub metadata: Json<Value>,
    /// Not seen for two report intervals (computed when read or pushed).
    pub stale: bool,
    /// Properties not reported for two report intervals, by name.
    pub stale_properties: Vec<String>,
}

/// A committed change of one device's shadow.
#[derive(SimpleObject, Clone)]
pub struct DeviceChange {
    pub household_id: ID,
    pub device_id: ID,
    pub shadow: Shadow,
    /// The household's change sequence number (resume with `after`).
    pub change_seq: i64,
    /// Reports merged into this change that passed through values the shadow
    /// no longer shows: per property, every value it took, in order (a door
    /// opened and closed: `{"contact": [false, true]}`); `null` when none.
    pub transitions: Option<Json<Value>>,
}

impl From<&ShadowChanged> for DeviceChange {
    fn from(c: &ShadowChanged) -> Self {
        let (stale, stale_properties) =
            homelink_events::shadow::staleness(c.last_seen, &c.metadata, c.report_interval_secs, chrono::Utc::now());
        Self {
            household_id: ID(c.household_id.to_string()),
            device_id: ID(c.device_id.to_string()),
            shadow: Shadow {
                reported: Json(Value::Object(c.reported.clone())),
                seq: i64::try_from(c.seq).unwrap_or(i64::MAX),
                version: i64::try_from(c.version).unwrap_or(i64::MAX),
                battery: c.battery.map(i32::from),
                online: c.online,
                last_seen: c.last_seen,
                desired: Json(Value::Object(c.desired.clone())),
                delta: Json(Value::Object(c.delta.clone())),
                metadata: Json(serde_json::to_value(&c.metadata).unwrap_or(Value::Null)),
                stale,
                stale_properties,
            },
            change_seq: i64::try_from(c.change_seq).unwrap_or(i64::MAX),
            transitions: (!c.transitions.is_empty()).then(|| Json(Value::Object(c.transitions.clone()))),
        }
    }
}

/// One change of a household, as the household subscription delivers it.
#[derive(SimpleObject, Clone)]
pub struct HouseholdChange {
    /// `shadow` for device state, `command` for a command's lifecycle step;
    /// otherwise the registry event's name.
    pub change: String,
    pub household_id: ID,
    pub device_id: Option<ID>,
    pub room_id: Option<ID>,
    /// For `shadow`: the device's new shadow.
    pub shadow: Option<Shadow>,
    /// For `shadow`: the values properties passed through within the change
    /// (see `DeviceChange.transitions`).
    pub transitions: Option<Json<Value>>,
    /// For registry changes: the household's version after the change.
    pub version: Option<i64>,
    /// For `command`: the command (read it with `command(id)`) and its new status.
    pub command_id: Option<ID>,
    pub status: Option<String>,
    /// For `PresenceChanged`: the member and whether they are home now.
    pub user_id: Option<ID>,
    pub home: Option<bool>,
    /// For `SceneCreated`, `SceneChanged`, `SceneDeleted`: the scene.
    pub scene_id: Option<ID>,
    /// For `AutomationCreated`, `AutomationChanged`, `AutomationDeleted`.
    pub automation_id: Option<ID>,
    /// For `command`: the scene activation that sent it, if one did
    /// (`sceneActivation(id)` counts its progress).
    pub caused_by: Option<ID>,
    /// The household's change sequence number (resume with `after`).
    pub change_seq: i64,
}

impl HouseholdChange {
    pub fn from_shadow(c: &ShadowChanged) -> Self {
        let d = DeviceChange::from(c);
        Self {
            change: "shadow".into(),
            household_id: d.household_id,
            device_id: Some(d.device_id),
            room_id: None,
            shadow: Some(d.shadow),
            transitions: d.transitions,
            version: None,
            change_seq: d.change_seq,
            command_id: None,
            status: None,
            user_id: None,
            home: None,
            scene_id: None,
            automation_id: None,
            caused_by: None,
        }
    }

    pub fn from_registry(r: &RegistryChanged) -> Self {
        Self {
            change: r.change.clone(),
            household_id: ID(r.household_id.to_string()),
            device_id: r.device_id.map(|d| ID(d.to_string())),
            room_id: r.room_id.map(|d| ID(d.to_string())),
            shadow: None,
            transitions: None,
            version: i64::try_from(r.version).ok(),
            change_seq: i64::try_from(r.change_seq).unwrap_or(i64::MAX),
            command_id: None,
            status: None,
            user_id: r.user_id.map(|u| ID(u.to_string())),
            home: r.presence.as_deref().map(|p| p == "home"),
            scene_id: r.scene_id.map(|d| ID(d.to_string())),
            automation_id: r.automation_id.map(|d| ID(d.to_string())),
            caused_by: None,
        }
    }

    pub fn from_command(c: &CommandChanged) -> Self {
        Self {
            change: "command".into(),
            household_id: ID(c.household_id.to_string()),
            device_id: Some(ID(c.device_id.to_string())),
            room_id: None,
            shadow: None,
            transitions: None,
            version: None,
            change_seq: i64::try_from(c.change_seq).unwrap_or(i64::MAX),
            command_id: Some(ID(c.command_id.to_string())),
            status: Some(c.status.clone()),
            user_id: None,
            home: None,
            scene_id: None,
            automation_id: None,
            caused_by: c.caused_by.map(|d| ID(d.to_string())),
        }
    }
}
