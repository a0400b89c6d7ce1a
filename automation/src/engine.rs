//! The engine's state and effects: it folds the household stream (members,
//! presence, devices, scenes, automations) and the devices' reports, decides
//! with [`crate::decide`] and the pure `events::automation`, and appends its
//! decisions (`AutomationTriggered`, `AutomationRunStepped`,
//! `AutomationRunFinished`) and its commands (ordinary
//! `DeviceCommandRequested`, sent as the automation's creator, caused by the
//! run) to the commands topic. Its pending waits are rows of
//! `engine_timers`, written in one transaction with the log positions it has
//! decided up to, after the appends are acknowledged: a crash repeats a
//! decision with the same ids (derived), never loses one.

use crate::decide::{self, Devices, Fact, MAX_DEPTH};
use chrono::{DateTime, Utc};
use homelink_events::automation::{conditions_hold, next_time, parse_clock, Mode, Snapshot, Step, Trigger};
use homelink_events::command::{decide as decide_command, COMMAND_LIFE};
use homelink_events::event::{
    ActivatedCommand, AutomationPaused, AutomationResumed, AutomationRunFinished, AutomationRunStepped, AutomationTriggered, CommandDenied,
    SceneActivated,
};
use homelink_events::household::{Action, Household};
use homelink_events::{Actor, Envelope, Event, RequestMeta, Topics};
use homelink_kit::kafka::Appender;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::reader::Located;
use homelink_kit::shutdown::CancellationToken;
use serde_json::{json, Value};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;
use uuid::Uuid;

/// A household as the engine knows it.
#[derive(Default)]
pub struct House {
    pub agg: Household,
    pub devices: Devices,
    /// Whether `devices` was loaded from the read model (once, when the
    /// household first has an automation).
    loaded: bool,
}

/// Runs of one automation allowed in [`BREAKER_WINDOW`] before it is
/// paused (the breaker), by default.
pub const BREAKER_RUNS: usize = 30;
pub const BREAKER_WINDOW: Duration = Duration::from_secs(60);

pub struct Engine {
    pub pool: PgPool,
    pub appender: Appender,
    pub topics: Topics,
    pub metrics: ServiceMetrics,
    /// A timer due longer ago than this when the engine gets to it is
    /// recorded as missed, not run.
    pub grace: Duration,
    pub houses: HashMap<Uuid, House>,
    /// Positions up to which decisions were made; records below only fold.
    pub decided: HashMap<(String, i32), i64>,
    /// The engine's last command to a device: when, at which causation
    /// depth, from which automation.
    sent: HashMap<Uuid, (DateTime<Utc>, u32, Uuid)>,
    /// Devices whose entry of `sent` changed since it was last stored.
    sent_changed: HashSet<Uuid>,
    /// Recent run starts per automation (the breaker).
    starts: HashMap<Uuid, VecDeque<DateTime<Utc>>>,
    /// Runs an automation may start in a window before it is paused.
    pub breaker: (usize, Duration),
    /// Automations the breaker paused (rows of `engine_paused`) until they are saved again.
    paused: HashSet<Uuid>,
    /// Households with a run waiting for a trigger.
    waiting: HashSet<Uuid>,
    /// Household-stream partitions not yet folded up to where decisions
    /// start: timers wait until every household they name is known again.
    pub replaying: HashSet<(String, i32)>,
    /// Positions read past in batches that changed nothing durable (only
    /// reports of households without automations), not stored yet: written
    /// with the next transaction, or by the tick within a second. A crash
    /// before that reads those reports again, which decides nothing.
    pending: HashMap<(String, i32), i64>,
    pending_since: Option<std::time::Instant>,
    /// The service's shutdown: an append still retrying then gives up.
    pub cancel: CancellationToken,
}

/// What one decision round appends, in order.
#[derive(Default)]
pub struct Out {
    pub envelopes: Vec<Envelope>,
}

impl Out {
    fn push(&mut self, h: Uuid, actor: Actor, event: Event, id: Uuid, causation: Option<Uuid>, now: DateTime<Utc>) -> &mut Envelope {
        let mut env = Envelope::new(h, actor, &event, now);
        env.event_id = id;
        if let Some(c) = causation {
            env = env.with_causation(c);
        }
        self.envelopes.push(env);
        self.envelopes.last_mut().expect("just pushed")
    }
}

fn engine() -> Actor {
    Actor::System("automation".into())
}

impl Engine {
    pub fn new(pool: PgPool, appender: Appender, topics: Topics, metrics: ServiceMetrics, grace: Duration) -> Self {
        Self {
            pool,
            appender,
            topics,
            metrics,
            grace,
            houses: HashMap::new(),
            decided: HashMap::new(),
            sent: HashMap::new(),
            sent_changed: HashSet::new(),
            starts: HashMap::new(),
            breaker: (BREAKER_RUNS, BREAKER_WINDOW),
            paused: HashSet::new(),
            waiting: HashSet::new(),
            replaying: HashSet::new(),
            pending: HashMap::new(),
            pending_since: None,
            cancel: CancellationToken::new(),
        }
    }

    /// Households with a run waiting for a trigger, from the stored timers.
    pub async fn load_waiting(&mut self) -> Result<(), sqlx::Error> {
        let hs: Vec<Uuid> =
            sqlx::query_scalar("SELECT DISTINCT household_id FROM engine_timers WHERE kind = 'wait'").fetch_all(&self.pool).await?;
        self.waiting = hs.into_iter().collect();
        let paused: Vec<Uuid> = sqlx::query_scalar("SELECT automation_id FROM engine_paused").fetch_all(&self.pool).await?;
        self.paused = paused.into_iter().collect();
        let sent: Vec<(Uuid, DateTime<Utc>, i32, Uuid)> = sqlx::query_as(
            "SELECT device_id, sent_at, depth, automation_id FROM engine_sent WHERE sent_at > now() - interval '30 seconds'",
        )
        .fetch_all(&self.pool)
        .await?;
        self.sent = sent.into_iter().map(|(d, at, depth, a)| (d, (at, depth.max(0) as u32, a))).collect();
        sqlx::query("DELETE FROM engine_sent WHERE sent_at <= now() - interval '30 seconds'").execute(&self.pool).await?;
        Ok(())
    }

    /// Folds and decides one batch; the effects are appended, then the
    /// timers and positions committed.
    pub async fn handle(&mut self, events: &[Located], next_offsets: &[(String, i32, i64)]) -> Result<(), sqlx::Error> {
        let now = Utc::now();
        // Most of the fleet has no automation: a batch of only their reports
        // costs no transaction (its positions are stored later).
        let telemetry = self.topics.telemetry();
        let quiet = events
            .iter()
            .all(|l| l.topic == telemetry && self.houses.get(&l.envelope.household_id).is_none_or(|x| x.agg.automations.is_empty()));
        if quiet {
            for (topic, partition, next) in next_offsets {
                self.pending.insert((topic.clone(), *partition), *next);
                self.note_decided(topic, *partition, *next);
            }
            self.pending_since.get_or_insert_with(std::time::Instant::now);
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let mut out = Out::default();
        let mut changed_automations: HashSet<Uuid> = HashSet::new();
        for l in events {
            let Ok(ev) = l.envelope.event() else { continue };
            let decide = l.offset >= self.decided.get(&(l.topic.clone(), l.partition)).copied().unwrap_or(0);
            tracing::debug!(topic = %l.topic, offset = l.offset, decide, event = %l.envelope.event_type, "record");
            let h = l.envelope.household_id;
            if l.topic == self.topics.households() {
                let house = self.houses.entry(h).or_default();
                let before = (house.agg.members_home(), ev.clone());
                let was = match &ev {
                    Event::PresenceChanged(p) => house.agg.presence.get(&p.user_id).copied(),
                    _ => None,
                };
                if let Some(he) = ev.household_event() {
                    if house.agg.apply(&he, l.envelope.seq, l.envelope.occurred_at).is_err() {
                        continue;
                    }
                }
                match &before.1 {
                    Event::AutomationChanged(a) if decide && self.paused.contains(&a.automation_id) => {
                        self.resume(&mut tx, &mut out, h, a.automation_id, now).await?;
                        changed_automations.insert(h);
                    }
                    Event::AutomationDeleted(a) if decide && self.paused.remove(&a.automation_id) => {
                        sqlx::query("DELETE FROM engine_paused WHERE automation_id = $1").bind(a.automation_id).execute(&mut *tx).await?;
                        changed_automations.insert(h);
                    }
                    Event::AutomationCreated(_)
                    | Event::AutomationChanged(_)
                    | Event::AutomationDeleted(_)
                    | Event::HouseholdTimeZoneSet(_) => {
                        changed_automations.insert(h);
                    }
                    Event::PresenceChanged(p) if decide => {
                        let home_after = house.agg.members_home();
                        let fact = Fact::Presence { user: p.user_id, now: p.presence, was, home_before: before.0, home_after };
                        self.on_fact(&mut tx, &mut out, h, &l.envelope, &fact, (0, None), now).await?;
                    }
                    _ => {}
                }
            } else if l.topic == self.topics.telemetry() && decide {
                if self.houses.get(&h).is_none_or(|x| x.agg.automations.is_empty()) {
                    continue;
                }
                self.ensure_devices(h).await?;
                let Some(house) = self.houses.get_mut(&h) else { continue };
                match &ev {
                    Event::DeviceStateReported(r) => {
                        let before = house.devices.state.get(&r.device_id).cloned();
                        let mut after = before.clone().unwrap_or_default();
                        for (k, v) in &r.state {
                            after.insert(k.clone(), v.clone());
                        }
                        house.devices.state.insert(r.device_id, after.clone());
                        let cause = self.caused_by(r.device_id, l.envelope.occurred_at);
                        let fact = Fact::Reported { device: r.device_id, before: before.as_ref(), after: &after };
                        self.on_fact(&mut tx, &mut out, h, &l.envelope, &fact, cause, now).await?;
                    }
                    Event::DeviceStatusChanged(s) => {
                        let was = house.devices.online.insert(s.device_id, s.online);
                        let fact = Fact::Status { device: s.device_id, online: s.online, was };
                        self.on_fact(&mut tx, &mut out, h, &l.envelope, &fact, (0, None), now).await?;
                    }
                    _ => {}
                }
            }
        }
        for h in changed_automations {
            self.sync_schedules(&mut tx, h, now).await?;
        }
        let mut positions = std::mem::take(&mut self.pending);
        self.pending_since = None;
        for (topic, partition, next) in next_offsets {
            let p = positions.entry((topic.clone(), *partition)).or_insert(*next);
            *p = (*p).max(*next);
            self.note_decided(topic, *partition, *next);
        }
        Self::store_positions(&mut tx, &positions).await?;
        self.store_sent(&mut tx).await?;
        if !out.envelopes.is_empty() {
            self.metrics.latency.with_label_values(&["decide"]).observe((Utc::now() - now).to_std().unwrap_or_default().as_secs_f64());
        }
        if !self.append(&out).await {
            return Ok(());
        }
        tx.commit().await
    }

    /// Records that decisions are made up to `next` in a partition.
    fn note_decided(&mut self, topic: &str, partition: i32, next: i64) {
        let d = self.decided.entry((topic.to_owned(), partition)).or_insert(0);
        if next >= *d {
            self.replaying.remove(&(topic.to_owned(), partition));
        }
        *d = (*d).max(next);
    }

    /// Writes the positions decided up to (never backwards).
    async fn store_positions(tx: &mut Transaction<'_, Postgres>, positions: &HashMap<(String, i32), i64>) -> Result<(), sqlx::Error> {
        for ((topic, partition), next) in positions {
            sqlx::query(
                r#"INSERT INTO engine_offsets (topic, "partition", next_offset) VALUES ($1, $2, $3)
                   ON CONFLICT (topic, "partition") DO UPDATE SET next_offset = GREATEST(engine_offsets.next_offset, EXCLUDED.next_offset)"#,
            )
            .bind(topic)
            .bind(partition)
            .bind(next)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Stores the positions of quiet batches once they are a second old.
    async fn flush_positions(&mut self) -> Result<(), sqlx::Error> {
        if self.pending_since.is_none_or(|t| t.elapsed() < Duration::from_secs(1)) {
            return Ok(());
        }
        let positions = std::mem::take(&mut self.pending);
        self.pending_since = None;
        let mut tx = self.pool.begin().await?;
        Self::store_positions(&mut tx, &positions).await?;
        tx.commit().await
    }

    /// Appends a round's effects in order, retrying until the log takes them
    /// (their ids are derived: a repeat is ignored downstream). `false` when
    /// the engine is stopping first: the round is then not committed, and is
    /// decided again after the restart.
    async fn append(&self, out: &Out) -> bool {
        if out.envelopes.is_empty() {
            return true;
        }
        let started = std::time::Instant::now();
        let landed = self
            .appender
            .append_all_landed(&self.topics.commands(), &out.envelopes, &self.cancel, |e| {
                self.metrics.errors.with_label_values(&["kafka_produce"]).inc();
                tracing::warn!(error = %e, "appending the engine's decisions failed; retrying");
            })
            .await;
        if landed.is_none() {
            return false;
        }
        self.metrics.latency.with_label_values(&["append_effects"]).observe(started.elapsed().as_secs_f64());
        self.metrics.messages_out.with_label_values(&["automation_effects"]).inc_by(out.envelopes.len() as u64);
        true
    }

    /// The devices' last state, from the read model, the first time a
    /// household needs it.
    async fn ensure_devices(&mut self, h: Uuid) -> Result<(), sqlx::Error> {
        if self.houses.get(&h).is_some_and(|x| x.loaded) {
            return Ok(());
        }
        let rows = homelink_read_model::registry::device_states(&self.pool, h).await?;
        let house = self.houses.entry(h).or_default();
        for r in rows {
            if let Some(Value::Object(m)) = r.reported {
                house.devices.state.entry(r.device_id).or_insert(m);
            }
            house.devices.online.entry(r.device_id).or_insert(r.online);
        }
        house.loaded = true;
        Ok(())
    }

    /// A report right after the engine's own command to the device is that
    /// command's effect: one step deeper in the causation chain, and the
    /// automation whose command it was.
    /// Stores the engine's last commands to devices that changed (with the
    /// round's positions), so a restart keeps the own-commands rule and the
    /// loop guard's depth for their 30 s.
    async fn store_sent(&mut self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        if self.sent_changed.is_empty() {
            return Ok(());
        }
        let (mut devices, mut ats, mut depths, mut automations) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for d in self.sent_changed.drain() {
            if let Some((at, depth, aid)) = self.sent.get(&d) {
                devices.push(d);
                ats.push(*at);
                depths.push(i32::try_from(*depth).unwrap_or(i32::MAX));
                automations.push(*aid);
            }
        }
        sqlx::query(
            "INSERT INTO engine_sent (device_id, sent_at, depth, automation_id)
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::int[], $4::uuid[])
             ON CONFLICT (device_id) DO UPDATE SET sent_at = EXCLUDED.sent_at, depth = EXCLUDED.depth, automation_id = EXCLUDED.automation_id",
        )
        .bind(&devices)
        .bind(&ats)
        .bind(&depths)
        .bind(&automations)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    fn caused_by(&self, device: Uuid, at: DateTime<Utc>) -> (u32, Option<Uuid>) {
        match self.sent.get(&device) {
            Some((sent, d, aid)) if at >= *sent && at - *sent < chrono::Duration::seconds(30) => (d + 1, Some(*aid)),
            _ => (0, None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_fact(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        out: &mut Out,
        h: Uuid,
        env: &Envelope,
        fact: &Fact<'_>,
        (depth, own): (u32, Option<Uuid>),
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let Some(house) = self.houses.get(&h) else { return Ok(()) };
        tracing::debug!(household = %h, event = %env.event_id, ?fact, automations = house.agg.automations.len(), "fact");
        let mut fired = Vec::new();
        // An automation does not act on its own commands' effects unless asked.
        let listens =
            |aid: &Uuid, a: &homelink_events::household::Automation| a.enabled && (own != Some(*aid) || a.definition.react_to_own);
        for (aid, a) in house.agg.automations.iter().filter(|(aid, a)| listens(aid, a)) {
            for (i, t) in a.definition.triggers.iter().enumerate() {
                if let Some((what, hold, user)) = decide::fires(t, fact) {
                    fired.push((*aid, i, what, hold, user));
                }
            }
        }
        for (aid, i, what, hold, user) in fired {
            if hold > 0 {
                let due = decide::due(env.occurred_at, hold);
                sqlx::query(
                    r#"INSERT INTO engine_timers (timer_id, household_id, automation_id, kind, "trigger", depth, due_at, payload)
                       VALUES ($1, $2, $3, 'hold', $4, $5, $6, $7)
                       ON CONFLICT (timer_id) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload, depth = EXCLUDED.depth"#,
                )
                .bind(decide::derived(aid, &format!("hold/{i}")))
                .bind(h)
                .bind(aid)
                .bind(i as i32)
                .bind(depth as i32)
                .bind(due)
                .bind(json!({"cause": env.event_id, "what": what, "user": user, "secs": hold}))
                .execute(&mut **tx)
                .await?;
            } else {
                // How long the fact took from its recording to this decision (the log, the read).
                let waited = (Utc::now() - env.occurred_at).to_std().unwrap_or_default();
                self.metrics.latency.with_label_values(&["fact_to_decision"]).observe(waited.as_secs_f64());
                self.start_run(tx, out, h, aid, i, &env.event_id.to_string(), Some(env.event_id), what, depth, now).await?;
            }
        }
        if self.waiting.contains(&h) {
            let rows = sqlx::query(
                "SELECT timer_id, automation_id, run_id, step, depth, payload FROM engine_timers WHERE household_id = $1 AND kind = 'wait' FOR UPDATE",
            )
            .bind(h)
            .fetch_all(&mut **tx)
            .await?;
            for r in rows {
                let (aid, run, step): (Uuid, Uuid, i32) = (r.get(1), r.get(2), r.get(3));
                let waited_on = self.houses.get(&h).and_then(|x| x.agg.automations.get(&aid)).and_then(|a| {
                    match a.definition.actions.get((step as usize).saturating_sub(1)) {
                        Some(Step::WaitFor { trigger, .. }) => Some(trigger.clone()),
                        _ => None,
                    }
                });
                let Some(trigger) = waited_on else { continue };
                if let Some((what, _, _)) = decide::fires(&trigger, fact) {
                    sqlx::query("DELETE FROM engine_timers WHERE timer_id = $1").bind(r.get::<Uuid, _>(0)).execute(&mut **tx).await?;
                    self.stepped(out, h, aid, run, step as u32 - 1, "waited", vec![], Some(what), now);
                    self.steps(tx, out, h, aid, run, step as usize, r.get::<i32, _>(4) as u32, now).await?;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn stepped(
        &self,
        out: &mut Out,
        h: Uuid,
        aid: Uuid,
        run: Uuid,
        step: u32,
        outcome: &str,
        commands: Vec<Uuid>,
        detail: Option<String>,
        now: DateTime<Utc>,
    ) {
        let id = decide::derived(run, &format!("step/{step}/{outcome}"));
        let ev = Event::AutomationRunStepped(AutomationRunStepped {
            automation_id: aid,
            run_id: run,
            step,
            outcome: outcome.into(),
            commands,
            detail,
        });
        out.push(h, engine(), ev, id, Some(run), now);
    }

    #[allow(clippy::too_many_arguments)]
    fn finished(&self, out: &mut Out, h: Uuid, aid: Uuid, run: Uuid, outcome: &str, reason: Option<String>, now: DateTime<Utc>) {
        let id = decide::derived(run, "finished");
        let ev = Event::AutomationRunFinished(AutomationRunFinished { automation_id: aid, run_id: run, outcome: outcome.into(), reason });
        out.push(h, engine(), ev, id, Some(run), now);
    }

    /// Runs of the automation still going (a delay, a wait, queued).
    async fn active_runs(tx: &mut Transaction<'_, Postgres>, aid: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT run_id FROM engine_timers WHERE automation_id = $1 AND kind IN ('resume', 'wait') AND run_id IS NOT NULL",
        )
        .bind(aid)
        .fetch_all(&mut **tx)
        .await
    }

    /// A trigger fired (and held): the mode, the loop guard and the
    /// conditions decide whether a run starts; every decision is recorded.
    #[allow(clippy::too_many_arguments)]
    async fn start_run(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        out: &mut Out,
        h: Uuid,
        aid: Uuid,
        trigger: usize,
        cause_key: &str,
        cause: Option<Uuid>,
        what: String,
        depth: u32,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let Some(house) = self.houses.get(&h) else { return Ok(()) };
        let Some(a) = house.agg.automations.get(&aid).cloned() else { return Ok(()) };
        if self.paused.contains(&aid) {
            self.metrics.messages_in.with_label_values(&["trigger_paused"]).inc();
            return Ok(());
        }
        let run = decide::run_id(aid, trigger, cause_key);
        let (limit, window) = self.breaker;
        let window = chrono::Duration::from_std(window).unwrap_or_default();
        let starts = self.starts.entry(aid).or_default();
        while starts.front().is_some_and(|t| now - *t > window) {
            starts.pop_front();
        }
        let mut verdict: Option<(&str, String)> = None;
        if depth > MAX_DEPTH {
            verdict = Some((
                "stopped",
                format!("loop: causation depth {depth} over {MAX_DEPTH} (its own or another automation's commands trigger it)"),
            ));
        } else if starts.len() >= limit {
            let reason = format!("breaker: more than {limit} runs in {} s; paused until it is saved again", window.num_seconds());
            self.pause_automation(tx, out, h, aid, &reason, now).await?;
            verdict = Some(("stopped", reason));
        }
        let mut conditions = Vec::new();
        if verdict.is_none() {
            let active = Self::active_runs(tx, aid).await?;
            let max = a.definition.max.unwrap_or(homelink_events::automation::MAX_PARALLEL) as usize;
            match a.definition.mode {
                Mode::Single if !active.is_empty() => verdict = Some(("skipped", "mode single: a run is going".into())),
                Mode::Parallel if active.len() >= max => verdict = Some(("skipped", format!("mode parallel: {max} runs going"))),
                Mode::Restart => {
                    for old in active {
                        sqlx::query("DELETE FROM engine_timers WHERE run_id = $1").bind(old).execute(&mut **tx).await?;
                        self.finished(out, h, aid, old, "stopped", Some("restarted by a new trigger".into()), now);
                    }
                }
                _ => {}
            }
            if verdict.is_none() {
                let house = &self.houses[&h];
                let snapshot = Snapshot {
                    state: house.devices.state.iter().map(|(k, v)| (*k, v.clone())).collect(),
                    presence: house.agg.presence.clone(),
                    local: Some(now.with_timezone(&house.agg.tz()).naive_local()),
                };
                let (held, judged) = conditions_hold(&a.definition.conditions, &snapshot);
                conditions = judged;
                if !held {
                    verdict = Some(("conditions", "a condition did not hold".into()));
                }
            }
            if verdict.is_none() && a.definition.mode == Mode::Queued && !Self::active_runs(tx, aid).await?.is_empty() {
                sqlx::query(
                    r#"INSERT INTO engine_timers (timer_id, household_id, automation_id, kind, run_id, step, depth, due_at)
                       VALUES ($1, $2, $3, 'queued', $1, 0, $4, $5) ON CONFLICT (timer_id) DO NOTHING"#,
                )
                .bind(run)
                .bind(h)
                .bind(aid)
                .bind(depth as i32)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                verdict = Some(("queued", "mode queued: it starts when the running one ends".into()));
            }
        }
        let (outcome, reason) = match &verdict {
            Some((o, r)) => (*o, Some(r.clone())),
            None => ("run", None),
        };
        if outcome == "run" || outcome == "queued" {
            self.starts.entry(aid).or_default().push_back(now);
        }
        self.metrics.messages_in.with_label_values(&[&format!("trigger_{outcome}")]).inc();
        let ev = Event::AutomationTriggered(AutomationTriggered {
            automation_id: aid,
            run_id: run,
            trigger: trigger as u32,
            cause,
            what,
            conditions,
            outcome: outcome.into(),
            reason,
        });
        out.push(h, engine(), ev, decide::derived(run, "triggered"), cause, now);
        if outcome == "run" {
            self.steps(tx, out, h, aid, run, 0, depth, now).await?;
        }
        Ok(())
    }

    /// Runs steps from `from` until the end, a delay or a wait.
    #[allow(clippy::too_many_arguments)]
    async fn steps(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        out: &mut Out,
        h: Uuid,
        aid: Uuid,
        run: Uuid,
        from: usize,
        depth: u32,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let Some(house) = self.houses.get(&h) else { return Ok(()) };
        let Some(a) = house.agg.automations.get(&aid).cloned() else {
            self.finished(out, h, aid, run, "stopped", Some("the automation was deleted".into()), now);
            return Ok(());
        };
        let creator = a.created_by;
        let role = house.agg.role_of(creator);
        let actor = Actor::User(creator.to_string());
        let meta = RequestMeta { role, client: Some(format!("automation/{aid}")) };
        for (i, step) in a.definition.actions.iter().enumerate().skip(from) {
            let house = &self.houses[&h];
            match step {
                Step::Command { device_id, set } => {
                    let device = house.agg.devices.get(device_id).filter(|d| !d.removed);
                    let allowed = match (role, device) {
                        (None, _) => Err("its creator is no longer a member of the household".to_owned()),
                        (_, None) => Err("the device was removed from the household".to_owned()),
                        (Some(r), Some(d)) if !r.allows(&Action::SeeDevice(d.kind)) || !r.allows(&Action::Control(d.kind, set)) => {
                            Err(format!("its creator's role ({r}) does not allow this command to a {}", d.kind))
                        }
                        (Some(_), Some(d)) => Ok(d.kind),
                    };
                    let command_id = decide::derived(run, &format!("command/{i}"));
                    match allowed.and_then(|kind| {
                        decide_command(kind, *device_id, command_id, set.clone(), None, COMMAND_LIFE, now).map_err(|e| e.to_string())
                    }) {
                        Ok(mut c) => {
                            c.queued = !house.devices.online.get(device_id).copied().unwrap_or(false);
                            self.sent.insert(*device_id, (now, depth, aid));
                            self.sent_changed.insert(*device_id);
                            let env = out.push(
                                h,
                                actor.clone(),
                                Event::DeviceCommandRequested(c),
                                decide::derived(command_id, "requested"),
                                Some(run),
                                now,
                            );
                            env.correlation_id = Some(command_id);
                            env.meta = Some(meta.clone());
                            self.stepped(out, h, aid, run, i as u32, "sent", vec![command_id], None, now);
                        }
                        Err(why) => self.refused(out, h, aid, run, i, &actor, &meta, format!("device/{device_id}"), why, now),
                    }
                }
                Step::Scene { scene_id } => {
                    let activation_id = decide::derived(run, &format!("scene/{i}"));
                    let decided = match role {
                        None => Err("its creator is no longer a member of the household".to_owned()),
                        Some(r) => {
                            let online = &house.devices.online;
                            homelink_events::scene::activate(
                                &house.agg,
                                *scene_id,
                                r,
                                None,
                                now,
                                |d| online.get(&d).copied().unwrap_or(false),
                                |d| decide::derived(activation_id, &d.to_string()),
                            )
                            .map_err(|e| e.to_string())
                        }
                    };
                    match decided {
                        Ok(act) => {
                            let commands: Vec<ActivatedCommand> = act
                                .commands
                                .iter()
                                .map(|c| ActivatedCommand { device_id: c.device_id, command_id: c.command_id })
                                .collect();
                            let ids: Vec<Uuid> = commands.iter().map(|c| c.command_id).collect();
                            let skipped = (!act.skipped.is_empty()).then(|| {
                                act.skipped.iter().map(|k| format!("{}: {}", k.device_id, k.reason)).collect::<Vec<_>>().join("; ")
                            });
                            let ev = Event::SceneActivated(SceneActivated {
                                activation_id,
                                scene_id: *scene_id,
                                commands,
                                skipped: act.skipped,
                            });
                            let env = out.push(h, actor.clone(), ev, decide::derived(activation_id, "activated"), Some(run), now);
                            env.meta = Some(meta.clone());
                            for c in act.commands {
                                self.sent.insert(c.device_id, (now, depth, aid));
                                self.sent_changed.insert(c.device_id);
                                let id = c.command_id;
                                let env = out.push(
                                    h,
                                    actor.clone(),
                                    Event::DeviceCommandRequested(c),
                                    decide::derived(id, "requested"),
                                    Some(activation_id),
                                    now,
                                );
                                env.correlation_id = Some(id);
                                env.meta = Some(meta.clone());
                            }
                            self.stepped(out, h, aid, run, i as u32, "sent", ids, skipped, now);
                        }
                        Err(why) => self.refused(out, h, aid, run, i, &actor, &meta, format!("scene/{scene_id}"), why, now),
                    }
                }
                Step::Delay { secs } => {
                    self.pause(tx, h, aid, run, i + 1, depth, "resume", decide::due(now, *secs)).await?;
                    self.stepped(out, h, aid, run, i as u32, "delayed", vec![], Some(format!("{secs} s")), now);
                    return Ok(());
                }
                Step::WaitFor { timeout_secs, .. } => {
                    self.pause(tx, h, aid, run, i + 1, depth, "wait", decide::due(now, *timeout_secs)).await?;
                    self.waiting.insert(h);
                    self.stepped(out, h, aid, run, i as u32, "waiting", vec![], Some(format!("at most {timeout_secs} s")), now);
                    return Ok(());
                }
            }
        }
        self.finished(out, h, aid, run, "done", None, now);
        self.start_queued(tx, aid, now).await
    }

    /// A queued run of the automation waits for no one now: it is due at once.
    async fn start_queued(&self, tx: &mut Transaction<'_, Postgres>, aid: Uuid, now: DateTime<Utc>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE engine_timers SET due_at = $2 WHERE automation_id = $1 AND kind = 'queued'")
            .bind(aid)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn refused(
        &self,
        out: &mut Out,
        h: Uuid,
        aid: Uuid,
        run: Uuid,
        step: usize,
        actor: &Actor,
        meta: &RequestMeta,
        target: String,
        why: String,
        now: DateTime<Utc>,
    ) {
        let denied = Event::CommandDenied(CommandDenied {
            action: "automation.action".into(),
            target: Some(target),
            status: 403,
            reason: format!("automation {aid}, run {run}: {why}"),
        });
        let env = out.push(h, actor.clone(), denied, decide::derived(run, &format!("denied/{step}")), Some(run), now);
        env.meta = Some(meta.clone());
        self.stepped(out, h, aid, run, step as u32, "refused", vec![], Some(why), now);
    }

    #[allow(clippy::too_many_arguments)]
    async fn pause(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        h: Uuid,
        aid: Uuid,
        run: Uuid,
        step: usize,
        depth: u32,
        kind: &str,
        due: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            r#"INSERT INTO engine_timers (timer_id, household_id, automation_id, kind, run_id, step, depth, due_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (timer_id) DO NOTHING"#,
        )
        .bind(decide::derived(run, &format!("{kind}/{step}")))
        .bind(h)
        .bind(aid)
        .bind(kind)
        .bind(run)
        .bind(step as i32)
        .bind(depth as i32)
        .bind(due)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// One schedule timer per time trigger of every enabled automation of
    /// the household, at its next instant; stale ones go.
    async fn sync_schedules(&self, tx: &mut Transaction<'_, Postgres>, h: Uuid, now: DateTime<Utc>) -> Result<(), sqlx::Error> {
        let Some(house) = self.houses.get(&h) else { return Ok(()) };
        let tz = house.agg.tz();
        let mut wanted: Vec<(Uuid, Uuid, i32, DateTime<Utc>)> = Vec::new();
        for (aid, a) in house.agg.automations.iter().filter(|(_, a)| a.enabled) {
            for (i, t) in a.definition.triggers.iter().enumerate() {
                if let Trigger::Time { at, days } = t {
                    let Some(clock) = parse_clock(at) else { continue };
                    if let Some(due) = next_time(clock, days, &tz, now) {
                        let id = decide::derived(*aid, &format!("schedule/{i}/{at}/{days:?}/{}", tz.name()));
                        wanted.push((id, *aid, i as i32, due));
                    }
                }
            }
        }
        let ids: Vec<Uuid> = wanted.iter().map(|w| w.0).collect();
        sqlx::query("DELETE FROM engine_timers WHERE household_id = $1 AND kind IN ('schedule', 'hold') AND NOT (timer_id = ANY($2))
                       AND (kind = 'schedule' OR NOT EXISTS (SELECT 1 FROM automations a WHERE a.automation_id = engine_timers.automation_id))")
            .bind(h)
            .bind(&ids)
            .execute(&mut **tx)
            .await?;
        for (id, aid, i, due) in wanted {
            sqlx::query(
                r#"INSERT INTO engine_timers (timer_id, household_id, automation_id, kind, "trigger", due_at)
                   VALUES ($1, $2, $3, 'schedule', $4, $5) ON CONFLICT (timer_id) DO NOTHING"#,
            )
            .bind(id)
            .bind(h)
            .bind(aid)
            .bind(i)
            .bind(due)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Fires the timers that are due (a bounded number per round). Returns
    /// how many it took.
    pub async fn tick(&mut self) -> Result<usize, sqlx::Error> {
        self.flush_positions().await?;
        if !self.replaying.is_empty() {
            return Ok(0);
        }
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            r#"DELETE FROM engine_timers WHERE timer_id IN
                 (SELECT timer_id FROM engine_timers WHERE due_at <= $1 ORDER BY due_at LIMIT 200 FOR UPDATE SKIP LOCKED)
               RETURNING timer_id, household_id, automation_id, kind, "trigger", run_id, step, depth, due_at, payload"#,
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_by_key(|r| r.get::<DateTime<Utc>, _>(8));
        let n = rows.len();
        self.metrics.messages_in.with_label_values(&["timer_fired"]).inc_by(n as u64);
        for r in &rows {
            let late = (now - r.get::<DateTime<Utc>, _>(8)).to_std().unwrap_or_default();
            self.metrics.latency.with_label_values(&["timer_lateness"]).observe(late.as_secs_f64());
        }
        let mut out = Out::default();
        for r in rows {
            let (h, aid, kind): (Uuid, Uuid, String) = (r.get(1), r.get(2), r.get(3));
            let (trigger, run, step, depth, due, payload): (Option<i32>, Option<Uuid>, Option<i32>, i32, DateTime<Utc>, Value) =
                (r.get(4), r.get(5), r.get(6), r.get(7), r.get(8), r.get(9));
            if !self.houses.contains_key(&h) {
                continue;
            }
            let definition = self.houses[&h].agg.automations.get(&aid).filter(|a| a.enabled).map(|a| a.definition.clone());
            match kind.as_str() {
                "hold" => {
                    let (Some(def), Some(i)) = (definition, trigger) else { continue };
                    let Some(t) = def.triggers.get(i as usize) else { continue };
                    self.ensure_devices(h).await?;
                    let house = &self.houses[&h];
                    let user = payload["user"].as_str().and_then(|u| Uuid::parse_str(u).ok());
                    if decide::still_holds(t, &house.agg, &house.devices, user) {
                        let cause = payload["cause"].as_str().and_then(|c| Uuid::parse_str(c).ok());
                        let what = format!(
                            "{} (held {} s)",
                            payload["what"].as_str().unwrap_or("a trigger"),
                            payload["secs"].as_u64().unwrap_or_default()
                        );
                        let key = format!("{}/{}", payload["cause"].as_str().unwrap_or(""), due.timestamp_millis());
                        self.start_run(&mut tx, &mut out, h, aid, i as usize, &key, cause, what, depth as u32, now).await?;
                    }
                }
                "schedule" => {
                    let Some(i) = trigger else { continue };
                    let key = due.to_rfc3339();
                    if now - due > chrono::Duration::from_std(self.grace).unwrap_or_default() {
                        let run = decide::run_id(aid, i as usize, &key);
                        let ev = Event::AutomationTriggered(AutomationTriggered {
                            automation_id: aid,
                            run_id: run,
                            trigger: i as u32,
                            cause: None,
                            what: format!("the schedule of {key}"),
                            conditions: vec![],
                            outcome: "missed".into(),
                            reason: Some(format!(
                                "due {} s ago, more than the grace of {} s",
                                (now - due).num_seconds(),
                                self.grace.as_secs()
                            )),
                        });
                        out.push(h, engine(), ev, decide::derived(run, "triggered"), None, now);
                    } else {
                        self.start_run(&mut tx, &mut out, h, aid, i as usize, &key, None, format!("the schedule of {key}"), 0, now).await?;
                    }
                    // The next one, after this one (never the same instant twice).
                    self.sync_after(&mut tx, h, due.max(now)).await?;
                }
                "resume" | "wait" => {
                    let (Some(run), Some(step)) = (run, step) else { continue };
                    if kind == "wait" {
                        self.stepped(&mut out, h, aid, run, step as u32 - 1, "timedOut", vec![], None, now);
                    }
                    if definition.is_none() {
                        self.finished(&mut out, h, aid, run, "stopped", Some("the automation was deleted or disabled".into()), now);
                        continue;
                    }
                    self.steps(&mut tx, &mut out, h, aid, run, step as usize, depth as u32, now).await?;
                }
                "queued" => {
                    let Some(run) = run else { continue };
                    if definition.is_none() {
                        self.finished(&mut out, h, aid, run, "stopped", Some("the automation was deleted or disabled".into()), now);
                    } else if Self::active_runs(&mut tx, aid).await?.is_empty() {
                        self.steps(&mut tx, &mut out, h, aid, run, 0, depth as u32, now).await?;
                    } else {
                        self.pause(&mut tx, h, aid, run, 0, depth as u32, "queued", now + chrono::Duration::seconds(3600)).await?;
                    }
                }
                _ => {}
            }
        }
        self.store_sent(&mut tx).await?;
        if !self.append(&out).await {
            return Ok(n);
        }
        tx.commit().await?;
        Ok(n)
    }

    /// The breaker tripped: the automation starts nothing until it is saved
    /// again; its waiting holds and queued runs go. Recorded on the log
    /// (`AutomationPaused`, which the owner sees on the automation) and in
    /// `engine_paused`, with the positions.
    async fn pause_automation(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        out: &mut Out,
        h: Uuid,
        aid: Uuid,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let at: Option<DateTime<Utc>> = sqlx::query_scalar(
            "INSERT INTO engine_paused (automation_id, household_id, paused_at, reason) VALUES ($1, $2, $3, $4)
             ON CONFLICT (automation_id) DO UPDATE SET automation_id = EXCLUDED.automation_id RETURNING paused_at",
        )
        .bind(aid)
        .bind(h)
        .bind(now)
        .bind(reason)
        .fetch_optional(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM engine_timers WHERE automation_id = $1 AND kind IN ('hold', 'queued')")
            .bind(aid)
            .execute(&mut **tx)
            .await?;
        self.paused.insert(aid);
        self.metrics.errors.with_label_values(&["automation_paused"]).inc();
        tracing::warn!(automation = %aid, household = %h, %reason, "automation paused");
        let id = decide::derived(aid, &format!("paused/{}", at.unwrap_or(now).timestamp_millis()));
        let ev = Event::AutomationPaused(AutomationPaused { automation_id: aid, reason: reason.to_owned() });
        out.push(h, engine(), ev, id, None, now);
        Ok(())
    }

    /// A paused automation was saved again: it runs again.
    async fn resume(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        out: &mut Out,
        h: Uuid,
        aid: Uuid,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let at: Option<DateTime<Utc>> = sqlx::query_scalar("DELETE FROM engine_paused WHERE automation_id = $1 RETURNING paused_at")
            .bind(aid)
            .fetch_optional(&mut **tx)
            .await?;
        self.paused.remove(&aid);
        self.starts.remove(&aid);
        let id = decide::derived(aid, &format!("resumed/{}", at.unwrap_or(now).timestamp_millis()));
        let ev = Event::AutomationResumed(AutomationResumed { automation_id: aid, reason: "saved again".into() });
        out.push(h, engine(), ev, id, None, now);
        Ok(())
    }

    /// Schedules the household's time triggers after `after`.
    async fn sync_after(&self, tx: &mut Transaction<'_, Postgres>, h: Uuid, after: DateTime<Utc>) -> Result<(), sqlx::Error> {
        self.sync_schedules(tx, h, after).await
    }
}
