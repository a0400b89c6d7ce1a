//! Typed events. Names are past tense; each has a schema version.
//!
//! [`Event::from_parts`] is the one place that turns a stored `(type, v,
//! payload)` into a typed event. When a payload changes shape, bump its
//! version, keep a golden JSON of the old one under test, and upcast here.

use crate::automation::{Definition, Judged};
use crate::device::DeviceKind;
use crate::household::{HouseholdEvent, Presence, Role};
use crate::protocol::AckStatus;
use crate::scene::{SceneTarget, Skipped};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HouseholdCreated {
    pub name: String,
    /// The user who created it and became its first owner (absent on
    /// households seeded without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<Uuid>,
}

/// An owner invited someone with a role. Only the hash of the secret code is
/// stored; the code itself went to the owner once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInvited {
    pub invitation_id: Uuid,
    pub role: Role,
    pub code_hash: String,
    pub expires_at: DateTime<Utc>,
}

/// A user joined the household (by accepting an invitation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberJoined {
    pub user_id: Uuid,
    pub role: Role,
    #[serde(default)]
    pub invitation_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRoleChanged {
    pub user_id: Uuid,
    pub role: Role,
}

/// A member was removed by an owner, or left (`left`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRemoved {
    pub user_id: Uuid,
    #[serde(default)]
    pub left: bool,
}

/// A command was refused (not authorized, or it conflicted with the
/// household's state). Recorded for the audit log; changes no other state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandDenied {
    /// What was attempted, e.g. `device.command`, `member.role`.
    pub action: String,
    /// What it was attempted on, e.g. `device/<id>`.
    #[serde(default)]
    pub target: Option<String>,
    /// The HTTP status answered (403, 404, 409).
    pub status: u16,
    pub reason: String,
}

/// A household's history was read out of the log (`GET …/history` or
/// `homelink history export`): who (the envelope's actor), which window,
/// how many records. Recorded for the audit log; changes no other state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryExported {
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// The device filter, if any.
    #[serde(default)]
    pub device: Option<Uuid>,
    /// `api` (the owner, one page) or `operator` (read from the log).
    pub via: String,
    pub records: u64,
}

/// A device joined the household's registry with its own certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistered {
    pub device_id: Uuid,
    pub kind: DeviceKind,
    pub name: String,
    /// A room *name*, as the first seeded events carried it; unused since
    /// rooms have ids (`room_id`). Kept so old records keep decoding.
    #[serde(default)]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<Uuid>,
    /// The manufacturer's serial number, unique across households while registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The serial number of the device's certificate (hex), for revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// The MQTT broker the device was told to connect to: an index into the
    /// deployment's broker list (absent: the first). Commands go out there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<u16>,
    /// How often the device reports, in seconds (absent: the product's 30 s).
    /// Two missed intervals make it, or one of its properties, stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_interval_secs: Option<u32>,
}

/// A device left the registry; its certificate is revoked. Its shadow and
/// history stay readable, marked removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRemoved {
    pub device_id: Uuid,
    #[serde(default)]
    pub cert_serial: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRenamed {
    pub device_id: Uuid,
    pub name: String,
}

/// A device moved to a room (`None`: unassigned).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMoved {
    pub device_id: Uuid,
    #[serde(default)]
    pub room_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomCreated {
    pub room_id: Uuid,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomRenamed {
    pub room_id: Uuid,
    pub name: String,
}

/// A room was deleted; its devices are unassigned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomDeleted {
    pub room_id: Uuid,
}

/// A state report a device published and the bridge accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStateReported {
    pub device_id: Uuid,
    pub seq: u64,
    /// The device's own clock; informative, never used for ordering.
    #[serde(default)]
    pub device_ts: Option<DateTime<Utc>>,
    pub state: Map<String, Value>,
    #[serde(default)]
    pub battery: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatusChanged {
    pub device_id: Uuid,
    pub online: bool,
}

/// A user asked a device to change state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCommandRequested {
    pub command_id: Uuid,
    pub device_id: Uuid,
    pub set: Map<String, Value>,
    pub expires_at: DateTime<Utc>,
    /// The device was offline when the command was accepted: it waits, as
    /// desired state, until the device comes online.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
}

/// The broker accepted a command's publish for a connected device (the
/// bridge appends it at the PUBACK).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCommandDelivered {
    pub command_id: Uuid,
    pub device_id: Uuid,
}

/// A command was not acknowledged before it expired (appended by the
/// bridge's expiry timer); its values are no longer desired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCommandExpired {
    pub command_id: Uuid,
    pub device_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// A command's sender may no longer send it (removed from the household,
/// or their role no longer allows it): it ends `rejected` with `reason`,
/// its values stop being desired, and it is never published. Appended by
/// command-api when a membership change takes the right away, and by the
/// bridge when it re-authorizes a command at the moment it would send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCommandRevoked {
    pub command_id: Uuid,
    pub device_id: Uuid,
    /// The command's sender (a user id).
    pub sender: String,
    pub reason: String,
}

/// A device answered a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCommandAcked {
    pub command_id: Uuid,
    pub device_id: Uuid,
    pub status: AckStatus,
    #[serde(default)]
    pub reason: Option<String>,
}

/// A member's app reported where they are (`PUT …/presence`, from a
/// geofence). Repeats are recorded too; only a change moves `presenceSince`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceChanged {
    pub user_id: Uuid,
    pub presence: Presence,
}

/// A scene was made (owners and adults): its devices' target states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SceneCreated {
    pub scene_id: Uuid,
    pub name: String,
    pub devices: Vec<SceneTarget>,
    #[serde(default)]
    pub child_allowed: bool,
}

/// A scene was renamed or changed: the whole scene after the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SceneChanged {
    pub scene_id: Uuid,
    pub name: String,
    pub devices: Vec<SceneTarget>,
    #[serde(default)]
    pub child_allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SceneDeleted {
    pub scene_id: Uuid,
}

/// One device's command of an activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivatedCommand {
    pub device_id: Uuid,
    pub command_id: Uuid,
}

/// A member activated a scene: appended on the commands topic right before
/// its commands, each of which has this activation as its causation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SceneActivated {
    pub activation_id: Uuid,
    pub scene_id: Uuid,
    pub commands: Vec<ActivatedCommand>,
    /// Devices of the scene that got no command, each with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

/// An automation was made (owners and adults). It acts with its creator's
/// rights at the moment it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationCreated {
    pub automation_id: Uuid,
    pub name: String,
    pub enabled: bool,
    pub created_by: Uuid,
    pub definition: Definition,
}

/// An automation was changed: the whole of it after the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationChanged {
    pub automation_id: Uuid,
    pub name: String,
    pub enabled: bool,
    pub definition: Definition,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationDeleted {
    pub automation_id: Uuid,
}

/// The household's time zone (an IANA name; UTC until set): schedules and
/// time conditions are read in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HouseholdTimeZoneSet {
    pub time_zone: String,
}

/// The automation engine decided a trigger fired: the run it starts (or
/// why it does not), with every condition as judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationTriggered {
    pub automation_id: Uuid,
    pub run_id: Uuid,
    /// The trigger's index in the definition.
    pub trigger: u32,
    /// The event that fired it (absent for a schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Uuid>,
    /// What the trigger saw, e.g. `motion: true`, `last member left`.
    pub what: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Judged>,
    /// `run`, `conditions` (they did not hold), `skipped` (mode single, a
    /// run going; parallel at its max), `stopped` (the loop guard).
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One step of a run, as it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationRunStepped {
    pub automation_id: Uuid,
    pub run_id: Uuid,
    pub step: u32,
    /// `sent` (a command; a scene's commands), `refused` (its creator may no
    /// longer), `skipped`, `waiting`, `waited`, `timedOut`, `delayed`, `resumed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A run ended: `done`, `stopped` (restarted, loop guard) or `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationRunFinished {
    pub automation_id: Uuid,
    pub run_id: Uuid,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The engine paused an automation: its breaker tripped (it fired more
/// often than its limit). Nothing starts until it is saved again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationPaused {
    pub automation_id: Uuid,
    pub reason: String,
}

/// A paused automation runs again (it was saved again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomationResumed {
    pub automation_id: Uuid,
    pub reason: String,
}

macro_rules! events {
    ($($name:ident = $v:literal),* $(,)?) => {
        /// Every event HomeLink stores.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event {
            $($name($name),)*
        }

        impl Event {
            /// Type name, current schema version and payload JSON.
            pub fn to_parts(&self) -> (&'static str, u16, Value) {
                match self {
                    // Plain data structs always serialize.
                    $(Event::$name(p) => (stringify!($name), $v, serde_json::to_value(p).unwrap_or(Value::Null)),)*
                }
            }

            /// Decodes a stored payload; versions older than the current one
            /// are upcast here (none exist yet).
            pub fn from_parts(event_type: &str, v: u16, payload: Value) -> Result<Self, DecodeError> {
                match event_type {
                    $(stringify!($name) => {
                        if v != $v {
                            return Err(DecodeError::UnknownVersion(event_type.to_owned(), v));
                        }
                        serde_json::from_value(payload)
                            .map(Event::$name)
                            .map_err(|e| DecodeError::Json(e.to_string()))
                    })*
                    other => Err(DecodeError::UnknownType(other.to_owned())),
                }
            }

            pub fn type_name(&self) -> &'static str {
                match self {
                    $(Event::$name(_) => stringify!($name),)*
                }
            }
        }
    };
}

events! {
    HouseholdCreated = 1,
    DeviceRegistered = 1,
    DeviceStateReported = 1,
    DeviceStatusChanged = 1,
    DeviceCommandRequested = 1,
    DeviceCommandAcked = 1,
    MemberInvited = 1,
    MemberJoined = 1,
    MemberRoleChanged = 1,
    MemberRemoved = 1,
    CommandDenied = 1,
    DeviceRemoved = 1,
    DeviceRenamed = 1,
    DeviceMoved = 1,
    RoomCreated = 1,
    RoomRenamed = 1,
    RoomDeleted = 1,
    DeviceCommandDelivered = 1,
    DeviceCommandExpired = 1,
    DeviceCommandRevoked = 1,
    PresenceChanged = 1,
    SceneCreated = 1,
    SceneChanged = 1,
    SceneDeleted = 1,
    SceneActivated = 1,
    AutomationCreated = 1,
    AutomationChanged = 1,
    AutomationDeleted = 1,
    HouseholdTimeZoneSet = 1,
    AutomationTriggered = 1,
    AutomationRunStepped = 1,
    AutomationRunFinished = 1,
    AutomationPaused = 1,
    AutomationResumed = 1,
    HistoryExported = 1,
}

impl Event {
    /// The device this event is about, if any.
    pub fn device_id(&self) -> Option<Uuid> {
        match self {
            Event::HouseholdCreated(_)
            | Event::MemberInvited(_)
            | Event::MemberJoined(_)
            | Event::MemberRoleChanged(_)
            | Event::MemberRemoved(_)
            | Event::CommandDenied(_)
            | Event::HistoryExported(_)
            | Event::RoomCreated(_)
            | Event::RoomRenamed(_)
            | Event::RoomDeleted(_)
            | Event::PresenceChanged(_)
            | Event::SceneCreated(_)
            | Event::SceneChanged(_)
            | Event::SceneDeleted(_)
            | Event::SceneActivated(_)
            | Event::AutomationCreated(_)
            | Event::AutomationChanged(_)
            | Event::AutomationDeleted(_)
            | Event::HouseholdTimeZoneSet(_)
            | Event::AutomationTriggered(_)
            | Event::AutomationRunStepped(_)
            | Event::AutomationRunFinished(_)
            | Event::AutomationPaused(_)
            | Event::AutomationResumed(_) => None,
            Event::DeviceRegistered(e) => Some(e.device_id),
            Event::DeviceRemoved(e) => Some(e.device_id),
            Event::DeviceRenamed(e) => Some(e.device_id),
            Event::DeviceMoved(e) => Some(e.device_id),
            Event::DeviceStateReported(e) => Some(e.device_id),
            Event::DeviceStatusChanged(e) => Some(e.device_id),
            Event::DeviceCommandRequested(e) => Some(e.device_id),
            Event::DeviceCommandAcked(e) => Some(e.device_id),
            Event::DeviceCommandDelivered(e) => Some(e.device_id),
            Event::DeviceCommandExpired(e) => Some(e.device_id),
            Event::DeviceCommandRevoked(e) => Some(e.device_id),
        }
    }

    /// The stream inside the household: the household itself (membership
    /// and registry, whose `seq` is the household version), a device
    /// (its reports and commands), or the audit trail.
    pub fn stream(&self) -> String {
        match (self, self.device_id()) {
            (Event::CommandDenied(_) | Event::HistoryExported(_), _) => "audit".to_owned(),
            (Event::SceneActivated(a), _) => format!("scene/{}", a.scene_id),
            (Event::AutomationTriggered(a), _) => format!("automation/{}", a.automation_id),
            (Event::AutomationRunStepped(a), _) => format!("automation/{}", a.automation_id),
            (Event::AutomationRunFinished(a), _) => format!("automation/{}", a.automation_id),
            (Event::AutomationPaused(a), _) => format!("automation/{}", a.automation_id),
            (Event::AutomationResumed(a), _) => format!("automation/{}", a.automation_id),
            _ if self.household_event().is_some() => "household".to_owned(),
            (_, Some(d)) => format!("device/{d}"),
            (_, None) => "household".to_owned(),
        }
    }

    /// This event as a step of the household aggregate, if it is one.
    pub fn household_event(&self) -> Option<HouseholdEvent<'_>> {
        Some(match self {
            Event::HouseholdCreated(e) => HouseholdEvent::Created { created_by: e.created_by },
            Event::MemberInvited(e) => {
                HouseholdEvent::Invited { invitation_id: e.invitation_id, role: e.role, code_hash: &e.code_hash, expires_at: e.expires_at }
            }
            Event::MemberJoined(e) => HouseholdEvent::Joined { user_id: e.user_id, role: e.role, invitation_id: e.invitation_id },
            Event::MemberRoleChanged(e) => HouseholdEvent::RoleChanged { user_id: e.user_id, role: e.role },
            Event::MemberRemoved(e) => HouseholdEvent::Removed { user_id: e.user_id },
            Event::DeviceRegistered(e) => HouseholdEvent::DeviceRegistered { device_id: e.device_id, kind: e.kind, room_id: e.room_id },
            Event::DeviceRemoved(e) => HouseholdEvent::DeviceRemoved { device_id: e.device_id },
            Event::DeviceRenamed(e) => HouseholdEvent::DeviceRenamed { device_id: e.device_id },
            Event::DeviceMoved(e) => HouseholdEvent::DeviceMoved { device_id: e.device_id, room_id: e.room_id },
            Event::RoomCreated(e) => HouseholdEvent::RoomCreated { room_id: e.room_id, name: &e.name },
            Event::RoomRenamed(e) => HouseholdEvent::RoomRenamed { room_id: e.room_id, name: &e.name },
            Event::RoomDeleted(e) => HouseholdEvent::RoomDeleted { room_id: e.room_id },
            Event::PresenceChanged(e) => HouseholdEvent::PresenceChanged { user_id: e.user_id, presence: e.presence },
            Event::SceneCreated(e) => HouseholdEvent::SceneCreated {
                scene_id: e.scene_id,
                name: &e.name,
                targets: &e.devices,
                child_allowed: e.child_allowed,
                create: true,
            },
            Event::SceneChanged(e) => HouseholdEvent::SceneCreated {
                scene_id: e.scene_id,
                name: &e.name,
                targets: &e.devices,
                child_allowed: e.child_allowed,
                create: false,
            },
            Event::SceneDeleted(e) => HouseholdEvent::SceneDeleted { scene_id: e.scene_id },
            Event::AutomationCreated(e) => HouseholdEvent::AutomationSaved {
                automation_id: e.automation_id,
                name: &e.name,
                enabled: e.enabled,
                created_by: Some(e.created_by),
                definition: &e.definition,
            },
            Event::AutomationChanged(e) => HouseholdEvent::AutomationSaved {
                automation_id: e.automation_id,
                name: &e.name,
                enabled: e.enabled,
                created_by: None,
                definition: &e.definition,
            },
            Event::AutomationDeleted(e) => HouseholdEvent::AutomationDeleted { automation_id: e.automation_id },
            Event::HouseholdTimeZoneSet(e) => HouseholdEvent::TimeZoneSet { time_zone: &e.time_zone },
            _ => return None,
        })
    }

    /// The position in the stream when the producer knows it.
    pub fn stream_seq(&self) -> Option<u64> {
        match self {
            Event::DeviceStateReported(e) => Some(e.seq),
            _ => None,
        }
    }
}

/// Why stored bytes are not a usable event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("unknown version {1} of event type `{0}`")]
    UnknownVersion(String, u16),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Golden files: the JSON of every event as v1 stored it must keep decoding.
    #[test]
    fn golden_v1_payloads_decode() {
        let d = "6f1c1a2e-0000-4000-8000-000000000001";
        let cases = [
            ("HouseholdCreated", json!({"name": "Home"})),
            ("DeviceRegistered", json!({"deviceId": d, "kind": "light", "name": "Lamp", "room": null})),
            ("DeviceStateReported", json!({"deviceId": d, "seq": 7, "deviceTs": null, "state": {"on": true}, "battery": null})),
            ("DeviceStatusChanged", json!({"deviceId": d, "online": false})),
            ("DeviceCommandRequested", json!({"commandId": d, "deviceId": d, "set": {"on": false}, "expiresAt": "2026-11-25T12:00:05Z"})),
            ("DeviceCommandAcked", json!({"commandId": d, "deviceId": d, "status": "rejected", "reason": "busy"})),
            ("HouseholdCreated", json!({"name": "Home", "createdBy": d})),
            ("MemberInvited", json!({"invitationId": d, "role": "child", "codeHash": "ab", "expiresAt": "2026-11-25T12:00:05Z"})),
            ("MemberJoined", json!({"userId": d, "role": "adult", "invitationId": d})),
            ("MemberRoleChanged", json!({"userId": d, "role": "owner"})),
            ("MemberRemoved", json!({"userId": d, "left": true})),
            ("CommandDenied", json!({"action": "device.command", "target": null, "status": 403, "reason": "role"})),
            ("HistoryExported", json!({"since": "2026-11-25T12:00:05Z", "until": null, "device": d, "via": "api", "records": 12})),
            (
                "DeviceRegistered",
                json!({"deviceId": d, "kind": "lock", "name": "Door", "room": null, "roomId": d, "serial": "SN-1", "certSerial": "0a"}),
            ),
            ("DeviceRemoved", json!({"deviceId": d, "certSerial": "0a", "serial": null})),
            ("DeviceRenamed", json!({"deviceId": d, "name": "Porch"})),
            ("DeviceMoved", json!({"deviceId": d, "roomId": null})),
            ("RoomCreated", json!({"roomId": d, "name": "Hall"})),
            ("RoomRenamed", json!({"roomId": d, "name": "Lobby"})),
            ("RoomDeleted", json!({"roomId": d})),
            ("DeviceCommandRevoked", json!({"commandId": d, "deviceId": d, "sender": d, "reason": "the sender was removed"})),
            ("PresenceChanged", json!({"userId": d, "presence": "away"})),
            (
                "SceneCreated",
                json!({"sceneId": d, "name": "Night", "devices": [{"deviceId": d, "set": {"on": false}}], "childAllowed": true}),
            ),
            ("SceneChanged", json!({"sceneId": d, "name": "Night", "devices": [], "childAllowed": false})),
            ("SceneDeleted", json!({"sceneId": d})),
            (
                "AutomationCreated",
                json!({"automationId": d, "name": "Leaving", "enabled": true, "createdBy": d, "definition": {
                    "triggers": [{"type": "presence", "who": "last", "movement": "leave"}],
                    "actions": [{"type": "scene", "sceneId": d}], "mode": "single"}}),
            ),
            (
                "AutomationChanged",
                json!({"automationId": d, "name": "Leaving", "enabled": false, "definition": {
                    "triggers": [{"type": "time", "at": "07:30", "days": ["mon"]}],
                    "actions": [{"type": "delay", "secs": 5}], "mode": "queued", "max": 2}}),
            ),
            ("AutomationDeleted", json!({"automationId": d})),
            ("HouseholdTimeZoneSet", json!({"timeZone": "Europe/Berlin"})),
            (
                "AutomationTriggered",
                json!({"automationId": d, "runId": d, "trigger": 0, "cause": d, "what": "the last member left",
                       "conditions": [{"path": "/conditions/0", "held": true}], "outcome": "run"}),
            ),
            ("AutomationRunStepped", json!({"automationId": d, "runId": d, "step": 0, "outcome": "sent", "commands": [d]})),
            ("AutomationRunFinished", json!({"automationId": d, "runId": d, "outcome": "done"})),
            ("AutomationPaused", json!({"automationId": d, "reason": "breaker: more than 30 runs in 60 s"})),
            ("AutomationResumed", json!({"automationId": d, "reason": "saved again"})),
            (
                "SceneActivated",
                json!({"activationId": d, "sceneId": d, "commands": [{"deviceId": d, "commandId": d}],
                       "skipped": [{"deviceId": d, "reason": "removed"}]}),
            ),
        ];
        for (t, payload) in cases {
            let e = Event::from_parts(t, 1, payload.clone()).unwrap_or_else(|err| panic!("{t}: {err}"));
            assert_eq!(e.type_name(), t);
            assert_eq!(e.to_parts().2, payload, "{t} re-encodes to the same JSON");
        }
    }

    #[test]
    fn unknown_types_and_versions_are_errors() {
        assert!(matches!(Event::from_parts("Nope", 1, json!({})), Err(DecodeError::UnknownType(_))));
        assert!(matches!(Event::from_parts("HouseholdCreated", 9, json!({"name": "x"})), Err(DecodeError::UnknownVersion(_, 9))));
        assert!(matches!(Event::from_parts("HouseholdCreated", 1, json!({"name": 3})), Err(DecodeError::Json(_))));
    }

    proptest! {
        #[test]
        fn state_reports_round_trip(seq in any::<u64>(), on in any::<bool>(), b in proptest::option::of(0u8..=100), id in any::<u128>()) {
            let mut state = Map::new();
            state.insert("on".into(), Value::Bool(on));
            let e = Event::DeviceStateReported(DeviceStateReported { device_id: Uuid::from_u128(id), seq, device_ts: None, state, battery: b });
            let (t, v, p) = e.to_parts();
            prop_assert_eq!(Event::from_parts(t, v, p).unwrap(), e);
        }

        #[test]
        fn envelopes_round_trip(h in any::<u128>(), name in ".{0,40}") {
            let env = crate::Envelope::new(Uuid::from_u128(h), crate::Actor::System("seed".into()),
                &Event::HouseholdCreated(HouseholdCreated { name, created_by: None }), DateTime::from_timestamp(1_700_000_000, 0).unwrap());
            let back = crate::Envelope::from_json(&env.to_json()).unwrap();
            prop_assert_eq!(back.event().unwrap(), env.event().unwrap());
            prop_assert_eq!(back, env);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::Envelope::from_json(&bytes);
        }
    }
}
