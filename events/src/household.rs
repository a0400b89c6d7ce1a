//! Households, members and roles: the household aggregate and the product's
//! roles table (product.md, "Households, members and roles").
//!
//! [`Household::apply`] folds the household stream and refuses any event that
//! would break an invariant (a household without an owner, a used or expired
//! invitation, …). Both sides use it: command-api to decide a command against
//! the current state, the projector to fold the log. So an event that lost a
//! race (it was decided on a stale version) is refused by the fold in the same
//! way on every rebuild.
//!
//! [`Role::allows`] is the roles table; every authorization check in command-api
//! and query-api goes through it.

use crate::automation::{Definition, Fault};
use crate::device::DeviceKind;
use crate::scene::{Scene, SceneTarget, TargetFault};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A member's role in one household.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Adult,
    Child,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Owner, Role::Adult, Role::Child];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Adult => "adult",
            Role::Child => "child",
        }
    }

    /// The roles table. Deny by default: an action not listed is refused.
    pub fn allows(self, action: &Action<'_>) -> bool {
        use Role::*;
        match (self, action) {
            (Owner | Adult, Action::SeeDevice(_)) => true,
            (Child, Action::SeeDevice(kind)) => *kind != DeviceKind::Camera,
            (Owner | Adult, Action::Control(_, _)) => true,
            (Child, Action::Control(kind, set)) => match kind {
                DeviceKind::Light | DeviceKind::Plug => true,
                // Lock yes, unlock no: every value set must be `locked: true`.
                DeviceKind::Lock => !set.is_empty() && set.iter().all(|(k, v)| k == "locked" && *v == Value::Bool(true)),
                _ => false,
            },
            (Owner | Adult, Action::ManageDevices) => true,
            (Owner, Action::RemoveDevices | Action::ManageMembers | Action::ReadAudit) => true,
            (_, Action::SeeMembers) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| format!("unknown role `{s}` (owner, adult or child)"))
    }
}

/// Where a member is, as their app last reported it (a geofence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Home,
    Away,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Home => "home",
            Presence::Away => "away",
        }
    }
}

impl fmt::Display for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Presence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "home" => Ok(Presence::Home),
            "away" => Ok(Presence::Away),
            _ => Err(format!("unknown presence `{s}` (home or away)")),
        }
    }
}

/// What a member may try to do; the argument of [`Role::allows`].
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// See a device of this kind and its live status.
    SeeDevice(DeviceKind),
    /// Send a command setting these values to a device of this kind.
    Control(DeviceKind, &'a Map<String, Value>),
    /// Add, rename, move devices; manage rooms, scenes, automations.
    ManageDevices,
    RemoveDevices,
    /// Invite and remove members, change roles.
    ManageMembers,
    ReadAudit,
    /// See who the members are and their roles.
    SeeMembers,
}

/// Whether a command a member sent earlier may still go out, judged against
/// their role *now* (`None`: no longer a member); the reason when it may not.
/// A queued command is authorized again at the moment it would be sent, so
/// a removed or demoted member's queued unlock never reaches the lock.
pub fn revocation_reason(role: Option<Role>, kind: DeviceKind, set: &Map<String, Value>) -> Option<String> {
    match role {
        None => Some("its sender is no longer a member of the household".into()),
        Some(r) if !r.allows(&Action::SeeDevice(kind)) || !r.allows(&Action::Control(kind, set)) => {
            Some(format!("its sender's role ({r}) no longer allows this command to a {kind}"))
        }
        Some(_) => None,
    }
}

/// An invitation as the aggregate knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invitation {
    pub role: Role,
    pub code_hash: String,
    pub expires_at: DateTime<Utc>,
    pub used: bool,
}

/// A device as the aggregate knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisteredDevice {
    pub kind: DeviceKind,
    pub room_id: Option<Uuid>,
    pub removed: bool,
}

/// The household aggregate: what the write side decides against.
/// Serializable for the snapshots of past households (`past.rs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Household {
    pub exists: bool,
    /// Events applied on the household stream; the next event carries `version + 1`.
    pub version: u64,
    pub members: BTreeMap<Uuid, Role>,
    pub invitations: BTreeMap<Uuid, Invitation>,
    /// Rooms by id, with their names.
    pub rooms: BTreeMap<Uuid, String>,
    pub devices: BTreeMap<Uuid, RegisteredDevice>,
    /// Members' last reported presence (a member who never reported has none;
    /// a member who leaves takes theirs along).
    pub presence: BTreeMap<Uuid, Presence>,
    pub scenes: BTreeMap<Uuid, Scene>,
    pub automations: BTreeMap<Uuid, Automation>,
    /// An IANA name; `None` is UTC.
    pub time_zone: Option<String>,
}

/// An automation as the household aggregate holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Automation {
    pub name: String,
    pub enabled: bool,
    /// Whose rights it acts with (at the moment it runs).
    pub created_by: Uuid,
    pub definition: Definition,
}

/// Why an event may not apply to a household.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("the household already exists")]
    AlreadyExists,
    #[error("the household does not exist")]
    NoHousehold,
    #[error("the household changed meanwhile (expected version {expected}, event has {got})")]
    StaleVersion { expected: u64, got: u64 },
    #[error("a household must keep at least one owner")]
    LastOwner,
    #[error("the user is not a member of the household")]
    NotAMember,
    #[error("the user is already a member of the household")]
    AlreadyMember,
    #[error("the invitation does not exist")]
    UnknownInvitation,
    #[error("the invitation was already used")]
    InvitationUsed,
    #[error("the invitation has expired")]
    InvitationExpired,
    #[error("the member already has this role")]
    SameRole,
    #[error("the device does not exist")]
    UnknownDevice,
    #[error("the device was removed")]
    DeviceRemoved,
    #[error("a device with this id exists")]
    DeviceExists,
    #[error("the room does not exist")]
    UnknownRoom,
    #[error("a room with this name exists")]
    RoomNameTaken,
    #[error("the scene does not exist")]
    UnknownScene,
    #[error("a scene with this id exists")]
    SceneExists,
    #[error("a scene with this name exists")]
    SceneNameTaken,
    #[error("{0}")]
    InvalidScene(TargetFault),
    #[error("the automation does not exist")]
    UnknownAutomation,
    #[error("an automation with this id exists")]
    AutomationExists,
    #[error("an automation with this name exists")]
    AutomationNameTaken,
    #[error("{0}")]
    InvalidAutomation(Fault),
    #[error("unknown time zone `{0}` (an IANA name such as Europe/Berlin)")]
    UnknownTimeZone(String),
}

impl Household {
    /// The household's time zone (UTC until one is set).
    pub fn tz(&self) -> chrono_tz::Tz {
        self.time_zone.as_deref().and_then(|t| t.parse().ok()).unwrap_or(chrono_tz::UTC)
    }

    pub fn role_of(&self, user: Uuid) -> Option<Role> {
        self.members.get(&user).copied()
    }

    /// Members whose last report says they are home.
    pub fn members_home(&self) -> usize {
        self.presence.iter().filter(|(u, p)| **p == Presence::Home && self.members.contains_key(u)).count()
    }

    pub fn owners(&self) -> usize {
        self.members.values().filter(|r| **r == Role::Owner).count()
    }

    /// Folds one household-stream event. `seq` is the version the event
    /// claims (the envelope's `seq`); `at` is when it occurred. On error the
    /// aggregate is unchanged.
    pub fn apply(&mut self, event: &HouseholdEvent<'_>, seq: Option<u64>, at: DateTime<Utc>) -> Result<(), Violation> {
        if let Some(got) = seq {
            if got != self.version + 1 {
                return Err(Violation::StaleVersion { expected: self.version + 1, got });
            }
        }
        let mut next = self.clone();
        match event {
            HouseholdEvent::Created { created_by } => {
                if self.exists {
                    return Err(Violation::AlreadyExists);
                }
                next.exists = true;
                if let Some(owner) = created_by {
                    next.members.insert(*owner, Role::Owner);
                }
            }
            _ if !self.exists => return Err(Violation::NoHousehold),
            HouseholdEvent::Invited { invitation_id, role, code_hash, expires_at } => {
                next.invitations.insert(
                    *invitation_id,
                    Invitation { role: *role, code_hash: (*code_hash).to_owned(), expires_at: *expires_at, used: false },
                );
            }
            HouseholdEvent::Joined { user_id, role, invitation_id } => {
                if self.members.contains_key(user_id) {
                    return Err(Violation::AlreadyMember);
                }
                if let Some(inv_id) = invitation_id {
                    let inv = next.invitations.get_mut(inv_id).ok_or(Violation::UnknownInvitation)?;
                    if inv.used {
                        return Err(Violation::InvitationUsed);
                    }
                    if inv.expires_at <= at {
                        return Err(Violation::InvitationExpired);
                    }
                    inv.used = true;
                }
                next.members.insert(*user_id, *role);
            }
            HouseholdEvent::RoleChanged { user_id, role } => {
                let current = self.role_of(*user_id).ok_or(Violation::NotAMember)?;
                if current == *role {
                    return Err(Violation::SameRole);
                }
                if current == Role::Owner && self.owners() == 1 {
                    return Err(Violation::LastOwner);
                }
                next.members.insert(*user_id, *role);
            }
            HouseholdEvent::Removed { user_id } => {
                let current = self.role_of(*user_id).ok_or(Violation::NotAMember)?;
                if current == Role::Owner && self.owners() == 1 {
                    return Err(Violation::LastOwner);
                }
                next.members.remove(user_id);
                next.presence.remove(user_id);
            }
            HouseholdEvent::SceneCreated { scene_id, name, targets, child_allowed, create } => {
                if *create == self.scenes.contains_key(scene_id) {
                    return Err(if *create { Violation::SceneExists } else { Violation::UnknownScene });
                }
                let wanted = name.trim().to_lowercase();
                if self.scenes.iter().any(|(id, s)| id != scene_id && s.name.trim().to_lowercase() == wanted) {
                    return Err(Violation::SceneNameTaken);
                }
                // Values were checked at the edge; the fold checks what the
                // log orders: every device it adds still a live device (one
                // removed since it was added stays, and is skipped when
                // activated).
                let had = |d: Uuid| self.scenes.get(scene_id).is_some_and(|s| s.targets.iter().any(|t| t.device_id == d));
                for t in targets.iter().filter(|t| !had(t.device_id)) {
                    self.live_device(t.device_id)?;
                }
                next.scenes.insert(*scene_id, Scene { name: (*name).to_owned(), targets: targets.to_vec(), child_allowed: *child_allowed });
            }
            HouseholdEvent::SceneDeleted { scene_id } => {
                next.scenes.remove(scene_id).ok_or(Violation::UnknownScene)?;
            }
            HouseholdEvent::AutomationSaved { automation_id, name, enabled, created_by, definition } => {
                let old = self.automations.get(automation_id);
                let created_by = match (created_by, old) {
                    (Some(_), Some(_)) => return Err(Violation::AutomationExists),
                    (None, None) => return Err(Violation::UnknownAutomation),
                    (Some(c), None) => *c,
                    (None, Some(o)) => o.created_by,
                };
                let wanted = name.trim().to_lowercase();
                if self.automations.iter().any(|(id, a)| id != automation_id && a.name.trim().to_lowercase() == wanted) {
                    return Err(Violation::AutomationNameTaken);
                }
                next.automations.insert(
                    *automation_id,
                    Automation { name: (*name).to_owned(), enabled: *enabled, created_by, definition: (*definition).clone() },
                );
            }
            HouseholdEvent::AutomationDeleted { automation_id } => {
                next.automations.remove(automation_id).ok_or(Violation::UnknownAutomation)?;
            }
            HouseholdEvent::TimeZoneSet { time_zone } => {
                if time_zone.parse::<chrono_tz::Tz>().is_err() {
                    return Err(Violation::UnknownTimeZone((*time_zone).to_owned()));
                }
                next.time_zone = Some((*time_zone).to_owned());
            }
            HouseholdEvent::PresenceChanged { user_id, presence } => {
                self.role_of(*user_id).ok_or(Violation::NotAMember)?;
                next.presence.insert(*user_id, *presence);
            }
            HouseholdEvent::DeviceRegistered { device_id, kind, room_id } => {
                if self.devices.contains_key(device_id) {
                    return Err(Violation::DeviceExists);
                }
                self.check_room(*room_id)?;
                next.devices.insert(*device_id, RegisteredDevice { kind: *kind, room_id: *room_id, removed: false });
            }
            HouseholdEvent::DeviceRemoved { device_id } => {
                self.live_device(*device_id)?;
                if let Some(d) = next.devices.get_mut(device_id) {
                    d.removed = true;
                }
            }
            HouseholdEvent::DeviceRenamed { device_id } => {
                self.live_device(*device_id)?;
            }
            HouseholdEvent::DeviceMoved { device_id, room_id } => {
                self.live_device(*device_id)?;
                self.check_room(*room_id)?;
                if let Some(d) = next.devices.get_mut(device_id) {
                    d.room_id = *room_id;
                }
            }
            HouseholdEvent::RoomCreated { room_id, name } => {
                if self.rooms.contains_key(room_id) {
                    return Err(Violation::RoomNameTaken);
                }
                self.check_room_name(None, name)?;
                next.rooms.insert(*room_id, (*name).to_owned());
            }
            HouseholdEvent::RoomRenamed { room_id, name } => {
                self.check_room(Some(*room_id))?;
                self.check_room_name(Some(*room_id), name)?;
                next.rooms.insert(*room_id, (*name).to_owned());
            }
            HouseholdEvent::RoomDeleted { room_id } => {
                self.check_room(Some(*room_id))?;
                next.rooms.remove(room_id);
                for d in next.devices.values_mut().filter(|d| d.room_id == Some(*room_id)) {
                    d.room_id = None;
                }
            }
        }
        next.version = seq.unwrap_or(self.version + 1);
        *self = next;
        Ok(())
    }
}

impl Household {
    fn live_device(&self, id: Uuid) -> Result<&RegisteredDevice, Violation> {
        match self.devices.get(&id) {
            None => Err(Violation::UnknownDevice),
            Some(d) if d.removed => Err(Violation::DeviceRemoved),
            Some(d) => Ok(d),
        }
    }

    fn check_room(&self, room: Option<Uuid>) -> Result<(), Violation> {
        match room {
            Some(r) if !self.rooms.contains_key(&r) => Err(Violation::UnknownRoom),
            _ => Ok(()),
        }
    }

    /// Room names are unique in a household, ignoring case and surrounding space.
    fn check_room_name(&self, except: Option<Uuid>, name: &str) -> Result<(), Violation> {
        let wanted = name.trim().to_lowercase();
        if self.rooms.iter().any(|(id, n)| Some(*id) != except && n.trim().to_lowercase() == wanted) {
            return Err(Violation::RoomNameTaken);
        }
        Ok(())
    }
}

/// A borrowed view of the events that make up the household stream.
#[derive(Debug, Clone, Copy)]
pub enum HouseholdEvent<'a> {
    Created {
        created_by: Option<Uuid>,
    },
    Invited {
        invitation_id: Uuid,
        role: Role,
        code_hash: &'a str,
        expires_at: DateTime<Utc>,
    },
    Joined {
        user_id: Uuid,
        role: Role,
        invitation_id: Option<Uuid>,
    },
    RoleChanged {
        user_id: Uuid,
        role: Role,
    },
    Removed {
        user_id: Uuid,
    },
    DeviceRegistered {
        device_id: Uuid,
        kind: DeviceKind,
        room_id: Option<Uuid>,
    },
    DeviceRemoved {
        device_id: Uuid,
    },
    DeviceRenamed {
        device_id: Uuid,
    },
    DeviceMoved {
        device_id: Uuid,
        room_id: Option<Uuid>,
    },
    RoomCreated {
        room_id: Uuid,
        name: &'a str,
    },
    RoomRenamed {
        room_id: Uuid,
        name: &'a str,
    },
    RoomDeleted {
        room_id: Uuid,
    },
    PresenceChanged {
        user_id: Uuid,
        presence: Presence,
    },
    /// A scene made (`create`) or changed: the whole scene after it.
    SceneCreated {
        scene_id: Uuid,
        name: &'a str,
        targets: &'a [SceneTarget],
        child_allowed: bool,
        create: bool,
    },
    SceneDeleted {
        scene_id: Uuid,
    },
    /// An automation made (`created_by` given) or changed: the whole of it.
    AutomationSaved {
        automation_id: Uuid,
        name: &'a str,
        enabled: bool,
        created_by: Option<Uuid>,
        definition: &'a Definition,
    },
    AutomationDeleted {
        automation_id: Uuid,
    },
    TimeZoneSet {
        time_zone: &'a str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn a_queued_command_is_judged_by_its_senders_role_now() {
        let unlock = json!({"locked": false}).as_object().cloned().unwrap();
        let lock = json!({"locked": true}).as_object().cloned().unwrap();
        assert_eq!(revocation_reason(Some(Role::Adult), DeviceKind::Lock, &unlock), None);
        assert!(revocation_reason(None, DeviceKind::Lock, &unlock).is_some_and(|r| r.contains("no longer a member")));
        assert!(revocation_reason(Some(Role::Child), DeviceKind::Lock, &unlock).is_some_and(|r| r.contains("child")));
        // A child may still lock.
        assert_eq!(revocation_reason(Some(Role::Child), DeviceKind::Lock, &lock), None);
        let record = json!({"recording": true}).as_object().cloned().unwrap();
        assert!(revocation_reason(Some(Role::Child), DeviceKind::Camera, &record).is_some());
    }

    fn with_owners(n: u128) -> Household {
        let mut h = Household::default();
        h.apply(&HouseholdEvent::Created { created_by: Some(Uuid::from_u128(1)) }, Some(1), at()).unwrap();
        for i in 2..=n {
            let inv = Uuid::from_u128(100 + i);
            h.apply(
                &HouseholdEvent::Invited {
                    invitation_id: inv,
                    role: Role::Owner,
                    code_hash: "x",
                    expires_at: at() + chrono::Duration::hours(1),
                },
                Some(h.version + 1),
                at(),
            )
            .unwrap();
            h.apply(
                &HouseholdEvent::Joined { user_id: Uuid::from_u128(i), role: Role::Owner, invitation_id: Some(inv) },
                Some(h.version + 1),
                at(),
            )
            .unwrap();
        }
        h
    }

    #[test]
    fn the_last_owner_can_be_neither_demoted_nor_removed() {
        let mut h = with_owners(2);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        h.apply(&HouseholdEvent::RoleChanged { user_id: b, role: Role::Adult }, None, at()).unwrap();
        assert_eq!(h.apply(&HouseholdEvent::RoleChanged { user_id: a, role: Role::Adult }, None, at()), Err(Violation::LastOwner));
        assert_eq!(h.apply(&HouseholdEvent::Removed { user_id: a }, None, at()), Err(Violation::LastOwner));
        assert_eq!(h.owners(), 1);
    }

    #[test]
    fn an_event_decided_on_a_stale_version_is_refused_and_changes_nothing() {
        let mut h = with_owners(2);
        let v = h.version;
        h.apply(&HouseholdEvent::RoleChanged { user_id: Uuid::from_u128(2), role: Role::Adult }, Some(v + 1), at()).unwrap();
        let before = h.clone();
        let r = h.apply(&HouseholdEvent::Removed { user_id: Uuid::from_u128(2) }, Some(v + 1), at());
        assert!(matches!(r, Err(Violation::StaleVersion { .. })));
        assert_eq!(h, before);
    }

    #[test]
    fn an_invitation_is_used_once_and_not_after_it_expires() {
        let mut h = with_owners(1);
        let inv = Uuid::from_u128(9);
        h.apply(&HouseholdEvent::Invited { invitation_id: inv, role: Role::Child, code_hash: "h", expires_at: at() }, None, at()).unwrap();
        let join = |u| HouseholdEvent::Joined { user_id: Uuid::from_u128(u), role: Role::Child, invitation_id: Some(inv) };
        assert_eq!(h.clone().apply(&join(5), None, at()), Err(Violation::InvitationExpired));
        assert!(h.apply(&join(5), None, at() - chrono::Duration::seconds(1)).is_ok());
        assert_eq!(h.apply(&join(6), None, at() - chrono::Duration::seconds(1)), Err(Violation::InvitationUsed));
    }

    #[test]
    fn deleting_a_room_unassigns_its_devices_and_removed_devices_stay_removed() {
        let mut h = with_owners(1);
        let (room, dev) = (Uuid::from_u128(50), Uuid::from_u128(60));
        h.apply(&HouseholdEvent::RoomCreated { room_id: room, name: "Hall" }, None, at()).unwrap();
        assert_eq!(
            h.apply(&HouseholdEvent::RoomCreated { room_id: Uuid::from_u128(51), name: " hall " }, None, at()),
            Err(Violation::RoomNameTaken)
        );
        h.apply(&HouseholdEvent::DeviceRegistered { device_id: dev, kind: DeviceKind::Lock, room_id: Some(room) }, None, at()).unwrap();
        h.apply(&HouseholdEvent::RoomDeleted { room_id: room }, None, at()).unwrap();
        assert_eq!(h.devices[&dev].room_id, None);
        assert_eq!(h.apply(&HouseholdEvent::DeviceMoved { device_id: dev, room_id: Some(room) }, None, at()), Err(Violation::UnknownRoom));
        h.apply(&HouseholdEvent::DeviceRemoved { device_id: dev }, None, at()).unwrap();
        assert_eq!(h.apply(&HouseholdEvent::DeviceRenamed { device_id: dev }, None, at()), Err(Violation::DeviceRemoved));
        assert_eq!(h.apply(&HouseholdEvent::DeviceRemoved { device_id: dev }, None, at()), Err(Violation::DeviceRemoved));
    }

    #[test]
    fn presence_is_a_members_and_leaves_with_them() {
        let mut h = with_owners(2);
        let (a, b, stranger) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(99));
        assert_eq!(h.members_home(), 0, "nobody reported: nobody is home");
        h.apply(&HouseholdEvent::PresenceChanged { user_id: a, presence: Presence::Home }, None, at()).unwrap();
        h.apply(&HouseholdEvent::PresenceChanged { user_id: b, presence: Presence::Home }, None, at()).unwrap();
        assert_eq!(h.members_home(), 2);
        h.apply(&HouseholdEvent::PresenceChanged { user_id: b, presence: Presence::Away }, None, at()).unwrap();
        assert_eq!(h.members_home(), 1);
        assert_eq!(
            h.apply(&HouseholdEvent::PresenceChanged { user_id: stranger, presence: Presence::Home }, None, at()),
            Err(Violation::NotAMember)
        );
        h.apply(&HouseholdEvent::RoleChanged { user_id: a, role: Role::Adult }, None, at()).unwrap();
        h.apply(&HouseholdEvent::Removed { user_id: a }, None, at()).unwrap();
        assert_eq!(h.members_home(), 0, "a member who left is nobody's presence");
        assert!(!h.presence.contains_key(&a));
    }

    #[test]
    fn the_roles_table() {
        let none = Map::new();
        let lock: Map<String, Value> = serde_json::from_value(json!({"locked": true})).unwrap();
        let unlock: Map<String, Value> = serde_json::from_value(json!({"locked": false})).unwrap();
        use DeviceKind::*;
        use Role::*;
        assert!(Child.allows(&Action::SeeDevice(Light)) && !Child.allows(&Action::SeeDevice(Camera)));
        assert!(Adult.allows(&Action::SeeDevice(Camera)));
        assert!(Child.allows(&Action::Control(Light, &none)) && Child.allows(&Action::Control(Plug, &none)));
        assert!(!Child.allows(&Action::Control(Thermostat, &none)) && !Child.allows(&Action::Control(Camera, &none)));
        assert!(Child.allows(&Action::Control(Lock, &lock)) && !Child.allows(&Action::Control(Lock, &unlock)));
        assert!(Adult.allows(&Action::Control(Lock, &unlock)) && Adult.allows(&Action::Control(Camera, &none)));
        assert!(Adult.allows(&Action::ManageDevices) && !Child.allows(&Action::ManageDevices));
        for a in [Action::RemoveDevices, Action::ManageMembers, Action::ReadAudit] {
            assert!(Owner.allows(&a) && !Adult.allows(&a) && !Child.allows(&a));
        }
    }
}
