//! `automationDryRun`: an unsaved automation played over the household's
//! recorded history, read from the log (the household stream from its start,
//! the telemetry of the window and an hour before it), never from the read
//! models' current state; it sends nothing. The simulation is
//! `events::dry_run`, with the engine's own decisions.

use crate::errors::{codes, error, not_found};
use async_graphql::{ErrorExtensions, Json, SimpleObject, ID};
use chrono::{DateTime, Utc};
use homelink_events::automation::{validate, Definition};
use homelink_events::household::{Action, Household};
use homelink_events::topics::household_key;
use homelink_events::Topics;
use serde_json::Value;
use uuid::Uuid;

/// Where the log is: the dry run and the history fields read it.
#[derive(Debug, Clone)]
pub struct Log {
    pub bootstrap: String,
    pub topics: Topics,
    /// `householdAt` stores its fold as a snapshot when it folded more than
    /// this many events past the snapshot it started from.
    pub snapshot_every: u64,
}

/// The default of [`Log::snapshot_every`].
pub const SNAPSHOT_EVERY: u64 = 10_000;

/// Longest window one dry run plays.
pub const MAX_WINDOW_DAYS: i64 = 7;
/// Telemetry read before the window so the devices' state is known at its start.
pub const WARM_UP_SECS: i64 = 3600;
/// Most records one dry run reads from a topic (every household of the
/// partitions it scans); past it the window must be narrowed.
pub const MAX_SCANNED: usize = 2_000_000;

#[derive(SimpleObject)]
pub struct DryRun {
    /// Every time a trigger fired (and held) in the window, in time order.
    pub firings: Vec<DryFiring>,
    /// Whether it stopped at 500 firings before the window's end.
    pub truncated: bool,
    /// Recorded events of the household played inside the window.
    pub events: i32,
}

#[derive(SimpleObject)]
pub struct DryFiring {
    pub at: DateTime<Utc>,
    pub trigger: i32,
    pub what: String,
    /// `run`, `conditions`, `skipped`, `queued` or `stopped`, as a run's trace says.
    pub outcome: String,
    pub reason: Option<String>,
    /// `[{path, held, value}]`, every condition judged.
    pub conditions: Json<Value>,
    /// What the run would have done, in order.
    pub actions: Vec<DryAction>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(SimpleObject)]
pub struct DryAction {
    pub at: DateTime<Utc>,
    pub step: i32,
    /// `command`, `scene`, `skipped` (a scene's removed device), `delay`,
    /// `waitFor`, `waited`, `timedOut`.
    pub kind: String,
    pub device_id: Option<ID>,
    pub set: Option<Json<Value>>,
    pub scene_id: Option<ID>,
    pub detail: Option<String>,
}

impl From<homelink_events::dry_run::DryRun> for DryRun {
    fn from(d: homelink_events::dry_run::DryRun) -> Self {
        let id = |u: Uuid| ID(u.to_string());
        Self {
            truncated: d.truncated,
            events: i32::try_from(d.events).unwrap_or(i32::MAX),
            firings: d
                .firings
                .into_iter()
                .map(|f| DryFiring {
                    at: f.at,
                    trigger: f.trigger as i32,
                    what: f.what,
                    outcome: f.outcome,
                    reason: f.reason,
                    conditions: Json(serde_json::to_value(&f.conditions).unwrap_or_default()),
                    finished_at: f.finished_at,
                    actions: f
                        .actions
                        .into_iter()
                        .map(|a| DryAction {
                            at: a.at,
                            step: a.step as i32,
                            kind: a.kind,
                            device_id: a.device_id.map(id),
                            set: a.set.map(|s| Json(Value::Object(s))),
                            scene_id: a.scene_id.map(id),
                            detail: a.detail,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn log_unavailable(e: homelink_kit::Error) -> async_graphql::Error {
    tracing::warn!(error = %e, "reading the log for a dry run failed");
    error(codes::UNAVAILABLE, "the log is unavailable")
}

/// Runs a dry run for `viewer` (an owner or adult of `household`).
pub async fn run(
    log: &Log,
    viewer: Uuid,
    household: Uuid,
    definition: Value,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> async_graphql::Result<DryRun> {
    if until <= since {
        return Err(error(codes::BAD_USER_INPUT, "until must be after since"));
    }
    // Nothing is recorded after now: the window is played up to now.
    let now = Utc::now();
    let until = until.min(now);
    if until <= since {
        return Err(error(codes::BAD_USER_INPUT, "the window is in the future: nothing is recorded there yet"));
    }
    if until - since > chrono::Duration::days(MAX_WINDOW_DAYS) {
        return Err(error(codes::BAD_USER_INPUT, format!("a dry run plays at most {MAX_WINDOW_DAYS} days")));
    }
    let definition: Definition = serde_json::from_value(definition)
        .map_err(|e| error(codes::BAD_USER_INPUT, format!("definition: {e}")).extend_with(|_, x| x.set("path", "/definition")))?;
    let key = household_key(household);
    let stream =
        homelink_kit::reader::read_window(&log.bootstrap, &log.topics.households(), &key, None, now.timestamp_millis(), MAX_SCANNED)
            .await
            .map_err(log_unavailable)?;
    // The household as it is now decides who may ask and what the
    // definition may name (devices, scenes, members), as when it is saved.
    let mut current = Household::default();
    for env in &stream.events {
        if let Some(he) = env.event().ok().as_ref().and_then(|e| e.household_event()) {
            let _ = current.apply(&he, env.seq, env.occurred_at);
        }
    }
    match current.role_of(viewer) {
        None => return Err(not_found()),
        Some(r) if !r.allows(&Action::ManageDevices) => return Err(error(codes::FORBIDDEN, "only owners and adults try automations")),
        Some(_) => {}
    }
    let definition = validate(&current, definition).map_err(|f| {
        let path = format!("/definition{}", f.path);
        error(codes::BAD_USER_INPUT, format!("{path}: {}", f.reason)).extend_with(move |_, x| x.set("path", path.clone()))
    })?;
    let from = (since - chrono::Duration::seconds(WARM_UP_SECS)).timestamp_millis();
    let telemetry =
        homelink_kit::reader::read_window(&log.bootstrap, &log.topics.telemetry(), &key, Some(from), until.timestamp_millis(), MAX_SCANNED)
            .await
            .map_err(log_unavailable)?;
    if stream.exceeded || telemetry.exceeded {
        return Err(error(
            codes::BAD_USER_INPUT,
            format!("the window holds more than {MAX_SCANNED} records of the log; narrow since / until"),
        ));
    }
    let played = tokio::task::spawn_blocking(move || {
        homelink_events::dry_run::simulate(&definition, &stream.events, &telemetry.events, since, until)
    })
    .await
    .map_err(|e| error(codes::INTERNAL, e.to_string()))?;
    Ok(played.into())
}
