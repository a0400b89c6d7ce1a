//! Automations as GraphQL shows them (every member sees them; owners and
//! adults change them through the command API).

use crate::reads::RowBudget;
use async_graphql::{ComplexObject, Context, Json, SimpleObject, ID};
use chrono::{DateTime, Utc};
use homelink_read_model::routines::{self, AutomationRow};
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
    let rows = budget.read(None, |limit| routines::automations(pool, household, limit)).await?;
    Ok(rows.into_iter().map(Automation::from).collect())
}

/// An automation of a household the viewer belongs to (`None` otherwise,
/// exactly as for an id that does not exist).
pub async fn one(pool: &PgPool, budget: &RowBudget, id: Uuid, viewer: Uuid) -> async_graphql::Result<Option<Automation>> {
    let row = budget.read_one(|| routines::automation(pool, id, viewer)).await?;
    Ok(row.map(Automation::from))
}

/// The household's time zone (`UTC` until one is set).
pub async fn time_zone(pool: &PgPool, budget: &RowBudget, household: Uuid) -> async_graphql::Result<String> {
    let tz: Option<Option<String>> = budget.read_one(|| routines::time_zone(pool, household)).await?;
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
        let rows = budget.read(Some(first), |limit| routines::runs(pool, self.uuid, after, limit)).await?;
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
