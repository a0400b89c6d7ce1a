//! Device kinds and their capabilities (product.md, "Device kinds").
//!
//! A capability has a value type, a range and whether a command may write it.
//! Both command validation (command-api) and report validation (bridge) use the
//! same table, so a value the platform accepts from a device is one it would
//! also accept in a command, and the reverse.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// The kinds of device HomeLink knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Light,
    Plug,
    Thermostat,
    Lock,
    Camera,
    Sensor,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 6] =
        [DeviceKind::Light, DeviceKind::Plug, DeviceKind::Thermostat, DeviceKind::Lock, DeviceKind::Camera, DeviceKind::Sensor];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Light => "light",
            DeviceKind::Plug => "plug",
            DeviceKind::Thermostat => "thermostat",
            DeviceKind::Lock => "lock",
            DeviceKind::Camera => "camera",
            DeviceKind::Sensor => "sensor",
        }
    }

    /// The capabilities of this kind.
    pub fn capabilities(self) -> &'static [Capability] {
        use ValueType::*;
        const LIGHT: &[Capability] = &[
            Capability::w("on", Bool),
            Capability::w("brightness", Int { min: 0, max: 100 }),
            Capability::w("colorTemp", Int { min: 2000, max: 6500 }),
        ];
        const PLUG: &[Capability] = &[Capability::w("on", Bool), Capability::r("power", Number { min: 0.0, max: 100_000.0, step: None })];
        const THERMOSTAT: &[Capability] = &[
            Capability::r("currentTemp", Number { min: -50.0, max: 100.0, step: None }),
            Capability::w("targetTemp", Number { min: 5.0, max: 30.0, step: Some(0.5) }),
            Capability::w("mode", Enum(&["off", "heat", "cool", "auto"])),
        ];
        const LOCK: &[Capability] = &[Capability::w("locked", Bool), Capability::r("jammed", Bool)];
        const CAMERA: &[Capability] = &[Capability::w("recording", Bool), Capability::r("motion", Bool)];
        const SENSOR: &[Capability] = &[
            Capability::r("temperature", Number { min: -50.0, max: 100.0, step: None }),
            Capability::r("humidity", Number { min: 0.0, max: 100.0, step: None }),
            Capability::r("motion", Bool),
            Capability::r("contact", Bool),
        ];
        match self {
            DeviceKind::Light => LIGHT,
            DeviceKind::Plug => PLUG,
            DeviceKind::Thermostat => THERMOSTAT,
            DeviceKind::Lock => LOCK,
            DeviceKind::Camera => CAMERA,
            DeviceKind::Sensor => SENSOR,
        }
    }

    /// Every writable capability of any kind, each name once (a name means
    /// the same value type in every kind that has it — a test holds that).
    pub fn writable_capabilities() -> Vec<&'static Capability> {
        let mut out: Vec<&'static Capability> = Vec::new();
        for k in DeviceKind::ALL {
            for c in k.capabilities().iter().filter(|c| c.writable) {
                if !out.iter().any(|o| o.name == c.name) {
                    out.push(c);
                }
            }
        }
        out
    }

    pub fn capability(self, name: &str) -> Option<&'static Capability> {
        self.capabilities().iter().find(|c| c.name == name)
    }

    /// Whether devices of this kind run on a battery and report `battery`.
    pub fn battery_powered(self) -> bool {
        matches!(self, DeviceKind::Lock | DeviceKind::Sensor)
    }

    /// Checks the `set` of a command: only writable capabilities of this kind,
    /// each value in range, at least one value.
    pub fn validate_set(self, set: &Map<String, Value>) -> Result<(), ValueError> {
        if set.is_empty() {
            return Err(ValueError::Empty);
        }
        for (name, value) in set {
            let cap = self.capability(name).ok_or_else(|| ValueError::Unknown(name.clone()))?;
            if !cap.writable {
                return Err(ValueError::ReadOnly(name.clone()));
            }
            cap.check(value)?;
        }
        Ok(())
    }

    /// Checks the `state` of a report: known capabilities of this kind, values
    /// in range. Unknown capability names are refused (they would be stored).
    pub fn validate_state(self, state: &Map<String, Value>) -> Result<(), ValueError> {
        for (name, value) in state {
            let cap = self.capability(name).ok_or_else(|| ValueError::Unknown(name.clone()))?;
            cap.check(value)?;
        }
        Ok(())
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceKind {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| ValueError::UnknownKind(s.to_owned()))
    }
}

/// The type and range of a capability's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueType {
    Bool,
    Int { min: i64, max: i64 },
    Number { min: f64, max: f64, step: Option<f64> },
    Enum(&'static [&'static str]),
}

/// One capability of a device kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capability {
    pub name: &'static str,
    pub value: ValueType,
    pub writable: bool,
}

impl Capability {
    const fn w(name: &'static str, value: ValueType) -> Self {
        Self { name, value, writable: true }
    }
    const fn r(name: &'static str, value: ValueType) -> Self {
        Self { name, value, writable: false }
    }

    /// Checks one value against this capability's type and range.
    pub fn check(&self, v: &Value) -> Result<(), ValueError> {
        let bad = || ValueError::OutOfRange(self.name.to_owned());
        match self.value {
            ValueType::Bool => v.as_bool().map(|_| ()).ok_or_else(bad),
            ValueType::Int { min, max } => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Ok(()),
                _ => Err(bad()),
            },
            ValueType::Number { min, max, step } => match v.as_f64() {
                Some(n) if n.is_finite() && n >= min && n <= max => match step {
                    Some(s) if ((n - min) / s).fract().abs() > 1e-9 => Err(bad()),
                    _ => Ok(()),
                },
                _ => Err(bad()),
            },
            ValueType::Enum(options) => match v.as_str() {
                Some(s) if options.contains(&s) => Ok(()),
                _ => Err(bad()),
            },
        }
    }
}

/// Why a capability value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("unknown device kind `{0}`")]
    UnknownKind(String),
    #[error("unknown capability `{0}` for this kind of device")]
    Unknown(String),
    #[error("capability `{0}` is reported by the device and cannot be set")]
    ReadOnly(String),
    #[error("value of `{0}` has the wrong type or is out of range")]
    OutOfRange(String),
    #[error("a command must set at least one capability")]
    Empty,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_writable_capability_means_the_same_value_in_every_kind() {
        for c in DeviceKind::writable_capabilities() {
            for k in DeviceKind::ALL {
                if let Some(o) = k.capability(c.name).filter(|o| o.writable) {
                    assert_eq!(o.value, c.value, "{} of {k}", c.name);
                }
            }
        }
    }

    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn light_accepts_values_in_range() {
        let set = map(json!({"on": true, "brightness": 100, "colorTemp": 2000}));
        assert_eq!(DeviceKind::Light.validate_set(&set), Ok(()));
    }

    #[test]
    fn out_of_range_unknown_and_read_only_values_are_refused() {
        let k = DeviceKind::Light;
        assert!(matches!(k.validate_set(&map(json!({"brightness": 101}))), Err(ValueError::OutOfRange(_))));
        assert!(matches!(k.validate_set(&map(json!({"brightness": 50.5}))), Err(ValueError::OutOfRange(_))));
        assert!(matches!(k.validate_set(&map(json!({"explode": true}))), Err(ValueError::Unknown(_))));
        assert!(matches!(DeviceKind::Plug.validate_set(&map(json!({"power": 3}))), Err(ValueError::ReadOnly(_))));
        assert_eq!(k.validate_set(&Map::new()), Err(ValueError::Empty));
    }

    #[test]
    fn thermostat_target_uses_half_degree_steps() {
        let k = DeviceKind::Thermostat;
        assert_eq!(k.validate_set(&map(json!({"targetTemp": 21.5}))), Ok(()));
        assert!(k.validate_set(&map(json!({"targetTemp": 21.3}))).is_err());
        assert!(k.validate_set(&map(json!({"targetTemp": 80}))).is_err());
        assert!(k.validate_set(&map(json!({"mode": "turbo"}))).is_err());
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in DeviceKind::ALL {
            assert_eq!(k.as_str().parse::<DeviceKind>(), Ok(k));
        }
        assert!("toaster".parse::<DeviceKind>().is_err());
    }
}
