//! Households, their members and rooms, devices with their shadows, and
//! device commands as the query API's GraphQL schema reads them (the
//! projector writes `households`, `household_members`, `rooms`, `devices`,
//! `device_shadows`, `device_commands`). Each read is joined with the
//! viewer's membership, so a household the viewer does not belong to reads
//! as nothing. The batch reads (`*_pages`, [`rooms`], [`members`],
//! [`room_devices`]) answer many parents with one query, each row
//! [`Ranked`] among its parent's; each list takes the most rows the caller
//! may read.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// A household with the viewer's role in it.
#[derive(Debug, sqlx::FromRow)]
pub struct HouseholdRow {
    pub household_id: Uuid,
    pub name: String,
    pub role: String,
}

/// The households `user` belongs to, by name, with their role in each.
pub async fn memberships(pool: &PgPool, user: Uuid, limit: i64) -> Result<Vec<HouseholdRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT h.household_id, h.name, m.role FROM household_members m JOIN households h ON h.household_id = m.household_id
                     WHERE m.user_id = $1 ORDER BY h.name, h.household_id LIMIT $2",
    )
    .bind(user)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A household `viewer` belongs to, with their role there.
pub async fn household(pool: &PgPool, household: Uuid, viewer: Uuid) -> Result<Option<HouseholdRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT h.household_id, h.name, m.role FROM households h JOIN household_members m ON m.household_id = h.household_id AND m.user_id = $2
                     WHERE h.household_id = $1",
    )
    .bind(household)
    .bind(viewer)
    .fetch_optional(pool)
    .await
}

/// Devices with their rooms, shadows and the viewer's role (`m.role`, joined by the caller).
const DEVICE_SELECT: &str =
    "SELECT d.device_id, d.household_id, d.kind, d.name, d.room_id, rm.name AS room_name, d.serial, d.registered_at,
       d.removed_at, s.reported, s.seq, s.version, s.battery, s.online, s.last_seen, s.desired, s.metadata,
       d.report_interval_secs, m.role
     FROM devices d LEFT JOIN device_shadows s ON s.device_id = d.device_id LEFT JOIN rooms rm ON rm.room_id = d.room_id";

/// A device with its room, its shadow (the shadow's columns are `None`
/// before it has one) and the viewer's role in its household.
#[derive(Debug, sqlx::FromRow, Clone)]
pub struct DeviceRow {
    pub device_id: Uuid,
    pub household_id: Uuid,
    pub kind: String,
    pub name: String,
    pub room_id: Option<Uuid>,
    pub room_name: Option<String>,
    pub serial: Option<String>,
    pub registered_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
    pub reported: Option<Value>,
    pub seq: Option<i64>,
    pub version: Option<i64>,
    pub battery: Option<i16>,
    pub online: Option<bool>,
    pub last_seen: Option<DateTime<Utc>>,
    pub desired: Option<Value>,
    pub metadata: Option<Value>,
    pub report_interval_secs: i32,
    pub role: String,
}

/// A device (removed ones included) of a household `viewer` belongs to,
/// whatever its kind (the caller decides whether their role may see it).
pub async fn device(pool: &PgPool, device: Uuid, viewer: Uuid) -> Result<Option<DeviceRow>, sqlx::Error> {
    let sql =
        format!("{DEVICE_SELECT} JOIN household_members m ON m.household_id = d.household_id AND m.user_id = $2 WHERE d.device_id = $1");
    sqlx::query_as(&sql).bind(device).bind(viewer).fetch_optional(pool).await
}

/// A command's columns, with its device's kind and the viewer's role
/// (`d.kind`, `m.role`: joined by the caller).
const COMMAND_SELECT: &str = "SELECT c.command_id, c.device_id, c.status, c.ack_status, c.reason, c.set_values, c.queued,
       c.requested_at, c.expires_at, c.delivered_at, c.acked_at, c.confirmed_at, c.expired_at, c.superseded_at, c.superseded_by,
       c.revoked_at, c.caused_by, d.kind, m.role
     FROM device_commands c";

/// A command's lifecycle, with its device's kind and the viewer's role in
/// its household.
#[derive(Debug, sqlx::FromRow, Clone)]
pub struct CommandRow {
    pub command_id: Uuid,
    pub device_id: Uuid,
    pub status: String,
    pub ack_status: Option<String>,
    pub reason: Option<String>,
    pub set_values: Option<Value>,
    pub queued: bool,
    pub requested_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub acked_at: Option<DateTime<Utc>>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
    pub superseded_at: Option<DateTime<Utc>>,
    pub superseded_by: Option<Uuid>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub caused_by: Option<Uuid>,
    pub kind: String,
    pub role: String,
}

/// A command of a household `viewer` belongs to, whatever its device's kind
/// (the caller decides whether their role may see it).
pub async fn command(pool: &PgPool, command: Uuid, viewer: Uuid) -> Result<Option<CommandRow>, sqlx::Error> {
    let sql = format!(
        "{COMMAND_SELECT} JOIN devices d ON d.device_id = c.device_id AND d.household_id = c.household_id
             JOIN household_members m ON m.household_id = c.household_id AND m.user_id = $2
             WHERE c.command_id = $1"
    );
    sqlx::query_as(&sql).bind(command).bind(viewer).fetch_optional(pool).await
}

/// A row of a batch query with its rank among its parent's rows (`rn`).
#[derive(Debug, sqlx::FromRow)]
pub struct Ranked<T> {
    #[sqlx(flatten)]
    pub row: T,
    pub rn: i64,
}

/// `select` (a `SELECT …` of one parent's rows) with each row's rank in
/// `order` as `rn`: a batch's rows come back in any order.
fn ranked(select: &str, order: &str) -> String {
    select.replacen("SELECT ", &format!("SELECT row_number() OVER (ORDER BY {order}) AS rn, "), 1)
}

/// Which of a household's devices a page holds; all optional, combined with
/// AND.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct DeviceFilter {
    pub room: Option<Uuid>,
    /// Only devices in no room.
    pub unassigned: bool,
    pub kind: Option<String>,
    /// As of the shadow (offline when it never said so).
    pub online: Option<bool>,
    pub include_removed: bool,
    /// The previous page's last device (name, id): the page starts after it.
    pub after: Option<(String, Uuid)>,
}

/// For each of `households` `viewer` belongs to: their devices of `kinds`
/// that pass `filter`, by name, at most `per_household` of each (a page and
/// one more); at most `limit` in all.
pub async fn device_pages(
    pool: &PgPool,
    households: &[Uuid],
    viewer: Uuid,
    kinds: &[String],
    filter: &DeviceFilter,
    per_household: i64,
    limit: i64,
) -> Result<Vec<Ranked<DeviceRow>>, sqlx::Error> {
    let sql = format!(
        "SELECT x.* FROM unnest($1::uuid[]) AS k(household_id) CROSS JOIN LATERAL (
                       {} JOIN household_members m ON m.household_id = d.household_id AND m.user_id = $2
                       WHERE d.household_id = k.household_id AND d.kind = ANY($3)
                         AND ($4::uuid IS NULL OR d.room_id = $4) AND (NOT $5 OR d.room_id IS NULL)
                         AND ($6::text IS NULL OR d.kind = $6) AND ($7::bool IS NULL OR COALESCE(s.online, false) = $7)
                         AND ($8 OR d.removed_at IS NULL)
                         AND ($9::text IS NULL OR (d.name, d.device_id) > ($9, $10))
                       ORDER BY d.name, d.device_id LIMIT $11) x LIMIT $12",
        ranked(DEVICE_SELECT, "d.name, d.device_id")
    );
    sqlx::query_as(&sql)
        .bind(households)
        .bind(viewer)
        .bind(kinds)
        .bind(filter.room)
        .bind(filter.unassigned)
        .bind(&filter.kind)
        .bind(filter.online)
        .bind(filter.include_removed)
        .bind(filter.after.as_ref().map(|a| a.0.as_str()))
        .bind(filter.after.as_ref().map(|a| a.1))
        .bind(per_household)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Most devices of one room [`room_devices`] reads.
pub const MAX_ROOM_DEVICES: i64 = 1000;

/// For each of `rooms` of a household `viewer` belongs to: its devices of
/// `kinds` (not removed), by name, at most [`MAX_ROOM_DEVICES`] of each; at
/// most `limit` in all.
pub async fn room_devices(
    pool: &PgPool,
    rooms: &[Uuid],
    viewer: Uuid,
    kinds: &[String],
    limit: i64,
) -> Result<Vec<Ranked<DeviceRow>>, sqlx::Error> {
    let sql = format!(
        "SELECT x.* FROM unnest($1::uuid[]) AS k(room_id) CROSS JOIN LATERAL (
                       {} JOIN household_members m ON m.household_id = d.household_id AND m.user_id = $2
                       WHERE d.room_id = k.room_id AND d.kind = ANY($3) AND d.removed_at IS NULL
                       ORDER BY d.name, d.device_id LIMIT {MAX_ROOM_DEVICES}) x LIMIT $4",
        ranked(DEVICE_SELECT, "d.name, d.device_id")
    );
    sqlx::query_as(&sql).bind(rooms).bind(viewer).bind(kinds).bind(limit).fetch_all(pool).await
}

/// For each of `devices` of a household `viewer` belongs to: its commands,
/// newest first, after `after` (the previous page's last: requested at, id),
/// at most `per_device` of each (a page and one more); at most `limit` in
/// all.
pub async fn command_pages(
    pool: &PgPool,
    devices: &[Uuid],
    viewer: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    per_device: i64,
    limit: i64,
) -> Result<Vec<Ranked<CommandRow>>, sqlx::Error> {
    let sql = format!(
        "SELECT x.* FROM unnest($1::uuid[]) AS k(device_id) CROSS JOIN LATERAL (
                       {} JOIN devices d ON d.device_id = c.device_id AND d.household_id = c.household_id
                       JOIN household_members m ON m.household_id = c.household_id AND m.user_id = $2
                       WHERE c.device_id = k.device_id AND c.requested_at IS NOT NULL
                         AND ($3::timestamptz IS NULL OR (c.requested_at, c.command_id) < ($3, $4))
                       ORDER BY c.requested_at DESC, c.command_id DESC LIMIT $5) x LIMIT $6",
        ranked(COMMAND_SELECT, "c.requested_at DESC, c.command_id DESC")
    );
    sqlx::query_as(&sql)
        .bind(devices)
        .bind(viewer)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(per_device)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// A room of a household.
#[derive(Debug, sqlx::FromRow, Clone)]
pub struct RoomRow {
    pub household_id: Uuid,
    pub room_id: Uuid,
    pub name: String,
}

/// The rooms of each of `households`, by name; at most `limit` in all. The
/// caller checks the viewer belongs to them.
pub async fn rooms(pool: &PgPool, households: &[Uuid], limit: i64) -> Result<Vec<Ranked<RoomRow>>, sqlx::Error> {
    sqlx::query_as(
        "SELECT x.* FROM unnest($1::uuid[]) AS k(household_id) CROSS JOIN LATERAL (
                               SELECT row_number() OVER (ORDER BY name, room_id) AS rn, household_id, room_id, name
                               FROM rooms WHERE household_id = k.household_id ORDER BY name, room_id) x LIMIT $2",
    )
    .bind(households)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A member of a household, with their presence as last reported.
#[derive(Debug, sqlx::FromRow, Clone)]
pub struct MemberRow {
    pub household_id: Uuid,
    pub user_id: Uuid,
    pub role: String,
    pub joined_at: DateTime<Utc>,
    pub presence: Option<String>,
    pub presence_since: Option<DateTime<Utc>>,
}

/// The members of each of `households`, by when they joined; at most
/// `limit` in all. The caller checks the viewer may see them.
pub async fn members(pool: &PgPool, households: &[Uuid], limit: i64) -> Result<Vec<Ranked<MemberRow>>, sqlx::Error> {
    sqlx::query_as(
        "SELECT x.* FROM unnest($1::uuid[]) AS k(household_id) CROSS JOIN LATERAL (
                               SELECT row_number() OVER (ORDER BY joined_at, user_id) AS rn, household_id, user_id, role, joined_at,
                                      presence, presence_since
                               FROM household_members WHERE household_id = k.household_id ORDER BY joined_at, user_id) x LIMIT $2",
    )
    .bind(households)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_numbers_the_rows_of_the_first_select_only() {
        let sql = ranked(DEVICE_SELECT, "d.name, d.device_id");
        assert!(sql.starts_with("SELECT row_number() OVER (ORDER BY d.name, d.device_id) AS rn, d.device_id, "));
        assert_eq!(sql.matches("SELECT ").count(), 1);
    }
}
