//! A dry run: an automation that is not saved yet, played over a
//! household's recorded events (the household stream and its devices'
//! telemetry, as read from the log) with the engine's own decisions
//! ([`crate::engine`], [`crate::automation`]) and a virtual clock — holds,
//! debounces, schedules, delays and waits fall due in recorded time. It
//! answers when the automation would have fired and what each run would
//! have done; it sends nothing.
//!
//! What it cannot know: commands it would have sent change nothing in the
//! replayed history (the devices' reports are the recorded ones), so a loop
//! or a reaction to its own commands does not show; authority is the
//! caller's (checked when the automation is saved).

use crate::automation::{conditions_hold, next_time, parse_clock, Definition, Judged, Mode, Snapshot, Step, Trigger, MAX_PARALLEL};
use crate::engine::{due, fires, still_holds, Devices, Fact};
use crate::event::Event;
use crate::household::Household;
use crate::Envelope;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use uuid::Uuid;

/// Most firings a dry run records; past them it stops (`truncated`).
pub const MAX_FIRINGS: usize = 500;

/// What a dry run found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    /// Every time a trigger fired (and held), in time order, with what it led to.
    pub firings: Vec<Firing>,
    /// Whether it stopped at [`MAX_FIRINGS`] before the window's end.
    pub truncated: bool,
    /// Recorded events it played inside the window.
    pub events: usize,
}

/// One trigger firing and the run it would have started.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Firing {
    pub at: DateTime<Utc>,
    /// The trigger's index in the definition, and what it saw.
    pub trigger: usize,
    pub what: String,
    /// `run` (its actions are planned), `conditions` (a condition did not
    /// hold), `skipped` / `queued` (the mode), `stopped` (restarted).
    pub outcome: String,
    pub reason: Option<String>,
    pub conditions: Vec<Judged>,
    /// What the run would have done, in order.
    pub actions: Vec<Planned>,
    /// When the run would have ended (`None`: still going at the window's end).
    pub finished_at: Option<DateTime<Utc>>,
}

/// One action a run would have taken.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Planned {
    pub at: DateTime<Utc>,
    /// The step's index in `actions`.
    pub step: usize,
    /// `command`, `scene`, `delay`, `waitFor`, `waited`, `timedOut`.
    pub kind: String,
    pub device_id: Option<Uuid>,
    pub set: Option<Map<String, Value>>,
    pub scene_id: Option<Uuid>,
    pub detail: Option<String>,
}

impl Planned {
    fn of(at: DateTime<Utc>, step: usize, kind: &str) -> Self {
        Self { at, step, kind: kind.into(), device_id: None, set: None, scene_id: None, detail: None }
    }
}

#[derive(Debug, Clone)]
enum Timer {
    /// A trigger's `forSecs` / debounce falls due.
    Hold {
        trigger: usize,
        user: Option<Uuid>,
        what: String,
    },
    Schedule {
        trigger: usize,
    },
    /// A delay ends: the run goes on at `step`.
    Resume {
        run: usize,
        step: usize,
    },
    /// A wait times out: the run goes on at `step`.
    Timeout {
        run: usize,
        step: usize,
    },
}

struct Sim<'a> {
    def: &'a Definition,
    agg: Household,
    devices: Devices,
    timers: BTreeMap<(DateTime<Utc>, u64), Timer>,
    next_key: u64,
    /// The pending hold of each trigger (a new firing replaces it, as in the engine).
    holds: HashMap<usize, (DateTime<Utc>, u64)>,
    /// Runs paused in a delay or a wait, by firing index, with their timer.
    active: BTreeMap<usize, (DateTime<Utc>, u64)>,
    /// Runs waiting for a trigger: run, the step after the wait.
    waiting: Vec<(usize, usize)>,
    queued: VecDeque<usize>,
    out: DryRun,
}

/// Plays `def` over `household` (the household stream, in log order, from
/// its start) and `telemetry` (the household's telemetry in log order, from
/// a little before `since`: what comes before `since` only sets the
/// devices' state) and reports what it would have done in `[since, until]`.
pub fn simulate(def: &Definition, household: &[Envelope], telemetry: &[Envelope], since: DateTime<Utc>, until: DateTime<Utc>) -> DryRun {
    let mut merged: Vec<(&Envelope, bool)> = household.iter().map(|e| (e, true)).chain(telemetry.iter().map(|e| (e, false))).collect();
    // Stable: at one instant the household stream first, each stream in log order.
    merged.sort_by_key(|(e, h)| (e.occurred_at, !*h));
    let mut sim = Sim {
        def,
        agg: Household::default(),
        devices: Devices::default(),
        timers: BTreeMap::new(),
        next_key: 0,
        holds: HashMap::new(),
        active: BTreeMap::new(),
        waiting: Vec::new(),
        queued: VecDeque::new(),
        out: DryRun::default(),
    };
    let mut started = false;
    for (env, is_household) in merged {
        if env.occurred_at > until || sim.out.truncated {
            break;
        }
        let inside = env.occurred_at >= since;
        if inside && !started {
            sim.schedule(since);
            started = true;
        }
        if inside {
            sim.fire_due(env.occurred_at);
            sim.out.events += 1;
        }
        sim.fold(env, is_household, inside);
    }
    if !started {
        sim.schedule(since);
    }
    sim.fire_due(until);
    sim.out
}

impl Sim<'_> {
    fn at(&mut self, when: DateTime<Utc>, timer: Timer) -> (DateTime<Utc>, u64) {
        self.next_key += 1;
        let key = (when, self.next_key);
        self.timers.insert(key, timer);
        key
    }

    /// Every time trigger's next instant after `after`, in the household's time zone now.
    fn schedule(&mut self, after: DateTime<Utc>) {
        self.timers.retain(|_, t| !matches!(t, Timer::Schedule { .. }));
        for i in 0..self.def.triggers.len() {
            self.schedule_one(i, after);
        }
    }

    fn schedule_one(&mut self, i: usize, after: DateTime<Utc>) {
        if let Some(Trigger::Time { at, days }) = self.def.triggers.get(i) {
            if let Some(when) = parse_clock(at).and_then(|c| next_time(c, days, &self.agg.tz(), after)) {
                self.at(when, Timer::Schedule { trigger: i });
            }
        }
    }

    fn fire_due(&mut self, now: DateTime<Utc>) {
        while !self.out.truncated {
            let Some((&key, _)) = self.timers.iter().next().filter(|((when, _), _)| *when <= now) else { return };
            let Some(timer) = self.timers.remove(&key) else { return };
            let when = key.0;
            match timer {
                Timer::Hold { trigger, user, what } => {
                    self.holds.remove(&trigger);
                    let Some(t) = self.def.triggers.get(trigger) else { continue };
                    if still_holds(t, &self.agg, &self.devices, user) {
                        self.start(trigger, format!("{what} (held)"), when);
                    }
                }
                Timer::Schedule { trigger } => {
                    let local = when.with_timezone(&self.agg.tz()).format("%Y-%m-%d %H:%M %Z");
                    self.start(trigger, format!("the schedule of {local}"), when);
                    self.schedule_one(trigger, when);
                }
                Timer::Resume { run, step } => {
                    self.active.remove(&run);
                    self.steps(run, step, when);
                }
                Timer::Timeout { run, step } => {
                    self.active.remove(&run);
                    self.waiting.retain(|(r, _)| *r != run);
                    self.out.firings[run].actions.push(Planned::of(when, step - 1, "timedOut"));
                    self.steps(run, step, when);
                }
            }
        }
    }

    fn fold(&mut self, env: &Envelope, is_household: bool, decide: bool) {
        let Ok(ev) = env.event() else { return };
        let now = env.occurred_at;
        if is_household {
            let home_before = self.agg.members_home();
            let was = match &ev {
                Event::PresenceChanged(p) => self.agg.presence.get(&p.user_id).copied(),
                _ => None,
            };
            if let Some(he) = ev.household_event() {
                if self.agg.apply(&he, env.seq, now).is_err() {
                    return;
                }
            }
            match &ev {
                Event::HouseholdTimeZoneSet(_) if decide => self.schedule(now),
                Event::PresenceChanged(p) if decide => {
                    let home_after = self.agg.members_home();
                    self.on_fact(&Fact::Presence { user: p.user_id, now: p.presence, was, home_before, home_after }, now);
                }
                _ => {}
            }
            return;
        }
        match &ev {
            Event::DeviceStateReported(r) => {
                let before = self.devices.state.get(&r.device_id).cloned();
                let mut after = before.clone().unwrap_or_default();
                for (k, v) in &r.state {
                    after.insert(k.clone(), v.clone());
                }
                self.devices.state.insert(r.device_id, after.clone());
                if decide {
                    self.on_fact(&Fact::Reported { device: r.device_id, before: before.as_ref(), after: &after }, now);
                }
            }
            Event::DeviceStatusChanged(s) => {
                let was = self.devices.online.insert(s.device_id, s.online);
                if decide {
                    self.on_fact(&Fact::Status { device: s.device_id, online: s.online, was }, now);
                }
            }
            _ => {}
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>, now: DateTime<Utc>) {
        let fired: Vec<_> = self
            .def
            .triggers
            .iter()
            .enumerate()
            .filter_map(|(i, t)| fires(t, fact).map(|(what, hold, user)| (i, what, hold, user)))
            .collect();
        for (i, what, hold, user) in fired {
            if hold > 0 {
                if let Some(old) = self.holds.remove(&i) {
                    self.timers.remove(&old);
                }
                let key = self.at(due(now, hold), Timer::Hold { trigger: i, user, what });
                self.holds.insert(i, key);
            } else {
                self.start(i, what, now);
            }
        }
        let waiting = std::mem::take(&mut self.waiting);
        for (run, step) in waiting {
            let trigger = match self.def.actions.get(step - 1) {
                Some(Step::WaitFor { trigger, .. }) => trigger,
                _ => continue,
            };
            match fires(trigger, fact) {
                Some((what, _, _)) => {
                    if let Some(key) = self.active.remove(&run) {
                        self.timers.remove(&key);
                    }
                    let mut p = Planned::of(now, step - 1, "waited");
                    p.detail = Some(what);
                    self.out.firings[run].actions.push(p);
                    self.steps(run, step, now);
                }
                None => self.waiting.push((run, step)),
            }
        }
    }

    fn start(&mut self, trigger: usize, what: String, now: DateTime<Utc>) {
        if self.out.firings.len() >= MAX_FIRINGS {
            self.out.truncated = true;
            return;
        }
        let going = self.active.len();
        let max = self.def.max.unwrap_or(MAX_PARALLEL) as usize;
        let mut firing =
            Firing { at: now, trigger, what, outcome: "run".into(), reason: None, conditions: vec![], actions: vec![], finished_at: None };
        let verdict = match self.def.mode {
            Mode::Single if going > 0 => Some(("skipped", "mode single: a run is going".to_owned())),
            Mode::Parallel if going >= max => Some(("skipped", format!("mode parallel: {max} runs going"))),
            _ => None,
        };
        if let Some((o, r)) = verdict {
            firing.outcome = o.into();
            firing.reason = Some(r);
            firing.finished_at = Some(now);
            self.out.firings.push(firing);
            return;
        }
        let snapshot = Snapshot {
            state: self.devices.state.iter().map(|(k, v)| (*k, v.clone())).collect(),
            presence: self.agg.presence.clone(),
            local: Some(now.with_timezone(&self.agg.tz()).naive_local()),
        };
        let (held, judged) = conditions_hold(&self.def.conditions, &snapshot);
        firing.conditions = judged;
        if !held {
            firing.outcome = "conditions".into();
            firing.reason = Some("a condition did not hold".into());
            firing.finished_at = Some(now);
            self.out.firings.push(firing);
            return;
        }
        if self.def.mode == Mode::Restart {
            let stopped: Vec<usize> = self.active.keys().copied().collect();
            for run in stopped {
                if let Some(key) = self.active.remove(&run) {
                    self.timers.remove(&key);
                }
                self.waiting.retain(|(r, _)| *r != run);
                let f = &mut self.out.firings[run];
                f.outcome = "stopped".into();
                f.reason = Some("restarted by a new trigger".into());
                f.finished_at = Some(now);
            }
        }
        let run = self.out.firings.len();
        if self.def.mode == Mode::Queued && going > 0 {
            firing.outcome = "queued".into();
            firing.reason = Some("mode queued: it starts when the running one ends".into());
            self.out.firings.push(firing);
            self.queued.push_back(run);
            return;
        }
        self.out.firings.push(firing);
        self.steps(run, 0, now);
    }

    fn steps(&mut self, run: usize, from: usize, now: DateTime<Utc>) {
        for (i, step) in self.def.actions.iter().enumerate().skip(from) {
            match step {
                Step::Command { device_id, set } => {
                    let mut p = Planned::of(now, i, "command");
                    p.device_id = Some(*device_id);
                    p.set = Some(set.clone());
                    self.out.firings[run].actions.push(p);
                }
                Step::Scene { scene_id } => {
                    let mut p = Planned::of(now, i, "scene");
                    p.scene_id = Some(*scene_id);
                    let scene = self.agg.scenes.get(scene_id).cloned();
                    p.detail = Some(match &scene {
                        Some(s) => format!("scene {:?}: {} devices", s.name, s.targets.len()),
                        None => "the scene did not exist then".into(),
                    });
                    self.out.firings[run].actions.push(p);
                    let removed: HashSet<Uuid> = self.agg.devices.iter().filter(|(_, d)| d.removed).map(|(id, _)| *id).collect();
                    for t in scene.map(|s| s.targets).unwrap_or_default() {
                        let mut p = Planned::of(now, i, "command");
                        p.device_id = Some(t.device_id);
                        p.set = Some(t.set);
                        p.scene_id = Some(*scene_id);
                        if removed.contains(&t.device_id) || !self.agg.devices.contains_key(&t.device_id) {
                            p.kind = "skipped".into();
                            p.detail = Some("the device was removed".into());
                        }
                        self.out.firings[run].actions.push(p);
                    }
                }
                Step::Delay { secs } => {
                    let mut p = Planned::of(now, i, "delay");
                    p.detail = Some(format!("{secs} s"));
                    self.out.firings[run].actions.push(p);
                    let key = self.at(due(now, *secs), Timer::Resume { run, step: i + 1 });
                    self.active.insert(run, key);
                    return;
                }
                Step::WaitFor { timeout_secs, .. } => {
                    let mut p = Planned::of(now, i, "waitFor");
                    p.detail = Some(format!("at most {timeout_secs} s"));
                    self.out.firings[run].actions.push(p);
                    let key = self.at(due(now, *timeout_secs), Timer::Timeout { run, step: i + 1 });
                    self.active.insert(run, key);
                    self.waiting.push((run, i + 1));
                    return;
                }
            }
        }
        self.out.firings[run].finished_at = Some(now);
        if self.active.is_empty() {
            if let Some(next) = self.queued.pop_front() {
                self.out.firings[next].outcome = "run".into();
                self.out.firings[next].reason = Some(format!("queued, started at {}", now.to_rfc3339()));
                self.steps(next, 0, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DeviceStateReported, PresenceChanged};
    use crate::household::Presence;
    use crate::Actor;
    use serde_json::json;

    const H: Uuid = Uuid::from_u128(1);
    const SENSOR: Uuid = Uuid::from_u128(5);
    const LIGHT: Uuid = Uuid::from_u128(6);

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn def(v: Value) -> Definition {
        serde_json::from_value(v).unwrap()
    }

    fn report(at: i64, state: Value) -> Envelope {
        let r: DeviceStateReported = serde_json::from_value(json!({"deviceId": SENSOR, "seq": at + 100, "state": state})).unwrap();
        let ev = Event::DeviceStateReported(r);
        Envelope::new(H, Actor::Device(SENSOR), &ev, t(at))
    }

    fn motion_light(for_secs: Option<u32>) -> Definition {
        let mut trigger = json!({"type": "state", "deviceId": SENSOR, "capability": "motion", "to": true});
        if let Some(f) = for_secs {
            trigger["forSecs"] = json!(f);
        }
        def(json!({
            "triggers": [trigger],
            "actions": [{"type": "command", "deviceId": LIGHT, "set": {"on": true}}, {"type": "delay", "secs": 300},
                        {"type": "command", "deviceId": LIGHT, "set": {"on": false}}],
        }))
    }

    #[test]
    fn given_recorded_motion_when_dry_run_then_each_start_fires_with_its_planned_commands_in_recorded_time() {
        let telemetry = vec![
            report(-60, json!({"motion": true})), // before the window: state only
            report(0, json!({"motion": false})),
            report(10, json!({"motion": true})),
            report(20, json!({"motion": true})), // no change
            report(30, json!({"motion": false})),
            report(1000, json!({"motion": true})),
        ];
        let out = simulate(&motion_light(None), &[], &telemetry, t(0), t(2000));
        assert_eq!(out.firings.len(), 2, "{out:#?}");
        assert_eq!(out.events, 5);
        let first = &out.firings[0];
        assert_eq!((first.at, first.outcome.as_str()), (t(10), "run"));
        let kinds: Vec<_> = first.actions.iter().map(|a| (a.kind.as_str(), a.at)).collect();
        assert_eq!(kinds, vec![("command", t(10)), ("delay", t(10)), ("command", t(310))]);
        assert_eq!(first.finished_at, Some(t(310)));
        assert_eq!(out.firings[1].at, t(1000));
        assert_eq!(out.firings[1].finished_at, Some(t(1300)));
    }

    #[test]
    fn given_mode_single_then_a_trigger_during_the_delay_is_skipped() {
        let telemetry =
            vec![report(0, json!({"motion": true})), report(60, json!({"motion": false})), report(120, json!({"motion": true}))];
        let out = simulate(&motion_light(None), &[], &telemetry, t(0), t(2000));
        let outcomes: Vec<_> = out.firings.iter().map(|f| f.outcome.as_str()).collect();
        assert_eq!(outcomes, vec!["run", "skipped"]);
    }

    #[test]
    fn given_a_for_then_it_fires_only_when_the_state_held_that_long() {
        let telemetry = vec![
            report(0, json!({"motion": true})),
            report(30, json!({"motion": false})), // held 30 s of 60: nothing
            report(100, json!({"motion": true})), // holds: fires at 160
        ];
        let out = simulate(&motion_light(Some(60)), &[], &telemetry, t(0), t(2000));
        assert_eq!(out.firings.len(), 1, "{out:#?}");
        assert_eq!(out.firings[0].at, t(160));
    }

    #[test]
    fn given_a_window_then_nothing_outside_it_fires_and_a_run_still_going_has_no_end() {
        let telemetry = vec![report(0, json!({"motion": true})), report(5000, json!({"motion": false}))];
        let out = simulate(&motion_light(None), &[], &telemetry, t(-100), t(100));
        assert_eq!(out.firings.len(), 1);
        assert_eq!(out.firings[0].finished_at, None, "the delay ends after the window");
        assert_eq!(out.firings[0].actions.len(), 2);
    }

    #[test]
    fn given_a_daily_schedule_then_it_fires_once_a_day_in_the_window() {
        let d = def(
            json!({"triggers": [{"type": "time", "at": "07:00"}], "actions": [{"type": "command", "deviceId": LIGHT, "set": {"on": true}}]}),
        );
        let since = DateTime::parse_from_rfc3339("2027-03-27T00:00:00Z").unwrap().to_utc();
        let out = simulate(&d, &[], &[], since, since + chrono::Duration::days(3));
        let at: Vec<_> = out.firings.iter().map(|f| f.at.to_rfc3339()).collect();
        assert_eq!(at, vec!["2027-03-27T07:00:00+00:00", "2027-03-28T07:00:00+00:00", "2027-03-29T07:00:00+00:00"]);
    }

    #[test]
    fn given_a_berlin_household_then_a_0230_schedule_fires_once_on_each_day_of_both_dst_changes() {
        let owner = Uuid::from_u128(9);
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let created = Event::HouseholdCreated(crate::event::HouseholdCreated { name: "H".into(), created_by: Some(owner) });
        let berlin = Event::HouseholdTimeZoneSet(crate::event::HouseholdTimeZoneSet { time_zone: "Europe/Berlin".into() });
        let mut log = vec![Envelope::new(H, Actor::User(owner.to_string()), &created, at("2027-01-01T00:00:00Z"))];
        let mut tz = Envelope::new(H, Actor::User(owner.to_string()), &berlin, at("2027-01-02T00:00:00Z"));
        tz.seq = Some(2);
        log[0].seq = Some(1);
        log.push(tz);
        let d = def(
            json!({"triggers": [{"type": "time", "at": "02:30"}], "actions": [{"type": "command", "deviceId": LIGHT, "set": {"on": true}}]}),
        );
        let fired = |since: &str, until: &str| -> Vec<String> {
            simulate(&d, &log, &[], at(since), at(until)).firings.iter().map(|f| f.at.to_rfc3339()).collect()
        };
        // Spring forward (28 March 2027: 02:00 → 03:00): 02:30 does not exist; once, at 03:00 CEST.
        assert_eq!(
            fired("2027-03-27T00:00:00Z", "2027-03-29T12:00:00Z"),
            vec!["2027-03-27T01:30:00+00:00", "2027-03-28T01:00:00+00:00", "2027-03-29T00:30:00+00:00"]
        );
        // Fall back (31 October 2027: 03:00 → 02:00): 02:30 happens twice; once, the first.
        assert_eq!(
            fired("2027-10-30T00:00:00Z", "2027-11-01T12:00:00Z"),
            vec!["2027-10-30T00:30:00+00:00", "2027-10-31T00:30:00+00:00", "2027-11-01T01:30:00+00:00"]
        );
    }

    #[test]
    fn given_a_presence_flap_shorter_than_the_debounce_then_nothing_fires() {
        let user = Uuid::from_u128(9);
        let presence = |at: i64, p: Presence| {
            Envelope::new(H, Actor::User(user.to_string()), &Event::PresenceChanged(PresenceChanged { user_id: user, presence: p }), t(at))
        };
        let created_env = Envelope::new(
            H,
            Actor::User(user.to_string()),
            &Event::HouseholdCreated(crate::event::HouseholdCreated { name: "H".into(), created_by: Some(user) }),
            t(-1000),
        );
        let log = vec![
            created_env,
            presence(-500, Presence::Home),
            presence(0, Presence::Away),
            presence(60, Presence::Home),
            presence(500, Presence::Away),
        ];
        let d = def(json!({"triggers": [{"type": "presence", "who": "last", "movement": "leave"}],
                           "actions": [{"type": "command", "deviceId": LIGHT, "set": {"on": false}}]}));
        let out = simulate(&d, &log, &[], t(-10), t(1000));
        assert_eq!(out.firings.len(), 1, "{out:#?}");
        assert_eq!(out.firings[0].at, t(620), "the leave at 500 held the default 120 s");
    }
}
