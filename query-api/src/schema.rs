//! The GraphQL schema: read models as objects, one subscription per household.
//!
//! GraphQL objects are their own types, converted from rows and from the
//! projector's notification; neither leaks into the other.

use crate::errors::{codes, error, not_found, unavailable};
use crate::hub::Hub;
pub use crate::types::{AuditEntry, AuditFilter, DeviceChange, HouseholdChange, Shadow};
use async_graphql::connection::Connection;
use async_graphql::connection::Edge;
use async_graphql::futures_util::Stream;
use async_graphql::{ComplexObject, Context, InputObject, Json, Object, Result, Schema, SimpleObject, Subscription, ID};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use homelink_events::household::Action;
use homelink_events::{DeviceKind, Role};
use serde_json::Value;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

pub type HomeLinkSchema = Schema<Query, async_graphql::EmptyMutation, SubscriptionRoot>;

/// Limits applied before any resolver runs.
pub struct Limits {
    pub depth: usize,
    pub complexity: usize,
    pub aliases: usize,
    pub introspection: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self { depth: 10, complexity: 500, aliases: 30, introspection: true }
    }
}

pub fn build(pool: PgPool, hub: Arc<Hub>, limits: &Limits) -> HomeLinkSchema {
    let mut b = Schema::build(Query, async_graphql::EmptyMutation, SubscriptionRoot)
        .data(pool)
        .data(hub)
        .extension(crate::limits::AliasLimit(limits.aliases))
        .limit_depth(limits.depth)
        .limit_complexity(limits.complexity)
        .limit_directives(10);
    if !limits.introspection {
        b = b.disable_introspection();
    }
    b.finish()
}

/// The signed-in user a request runs for (from the verified access token).
#[derive(Debug, Clone, Copy)]
pub struct Viewer {
    pub user_id: Uuid,
}

fn viewer(ctx: &Context<'_>) -> Result<Uuid> {
    ctx.data_opt::<Viewer>().map(|v| v.user_id).ok_or_else(|| error(codes::UNAUTHENTICATED, "sign in first"))
}

fn parse_id(id: &ID) -> Option<Uuid> {
    Uuid::parse_str(id.as_str()).ok()
}

use homelink_read_model::role_in;

pub struct Query;

#[Object]
impl Query {
    /// The signed-in user and the households they belong to.
    async fn me(&self, ctx: &Context<'_>) -> Result<Me> {
        let user = viewer(ctx)?;
        let pool = ctx.data::<PgPool>()?;
        let rows = sqlx::query_as::<_, HouseholdRow>(
            "SELECT h.household_id, h.name, m.role FROM household_members m JOIN households h ON h.household_id = m.household_id
             WHERE m.user_id = $1 ORDER BY h.name, h.household_id",
        )
        .bind(user)
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
        let memberships = rows
            .into_iter()
            .filter_map(HouseholdRow::household)
            .map(|household| Membership { role: household.role.as_str().to_owned(), household })
            .collect();
        Ok(Me { user_id: ID(user.to_string()), memberships })
    }

    /// A household the viewer belongs to; `null` otherwise (exactly as for an id that does not exist).
    async fn household(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Household>> {
        let user = viewer(ctx)?;
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row = sqlx::query_as::<_, HouseholdRow>(
            "SELECT h.household_id, h.name, m.role FROM households h JOIN household_members m ON m.household_id = h.household_id AND m.user_id = $2
             WHERE h.household_id = $1",
        )
        .bind(id)
        .bind(user)
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
        Ok(row.and_then(HouseholdRow::household))
    }

    /// One device with its shadow, if the viewer may see it.
    async fn device(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Device>> {
        let user = viewer(ctx)?;
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row = sqlx::query_as::<_, DeviceRow>(&format!(
            "{DEVICE_SELECT} JOIN household_members m ON m.household_id = d.household_id AND m.user_id = $2 WHERE d.device_id = $1"
        ))
        .bind(id)
        .bind(user)
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
        Ok(row.map(Device::from).filter(|d| d.visible_to(d.viewer_role)))
    }

    /// A command's lifecycle, if the viewer may see its device.
    async fn command(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Command>> {
        let user = viewer(ctx)?;
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row = sqlx::query_as::<_, CommandRow>(&format!(
            "{COMMAND_SELECT} JOIN devices d ON d.device_id = c.device_id AND d.household_id = c.household_id
             JOIN household_members m ON m.household_id = c.household_id AND m.user_id = $2
             WHERE c.command_id = $1"
        ))
        .bind(id)
        .bind(user)
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
        let Some(r) = row else {
            return Ok(None);
        };
        let (kind, role) = (r.kind.parse::<DeviceKind>().ok(), r.role.parse::<Role>().ok());
        let (Some(kind), Some(role)) = (kind, role) else {
            return Ok(None);
        };
        if !role.allows(&Action::SeeDevice(kind)) {
            return Ok(None);
        }
        Ok(Some(Command::from(r)))
    }

    /// The household's audit log, newest first (owners only).
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        household_id: ID,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
        filter: Option<AuditFilter>,
    ) -> Result<Connection<String, AuditEntry>> {
        let user = viewer(ctx)?;
        let pool = ctx.data::<PgPool>()?;
        let h = parse_id(&household_id).ok_or_else(not_found)?;
        match role_in(pool, h, user).await.map_err(unavailable)? {
            None => return Err(not_found()),
            Some(r) if !r.allows(&Action::ReadAudit) => return Err(error(codes::FORBIDDEN, "only owners read the audit log")),
            Some(_) => {}
        }
        crate::audit::page(pool, h, first, after, filter.unwrap_or_default()).await
    }
}

#[derive(SimpleObject)]
pub struct Me {
    pub user_id: ID,
    pub memberships: Vec<Membership>,
}

#[derive(SimpleObject)]
pub struct Membership {
    /// `owner`, `adult` or `child`.
    pub role: String,
    pub household: Household,
}

/// Filters of the audit log; all optional, combined with AND.
/// Devices with their rooms, shadows and the viewer's role (`m.role`, joined by the caller).
const DEVICE_SELECT: &str =
    "SELECT d.device_id, d.household_id, d.kind, d.name, d.room_id, rm.name AS room_name, d.serial, d.registered_at,
       d.removed_at, s.reported, s.seq, s.version, s.battery, s.online, s.last_seen, s.desired, s.metadata,
       d.report_interval_secs, m.role
     FROM devices d LEFT JOIN device_shadows s ON s.device_id = d.device_id LEFT JOIN rooms rm ON rm.room_id = d.room_id";

/// Most devices per page.
const MAX_DEVICE_PAGE: i32 = 200;

/// Filters of a household's devices; all optional, combined with AND.
#[derive(InputObject, Default)]
pub struct DeviceFilter {
    pub room_id: Option<ID>,
    /// Only devices in no room.
    pub unassigned: Option<bool>,
    /// `light`, `plug`, `thermostat`, `lock`, `camera` or `sensor`.
    pub kind: Option<String>,
    pub online: Option<bool>,
    /// Include removed devices (default: no).
    pub include_removed: Option<bool>,
}

fn device_cursor(name: &str, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::json!([name, id]).to_string())
}

fn parse_device_cursor(c: &str) -> Option<(String, Uuid)> {
    let v: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    Some((v.get(0)?.as_str()?.to_owned(), Uuid::parse_str(v.get(1)?.as_str()?).ok()?))
}

/// The kinds of device `role` may see, for SQL.
fn visible_kinds(role: Role) -> Vec<String> {
    DeviceKind::ALL.into_iter().filter(|k| role.allows(&Action::SeeDevice(*k))).map(|k| k.as_str().to_owned()).collect()
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Household {
    pub id: ID,
    pub name: String,
    #[graphql(skip)]
    pub uuid: Uuid,
    /// The viewer's role here.
    #[graphql(skip)]
    pub role: Role,
}

#[ComplexObject]
impl Household {
    /// The viewer's role in this household: `owner`, `adult` or `child`.
    async fn my_role(&self) -> &str {
        self.role.as_str()
    }

    /// The household's devices the viewer may see, by name, a page at a time.
    async fn devices(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
        filter: Option<DeviceFilter>,
    ) -> Result<Connection<String, Device>> {
        if !(1..=MAX_DEVICE_PAGE).contains(&first) {
            return Err(error(codes::BAD_USER_INPUT, format!("first must be between 1 and {MAX_DEVICE_PAGE}")));
        }
        let f = filter.unwrap_or_default();
        let after = match after {
            Some(c) => Some(parse_device_cursor(&c).ok_or_else(|| error(codes::BAD_USER_INPUT, "invalid cursor"))?),
            None => None,
        };
        let room = match &f.room_id {
            Some(r) => Some(parse_id(r).ok_or_else(|| error(codes::BAD_USER_INPUT, "invalid roomId"))?),
            None => None,
        };
        if let Some(k) = &f.kind {
            k.parse::<DeviceKind>().map_err(|_| error(codes::BAD_USER_INPUT, format!("unknown kind `{k}`")))?;
        }
        let pool = ctx.data::<PgPool>()?;
        let rows = sqlx::query_as::<_, DeviceRow>(&format!(
            "{DEVICE_SELECT} JOIN household_members m ON m.household_id = d.household_id AND m.user_id = $2
             WHERE d.household_id = $1 AND d.kind = ANY($3)
               AND ($4::uuid IS NULL OR d.room_id = $4) AND (NOT $5 OR d.room_id IS NULL)
               AND ($6::text IS NULL OR d.kind = $6) AND ($7::bool IS NULL OR COALESCE(s.online, false) = $7)
               AND ($8 OR d.removed_at IS NULL)
               AND ($9::text IS NULL OR (d.name, d.device_id) > ($9, $10))
             ORDER BY d.name, d.device_id LIMIT $11"
        ))
        .bind(self.uuid)
        .bind(viewer(ctx)?)
        .bind(visible_kinds(self.role))
        .bind(room)
        .bind(f.unassigned.unwrap_or(false))
        .bind(&f.kind)
        .bind(f.online)
        .bind(f.include_removed.unwrap_or(false))
        .bind(after.as_ref().map(|a| a.0.clone()))
        .bind(after.as_ref().map(|a| a.1))
        .bind(i64::from(first) + 1)
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
        Ok(page(rows, first, after.is_some(), |r| {
            let d = Device::from(r);
            (device_cursor(&d.name, d.uuid), d)
        }))
    }

    /// The household's rooms, by name, each with the devices the viewer may see.
    async fn rooms(&self, ctx: &Context<'_>) -> Result<Vec<Room>> {
        let pool = ctx.data::<PgPool>()?;
        let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT room_id, name FROM rooms WHERE household_id = $1 ORDER BY name, room_id")
            .bind(self.uuid)
            .fetch_all(pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.into_iter().map(|(uuid, name)| Room { id: ID(uuid.to_string()), name, uuid, role: self.role }).collect())
    }

    /// The members and their roles.
    async fn members(&self, ctx: &Context<'_>) -> Result<Vec<Member>> {
        if !self.role.allows(&Action::SeeMembers) {
            return Err(error(codes::FORBIDDEN, "not allowed"));
        }
        let pool = ctx.data::<PgPool>()?;
        let rows: Vec<(Uuid, String, DateTime<Utc>)> =
            sqlx::query_as("SELECT user_id, role, joined_at FROM household_members WHERE household_id = $1 ORDER BY joined_at, user_id")
                .bind(self.uuid)
                .fetch_all(pool)
                .await
                .map_err(unavailable)?;
        Ok(rows.into_iter().map(|(user, role, joined_at)| Member { user_id: ID(user.to_string()), role, joined_at }).collect())
    }
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Room {
    pub id: ID,
    pub name: String,
    #[graphql(skip)]
    pub uuid: Uuid,
    #[graphql(skip)]
    pub role: Role,
}

#[ComplexObject]
impl Room {
    /// The room's devices the viewer may see (not removed), by name.
    async fn devices(&self, ctx: &Context<'_>) -> Result<Vec<Device>> {
        let pool = ctx.data::<PgPool>()?;
        let rows = sqlx::query_as::<_, DeviceRow>(&format!(
            "{DEVICE_SELECT} JOIN household_members m ON m.household_id = d.household_id AND m.user_id = $2
             WHERE d.room_id = $1 AND d.kind = ANY($3) AND d.removed_at IS NULL ORDER BY d.name, d.device_id LIMIT 1000"
        ))
        .bind(self.uuid)
        .bind(viewer(ctx)?)
        .bind(visible_kinds(self.role))
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
        Ok(rows.into_iter().map(Device::from).collect())
    }
}

#[derive(SimpleObject)]
pub struct Member {
    pub user_id: ID,
    pub role: String,
    pub joined_at: DateTime<Utc>,
}

/// A room as a device refers to it.
#[derive(SimpleObject, Clone)]
pub struct RoomRef {
    pub id: ID,
    pub name: String,
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Device {
    pub id: ID,
    pub household_id: ID,
    pub kind: String,
    pub name: String,
    /// `null` when the device is in no room.
    pub room: Option<RoomRef>,
    /// The manufacturer's serial number, if registered with one.
    pub serial: Option<String>,
    pub registered_at: DateTime<Utc>,
    /// Removed devices stay readable (their shadow and history), marked here.
    pub removed: bool,
    pub removed_at: Option<DateTime<Utc>>,
    /// Online as of the last status the device sent.
    pub online: bool,
    /// How often the device reports (seconds); two missed intervals make it stale.
    pub report_interval_secs: i32,
    pub last_seen: Option<DateTime<Utc>>,
    /// Last known state; present once the device reported or changed status.
    pub shadow: Option<Shadow>,
    #[graphql(skip)]
    pub uuid: Uuid,
    #[graphql(skip)]
    pub viewer_role: Role,
}

/// A household with the viewer's role in it.
#[derive(sqlx::FromRow)]
struct HouseholdRow {
    household_id: Uuid,
    name: String,
    role: String,
}

impl HouseholdRow {
    /// `None` for a role this build does not know.
    fn household(self) -> Option<Household> {
        let role: Role = self.role.parse().ok()?;
        Some(Household { id: ID(self.household_id.to_string()), name: self.name, uuid: self.household_id, role })
    }
}

/// A command's columns, with its device's kind and the viewer's role
/// (`d.kind`, `m.role`: joined by the caller).
const COMMAND_SELECT: &str = "SELECT c.command_id, c.device_id, c.status, c.ack_status, c.reason, c.set_values, c.queued,
       c.requested_at, c.expires_at, c.delivered_at, c.acked_at, c.confirmed_at, c.expired_at, c.superseded_at, c.superseded_by,
       d.kind, m.role
     FROM device_commands c";

/// One row of [`COMMAND_SELECT`].
#[derive(sqlx::FromRow)]
struct CommandRow {
    command_id: Uuid,
    device_id: Uuid,
    status: String,
    ack_status: Option<String>,
    reason: Option<String>,
    set_values: Option<Value>,
    queued: bool,
    requested_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    acked_at: Option<DateTime<Utc>>,
    confirmed_at: Option<DateTime<Utc>>,
    expired_at: Option<DateTime<Utc>>,
    superseded_at: Option<DateTime<Utc>>,
    superseded_by: Option<Uuid>,
    kind: String,
    role: String,
}

impl From<CommandRow> for Command {
    fn from(r: CommandRow) -> Self {
        Self {
            id: ID(r.command_id.to_string()),
            device_id: ID(r.device_id.to_string()),
            status: r.status,
            ack_status: r.ack_status,
            reason: r.reason,
            set: r.set_values.map(Json),
            queued: r.queued,
            requested_at: r.requested_at,
            expires_at: r.expires_at,
            delivered_at: r.delivered_at,
            acked_at: r.acked_at,
            confirmed_at: r.confirmed_at,
            expired_at: r.expired_at,
            superseded_at: r.superseded_at,
            superseded_by: r.superseded_by.map(|u| ID(u.to_string())),
        }
    }
}

/// One row of [`DEVICE_SELECT`].
#[derive(sqlx::FromRow)]
struct DeviceRow {
    device_id: Uuid,
    household_id: Uuid,
    kind: String,
    name: String,
    room_id: Option<Uuid>,
    room_name: Option<String>,
    serial: Option<String>,
    registered_at: DateTime<Utc>,
    removed_at: Option<DateTime<Utc>>,
    reported: Option<Value>,
    seq: Option<i64>,
    version: Option<i64>,
    battery: Option<i16>,
    online: Option<bool>,
    last_seen: Option<DateTime<Utc>>,
    desired: Option<Value>,
    metadata: Option<Value>,
    report_interval_secs: i32,
    role: String,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        let delta = Json(delta(r.reported.as_ref(), r.desired.as_ref()));
        let interval = r.report_interval_secs.max(1) as u32;
        let metadata: std::collections::BTreeMap<String, homelink_events::shadow::PropertyMeta> =
            r.metadata.clone().and_then(|m| serde_json::from_value(m).ok()).unwrap_or_default();
        let (stale, stale_properties) = homelink_events::shadow::staleness(r.last_seen, &metadata, interval, Utc::now());
        let shadow = r.version.map(|version| Shadow {
            reported: Json(r.reported.unwrap_or(Value::Null)),
            seq: r.seq.unwrap_or(0),
            version,
            battery: r.battery.map(i32::from),
            online: r.online.unwrap_or(false),
            last_seen: r.last_seen,
            delta,
            desired: Json(r.desired.unwrap_or_else(|| Value::Object(Default::default()))),
            metadata: Json(r.metadata.unwrap_or_else(|| Value::Object(Default::default()))),
            stale,
            stale_properties,
        });
        let room = r.room_id.map(|id| RoomRef { id: ID(id.to_string()), name: r.room_name.unwrap_or_default() });
        Self {
            id: ID(r.device_id.to_string()),
            household_id: ID(r.household_id.to_string()),
            kind: r.kind,
            name: r.name,
            room,
            serial: r.serial,
            registered_at: r.registered_at,
            removed: r.removed_at.is_some(),
            removed_at: r.removed_at,
            online: shadow.as_ref().is_some_and(|s| s.online),
            report_interval_secs: r.report_interval_secs,
            last_seen: shadow.as_ref().and_then(|s| s.last_seen),
            shadow,
            uuid: r.device_id,
            viewer_role: r.role.parse().unwrap_or(Role::Child),
        }
    }
}

/// The desired values that differ from the reported ones.
fn delta(reported: Option<&Value>, desired: Option<&Value>) -> Value {
    match (reported, desired) {
        (Some(Value::Object(r)), Some(Value::Object(d))) => Value::Object(homelink_events::shadow::delta_of(r, d)),
        (_, Some(Value::Object(d))) => Value::Object(d.clone()),
        _ => Value::Object(Default::default()),
    }
}

impl Device {
    fn visible_to(&self, role: Role) -> bool {
        self.kind.parse::<DeviceKind>().is_ok_and(|k| role.allows(&Action::SeeDevice(k)))
    }
}

/// A command and every step of its life. Its status only moves forward:
/// `requested` or `queued` (the device was offline) → `delivered` (the
/// broker took it for the connected device) → `ok` / `rejected` / `failed`
/// (the device's ack) → `confirmed` (a report carried every value it set);
/// or `expired` (no ack before `expiresAt`) or `superseded` (a newer command
/// set every one of its capabilities before it was acked). Each step keeps its
/// time even when a later one already decided the status.
#[derive(SimpleObject)]
pub struct Command {
    pub id: ID,
    pub device_id: ID,
    pub status: String,
    /// The device's answer (`ok`, `rejected`, `failed`), if it answered.
    pub ack_status: Option<String>,
    pub reason: Option<String>,
    pub set: Option<Json<Value>>,
    /// Accepted while the device was offline.
    pub queued: bool,
    pub requested_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub acked_at: Option<DateTime<Utc>>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
    pub superseded_at: Option<DateTime<Utc>>,
    pub superseded_by: Option<ID>,
}

/// A page of a connection from `first + 1` rows read (the extra one says
/// whether there is a next page), each made a node with its cursor.
fn page<R, T: async_graphql::OutputType>(
    rows: Vec<R>,
    first: i32,
    has_previous: bool,
    node: impl Fn(R) -> (String, T),
) -> Connection<String, T> {
    let mut conn = Connection::new(has_previous, rows.len() > first as usize);
    for r in rows.into_iter().take(first as usize) {
        let (cursor, n) = node(r);
        conn.edges.push(Edge::new(cursor, n));
    }
    conn
}

/// Most commands per page.
const MAX_COMMAND_PAGE: i32 = 100;

fn command_cursor(at: Option<DateTime<Utc>>, id: &ID) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}", at.map(|t| t.timestamp_micros()).unwrap_or(0), id.as_str()))
}

fn parse_command_cursor(c: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let (at, id) = raw.split_once('|')?;
    Some((DateTime::from_timestamp_micros(at.parse().ok()?)?, id.parse().ok()?))
}

#[ComplexObject]
impl Device {
    /// The device's commands, newest first, a page at a time.
    async fn commands(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> Result<Connection<String, Command>> {
        if !(1..=MAX_COMMAND_PAGE).contains(&first) {
            return Err(error(codes::BAD_USER_INPUT, format!("first must be between 1 and {MAX_COMMAND_PAGE}")));
        }
        let after = match after {
            Some(c) => Some(parse_command_cursor(&c).ok_or_else(|| error(codes::BAD_USER_INPUT, "invalid cursor"))?),
            None => None,
        };
        let pool = ctx.data::<PgPool>()?;
        let rows = sqlx::query_as::<_, CommandRow>(&format!(
            "{COMMAND_SELECT} JOIN devices d ON d.device_id = c.device_id AND d.household_id = c.household_id
             JOIN household_members m ON m.household_id = c.household_id AND m.user_id = $2
             WHERE c.device_id = $1 AND c.requested_at IS NOT NULL
               AND ($3::timestamptz IS NULL OR (c.requested_at, c.command_id) < ($3, $4))
             ORDER BY c.requested_at DESC, c.command_id DESC LIMIT $5"
        ))
        .bind(self.uuid)
        .bind(viewer(ctx)?)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(i64::from(first) + 1)
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
        Ok(page(rows, first, after.is_some(), |r| {
            let c = Command::from(r);
            (command_cursor(c.requested_at, &c.id), c)
        }))
    }
}

pub struct SubscriptionRoot;

/// Admits a subscription: the viewer's role is checked first (an id they may
/// not see costs nothing and leaves nothing behind), then the caps, then the
/// channel is joined and the role read again — a change between the first
/// check and the join is not missed.
async fn admit(
    ctx: &Context<'_>,
    hub: &Arc<Hub>,
    pool: &PgPool,
    household_id: &ID,
    user: Uuid,
) -> Result<(tokio::sync::broadcast::Receiver<crate::hub::HubEvent>, crate::hub::Ticket, Role)> {
    let h = parse_id(household_id).ok_or_else(not_found)?;
    role_in(pool, h, user).await.map_err(unavailable)?.ok_or_else(not_found)?;
    let connection = ctx.data_opt::<Arc<crate::hub::ConnectionSubscriptions>>().cloned().unwrap_or_default();
    let ticket = hub.admit(h, user, connection).map_err(|e| error(codes::TOO_MANY_SUBSCRIPTIONS, e.to_string()))?;
    let rx = hub.subscribe(&ticket);
    let role = role_in(pool, h, user).await.map_err(unavailable)?.ok_or_else(not_found)?;
    Ok((rx, ticket, role))
}

/// Admits a subscription and starts its view at `after` (or now).
async fn watch(ctx: &Context<'_>, household_id: &ID, after: Option<i64>) -> Result<crate::hub::Watch> {
    let user = viewer(ctx)?;
    let hub = ctx.data::<Arc<Hub>>()?.clone();
    let pool = ctx.data::<PgPool>()?.clone();
    let after = match after {
        Some(a) => Some(u64::try_from(a).map_err(|_| error(codes::BAD_USER_INPUT, "after must not be negative"))?),
        None => None,
    };
    let (rx, ticket, role) = admit(ctx, &hub, &pool, household_id, user).await?;
    crate::hub::Watch::start(rx, ticket, pool, user, role, after).await.map_err(|e| match e {
        crate::hub::ResumeError::TooOld => crate::hub::too_old(),
        crate::hub::ResumeError::InTheFuture => error(codes::BAD_USER_INPUT, "after is beyond the household's last change"),
        crate::hub::ResumeError::Unavailable(e) => unavailable(e),
    })
}

#[Subscription]
impl SubscriptionRoot {
    /// Every committed change of the household's devices the viewer may see,
    /// as it happens. Ends with a `FORBIDDEN` error when the viewer is removed
    /// from the household; a demotion narrows what it delivers at once.
    ///
    /// Each change carries the household's `changeSeq` (gap-free, increasing
    /// over all its changes). With `after`, the changes after that number
    /// come first (from the retained ones, 24 h by default), then live ones,
    /// with no gap and no duplicate; `RESUME_TOO_OLD` when they are no longer
    /// retained (read the state again, then subscribe without `after`).
    async fn device_changes(
        &self,
        ctx: &Context<'_>,
        household_id: ID,
        after: Option<i64>,
    ) -> Result<impl Stream<Item = Result<DeviceChange>>> {
        Ok(crate::hub::authorized_changes(watch(ctx, &household_id, after).await?))
    }

    /// Everything that changes in the household the viewer may see: device
    /// state (`change: "shadow"`) and registry changes (`DeviceRegistered`,
    /// `DeviceRemoved`, `DeviceRenamed`, `DeviceMoved`, `RoomCreated`,
    /// `RoomRenamed`, `RoomDeleted`). Ends like `deviceChanges` on removal.
    /// Resumes with `after` like `deviceChanges`.
    async fn household_changes(
        &self,
        ctx: &Context<'_>,
        household_id: ID,
        after: Option<i64>,
    ) -> Result<impl Stream<Item = Result<HouseholdChange>>> {
        Ok(crate::hub::authorized_household_changes(watch(ctx, &household_id, after).await?))
    }
}
