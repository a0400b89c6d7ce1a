//! The command side of a device twin, as a function of the *set* of events
//! (issue 15, defects 4 and 5): what is desired and which commands are
//! confirmed does not depend on the order in which the commands topic
//! (requests, revocations) and the telemetry topic (reports, acks,
//! deliveries, expiries) reach the projector, nor on duplicates.
//!
//! The fold keeps *facts* per command ([`CommandFacts`]): when it was
//! requested and what it sets, the log position of the device's first `ok`
//! ack, whether it ended (expired, revoked, refused by the device) and which
//! properties a report after that ack carried with the command's value
//! (positions in the telemetry log decide "after", not arrival). Until both
//! the request and an `ok` ack are known — the commands topic may lag, and a
//! push may overtake the log so a report is applied before the ack it
//! answers — the facts remember the reports of the command's properties
//! ([`Sighting`], the most recent [`MAX_HEARD`]), and whichever comes last
//! finds the one that answers it. Everything shown is derived from the
//! facts:
//! - **desired** `k`: the value of the latest command setting `k` (by request
//!   time, then command id), unless that command ended or `k` was reached;
//! - a command is **confirmed** when the device acked it `ok` and reports
//!   after that ack carried every value it set. The device's first ack
//!   decides (a later, different one changes nothing), and the device's word
//!   beats the platform's: a command revoked or expired that the device
//!   still carried out is confirmed.
//!   Confirmation rests on what the device did after it received the
//!   command — its ack and the telemetry log's order — not on clocks of
//!   different services: a report queued at the broker before the device
//!   got the command never confirms it.
//!
//! **Bounds**: the facts of the latest command of each property are always
//! kept; of the others, one nothing can change any more (refused or
//! confirmed) is dropped and its id remembered ([`Twin::done`]), and of the
//! rest the [`MAX_OTHER`] latest requested ones and the
//! [`MAX_UNREQUESTED`] greatest ids of commands whose request was not seen
//! yet (an ack with a random `commandId` costs at most that much), each
//! remembering at most [`MAX_HEARD`] reports. The result is exact as long as
//! a device reports its command's properties fewer than [`MAX_HEARD`] times
//! between the command and the arrival of its request or ack. When a report
//! that answers a command is applied after the command was confirmed by a
//! later one (a push overtaking the log), `confirmedAt` keeps the later
//! report's time (held by the two property tests below).

use crate::protocol::AckStatus;
use crate::shadow::same_value;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Reports remembered per command whose request or `ok` ack has not
/// arrived yet.
pub const MAX_HEARD: usize = 32;
/// Facts kept of requested commands that no longer decide any property.
pub const MAX_OTHER: usize = 64;
/// Facts kept of commands whose request was not seen (yet).
pub const MAX_UNREQUESTED: usize = 16;
/// Ids of dropped commands remembered.
pub const MAX_DONE: usize = 16;

/// What the fold knows of one command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Map<String, Value>>,
    /// The device's first ack: its telemetry position and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<(i64, AckStatus)>,
    /// Expired or revoked: its values are no longer desired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended: bool,
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
    /// Where the device's first ack is, when it was `ok`.
    pub fn ok_at(&self) -> Option<i64> {
        self.ack.filter(|(_, s)| *s == AckStatus::Ok).map(|(o, _)| o)
    }

    /// The device's first ack refused it (rejected or failed).
    pub fn refused(&self) -> bool {
        self.ack.is_some_and(|(_, s)| s != AckStatus::Ok)
    }

    /// Its values are no longer desired: ended, or refused by the device.
    pub fn over(&self) -> bool {
        self.ended || self.refused()
    }

    /// Confirmed: first acked `ok`, and every value reached after that ack.
    pub fn confirmed(&self) -> Option<DateTime<Utc>> {
        let set = self.set.as_ref()?;
        if self.ok_at().is_none() || set.is_empty() {
            return None;
        }
        set.keys().map(|k| self.reached.get(k).map(|(_, at)| *at)).collect::<Option<Vec<_>>>()?.into_iter().max()
    }

    /// A report of `s.property`: with the request and an `ok` ack known,
    /// it reaches the property when it came after the ack and carries the
    /// command's value; before either is known, it is remembered (the most
    /// recent [`MAX_HEARD`]), since a push may overtake the log and the ack
    /// or the request come later. Whether the facts changed.
    fn hear(&mut self, s: &Sighting) -> bool {
        if self.refused() || self.ok_at().is_some_and(|o| s.offset <= o) {
            return false;
        }
        match (&self.set, self.ok_at()) {
            (Some(set), Some(_)) => {
                let better = set.get(&s.property).is_some_and(|want| same_value(&s.value, want))
                    && self.reached.get(&s.property).is_none_or(|(o, _)| s.offset < *o);
                if better {
                    self.reached.insert(s.property.clone(), (s.offset, s.at));
                }
                better
            }
            (Some(set), None) if !set.contains_key(&s.property) => false,
            _ => {
                if self.heard.iter().any(|h| h.offset == s.offset && h.property == s.property) {
                    return false;
                }
                self.heard.push(s.clone());
                self.heard.sort_by_key(|h| h.offset);
                if self.heard.len() > MAX_HEARD {
                    self.heard.remove(0);
                }
                self.heard.iter().any(|h| h.offset == s.offset && h.property == s.property)
            }
        }
    }

    /// Looks again at what was remembered, now that more is known.
    fn rehear(&mut self) {
        for s in std::mem::take(&mut self.heard) {
            let _ = self.hear(&s);
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
    /// Commands dropped once nothing could change what they show (refused
    /// or confirmed, and deciding nothing): a late event of one is ignored,
    /// never taken for a first one. The [`MAX_DONE`] greatest ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<Uuid>,
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
    /// Expired or revoked: its values are no longer desired (its status and
    /// confirmation still follow the device's ack).
    Ended {
        command_id: Uuid,
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
    /// of the report that completed each (again when that time moved
    /// earlier: keep the earliest).
    pub fn apply(&mut self, fact: Fact<'_>) -> Vec<(Uuid, DateTime<Utc>)> {
        self.apply_noting(fact).0
    }

    /// [`Twin::apply`], also saying whether the facts changed (so they are
    /// stored even when nothing shown changed).
    pub fn apply_noting(&mut self, fact: Fact<'_>) -> (Vec<(Uuid, DateTime<Utc>)>, bool) {
        let id = match &fact {
            Fact::Requested { command_id, .. } | Fact::Acked { command_id, .. } | Fact::Ended { command_id } => Some(*command_id),
            Fact::Reported { .. } => None,
        };
        if id.is_some_and(|id| self.done.binary_search(&id).is_ok()) {
            return (Vec::new(), false);
        }
        let before: Vec<(Uuid, DateTime<Utc>)> = self.confirmed_now();
        // Facts of the command side change with every such event; a report
        // changes them only when a command heard it.
        let mut changed = !matches!(fact, Fact::Reported { .. });
        match fact {
            Fact::Requested { command_id, set, at } => {
                let f = self.commands.entry(command_id).or_default();
                f.requested_at = Some(f.requested_at.map_or(at, |t| t.min(at)));
                if f.set.is_none() {
                    f.set = Some(set.clone());
                    f.rehear();
                }
            }
            Fact::Acked { command_id, status, offset } => {
                let f = self.commands.entry(command_id).or_default();
                // The first ack decides; what was heard before it is known
                // is looked at again.
                if f.ack.is_none_or(|(o, _)| offset < o) {
                    f.ack = Some((offset, status));
                    f.rehear();
                }
            }
            Fact::Ended { command_id } => {
                self.commands.entry(command_id).or_default().ended = true;
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
        // Confirmations are told before pruning: a command confirmed now may
        // be dropped at once (it no longer decides anything).
        let confirmed = self.confirmed_now().into_iter().filter(|c| !before.contains(c)).collect();
        self.prune();
        (confirmed, changed)
    }

    /// Every confirmed command with its time: one whose time moved earlier
    /// (a report that arrived late) is told again.
    fn confirmed_now(&self) -> Vec<(Uuid, DateTime<Utc>)> {
        self.commands.iter().filter_map(|(id, f)| f.confirmed().map(|at| (*id, at))).collect()
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
            if f.over() || f.reached.contains_key(&k) {
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
        // Refused or confirmed, and deciding nothing: nothing can change
        // what it shows (an expired or revoked one may still be confirmed by
        // a late ack, so it stays among the others).
        let done: Vec<Uuid> = self
            .commands
            .iter()
            .filter(|(id, f)| !deciding.contains(id) && f.requested_at.is_some() && (f.refused() || f.confirmed().is_some()))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.commands.remove(&id);
            if let Err(at) = self.done.binary_search(&id) {
                self.done.insert(at, id);
            }
        }
        if self.done.len() > MAX_DONE {
            self.done.drain(..self.done.len() - MAX_DONE);
        }
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
    /// topic (positions of their own), the rest on telemetry. A command id
    /// is requested with one set of values (a second request of it is a
    /// duplicate).
    fn located(steps: &[Step]) -> Vec<(bool, i64, Step)> {
        let (mut c, mut tel) = (0i64, 0i64);
        let mut sets: BTreeMap<u8, Vec<(u8, u8)>> = BTreeMap::new();
        let mut first: BTreeMap<u8, i64> = BTreeMap::new();
        let mut acks: BTreeMap<u8, (i64, u8)> = BTreeMap::new();
        steps
            .iter()
            .map(|s| match s {
                Step::Request { cmd, props } => {
                    Step::Request { cmd: *cmd, props: sets.entry(*cmd).or_insert_with(|| props.clone()).clone() }
                }
                other => other.clone(),
            })
            .collect::<Vec<_>>()
            .iter()
            .map(|s| {
                let on_commands = matches!(s, Step::Request { .. } | Step::Revoke { .. });
                let pos = if on_commands { &mut c } else { &mut tel };
                *pos += 1;
                // A command is requested once and acked once: a second step
                // of either is a duplicate of the first record (its position,
                // and the ack its status).
                match s {
                    Step::Request { cmd, .. } => (on_commands, *first.entry(*cmd).or_insert(*pos), s.clone()),
                    Step::Ack { cmd, status } => {
                        let (at, status) = *acks.entry(*cmd).or_insert((*pos, *status));
                        (on_commands, at, Step::Ack { cmd: *cmd, status })
                    }
                    _ => (on_commands, *pos, s.clone()),
                }
            })
            .collect()
    }

    /// Folds one step; every confirmation told is kept in `told` (the
    /// earliest time per command, as the projection keeps it).
    fn fold(tw: &mut Twin, told: &mut BTreeMap<Uuid, DateTime<Utc>>, (_, pos, s): &(bool, i64, Step)) {
        let at = t(*pos);
        let confirmed = match s {
            Step::Request { cmd, props } => tw.apply(Fact::Requested { command_id: id(u128::from(*cmd)), set: &state(props), at }),
            Step::Revoke { cmd } => tw.apply(Fact::Ended { command_id: id(u128::from(*cmd)) }),
            Step::Ack { cmd, status } => {
                let status = [AckStatus::Ok, AckStatus::Ok, AckStatus::Rejected, AckStatus::Failed][*status as usize];
                tw.apply(Fact::Acked { command_id: id(u128::from(*cmd)), status, offset: *pos })
            }
            Step::Expire { cmd } => tw.apply(Fact::Ended { command_id: id(u128::from(*cmd)) }),
            Step::Report { props } => tw.apply(Fact::Reported { state: &state(props), offset: *pos, at }),
        };
        for (c, at) in confirmed {
            let e = told.entry(c).or_insert(at);
            *e = (*e).min(at);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
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
            let (mut in_order, mut told_in_order) = (Twin::default(), BTreeMap::new());
            for s in &all { fold(&mut in_order, &mut told_in_order, s); }

            let commands: Vec<&(bool, i64, Step)> = all.iter().filter(|s| s.0).collect();
            let telemetry: Vec<&(bool, i64, Step)> = all.iter().filter(|s| !s.0).collect();
            let (mut i, mut j, mut n) = (0, 0, 0);
            let (mut mixed, mut told) = (Twin::default(), BTreeMap::new());
            let mut applied: Vec<&(bool, i64, Step)> = Vec::new();
            while i < commands.len() || j < telemetry.len() {
                let take_commands = j >= telemetry.len() || (i < commands.len() && picks[n % picks.len()]);
                n += 1;
                let s = if take_commands { i += 1; commands[i - 1] } else { j += 1; telemetry[j - 1] };
                fold(&mut mixed, &mut told, s);
                applied.push(s);
                // A duplicate of something already applied (a redelivery).
                if dups.contains(&n) {
                    let again = applied[n % applied.len()];
                    fold(&mut mixed, &mut told, again);
                }
            }
            prop_assert_eq!(mixed.desired(), in_order.desired());
            prop_assert_eq!(told, told_in_order, "the same confirmations, at the same times");
        }

        /// The live case: the requests are applied at once (command-api pushes
        /// them), and the telemetry in any order — a push may overtake the
        /// log (an ack applied after the report that answers it) — with
        /// duplicates: the same desired state and confirmations.
        #[test]
        fn telemetry_in_any_order_after_the_requests_gives_the_in_order_twin(
            steps in proptest::collection::vec(step(), 1..20),
            seed in any::<u64>(),
        ) {
            let all = located(&steps);
            let (mut in_order, mut told_in_order) = (Twin::default(), BTreeMap::new());
            for s in &all { fold(&mut in_order, &mut told_in_order, s); }
            let telemetry: Vec<&(bool, i64, Step)> = all.iter().filter(|s| !s.0).collect();
            let mut shuffled: Vec<&(bool, i64, Step)> = telemetry.iter().copied().chain(telemetry.iter().copied().step_by(3)).collect();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let (mut mixed, mut told) = (Twin::default(), BTreeMap::new());
            for s in all.iter().filter(|s| s.0).chain(shuffled) { fold(&mut mixed, &mut told, s); }
            prop_assert_eq!(mixed.desired(), in_order.desired());
            // The same commands confirmed; the time may be a later report's
            // when the earliest answer arrived after the command was settled.
            let (ids, ids_in_order): (Vec<&Uuid>, Vec<&Uuid>) = (told.keys().collect(), told_in_order.keys().collect());
            prop_assert_eq!(ids, ids_in_order, "the same commands confirmed");
        }
    }
}
