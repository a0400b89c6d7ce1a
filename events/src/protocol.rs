//! The MQTT device protocol (product.md, "Device protocol"): topic names and
//! message bodies, and the decoding of untrusted device payloads.

use crate::device::{DeviceKind, ValueError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Largest device payload accepted, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// Highest `seq` accepted: read models store it as a signed 64-bit integer.
pub const MAX_SEQ: u64 = i64::MAX as u64;
/// The only message version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The last segment of a device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    State,
    Cmd,
    Ack,
    Status,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::State => "state",
            Channel::Cmd => "cmd",
            Channel::Ack => "ack",
            Channel::Status => "status",
        }
    }
}

/// `home/{householdId}/device/{deviceId}/{channel}`.
pub fn device_topic(household_id: Uuid, device_id: Uuid, channel: Channel) -> String {
    format!("home/{household_id}/device/{device_id}/{}", channel.as_str())
}

/// A parsed device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTopic {
    pub household_id: Uuid,
    pub device_id: Uuid,
    pub channel: Channel,
}

/// Parses a device topic; `None` for anything that is not exactly one.
pub fn parse_device_topic(topic: &str) -> Option<DeviceTopic> {
    let mut parts = topic.split('/');
    let (home, h, device, d, c) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || home != "home" || device != "device" {
        return None;
    }
    let channel = match c {
        "state" => Channel::State,
        "cmd" => Channel::Cmd,
        "ack" => Channel::Ack,
        "status" => Channel::Status,
        _ => return None,
    };
    Some(DeviceTopic { household_id: Uuid::parse_str(h).ok()?, device_id: Uuid::parse_str(d).ok()?, channel })
}

/// `state`: device → cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateMsg {
    pub v: u16,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<DateTime<Utc>>,
    pub state: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery: Option<u8>,
}

/// `cmd`: cloud → device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CmdMsg {
    pub v: u16,
    pub command_id: Uuid,
    pub set: Map<String, Value>,
    pub expires_at: DateTime<Utc>,
}

/// Outcome of a command as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Ok,
    Rejected,
    Failed,
}

impl AckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Ok => "ok",
            AckStatus::Rejected => "rejected",
            AckStatus::Failed => "failed",
        }
    }
}

/// `ack`: device → cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AckMsg {
    pub v: u16,
    pub command_id: Uuid,
    pub status: AckStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `status`: device → cloud, retained; `offline` is the last will.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusMsg {
    pub v: u16,
    pub status: Presence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Online,
    Offline,
}

/// A device message that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceMessage {
    State(StateMsg),
    Ack(AckMsg),
    Status(StatusMsg),
}

/// Why a device payload was refused; the text goes into the dead-letter record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed JSON body: {0}")]
    Json(String),
    #[error("unsupported message version {0}")]
    Version(u16),
    #[error("seq {0} is out of range")]
    Seq(u64),
    #[error("battery {0} is out of range 0-100")]
    Battery(u8),
    #[error("devices do not publish on `cmd`")]
    WrongDirection,
    #[error("reason must be given for rejected and failed, and be at most 200 characters")]
    Reason,
    #[error("text must not contain the NUL character (\\u0000)")]
    Nul,
    #[error(transparent)]
    Value(#[from] ValueError),
}

impl PayloadError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PayloadError::TooLarge(_) => "too_large",
            PayloadError::Json(_) => "malformed",
            PayloadError::Version(_) => "version",
            PayloadError::Seq(_) => "seq",
            PayloadError::Battery(_) => "battery",
            PayloadError::WrongDirection => "direction",
            PayloadError::Reason => "reason",
            PayloadError::Nul => "nul",
            PayloadError::Value(_) => "capability",
        }
    }
}

/// Decodes and validates an untrusted payload published on `channel` by a
/// device of `kind`. Unknown fields are ignored (forward compatibility).
pub fn decode_device_message(kind: DeviceKind, channel: Channel, payload: &[u8]) -> Result<DeviceMessage, PayloadError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLarge(payload.len()));
    }
    fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, PayloadError> {
        serde_json::from_slice(payload).map_err(|e| PayloadError::Json(e.to_string()))
    }
    match channel {
        Channel::State => check_state(kind, parse(payload)?),
        Channel::Ack => check_ack(parse(payload)?),
        Channel::Status => check_status(parse(payload)?),
        Channel::Cmd => Err(PayloadError::WrongDirection),
    }
}

/// [`decode_device_message`] of a payload already parsed into JSON (of at
/// most [`MAX_PAYLOAD_BYTES`], which the caller checked): the same rules,
/// without parsing the bytes a second time.
pub fn decode_device_value(kind: DeviceKind, channel: Channel, body: Value) -> Result<DeviceMessage, PayloadError> {
    fn parse<T: for<'de> Deserialize<'de>>(body: Value) -> Result<T, PayloadError> {
        serde_json::from_value(body).map_err(|e| PayloadError::Json(e.to_string()))
    }
    match channel {
        Channel::State => check_state(kind, parse(body)?),
        Channel::Ack => check_ack(parse(body)?),
        Channel::Status => check_status(parse(body)?),
        Channel::Cmd => Err(PayloadError::WrongDirection),
    }
}

fn version(v: u16) -> Result<(), PayloadError> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(PayloadError::Version(v))
    }
}

fn check_state(kind: DeviceKind, m: StateMsg) -> Result<DeviceMessage, PayloadError> {
    version(m.v)?;
    if m.seq == 0 || m.seq > MAX_SEQ {
        return Err(PayloadError::Seq(m.seq));
    }
    if let Some(b) = m.battery.filter(|b| *b > 100) {
        return Err(PayloadError::Battery(b));
    }
    if m.state.iter().any(|(k, v)| crate::text::has_nul(k) || crate::text::value_has_nul(v)) {
        return Err(PayloadError::Nul);
    }
    kind.validate_state(&m.state)?;
    Ok(DeviceMessage::State(m))
}

fn check_ack(m: AckMsg) -> Result<DeviceMessage, PayloadError> {
    version(m.v)?;
    if m.reason.as_ref().is_some_and(|r| r.chars().count() > 200) || (m.status != AckStatus::Ok && m.reason.is_none()) {
        return Err(PayloadError::Reason);
    }
    if m.reason.as_deref().is_some_and(crate::text::has_nul) {
        return Err(PayloadError::Nul);
    }
    Ok(DeviceMessage::Ack(m))
}

fn check_status(m: StatusMsg) -> Result<DeviceMessage, PayloadError> {
    version(m.v)?;
    Ok(DeviceMessage::Status(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topics_round_trip() {
        let (h, d) = (Uuid::new_v4(), Uuid::new_v4());
        for c in [Channel::State, Channel::Cmd, Channel::Ack, Channel::Status] {
            let t = device_topic(h, d, c);
            assert_eq!(parse_device_topic(&t), Some(DeviceTopic { household_id: h, device_id: d, channel: c }));
        }
        assert_eq!(parse_device_topic("home/x/device/y/state"), None);
        assert_eq!(parse_device_topic(&format!("home/{h}/device/{d}/state/extra")), None);
        assert_eq!(parse_device_topic(&format!("home/{h}/device/{d}/other")), None);
    }

    #[test]
    fn a_valid_report_decodes_and_unknown_fields_are_ignored() {
        let p = br#"{"v":1,"seq":42,"ts":"2026-11-25T12:00:00Z","state":{"on":true,"brightness":80},"future":1}"#;
        match decode_device_message(DeviceKind::Light, Channel::State, p) {
            Ok(DeviceMessage::State(m)) => assert_eq!(m.seq, 42),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_reports_are_refused_with_a_reason() {
        let k = DeviceKind::Light;
        let cases: [(&[u8], &str); 7] = [
            (b"garbage", "malformed"),
            (br#"{"v":2,"seq":1,"state":{}}"#, "version"),
            (br#"{"v":1,"seq":18446744073709551615,"state":{}}"#, "seq"),
            (br#"{"v":1,"seq":0,"state":{}}"#, "seq"),
            (br#"{"v":1,"seq":1,"state":{"brightness":900}}"#, "capability"),
            (br#"{"v":1,"seq":1,"state":{},"battery":101}"#, "battery"),
            (br#"{"v":1,"seq":1,"state":{"on":{"a":{"b":[[[[1]]]]}}}}"#, "capability"),
        ];
        for (p, kind) in cases {
            let err = decode_device_message(k, Channel::State, p).unwrap_err();
            assert_eq!(err.kind(), kind, "{}", String::from_utf8_lossy(p));
        }
        let nul = br#"{"v":1,"commandId":"7d0e6b0c-8a52-4a39-9a8e-7c1f3f0c2b11","status":"rejected","reason":"a\u0000b"}"#;
        assert_eq!(decode_device_message(k, Channel::Ack, nul).unwrap_err().kind(), "nul");
        let nul_key = br#"{"v":1,"seq":1,"state":{"on\u0000":true}}"#;
        assert_eq!(decode_device_message(k, Channel::State, nul_key).unwrap_err().kind(), "nul");
        let deep = format!("{}{}", "[".repeat(1_000), "]".repeat(1_000));
        assert_eq!(decode_device_message(k, Channel::Ack, deep.as_bytes()).unwrap_err().kind(), "malformed");
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert_eq!(decode_device_message(k, Channel::Status, &big).unwrap_err().kind(), "too_large");
        assert_eq!(decode_device_message(k, Channel::Cmd, b"{}").unwrap_err().kind(), "direction");
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for c in [Channel::State, Channel::Ack, Channel::Status] {
                let _ = decode_device_message(DeviceKind::Thermostat, c, &bytes);
            }
        }

        #[test]
        fn cmd_messages_round_trip(id in any::<u128>(), on in any::<bool>()) {
            let mut set = Map::new();
            set.insert("on".into(), Value::Bool(on));
            let m = CmdMsg { v: 1, command_id: Uuid::from_u128(id), set, expires_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap() };
            let back: CmdMsg = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
            prop_assert_eq!(back, m);
        }
    }
}
