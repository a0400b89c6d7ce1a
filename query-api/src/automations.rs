//! Automations as GraphQL shows them (every member sees them; owners and
//! adults change them through the command API).

use crate::reads::RowBudget;
use async_graphql::{ComplexObject, Context, Json, SimpleObject, ID};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Automation {
    pub id: ID,
    #[graphql(skip)]
    pub uuid: Uuid,
    pub name: String,
    pub enabled: bool,
    /// Whose rights it acts with, at the moment it runs.
    pub created_by: ID,
    /// Triggers, conditions, actions and mode, as stored (see the command
    /// API's `Definition` schema).
    pub definition: Json<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the engine's breaker paused it (it fired too often); nothing
    /// starts until it is saved again. `null` when it is not paused.
    pub paused_at: Option<DateTime<Utc>>,
    pub paused_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct AutomationRow {
    automation_id: Uuid,
    name: String,
    enabled: bool,
    created_by: Uuid,
    definition: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    paused_at: Option<DateTime<Utc>>,
    paused_reason: Option<String>,
}

impl From<AutomationRow> for Automation {
    fn from(r: AutomationRow) -> Self {
        Self {
            id: ID(r.automation_id.to_string()),
            uuid: r.automation_id,
            name: r.name,
            enabled: r.enabled,
            created_by: ID(r.created_by.to_string()),
            definition: Json(r.definition),
            created_at: r.created_at,
            updated_at: r.updated_at,
            paused_at: r.paused_at,
            paused_reason: r.paused_reason,
        }
    }
}

/// The household's automations, by name.
pub async fn of_household(pool: &PgPool, budget: &RowBudget, household: Uuid) -> async_graphql::Result<Vec<Automation>> {
    let rows = budget
        .read(None, |limit| {
            sqlx::query_as::<_, AutomationRow>(
                "SELECT automation_id, name, enabled, created_by, definition, created_at, updated_at, paused_at, paused_reason FROM automations
                  WHERE household_id = $1 ORDER BY lower(name), automation_id LIMIT $2",
            )
            .bind(household)
            .bind(limit)
            .fetch_all(pool)
        })
        .await?;
    Ok(rows.into_iter().map(Automation::from).collect())
}

/// An automation of a household the viewer belongs to (`None` otherwise,
/// exactly as for an id that does not exist).
pub async fn one(pool: &PgPool, budget: &RowBudget, id: Uuid, viewer: Uuid) -> async_graphql::Result<Option<Automation>> {
    let row = budget
        .read_one(|| {
            sqlx::query_as::<_, AutomationRow>(
                "SELECT a.automation_id, a.name, a.enabled, a.created_by, a.definition, a.created_at, a.updated_at, a.paused_at,
                        a.paused_reason FROM automations a
                   JOIN household_members m ON m.household_id = a.household_id AND m.user_id = $2
                  WHERE a.automation_id = $1",
            )
            .bind(id)
            .bind(viewer)
            .fetch_optional(pool)
        })
        .await?;
    Ok(row.map(Automation::from))
}

/// The household's time zone (`UTC` until one is set).
pub async fn time_zone(pool: &PgPool, budget: &RowBudget, household: Uuid) -> async_graphql::Result<String> {
    let tz: Option<Option<String>> = budget
        .read_one(|| sqlx::query_scalar("SELECT time_zone FROM households WHERE household_id = $1").bind(household).fetch_optional(pool))
        .await?;
    Ok(tz.flatten().unwrap_or_else(|| "UTC".into()))
}

/// One run of an automation: what fired it, each condition as judged, each
/// step with its commands and outcome.
#[derive(SimpleObject)]
pub struct AutomationRun {
    pub id: ID,
    pub started_at: DateTime<Utc>,
    /// The trigger's index in the definition, and what it saw.
    pub trigger: i32,
    pub what: String,
    /// The event that fired it (absent for a schedule).
    pub cause: Option<ID>,
    /// `[{path, held, value}]`, every condition judged.
    pub conditions: Json<Value>,
    /// `run` while going; `done`, `stopped`, `failed`; or `conditions`,
    /// `skipped`, `queued`, `missed` when it did not run.
    pub outcome: String,
    pub reason: Option<String>,
    /// `[{step, outcome, commands, detail, at}]`, in order; a command's
    /// lifecycle is `command(id)`.
    pub steps: Json<Value>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    run_id: Uuid,
    started_at: DateTime<Utc>,
    trigger: i32,
    what: String,
    cause: Option<Uuid>,
    conditions: Value,
    outcome: String,
    reason: Option<String>,
    steps: Value,
    finished_at: Option<DateTime<Utc>>,
}

/// Most runs one page holds.
pub const MAX_RUNS: i32 = 100;

#[ComplexObject]
impl Automation {
    /// Its runs, newest first; `after` (a run's id from the previous page)
    /// continues after that run.
    async fn runs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: i32,
        after: Option<ID>,
    ) -> async_graphql::Result<Vec<AutomationRun>> {
        let (pool, budget) = (ctx.data::<PgPool>()?, crate::reads::budget(ctx)?);
        let first = i64::from(first.clamp(0, MAX_RUNS));
        let after = match after {
            None => None,
            Some(a) => {
                Some(Uuid::parse_str(&a).map_err(|_| crate::errors::error(crate::errors::codes::BAD_USER_INPUT, "after: not a run id"))?)
            }
        };
        let rows = budget
            .read(None, |limit| {
                sqlx::query_as::<_, RunRow>(
                    "SELECT run_id, started_at, trigger, what, cause, conditions, outcome, reason, steps, finished_at FROM automation_runs r
                      WHERE automation_id = $1
                        AND ($4::uuid IS NULL OR (started_at, run_id) <
                             (SELECT started_at, run_id FROM automation_runs WHERE run_id = $4 AND automation_id = $1))
                      ORDER BY started_at DESC, run_id DESC LIMIT LEAST($2, $3)",
                )
                .bind(self.uuid)
                .bind(first)
                .bind(limit)
                .bind(after)
                .fetch_all(pool)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| AutomationRun {
                id: ID(r.run_id.to_string()),
                started_at: r.started_at,
                trigger: r.trigger,
                what: r.what,
                cause: r.cause.map(|c| ID(c.to_string())),
                conditions: Json(r.conditions),
                outcome: r.outcome,
                reason: r.reason,
                steps: Json(r.steps),
                finished_at: r.finished_at,
            })
            .collect())
    }
}
