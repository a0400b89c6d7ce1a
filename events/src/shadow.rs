//! How a device shadow evolves: the pure fold the projector runs per batch.
//!
//! **Invariant**: the shadow depends on the *set* of events applied, not on
//! their order, so duplicates and any arrival order (the push channel ahead of
//! the log, a partition caught up later) converge to the in-order result
//! (the change counter `version` aside):
//! - each reported property holds the value of the report with the highest
//!   `seq` that carried it (a partial report never overwrites a newer value of
//!   its properties and never touches the others);
//! - the battery likewise, by the `seq` of the report that carried it;
//! - presence (`online`) follows the event at the highest log position among
//!   status messages and reports (a report means online);
//! - `seq` is the highest report `seq`, `last_seen` the latest time.

use crate::event::Event;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

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
        }
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
        }
    }
}

impl Shadow {
    /// Applies one event recorded at `at` at log `offset`; returns whether the
    /// shadow changed.
    pub fn apply(&mut self, event: &Event, at: DateTime<Utc>, offset: i64) -> bool {
        match event {
            Event::DeviceStateReported(r) => {
                let mut changed = false;
                for (k, v) in &r.state {
                    // A property without its own seq (a shadow from before
                    // they were kept) was set by the shadow's last report.
                    let set_by = self.property_seq.get(k).copied().unwrap_or(if self.reported.contains_key(k) { self.seq } else { 0 });
                    if r.seq > set_by {
                        self.property_seq.insert(k.clone(), r.seq);
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
/// or `<household id>\t!<device id>` when the change is too large to travel
/// in a notification (the listener reads that shadow from its table). The
/// household comes first so a listener skips the changes of households
/// nobody watches without parsing them.
pub fn notification_line(c: &ShadowChanged) -> String {
    let json = serde_json::to_string(c).unwrap_or_default();
    if json.len() + 37 > NOTIFY_MAX_BYTES {
        format!("{}\t!{}", c.household_id, c.device_id)
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
    /// The device's shadow changed; read it from the table.
    Refetch { household_id: uuid::Uuid, device_id: uuid::Uuid },
}

/// Splits a notification payload into its lines; a line that is not of
/// the form [`notification_line`] writes is an `Err` with the line.
pub fn notification_lines(payload: &str) -> impl Iterator<Item = Result<NotificationLine<'_>, &str>> {
    payload.split('\n').filter(|l| !l.is_empty()).map(|line| {
        let (h, rest) = line.split_once('\t').ok_or(line)?;
        let household_id = h.parse().map_err(|_| line)?;
        match rest.strip_prefix('!') {
            Some(d) => Ok(NotificationLine::Refetch { household_id, device_id: d.parse().map_err(|_| line)? }),
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
        assert_eq!(lines, vec![Ok(NotificationLine::Refetch { household_id: h, device_id: big.device_id })]);
    }

    #[test]
    fn garbage_lines_are_errors_not_panics() {
        let lines: Vec<_> = notification_lines("nonsense\n{\"a\":1}\nabc\t!def").collect();
        assert!(lines.iter().all(Result::is_err), "{lines:?}");
    }
}
