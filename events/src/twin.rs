//! The command side of a device twin, as a function of the *set* of events
//! (issue 15, defects 4 and 5): what is desired and which commands are
//! confirmed does not depend on the order in which the commands topic
//! (requests, revocations) and the telemetry topic (reports, acks,
//! deliveries, expiries) reach the projector, nor on duplicates.
//!
//! The fold keeps *facts* per command ([`CommandFacts`]): when it was
//! requested and what it sets, the log position of the device's first `ok`
//! ack, whether it ended (expired, revoked, refused by the device) and which
//! properties a report after that ack carried with the command's value. An
//! ack and the reports after it are on one topic, so they always arrive in
//! that order; only the request may come later. Until it does, the facts
//! remember the first report of each value after the ack ([`Sighting`]),
//! and the request then finds the one that answers it. Everything shown is
//! derived from the facts:
//! - **desired** `k`: the value of the latest command setting `k` (by request
//!   time, then command id), unless that command ended or `k` was reached;
//! - a command is **confirmed** when the device acked it `ok` and reports
//!   after that ack carried every value it set (never when it was refused).
//!   Confirmation rests on what the device did after it received the
//!   command — its ack and the telemetry log's order — not on clocks of
//!   different services: a report queued at the broker before the device
//!   got the command never confirms it.
//!
//! **Bounds**: the facts of the latest command of each property are always
//! kept; of the others, the [`MAX_OTHER`] latest requested ones and the
//! [`MAX_UNREQUESTED`] greatest ids of commands whose request was not seen
//! yet (an ack with a random `commandId` costs at most that much), each
//! remembering at most [`MAX_HEARD`] values. The result is exact as long as
//! a device reports fewer than [`MAX_HEARD`] distinct values between its
//! ack and the arrival of the request.

use crate::protocol::AckStatus;
use crate::shadow::same_value;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Values remembered per command whose request has not arrived yet.
pub const MAX_HEARD: usize = 16;
/// Facts kept of requested commands that no longer decide any property.
pub const MAX_OTHER: usize = 16;
/// Facts kept of commands whose request was not seen (yet).
pub const MAX_UNREQUESTED: usize = 16;

/// What the fold knows of one command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Map<String, Value>>,
    /// Telemetry position of the device's first `ok` ack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok_at: Option<i64>,
    /// Expired, revoked, rejected or failed: its values are no longer desired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended: bool,
    /// Revoked, rejected or failed: never confirmed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    /// Each property a report after the `ok` ack carried with the command's
    /// value: the earliest such report's position and time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reached: BTreeMap<String, (i64, DateTime<Utc>)>,
    /// Before the request is known: the first report of each value of each
    /// property after the `ok` ack.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heard: Vec<Sighting>,
}

impl CommandFacts {
    /// Confirmed: acked `ok`, not refused, and every value reached.
    pub fn confirmed(&self) -> Option<DateTime<Utc>> {
        let set = self.set.as_ref()?;
        if self.refused || self.ok_at.is_none() || set.is_empty() {
            return None;
        }
        set.keys().map(|k| self.reached.get(k).map(|(_, at)| *at)).collect::<Option<Vec<_>>>()?.into_iter().max()
    }

    /// A report of `s.property` after the `ok` ack: reached when it carries
    /// the command's value; remembered when the request is not known yet.
    /// Whether the facts changed.
    fn hear(&mut self, s: &Sighting) -> bool {
        if self.ok_at.is_none_or(|o| s.offset <= o) {
            return false;
        }
        match &self.set {
            Some(set) => {
                let better = set.get(&s.property).is_some_and(|want| same_value(&s.value, want))
                    && self.reached.get(&s.property).is_none_or(|(o, _)| s.offset < *o);
                if better {
                    self.reached.insert(s.property.clone(), (s.offset, s.at));
                }
                better
            }
            None => {
                let same = self.heard.iter().position(|h| h.property == s.property && same_value(&h.value, &s.value));
                match same {
                    Some(i) if self.heard[i].offset > s.offset => {
                        self.heard[i] = s.clone();
                        true
                    }
                    Some(_) => false,
                    None => {
                        self.heard.push(s.clone());
                        self.heard.sort_by_key(|h| h.offset);
                        self.heard.truncate(MAX_HEARD);
                        self.heard.iter().any(|h| h.offset == s.offset && h.property == s.property)
                    }
                }
            }
        }
    }
}

/// A report of one property: where it is in the telemetry log, the value, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sighting {
    pub property: String,
    pub value: Value,
    pub offset: i64,
    pub at: DateTime<Utc>,
}

/// The facts of a device's commands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    #[serde(default)]
    pub commands: BTreeMap<Uuid, CommandFacts>,
}

/// An event's meaning for the twin.
pub enum Fact<'a> {
    Requested {
        command_id: Uuid,
        set: &'a Map<String, Value>,
        at: DateTime<Utc>,
    },
    Acked {
        command_id: Uuid,
        status: AckStatus,
        offset: i64,
    },
    /// Expired (still `ok` if the device acked it) or revoked (`refused`).
    Ended {
        command_id: Uuid,
        refused: bool,
    },
    Reported {
        state: &'a Map<String, Value>,
        offset: i64,
        at: DateTime<Utc>,
    },
}

/// The desired side derived from the facts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub values: Map<String, Value>,
    /// Per property: the latest command that set it and when it was requested.
    pub by: BTreeMap<String, (Uuid, DateTime<Utc>)>,
}

impl Twin {
    /// Folds one fact in; returns the commands it confirmed, with the time
    /// of the report that completed each.
    pub fn apply(&mut self, fact: Fact<'_>) -> Vec<(Uuid, DateTime<Utc>)> {
        self.apply_noting(fact).0
    }

    /// [`Twin::apply`], also saying whether the facts changed (so they are
    /// stored even when nothing shown changed).
    pub fn apply_noting(&mut self, fact: Fact<'_>) -> (Vec<(Uuid, DateTime<Utc>)>, bool) {
        let before: Vec<Uuid> = self.confirmed_ids();
        // Facts of the command side change with every such event; a report
        // changes them only when a command heard it.
        let mut changed = !matches!(fact, Fact::Reported { .. });
        match fact {
            Fact::Requested { command_id, set, at } => {
                let f = self.commands.entry(command_id).or_default();
                f.requested_at = Some(f.requested_at.map_or(at, |t| t.min(at)));
                if f.set.is_none() {
                    f.set = Some(set.clone());
                    for s in std::mem::take(&mut f.heard) {
                        let _ = f.hear(&s);
                    }
                }
            }
            Fact::Acked { command_id, status, offset } => {
                let f = self.commands.entry(command_id).or_default();
                match status {
                    // The reports that answer it come after it on the same
                    // topic: nothing earlier to look at.
                    AckStatus::Ok => f.ok_at = Some(f.ok_at.map_or(offset, |o| o.min(offset))),
                    AckStatus::Rejected | AckStatus::Failed => {
                        f.ended = true;
                        f.refused = true;
                    }
                }
            }
            Fact::Ended { command_id, refused } => {
                let f = self.commands.entry(command_id).or_default();
                f.ended = true;
                f.refused |= refused;
            }
            Fact::Reported { state, offset, at } => {
                for (k, v) in state {
                    let s = Sighting { property: k.clone(), value: v.clone(), offset, at };
                    for f in self.commands.values_mut() {
                        changed |= f.hear(&s);
                    }
                }
            }
        }
        self.prune();
        let confirmed =
            self.commands.iter().filter(|(id, _)| !before.contains(id)).filter_map(|(id, f)| f.confirmed().map(|at| (*id, at))).collect();
        (confirmed, changed)
    }

    fn confirmed_ids(&self) -> Vec<Uuid> {
        self.commands.iter().filter(|(_, f)| f.confirmed().is_some()).map(|(id, _)| *id).collect()
    }

    /// Per property, the latest request that set it.
    fn latest(&self) -> BTreeMap<String, (DateTime<Utc>, Uuid)> {
        let mut by: BTreeMap<String, (DateTime<Utc>, Uuid)> = BTreeMap::new();
        for (id, f) in &self.commands {
            let (Some(at), Some(set)) = (f.requested_at, &f.set) else { continue };
            for k in set.keys() {
                let cur = by.entry(k.clone()).or_insert((at, *id));
                if (at, *id) > *cur {
                    *cur = (at, *id);
                }
            }
        }
        by
    }

    /// What is desired now (see the module documentation).
    pub fn desired(&self) -> Desired {
        let mut d = Desired::default();
        for (k, (at, id)) in self.latest() {
            d.by.insert(k.clone(), (id, at));
            let f = &self.commands[&id];
            if f.ended || f.reached.contains_key(&k) {
                continue;
            }
            if let Some(v) = f.set.as_ref().and_then(|s| s.get(&k)) {
                d.values.insert(k, v.clone());
            }
        }
        d
    }

    /// Keeps the facts within their bounds, chosen from the facts alone.
    fn prune(&mut self) {
        let deciding: std::collections::BTreeSet<Uuid> = self.latest().into_values().map(|(_, id)| id).collect();
        let mut others: Vec<(DateTime<Utc>, Uuid)> = self
            .commands
            .iter()
            .filter(|(id, f)| f.requested_at.is_some() && !deciding.contains(id))
            .map(|(id, f)| (f.requested_at.unwrap_or_default(), *id))
            .collect();
        let mut unrequested: Vec<Uuid> = self.commands.iter().filter(|(_, f)| f.requested_at.is_none()).map(|(id, _)| *id).collect();
        if others.len() <= MAX_OTHER && unrequested.len() <= MAX_UNREQUESTED {
            return;
        }
        others.sort_unstable_by(|a, b| b.cmp(a));
        unrequested.sort_unstable_by(|a, b| b.cmp(a));
        for (_, id) in others.iter().skip(MAX_OTHER) {
            self.commands.remove(id);
        }
        for id in unrequested.iter().skip(MAX_UNREQUESTED) {
            self.commands.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn a_command_is_confirmed_by_a_report_after_its_ok_ack_and_not_by_one_before() {
        let mut tw = Twin::default();
        let set = obj(json!({"brightness": 30}));
        // Queued at the broker before the device got the command (defect 5).
        tw.apply(Fact::Reported { state: &obj(json!({"brightness": 30})), offset: 1, at: t(1) });
        tw.apply(Fact::Requested { command_id: id(7), set: &set, at: t(2) });
        assert_eq!(tw.desired().values, obj(json!({"brightness": 30})), "still desired: the device never answered");
        assert!(tw.apply(Fact::Acked { command_id: id(7), status: AckStatus::Ok, offset: 5 }).is_empty());
        let done = tw.apply(Fact::Reported { state: &obj(json!({"brightness": 30})), offset: 6, at: t(4) });
        assert_eq!(done, vec![(id(7), t(4))]);
        assert!(tw.desired().values.is_empty());
    }

    #[test]
    fn an_ack_that_refuses_before_its_request_leaves_nothing_desired() {
        let mut tw = Twin::default();
        tw.apply(Fact::Acked { command_id: id(1), status: AckStatus::Rejected, offset: 3 });
        tw.apply(Fact::Requested { command_id: id(1), set: &obj(json!({"on": true})), at: t(1) });
        assert!(tw.desired().values.is_empty());
        assert_eq!(tw.desired().by["on"].0, id(1));
    }

    #[test]
    fn reports_and_an_ack_before_the_request_still_confirm_it() {
        let mut tw = Twin::default();
        tw.apply(Fact::Acked { command_id: id(2), status: AckStatus::Ok, offset: 10 });
        tw.apply(Fact::Reported { state: &obj(json!({"brightness": 40})), offset: 11, at: t(5) });
        tw.apply(Fact::Reported { state: &obj(json!({"brightness": 45})), offset: 12, at: t(6) });
        let done = tw.apply(Fact::Requested { command_id: id(2), set: &obj(json!({"brightness": 40})), at: t(1) });
        assert_eq!(done, vec![(id(2), t(5))]);
    }

    #[test]
    fn random_command_ids_cost_a_bounded_amount() {
        let mut tw = Twin::default();
        for n in 0..1_000u128 {
            tw.apply(Fact::Acked { command_id: id(n), status: AckStatus::Ok, offset: n as i64 });
            tw.apply(Fact::Reported { state: &obj(json!({"brightness": n as i64 % 100})), offset: 1_000 + n as i64, at: t(1) });
        }
        assert_eq!(tw.commands.len(), MAX_UNREQUESTED);
        assert!(tw.commands.values().all(|f| f.heard.len() <= MAX_HEARD));
    }

    /// One step of a device's life, on the commands topic or on telemetry.
    #[derive(Debug, Clone)]
    enum Step {
        Request { cmd: u8, props: Vec<(u8, u8)> },
        Revoke { cmd: u8 },
        Ack { cmd: u8, status: u8 },
        Expire { cmd: u8 },
        Report { props: Vec<(u8, u8)> },
    }

    const PROPS: [&str; 3] = ["on", "brightness", "colorTemp"];

    fn step() -> impl Strategy<Value = Step> {
        let props = proptest::collection::vec((0u8..3, 0u8..3), 1..3);
        prop_oneof![
            (0u8..5, props.clone()).prop_map(|(cmd, props)| Step::Request { cmd, props }),
            (0u8..5).prop_map(|cmd| Step::Revoke { cmd }),
            (0u8..5, 0u8..4).prop_map(|(cmd, status)| Step::Ack { cmd, status }),
            (0u8..5).prop_map(|cmd| Step::Expire { cmd }),
            props.prop_map(|props| Step::Report { props }),
        ]
    }

    fn state(props: &[(u8, u8)]) -> Map<String, Value> {
        props.iter().map(|(p, v)| (PROPS[*p as usize].to_owned(), json!(v))).collect()
    }

    /// `(topic, position, step)`: requests and revocations on the commands
    /// topic (positions of their own), the rest on telemetry.
    fn located(steps: &[Step]) -> Vec<(bool, i64, Step)> {
        let (mut c, mut tel) = (0i64, 0i64);
        steps
            .iter()
            .map(|s| {
                let on_commands = matches!(s, Step::Request { .. } | Step::Revoke { .. });
                let pos = if on_commands { &mut c } else { &mut tel };
                *pos += 1;
                (on_commands, *pos, s.clone())
            })
            .collect()
    }

    fn fold(tw: &mut Twin, (_, pos, s): &(bool, i64, Step)) {
        let at = t(*pos);
        match s {
            Step::Request { cmd, props } => {
                tw.apply(Fact::Requested { command_id: id(u128::from(*cmd)), set: &state(props), at });
            }
            Step::Revoke { cmd } => {
                tw.apply(Fact::Ended { command_id: id(u128::from(*cmd)), refused: true });
            }
            Step::Ack { cmd, status } => {
                let status = [AckStatus::Ok, AckStatus::Ok, AckStatus::Rejected, AckStatus::Failed][*status as usize];
                tw.apply(Fact::Acked { command_id: id(u128::from(*cmd)), status, offset: *pos });
            }
            Step::Expire { cmd } => {
                tw.apply(Fact::Ended { command_id: id(u128::from(*cmd)), refused: false });
            }
            Step::Report { props } => {
                tw.apply(Fact::Reported { state: &state(props), offset: *pos, at });
            }
        }
    }

    /// The desired state, and each command with when it was confirmed.
    type Summary = (Desired, Vec<(Uuid, Option<DateTime<Utc>>)>);

    fn summary(tw: &Twin) -> Summary {
        (tw.desired(), tw.commands.iter().map(|(id, f)| (*id, f.confirmed())).collect())
    }

    proptest! {
        /// The two topics interleaved in any order (each keeping its own
        /// order), with duplicates anywhere: the same desired state and the
        /// same confirmations as the in-order fold.
        #[test]
        fn any_interleaving_of_the_two_topics_with_duplicates_gives_the_in_order_twin(
            steps in proptest::collection::vec(step(), 1..20),
            picks in proptest::collection::vec(any::<bool>(), 80),
            dups in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let all = located(&steps);
            let mut in_order = Twin::default();
            for s in &all { fold(&mut in_order, s); }

            let commands: Vec<&(bool, i64, Step)> = all.iter().filter(|s| s.0).collect();
            let telemetry: Vec<&(bool, i64, Step)> = all.iter().filter(|s| !s.0).collect();
            let (mut i, mut j, mut n) = (0, 0, 0);
            let mut mixed = Twin::default();
            let mut applied: Vec<&(bool, i64, Step)> = Vec::new();
            while i < commands.len() || j < telemetry.len() {
                let take_commands = j >= telemetry.len() || (i < commands.len() && picks[n % picks.len()]);
                n += 1;
                let s = if take_commands { i += 1; commands[i - 1] } else { j += 1; telemetry[j - 1] };
                fold(&mut mixed, s);
                applied.push(s);
                // A duplicate of something already applied (a redelivery).
                if dups.contains(&n) {
                    let again = applied[n % applied.len()];
                    fold(&mut mixed, again);
                }
            }
            prop_assert_eq!(summary(&mixed), summary(&in_order));
        }
    }
}
