//! Automations, pure: what a definition may say, its validation against the
//! household (with the JSON pointer of a fault), conditions judged against
//! a snapshot of the house, and schedules in the household's time zone that
//! daylight-saving changes neither skip nor double.
//!
//! A definition is triggers + conditions + actions + a mode. The engine
//! (issue 17, `automation/`) decides with these functions; command-api
//! validates with them before anything is stored.

use crate::command::{decide, Refused, COMMAND_LIFE};
use crate::household::{Household, Presence};
use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeZone, Timelike, Utc, Weekday};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Bounds of a definition: more is refused at the edge.
pub const MAX_TRIGGERS: usize = 10;
pub const MAX_CONDITIONS: usize = 50;
pub const MAX_CONDITION_DEPTH: usize = 5;
pub const MAX_ACTIONS: usize = 20;
pub const MAX_PARALLEL: u32 = 10;
/// Longest `for`, delay or wait: a day.
pub const MAX_SECS: u32 = 24 * 3600;
/// A presence change must hold this long before it triggers, unless the
/// trigger says otherwise (a GPS glitch does not turn the house off).
pub const DEFAULT_DEBOUNCE_SECS: u32 = 120;

/// A day of the week, as definitions name it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    pub fn of(w: Weekday) -> Day {
        match w {
            Weekday::Mon => Day::Mon,
            Weekday::Tue => Day::Tue,
            Weekday::Wed => Day::Wed,
            Weekday::Thu => Day::Thu,
            Weekday::Fri => Day::Fri,
            Weekday::Sat => Day::Sat,
            Weekday::Sun => Day::Sun,
        }
    }
}

/// Whose presence a trigger watches.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Who {
    /// Any member arriving or leaving.
    Anyone,
    /// The first member arrives (the house was empty).
    First,
    /// The last member leaves (the house becomes empty).
    Last,
    /// One member (`userId`).
    Member,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Movement {
    Arrive,
    Leave,
}

/// What starts a run.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Trigger {
    /// A device's capability changes: to a value, above / below a
    /// threshold, and (with `forSecs`) stays so that long.
    #[serde(rename_all = "camelCase")]
    State {
        device_id: Uuid,
        capability: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        above: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        below: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::opt")]
        #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
        for_secs: Option<u32>,
    },
    /// A device goes offline (`online: false`) or comes online.
    #[serde(rename_all = "camelCase")]
    Status {
        device_id: Uuid,
        online: bool,
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::opt")]
        #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
        for_secs: Option<u32>,
    },
    /// Members arrive or leave.
    #[serde(rename_all = "camelCase")]
    Presence {
        who: Who,
        movement: Movement,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<Uuid>,
        /// How long the change must hold (default 120 s).
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::opt")]
        #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 86400))]
        debounce_secs: Option<u32>,
    },
    /// A time of day (`HH:MM`, the household's time zone), on `days` (every
    /// day when empty).
    #[serde(rename_all = "camelCase")]
    Time {
        #[cfg_attr(feature = "openapi", schema(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
        at: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        days: Vec<Day>,
    },
}

/// What must hold for a run to act.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(no_recursion))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Condition {
    #[serde(rename_all = "camelCase")]
    State {
        device_id: Uuid,
        capability: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        equals: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        above: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        below: Option<f64>,
    },
    /// Between `after` and `before` (`HH:MM`; a window may wrap midnight).
    #[serde(rename_all = "camelCase")]
    Time {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "openapi", schema(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
        after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "openapi", schema(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
        before: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Weekday {
        days: Vec<Day>,
    },
    /// Someone (or `userId`) is home (`home: true`), or nobody (or not they).
    #[serde(rename_all = "camelCase")]
    Presence {
        home: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<Uuid>,
    },
    All {
        conditions: Vec<Condition>,
    },
    Any {
        conditions: Vec<Condition>,
    },
    Not {
        condition: Box<Condition>,
    },
}

/// One step of a run, in order.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Step {
    #[serde(rename_all = "camelCase")]
    Command {
        device_id: Uuid,
        #[cfg_attr(feature = "openapi", schema(schema_with = crate::command::set_schema))]
        set: Map<String, Value>,
    },
    #[serde(rename_all = "camelCase")]
    Scene { scene_id: Uuid },
    #[serde(rename_all = "camelCase")]
    Delay {
        #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
        #[serde(deserialize_with = "whole::one")]
        secs: u32,
    },
    /// Waits until `trigger` fires, at most `timeoutSecs`; then goes on either way.
    #[serde(rename_all = "camelCase")]
    WaitFor {
        trigger: Trigger,
        #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
        #[serde(deserialize_with = "whole::one")]
        timeout_secs: u32,
    },
}

/// What a trigger does while a run of the automation is still going.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Ignored (recorded as skipped).
    #[default]
    Single,
    /// The running one stops; a new one starts.
    Restart,
    /// Starts after the running ones, at most `max` waiting.
    Queued,
    /// Runs beside them, at most `max` at once.
    Parallel,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Definition {
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 10))]
    pub triggers: Vec<Trigger>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 20))]
    pub actions: Vec<Step>,
    #[serde(default)]
    pub mode: Mode,
    /// For `queued` and `parallel`: 1 to 10 (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::opt")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10))]
    pub max: Option<u32>,
    /// Whether a device's report that this automation's own command caused
    /// (within 30 s of it) may trigger it (default: no — an automation never
    /// acts on its own commands' effects unless asked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub react_to_own: bool,
}

/// Whole numbers as JSON Schema counts them (`90` or `90.0`) into a `u32`.
mod whole {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};

    fn of<E: Error>(n: serde_json::Number) -> Result<u32, E> {
        if let Some(u) = n.as_u64() {
            return u32::try_from(u).map_err(|_| E::custom(format!("{n} is larger than {}", u32::MAX)));
        }
        match n.as_f64() {
            Some(f) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => Ok(f as u32),
            _ => Err(E::custom(format!("expected a whole number from 0 to {}, got {n}", u32::MAX))),
        }
    }

    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        of(serde_json::Number::deserialize(d)?)
    }

    pub fn opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Option::<serde_json::Number>::deserialize(d)?.map(of).transpose()
    }
}

/// Why a definition is refused, with the JSON pointer of the fault under
/// the request's `definition`. What the published schema states (counts,
/// ranges of seconds, `HH:MM`, a command's values) is 400; what it cannot
/// state (a device, scene or member the household lacks, a capability's
/// value range in a trigger, above < below, nesting) is 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct Fault {
    pub path: String,
    pub reason: String,
    /// Against what the schema cannot state: 422, else 400.
    pub unfit: bool,
}

fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Fault {
    Fault { path: path.into(), reason: reason.into(), unfit: false }
}

fn unfit(path: impl Into<String>, reason: impl Into<String>) -> Fault {
    Fault { path: path.into(), reason: reason.into(), unfit: true }
}

/// `HH:MM` (00:00 to 23:59).
pub fn parse_clock(s: &str) -> Option<NaiveTime> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    NaiveTime::from_hms_opt(h.parse().ok()?, m.parse().ok()?, 0)
}

fn check_secs(path: String, secs: u32, min: u32) -> Result<(), Fault> {
    if secs < min || secs > MAX_SECS {
        return Err(invalid(path, format!("must be between {min} and {MAX_SECS} seconds")));
    }
    Ok(())
}

/// Checks a device reference and its capability; the capability's table entry.
fn device_capability(
    household: &Household,
    path: &str,
    device: Uuid,
    capability: &str,
) -> Result<&'static crate::device::Capability, Fault> {
    let d = match household.devices.get(&device) {
        Some(d) if !d.removed => d,
        _ => return Err(unfit(format!("{path}/deviceId"), "no such device in the household")),
    };
    d.kind
        .capabilities()
        .iter()
        .find(|c| c.name == capability)
        .ok_or_else(|| unfit(format!("{path}/capability"), format!("a {} has no capability {capability}", d.kind)))
}

fn check_threshold(
    path: &str,
    cap: &crate::device::Capability,
    value: Option<&Value>,
    above: Option<f64>,
    below: Option<f64>,
) -> Result<(), Fault> {
    if let Some(v) = value {
        cap.check(v).map_err(|e| unfit(path, e.to_string()))?;
    }
    let numeric = matches!(cap.value, crate::device::ValueType::Int { .. } | crate::device::ValueType::Number { .. });
    if (above.is_some() || below.is_some()) && !numeric {
        return Err(unfit(path.to_owned(), format!("{} is not a number: above / below do not apply", cap.name)));
    }
    if let (Some(a), Some(b)) = (above, below) {
        if a >= b {
            return Err(unfit(path.to_owned(), "above must be less than below"));
        }
    }
    Ok(())
}

fn check_trigger(household: &Household, path: &str, t: &Trigger) -> Result<(), Fault> {
    match t {
        Trigger::State { device_id, capability, to, above, below, for_secs } => {
            let cap = device_capability(household, path, *device_id, capability)?;
            check_threshold(&format!("{path}/to"), cap, to.as_ref(), *above, *below)?;
            if let Some(s) = for_secs {
                check_secs(format!("{path}/forSecs"), *s, 1)?;
            }
        }
        Trigger::Status { device_id, for_secs, .. } => {
            if household.devices.get(device_id).is_none_or(|d| d.removed) {
                return Err(unfit(format!("{path}/deviceId"), "no such device in the household"));
            }
            if let Some(s) = for_secs {
                check_secs(format!("{path}/forSecs"), *s, 1)?;
            }
        }
        Trigger::Presence { who, user_id, debounce_secs, .. } => {
            match (who, user_id) {
                (Who::Member, None) => return Err(unfit(format!("{path}/userId"), "who: member needs a userId")),
                (Who::Member, Some(u)) if !household.members.contains_key(u) => {
                    return Err(unfit(format!("{path}/userId"), "not a member of the household"))
                }
                (Who::Member, Some(_)) => {}
                (_, Some(_)) => return Err(unfit(format!("{path}/userId"), "userId goes with who: member")),
                (_, None) => {}
            }
            if let Some(s) = debounce_secs {
                check_secs(format!("{path}/debounceSecs"), *s, 0)?;
            }
        }
        Trigger::Time { at, .. } => {
            parse_clock(at).ok_or_else(|| invalid(format!("{path}/at"), "a time of day HH:MM (00:00 to 23:59)"))?;
        }
    }
    Ok(())
}

fn check_condition(household: &Household, path: &str, c: &Condition, depth: usize, count: &mut usize) -> Result<(), Fault> {
    *count += 1;
    if *count > MAX_CONDITIONS {
        return Err(unfit(path.to_owned(), format!("at most {MAX_CONDITIONS} conditions in all")));
    }
    if depth > MAX_CONDITION_DEPTH {
        return Err(unfit(path.to_owned(), format!("conditions nest at most {MAX_CONDITION_DEPTH} deep")));
    }
    match c {
        Condition::State { device_id, capability, equals, above, below } => {
            let cap = device_capability(household, path, *device_id, capability)?;
            check_threshold(&format!("{path}/equals"), cap, equals.as_ref(), *above, *below)?;
        }
        Condition::Time { after, before } => {
            if after.is_none() && before.is_none() {
                return Err(unfit(path.to_owned(), "after, before or both"));
            }
            for (name, v) in [("after", after), ("before", before)] {
                if let Some(v) = v {
                    parse_clock(v).ok_or_else(|| invalid(format!("{path}/{name}"), "a time of day HH:MM (00:00 to 23:59)"))?;
                }
            }
        }
        Condition::Weekday { days } => {
            if days.is_empty() {
                return Err(unfit(format!("{path}/days"), "at least one day"));
            }
        }
        Condition::Presence { user_id: Some(u), .. } if !household.members.contains_key(u) => {
            return Err(unfit(format!("{path}/userId"), "not a member of the household"));
        }
        Condition::Presence { .. } => {}
        Condition::All { conditions } | Condition::Any { conditions } => {
            if conditions.is_empty() {
                return Err(unfit(format!("{path}/conditions"), "at least one condition"));
            }
            for (i, c) in conditions.iter().enumerate() {
                check_condition(household, &format!("{path}/conditions/{i}"), c, depth + 1, count)?;
            }
        }
        Condition::Not { condition } => check_condition(household, &format!("{path}/condition"), condition, depth + 1, count)?,
    }
    Ok(())
}

/// Checks a definition against the household and normalizes it (integer
/// capabilities given as whole floats become integers). Nothing is stored
/// when it fails.
pub fn validate(household: &Household, mut def: Definition) -> Result<Definition, Fault> {
    if def.triggers.is_empty() || def.triggers.len() > MAX_TRIGGERS {
        return Err(invalid("/triggers", format!("1 to {MAX_TRIGGERS} triggers")));
    }
    if def.actions.is_empty() || def.actions.len() > MAX_ACTIONS {
        return Err(invalid("/actions", format!("1 to {MAX_ACTIONS} actions")));
    }
    for (i, t) in def.triggers.iter().enumerate() {
        check_trigger(household, &format!("/triggers/{i}"), t)?;
    }
    let mut count = 0;
    for (i, c) in def.conditions.iter().enumerate() {
        check_condition(household, &format!("/conditions/{i}"), c, 1, &mut count)?;
    }
    for (i, step) in def.actions.iter_mut().enumerate() {
        let path = format!("/actions/{i}");
        match step {
            Step::Command { device_id, set } => {
                let d = match household.devices.get(device_id) {
                    Some(d) if !d.removed => d,
                    _ => return Err(unfit(format!("{path}/deviceId"), "no such device in the household")),
                };
                match decide(d.kind, *device_id, Uuid::nil(), std::mem::take(set), None, COMMAND_LIFE, DateTime::UNIX_EPOCH) {
                    Ok(c) => *set = c.set,
                    Err(Refused::Invalid(why)) => return Err(invalid(format!("{path}/set"), why)),
                    Err(Refused::Unsupported(why)) => return Err(unfit(format!("{path}/set"), why)),
                }
            }
            Step::Scene { scene_id } => {
                if !household.scenes.contains_key(scene_id) {
                    return Err(unfit(format!("{path}/sceneId"), "no such scene in the household"));
                }
            }
            Step::Delay { secs } => check_secs(format!("{path}/secs"), *secs, 1)?,
            Step::WaitFor { trigger, timeout_secs } => {
                if matches!(trigger, Trigger::Time { .. }) {
                    return Err(unfit(format!("{path}/trigger"), "wait for a device or presence, not a time (use a delay)"));
                }
                check_trigger(household, &format!("{path}/trigger"), trigger)?;
                check_secs(format!("{path}/timeoutSecs"), *timeout_secs, 1)?;
            }
        }
    }
    match (def.mode, def.max) {
        (Mode::Single | Mode::Restart, Some(_)) => return Err(unfit("/max", "max goes with mode queued or parallel")),
        (_, Some(m)) if m == 0 || m > MAX_PARALLEL => return Err(invalid("/max", format!("1 to {MAX_PARALLEL}"))),
        _ => {}
    }
    Ok(def)
}

impl Definition {
    /// The devices its triggers, conditions and waits look at.
    pub fn watched_devices(&self) -> Vec<Uuid> {
        fn of_trigger(t: &Trigger, out: &mut Vec<Uuid>) {
            if let Trigger::State { device_id, .. } | Trigger::Status { device_id, .. } = t {
                out.push(*device_id);
            }
        }
        fn of_condition(c: &Condition, out: &mut Vec<Uuid>) {
            match c {
                Condition::State { device_id, .. } => out.push(*device_id),
                Condition::All { conditions } | Condition::Any { conditions } => conditions.iter().for_each(|c| of_condition(c, out)),
                Condition::Not { condition } => of_condition(condition, out),
                _ => {}
            }
        }
        let mut out = Vec::new();
        self.triggers.iter().for_each(|t| of_trigger(t, &mut out));
        self.conditions.iter().for_each(|c| of_condition(c, &mut out));
        for s in &self.actions {
            if let Step::WaitFor { trigger, .. } = s {
                of_trigger(trigger, &mut out);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Whether `value` meets a comparison: equal to `equals` (when given) and
/// strictly above / below the thresholds (when given).
pub fn compares(value: Option<&Value>, equals: Option<&Value>, above: Option<f64>, below: Option<f64>) -> bool {
    let Some(v) = value else {
        return false;
    };
    if let Some(e) = equals {
        let same = match (v.as_f64(), e.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => v == e,
        };
        if !same {
            return false;
        }
    }
    let n = v.as_f64();
    above.is_none_or(|a| n.is_some_and(|n| n > a)) && below.is_none_or(|b| n.is_some_and(|n| n < b))
}

/// What conditions are judged against: the house at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Reported state per device.
    pub state: BTreeMap<Uuid, Map<String, Value>>,
    pub presence: BTreeMap<Uuid, Presence>,
    /// The local date and time in the household's time zone.
    pub local: Option<chrono::NaiveDateTime>,
}

/// One condition as judged, for the run's trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Judged {
    /// Its JSON pointer in the definition (`/conditions/0/conditions/1`).
    pub path: String,
    pub held: bool,
    /// The value it looked at, when it looked at one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

fn judge(c: &Condition, path: &str, at: &Snapshot, trace: &mut Vec<Judged>) -> bool {
    let mut value = None;
    let held = match c {
        Condition::State { device_id, capability, equals, above, below } => {
            let v = at.state.get(device_id).and_then(|s| s.get(capability));
            value = Some(v.cloned().unwrap_or(Value::Null));
            compares(v, equals.as_ref(), *above, *below)
        }
        Condition::Time { after, before } => at.local.is_some_and(|l| {
            let t = l.time();
            let (a, b) = (after.as_deref().and_then(parse_clock), before.as_deref().and_then(parse_clock));
            value = Some(Value::String(t.format("%H:%M").to_string()));
            match (a, b) {
                (Some(a), Some(b)) if a <= b => t >= a && t < b,
                // Wraps midnight: 22:00 to 06:00.
                (Some(a), Some(b)) => t >= a || t < b,
                (Some(a), None) => t >= a,
                (None, Some(b)) => t < b,
                (None, None) => true,
            }
        }),
        Condition::Weekday { days } => at.local.is_some_and(|l| days.contains(&Day::of(l.weekday()))),
        Condition::Presence { home, user_id } => {
            let is_home = |u: &Uuid| at.presence.get(u) == Some(&Presence::Home);
            let now = match user_id {
                Some(u) => is_home(u),
                None => at.presence.keys().any(is_home),
            };
            now == *home
        }
        // Every one judged (not short-circuited), so the trace shows them all.
        Condition::All { conditions } => judge_each(conditions, &format!("{path}/conditions"), at, trace).iter().all(|h| *h),
        Condition::Any { conditions } => judge_each(conditions, &format!("{path}/conditions"), at, trace).iter().any(|h| *h),
        Condition::Not { condition } => !judge(condition, &format!("{path}/condition"), at, trace),
    };
    trace.push(Judged { path: path.to_owned(), held, value });
    held
}

fn judge_each(conditions: &[Condition], path: &str, at: &Snapshot, trace: &mut Vec<Judged>) -> Vec<bool> {
    conditions.iter().enumerate().map(|(i, c)| judge(c, &format!("{path}/{i}"), at, trace)).collect()
}

/// Whether every condition holds at `at`, with each one judged (every
/// condition is judged, so the trace shows all of them).
pub fn conditions_hold(conditions: &[Condition], at: &Snapshot) -> (bool, Vec<Judged>) {
    let mut trace = Vec::new();
    let held = judge_each(conditions, "/conditions", at, &mut trace).iter().all(|h| *h);
    (held, trace)
}

/// The first instant strictly after `after` at which a schedule (`at` on
/// `days`, every day when empty) fires in time zone `tz`.
///
/// Daylight saving: a time that does not exist on a day (02:30 when clocks
/// jump from 02:00 to 03:00) fires once at the first valid instant after the
/// gap; a time that exists twice (02:30 when clocks fall back) fires once, at
/// its first occurrence.
pub fn next_time<Z: TimeZone>(at: NaiveTime, days: &[Day], tz: &Z, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let start: NaiveDate = after.with_timezone(tz).date_naive();
    for offset in 0..=8 {
        let date = start + chrono::Duration::days(offset);
        if !days.is_empty() && !days.contains(&Day::of(date.weekday())) {
            continue;
        }
        let local = date.and_time(at);
        let instant = match tz.from_local_datetime(&local) {
            chrono::LocalResult::Single(t) => t.with_timezone(&Utc),
            chrono::LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            chrono::LocalResult::None => {
                // In the gap: the first minute that exists after it.
                let mut probe = local;
                let mut found = None;
                for _ in 0..(4 * 60) {
                    probe += chrono::Duration::minutes(1);
                    if let Some(t) = tz.from_local_datetime(&probe).earliest() {
                        found = Some(t.with_timezone(&Utc).with_second(0).unwrap_or(t.with_timezone(&Utc)));
                        break;
                    }
                }
                found?
            }
        };
        if instant > after {
            return Some(instant);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceKind;
    use crate::household::{HouseholdEvent, RegisteredDevice};
    use serde_json::json;

    const LIGHT: Uuid = Uuid::from_u128(10);
    const SENSOR: Uuid = Uuid::from_u128(11);
    const OWNER: Uuid = Uuid::from_u128(1);

    fn home() -> Household {
        let mut h = Household::default();
        h.apply(&HouseholdEvent::Created { created_by: Some(OWNER) }, None, DateTime::UNIX_EPOCH).unwrap();
        h.devices.insert(LIGHT, RegisteredDevice { kind: DeviceKind::Light, room_id: None, removed: false });
        h.devices.insert(SENSOR, RegisteredDevice { kind: DeviceKind::Sensor, room_id: None, removed: false });
        h
    }

    fn def(v: Value) -> Definition {
        serde_json::from_value(v).unwrap()
    }

    fn motion_light() -> Value {
        json!({
            "triggers": [{"type": "state", "deviceId": SENSOR, "capability": "motion", "to": true}],
            "conditions": [{"type": "time", "after": "20:00", "before": "06:00"}],
            "actions": [{"type": "command", "deviceId": LIGHT, "set": {"on": true, "brightness": 80.0}},
                        {"type": "delay", "secs": 300},
                        {"type": "command", "deviceId": LIGHT, "set": {"on": false}}]
        })
    }

    #[test]
    fn given_a_valid_definition_then_it_is_normalized() {
        let d = validate(&home(), def(motion_light())).unwrap();
        assert!(matches!(&d.actions[0], Step::Command { set, .. } if set["brightness"].is_i64()));
        assert_eq!(d.mode, Mode::Single);
        assert_eq!(d.watched_devices(), vec![SENSOR]);
    }

    #[test]
    fn given_bad_definitions_then_the_fault_names_its_path() {
        let fault = |patch: &dyn Fn(&mut Value)| {
            let mut v = motion_light();
            patch(&mut v);
            match serde_json::from_value::<Definition>(v) {
                Ok(d) => validate(&home(), d).err().map(|f| (f.path, f.unfit)),
                Err(e) => Some((format!("parse: {e}"), false)),
            }
        };
        assert_eq!(fault(&|v| v["triggers"][0]["deviceId"] = json!(Uuid::nil())), Some(("/triggers/0/deviceId".into(), true)));
        assert_eq!(fault(&|v| v["triggers"][0]["capability"] = json!("warp")), Some(("/triggers/0/capability".into(), true)));
        assert_eq!(fault(&|v| v["triggers"][0]["to"] = json!(3)), Some(("/triggers/0/to".into(), true)));
        assert_eq!(fault(&|v| v["actions"][0]["set"] = json!({"brightness": 101})), Some(("/actions/0/set".into(), false)));
        assert_eq!(fault(&|v| v["actions"][0]["set"] = json!({"locked": true})), Some(("/actions/0/set".into(), true)));
        assert_eq!(fault(&|v| v["actions"][1]["secs"] = json!(0)), Some(("/actions/1/secs".into(), false)));
        assert_eq!(fault(&|v| v["conditions"][0]["after"] = json!("25:00")), Some(("/conditions/0/after".into(), false)));
        assert_eq!(fault(&|v| v["actions"] = json!([])), Some(("/actions".into(), false)));
        assert_eq!(fault(&|v| v["triggers"] = json!(vec![v["triggers"][0].clone(); 11])), Some(("/triggers".into(), false)));
        assert_eq!(fault(&|v| v["max"] = json!(3)), Some(("/max".into(), true)));
        assert_eq!(
            fault(&|v| v["actions"][0] = json!({"type": "scene", "sceneId": Uuid::nil()})),
            Some(("/actions/0/sceneId".into(), true))
        );
        let deep = (0..6).fold(json!({"type": "weekday", "days": ["mon"]}), |c, _| json!({"type": "not", "condition": c}));
        assert!(fault(&|v| v["conditions"][0] = deep.clone()).is_some_and(|(p, _)| p.starts_with("/conditions/0/condition")));
        assert!(fault(&|v| v["triggers"][0]["type"] = json!("nope")).is_some_and(|(p, _)| p.starts_with("parse")));
    }

    #[test]
    fn conditions_are_all_judged_and_traced() {
        let local = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap().and_hms_opt(23, 0, 0);
        let mut at = Snapshot { local, ..Default::default() };
        at.state.insert(SENSOR, json!({"temperature": 19.5}).as_object().cloned().unwrap());
        at.presence.insert(OWNER, Presence::Away);
        let conditions: Vec<Condition> = serde_json::from_value(json!([
            {"type": "time", "after": "22:00", "before": "06:00"},
            {"type": "any", "conditions": [
                {"type": "state", "deviceId": SENSOR, "capability": "temperature", "below": 18},
                {"type": "presence", "home": false}
            ]},
            {"type": "weekday", "days": ["sat"]}
        ]))
        .unwrap();
        let (held, trace) = conditions_hold(&conditions, &at);
        assert!(held, "{trace:?}");
        let temp = trace.iter().find(|j| j.path == "/conditions/1/conditions/0").unwrap();
        assert_eq!((temp.held, temp.value.clone()), (false, Some(json!(19.5))));
        assert_eq!(trace.len(), 5);
        at.presence.insert(OWNER, Presence::Home);
        assert!(!conditions_hold(&conditions, &at).0);
    }

    #[test]
    fn schedules_fire_once_across_both_daylight_saving_changes() {
        let berlin = chrono_tz::Europe::Berlin;
        let at = parse_clock("02:30").unwrap();
        // Spring forward 2027-03-28: 02:00 -> 03:00. 02:30 does not exist: 03:00 CEST = 01:00 UTC.
        let before = Utc.with_ymd_and_hms(2027, 3, 27, 12, 0, 0).unwrap();
        let first = next_time(at, &[], &berlin, before).unwrap();
        assert_eq!(first, Utc.with_ymd_and_hms(2027, 3, 28, 1, 0, 0).unwrap());
        let second = next_time(at, &[], &berlin, first).unwrap();
        assert_eq!(second, Utc.with_ymd_and_hms(2027, 3, 29, 0, 30, 0).unwrap(), "the next day once, at 02:30 CEST");
        // Fall back 2027-10-31: 03:00 -> 02:00. 02:30 happens twice: once, at the first (CEST, 00:30 UTC).
        let before = Utc.with_ymd_and_hms(2027, 10, 30, 12, 0, 0).unwrap();
        let first = next_time(at, &[], &berlin, before).unwrap();
        assert_eq!(first, Utc.with_ymd_and_hms(2027, 10, 31, 0, 30, 0).unwrap());
        let second = next_time(at, &[], &berlin, first).unwrap();
        assert_eq!(second, Utc.with_ymd_and_hms(2027, 11, 1, 1, 30, 0).unwrap(), "not at the repeated 02:30 CET");
        // Weekdays.
        let sat = Utc.with_ymd_and_hms(2026, 12, 5, 12, 0, 0).unwrap();
        let monday = next_time(parse_clock("07:00").unwrap(), &[Day::Mon], &berlin, sat).unwrap();
        assert_eq!(monday, Utc.with_ymd_and_hms(2026, 12, 7, 6, 0, 0).unwrap());
    }

    #[test]
    fn comparisons() {
        assert!(compares(Some(&json!(5)), Some(&json!(5.0)), None, None));
        let d: Step = serde_json::from_value(json!({"type": "delay", "secs": 90.0})).unwrap();
        assert_eq!(d, Step::Delay { secs: 90 });
        assert!(serde_json::from_value::<Step>(json!({"type": "delay", "secs": 90.5})).is_err());
        assert!(!compares(Some(&json!(true)), Some(&json!(false)), None, None));
        assert!(compares(Some(&json!(21)), None, Some(20.0), Some(22.0)));
        assert!(!compares(Some(&json!(20)), None, Some(20.0), None));
        assert!(!compares(None, None, None, None));
        assert!(!compares(Some(&json!("x")), None, Some(1.0), None));
    }
}
