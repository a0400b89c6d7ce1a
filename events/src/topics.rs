//! Topic names and record keys.
//!
//! Every topic name starts with a deployment prefix so several stacks (the dev
//! stack and each test) can share one broker without seeing each other.

use uuid::Uuid;

/// The topic names of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// `prefix` is used verbatim; by convention it ends with a dot (`homelink.`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Household lifecycle and registry events (household created, device registered).
    pub fn households(&self) -> String {
        format!("{}households", self.prefix)
    }

    /// Everything a device sent: state reports, command acks, online/offline.
    pub fn telemetry(&self) -> String {
        format!("{}telemetry", self.prefix)
    }

    /// Commands requested by users, to be delivered to devices.
    pub fn commands(&self) -> String {
        format!("{}commands", self.prefix)
    }

    /// Device messages the bridge could not accept, with the reason.
    pub fn dead_letter(&self) -> String {
        format!("{}dead-letter", self.prefix)
    }

    /// Refused commands, for the audit log (accepted ones are their own events).
    pub fn audit(&self) -> String {
        format!("{}audit", self.prefix)
    }

    /// The topics the projector folds into read models.
    pub fn projected(&self) -> [String; 4] {
        [self.households(), self.telemetry(), self.commands(), self.audit()]
    }

    /// Every topic of a deployment, for creating them.
    pub fn all(&self) -> [String; 5] {
        [self.households(), self.telemetry(), self.commands(), self.audit(), self.dead_letter()]
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self::new("homelink.")
    }
}

/// The Postgres notification channel on which the projector announces
/// committed shadow changes: one notification per batch, packed by
/// [`crate::shadow::pack_notifications`] (one line per change).
pub const SHADOW_CHANGED_CHANNEL: &str = "homelink_shadow_changed";

/// The Postgres notification channel of committed membership changes
/// (payload: [`MembershipChanged`] JSON); subscriptions re-check their caller's role.
pub const MEMBERSHIP_CHANGED_CHANNEL: &str = "homelink_membership_changed";

/// The Postgres notification channel of committed registry changes (payload:
/// [`RegistryChanged`] JSON).
pub const REGISTRY_CHANGED_CHANNEL: &str = "homelink_registry_changed";

/// The Postgres notification channel on which the projector announces every
/// committed batch (empty payload): reads waiting for a consistency token
/// look again.
pub const APPLIED_CHANNEL: &str = "homelink_applied";

/// The Postgres notification channel of committed command lifecycle steps
/// (payload: [`CommandChanged`] JSON).
pub const COMMAND_CHANGED_CHANNEL: &str = "homelink_command_changed";

/// A command's status as a batch left it (requested, queued, delivered,
/// ok, rejected, failed, expired, superseded or confirmed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandChanged {
    pub household_id: Uuid,
    pub device_id: Uuid,
    pub command_id: Uuid,
    pub status: String,
    /// The household's change sequence number (see [`crate::shadow::ShadowChanged::change_seq`]).
    #[serde(default)]
    pub change_seq: u64,
    /// The scene activation that sent the command, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caused_by: Option<Uuid>,
}

/// A device or room of a household was added, changed or removed, or a
/// member's presence was reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryChanged {
    pub household_id: Uuid,
    /// The event type, e.g. `DeviceRegistered`, `RoomDeleted`.
    pub change: String,
    #[serde(default)]
    pub device_id: Option<Uuid>,
    #[serde(default)]
    pub room_id: Option<Uuid>,
    /// The household version after the change.
    pub version: u64,
    /// The household's change sequence number (see [`crate::shadow::ShadowChanged::change_seq`]).
    #[serde(default)]
    pub change_seq: u64,
    /// The member a `PresenceChanged` is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// Their presence after it (`home` or `away`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<String>,
    /// The scene a `SceneCreated`, `SceneChanged` or `SceneDeleted` is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scene_id: Option<Uuid>,
    /// The automation an `AutomationCreated`, `…Changed` or `…Deleted` is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automation_id: Option<Uuid>,
}

/// A member of a household joined, changed role or left.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipChanged {
    pub household_id: Uuid,
    pub user_id: Uuid,
}

/// The record key of every HomeLink event: the household id, so one household's
/// history is ordered within one partition.
pub fn household_key(household_id: Uuid) -> String {
    household_id.hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let t = Topics::new("t1.");
        assert_eq!(t.telemetry(), "t1.telemetry");
        assert_eq!(t.all().len(), 5);
        assert!(t.all().iter().all(|n| n.starts_with("t1.")));
    }

    #[test]
    fn key_is_the_hyphenated_household_id() {
        let id = Uuid::nil();
        assert_eq!(household_key(id), "00000000-0000-0000-0000-000000000000");
    }
}
