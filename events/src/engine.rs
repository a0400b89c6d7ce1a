//! The engine's decisions, pure: which triggers a fact fires, whether a
//! trigger still holds when its `for` / debounce is due, and the ids a run's
//! outputs get (derived, so a decision repeated after a crash appends the
//! same events and commands again, which every consumer ignores).

use crate::automation::{compares, Movement, Trigger, Who};
use crate::household::{Household, Presence};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::HashMap;
use uuid::Uuid;

/// Deepest causation chain an automation may start: a run caused by a
/// report that an automation's own command caused, and so on.
pub const MAX_DEPTH: u32 = 4;

/// Something that happened in a household, as triggers see it.
#[derive(Debug, Clone)]
pub enum Fact<'a> {
    /// A device reported: its state before and after the report.
    Reported { device: Uuid, before: Option<&'a Map<String, Value>>, after: &'a Map<String, Value> },
    /// A device went online or offline (`was`: before, if known).
    Status { device: Uuid, online: bool, was: Option<bool> },
    /// A member's presence changed: before and after, and how many were home.
    Presence { user: Uuid, now: Presence, was: Option<Presence>, home_before: usize, home_after: usize },
}

/// A trigger a fact fired: its index, what it saw, and how long it must hold
/// (`forSecs`, a presence debounce) before the run starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub trigger: usize,
    pub what: String,
    pub hold_secs: u32,
    /// The member a presence trigger is about (its hold is checked for them).
    pub user: Option<Uuid>,
}

/// Whether `trigger` fires on `fact`.
pub fn fires(trigger: &Trigger, fact: &Fact<'_>) -> Option<(String, u32, Option<Uuid>)> {
    match (trigger, fact) {
        (Trigger::State { device_id, capability, to, above, below, for_secs }, Fact::Reported { device, before, after }) => {
            if device_id != device {
                return None;
            }
            let now = after.get(capability)?;
            let was = before.and_then(|b| b.get(capability));
            let constrained = to.is_some() || above.is_some() || below.is_some();
            let fired = if constrained {
                compares(Some(now), to.as_ref(), *above, *below) && !compares(was, to.as_ref(), *above, *below)
            } else {
                was != Some(now)
            };
            fired.then(|| (format!("{capability}: {now}"), for_secs.unwrap_or(0), None))
        }
        (Trigger::Status { device_id, online, for_secs }, Fact::Status { device, online: now, was }) => {
            (device_id == device && online == now && *was != Some(*now))
                .then(|| (if *now { "came online" } else { "went offline" }.to_owned(), for_secs.unwrap_or(0), None))
        }
        (Trigger::Presence { who, movement, user_id, debounce_secs }, Fact::Presence { user, now, was, home_before, home_after }) => {
            let hold = debounce_secs.unwrap_or(crate::automation::DEFAULT_DEBOUNCE_SECS);
            let target = match movement {
                Movement::Arrive => Presence::Home,
                Movement::Leave => Presence::Away,
            };
            let moved = *now == target && *was != Some(target);
            let fired = match who {
                Who::Anyone => moved,
                Who::Member => moved && *user_id == Some(*user),
                Who::First => *movement == Movement::Arrive && *home_before == 0 && *home_after >= 1,
                Who::Last => *movement == Movement::Leave && *home_before >= 1 && *home_after == 0,
            };
            let what = match who {
                Who::First => "the first member arrived".to_owned(),
                Who::Last => "the last member left".to_owned(),
                _ => format!("member {user} {}", if target == Presence::Home { "arrived" } else { "left" }),
            };
            fired.then_some((what, hold, Some(*user)))
        }
        _ => None,
    }
}

/// What the engine knows of a household's devices now.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    pub state: HashMap<Uuid, Map<String, Value>>,
    pub online: HashMap<Uuid, bool>,
}

/// Whether a trigger that fired still holds now (its `for` or debounce is
/// due): the state still matches, the device is still offline, the member
/// is still away, the house still empty.
pub fn still_holds(trigger: &Trigger, household: &Household, devices: &Devices, user: Option<Uuid>) -> bool {
    match trigger {
        Trigger::State { device_id, capability, to, above, below, .. } => {
            let v = devices.state.get(device_id).and_then(|s| s.get(capability));
            if to.is_none() && above.is_none() && below.is_none() {
                return v.is_some();
            }
            compares(v, to.as_ref(), *above, *below)
        }
        Trigger::Status { device_id, online, .. } => devices.online.get(device_id) == Some(online),
        Trigger::Presence { who, movement, .. } => {
            let target = match movement {
                Movement::Arrive => Presence::Home,
                Movement::Leave => Presence::Away,
            };
            match who {
                Who::First => household.members_home() >= 1,
                Who::Last => household.members_home() == 0,
                Who::Anyone | Who::Member => {
                    user.is_some_and(|u| household.members.contains_key(&u) && household.presence.get(&u) == Some(&target))
                }
            }
        }
        Trigger::Time { .. } => true,
    }
}

/// A derived id: the same inputs always name the same run, command, timer.
pub fn derived(namespace: Uuid, what: &str) -> Uuid {
    Uuid::new_v5(&namespace, what.as_bytes())
}

/// A run's id: the automation, the trigger and what fired it (an event, or a
/// schedule's instant).
pub fn run_id(automation: Uuid, trigger: usize, cause: &str) -> Uuid {
    derived(automation, &format!("run/{trigger}/{cause}"))
}

/// When a hold that began at `at` is due.
pub fn due(at: DateTime<Utc>, secs: u32) -> DateTime<Utc> {
    at + chrono::Duration::seconds(i64::from(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::household::HouseholdEvent;
    use serde_json::json;

    const SENSOR: Uuid = Uuid::from_u128(5);

    fn trigger(v: Value) -> Trigger {
        serde_json::from_value(v).unwrap()
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn given_motion_when_it_starts_then_a_to_true_trigger_fires_once() {
        let t = trigger(json!({"type": "state", "deviceId": SENSOR, "capability": "motion", "to": true}));
        let (off, on) = (map(json!({"motion": false})), map(json!({"motion": true})));
        let fired = fires(&t, &Fact::Reported { device: SENSOR, before: Some(&off), after: &on });
        assert_eq!(fired, Some(("motion: true".into(), 0, None)));
        assert_eq!(fires(&t, &Fact::Reported { device: SENSOR, before: Some(&on), after: &on }), None, "no change, no fire");
        assert_eq!(fires(&t, &Fact::Reported { device: Uuid::nil(), before: Some(&off), after: &on }), None);
    }

    #[test]
    fn given_a_threshold_then_it_fires_on_crossing_and_a_for_holds_first() {
        let t = trigger(json!({"type": "state", "deviceId": SENSOR, "capability": "temperature", "below": 18, "forSecs": 600}));
        let (warm, cold) = (map(json!({"temperature": 19.0})), map(json!({"temperature": 17.5})));
        assert_eq!(fires(&t, &Fact::Reported { device: SENSOR, before: Some(&warm), after: &cold }).map(|f| f.1), Some(600));
        assert_eq!(fires(&t, &Fact::Reported { device: SENSOR, before: Some(&cold), after: &cold }), None);
        let h = Household::default();
        let mut d = Devices::default();
        d.state.insert(SENSOR, warm);
        assert!(!still_holds(&t, &h, &d, None), "warmed up again before the 10 minutes");
        d.state.insert(SENSOR, cold);
        assert!(still_holds(&t, &h, &d, None));
    }

    #[test]
    fn given_two_members_when_both_leave_then_last_leaves_fires_once_and_holds_while_empty() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let t = trigger(json!({"type": "presence", "who": "last", "movement": "leave"}));
        let first = Fact::Presence { user: a, now: Presence::Away, was: Some(Presence::Home), home_before: 2, home_after: 1 };
        assert_eq!(fires(&t, &first), None);
        let second = Fact::Presence { user: b, now: Presence::Away, was: Some(Presence::Home), home_before: 1, home_after: 0 };
        assert_eq!(fires(&t, &second), Some(("the last member left".into(), 120, Some(b))));
        let mut h = Household::default();
        h.apply(&HouseholdEvent::Created { created_by: Some(a) }, None, Utc::now()).unwrap();
        assert!(still_holds(&t, &h, &Devices::default(), Some(b)), "nobody home");
        h.presence.insert(a, Presence::Home);
        assert!(!still_holds(&t, &h, &Devices::default(), Some(b)), "a GPS glitch: back within the debounce");
    }

    #[test]
    fn given_a_member_trigger_then_only_that_member_and_a_device_going_offline() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let t = trigger(json!({"type": "presence", "who": "member", "userId": a, "movement": "arrive", "debounceSecs": 0}));
        let arrive = |user| Fact::Presence { user, now: Presence::Home, was: Some(Presence::Away), home_before: 0, home_after: 1 };
        assert!(fires(&t, &arrive(a)).is_some());
        assert!(fires(&t, &arrive(b)).is_none());
        let off = trigger(json!({"type": "status", "deviceId": SENSOR, "online": false}));
        assert!(fires(&off, &Fact::Status { device: SENSOR, online: false, was: Some(true) }).is_some());
        assert!(fires(&off, &Fact::Status { device: SENSOR, online: false, was: Some(false) }).is_none());
    }

    #[test]
    fn derived_ids_are_stable() {
        let a = Uuid::from_u128(9);
        assert_eq!(run_id(a, 0, "x"), run_id(a, 0, "x"));
        assert_ne!(run_id(a, 0, "x"), run_id(a, 1, "x"));
    }
}
