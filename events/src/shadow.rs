//! How a device shadow evolves: the pure fold the projector runs per batch.
//!
//! **Invariant**: a report whose `seq` is lower than or equal to the stored one
//! never changes the shadow, so duplicates and out-of-order delivery converge
//! to the in-order result.

use crate::event::Event;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

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
    /// Log offset of the last applied status event. Status messages carry no
    /// `seq`, so the log order (one household, one partition) orders them.
    pub status_offset: i64,
}

impl Default for Shadow {
    fn default() -> Self {
        Self { reported: Map::new(), seq: 0, version: 0, battery: None, online: false, last_seen: None, status_offset: -1 }
    }
}

impl Shadow {
    /// Applies one event recorded at `at` at log `offset`; returns whether the
    /// shadow changed.
    pub fn apply(&mut self, event: &Event, at: DateTime<Utc>, offset: i64) -> bool {
        match event {
            Event::DeviceStateReported(r) => {
                if r.seq <= self.seq {
                    return false;
                }
                self.seq = r.seq;
                for (k, v) in &r.state {
                    self.reported.insert(k.clone(), v.clone());
                }
                if r.battery.is_some() {
                    self.battery = r.battery;
                }
                // A device that reports is online, whatever its retained status said.
                self.online = true;
                self.seen(at);
                self.version += 1;
                true
            }
            Event::DeviceStatusChanged(s) => {
                if offset <= self.status_offset {
                    return false;
                }
                self.status_offset = offset;
                if s.online {
                    self.seen(at);
                }
                if self.online == s.online {
                    return false;
                }
                self.online = s.online;
                self.version += 1;
                true
            }
            _ => false,
        }
    }

    fn seen(&mut self, at: DateTime<Utc>) {
        self.last_seen = Some(self.last_seen.map_or(at, |t| t.max(at)));
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
        assert!(s.apply(&report(5, 50), t(1), 0));
        assert!(!s.apply(&report(4, 40), t(2), 1));
        assert!(!s.apply(&report(5, 99), t(3), 2));
        assert_eq!(s.reported["brightness"], 50);
        assert_eq!((s.seq, s.version), (5, 1));
    }

    #[test]
    fn status_changes_bump_the_version_only_when_they_change_something() {
        let mut s = Shadow::default();
        let online = |o| Event::DeviceStatusChanged(DeviceStatusChanged { device_id: Uuid::nil(), online: o });
        assert!(s.apply(&online(true), t(1), 10));
        assert!(!s.apply(&online(true), t(2), 11));
        assert!(s.apply(&online(false), t(3), 12));
        // A replay of an older status (lower offset) never wins.
        assert!(!s.apply(&online(true), t(4), 10));
        assert_eq!((s.online, s.version, s.last_seen), (false, 2, Some(t(2))));
    }

    proptest! {
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
