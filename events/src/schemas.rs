//! JSON Schemas (draft 2020-12) of every device message, versioned, generated
//! from the same tables the platform validates with ([`DeviceKind`]'s
//! capabilities, the protocol limits), so the published schema and the
//! platform's behaviour cannot drift. The files under `schemas/device/` in the
//! repository are these documents; a test keeps them equal.
//!
//! Names: `state.<kind>.v1` for each kind, `cmd.v1`, `ack.v1`, `status.v1`.

use crate::device::{Capability, DeviceKind, ValueType};
use crate::protocol::{Channel, MAX_SEQ, PROTOCOL_VERSION};
use serde_json::{json, Map, Value};

/// Where the schemas are published (their `$id` prefix).
pub const SCHEMA_BASE: &str = "https://homelink.dev/schemas/device/";

/// One published schema.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSchema {
    /// `state.light.v1`, `cmd.v1`, …
    pub name: String,
    /// `state`, `cmd`, `ack` or `status`.
    pub message: &'static str,
    pub kind: Option<DeviceKind>,
    pub version: u16,
    pub schema: Value,
}

/// The name of the schema a device of `kind` must follow on `channel`.
pub fn schema_name(kind: DeviceKind, channel: Channel) -> String {
    match channel {
        Channel::State => format!("state.{}.v{PROTOCOL_VERSION}", kind.as_str()),
        other => format!("{}.v{PROTOCOL_VERSION}", other.as_str()),
    }
}

fn value_schema(c: &Capability) -> Value {
    match c.value {
        ValueType::Bool => json!({"type": "boolean"}),
        ValueType::Int { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        ValueType::Number { min, max, step } => {
            let mut s = json!({"type": "number", "minimum": min, "maximum": max});
            if let Some(step) = step {
                s["multipleOf"] = json!(step);
            }
            s
        }
        ValueType::Enum(values) => json!({"type": "string", "enum": values}),
    }
}

fn capabilities(kind: DeviceKind, writable_only: bool) -> Map<String, Value> {
    kind.capabilities()
        .iter()
        .filter(|c| c.writable || !writable_only)
        .map(|c| {
            let mut s = value_schema(c);
            s["description"] = json!(if c.writable { "writable" } else { "reported only" });
            (c.name.to_owned(), s)
        })
        .collect()
}

fn envelope(name: &str, title: String, properties: Value, required: &[&str]) -> Value {
    let mut props = json!({"v": {"const": PROTOCOL_VERSION, "description": "the schema version of this body"}});
    if let (Some(p), Some(extra)) = (props.as_object_mut(), properties.as_object()) {
        p.extend(extra.clone());
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("{SCHEMA_BASE}{name}.json"),
        "title": title,
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": true,
        "description": "Unknown top-level fields are ignored (forward compatibility).",
    })
}

fn state(kind: DeviceKind) -> Value {
    let mut props = json!({
        "seq": {"type": "integer", "minimum": 1, "maximum": MAX_SEQ, "description": "strictly increases per device, across restarts"},
        "ts": {"type": "string", "format": "date-time", "description": "the device clock; informative only"},
        "state": {
            "type": "object",
            "properties": capabilities(kind, false),
            "additionalProperties": false,
            "description": "only capabilities of this kind",
        },
    });
    let battery = if kind.battery_powered() { "percent; this kind runs on a battery" } else { "percent, if battery-powered" };
    props["battery"] = json!({"type": "integer", "minimum": 0, "maximum": 100, "description": battery});
    envelope(&schema_name(kind, Channel::State), format!("State report of a {kind}"), props, &["v", "seq", "state"])
}

fn cmd() -> Value {
    // Any kind's writable capabilities; a device checks its own.
    let mut writable = Map::new();
    for kind in DeviceKind::ALL {
        for (name, s) in capabilities(kind, true) {
            writable.entry(name).or_insert(s);
        }
    }
    envelope(
        "cmd.v1",
        "Command to a device".into(),
        json!({
            "commandId": {"type": "string", "format": "uuid", "description": "a device ignores a commandId it already handled"},
            "set": {"type": "object", "minProperties": 1, "properties": writable, "additionalProperties": false,
                    "description": "desired values of writable capabilities of the device's kind"},
            "expiresAt": {"type": "string", "format": "date-time", "description": "a device ignores the command after this time"},
        }),
        &["v", "commandId", "set", "expiresAt"],
    )
}

fn ack() -> Value {
    let mut s = envelope(
        "ack.v1",
        "Command outcome".into(),
        json!({
            "commandId": {"type": "string", "format": "uuid"},
            "status": {"enum": ["ok", "rejected", "failed"]},
            "reason": {"type": "string", "maxLength": 200},
        }),
        &["v", "commandId", "status"],
    );
    s["if"] = json!({"properties": {"status": {"enum": ["rejected", "failed"]}}});
    s["then"] = json!({"required": ["reason"]});
    s
}

fn status() -> Value {
    envelope(
        "status.v1",
        "Presence (retained; `offline` is the last will)".into(),
        json!({"status": {"enum": ["online", "offline"]}}),
        &["v", "status"],
    )
}

/// Every published schema, in a stable order.
pub fn all() -> Vec<DeviceSchema> {
    let mut out: Vec<DeviceSchema> = DeviceKind::ALL
        .into_iter()
        .map(|k| DeviceSchema {
            name: schema_name(k, Channel::State),
            message: "state",
            kind: Some(k),
            version: PROTOCOL_VERSION,
            schema: state(k),
        })
        .collect();
    for (message, schema) in [("cmd", cmd()), ("ack", ack()), ("status", status())] {
        out.push(DeviceSchema { name: format!("{message}.v{PROTOCOL_VERSION}"), message, kind: None, version: PROTOCOL_VERSION, schema });
    }
    out
}

/// One schema by name.
pub fn by_name(name: &str) -> Option<DeviceSchema> {
    all().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/device");

    /// The files in the repository are the generated schemas. After changing
    /// a capability: `UPDATE_SCHEMAS=1 cargo test -p homelink-events schemas`.
    #[test]
    fn the_committed_schema_files_match_the_code() {
        for s in all() {
            let path = format!("{DIR}/{}.json", s.name);
            let text = serde_json::to_string_pretty(&s.schema).unwrap() + "\n";
            if std::env::var_os("UPDATE_SCHEMAS").is_some() {
                std::fs::create_dir_all(DIR).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(committed == text, "{path} is stale: run `UPDATE_SCHEMAS=1 cargo test -p homelink-events schemas`");
        }
        let files = std::fs::read_dir(DIR).unwrap().count();
        assert_eq!(files, all().len(), "no stray files in schemas/device");
    }

    #[test]
    fn names_are_unique_and_found() {
        let all = all();
        assert_eq!(all.len(), DeviceKind::ALL.len() + 3);
        for s in &all {
            assert_eq!(by_name(&s.name).as_ref(), Some(s));
        }
        assert_eq!(schema_name(DeviceKind::Lock, Channel::State), "state.lock.v1");
        assert_eq!(schema_name(DeviceKind::Lock, Channel::Ack), "ack.v1");
    }
}
