//! How a device shadow evolves: the pure fold the projector runs per batch.
//!
//! **Invariant**: the shadow depends on the *set* of events applied, not on
//! their order, so duplicates and any arrival order (a batch applied twice
//! after a crash, a partition caught up later) converge to the in-order result
//! (the change counter `version` aside):
//! - each reported property holds the value of the report with the highest
//!   `seq` that carried it (a partial report never overwrites a newer value of
//!   its properties and never touches the others);
//! - the battery likewise, by the `seq` of the report that carried it;
//! - presence (`online`) follows the event at the highest log position among
//!   status messages and reports (a report means online);
//! - `seq` is the highest report `seq`, `last_seen` the latest time.
//!
//! The twin on top (issues 11 and 15): each property's **desired** value
//! comes from the latest command that set it (by request time, then command
//! id); it is cleared when the device acked that command `ok` and a report
//! after the ack carries the value (the command is then *confirmed* once all
//! its values were reported), or when its command expires, is revoked, or
//! the device rejects it or fails to carry it out. Both are functions of the
//! set of events, whatever order the two topics arrive in
//! ([`crate::twin`]).
//! The **delta** is what is desired and not (yet) reported. Per property,
//! **metadata** says when it was last reported and last desired, and by
//! which command.

use crate::event::Event;
use crate::twin::{Fact, Twin};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// When a property was last reported and last desired, and by which command.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PropertyMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_at: Option<DateTime<Utc>>,
    /// The command that set the (last) desired value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Uuid>,
}

/// The desired values that differ from the reported ones.
pub fn delta_of(reported: &Map<String, Value>, desired: &Map<String, Value>) -> Map<String, Value> {
    desired.iter().filter(|(k, v)| !reported.get(*k).is_some_and(|r| same_value(r, v))).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The product's report interval (product.md: status every 30 s).
pub const DEFAULT_REPORT_INTERVAL_SECS: u32 = 30;

/// Staleness, computed from time so it shows even when nothing arrives: a
/// device is stale when it was last seen more than two report intervals
/// before `now`; a property, when it was last reported that long ago.
pub fn staleness(
    last_seen: Option<DateTime<Utc>>,
    metadata: &BTreeMap<String, PropertyMeta>,
    interval_secs: u32,
    now: DateTime<Utc>,
) -> (bool, Vec<String>) {
    let limit = now - chrono::Duration::seconds(2 * i64::from(interval_secs.max(1)));
    let stale = last_seen.is_some_and(|t| t < limit);
    let props = metadata.iter().filter(|(_, m)| m.reported_at.is_some_and(|t| t < limit)).map(|(k, _)| k.clone()).collect();
    (stale, props)
}

/// Whether two property values are the same (`20` and `20.0` are).
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// What the projector announces after committing a changed shadow, and what
/// query-api pushes to subscribers (the wire type of that notification).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowChanged {
    pub household_id: uuid::Uuid,
    pub device_id: uuid::Uuid,
    pub reported: Map<String, Value>,
    pub seq: u64,
    pub version: u64,
    pub battery: Option<u8>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    #[serde(default)]
    pub desired: Map<String, Value>,
    #[serde(default)]
    pub delta: Map<String, Value>,
    #[serde(default)]
    pub metadata: BTreeMap<String, PropertyMeta>,
    /// The household's change sequence number: gap-free and increasing over
    /// every change of the household (shadows and registry), assigned by the
    /// projector in the transaction that commits the change.
    #[serde(default)]
    pub change_seq: u64,
    /// The device's report interval (staleness is computed from it at delivery).
    #[serde(default = "default_interval")]
    pub report_interval_secs: u32,
    /// The reports merged into this one change passed through values the
    /// final state does not show: per such property, every value it took in
    /// the batch, in order (a door opened and closed: `{"contact": [false, true]}`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub transitions: Map<String, Value>,
}

fn default_interval() -> u32 {
    DEFAULT_REPORT_INTERVAL_SECS
}

impl ShadowChanged {
    pub fn new(household_id: uuid::Uuid, device_id: uuid::Uuid, s: &Shadow) -> Self {
        Self {
            household_id,
            device_id,
            reported: s.reported.clone(),
            seq: s.seq,
            version: s.version,
            battery: s.battery,
            online: s.online,
            last_seen: s.last_seen,
            desired: s.desired.clone(),
            delta: s.delta(),
            metadata: s.metadata.clone(),
            change_seq: 0,
            report_interval_secs: DEFAULT_REPORT_INTERVAL_SECS,
            transitions: Map::new(),
        }
    }
}

/// The values each property took over a batch, to tell which transitions
/// one merged change would hide.
#[derive(Debug, Default)]
pub struct Trail(BTreeMap<String, Vec<Value>>);

impl Trail {
    /// Notes the shadow's reported values (call it before the batch and after each event).
    pub fn note(&mut self, reported: &Map<String, Value>) {
        for (k, v) in reported {
            let seen = self.0.entry(k.clone()).or_default();
            if seen.last() != Some(v) {
                seen.push(v.clone());
            }
        }
    }

    /// The properties that changed more than once, with every value they took
    /// after the first (see [`ShadowChanged::transitions`]).
    pub fn transitions(&self, had_before: &Map<String, Value>) -> Map<String, Value> {
        self.0
            .iter()
            .filter_map(|(k, seen)| {
                let taken: &[Value] = if had_before.contains_key(k) { seen.get(1..).unwrap_or(&[]) } else { seen };
                (taken.len() > 1).then(|| (k.clone(), Value::Array(taken.to_vec())))
            })
            .collect()
    }
}

/// The last known state of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    /// Reported capability values, merged report over report.
    pub reported: Map<String, Value>,
    /// Highest report `seq` applied.
    pub seq: u64,
    /// Bumped on every change to this shadow.
    pub version: u64,
    pub battery: Option<u8>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    /// Log offset of the latest presence evidence (a status message or a
    /// report). Status messages carry no `seq`, so the log order (one
    /// household, one partition) orders them.
    pub status_offset: i64,
    /// The `seq` of the report that set each reported property.
    pub property_seq: BTreeMap<String, u64>,
    /// The `seq` of the report that set `battery`.
    pub battery_seq: u64,
    /// Desired values not reported yet (see the module documentation),
    /// derived from [`Shadow::twin`].
    pub desired: Map<String, Value>,
    pub metadata: BTreeMap<String, PropertyMeta>,
    /// The facts of the device's commands the desired side is derived from.
    pub twin: Twin,
}

/// What applying one event did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub changed: bool,
    /// Commands now confirmed, with the time of the report that completed each.
    pub confirmed: Vec<(Uuid, DateTime<Utc>)>,
    /// The twin's facts changed (to be stored even if nothing shown changed).
    pub facts_changed: bool,
}

impl Default for Shadow {
    fn default() -> Self {
        Self {
            reported: Map::new(),
            seq: 0,
            version: 0,
            battery: None,
            online: false,
            last_seen: None,
            status_offset: -1,
            property_seq: BTreeMap::new(),
            battery_seq: 0,
            desired: Map::new(),
            metadata: BTreeMap::new(),
            twin: Twin::default(),
        }
    }
}

impl Shadow {
    /// Applies one event recorded at `at` at log `offset`; returns whether the
    /// shadow changed.
    pub fn apply(&mut self, event: &Event, at: DateTime<Utc>, offset: i64) -> bool {
        self.apply_twin(event, at, offset).changed
    }

    /// Desired values that differ from the reported ones.
    pub fn delta(&self) -> Map<String, Value> {
        delta_of(&self.reported, &self.desired)
    }

    /// Like [`Shadow::apply`], also saying which commands it confirmed.
    pub fn apply_twin(&mut self, event: &Event, at: DateTime<Utc>, offset: i64) -> Applied {
        let mut out = Applied::default();
        let fact = match event {
            Event::DeviceCommandRequested(c) => Some(Fact::Requested { command_id: c.command_id, set: &c.set, at }),
            Event::DeviceCommandAcked(a) => Some(Fact::Acked { command_id: a.command_id, status: a.status, offset }),
            Event::DeviceCommandExpired(e) => Some(Fact::Ended { command_id: e.command_id }),
            Event::DeviceCommandRevoked(r) => Some(Fact::Ended { command_id: r.command_id }),
            Event::DeviceStateReported(r) => {
                out.changed = self.apply_reported(event, at, offset);
                Some(Fact::Reported { state: &r.state, offset, at })
            }
            _ => {
                out.changed = self.apply_reported(event, at, offset);
                None
            }
        };
        if let Some(fact) = fact {
            (out.confirmed, out.facts_changed) = self.twin.apply_noting(fact);
            if self.derive_desired() {
                if !out.changed {
                    self.version += 1;
                }
                out.changed = true;
            }
        }
        out
    }

    /// Sets `desired` and the desired side of `metadata` from the twin's
    /// facts; whether anything changed.
    fn derive_desired(&mut self) -> bool {
        let d = self.twin.desired();
        let mut changed = d.values != self.desired;
        self.desired = d.values;
        for (k, (command, requested)) in d.by {
            let m = self.metadata.entry(k).or_default();
            if m.command_id != Some(command) || m.desired_at != Some(requested) {
                m.command_id = Some(command);
                m.desired_at = Some(requested);
                changed = true;
            }
        }
        changed
    }

    fn apply_reported(&mut self, event: &Event, at: DateTime<Utc>, offset: i64) -> bool {
        match event {
            Event::DeviceStateReported(r) => {
                let mut changed = false;
                for (k, v) in &r.state {
                    // A property without its own seq (a shadow from before
                    // they were kept) was set by the shadow's last report.
                    let set_by = self.property_seq.get(k).copied().unwrap_or(if self.reported.contains_key(k) { self.seq } else { 0 });
                    if r.seq > set_by {
                        self.property_seq.insert(k.clone(), r.seq);
                        self.metadata.entry(k.clone()).or_default().reported_at = Some(at);
                        if self.reported.get(k) != Some(v) {
                            self.reported.insert(k.clone(), v.clone());
                        }
                        changed = true;
                    }
                }
                if let Some(b) = r.battery {
                    if r.seq > self.battery_seq {
                        self.battery_seq = r.seq;
                        changed |= self.battery != Some(b);
                        self.battery = Some(b);
                    }
                }
                if r.seq > self.seq {
                    self.seq = r.seq;
                    changed = true;
                }
                // A device that reports is online, unless a later position says otherwise.
                if offset > self.status_offset {
                    self.status_offset = offset;
                    changed |= !self.online;
                    self.online = true;
                }
                changed |= self.seen(at);
                if changed {
                    self.version += 1;
                }
                changed
            }
            Event::DeviceStatusChanged(s) => {
                // An online status is a sighting whatever its position.
                let mut changed = s.online && self.seen(at);
                if offset > self.status_offset {
                    self.status_offset = offset;
                    changed |= self.online != s.online;
                    self.online = s.online;
                }
                if changed {
                    self.version += 1;
                }
                changed
            }
            _ => false,
        }
    }

    /// Moves `last_seen` forward; whether it moved.
    fn seen(&mut self, at: DateTime<Utc>) -> bool {
        let later = self.last_seen.map_or(at, |t| t.max(at));
        let moved = self.last_seen != Some(later);
        self.last_seen = Some(later);
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DeviceStateReported, DeviceStatusChanged};
    use proptest::prelude::*;
    use serde_json::json;
    use uuid::Uuid;

    fn report(seq: u64, brightness: i64) -> Event {
        Event::DeviceStateReported(DeviceStateReported {
            device_id: Uuid::nil(),
            seq,
            device_ts: None,
            state: json!({"brightness": brightness}).as_object().cloned().unwrap(),
            battery: None,
        })
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    #[test]
    fn given_a_newer_report_when_an_older_one_arrives_then_nothing_changes() {
        let mut s = Shadow::default();
        assert!(s.apply(&report(5, 50), t(3), 0));
        assert!(!s.apply(&report(4, 40), t(2), 1));
        assert!(!s.apply(&report(5, 99), t(3), 2));
        assert_eq!(s.reported["brightness"], 50);
        assert_eq!((s.seq, s.version), (5, 1));
        // Received later, an older report still says when the device was last seen.
        assert!(s.apply(&report(3, 30), t(9), 3));
        assert_eq!((s.reported["brightness"].clone(), s.last_seen), (json!(50), Some(t(9))));
    }

    #[test]
    fn status_changes_bump_the_version_only_when_they_change_something() {
        let mut s = Shadow::default();
        let online = |o| Event::DeviceStatusChanged(DeviceStatusChanged { device_id: Uuid::nil(), online: o });
        assert!(s.apply(&online(true), t(1), 10));
        // Already online: only the sighting moves.
        assert!(s.apply(&online(true), t(2), 11));
        assert!(!s.apply(&online(true), t(2), 11));
        assert!(s.apply(&online(false), t(3), 12));
        // A replay of an older status (lower offset) never wins.
        assert!(!s.apply(&online(true), t(1), 10));
        assert_eq!((s.online, s.version, s.last_seen), (false, 3, Some(t(2))));
    }

    #[test]
    fn a_partial_report_never_loses_another_property_whatever_the_order() {
        let partial = |seq, state: Value| {
            Event::DeviceStateReported(DeviceStateReported {
                device_id: Uuid::nil(),
                seq,
                device_ts: None,
                state: state.as_object().cloned().unwrap(),
                battery: None,
            })
        };
        let (temp, motion) = (partial(5, json!({"temperature": 21.5})), partial(6, json!({"motion": true})));
        let mut late = Shadow::default();
        late.apply(&motion, t(2), 1);
        late.apply(&temp, t(1), 0);
        assert_eq!(Value::Object(late.reported.clone()), json!({"temperature": 21.5, "motion": true}));
        assert_eq!(late.seq, 6);
    }

    #[test]
    fn an_offline_status_is_not_undone_by_an_earlier_report_applied_after_it() {
        let offline = Event::DeviceStatusChanged(DeviceStatusChanged { device_id: Uuid::nil(), online: false });
        let online = Event::DeviceStatusChanged(DeviceStatusChanged { device_id: Uuid::nil(), online: true });
        let mut s = Shadow::default();
        assert!(s.apply(&online, t(0), 9));
        assert!(s.apply(&offline, t(2), 11));
        // The report was appended before the status (offset 10) but applied after it.
        assert!(s.apply(&report(7, 70), t(1), 10));
        assert!(!s.online);
        // A report appended after the status brings the device back.
        assert!(s.apply(&report(8, 80), t(3), 12));
        assert!(s.online);
    }

    fn command(id: u128, set: Value) -> Event {
        Event::DeviceCommandRequested(crate::event::DeviceCommandRequested {
            command_id: Uuid::from_u128(id),
            device_id: Uuid::nil(),
            set: set.as_object().cloned().unwrap(),
            expires_at: t(1000),
            queued: false,
        })
    }

    fn ack(id: u128, status: crate::protocol::AckStatus) -> Event {
        Event::DeviceCommandAcked(crate::event::DeviceCommandAcked {
            command_id: Uuid::from_u128(id),
            device_id: Uuid::nil(),
            status,
            reason: None,
        })
    }

    #[test]
    fn desired_shows_in_the_delta_until_a_report_after_the_ok_ack_carries_it_then_the_command_is_confirmed() {
        let mut s = Shadow::default();
        s.apply(&report(1, 10), t(1), 0);
        let a = s.apply_twin(&command(7, json!({"brightness": 80})), t(2), 0);
        assert!(a.changed && a.confirmed.is_empty());
        assert_eq!(Value::Object(s.delta()), json!({"brightness": 80}));
        assert_eq!(s.metadata["brightness"].command_id, Some(Uuid::from_u128(7)));
        // Another value reported: still desired.
        assert!(s.apply_twin(&report(2, 20), t(3), 1).confirmed.is_empty());
        // The value, but from before the device answered: still desired.
        assert!(s.apply_twin(&report(3, 80), t(3), 2).confirmed.is_empty());
        assert_eq!(Value::Object(s.desired.clone()), json!({"brightness": 80}));
        s.apply(&ack(7, crate::protocol::AckStatus::Ok), t(4), 3);
        let done = s.apply_twin(&report(4, 80), t(4), 4);
        assert_eq!(done.confirmed, vec![(Uuid::from_u128(7), t(4))]);
        assert!(s.desired.is_empty() && s.delta().is_empty());
        assert_eq!((s.metadata["brightness"].reported_at, s.metadata["brightness"].desired_at), (Some(t(4)), Some(t(2))));
    }

    #[test]
    fn a_report_from_before_the_request_does_not_clear_it_and_an_older_request_does_not_win() {
        let mut s = Shadow::default();
        s.apply(&command(2, json!({"brightness": 50})), t(5), 0);
        // Recorded before the request, applied after it: not an answer to it.
        assert!(s.apply_twin(&report(1, 50), t(4), 0).confirmed.is_empty());
        assert_eq!(s.desired["brightness"], 50);
        assert!(s.delta().is_empty(), "reported equals desired, nothing left to do");
        // An older request applied late changes nothing.
        assert!(!s.apply(&command(1, json!({"brightness": 10})), t(3), 0));
        assert_eq!(s.desired["brightness"], 50);
    }

    #[test]
    fn a_request_whose_ack_and_report_came_first_is_confirmed_at_once_and_an_expired_one_is_no_longer_desired() {
        let mut s = Shadow::default();
        // The telemetry topic ran ahead of the commands topic.
        s.apply(&ack(3, crate::protocol::AckStatus::Ok), t(9), 0);
        s.apply(&report(4, 30), t(9), 1);
        assert_eq!(s.apply_twin(&command(3, json!({"brightness": 30})), t(8), 0).confirmed, vec![(Uuid::from_u128(3), t(9))]);
        s.apply(&command(5, json!({"brightness": 60, "on": true})), t(10), 0);
        let expired = Event::DeviceCommandExpired(crate::event::DeviceCommandExpired {
            command_id: Uuid::from_u128(5),
            device_id: Uuid::nil(),
            expires_at: t(11),
        });
        assert!(s.apply(&expired, t(11), 1));
        assert!(s.desired.is_empty());
        assert!(!s.apply(&expired, t(11), 1), "twice is once");
    }

    #[test]
    fn a_command_the_device_rejects_or_fails_is_no_longer_desired_but_one_it_accepts_stays_until_reported() {
        let mut s = Shadow::default();
        s.apply(&command(1, json!({"brightness": 90})), t(1), 0);
        s.apply(&command(2, json!({"on": true})), t(2), 0);
        assert!(s.apply(&ack(1, crate::protocol::AckStatus::Rejected), t(3), 0));
        assert!(!s.apply(&ack(2, crate::protocol::AckStatus::Ok), t(3), 1));
        assert_eq!(Value::Object(s.desired.clone()), json!({"on": true}));
        // The first ack decides: a later, different one changes nothing.
        assert!(!s.apply(&ack(2, crate::protocol::AckStatus::Failed), t(4), 2));
        assert_eq!(Value::Object(s.desired.clone()), json!({"on": true}));
        s.apply(&command(4, json!({"brightness": 5})), t(5), 1);
        assert!(s.apply(&ack(4, crate::protocol::AckStatus::Failed), t(6), 3));
        assert_eq!(Value::Object(s.desired.clone()), json!({"on": true}));
    }

    #[test]
    fn a_trail_names_only_the_transitions_the_final_state_hides() {
        let obj = |v: Value| v.as_object().cloned().unwrap();
        let before = obj(json!({"motion": false, "temperature": 20}));
        let mut trail = Trail::default();
        trail.note(&before);
        trail.note(&obj(json!({"motion": true, "temperature": 20})));
        trail.note(&obj(json!({"motion": false, "temperature": 21, "humidity": 40})));
        // Motion came and went; temperature changed once; humidity is new: only motion.
        assert_eq!(Value::Object(trail.transitions(&before)), json!({"motion": [true, false]}));
    }

    /// One generated telemetry event: a partial report or a status.
    #[derive(Debug, Clone)]
    enum Gen {
        Report { props: Vec<(usize, i64)>, battery: Option<u8>, at: i64 },
        Status { online: bool, at: i64 },
    }

    fn gen_event() -> impl Strategy<Value = Gen> {
        prop_oneof![
            (proptest::collection::vec((0usize..4, 0i64..100), 0..4), proptest::option::of(0u8..=100), 0i64..50)
                .prop_map(|(props, battery, at)| Gen::Report { props, battery, at }),
            (any::<bool>(), 0i64..50).prop_map(|(online, at)| Gen::Status { online, at }),
        ]
    }

    /// What must not depend on the order (the change counter `version` may).
    fn state_of(s: &Shadow) -> Shadow {
        Shadow { version: 0, ..s.clone() }
    }

    proptest! {
        /// Partial reports (each with its own seq, increasing with the log
        /// position as a device sends them) and status messages, applied in
        /// any order and with duplicates, give the shadow of the log order.
        #[test]
        fn any_order_of_reports_and_statuses_converges(events in proptest::collection::vec(gen_event(), 1..25), seed in any::<u64>()) {
            let names = ["temperature", "humidity", "motion", "contact"];
            let mut seq = 0u64;
            let located: Vec<(Event, DateTime<Utc>, i64)> = events.iter().enumerate().map(|(offset, g)| match g {
                Gen::Report { props, battery, at } => {
                    seq += 1;
                    let state: Map<String, Value> = props.iter().map(|(i, v)| (names[*i].to_owned(), json!(v))).collect();
                    (Event::DeviceStateReported(DeviceStateReported { device_id: Uuid::nil(), seq, device_ts: None, state, battery: *battery }), t(*at), offset as i64)
                }
                Gen::Status { online, at } => (Event::DeviceStatusChanged(DeviceStatusChanged { device_id: Uuid::nil(), online: *online }), t(*at), offset as i64),
            }).collect();
            let mut in_order = Shadow::default();
            for (e, at, o) in &located { in_order.apply(e, *at, *o); }

            let mut shuffled: Vec<&(Event, DateTime<Utc>, i64)> = located.iter().chain(located.iter().step_by(2)).collect();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut s = Shadow::default();
            for (e, at, o) in shuffled { s.apply(e, *at, *o); }
            prop_assert_eq!(state_of(&s), state_of(&in_order));
        }

        /// Reports shuffled and duplicated converge to the in-order result.
        #[test]
        fn shuffled_duplicated_reports_converge(values in proptest::collection::vec(0i64..100, 1..30), seed in any::<u64>()) {
            let reports: Vec<Event> = values.iter().enumerate().map(|(i, v)| report(i as u64 + 1, *v)).collect();
            let mut in_order = Shadow::default();
            for r in &reports { in_order.apply(r, t(0), 0); }

            let mut shuffled: Vec<&Event> = reports.iter().chain(reports.iter().step_by(3)).collect();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut s = Shadow::default();
            for r in shuffled { s.apply(r, t(0), 0); }
            prop_assert_eq!(s.seq, in_order.seq);
            prop_assert_eq!(&s.reported["brightness"], &in_order.reported["brightness"]);
        }
    }
}

/// Postgres refuses NOTIFY payloads of 8,000 bytes or more; keep a margin.
pub const NOTIFY_MAX_BYTES: usize = 7_900;

/// One line of a shadow notification: `<household id>\t<ShadowChanged JSON>`,
/// or `<household id>\t!<device id>:<change seq>` when the change is too
/// large to travel in a notification (the listener reads it from the
/// retained changes). The
/// household comes first so a listener skips the changes of households
/// nobody watches without parsing them.
pub fn notification_line(c: &ShadowChanged) -> String {
    let json = serde_json::to_string(c).unwrap_or_default();
    if json.len() + 37 > NOTIFY_MAX_BYTES {
        format!("{}\t!{}:{}", c.household_id, c.device_id, c.change_seq)
    } else {
        format!("{}\t{json}", c.household_id)
    }
}

/// Packs lines into as few payloads as fit [`NOTIFY_MAX_BYTES`], in order.
pub fn pack_notifications(lines: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in lines {
        if !cur.is_empty() && cur.len() + 1 + line.len() > NOTIFY_MAX_BYTES {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push('\n');
        }
        cur.push_str(&line);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A line of a shadow notification, as a listener reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum NotificationLine<'a> {
    /// The change's JSON ([`ShadowChanged`]), not parsed yet.
    Change { household_id: uuid::Uuid, json: &'a str },
    /// The device's shadow changed; read the change from the retained ones.
    Refetch { household_id: uuid::Uuid, device_id: uuid::Uuid, change_seq: u64 },
}

/// Splits a notification payload into its lines; a line that is not of
/// the form [`notification_line`] writes is an `Err` with the line.
pub fn notification_lines(payload: &str) -> impl Iterator<Item = Result<NotificationLine<'_>, &str>> {
    payload.split('\n').filter(|l| !l.is_empty()).map(|line| {
        let (h, rest) = line.split_once('\t').ok_or(line)?;
        let household_id = h.parse().map_err(|_| line)?;
        match rest.strip_prefix('!') {
            Some(rest) => {
                let (d, seq) = rest.split_once(':').ok_or(line)?;
                Ok(NotificationLine::Refetch {
                    household_id,
                    device_id: d.parse().map_err(|_| line)?,
                    change_seq: seq.parse().map_err(|_| line)?,
                })
            }
            None => Ok(NotificationLine::Change { household_id, json: rest }),
        }
    })
}

#[cfg(test)]
mod notification_tests {
    use super::*;

    fn change(household: uuid::Uuid, big: usize) -> ShadowChanged {
        let mut reported = Map::new();
        reported.insert("note".into(), Value::String("x".repeat(big)));
        ShadowChanged {
            household_id: household,
            device_id: uuid::Uuid::new_v4(),
            reported,
            seq: 7,
            version: 3,
            battery: None,
            online: true,
            last_seen: None,
            desired: Map::new(),
            delta: Map::new(),
            metadata: BTreeMap::new(),
            change_seq: 0,
            report_interval_secs: 30,
            transitions: Map::new(),
        }
    }

    #[test]
    fn changes_pack_into_few_payloads_and_read_back_in_order() {
        let h = uuid::Uuid::new_v4();
        let changes: Vec<ShadowChanged> = (0..200).map(|_| change(h, 100)).collect();
        let payloads = pack_notifications(changes.iter().map(notification_line).collect());
        assert!(payloads.len() < 20, "{} payloads", payloads.len());
        assert!(payloads.iter().all(|p| p.len() <= NOTIFY_MAX_BYTES));
        let back: Vec<ShadowChanged> = payloads
            .iter()
            .flat_map(|p| notification_lines(p))
            .map(|l| match l {
                Ok(NotificationLine::Change { household_id, json }) => {
                    assert_eq!(household_id, h);
                    serde_json::from_str(json).expect("change JSON")
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(back, changes);
    }

    #[test]
    fn a_change_too_large_for_a_notification_travels_as_a_refetch() {
        let h = uuid::Uuid::new_v4();
        let big = change(h, 16 * 1024);
        let line = notification_line(&big);
        assert!(line.len() < 100);
        let payloads = pack_notifications(vec![line]);
        let lines: Vec<_> = notification_lines(&payloads[0]).collect();
        assert_eq!(lines, vec![Ok(NotificationLine::Refetch { household_id: h, device_id: big.device_id, change_seq: big.change_seq })]);
    }

    #[test]
    fn garbage_lines_are_errors_not_panics() {
        let lines: Vec<_> = notification_lines("nonsense\n{\"a\":1}\nabc\t!def").collect();
        assert!(lines.iter().all(Result::is_err), "{lines:?}");
    }
}
