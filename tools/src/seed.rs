//! Creating households and devices for the demo, tests and benchmarks.
//!
//! Until the registration API exists (device registry issue), devices are
//! registered by appending `DeviceRegistered` events straight to the
//! households topic: the same events the API will append. Households of the
//! demo are created through the API; tests may append `HouseholdCreated`.

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
    /// The demo's accounts (development only: passwords included).
    #[serde(default)]
    pub accounts: Vec<crate::api::Account>,
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

/// Appends a new household owned by `owner` with `devices`, and issues their certificates.
pub async fn household(
    appender: &Appender,
    topics: &Topics,
    pki: &PkiDir,
    name: &str,
    devices: &[(DeviceKind, &str, &str)],
    owner: Option<Uuid>,
) -> anyhow::Result<SeededHousehold> {
    let household_id = Uuid::new_v4();
    let actor = Actor::System("seed".into());
    let ev = Event::HouseholdCreated(HouseholdCreated { name: name.into(), created_by: owner });
    let created = Envelope::new(household_id, actor.clone(), &ev, Utc::now()).with_seq(1);
    appender.append(&topics.households(), &created).await?;
    let out = devices_for(appender, topics, pki, household_id, created.event_id, devices).await?;
    Ok(SeededHousehold { household_id, name: name.into(), devices: out, accounts: Vec::new() })
}

/// Registers `devices` in an existing household (until the registration API
/// exists) and issues their certificates.
pub async fn devices_for(
    appender: &Appender,
    topics: &Topics,
    pki: &PkiDir,
    household_id: Uuid,
    cause: Uuid,
    devices: &[(DeviceKind, &str, &str)],
) -> anyhow::Result<Vec<SeededDevice>> {
    let actor = Actor::System("seed".into());
    let mut out = Vec::new();
    for (kind, dname, room) in devices {
        let id = Uuid::new_v4();
        let issued = pki::issue_device(pki, id)?;
        let ev =
            Event::DeviceRegistered(DeviceRegistered { device_id: id, kind: *kind, name: (*dname).into(), room: Some((*room).into()) });
        appender.append(&topics.households(), &Envelope::new(household_id, actor.clone(), &ev, Utc::now()).with_causation(cause)).await?;
        out.push(SeededDevice {
            id,
            kind: *kind,
            name: (*dname).into(),
            room: Some((*room).into()),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        });
    }
    Ok(out)
}
