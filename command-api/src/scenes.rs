//! Scenes: create, change, delete (owners and adults; household commands on
//! the write path) and activate (any member the scene allows: one
//! `SceneActivated` and one command per device on the commands topic, each
//! command caused by the activation).

use crate::audit::audit_denied;
use crate::caller::{path_id, Caller};
use crate::problem::{ApiError, Body, Problem};
use crate::write_path::HouseholdCommand;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use homelink_events::event::{ActivatedCommand, SceneActivated, SceneChanged, SceneCreated, SceneDeleted};
use homelink_events::household::{Action, Household, Violation};
use homelink_events::scene::{self, NotActivated, SceneTarget};
use homelink_events::{Envelope, Event};
use homelink_read_model::load_household;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

/// One device's part of a scene (the OpenAPI shape of [`SceneTarget`]).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SceneDevice {
    pub device_id: Uuid,
    /// The values the device takes, validated like a command's `set`.
    #[schema(schema_with = crate::commands::set_schema)]
    pub set: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateScene {
    /// 1 to 80 characters, no control characters, no whitespace at either
    /// end; unique in the household (ignoring case).
    #[schema(
        min_length = 1,
        max_length = 80,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$"
    )]
    pub name: String,
    /// 1 to 100 devices of the household, each once.
    #[schema(min_items = 1, max_items = 100)]
    pub devices: Vec<SceneDevice>,
    /// Whether a child may activate it (only if a child may control every device in it).
    #[serde(default)]
    pub child_allowed: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChangeScene {
    #[schema(
        min_length = 1,
        max_length = 80,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$"
    )]
    pub name: Option<String>,
    #[schema(min_items = 1, max_items = 100)]
    pub devices: Option<Vec<SceneDevice>>,
    pub child_allowed: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SceneView {
    pub scene_id: Uuid,
    pub household_id: Uuid,
    pub name: String,
    pub devices: Vec<SceneDevice>,
    pub child_allowed: bool,
}

fn targets(devices: Vec<SceneDevice>) -> Vec<SceneTarget> {
    devices.into_iter().map(|d| SceneTarget { device_id: d.device_id, set: d.set }).collect()
}

fn view(household_id: Uuid, scene_id: Uuid, name: String, targets: Vec<SceneTarget>, child_allowed: bool) -> SceneView {
    let devices = targets.into_iter().map(|t| SceneDevice { device_id: t.device_id, set: t.set }).collect();
    SceneView { scene_id, household_id, name, devices, child_allowed }
}

/// The targets checked against the household, as the decision's violation.
fn checked(current: &Household, mut t: Vec<SceneTarget>) -> Result<Vec<SceneTarget>, Violation> {
    scene::check_targets(current, &mut t).map_err(Violation::InvalidScene)?;
    Ok(t)
}

/// Makes a scene (owners and adults).
#[utoipa::path(post, path = "/v1/households/{householdId}/scenes", tag = "scenes", operation_id = "create_scene", request_body = CreateScene, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 201, body = SceneView),
        (status = 400, description = "against the schema; `path` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a scene of this name exists, or the household changed meanwhile", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a device the household does not have (or named twice), or a capability its kind lacks; `path` names it", body = Problem, content_type = "application/problem+json")))]
pub async fn create(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    body: Body<CreateScene>,
) -> Result<(StatusCode, Json<SceneView>), ApiError> {
    let h = path_id(&household)?;
    let CreateScene { name, devices, child_allowed } = body.0;
    let name = crate::validate::name(&name, "name")?;
    let scene_id = crate::idempotency::derived_id("scene").unwrap_or_else(Uuid::now_v7);
    let cmd = HouseholdCommand {
        household: h,
        action: "scene.create",
        target: Some(format!("scene/{scene_id}")),
        invitation: None,
        requires: Some(Action::ManageDevices),
        open_to_non_members: false,
    };
    let mut stored = Vec::new();
    let wanted = targets(devices);
    s.write_household(&who, cmd, |current, _| {
        stored = checked(current, wanted)?;
        Ok(Event::SceneCreated(SceneCreated { scene_id, name: name.clone(), devices: stored.clone(), child_allowed }))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view(h, scene_id, name, stored, child_allowed))))
}

/// Renames or changes a scene (owners and adults): the fields given replace
/// the scene's (a `null` field is not given; none given changes nothing).
#[utoipa::path(patch, path = "/v1/households/{householdId}/scenes/{sceneId}", tag = "scenes", operation_id = "change_scene", request_body = ChangeScene, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("sceneId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = SceneView),
        (status = 400, description = "against the schema; `path` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a scene of this name exists, or the household changed meanwhile", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a device the household does not have (or named twice), or a capability its kind lacks; `path` names it", body = Problem, content_type = "application/problem+json")))]
pub async fn change(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, scene)): Path<(String, String)>,
    body: Body<ChangeScene>,
) -> Result<Json<SceneView>, ApiError> {
    let (h, scene_id) = (path_id(&household)?, path_id(&scene)?);
    let ChangeScene { name, devices, child_allowed } = body.0;
    let name = name.map(|n| crate::validate::name(&n, "name")).transpose()?;
    let cmd = HouseholdCommand {
        household: h,
        action: "scene.change",
        target: Some(format!("scene/{scene_id}")),
        invitation: None,
        requires: Some(Action::ManageDevices),
        open_to_non_members: false,
    };
    if name.is_none() && devices.is_none() && child_allowed.is_none() {
        // No field given (`{}`, or every one `null`): nothing changes,
        // nothing is appended; the answer is the scene as it is.
        s.authorize_household(&who, &cmd).await?;
        let mut conn = s.pool.acquire().await.map_err(ApiError::db)?;
        let current = load_household(&mut conn, h, None).await.map_err(ApiError::db)?;
        let sc = current.scenes.get(&scene_id).ok_or(ApiError::NotFound)?;
        return Ok(Json(view(h, scene_id, sc.name.clone(), sc.targets.clone(), sc.child_allowed)));
    }
    let wanted = devices.map(targets);
    let mut after = None;
    s.write_household(&who, cmd, |current, _| {
        let old = current.scenes.get(&scene_id).ok_or(Violation::UnknownScene)?;
        let devices = match wanted {
            Some(t) => checked(current, t)?,
            None => old.targets.clone(),
        };
        let ev = SceneChanged {
            scene_id,
            name: name.unwrap_or_else(|| old.name.clone()),
            devices,
            child_allowed: child_allowed.unwrap_or(old.child_allowed),
        };
        after = Some(view(h, scene_id, ev.name.clone(), ev.devices.clone(), ev.child_allowed));
        Ok(Event::SceneChanged(ev))
    })
    .await?;
    after.map(Json).ok_or_else(|| ApiError::Internal("a scene change decided nothing".into()))
}

/// Deletes a scene (owners and adults).
#[utoipa::path(delete, path = "/v1/households/{householdId}/scenes/{sceneId}", tag = "scenes", operation_id = "delete_scene", security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("sceneId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 204, description = "deleted"), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn delete(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, scene)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (h, scene_id) = (path_id(&household)?, path_id(&scene)?);
    let cmd = HouseholdCommand {
        household: h,
        action: "scene.delete",
        target: Some(format!("scene/{scene_id}")),
        invitation: None,
        requires: Some(Action::ManageDevices),
        open_to_non_members: false,
    };
    s.write_household(&who, cmd, |current, _| {
        current.scenes.get(&scene_id).ok_or(Violation::UnknownScene)?;
        Ok(Event::SceneDeleted(SceneDeleted { scene_id }))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivatedDevice {
    pub device_id: Uuid,
    pub command_id: Uuid,
    /// `requested`, or `queued` when the device is offline.
    pub status: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedDevice {
    pub device_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SceneActivationAccepted {
    pub activation_id: Uuid,
    pub scene_id: Uuid,
    /// One command per device, in the scene's order; follow them (and the
    /// activation's progress) with GraphQL `sceneActivation(id)` or the
    /// household subscription.
    pub commands: Vec<ActivatedDevice>,
    /// Devices of the scene that got no command, each with why.
    pub skipped: Vec<SkippedDevice>,
    /// For a GraphQL read that must show these commands.
    pub consistency_token: String,
}

/// Activates a scene: one command per device, through the same path,
/// lifecycle and idempotency as a single command (each lives 30 s). Owners
/// and adults may activate any scene; a child only a `childAllowed` one
/// whose every device a child may control.
#[utoipa::path(post, path = "/v1/households/{householdId}/scenes/{sceneId}/activate", tag = "scenes", operation_id = "activate_scene", security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("sceneId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 202, body = SceneActivationAccepted), (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate-limited like the commands it sends", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
pub async fn activate(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, scene)): Path<(String, String)>,
) -> Result<(StatusCode, Json<SceneActivationAccepted>), ApiError> {
    let (h, scene_id) = (path_id(&household)?, path_id(&scene)?);
    let mut conn = s.pool.acquire().await.map_err(ApiError::db)?;
    let current = load_household(&mut conn, h, None).await.map_err(ApiError::db)?;
    drop(conn);
    let Some(role) = current.role_of(who.user) else {
        return Err(ApiError::NotFound);
    };
    let target = Some(format!("scene/{scene_id}"));
    let devices: Vec<Uuid> = current.scenes.get(&scene_id).map(|sc| sc.targets.iter().map(|t| t.device_id).collect()).unwrap_or_default();
    let online = homelink_read_model::devices_online(&s.pool, &devices).await.map_err(ApiError::db)?;
    let now = Utc::now();
    let decided = scene::activate(
        &current,
        scene_id,
        role,
        None,
        now,
        |d| online.contains(&d),
        |d| crate::idempotency::derived_id(&format!("command/{d}")).unwrap_or_else(Uuid::now_v7),
    );
    let activation = match decided {
        Ok(a) => a,
        Err(NotActivated::UnknownScene) => return Err(ApiError::NotFound),
        Err(NotActivated::Forbidden(why)) => {
            let e = ApiError::Forbidden(why);
            audit_denied(&s, &who, h, Some(role), "scene.activate", target, &e);
            return Err(e);
        }
    };
    for c in &activation.commands {
        if let Err(e) = s.limiters.check(who.user, c.device_id) {
            s.metrics.errors.with_label_values(&["rate_limited"]).inc();
            audit_denied(&s, &who, h, Some(role), "scene.activate", target, &e);
            return Err(e);
        }
    }
    let activation_id = crate::idempotency::derived_id("activation").unwrap_or_else(Uuid::now_v7);
    let commands: Vec<ActivatedCommand> =
        activation.commands.iter().map(|c| ActivatedCommand { device_id: c.device_id, command_id: c.command_id }).collect();
    let accepted = SceneActivationAccepted {
        activation_id,
        scene_id,
        commands: activation
            .commands
            .iter()
            .map(|c| ActivatedDevice {
                device_id: c.device_id,
                command_id: c.command_id,
                status: if c.queued { "queued" } else { "requested" }.into(),
            })
            .collect(),
        skipped: activation.skipped.iter().map(|k| SkippedDevice { device_id: k.device_id, reason: k.reason.clone() }).collect(),
        consistency_token: String::new(),
    };
    let meta = who.meta(Some(role));
    let mut envelopes = vec![Envelope::new(
        h,
        who.actor(),
        &Event::SceneActivated(SceneActivated { activation_id, scene_id, commands, skipped: activation.skipped.clone() }),
        now,
    )
    .with_correlation(activation_id)
    .with_meta(meta.clone())];
    for c in activation.commands {
        let id = c.command_id;
        envelopes.push(
            Envelope::new(h, who.actor(), &Event::DeviceCommandRequested(c), now)
                .with_causation(activation_id)
                .with_correlation(id)
                .with_meta(meta.clone()),
        );
    }
    s.append_all(&s.topics.commands(), &envelopes).await?;
    let mut written = homelink_kit::consistency::Written::default();
    for c in &accepted.commands {
        written.command(h, c.command_id);
    }
    let mut accepted = accepted;
    accepted.consistency_token = s.keys.sign_consistency(who.user, &written).unwrap_or_default();
    s.metrics.messages_out.with_label_values(&["scene_activated"]).inc();
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}
