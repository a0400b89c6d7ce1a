//! Automations as GraphQL shows them (every member sees them; owners and
//! adults change them through the command API).

use crate::reads::RowBudget;
use async_graphql::{Json, SimpleObject, ID};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(SimpleObject)]
pub struct Automation {
    pub id: ID,
    pub name: String,
    pub enabled: bool,
    /// Whose rights it acts with, at the moment it runs.
    pub created_by: ID,
    /// Triggers, conditions, actions and mode, as stored (see the command
    /// API's `Definition` schema).
    pub definition: Json<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
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
}

/// The household's automations, by name.
pub async fn of_household(pool: &PgPool, budget: &RowBudget, household: Uuid) -> async_graphql::Result<Vec<Automation>> {
    let rows = budget
        .read(None, |limit| {
            sqlx::query_as::<_, AutomationRow>(
                "SELECT automation_id, name, enabled, created_by, definition, created_at, updated_at FROM automations
                  WHERE household_id = $1 ORDER BY lower(name), automation_id LIMIT $2",
            )
            .bind(household)
            .bind(limit)
            .fetch_all(pool)
        })
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Automation {
            id: ID(r.automation_id.to_string()),
            name: r.name,
            enabled: r.enabled,
            created_by: ID(r.created_by.to_string()),
            definition: Json(r.definition),
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
        .collect())
}

/// The household's time zone (`UTC` until one is set).
pub async fn time_zone(pool: &PgPool, budget: &RowBudget, household: Uuid) -> async_graphql::Result<String> {
    let tz: Option<Option<String>> = budget
        .read_one(|| sqlx::query_scalar("SELECT time_zone FROM households WHERE household_id = $1").bind(household).fetch_optional(pool))
        .await?;
    Ok(tz.flatten().unwrap_or_else(|| "UTC".into()))
}
