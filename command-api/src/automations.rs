//! Automations (create / replace / delete; owners and adults) and the
//! household's time zone (owners and adults), each a household command on
//! the write path. A definition is validated against the household
//! ([`homelink_events::automation::validate`]) under the write lock, so
//! nothing is stored when any part of it is wrong.

use crate::caller::{path_id, Caller};
use crate::problem::{ApiError, Body, Problem};
use crate::write_path::HouseholdCommand;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use homelink_events::automation::{self, Definition};
use homelink_events::event::{AutomationChanged, AutomationCreated, AutomationDeleted, HouseholdTimeZoneSet};
use homelink_events::household::{Action, Violation};
use homelink_events::Event;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SaveAutomation {
    /// 1 to 80 characters, no control characters, no whitespace at either
    /// end; unique in the household (ignoring case).
    #[schema(
        min_length = 1,
        max_length = 80,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$"
    )]
    pub name: String,
    /// Whether it runs (default true).
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    pub definition: Definition,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutomationView {
    pub automation_id: Uuid,
    pub household_id: Uuid,
    pub name: String,
    pub enabled: bool,
    /// Whose rights it acts with, at the moment it runs.
    pub created_by: Uuid,
    pub definition: Definition,
}

/// Makes an automation (owners and adults). It acts with the creator's
/// rights at the moment it runs.
#[utoipa::path(post, path = "/v1/households/{householdId}/automations", tag = "automations", operation_id = "create_automation",
    request_body = SaveAutomation, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 201, body = AutomationView),
        (status = 400, description = "against the schema; `path` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "an automation of this name exists, or the household changed meanwhile", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not for this household (a device, scene or member it lacks, a value out of a capability's range); `path` names it", body = Problem, content_type = "application/problem+json")))]
pub async fn create(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    body: Body<SaveAutomation>,
) -> Result<(StatusCode, Json<AutomationView>), ApiError> {
    let h = path_id(&household)?;
    let SaveAutomation { name, enabled, definition } = body.0;
    let name = crate::validate::name(&name, "name")?;
    let automation_id = crate::idempotency::derived_id("automation").unwrap_or_else(Uuid::now_v7);
    let cmd = HouseholdCommand {
        household: h,
        action: "automation.create",
        target: Some(format!("automation/{automation_id}")),
        invitation: None,
        requires: Some(Action::ManageDevices),
        open_to_non_members: false,
    };
    let created_by = who.user;
    let mut stored = None;
    s.write_household(&who, cmd, |current, _| {
        let definition = automation::validate(current, definition).map_err(Violation::InvalidAutomation)?;
        stored = Some(definition.clone());
        Ok(Event::AutomationCreated(AutomationCreated { automation_id, name: name.clone(), enabled, created_by, definition }))
    })
    .await?;
    let definition = stored.ok_or_else(|| ApiError::Internal("an automation decided nothing".into()))?;
    Ok((StatusCode::CREATED, Json(AutomationView { automation_id, household_id: h, name, enabled, created_by, definition })))
}

/// Replaces an automation's name, `enabled` and definition (owners and
/// adults). Its creator stays its creator.
#[utoipa::path(put, path = "/v1/households/{householdId}/automations/{automationId}", tag = "automations", operation_id = "replace_automation",
    request_body = SaveAutomation, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("automationId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = AutomationView),
        (status = 400, description = "against the schema; `path` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "an automation of this name exists, or the household changed meanwhile", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not for this household; `path` names it", body = Problem, content_type = "application/problem+json")))]
pub async fn replace(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, automation)): Path<(String, String)>,
    body: Body<SaveAutomation>,
) -> Result<Json<AutomationView>, ApiError> {
    let (h, automation_id) = (path_id(&household)?, path_id(&automation)?);
    let SaveAutomation { name, enabled, definition } = body.0;
    let name = crate::validate::name(&name, "name")?;
    let cmd = HouseholdCommand {
        household: h,
        action: "automation.change",
        target: Some(format!("automation/{automation_id}")),
        invitation: None,
        requires: Some(Action::ManageDevices),
        open_to_non_members: false,
    };
    let mut stored = None;
    s.write_household(&who, cmd, |current, _| {
        let old = current.automations.get(&automation_id).ok_or(Violation::UnknownAutomation)?;
        let definition = automation::validate(current, definition).map_err(Violation::InvalidAutomation)?;
        stored = Some((definition.clone(), old.created_by));
        Ok(Event::AutomationChanged(AutomationChanged { automation_id, name: name.clone(), enabled, definition }))
    })
    .await?;
    let (definition, created_by) = stored.ok_or_else(|| ApiError::Internal("an automation decided nothing".into()))?;
    Ok(Json(AutomationView { automation_id, household_id: h, name, enabled, created_by, definition }))
}

/// Deletes an automation (owners and adults).
#[utoipa::path(delete, path = "/v1/households/{householdId}/automations/{automationId}", tag = "automations", operation_id = "delete_automation",
    security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("automationId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 204, description = "deleted"), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn delete(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, automation)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (h, automation_id) = (path_id(&household)?, path_id(&automation)?);
    let cmd = HouseholdCommand {
        household: h,
        action: "automation.delete",
        target: Some(format!("automation/{automation_id}")),
        invitation: None,
        requires: Some(Action::ManageDevices),
        open_to_non_members: false,
    };
    s.write_household(&who, cmd, |current, _| {
        current.automations.get(&automation_id).ok_or(Violation::UnknownAutomation)?;
        Ok(Event::AutomationDeleted(AutomationDeleted { automation_id }))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every IANA time zone name this build knows, for the document.
fn time_zone_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(chrono_tz::TZ_VARIANTS.iter().map(|z| z.name())))
        .description(Some("An IANA time zone name, e.g. Europe/Berlin."))
        .build()
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeZone {
    #[schema(schema_with = time_zone_schema)]
    pub time_zone: String,
}

/// Sets the household's time zone (owners and adults): schedules and time
/// conditions are read in it (UTC until set).
#[utoipa::path(put, path = "/v1/households/{householdId}/time-zone", tag = "automations", operation_id = "set_time_zone",
    request_body = TimeZone, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = TimeZone),
        (status = 400, description = "not an IANA time zone name", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn set_time_zone(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    body: Body<TimeZone>,
) -> Result<Json<TimeZone>, ApiError> {
    let h = path_id(&household)?;
    let time_zone = body.0.time_zone;
    let zone: chrono_tz::Tz = time_zone.parse().map_err(|_| {
        ApiError::InvalidAt("/timeZone".into(), format!("unknown time zone `{time_zone}` (an IANA name such as Europe/Berlin)"))
    })?;
    let name = zone.name().to_owned();
    let cmd = HouseholdCommand {
        household: h,
        action: "household.time-zone",
        target: None,
        invitation: None,
        requires: Some(Action::ManageDevices),
        open_to_non_members: false,
    };
    let tz = name.clone();
    s.write_household(&who, cmd, move |_, _| Ok(Event::HouseholdTimeZoneSet(HouseholdTimeZoneSet { time_zone: tz }))).await?;
    Ok(Json(TimeZone { time_zone: name }))
}
