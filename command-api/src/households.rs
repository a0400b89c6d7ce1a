//! Households and members: create, invite, accept, change a role, remove,
//! leave — and the one write path every household command takes.
//!
//! **Consistency** ([`HouseholdWriter::write`]): a household's commands are
//! serialized by a Postgres advisory lock on the household id, held from the
//! decision until the projector applied the new event. Under the lock the
//! writer first waits until the read model covers the household's whole Kafka
//! partition (high watermark), then loads the aggregate, decides with the pure
//! [`Household::apply`], appends with `seq = version + 1`, and waits for the
//! read model to show that version. Two concurrent commands thus decide one
//! after the other against the state the first produced; the loser gets 409.
//! Should an event still be decided on a stale version (an append whose 503
//! answer raced with its late arrival), the projector's fold refuses it by its
//! `seq`, the same way on every rebuild.
//!
//! Authorization is checked twice: against the state before the lock (404 for
//! a non-member, exactly as for a household that does not exist; 403 for a
//! role that may not), and again by the decision under the lock, where a
//! change made meanwhile (you were demoted) is a 409.

use crate::auth::{sha256_hex, Authenticated};
use crate::problem::{ApiError, Body, Problem};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use homelink_events::event::{CommandDenied, HouseholdCreated, MemberInvited, MemberJoined, MemberRemoved, MemberRoleChanged};
use homelink_events::household::{Action, Household, Violation};
use homelink_events::{Actor, Envelope, Event, RequestMeta, Role};
use homelink_kit::push::Located;
use homelink_read_model::load_household;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};
use std::sync::Arc;
use std::time::{Duration, Instant};
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

/// Who is asking, as the audit log records it.
#[derive(Debug, Clone)]
pub struct Requester {
    pub user: Uuid,
    pub client: Option<String>,
}

impl Requester {
    pub fn actor(&self) -> Actor {
        Actor::User(self.user.to_string())
    }

    pub fn meta(&self, role: Option<Role>) -> RequestMeta {
        RequestMeta { role, client: self.client.clone() }
    }
}

/// Extracts the authenticated caller and their client.
pub struct Caller(pub Requester);

impl axum::extract::FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let Authenticated(c) = Authenticated::from_request_parts(parts, s).await?;
        Ok(Caller(Requester { user: c.user_id, client: crate::auth::client_of(parts) }))
    }
}

/// A parsed path id; a malformed one is simply a resource that does not exist.
pub fn path_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::NotFound)
}

/// Records a refused command in the audit log (best effort: appended in the
/// background so a refusal is answered at once).
pub fn audit_denied(
    s: &AppState,
    who: &Requester,
    household: Uuid,
    role: Option<Role>,
    action: &str,
    target: Option<String>,
    err: &ApiError,
) {
    let status = err.parts().0.as_u16();
    let denied = CommandDenied { action: action.to_owned(), target, status, reason: err.to_string() };
    let env = Envelope::new(household, who.actor(), &Event::CommandDenied(denied), Utc::now()).with_meta(who.meta(role));
    let (appender, topic, metrics) = (s.appender.clone(), s.topics.audit(), s.metrics.clone());
    metrics.errors.with_label_values(&["command_denied"]).inc();
    tokio::spawn(async move {
        if let Err(e) = appender.append(&topic, &env).await {
            tracing::warn!(error = %e, "could not record a denied command");
            metrics.errors.with_label_values(&["audit_append"]).inc();
        }
    });
}

/// The outcome of a household write.
pub struct Written {
    pub version: u64,
}

/// A household command: the rule before the lock, and the decision under it.
pub struct HouseholdCommand<'a> {
    pub household: Uuid,
    pub action: &'static str,
    pub target: Option<String>,
    /// The invitation the decision needs to see, if any.
    pub invitation: Option<Uuid>,
    /// Who may even try: `None` = any member; `Some(a)` = roles allowing `a`.
    /// Non-members get 404 unless `open_to_non_members`.
    pub requires: Option<Action<'a>>,
    pub open_to_non_members: bool,
}

fn conflict(v: &Violation) -> ApiError {
    let slug = match v {
        // A device or room the household does not have: like any missing resource.
        Violation::UnknownDevice | Violation::UnknownRoom => return ApiError::NotFound,
        Violation::DeviceRemoved => "device-removed",
        Violation::DeviceExists => "device-exists",
        Violation::RoomNameTaken => "room-name-taken",
        Violation::LastOwner => "last-owner",
        Violation::StaleVersion { .. } => "stale-version",
        Violation::NotAMember => "not-a-member",
        Violation::AlreadyMember => "already-member",
        Violation::UnknownInvitation => "unknown-invitation",
        Violation::InvitationUsed => "invitation-used",
        Violation::InvitationExpired => "invitation-expired",
        Violation::SameRole => "same-role",
        Violation::AlreadyExists | Violation::NoHousehold => "conflict",
    };
    ApiError::Conflict(slug, v.to_string())
}

/// Longest a household write waits for the projector to apply its event.
const APPLY_WAIT: Duration = Duration::from_secs(30);

/// In-process lock stripes for household writes.
pub const HOUSEHOLD_STRIPES: usize = 256;

/// Advisory-lock key of a household.
fn lock_key(h: Uuid) -> i64 {
    let b = h.as_bytes();
    i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) ^ 0x486f_6d65_4c69_6e6b
}

impl AppState {
    /// Runs one household command; `decide` turns the fresh aggregate into the event.
    pub async fn write_household(
        &self,
        who: &Requester,
        cmd: HouseholdCommand<'_>,
        decide: impl FnOnce(&Household, Option<Role>) -> Result<Event, Violation>,
    ) -> Result<Written, ApiError> {
        let h = cmd.household;
        // 1. Before the lock: existence, membership and role.
        self.authorize_household(who, &cmd).await?;

        // 2. Under the lock: catch up, decide, append, wait until applied. The
        // in-process stripe lock queues this instance's requests without each
        // holding a Postgres connection; the advisory lock serializes instances.
        let _local = self.household_stripes[(lock_key(h) as u64 % HOUSEHOLD_STRIPES as u64) as usize].lock().await;
        let mut tx = self.pool.begin().await.map_err(ApiError::db)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lock_key(h)).execute(&mut *tx).await.map_err(ApiError::db)?;
        self.wait_caught_up(&mut tx, h).await?;
        let current = load_household(&mut tx, h, cmd.invitation).await.map_err(ApiError::db)?;
        let role_now = current.role_of(who.user);
        let allowed_now = match (role_now, cmd.requires.as_ref()) {
            (None, _) => cmd.open_to_non_members,
            (Some(r), Some(a)) => r.allows(a),
            (Some(_), None) => true,
        };
        let now = Utc::now();
        let decided = if allowed_now {
            decide(&current, role_now).and_then(|ev| {
                let next = current.version + 1;
                let he = ev.household_event().ok_or(Violation::NoHousehold)?;
                current.clone().apply(&he, Some(next), now).map(|_| ev)
            })
        } else {
            Err(Violation::NotAMember)
        };
        let event = match decided {
            Ok(ev) => ev,
            Err(v) => {
                let e = if allowed_now {
                    conflict(&v)
                } else {
                    ApiError::Conflict("role-changed", "your role in the household changed meanwhile".into())
                };
                audit_denied(self, who, h, role_now, cmd.action, cmd.target, &e);
                return Err(e);
            }
        };
        let version = current.version + 1;
        let env = Envelope::new(h, who.actor(), &event, now).with_seq(version).with_meta(who.meta(role_now));
        self.append_and_apply(&mut tx, &self.topics.households(), env, h, version).await?;
        tx.commit().await.map_err(ApiError::db)?;
        Ok(Written { version })
    }

    /// The check before the lock: 404 for a household that does not exist or
    /// a non-member (unless the command is open to them), 403 for a role that
    /// may not. Refusals on an existing household are audited; ids that do
    /// not exist leave no trace. Callers with side effects of their own (a
    /// serial claim) run it before them.
    pub async fn authorize_household(&self, who: &Requester, cmd: &HouseholdCommand<'_>) -> Result<(), ApiError> {
        let h = cmd.household;
        let mut conn = self.pool.acquire().await.map_err(ApiError::db)?;
        let before = load_household(&mut conn, h, None).await.map_err(ApiError::db)?;
        drop(conn);
        let role = before.role_of(who.user);
        let refused = if !before.exists || (role.is_none() && !cmd.open_to_non_members) {
            Some(ApiError::NotFound)
        } else if let (Some(r), Some(a)) = (role, cmd.requires.as_ref()) {
            (!r.allows(a)).then(|| ApiError::Forbidden(format!("a member with role {r} may not do this")))
        } else {
            None
        };
        match refused {
            Some(e) => {
                if before.exists {
                    audit_denied(self, who, h, role, cmd.action, cmd.target.clone(), &e);
                }
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Appends a household event, pushes it to the projector and waits until
    /// the read model shows `version`: a change is acknowledged only once it
    /// is in effect for authorization (a demoted member's next command sees
    /// the new role) and the caller reads their own write. Gives up after
    /// [`APPLY_WAIT`] with 503 (the event is in the log and will apply).
    pub async fn append_and_apply(&self, db: &mut PgConnection, topic: &str, env: Envelope, h: Uuid, version: u64) -> Result<(), ApiError> {
        let pos = self.append(topic, &env).await?;
        self.projector.push(Located { topic: topic.to_owned(), partition: pos.partition, offset: pos.offset, envelope: env });
        let deadline = Instant::now() + APPLY_WAIT;
        let mut pause = Duration::from_millis(2);
        loop {
            let v = homelink_read_model::household_version(&mut *db, h).await.map_err(ApiError::db)?;
            if v.is_some_and(|v| v >= version as i64) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.metrics.errors.with_label_values(&["read_model_behind"]).inc();
                return Err(ApiError::Unavailable(format!("household {h} version {version} is in the log but not applied yet")));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Appends and waits for Kafka's delivery report, however long librdkafka
    /// takes to know (its delivery timeout); the client's answer is bounded
    /// by the write layer instead (idempotency.rs), so the outcome is never
    /// cut off while still unknown.
    pub async fn append(&self, topic: &str, env: &Envelope) -> Result<homelink_kit::kafka::Position, ApiError> {
        self.appender.append(topic, env).await.map_err(|e| {
            self.metrics.errors.with_label_values(&["kafka_produce"]).inc();
            ApiError::Unavailable(format!("kafka: {e}"))
        })
    }

    /// Waits until the read model applied every record of the household's
    /// partition that Kafka acknowledged (up to the high watermark).
    async fn wait_caught_up(&self, db: &mut PgConnection, h: Uuid) -> Result<(), ApiError> {
        let topic = self.topics.households();
        let partition = homelink_read_model::household_partition(&mut *db, h).await.map_err(ApiError::db)?;
        let Some(partition) = partition else {
            return Ok(());
        };
        let high = self
            .appender
            .high_watermark(&topic, partition, self.append_timeout)
            .await
            .map_err(|e| ApiError::Unavailable(format!("kafka watermark: {e}")))?;
        let deadline = Instant::now() + self.append_timeout;
        loop {
            if homelink_read_model::applied_through(&mut *db, &topic, partition, high).await.map_err(ApiError::db)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.metrics.errors.with_label_values(&["read_model_behind"]).inc();
                return Err(ApiError::Unavailable(format!("read model behind the log (partition {partition} below {high})")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
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
    let h = Uuid::now_v7();
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
    let invitation_id = Uuid::now_v7();
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
    let row = sqlx::query("SELECT household_id, invitation_id, role FROM household_invitations WHERE code_hash = $1")
        .bind(&hash)
        .fetch_optional(&s.pool)
        .await
        .map_err(ApiError::db)?
        .ok_or(ApiError::NotFound)?;
    let (h, inv): (Uuid, Uuid) = (row.get(0), row.get(1));
    let role: Role = row.get::<String, _>(2).parse().map_err(ApiError::Internal)?;
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
    Ok(StatusCode::NO_CONTENT)
}
