//! Device commands: `POST /v1/households/{householdId}/devices/{deviceId}/commands`.

use crate::problem::ApiError;
use crate::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use homelink_events::event::DeviceCommandRequested;
use homelink_events::{Actor, DeviceKind, Envelope, Event};
use homelink_kit::push::Located;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::Row;
use std::sync::Arc;
use uuid::Uuid;

/// The request body. Unknown fields are refused: a body must not smuggle in
/// fields it does not own (`householdId`, `actor`, …).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CommandRequest {
    /// Desired values of writable capabilities.
    pub set: Map<String, Value>,
    /// How long the command stays valid, 1–300 s (default 10).
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandAccepted {
    pub command_id: Uuid,
    pub status: String,
    pub expires_at: DateTime<Utc>,
}

const DEFAULT_TTL: u32 = 10;
const MAX_TTL: u32 = 300;

/// Pure decision: the event for a valid request to a device of `kind`.
pub fn decide(kind: DeviceKind, device_id: Uuid, req: CommandRequest, now: DateTime<Utc>) -> Result<DeviceCommandRequested, ApiError> {
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL);
    if ttl == 0 || ttl > MAX_TTL {
        return Err(ApiError::BadRequest(format!("ttlSeconds must be between 1 and {MAX_TTL}")));
    }
    kind.validate_set(&req.set).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(DeviceCommandRequested {
        command_id: Uuid::now_v7(),
        device_id,
        set: req.set,
        expires_at: now + ChronoDuration::seconds(i64::from(ttl)),
    })
}

/// The route. Identity arrives with the next issue; until then the caller is
/// an explicit unauthenticated development actor, passed down like a real one.
pub async fn request(
    State(s): State<Arc<AppState>>,
    Path((household_id, device_id)): Path<(String, String)>,
    body: Result<Json<CommandRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CommandAccepted>), ApiError> {
    let actor = Actor::System("dev-unauthenticated".into());
    let household_id = Uuid::parse_str(&household_id).map_err(|_| ApiError::NotFound)?;
    let device_id = Uuid::parse_str(&device_id).map_err(|_| ApiError::NotFound)?;
    let Json(req) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(crate::MAX_BODY_BYTES),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    request_command(&s, actor, household_id, device_id, req).await
}

/// Validates, appends, pushes. Answers only after Kafka acknowledged.
pub async fn request_command(
    s: &AppState,
    actor: Actor,
    household_id: Uuid,
    device_id: Uuid,
    req: CommandRequest,
) -> Result<(StatusCode, Json<CommandAccepted>), ApiError> {
    let started = std::time::Instant::now();
    s.metrics.messages_in.with_label_values(&["command"]).inc();
    let row = sqlx::query("SELECT kind FROM devices WHERE device_id = $1 AND household_id = $2")
        .bind(device_id)
        .bind(household_id)
        .fetch_optional(&s.pool)
        .await
        .map_err(|e| ApiError::Unavailable(format!("registry: {e}")))?;
    // A device of another household answers exactly like one that does not exist.
    let kind: DeviceKind = row.and_then(|r| r.get::<String, _>(0).parse().ok()).ok_or(ApiError::NotFound)?;
    let cmd = decide(kind, device_id, req, Utc::now()).inspect_err(|_| s.metrics.errors.with_label_values(&["invalid_command"]).inc())?;
    let accepted = CommandAccepted { command_id: cmd.command_id, status: "requested".into(), expires_at: cmd.expires_at };
    let envelope =
        Envelope::new(household_id, actor, &Event::DeviceCommandRequested(cmd), Utc::now()).with_correlation(accepted.command_id);
    let topic = s.topics.commands();
    let pos = match tokio::time::timeout(s.append_timeout, s.appender.append(&topic, &envelope)).await {
        Ok(Ok(pos)) => pos,
        Ok(Err(e)) => {
            s.metrics.errors.with_label_values(&["kafka_produce"]).inc();
            return Err(ApiError::Unavailable(format!("kafka: {e}")));
        }
        Err(_) => {
            s.metrics.errors.with_label_values(&["kafka_timeout"]).inc();
            return Err(ApiError::Unavailable("kafka: append timed out".into()));
        }
    };
    s.bridge.push(envelope.clone());
    s.projector.push(Located { topic, partition: pos.partition, offset: pos.offset, envelope });
    s.metrics.messages_out.with_label_values(&["command"]).inc();
    s.metrics.latency.with_label_values(&["command_accepted"]).observe(started.elapsed().as_secs_f64());
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

#[cfg(test)]
mod tests {
    use super::*;
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
