//! Device commands: `POST /v1/households/{householdId}/devices/{deviceId}/commands`,
//! and desired state: `PUT /v1/households/{householdId}/devices/{deviceId}/desired`
//! (a command with a version precondition and a longer life).

use crate::audit::audit_denied;
use crate::caller::{path_id, Caller, Requester};
use crate::problem::{ApiError, Body, Problem};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use homelink_events::command::{Life, Refused, COMMAND_LIFE, DESIRED_LIFE};
use homelink_events::event::DeviceCommandRequested;
use homelink_events::household::Action;
use homelink_events::{DeviceKind, Envelope, Event};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

/// The request body. Unknown fields are refused: a body must not smuggle in
/// fields it does not own (`householdId`, `actor`, …).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CommandRequest {
    /// Desired values of writable capabilities, e.g. `{"brightness": 50}`.
    /// A capability the device's kind does not have answers 422.
    #[schema(schema_with = set_schema)]
    pub set: Map<String, Value>,
    /// How long the command stays valid, 1–300 s (default 10).
    #[serde(default, deserialize_with = "crate::validate::opt_whole")]
    #[schema(minimum = 1, maximum = 300)]
    pub ttl_seconds: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandAccepted {
    pub command_id: Uuid,
    /// `requested`, or `queued` when the device is offline: it is sent when
    /// the device comes online, unless it expired by then.
    pub status: String,
    pub expires_at: DateTime<Utc>,
    /// Give it to a GraphQL read (`HomeLink-Consistency-Token` header) to
    /// see this command's effect on the read models at once.
    pub consistency_token: String,
}

/// `PUT …/desired`: the values the device should take, kept as desired state
/// until it reports them (or they expire).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DesiredRequest {
    /// Desired values of writable capabilities, e.g. `{"targetTemp": 21.5}`.
    #[schema(schema_with = set_schema)]
    pub desired: Map<String, Value>,
    /// The shadow version this change is based on: when the shadow has
    /// changed since, the answer is 409 `version-conflict` (omit it to
    /// write unconditionally).
    #[serde(default, deserialize_with = "crate::validate::opt_whole_u64")]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub version: Option<u64>,
    /// How long the values stay desired, 1–604800 s (default 3600).
    #[serde(default, deserialize_with = "crate::validate::opt_whole")]
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_seconds: Option<u32>,
}

/// The document's schema of `set` ([`homelink_events::command::set_schema`]).
pub fn set_schema() -> utoipa::openapi::Object {
    homelink_events::command::set_schema()
}

/// Pure decision: the event for a valid request to a device of `kind`
/// ([`homelink_events::command::decide`]). A request that breaks the
/// document is 400; one the document allows but this device's kind does not
/// (a light asked to unlock) is 422.
pub fn decide(kind: DeviceKind, device_id: Uuid, req: CommandRequest, now: DateTime<Utc>) -> Result<DeviceCommandRequested, ApiError> {
    decide_within(kind, device_id, req, now, COMMAND_LIFE)
}

/// [`decide`] with a life (default and most).
fn decide_within(
    kind: DeviceKind,
    device_id: Uuid,
    req: CommandRequest,
    now: DateTime<Utc>,
    life: Life,
) -> Result<DeviceCommandRequested, ApiError> {
    let command_id = crate::idempotency::derived_id("command").unwrap_or_else(Uuid::now_v7);
    homelink_events::command::decide(kind, device_id, command_id, req.set, req.ttl_seconds, life, now).map_err(|e| match e {
        Refused::Invalid(why) => ApiError::BadRequest(why),
        Refused::Unsupported(why) => ApiError::Unprocessable("unsupported-capability", why),
    })
}

/// Sends a command to a device. Members may control what their role allows
/// (product.md roles table); a device of another household, or one the
/// caller may not see, answers exactly like one that does not exist.
#[utoipa::path(post, path = "/v1/households/{householdId}/devices/{deviceId}/commands", tag = "devices", request_body = CommandRequest,
    security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("deviceId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 202, body = CommandAccepted), (status = 400, body = Problem, content_type = "application/problem+json"), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate-limited: over 10 commands a second (bursts of 40) from you, or 5 a second (bursts of 20) to this device", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
pub async fn request(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household_id, device_id)): Path<(String, String)>,
    body: Body<CommandRequest>,
) -> Result<(StatusCode, Json<CommandAccepted>), ApiError> {
    let household_id = path_id(&household_id)?;
    let device_id = path_id(&device_id)?;
    request_command(&s, &who, household_id, device_id, body.0, None).await
}

/// Sets desired state: validated and authorized like a command of the same
/// values, delivered like one (at once when the device is online, when it
/// comes online otherwise), and kept as desired until the device reports
/// the values or `ttlSeconds` pass. With `version`, refused with 409
/// `version-conflict` when the shadow's version is another one.
#[utoipa::path(put, path = "/v1/households/{householdId}/devices/{deviceId}/desired", tag = "devices", request_body = DesiredRequest,
    security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("deviceId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 202, body = CommandAccepted), (status = 400, body = Problem, content_type = "application/problem+json"), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json"), (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate-limited: over 10 commands a second (bursts of 40) from you, or 5 a second (bursts of 20) to this device", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
pub async fn put_desired(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household_id, device_id)): Path<(String, String)>,
    body: Body<DesiredRequest>,
) -> Result<(StatusCode, Json<CommandAccepted>), ApiError> {
    let household_id = path_id(&household_id)?;
    let device_id = path_id(&device_id)?;
    let DesiredRequest { desired, version, ttl_seconds } = body.0;
    let req = CommandRequest { set: desired, ttl_seconds };
    request_command(&s, &who, household_id, device_id, req, Some(version)).await
}

/// Authorizes, validates, appends. Answers only after Kafka acknowledged
/// (the bridge reads the command from the log at once). `desired`: a `PUT …/desired` with its expected version.
pub async fn request_command(
    s: &AppState,
    who: &Requester,
    household_id: Uuid,
    device_id: Uuid,
    req: CommandRequest,
    desired: Option<Option<u64>>,
) -> Result<(StatusCode, Json<CommandAccepted>), ApiError> {
    let started = std::time::Instant::now();
    s.metrics.messages_in.with_label_values(&["command"]).inc();
    let access = homelink_read_model::device_access(&s.pool, household_id, device_id, who.user).await.map_err(ApiError::db)?;
    // A device of another household answers exactly like one that does not exist.
    let Some(access) = access else {
        return Err(ApiError::NotFound);
    };
    let (kind, role) = (access.kind, access.role);
    let target = Some(format!("device/{device_id}"));
    let refused = match role {
        None => Some(ApiError::NotFound),
        Some(r) if !r.allows(&Action::SeeDevice(kind)) => Some(ApiError::NotFound),
        Some(r) if !r.allows(&Action::Control(kind, &req.set)) => {
            Some(ApiError::Forbidden(format!("a member with role {r} may not send this command to a {kind}")))
        }
        Some(_) if access.removed => Some(ApiError::Conflict("device-removed", "the device was removed from the household".into())),
        Some(_) => None,
    };
    if let Some(e) = refused.or_else(|| s.limiters.check(who.user, device_id).err()) {
        if matches!(e, ApiError::RateLimited(..)) {
            s.metrics.errors.with_label_values(&["rate_limited"]).inc();
        }
        audit_denied(s, who, household_id, role, "device.command", target, &e);
        return Err(e);
    }
    let life = if desired.is_some() { DESIRED_LIFE } else { COMMAND_LIFE };
    let mut cmd = decide_within(kind, device_id, req, Utc::now(), life)
        .inspect_err(|_| s.metrics.errors.with_label_values(&["invalid_command"]).inc())?;
    cmd.queued = !access.online;
    let status = if cmd.queued { "queued" } else { "requested" };
    let mut accepted =
        CommandAccepted { command_id: cmd.command_id, status: status.into(), expires_at: cmd.expires_at, consistency_token: String::new() };
    let envelope = Envelope::new(household_id, who.actor(), &Event::DeviceCommandRequested(cmd), Utc::now())
        .with_correlation(accepted.command_id)
        .with_meta(who.meta(role));
    let topic = s.topics.commands();
    // A versioned `PUT …/desired` holds the device's lock from its version
    // check until its append is acknowledged and its position recorded; the
    // next versioned writer waits for that position to be applied before it
    // checks, so of two writers with the same version exactly one wins.
    let guard = match desired {
        Some(Some(expected)) => Some(version_guard(s, device_id, expected).await?),
        _ => None,
    };
    let pos = s.append(&topic, &envelope).await?;
    let mut written = homelink_kit::consistency::Written::default();
    written.command(household_id, accepted.command_id);
    accepted.consistency_token = s.keys.sign_consistency(who.user, &written).unwrap_or_default();
    if let Some(guard) = guard {
        guard.release_after(&topic, pos.partition, pos.offset).await;
    }
    s.metrics.messages_out.with_label_values(&["command"]).inc();
    s.metrics.latency.with_label_values(&["command_accepted"]).observe(started.elapsed().as_secs_f64());
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// After a membership change of `user` in `household` was applied: every
/// open command of theirs (not delivered yet, not ended) that their role no
/// longer allows ends `rejected` (a `DeviceCommandRevoked` with the reason,
/// in the lifecycle and the audit log). Best effort: the bridge authorizes
/// every command again at the moment it sends it, so one missed here is
/// revoked there.
pub async fn revoke_lost_rights(s: &AppState, household_id: Uuid, user: Uuid) {
    let rows = match homelink_read_model::commands::open_of_sender(&s.pool, household_id, user).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, %household_id, "reading a member's open commands failed; the bridge re-checks them");
            s.metrics.errors.with_label_values(&["revoke_commands"]).inc();
            return;
        }
    };
    let topic = s.topics.commands();
    for homelink_read_model::commands::SentCommand { command_id, device_id, set_values: set, kind, role } in rows {
        let (Some(Value::Object(set)), Ok(kind)) = (set, kind.parse::<DeviceKind>()) else { continue };
        let role = role.and_then(|r| r.parse().ok());
        let Some(reason) = homelink_events::household::revocation_reason(role, kind, &set) else { continue };
        let ev = Event::DeviceCommandRevoked(homelink_events::event::DeviceCommandRevoked {
            command_id,
            device_id,
            sender: user.to_string(),
            reason,
        });
        let envelope =
            Envelope::new(household_id, homelink_events::Actor::System("command-api".into()), &ev, Utc::now()).with_correlation(command_id);
        match s.append(&topic, &envelope).await {
            Ok(_) => s.metrics.messages_out.with_label_values(&["command_revoked"]).inc(),
            Err(e) => tracing::warn!(error = ?e, %command_id, "revoking a command failed; the bridge re-checks it"),
        }
    }
}

/// A device's lock: in this process a stripe (waiters hold no database
/// connection), across processes an advisory lock in a transaction of the
/// version pool's.
struct VersionGuard {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    device: Uuid,
    _stripe: tokio::sync::OwnedMutexGuard<()>,
}

/// Longest a versioned write waits for the device's lock, and for the
/// previous versioned write of the device to be applied: then 503 with
/// nothing appended.
const VERSION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// In-process lock stripes of versioned writes.
pub const DEVICE_STRIPES: usize = 256;

/// Takes the device's lock, waits until the read model applied the
/// device's last versioned change, and checks the shadow's version.
async fn version_guard(s: &AppState, device: Uuid, expected: u64) -> Result<VersionGuard, ApiError> {
    let key = homelink_read_model::locks::Lock::DeviceDesired(device).key();
    let busy = || {
        s.metrics.errors.with_label_values(&["version_lock_wait"]).inc();
        ApiError::Unavailable(format!("device {device} is busy with another versioned change; try again"))
    };
    let stripe = s.device_stripes[(key as u64 % DEVICE_STRIPES as u64) as usize].clone();
    let _stripe = tokio::time::timeout(VERSION_WAIT, stripe.lock_owned()).await.map_err(|_| busy())?;
    let mut tx = s.version_pool.begin().await.map_err(ApiError::db)?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{}ms'", VERSION_WAIT.as_millis())).execute(&mut *tx).await.map_err(ApiError::db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(key).execute(&mut *tx).await.map_err(|_| busy())?;
    let last: Option<(String, i32, i64)> =
        sqlx::query_as(r#"SELECT topic, partition, "offset" FROM desired_positions WHERE device_id = $1"#)
            .bind(device)
            .fetch_optional(&mut *tx)
            .await
            .map_err(ApiError::db)?;
    if let Some(last) = last {
        let deadline = std::time::Instant::now() + VERSION_WAIT;
        while homelink_read_model::positions_pending(&s.pool, std::slice::from_ref(&last)).await.map_err(ApiError::db)? > 0 {
            if std::time::Instant::now() > deadline {
                s.metrics.errors.with_label_values(&["read_model_behind"]).inc();
                return Err(ApiError::Unavailable("the device's last desired change is not applied yet; try again".into()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    let version = homelink_read_model::shadow_version(&mut tx, device).await.map_err(ApiError::db)?;
    if i64::try_from(expected).ok() != Some(version) {
        return Err(ApiError::Conflict(
            "version-conflict",
            format!("the shadow is at version {version}, not {expected}: read it again and retry"),
        ));
    }
    Ok(VersionGuard { tx, device, _stripe })
}

impl VersionGuard {
    /// Records the change's position for the next versioned writer and
    /// releases the lock at once.
    async fn release_after(mut self, topic: &str, partition: i32, offset: i64) {
        let r = sqlx::query(
            r#"INSERT INTO desired_positions (device_id, topic, partition, "offset") VALUES ($1, $2, $3, $4)
               ON CONFLICT (device_id) DO UPDATE SET topic = EXCLUDED.topic, partition = EXCLUDED.partition, "offset" = EXCLUDED."offset""#,
        )
        .bind(self.device)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *self.tx)
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "recording a desired change's position failed");
        }
        if let Err(e) = self.tx.commit().await {
            tracing::warn!(error = %e, "releasing a device's version lock failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration as ChronoDuration;
    use serde_json::json;

    fn req(v: Value) -> CommandRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn given_a_light_when_brightness_is_set_then_a_command_is_requested() {
        let now = Utc::now();
        let c = decide(DeviceKind::Light, Uuid::nil(), req(json!({"set": {"brightness": 50}})), now).unwrap();
        assert_eq!(c.set["brightness"], 50);
        assert_eq!(c.expires_at, now + ChronoDuration::seconds(10));
    }

    #[test]
    fn out_of_range_values_and_ttls_are_refused() {
        let now = Utc::now();
        assert!(decide(DeviceKind::Light, Uuid::nil(), req(json!({"set": {"brightness": 101}})), now).is_err());
        assert!(decide(DeviceKind::Thermostat, Uuid::nil(), req(json!({"set": {"targetTemp": 80}})), now).is_err());
        assert!(decide(DeviceKind::Light, Uuid::nil(), req(json!({"set": {"on": true}, "ttlSeconds": 0})), now).is_err());
    }

    #[test]
    fn a_body_with_fields_it_does_not_own_is_refused() {
        let r: Result<CommandRequest, _> = serde_json::from_value(json!({"set": {"on": true}, "householdId": Uuid::nil()}));
        assert!(r.is_err());
    }
}
