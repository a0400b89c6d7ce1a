//! Creating households and devices for the demo, tests and benchmarks.
//!
//! Everything goes through the command API, as the app does it: households,
//! rooms, device registration (which issues the device certificates).

use crate::api::Account;
use homelink_events::DeviceKind;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
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
    /// The port of the broker the registration assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_port: Option<u16>,
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

impl SeededHousehold {
    /// The simulator's description of device `index` (reports every `interval`, or only on change).
    pub fn spec(&self, index: usize, interval: Option<std::time::Duration>) -> crate::sim::DeviceSpec {
        let d = &self.devices[index];
        crate::sim::DeviceSpec {
            household_id: self.household_id,
            device_id: d.id,
            kind: d.kind,
            cert_pem: d.cert_pem.clone(),
            key_pem: d.key_pem.clone(),
            interval,
            port: d.mqtt_port,
        }
    }
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

/// Creates a household owned by `owner` through the command API, its rooms
/// and `devices` (registered through the API, which issues their
/// certificates; the generated keys come back once and are kept here).
pub async fn household(
    http: &reqwest::Client,
    api: &str,
    owner: &Account,
    name: &str,
    devices: &[(DeviceKind, &str, &str)],
) -> crate::Result<SeededHousehold> {
    let household_id = crate::api::create_household(http, api, owner, name).await?;
    let devices = register_devices(http, api, owner, household_id, devices).await?;
    Ok(SeededHousehold { household_id, name: name.into(), devices, accounts: Vec::new() })
}

/// Creates the rooms `devices` name (once each) and registers the devices.
pub async fn register_devices(
    http: &reqwest::Client,
    api: &str,
    who: &Account,
    household_id: Uuid,
    devices: &[(DeviceKind, &str, &str)],
) -> crate::Result<Vec<SeededDevice>> {
    let mut rooms: HashMap<&str, Uuid> = HashMap::new();
    let mut out = Vec::new();
    for (kind, dname, room) in devices {
        let room_id = match rooms.get(room) {
            Some(r) => *r,
            None => {
                let r = crate::api::create_room(http, api, who, household_id, room).await?;
                rooms.insert(room, r);
                r
            }
        };
        let d = crate::api::register_device(http, api, who, household_id, *kind, dname, Some(room_id), None, None).await?;
        out.push(SeededDevice {
            id: d.device_id,
            kind: *kind,
            name: (*dname).into(),
            room: Some((*room).into()),
            cert_pem: d.certificate_pem,
            key_pem: d.private_key_pem.unwrap_or_default(),
            mqtt_port: d.mqtt.map(|m| m.port),
        });
    }
    Ok(out)
}
