//! Scenes, their activations and automations as the query API reads them
//! (the projector writes `scenes`, `scene_activations`, `automations`,
//! `automation_runs`). Each list takes the most rows the caller may read.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, sqlx::FromRow)]
pub struct SceneRow {
    pub scene_id: Uuid,
    pub name: String,
    /// `[{deviceId, set}]`, in the scene's order.
    pub devices: Value,
    pub child_allowed: bool,
    pub updated_at: DateTime<Utc>,
}

/// A household's scenes by name; only the `childAllowed` ones unless `all`.
pub async fn scenes(pool: &PgPool, household: Uuid, all: bool, limit: i64) -> Result<Vec<SceneRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT scene_id, name, devices, child_allowed, updated_at FROM scenes
          WHERE household_id = $1 AND (child_allowed OR $2) ORDER BY lower(name), scene_id LIMIT $3",
    )
    .bind(household)
    .bind(all)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Debug, sqlx::FromRow)]
pub struct ActivationRow {
    pub scene_id: Uuid,
    pub actor: Value,
    pub at: DateTime<Utc>,
    /// `[{deviceId, commandId}]`.
    pub commands: Value,
    /// `[{deviceId, reason}]`.
    pub skipped: Value,
}

/// An activation of a household `viewer` belongs to.
pub async fn activation(pool: &PgPool, id: Uuid, viewer: Uuid) -> Result<Option<ActivationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.scene_id, a.actor, a.at, a.commands, a.skipped FROM scene_activations a
           JOIN household_members m ON m.household_id = a.household_id AND m.user_id = $2
          WHERE a.activation_id = $1",
    )
    .bind(id)
    .bind(viewer)
    .fetch_optional(pool)
    .await
}

/// Where one command of an activation (or a run) stands.
#[derive(Debug, sqlx::FromRow)]
pub struct CausedCommand {
    pub command_id: Uuid,
    pub status: String,
    pub reason: Option<String>,
    pub delivered: bool,
    pub expired: bool,
}

/// The commands `cause` (an activation, a run) sent.
pub async fn caused_commands(pool: &PgPool, cause: Uuid, limit: i64) -> Result<Vec<CausedCommand>, sqlx::Error> {
    sqlx::query_as(
        "SELECT command_id, status, reason, delivered_at IS NOT NULL AS delivered, expired_at IS NOT NULL AS expired FROM device_commands
          WHERE caused_by = $1 LIMIT $2",
    )
    .bind(cause)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Debug, sqlx::FromRow)]
pub struct AutomationRow {
    pub automation_id: Uuid,
    pub name: String,
    pub enabled: bool,
    pub created_by: Uuid,
    pub definition: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub paused_at: Option<DateTime<Utc>>,
    pub paused_reason: Option<String>,
}

/// A household's automations by name.
pub async fn automations(pool: &PgPool, household: Uuid, limit: i64) -> Result<Vec<AutomationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT automation_id, name, enabled, created_by, definition, created_at, updated_at, paused_at, paused_reason FROM automations
          WHERE household_id = $1 ORDER BY lower(name), automation_id LIMIT $2",
    )
    .bind(household)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// An automation of a household `viewer` belongs to.
pub async fn automation(pool: &PgPool, id: Uuid, viewer: Uuid) -> Result<Option<AutomationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.automation_id, a.name, a.enabled, a.created_by, a.definition, a.created_at, a.updated_at, a.paused_at,
                a.paused_reason FROM automations a
           JOIN household_members m ON m.household_id = a.household_id AND m.user_id = $2
          WHERE a.automation_id = $1",
    )
    .bind(id)
    .bind(viewer)
    .fetch_optional(pool)
    .await
}

/// A household's time zone as set (`None`: never set, UTC; the outer
/// `None`: no such household).
pub async fn time_zone(pool: &PgPool, household: Uuid) -> Result<Option<Option<String>>, sqlx::Error> {
    sqlx::query_scalar("SELECT time_zone FROM households WHERE household_id = $1").bind(household).fetch_optional(pool).await
}

#[derive(Debug, sqlx::FromRow)]
pub struct RunRow {
    pub run_id: Uuid,
    pub started_at: DateTime<Utc>,
    pub trigger: i32,
    pub what: String,
    pub cause: Option<Uuid>,
    pub conditions: Value,
    pub outcome: String,
    pub reason: Option<String>,
    pub steps: Value,
    pub finished_at: Option<DateTime<Utc>>,
}

/// An automation's runs, newest first, after the run `after` (its page's last).
pub async fn runs(pool: &PgPool, automation: Uuid, after: Option<Uuid>, limit: i64) -> Result<Vec<RunRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT run_id, started_at, trigger, what, cause, conditions, outcome, reason, steps, finished_at FROM automation_runs
          WHERE automation_id = $1
            AND ($3::uuid IS NULL OR (started_at, run_id) <
                 (SELECT started_at, run_id FROM automation_runs WHERE run_id = $3 AND automation_id = $1))
          ORDER BY started_at DESC, run_id DESC LIMIT $2",
    )
    .bind(automation)
    .bind(limit)
    .bind(after)
    .fetch_all(pool)
    .await
}
