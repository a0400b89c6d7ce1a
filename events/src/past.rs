//! A household as it was at a past instant, folded from its recorded events
//! (issue 18: `householdAt`). Pure: the caller reads the household's history
//! from the log (or resumes from a snapshot of this fold) up to the instant
//! and applies each event in order.
//!
//! What it keeps: the household aggregate (members and roles, rooms,
//! devices and their rooms, presence, time zone), each device's name, and
//! each device's twin as the app saw it: `reported` (every report merged in,
//! a report older than the last applied one — by the device's `seq` — moves
//! nothing back), `online` and `lastSeen`, and `desired`: the values of
//! commands not yet settled at that instant (a later command setting the
//! same capability replaces it; a report carrying the value, a refusing ack,
//! expiry or revocation settles it).

use crate::household::Household;
use crate::protocol::AckStatus;
use crate::{Envelope, Event};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// One device at the instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PastDevice {
    pub name: String,
    pub reported: Map<String, Value>,
    /// The `seq` of the last report applied.
    pub seq: Option<u64>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
}

/// A command's values still wanted at the instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub device_id: Uuid,
    pub set: Map<String, Value>,
    pub expires_at: DateTime<Utc>,
    pub requested_at: DateTime<Utc>,
}

/// The fold. Serializable, so it can be stored as a snapshot and resumed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Past {
    pub name: Option<String>,
    pub household: Household,
    pub devices: BTreeMap<Uuid, PastDevice>,
    /// Open commands by id.
    pub pending: BTreeMap<Uuid, Pending>,
    /// Events applied.
    pub events: u64,
    /// The latest `occurredAt` applied.
    pub last: Option<DateTime<Utc>>,
}

impl Past {
    /// Applies one recorded event (in log order per topic).
    pub fn apply(&mut self, env: &Envelope) {
        let Ok(ev) = env.event() else { return };
        self.events += 1;
        self.last = Some(self.last.map_or(env.occurred_at, |l| l.max(env.occurred_at)));
        if let Some(he) = ev.household_event() {
            let _ = self.household.apply(&he, env.seq, env.occurred_at);
        }
        match &ev {
            Event::HouseholdCreated(c) => self.name = Some(c.name.clone()),
            Event::DeviceRegistered(d) => {
                self.devices.entry(d.device_id).or_default().name = d.name.clone();
            }
            Event::DeviceRenamed(d) => {
                if let Some(x) = self.devices.get_mut(&d.device_id) {
                    x.name = d.name.clone();
                }
            }
            Event::DeviceStateReported(r) => {
                let d = self.devices.entry(r.device_id).or_default();
                d.last_seen = Some(env.occurred_at);
                if d.seq.is_some_and(|s| r.seq <= s) {
                    return;
                }
                d.seq = Some(r.seq);
                for (k, v) in &r.state {
                    d.reported.insert(k.clone(), v.clone());
                }
                // Values the device now reports are no longer wanted.
                let reported = d.reported.clone();
                self.pending.retain(|_, p| {
                    if p.device_id == r.device_id {
                        p.set.retain(|k, v| reported.get(k) != Some(v));
                    }
                    !p.set.is_empty()
                });
            }
            Event::DeviceStatusChanged(s) => {
                let d = self.devices.entry(s.device_id).or_default();
                d.online = s.online;
                d.last_seen = Some(env.occurred_at);
            }
            Event::DeviceCommandRequested(c) => {
                // A newer command for a capability replaces the older one's value.
                for p in self.pending.values_mut().filter(|p| p.device_id == c.device_id) {
                    p.set.retain(|k, _| !c.set.contains_key(k));
                }
                self.pending.retain(|_, p| !p.set.is_empty());
                self.pending.insert(
                    c.command_id,
                    Pending { device_id: c.device_id, set: c.set.clone(), expires_at: c.expires_at, requested_at: env.occurred_at },
                );
            }
            Event::DeviceCommandAcked(a) if matches!(a.status, AckStatus::Rejected | AckStatus::Failed) => {
                self.pending.remove(&a.command_id);
            }
            Event::DeviceCommandExpired(x) => {
                self.pending.remove(&x.command_id);
            }
            Event::DeviceCommandRevoked(x) => {
                self.pending.remove(&x.command_id);
            }
            _ => {}
        }
    }

    /// The values still wanted of `device` at `at` (commands not settled and not expired).
    pub fn desired(&self, device: Uuid, at: DateTime<Utc>) -> Map<String, Value> {
        let mut out = Map::new();
        let mut open: Vec<&Pending> = self.pending.values().filter(|p| p.device_id == device && p.expires_at > at).collect();
        open.sort_by_key(|p| p.requested_at);
        for p in open {
            for (k, v) in &p.set {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        DeviceCommandAcked, DeviceCommandRequested, DeviceRegistered, DeviceStateReported, DeviceStatusChanged, HouseholdCreated,
    };
    use crate::{Actor, DeviceKind};
    use serde_json::json;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time")
    }

    fn env(ev: Event, s: i64) -> Envelope {
        Envelope::new(Uuid::nil(), Actor::System("test".into()), &ev, at(s))
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn given_reports_commands_and_acks_when_folded_then_the_twin_is_as_it_was() {
        let d = Uuid::from_u128(7);
        let owner = Uuid::from_u128(1);
        let mut p = Past::default();
        p.apply(&env(Event::HouseholdCreated(HouseholdCreated { name: "Home".into(), created_by: Some(owner) }), 0));
        p.apply(&env(
            Event::DeviceRegistered(DeviceRegistered {
                device_id: d,
                kind: DeviceKind::Light,
                name: "Lamp".into(),
                room: None,
                room_id: None,
                serial: None,
                cert_serial: None,
                broker: None,
                report_interval_secs: None,
            }),
            1,
        ));
        p.apply(&env(Event::DeviceStatusChanged(DeviceStatusChanged { device_id: d, online: true }), 2));
        p.apply(&env(
            Event::DeviceStateReported(DeviceStateReported {
                device_id: d,
                seq: 2,
                device_ts: None,
                state: map(json!({"on": true, "brightness": 20})),
                battery: None,
            }),
            3,
        ));
        // Older than the last one applied: moves nothing back.
        p.apply(&env(
            Event::DeviceStateReported(DeviceStateReported {
                device_id: d,
                seq: 1,
                device_ts: None,
                state: map(json!({"brightness": 5})),
                battery: None,
            }),
            4,
        ));
        let c1 = Uuid::from_u128(100);
        p.apply(&env(
            Event::DeviceCommandRequested(DeviceCommandRequested {
                command_id: c1,
                device_id: d,
                set: map(json!({"brightness": 70, "on": true})),
                expires_at: at(100),
                queued: false,
            }),
            5,
        ));
        assert_eq!(p.name.as_deref(), Some("Home"));
        assert_eq!(p.devices[&d].name, "Lamp");
        assert_eq!(p.devices[&d].reported, map(json!({"on": true, "brightness": 20})));
        assert!(p.devices[&d].online);
        // What the command asks for, until reports carry it.
        assert_eq!(p.desired(d, at(6)), map(json!({"brightness": 70, "on": true})));
        p.apply(&env(
            Event::DeviceStateReported(DeviceStateReported {
                device_id: d,
                seq: 3,
                device_ts: None,
                state: map(json!({"brightness": 70})),
                battery: None,
            }),
            7,
        ));
        assert_eq!(p.desired(d, at(8)), Map::new(), "the report settled the command");
        let c2 = Uuid::from_u128(101);
        p.apply(&env(
            Event::DeviceCommandRequested(DeviceCommandRequested {
                command_id: c2,
                device_id: d,
                set: map(json!({"on": false})),
                expires_at: at(20),
                queued: false,
            }),
            9,
        ));
        assert_eq!(p.desired(d, at(10)), map(json!({"on": false})));
        assert_eq!(p.desired(d, at(21)), Map::new(), "expired at its expiry");
        p.apply(&env(
            Event::DeviceCommandAcked(DeviceCommandAcked { command_id: c2, device_id: d, status: AckStatus::Rejected, reason: None }),
            11,
        ));
        assert_eq!(p.desired(d, at(12)), Map::new(), "a refusing ack settles it");
        p.apply(&env(Event::DeviceStatusChanged(DeviceStatusChanged { device_id: d, online: false }), 13));
        assert!(!p.devices[&d].online);
        assert_eq!(p.devices[&d].last_seen, Some(at(13)));
        assert_eq!(p.events, 10);
        assert!(p.household.devices.contains_key(&d));
        // A snapshot is the fold as JSON: it reads back equal and folds on the same.
        let stored = serde_json::to_value(&p).expect("serializes");
        let mut back: Past = serde_json::from_value(stored).expect("deserializes");
        assert_eq!(back, p);
        let more = env(Event::DeviceStatusChanged(DeviceStatusChanged { device_id: d, online: true }), 14);
        back.apply(&more);
        p.apply(&more);
        assert_eq!(back, p);
    }
}
