//! Small lookups of the device registry and of invitations, for command-api
//! (a removal's serials, the revoker's removed devices, an invitation by its
//! code), the query API's subscriptions (a device's kind) and the automation
//! engine (a household's shadows). The projector
//! writes `devices` and `household_invitations`.

use homelink_events::DeviceKind;
use sqlx::PgPool;
use uuid::Uuid;

/// The kind of `device` of `household` (removed ones included; `None` for
/// no such device, or a kind this build does not know).
pub async fn device_kind(pool: &PgPool, household: Uuid, device: Uuid) -> Result<Option<DeviceKind>, sqlx::Error> {
    let k: Option<String> = sqlx::query_scalar("SELECT kind FROM devices WHERE device_id = $1 AND household_id = $2")
        .bind(device)
        .bind(household)
        .fetch_optional(pool)
        .await?;
    Ok(k.and_then(|k| k.parse().ok()))
}

/// A device's serials: its certificate's and the manufacturer's.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Serials {
    pub cert_serial: Option<String>,
    pub serial: Option<String>,
}

/// The serials of `device` of `household` (removed ones included), for its
/// removal.
pub async fn serials(pool: &PgPool, household: Uuid, device: Uuid) -> Result<Option<Serials>, sqlx::Error> {
    sqlx::query_as("SELECT cert_serial, serial FROM devices WHERE device_id = $1 AND household_id = $2")
        .bind(device)
        .bind(household)
        .fetch_optional(pool)
        .await
}

/// A removed device as the revoker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedDevice {
    pub device_id: Uuid,
    /// Its certificate's serial, for the revocation list.
    pub cert_serial: Option<String>,
    /// The broker confirmed its connection closed (command-api's
    /// `device_kicks_confirmed`).
    pub kick_confirmed: bool,
}

/// Every removed device, with whether command-api recorded its kick as
/// confirmed, in one snapshot (the revoker's list and kicks).
pub async fn removed_devices(pool: &PgPool) -> Result<Vec<RemovedDevice>, sqlx::Error> {
    let rows: Vec<(Uuid, Option<String>, bool)> = sqlx::query_as(
        "SELECT d.device_id, d.cert_serial, EXISTS (SELECT 1 FROM device_kicks_confirmed k WHERE k.device_id = d.device_id)
             FROM devices d WHERE d.removed_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(device_id, cert_serial, kick_confirmed)| RemovedDevice { device_id, cert_serial, kick_confirmed }).collect())
}

/// An invitation as its code finds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvitationRow {
    pub household_id: Uuid,
    pub invitation_id: Uuid,
    /// The role it grants (`owner`, `adult`, `child`).
    pub role: String,
}

/// The invitation whose code hashes to `code_hash` (used or expired ones
/// included: accepting decides), for the one accepting it.
pub async fn invitation_by_code(pool: &PgPool, code_hash: &str) -> Result<Option<InvitationRow>, sqlx::Error> {
    sqlx::query_as("SELECT household_id, invitation_id, role FROM household_invitations WHERE code_hash = $1")
        .bind(code_hash)
        .fetch_optional(pool)
        .await
}

/// A device's last reported state and whether it is online.
#[derive(Debug, sqlx::FromRow)]
pub struct DeviceState {
    pub device_id: Uuid,
    pub reported: Option<serde_json::Value>,
    pub online: bool,
}

/// The shadows of a household's devices (the automation engine's start
/// for a household it has not seen since it started).
pub async fn device_states(pool: &PgPool, household: Uuid) -> Result<Vec<DeviceState>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.device_id, s.reported, s.online FROM device_shadows s JOIN devices d ON d.device_id = s.device_id WHERE d.household_id = $1",
    )
    .bind(household)
    .fetch_all(pool)
    .await
}
