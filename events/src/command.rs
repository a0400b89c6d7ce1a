//! A device command's decision, pure: from the values asked for, the device's
//! kind and the life asked for, the `DeviceCommandRequested` to append or why
//! not. command-api calls it for every command and desired-state write; the
//! automation engine (issue 17) will call it for the commands it sends. The
//! caller checks who may send it (the roles table) and sets `queued`.

use crate::device::{DeviceKind, ValueType};
use crate::event::DeviceCommandRequested;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

/// How long a command may stay desired: the default and the most, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Life {
    pub default_secs: u32,
    pub max_secs: u32,
}

/// A command (`POST …/commands`): 10 s unless asked, at most 5 minutes.
pub const COMMAND_LIFE: Life = Life { default_secs: 10, max_secs: 300 };
/// Desired state (`PUT …/desired`): an hour unless asked, at most a week.
pub const DESIRED_LIFE: Life = Life { default_secs: 3600, max_secs: 7 * 24 * 3600 };

/// The id of the command that takes `command`'s place when it is sent
/// again as a new command (a scene's device acked but reported something
/// else): derived, so every bridge and every retry of the append agree.
pub fn retry_id(command: Uuid) -> Uuid {
    Uuid::new_v5(&command, b"homelink:retry")
}

/// Why a command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No device of any kind takes it (an unknown capability, a value out of
    /// range, no value at all, a life out of bounds): the request is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Some kind takes it, this device's does not (a light asked to unlock).
    #[error("{0}")]
    Unsupported(String),
}

/// The command `set` asks of a device of `kind`, alive `ttl_secs` (or the
/// default) from `now`, under the id `command_id`; not yet `queued`.
pub fn decide(
    kind: DeviceKind,
    device_id: Uuid,
    command_id: Uuid,
    mut set: Map<String, Value>,
    ttl_secs: Option<u32>,
    life: Life,
    now: DateTime<Utc>,
) -> Result<DeviceCommandRequested, Refused> {
    whole_numbers(&mut set);
    let ttl = ttl_secs.unwrap_or(life.default_secs);
    if ttl == 0 || ttl > life.max_secs {
        return Err(Refused::Invalid(format!("ttlSeconds must be between 1 and {}", life.max_secs)));
    }
    if set.is_empty() {
        return Err(Refused::Invalid("set must name at least one capability".into()));
    }
    let any_kind = DeviceKind::writable_capabilities();
    for (name, value) in &set {
        let Some(c) = any_kind.iter().find(|c| c.name == name) else {
            return Err(Refused::Invalid(format!("{name} is not a writable capability of any device kind")));
        };
        c.check(value).map_err(|e| Refused::Invalid(e.to_string()))?;
    }
    kind.validate_set(&set).map_err(|e| Refused::Unsupported(format!("a {kind}: {e}")))?;
    Ok(DeviceCommandRequested { command_id, device_id, set, expires_at: now + Duration::seconds(i64::from(ttl)), queued: false })
}

/// The document's schema of `set`: every writable capability of any kind
/// with its value's type and range, at least one (from the capability table).
#[cfg(feature = "openapi")]
pub fn set_schema() -> utoipa::openapi::Object {
    use crate::device::ValueType;
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
    let mut o = ObjectBuilder::new()
        .schema_type(Type::Object)
        .min_properties(Some(1))
        .additional_properties(Some(AdditionalProperties::<utoipa::openapi::Schema>::FreeForm(false)));
    for c in DeviceKind::writable_capabilities() {
        let v = match c.value {
            ValueType::Bool => ObjectBuilder::new().schema_type(Type::Boolean),
            ValueType::Int { min, max } => ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(min)).maximum(Some(max)),
            ValueType::Number { min, max, step } => {
                ObjectBuilder::new().schema_type(Type::Number).minimum(Some(min)).maximum(Some(max)).multiple_of(step)
            }
            ValueType::Enum(values) => ObjectBuilder::new().schema_type(Type::String).enum_values(Some(values.iter().copied())),
        };
        o = o.property(c.name, v.build());
    }
    o.build()
}

/// JSON Schema counts `77.0` as an integer: an integer capability's value
/// goes to the device as `77`.
fn whole_numbers(set: &mut Map<String, Value>) {
    let ints: Vec<&str> =
        DeviceKind::writable_capabilities().into_iter().filter(|c| matches!(c.value, ValueType::Int { .. })).map(|c| c.name).collect();
    for (name, v) in set.iter_mut() {
        if let Some(f) = v.as_f64().filter(|f| !v.is_i64() && !v.is_u64() && f.fract() == 0.0 && f.abs() < 1e15) {
            if ints.contains(&name.as_str()) {
                *v = Value::from(f as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn light(s: Value, ttl: Option<u32>) -> Result<DeviceCommandRequested, Refused> {
        decide(DeviceKind::Light, Uuid::nil(), Uuid::nil(), set(s), ttl, COMMAND_LIFE, DateTime::UNIX_EPOCH)
    }

    #[test]
    fn given_a_light_when_brightness_is_set_then_a_command_lives_the_default_life() {
        let c = light(json!({"brightness": 50}), None).unwrap();
        assert_eq!(c.set["brightness"], 50);
        assert_eq!(c.expires_at, DateTime::UNIX_EPOCH + Duration::seconds(10));
        assert!(!c.queued);
    }

    #[test]
    fn given_a_whole_float_for_an_integer_capability_then_the_device_gets_an_integer() {
        let c = light(json!({"brightness": 77.0}), None).unwrap();
        assert!(c.set["brightness"].is_i64(), "{}", c.set["brightness"]);
    }

    #[test]
    fn given_a_request_no_device_takes_then_it_is_invalid() {
        assert!(matches!(light(json!({"brightness": 101}), None), Err(Refused::Invalid(_))));
        assert!(matches!(light(json!({"warp": 9}), None), Err(Refused::Invalid(_))));
        assert!(matches!(light(json!({}), None), Err(Refused::Invalid(_))));
        assert!(matches!(light(json!({"on": true}), Some(0)), Err(Refused::Invalid(_))));
        assert!(matches!(light(json!({"on": true}), Some(301)), Err(Refused::Invalid(_))));
        let week = decide(DeviceKind::Light, Uuid::nil(), Uuid::nil(), set(json!({"on": true})), Some(301), DESIRED_LIFE, Utc::now());
        assert!(week.is_ok(), "desired state lives up to a week");
    }

    #[test]
    fn given_a_capability_of_another_kind_then_it_is_unsupported() {
        assert!(matches!(light(json!({"locked": true}), None), Err(Refused::Unsupported(_))));
    }
}
