//! The device registry: register (with the device's certificate), remove
//! (revoking it), rename, move between rooms; rooms: create, rename, delete.
//!
//! Every change is an event on the household stream and takes the household
//! write path ([`AppState::write_household`]), so registry changes are
//! serialized with membership changes and decided against the same aggregate.
//! Manufacturer serials are claimed in `device_serial_claims` before the
//! registration is appended: a serial belongs to one household at a time.

use crate::caller::{path_id, Caller, Requester};
use crate::problem::{ApiError, Body, Problem};
use crate::write_path::HouseholdCommand;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use homelink_events::event::{DeviceMoved, DeviceRegistered, DeviceRemoved, DeviceRenamed, RoomCreated, RoomDeleted, RoomRenamed};
use homelink_events::household::Action;
use homelink_events::{DeviceKind, Event};
use homelink_kit::pki::PkiError;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

/// Where devices connect, as a registration answer tells them.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub ca_cert: std::path::PathBuf,
    pub ca_key: std::path::PathBuf,
    pub mqtt_host: String,
    /// The device (mTLS) port of every broker of the deployment, in the
    /// deployment's broker order (the bridge's list has the same order).
    /// Brokers are only ever appended: a device keeps the broker it was given.
    pub mqtt_ports: Vec<u16>,
}

impl DeviceConfig {
    /// The broker a new device is assigned: spread evenly by its (random) id.
    pub fn assign(&self, device: Uuid) -> (u16, u16) {
        let n = self.mqtt_ports.len().max(1);
        let i = (device.as_u128() % n as u128) as usize;
        (i as u16, self.mqtt_ports.get(i).copied().unwrap_or(8883))
    }
}

use crate::validate::{name as name_of, serial as serial_of};

fn registry_cmd(household: Uuid, action: &'static str, target: String, requires: Action<'static>) -> HouseholdCommand<'static> {
    HouseholdCommand { household, action, target: Some(target), invitation: None, requires: Some(requires), open_to_non_members: false }
}

/// A device kind in the OpenAPI document.
pub fn kind_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(DeviceKind::ALL.map(|k| k.as_str())))
        .description(Some("The device's kind."))
        .build()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegisterDevice {
    /// `light`, `plug`, `thermostat`, `lock`, `camera` or `sensor`.
    #[schema(schema_with = kind_schema)]
    pub kind: DeviceKind,
    /// 1 to 80 characters, no control characters, no whitespace at either end.
    #[schema(
        min_length = 1,
        max_length = 80,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$"
    )]
    pub name: String,
    #[serde(default)]
    pub room_id: Option<Uuid>,
    /// The manufacturer's serial number; one household at a time may claim it.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    pub serial: Option<String>,
    /// A PKCS#10 certificate signing request (PEM) made on the device: its
    /// private key never leaves it. Without one, a key is generated and
    /// returned once.
    #[serde(default)]
    #[schema(
        max_length = 8192,
        pattern = "^-----BEGIN CERTIFICATE REQUEST-----\\r?\\n[A-Za-z0-9+/=\\r\\n]+-----END CERTIFICATE REQUEST-----(?:\\r?\\n)?$"
    )]
    pub csr: Option<String>,
    /// How often the device reports, 5–86400 s (default 30): after two
    /// missed intervals it shows `stale` (and so does each property not
    /// reported for two intervals).
    #[serde(default, deserialize_with = "crate::validate::opt_whole")]
    #[schema(minimum = 5, maximum = 86400)]
    pub report_interval_secs: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttAccess {
    pub host: String,
    /// The mutual-TLS listener.
    pub port: u16,
    /// Publish state reports here.
    pub state_topic: String,
    pub ack_topic: String,
    pub status_topic: String,
    /// Subscribe here for commands.
    pub cmd_topic: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredDeviceResponse {
    pub device_id: Uuid,
    #[schema(value_type = String)]
    pub kind: DeviceKind,
    pub name: String,
    pub room_id: Option<Uuid>,
    pub serial: Option<String>,
    /// The device's client certificate (PEM), CN = device id.
    pub certificate_pem: String,
    /// Only when no CSR was sent: the generated private key, shown once. It
    /// is stored nowhere: a replay of the request with the same
    /// `Idempotency-Key` answers the same device and certificate without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// The CA that signs device certificates (and the broker's trust anchor).
    pub ca_certificate_pem: String,
    pub mqtt: MqttAccess,
}

/// Registers a device and issues its certificate (owners and adults).
#[utoipa::path(post, path = "/v1/households/{householdId}/devices", tag = "devices", request_body = RegisterDevice, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 201, body = RegisteredDeviceResponse), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the serial belongs to a registered device", body = Problem, content_type = "application/problem+json")))]
pub async fn register(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    body: Body<RegisterDevice>,
) -> Result<Response, ApiError> {
    let h = path_id(&household)?;
    let req = body.0;
    let name = name_of(&req.name, "name")?;
    let serial = req.serial.as_deref().map(serial_of).transpose()?;
    if req.report_interval_secs.is_some_and(|i| !(5..=86_400).contains(&i)) {
        return Err(ApiError::BadRequest("reportIntervalSecs must be between 5 and 86400".into()));
    }
    let (ca, dev) = match (&s.device_ca, &s.devices) {
        (Some(ca), Some(dev)) => (ca.clone(), dev.clone()),
        _ => return Err(ApiError::Unavailable("the device CA is not configured".into())),
    };
    // With an Idempotency-Key the id comes from the key, so a retry after
    // an append of unknown fate cannot register a second device.
    let device_id = crate::idempotency::derived_id("device").unwrap_or_else(Uuid::new_v4);
    let (broker, mqtt_port) = dev.assign(device_id);
    // Issue first (pure, local); a refused CSR stores nothing. Armour the
    // document states is 400; well-armoured DER that is no valid request, 422.
    if let Some(csr) = req.csr.as_deref() {
        crate::validate::csr_armour(csr)?;
    }
    let issued = ca.issue(device_id, req.csr.as_deref()).map_err(|e| match e {
        PkiError::BadCsr => ApiError::Unprocessable("invalid-csr", e.to_string()),
        PkiError::CsrTooLarge => ApiError::BadRequest(e.to_string()),
        PkiError::Ca(why) => ApiError::Internal(why),
    })?;
    // Authorize before claiming: a stranger or a child must learn nothing
    // about serials, and must not block the owner's claim.
    let cmd = || registry_cmd(h, "device.register", format!("device/{device_id}"), Action::ManageDevices);
    s.authorize_household(&who, &cmd()).await?;
    if let Some(sn) = &serial {
        s.claim_serial(&who, h, sn, device_id).await?;
    }
    let ev = Event::DeviceRegistered(DeviceRegistered {
        device_id,
        kind: req.kind,
        name: name.clone(),
        room: None,
        room_id: req.room_id,
        serial: serial.clone(),
        cert_serial: Some(issued.serial_hex.clone()),
        broker: Some(broker),
        report_interval_secs: req.report_interval_secs,
    });
    let written = s.write_household(&who, cmd(), |_, _| Ok(ev)).await;
    if let Err(e) = written {
        // Released only when nothing may have been written: after an append
        // of unknown fate the device may be registered, and its serial with it.
        if let (Some(sn), false) = (&serial, matches!(e, ApiError::InDoubt(_))) {
            s.release_serial(sn, device_id).await;
        }
        return Err(e);
    }
    let base = format!("home/{h}/device/{device_id}");
    let answer = RegisteredDeviceResponse {
        device_id,
        kind: req.kind,
        name,
        room_id: req.room_id,
        serial,
        certificate_pem: issued.cert_pem,
        private_key_pem: issued.key_pem,
        ca_certificate_pem: ca.ca_pem().to_owned(),
        mqtt: MqttAccess {
            host: dev.mqtt_host,
            port: mqtt_port,
            state_topic: format!("{base}/state"),
            ack_topic: format!("{base}/ack"),
            status_topic: format!("{base}/status"),
            cmd_topic: format!("{base}/cmd"),
        },
    };
    let mut response = (StatusCode::CREATED, Json(&answer)).into_response();
    if answer.private_key_pem.is_some() {
        // A private key is shown once and stored nowhere: an idempotent
        // replay answers the same device and certificate without it.
        let kept = RegisteredDeviceResponse { private_key_pem: None, ..answer };
        response.extensions_mut().insert(crate::idempotency::StoreInstead(serde_json::to_vec(&kept).unwrap_or_default()));
    }
    Ok(response)
}

impl AppState {
    /// Claims `serial` for `device` in `h`; 409 when a registered device of
    /// any household holds it.
    async fn claim_serial(&self, who: &Requester, h: Uuid, serial: &str, device: Uuid) -> Result<(), ApiError> {
        let won = sqlx::query(
            "INSERT INTO device_serial_claims (serial, household_id, device_id) VALUES ($1, $2, $3)
             ON CONFLICT (serial) DO UPDATE SET household_id = EXCLUDED.household_id, device_id = EXCLUDED.device_id, claimed_at = now()
               WHERE device_serial_claims.device_id = EXCLUDED.device_id
                  OR device_serial_claims.claimed_at < now() - interval '5 minutes'
                 AND NOT EXISTS (SELECT 1 FROM devices d WHERE d.device_id = device_serial_claims.device_id AND d.removed_at IS NULL)
             RETURNING 1",
        )
        .bind(serial)
        .bind(h)
        .bind(device)
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::db)?;
        if won.is_none() {
            let e = ApiError::Conflict("serial-claimed", "a registered device already has this serial".into());
            crate::audit::audit_denied(self, who, h, None, "device.register", Some(format!("serial/{serial}")), &e);
            return Err(e);
        }
        Ok(())
    }

    async fn release_serial(&self, serial: &str, device: Uuid) {
        let r = sqlx::query("DELETE FROM device_serial_claims WHERE serial = $1 AND device_id = $2")
            .bind(serial)
            .bind(device)
            .execute(&self.pool)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, %serial, "could not release a serial claim; it can be taken over after 5 minutes");
        }
    }
}

/// Removes a device (owners only): its certificate is revoked and its
/// connection closed; its shadow and history stay readable, marked removed.
#[utoipa::path(delete, path = "/v1/households/{householdId}/devices/{deviceId}", tag = "devices", operation_id = "remove_device", security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("deviceId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 204, description = "removed and revoked"), (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already removed", body = Problem, content_type = "application/problem+json")))]
pub async fn remove(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, device)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (h, d) = (path_id(&household)?, path_id(&device)?);
    let homelink_read_model::registry::Serials { cert_serial, serial } =
        homelink_read_model::registry::serials(&s.pool, h, d).await.map_err(ApiError::db)?.unwrap_or_default();
    let ev = Event::DeviceRemoved(DeviceRemoved { device_id: d, cert_serial, serial: serial.clone() });
    s.write_household(&who, registry_cmd(h, "device.remove", format!("device/{d}"), Action::RemoveDevices), |_, _| Ok(ev)).await?;
    if let Some(sn) = serial {
        s.release_serial(&sn, d).await;
    }
    if let Some(r) = &s.revoker {
        // The event is committed; the broker side is reconciled again by the
        // revoker's loop should this fail.
        if let Err(e) = r.sync(&[d]).await {
            tracing::warn!(error = %e, device = %d, "revocation at the broker failed; the revoker retries");
            s.metrics.errors.with_label_values(&["revocation"]).inc();
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rename {
    /// 1 to 80 characters, no control characters, no whitespace at either end.
    #[schema(
        min_length = 1,
        max_length = 80,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u001f\u007f-\u009f \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$"
    )]
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Move {
    /// The room, or `null` for unassigned.
    pub room_id: Option<Uuid>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSummary {
    pub device_id: Uuid,
    pub name: Option<String>,
    pub room_id: Option<Uuid>,
}

/// Renames a device (owners and adults).
#[utoipa::path(put, path = "/v1/households/{householdId}/devices/{deviceId}/name", tag = "devices", request_body = Rename, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("deviceId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = DeviceSummary), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn rename(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, device)): Path<(String, String)>,
    body: Body<Rename>,
) -> Result<Json<DeviceSummary>, ApiError> {
    let (h, d) = (path_id(&household)?, path_id(&device)?);
    let name = name_of(&body.0.name, "name")?;
    let ev = Event::DeviceRenamed(DeviceRenamed { device_id: d, name: name.clone() });
    s.write_household(&who, registry_cmd(h, "device.rename", format!("device/{d}"), Action::ManageDevices), |_, _| Ok(ev)).await?;
    Ok(Json(DeviceSummary { device_id: d, name: Some(name), room_id: None }))
}

/// Moves a device to a room, or to unassigned with `null` (owners and adults).
#[utoipa::path(put, path = "/v1/households/{householdId}/devices/{deviceId}/room", tag = "devices", request_body = Move, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("deviceId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = DeviceSummary), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn move_device(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, device)): Path<(String, String)>,
    body: Body<Move>,
) -> Result<Json<DeviceSummary>, ApiError> {
    let (h, d) = (path_id(&household)?, path_id(&device)?);
    let room_id = body.0.room_id;
    let ev = Event::DeviceMoved(DeviceMoved { device_id: d, room_id });
    s.write_household(&who, registry_cmd(h, "device.move", format!("device/{d}"), Action::ManageDevices), |_, _| Ok(ev)).await?;
    Ok(Json(DeviceSummary { device_id: d, name: None, room_id }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomResponse {
    pub room_id: Uuid,
    pub name: String,
}

/// Creates a room (owners and adults). Names are unique in a household.
#[utoipa::path(post, path = "/v1/households/{householdId}/rooms", tag = "devices", request_body = Rename, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 201, body = RoomResponse), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn create_room(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    body: Body<Rename>,
) -> Result<(StatusCode, Json<RoomResponse>), ApiError> {
    let h = path_id(&household)?;
    let name = name_of(&body.0.name, "name")?;
    let room_id = crate::idempotency::derived_id("room").unwrap_or_else(Uuid::now_v7);
    let ev = Event::RoomCreated(RoomCreated { room_id, name: name.clone() });
    s.write_household(&who, registry_cmd(h, "room.create", format!("room/{room_id}"), Action::ManageDevices), |_, _| Ok(ev)).await?;
    Ok((StatusCode::CREATED, Json(RoomResponse { room_id, name })))
}

/// Renames a room (owners and adults).
#[utoipa::path(put, path = "/v1/households/{householdId}/rooms/{roomId}", tag = "devices", request_body = Rename, security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("roomId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 200, body = RoomResponse), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub async fn rename_room(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, room)): Path<(String, String)>,
    body: Body<Rename>,
) -> Result<Json<RoomResponse>, ApiError> {
    let (h, room_id) = (path_id(&household)?, path_id(&room)?);
    let name = name_of(&body.0.name, "name")?;
    let ev = Event::RoomRenamed(RoomRenamed { room_id, name: name.clone() });
    s.write_household(&who, registry_cmd(h, "room.rename", format!("room/{room_id}"), Action::ManageDevices), |_, _| Ok(ev)).await?;
    Ok(Json(RoomResponse { room_id, name }))
}

/// Deletes a room; its devices become unassigned (owners and adults).
#[utoipa::path(delete, path = "/v1/households/{householdId}/rooms/{roomId}", tag = "devices", security(("bearer" = [])),
    params(("householdId" = Uuid, Path), ("roomId" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes a retry safe")),
    responses((status = 204, description = "deleted"), (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn delete_room(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path((household, room)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (h, room_id) = (path_id(&household)?, path_id(&room)?);
    let ev = Event::RoomDeleted(RoomDeleted { room_id });
    s.write_household(&who, registry_cmd(h, "room.delete", format!("room/{room_id}"), Action::ManageDevices), |_, _| Ok(ev)).await?;
    Ok(StatusCode::NO_CONTENT)
}
