//! Households and members: create, invite, accept, change a role, remove,
//! leave. Each is a household command on the write path (`write_path.rs`).

use crate::auth::sha256_hex;
use crate::caller::{path_id, Caller};
use crate::problem::{ApiError, Body, Problem};
use crate::write_path::HouseholdCommand;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use homelink_events::event::{HouseholdCreated, MemberInvited, MemberJoined, MemberRemoved, MemberRoleChanged, PresenceChanged};
use homelink_events::household::{Action, Presence};
use homelink_events::{Envelope, Event, Role};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

/// `owner`, `adult` or `child` in the OpenAPI document.
pub fn role_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(Role::ALL.map(|r| r.as_str())))
        .description(Some("A member's role: see the roles table."))
        .build()
}

// ---- routes ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateHousehold {
    /// 1 to 80 characters, no control characters, no whitespace at either end.
    #[schema(
        min_length = 1,
        max_length = 80,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$"
    )]
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HouseholdCreatedResponse {
    pub household_id: Uuid,
    pub name: String,
    #[schema(schema_with = role_schema)]
    pub role: Role,
}

/// Creates a household; the caller becomes its first owner.
#[utoipa::path(post, path = "/v1/households", tag = "households", request_body = CreateHousehold, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 201, body = HouseholdCreatedResponse), (status = 400, body = Problem, content_type = "application/problem+json"), (status = 401, body = Problem, content_type = "application/problem+json")))]
pub async fn create(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    body: Body<CreateHousehold>,
) -> Result<(StatusCode, Json<HouseholdCreatedResponse>), ApiError> {
    let name = crate::validate::name(&body.0.name, "name")?;
    // With an Idempotency-Key the id comes from the key: a retry after an
    // append of unknown fate creates nothing new (the log refuses a second
    // `HouseholdCreated` of one household by its seq).
    let h = crate::idempotency::derived_id("household").unwrap_or_else(Uuid::now_v7);
    let ev = Event::HouseholdCreated(HouseholdCreated { name: name.clone(), created_by: Some(who.user) });
    let env = Envelope::new(h, who.actor(), &ev, Utc::now()).with_seq(1).with_meta(who.meta(Some(Role::Owner)));
    let mut conn = s.pool.acquire().await.map_err(ApiError::db)?;
    s.append_and_apply(&mut conn, &s.topics.households(), env, h, 1).await?;
    Ok((StatusCode::CREATED, Json(HouseholdCreatedResponse { household_id: h, name, role: Role::Owner })))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Invite {
    #[schema(schema_with = role_schema)]
    pub role: Role,
    /// Hours the invitation stays valid, 1–336 (default 72).
    #[schema(minimum = 1, maximum = 336)]
    #[serde(default, deserialize_with = "crate::validate::opt_whole")]
    pub ttl_hours: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvitationCreated {
    pub invitation_id: Uuid,
    /// The secret to hand to the invitee; shown once, stored only as a hash.
    pub code: String,
    #[schema(schema_with = role_schema)]
    pub role: Role,
    pub expires_at: DateTime<Utc>,
}

/// Invites someone with a role (owners only). The code can be used once.
#[utoipa::path(post, path = "/v1/households/{householdId}/invitations", tag = "households", request_body = Invite, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 201, body = InvitationCreated), (status = 400, body = Problem, content_type = "application/problem+json"), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn invite(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    body: Body<Invite>,
) -> Result<(StatusCode, Json<InvitationCreated>), ApiError> {
    let h = path_id(&household)?;
    let ttl = body.0.ttl_hours.unwrap_or(72);
    if !(1..=336).contains(&ttl) {
        return Err(ApiError::BadRequest("ttlHours must be between 1 and 336".into()));
    }
    let role = body.0.role;
    let code = crate::auth::secret();
    let invitation_id = crate::idempotency::derived_id("invitation").unwrap_or_else(Uuid::now_v7);
    let expires_at = Utc::now() + ChronoDuration::hours(i64::from(ttl));
    let cmd = HouseholdCommand {
        household: h,
        action: "member.invite",
        target: Some(format!("invitation/{invitation_id}")),
        invitation: None,
        requires: Some(Action::ManageMembers),
        open_to_non_members: false,
    };
    let code_hash = sha256_hex(code.as_bytes());
    s.write_household(&who, cmd, |_, _| Ok(Event::MemberInvited(MemberInvited { invitation_id, role, code_hash, expires_at }))).await?;
    Ok((StatusCode::CREATED, Json(InvitationCreated { invitation_id, code, role, expires_at })))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Accept {
    pub code: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    pub household_id: Uuid,
    pub user_id: Uuid,
    #[schema(schema_with = role_schema)]
    pub role: Role,
}

/// Accepts an invitation: the caller joins its household with its role.
#[utoipa::path(post, path = "/v1/invitations/accept", tag = "households", request_body = Accept, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = Membership), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "used, expired, or already a member", body = Problem, content_type = "application/problem+json")))]
pub async fn accept(State(s): State<Arc<AppState>>, Caller(who): Caller, body: Body<Accept>) -> Result<Json<Membership>, ApiError> {
    let hash = sha256_hex(body.0.code.as_bytes());
    let row = homelink_read_model::registry::invitation_by_code(&s.pool, &hash).await.map_err(ApiError::db)?.ok_or(ApiError::NotFound)?;
    let (h, inv) = (row.household_id, row.invitation_id);
    let role: Role = row.role.parse().map_err(ApiError::Internal)?;
    let cmd = HouseholdCommand {
        household: h,
        action: "invitation.accept",
        target: Some(format!("invitation/{inv}")),
        invitation: Some(inv),
        requires: None,
        open_to_non_members: true,
    };
    let user = who.user;
    s.write_household(&who, cmd, |_, _| Ok(Event::MemberJoined(MemberJoined { user_id: user, role, invitation_id: Some(inv) }))).await?;
    Ok(Json(Membership { household_id: h, user_id: user, role }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChangeRole {
    #[schema(schema_with = role_schema)]
    pub role: Role,
}

/// Changes a member's role (owners only). The last owner cannot be demoted.
#[utoipa::path(put, path = "/v1/households/{householdId}/members/{userId}/role", tag = "households", request_body = ChangeRole,
    security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("userId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = Membership), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "last owner, or the household changed meanwhile", body = Problem, content_type = "application/problem+json")))]
pub async fn change_role(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, user)): Path<(String, String)>,
    body: Body<ChangeRole>,
) -> Result<Json<Membership>, ApiError> {
    let (h, u) = (path_id(&household)?, path_id(&user)?);
    let role = body.0.role;
    let cmd = HouseholdCommand {
        household: h,
        action: "member.role",
        target: Some(format!("user/{u}")),
        invitation: None,
        requires: Some(Action::ManageMembers),
        open_to_non_members: false,
    };
    s.write_household(&who, cmd, |_, _| Ok(Event::MemberRoleChanged(MemberRoleChanged { user_id: u, role }))).await?;
    crate::commands::revoke_lost_rights(&s, h, u).await;
    Ok(Json(Membership { household_id: h, user_id: u, role }))
}

/// Removes a member (owners only). The last owner cannot be removed.
#[utoipa::path(delete, path = "/v1/households/{householdId}/members/{userId}", tag = "households", operation_id = "remove_member", security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("userId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 204, description = "removed"), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "last owner, not a member, or the household changed meanwhile", body = Problem, content_type = "application/problem+json")))]
pub async fn remove(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (h, u) = (path_id(&household)?, path_id(&user)?);
    let cmd = HouseholdCommand {
        household: h,
        action: "member.remove",
        target: Some(format!("user/{u}")),
        invitation: None,
        requires: Some(Action::ManageMembers),
        open_to_non_members: false,
    };
    s.write_household(&who, cmd, |_, _| Ok(Event::MemberRemoved(MemberRemoved { user_id: u, left: false }))).await?;
    crate::commands::revoke_lost_rights(&s, h, u).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Leaves a household (any member; an owner only while another owner remains).
#[utoipa::path(post, path = "/v1/households/{householdId}/leave", tag = "households", security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 204, description = "left"), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the last owner cannot leave", body = Problem, content_type = "application/problem+json")))]
pub async fn leave(State(s): State<Arc<AppState>>, Caller(who): Caller, Path(household): Path<String>) -> Result<StatusCode, ApiError> {
    let h = path_id(&household)?;
    let user = who.user;
    let cmd = HouseholdCommand {
        household: h,
        action: "member.leave",
        target: Some(format!("user/{user}")),
        invitation: None,
        requires: None,
        open_to_non_members: false,
    };
    s.write_household(&who, cmd, |_, _| Ok(Event::MemberRemoved(MemberRemoved { user_id: user, left: true }))).await?;
    crate::commands::revoke_lost_rights(&s, h, user).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `home` or `away` in the OpenAPI document.
fn presence_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["home", "away"]))
        .description(Some("Where the member is: `home` or `away`."))
        .build()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReportPresence {
    #[schema(schema_with = presence_schema)]
    pub state: Presence,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PresenceReported {
    pub household_id: Uuid,
    pub user_id: Uuid,
    #[schema(schema_with = presence_schema)]
    pub state: Presence,
    /// Members home after this report.
    pub members_home: u32,
}

/// Reports the caller's presence (any member; an app calls it from a
/// geofence). Automations react to arrivals and departures.
#[utoipa::path(put, path = "/v1/households/{householdId}/presence", tag = "households", request_body = ReportPresence,
    security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = PresenceReported), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the caller left the household meanwhile", body = Problem, content_type = "application/problem+json")))]
pub async fn report_presence(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    body: Body<ReportPresence>,
) -> Result<Json<PresenceReported>, ApiError> {
    let h = path_id(&household)?;
    let (user, state) = (who.user, body.0.state);
    let cmd = HouseholdCommand {
        household: h,
        action: "member.presence",
        target: Some(format!("user/{user}")),
        invitation: None,
        requires: None,
        open_to_non_members: false,
    };
    let mut home = 0;
    s.write_household(&who, cmd, |current, _| {
        let mut after = current.clone();
        after.presence.insert(user, state);
        home = after.members_home() as u32;
        Ok(Event::PresenceChanged(PresenceChanged { user_id: user, presence: state }))
    })
    .await?;
    Ok(Json(PresenceReported { household_id: h, user_id: user, state, members_home: home }))
}
