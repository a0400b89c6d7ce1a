//! Creating households and devices for the demo, tests and benchmarks.
//!
//! Until the registration API exists (device registry issue), devices are
//! registered by appending `HouseholdCreated` / `DeviceRegistered` events
//! straight to the households topic: the same events the API will append.

use crate::pki::{self, PkiDir};
use chrono::Utc;
use homelink_events::event::{DeviceRegistered, HouseholdCreated};
use homelink_events::{Actor, DeviceKind, Envelope, Event, Topics};
use homelink_kit::kafka::Appender;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A device with its credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeededDevice {
    pub id: Uuid,
    pub kind: DeviceKind,
    pub name: String,
    pub room: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeededHousehold {
    pub household_id: Uuid,
    pub name: String,
    pub devices: Vec<SeededDevice>,
}

/// The demo household: one device of every kind (two sensors).
pub fn demo_devices() -> Vec<(DeviceKind, &'static str, &'static str)> {
    vec![
        (DeviceKind::Light, "Ceiling light", "Living room"),
        (DeviceKind::Plug, "Coffee machine", "Kitchen"),
        (DeviceKind::Thermostat, "Thermostat", "Living room"),
        (DeviceKind::Lock, "Front door", "Hall"),
        (DeviceKind::Camera, "Garden camera", "Garden"),
        (DeviceKind::Sensor, "Bedroom climate", "Bedroom"),
        (DeviceKind::Sensor, "Back door contact", "Kitchen"),
    ]
}

/// Appends a new household with `devices` and issues their certificates.
pub async fn household(
    appender: &Appender,
    topics: &Topics,
    pki: &PkiDir,
    name: &str,
    devices: &[(DeviceKind, &str, &str)],
) -> anyhow::Result<SeededHousehold> {
    let household_id = Uuid::new_v4();
    let actor = Actor::System("seed".into());
    let created = Envelope::new(household_id, actor.clone(), &Event::HouseholdCreated(HouseholdCreated { name: name.into() }), Utc::now());
    appender.append(&topics.households(), &created).await?;
    let mut out = Vec::new();
    for (kind, dname, room) in devices {
        let id = Uuid::new_v4();
        let issued = pki::issue_device(pki, id)?;
        let ev =
            Event::DeviceRegistered(DeviceRegistered { device_id: id, kind: *kind, name: (*dname).into(), room: Some((*room).into()) });
        appender
            .append(&topics.households(), &Envelope::new(household_id, actor.clone(), &ev, Utc::now()).with_causation(created.event_id))
            .await?;
        out.push(SeededDevice {
            id,
            kind: *kind,
            name: (*dname).into(),
            room: Some((*room).into()),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        });
    }
    Ok(SeededHousehold { household_id, name: name.into(), devices: out })
}
