//! Scenes, pure: what a scene may hold, and what activating one decides.
//!
//! A scene is a named set of target states, one `{deviceId, set}` per device
//! of the household. [`check_targets`] validates them like commands (the
//! capability table, the device's kind); [`activate`] turns a scene into one
//! command per device for a member, or says why the member may not. The
//! caller appends `SceneActivated` and then the commands, each with the
//! activation as its causation.

use crate::command::{decide, Life, Refused};
use crate::event::DeviceCommandRequested;
use crate::household::{Action, Household, Role};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use uuid::Uuid;

/// Most devices a scene may hold.
pub const MAX_SCENE_DEVICES: usize = 100;

/// A scene's commands live 30 s unless asked (at most 5 minutes): long
/// enough for the bridge to send one again to a device that did not answer.
pub const SCENE_LIFE: Life = Life { default_secs: 30, max_secs: 300 };

/// One device's part of a scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SceneTarget {
    pub device_id: Uuid,
    pub set: Map<String, Value>,
}

/// A scene as the household aggregate holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub name: String,
    pub targets: Vec<SceneTarget>,
    pub child_allowed: bool,
}

/// Why a scene's targets are not acceptable, with the JSON pointer of the
/// fault in the request body (`/devices/2/set/brightness`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetFault {
    /// No device takes it (what the request's schema says): 400.
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    /// Well formed, but not for this household: a device it does not have
    /// (or named twice), a capability the device's kind lacks: 422.
    #[error("{path}: {reason}")]
    Unfit { path: String, reason: String },
}

/// Checks a scene's targets against the household (every device one of its
/// live devices, none twice, at least one and at most [`MAX_SCENE_DEVICES`],
/// every `set` a valid command to that device); integer capabilities given
/// as whole floats become integers.
pub fn check_targets(household: &Household, targets: &mut [SceneTarget]) -> Result<(), TargetFault> {
    let invalid = |path: String, reason: &str| TargetFault::Invalid { path, reason: reason.to_owned() };
    let unfit = |path: String, reason: &str| TargetFault::Unfit { path, reason: reason.to_owned() };
    if targets.is_empty() || targets.len() > MAX_SCENE_DEVICES {
        return Err(invalid("/devices".into(), &format!("a scene holds 1 to {MAX_SCENE_DEVICES} devices")));
    }
    let mut seen = BTreeSet::new();
    for (i, t) in targets.iter_mut().enumerate() {
        let device = match household.devices.get(&t.device_id) {
            Some(d) if !d.removed => d,
            _ => return Err(unfit(format!("/devices/{i}/deviceId"), "no such device in the household")),
        };
        if !seen.insert(t.device_id) {
            return Err(unfit(format!("/devices/{i}/deviceId"), "the device is already in the scene"));
        }
        let set = std::mem::take(&mut t.set);
        match decide(device.kind, t.device_id, Uuid::nil(), set, None, SCENE_LIFE, DateTime::UNIX_EPOCH) {
            Ok(c) => t.set = c.set,
            Err(Refused::Invalid(reason)) => return Err(TargetFault::Invalid { path: format!("/devices/{i}/set"), reason }),
            Err(Refused::Unsupported(reason)) => return Err(TargetFault::Unfit { path: format!("/devices/{i}/set"), reason }),
        }
    }
    Ok(())
}

/// Why a member may not activate a scene.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotActivated {
    #[error("the scene does not exist")]
    UnknownScene,
    #[error("{0}")]
    Forbidden(String),
}

/// A device of the scene that gets no command, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    pub device_id: Uuid,
    pub reason: String,
}

/// What an activation decided: the commands to append (in the scene's
/// order) and the devices left out, each with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub commands: Vec<DeviceCommandRequested>,
    pub skipped: Vec<Skipped>,
}

/// Activates scene `scene_id` for a member of role `role`: owners and adults
/// any scene; a child only a `childAllowed` scene all of whose devices a
/// child may control. `online` says whether a device is connected now (an
/// offline one's command is queued); `command_id` names each device's
/// command. A device removed since the scene was made is skipped, named.
pub fn activate(
    household: &Household,
    scene_id: Uuid,
    role: Role,
    ttl_secs: Option<u32>,
    now: DateTime<Utc>,
    online: impl Fn(Uuid) -> bool,
    mut command_id: impl FnMut(Uuid) -> Uuid,
) -> Result<Activation, NotActivated> {
    let scene = household.scenes.get(&scene_id).ok_or(NotActivated::UnknownScene)?;
    if role == Role::Child && !scene.child_allowed {
        return Err(NotActivated::Forbidden("a child may activate only a scene marked childAllowed".into()));
    }
    let mut out = Activation { commands: Vec::new(), skipped: Vec::new() };
    for t in &scene.targets {
        let Some(device) = household.devices.get(&t.device_id).filter(|d| !d.removed) else {
            out.skipped.push(Skipped { device_id: t.device_id, reason: "the device was removed from the household".into() });
            continue;
        };
        if !role.allows(&Action::SeeDevice(device.kind)) || !role.allows(&Action::Control(device.kind, &t.set)) {
            return Err(NotActivated::Forbidden(format!("a member with role {role} may not control every device of this scene")));
        }
        match decide(device.kind, t.device_id, command_id(t.device_id), t.set.clone(), ttl_secs, SCENE_LIFE, now) {
            Ok(mut c) => {
                c.queued = !online(t.device_id);
                out.commands.push(c);
            }
            // Checked when the scene was stored; a kind's table that changed since.
            Err(e) => out.skipped.push(Skipped { device_id: t.device_id, reason: e.to_string() }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceKind;
    use crate::household::{HouseholdEvent, RegisteredDevice};
    use serde_json::json;

    fn set(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    const LIGHT: Uuid = Uuid::from_u128(10);
    const LOCK: Uuid = Uuid::from_u128(11);
    const SCENE: Uuid = Uuid::from_u128(20);

    fn home(child_allowed: bool, lock: Value) -> Household {
        let mut h = Household::default();
        let at = DateTime::UNIX_EPOCH;
        h.apply(&HouseholdEvent::Created { created_by: Some(Uuid::from_u128(1)) }, None, at).unwrap();
        h.devices.insert(LIGHT, RegisteredDevice { kind: DeviceKind::Light, room_id: None, removed: false });
        h.devices.insert(LOCK, RegisteredDevice { kind: DeviceKind::Lock, room_id: None, removed: false });
        let targets =
            vec![SceneTarget { device_id: LIGHT, set: set(json!({"on": false})) }, SceneTarget { device_id: LOCK, set: set(lock) }];
        h.scenes.insert(SCENE, Scene { name: "Good night".into(), targets, child_allowed });
        h
    }

    fn run(h: &Household, role: Role) -> Result<Activation, NotActivated> {
        activate(h, SCENE, role, None, DateTime::UNIX_EPOCH, |d| d == LIGHT, |d| d)
    }

    #[test]
    fn given_a_scene_when_an_adult_activates_it_then_one_command_per_device_queued_when_offline() {
        let a = run(&home(false, json!({"locked": true})), Role::Adult).unwrap();
        assert_eq!(a.commands.len(), 2);
        assert_eq!((a.commands[0].device_id, a.commands[0].queued), (LIGHT, false));
        assert_eq!((a.commands[1].device_id, a.commands[1].queued), (LOCK, true));
        assert_eq!(a.commands[0].expires_at, DateTime::UNIX_EPOCH + chrono::Duration::seconds(30));
        assert!(a.skipped.is_empty());
    }

    #[test]
    fn given_a_child_then_only_a_child_allowed_scene_of_devices_a_child_may_control() {
        assert!(matches!(run(&home(false, json!({"locked": true})), Role::Child), Err(NotActivated::Forbidden(_))));
        assert_eq!(run(&home(true, json!({"locked": true})), Role::Child).map(|a| a.commands.len()), Ok(2));
        // Marked childAllowed, but it unlocks: a child may not.
        assert!(matches!(run(&home(true, json!({"locked": false})), Role::Child), Err(NotActivated::Forbidden(_))));
    }

    #[test]
    fn given_a_device_removed_since_then_it_is_named_not_silently_skipped() {
        let mut h = home(false, json!({"locked": true}));
        h.devices.get_mut(&LOCK).unwrap().removed = true;
        let a = run(&h, Role::Owner).unwrap();
        assert_eq!(a.commands.len(), 1);
        assert_eq!(a.skipped, vec![Skipped { device_id: LOCK, reason: "the device was removed from the household".into() }]);
        assert_eq!(run(&h, Role::Owner).map(|_| ()), Ok(()));
        assert_eq!(activate(&h, Uuid::nil(), Role::Owner, None, Utc::now(), |_| true, |d| d).err(), Some(NotActivated::UnknownScene));
    }

    #[test]
    fn targets_are_checked_like_commands_with_the_path_of_the_fault() {
        let h = home(false, json!({"locked": true}));
        let fault = |v: Value| check_targets(&h, &mut serde_json::from_value::<Vec<SceneTarget>>(v).unwrap()).err();
        assert_eq!(fault(json!([{"deviceId": LIGHT, "set": {"brightness": 40.0}}])), None);
        assert!(matches!(fault(json!([])), Some(TargetFault::Invalid { path, .. }) if path == "/devices"));
        assert!(matches!(fault(json!([{"deviceId": LIGHT, "set": {"on": true}}, {"deviceId": Uuid::nil(), "set": {"on": true}}])),
                Some(TargetFault::Unfit { path, .. }) if path == "/devices/1/deviceId"));
        assert!(matches!(fault(json!([{"deviceId": LIGHT, "set": {"on": true}}, {"deviceId": LIGHT, "set": {"on": false}}])),
                Some(TargetFault::Unfit { path, .. }) if path == "/devices/1/deviceId"));
        assert!(
            matches!(fault(json!([{"deviceId": LIGHT, "set": {"brightness": 101}}])), Some(TargetFault::Invalid { path, .. }) if path == "/devices/0/set")
        );
        assert!(
            matches!(fault(json!([{"deviceId": LIGHT, "set": {"locked": true}}])), Some(TargetFault::Unfit { path, .. }) if path == "/devices/0/set")
        );
        let mut whole: Vec<SceneTarget> = serde_json::from_value(json!([{"deviceId": LIGHT, "set": {"brightness": 40.0}}])).unwrap();
        check_targets(&h, &mut whole).unwrap();
        assert!(whole[0].set["brightness"].is_i64());
    }
}
