//! The event envelope: what every Kafka record of HomeLink holds.
//!
//! The envelope is the wire type; the payload stays raw JSON here and becomes a
//! typed [`Event`] through [`Envelope::event`], which is where old schema
//! versions are upcast.

use crate::event::{DecodeError, Event};
use crate::household::Role;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Largest envelope the decoders accept, in bytes. Anything larger on a topic
/// is a bug or an attack and goes to the dead-letter path.
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "lowercase")]
pub enum Actor {
    /// A signed-in user (the subject of their token).
    User(String),
    /// A device, by its certificate's CN (the device id).
    Device(Uuid),
    /// The platform itself (seeding, reactors), named.
    System(String),
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Unique per event; a retried append keeps it.
    pub event_id: Uuid,
    /// The household whose history this event belongs to (the record key).
    pub household_id: Uuid,
    /// The stream inside the household that `seq` orders, for example
    /// `device/<id>` for device reports.
    pub stream: String,
    /// Position in `stream` when the producer knows one (a device's `seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Event type name, past tense (`DeviceStateReported`).
    #[serde(rename = "type")]
    pub event_type: String,
    /// Schema version of `payload` for this type.
    pub v: u16,
    pub occurred_at: DateTime<Utc>,
    pub actor: Actor,
    /// The event or request that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Shared by every event of one user intent (a command and its ack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    pub payload: serde_json::Value,
    /// How the request that caused this event came in (for the audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<RequestMeta>,
}

/// The caller's role in the household and the client they used, as the
/// command API saw them when it accepted or refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

impl Envelope {
    /// Wraps a typed event in a new envelope with a fresh id.
    pub fn new(household_id: Uuid, actor: Actor, event: &Event, occurred_at: DateTime<Utc>) -> Self {
        let (event_type, v, payload) = event.to_parts();
        Self {
            event_id: Uuid::now_v7(),
            household_id,
            stream: event.stream(),
            seq: event.stream_seq(),
            event_type: event_type.to_owned(),
            v,
            occurred_at,
            actor,
            causation_id: None,
            correlation_id: None,
            payload,
            meta: None,
        }
    }

    /// Sets the stream position (the household version for household events).
    pub fn with_seq(mut self, seq: u64) -> Self {
        self.seq = Some(seq);
        self
    }

    pub fn with_meta(mut self, meta: RequestMeta) -> Self {
        self.meta = Some(meta);
        self
    }

    pub fn with_causation(mut self, causation_id: Uuid) -> Self {
        self.causation_id = Some(causation_id);
        self
    }

    pub fn with_correlation(mut self, correlation_id: Uuid) -> Self {
        self.correlation_id = Some(correlation_id);
        self
    }

    /// The typed event, upcast to the current version.
    pub fn event(&self) -> Result<Event, DecodeError> {
        Event::from_parts(&self.event_type, self.v, self.payload.clone())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of plain fields and a `Value` cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes untrusted bytes from a topic.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DeviceStatusChanged;

    #[test]
    fn json_uses_camel_case_and_the_type_name() {
        let e = Envelope::new(
            Uuid::nil(),
            Actor::Device(Uuid::nil()),
            &Event::DeviceStatusChanged(DeviceStatusChanged { device_id: Uuid::nil(), online: true }),
            DateTime::from_timestamp(0, 0).unwrap(),
        );
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["type"], "DeviceStatusChanged");
        assert_eq!(v["householdId"], Uuid::nil().to_string());
        assert_eq!(v["actor"]["kind"], "device");
        assert_eq!(v["payload"]["online"], true);
        assert!(v.get("causationId").is_none());
    }

    #[test]
    fn oversized_and_garbage_input_is_an_error_not_a_panic() {
        assert!(matches!(Envelope::from_json(&vec![b' '; MAX_ENVELOPE_BYTES + 1]), Err(DecodeError::TooLarge(_))));
        assert!(Envelope::from_json(b"{\"eventId\":").is_err());
        assert!(Envelope::from_json(b"[]").is_err());
    }
}
