//! The GraphQL schema: read models as objects, one subscription per household.
//!
//! GraphQL objects are their own types, converted from rows and from the
//! projector's notification; neither leaks into the other.

use crate::errors::{codes, error, not_found, unavailable};
use crate::hub::Hub;
use crate::reads::{budget, Batch};
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
use homelink_read_model::graph::{self, CommandRow, DeviceRow, HouseholdRow, MemberRow, Ranked, RoomRow};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use uuid::Uuid;

pub type HomeLinkSchema = Schema<Query, async_graphql::EmptyMutation, SubscriptionRoot>;

/// Limits of one request: depth, complexity and aliases are checked before
/// any resolver runs, the rows while it runs.
///
/// Complexity counts lists by their size: a field with `first` costs
/// `first × (its selection) + 1` ([`page_cost`]), a list without one its
/// counted size × its selection + 1 ([`list_cost`]: [`ROOMS_COUNTED`],
/// [`ROOM_DEVICES_COUNTED`], [`MEMBERS_COUNTED`], [`MEMBERSHIPS_COUNTED`]),
/// every other field 1 + its selection. Those sizes are estimates of a large
/// household; what a request really reads is capped by `rows`
/// ([`crate::reads::RowBudget`]).
pub struct Limits {
    pub depth: usize,
    pub complexity: usize,
    pub aliases: usize,
    pub introspection: bool,
    /// Rows one request may read.
    pub rows: i64,
}

impl Default for Limits {
    /// The largest queries the app sends cost about 7,200 (every membership
    /// with its members and first 50 devices) and 4,300 (a page of 200
    /// devices with its rooms' devices); 30 aliases of either, or a room's
    /// devices' commands, cost far more than 10,000.
    fn default() -> Self {
        Self { depth: 10, complexity: 10_000, aliases: 30, introspection: true, rows: crate::reads::DEFAULT_MAX_ROWS }
    }
}

/// Rooms a household is counted with in complexity (no `first`).
pub const ROOMS_COUNTED: i32 = 20;
/// Devices a room is counted with: 20 rooms of 50, a household of 1,000.
pub const ROOM_DEVICES_COUNTED: i32 = 50;
/// Members a household is counted with.
pub const MEMBERS_COUNTED: i32 = 20;
/// Households a user is counted with (`me { memberships }`).
pub const MEMBERSHIPS_COUNTED: i32 = 10;

/// No one field costs more: sums of them cannot overflow, and anything
/// near it is refused anyway.
const MAX_FIELD_COST: usize = 1_000_000_000;

/// The complexity of a list of `items` whose selection costs `child`.
fn list_cost(items: i32, child: usize) -> usize {
    usize::try_from(items.max(0)).unwrap_or(0).saturating_mul(child).saturating_add(1).min(MAX_FIELD_COST)
}

/// The complexity of a page of `first` (at most `max`, the resolver refuses
/// more) whose selection costs `child`.
fn page_cost(first: i32, max: i32, child: usize) -> usize {
    list_cost(first.clamp(0, max), child)
}

pub fn build(pool: PgPool, hub: Arc<Hub>, log: crate::dry_run::Log, limits: &Limits) -> HomeLinkSchema {
    builder(pool, hub, log, limits).finish()
}

fn builder(
    pool: PgPool,
    hub: Arc<Hub>,
    log: crate::dry_run::Log,
    limits: &Limits,
) -> async_graphql::SchemaBuilder<Query, async_graphql::EmptyMutation, SubscriptionRoot> {
    let mut b = Schema::build(Query, async_graphql::EmptyMutation, SubscriptionRoot)
        .data(pool)
        .data(hub)
        .data(log)
        .extension(crate::limits::AliasLimit(limits.aliases))
        .extension(crate::reads::ReadLimit::<Loaders>::new(limits.rows))
        .limit_depth(limits.depth)
        .limit_complexity(limits.complexity)
        .limit_directives(10);
    if !limits.introspection {
        b = b.disable_introspection();
    }
    b
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
        let rows = budget(ctx)?.read(None, |limit| graph::memberships(pool, user, limit)).await?;
        let memberships = rows
            .into_iter()
            .filter_map(household_of)
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
        let row = budget(ctx)?.read_one(|| graph::household(pool, id, user)).await?;
        Ok(row.and_then(household_of))
    }

    /// One device with its shadow, if the viewer may see it.
    async fn device(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Device>> {
        let user = viewer(ctx)?;
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row = budget(ctx)?.read_one(|| graph::device(pool, id, user)).await?;
        Ok(row.map(Device::from).filter(|d| d.visible_to(d.viewer_role)))
    }

    /// The whole household as it was at `at` — members and roles, rooms,
    /// devices (those the viewer's role may see) with every twin (reported,
    /// desired, online) — folded from the log up to that instant. Members
    /// only (their role now); `null` otherwise.
    async fn household_at(&self, ctx: &Context<'_>, id: ID, at: DateTime<Utc>) -> Result<Option<crate::past::PastHousehold>> {
        let user = viewer(ctx)?;
        let Some(h) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let Some(role) = budget(ctx)?.read_one(|| role_in(pool, h, user)).await? else {
            return Ok(None);
        };
        crate::past::household_at(pool, ctx.data::<crate::dry_run::Log>()?, role, h, at).await.map(Some)
    }

    /// A command's lifecycle, if the viewer may see its device.
    async fn command(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Command>> {
        let user = viewer(ctx)?;
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row = budget(ctx)?.read_one(|| graph::command(pool, id, user)).await?;
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

    /// An automation of a household the viewer belongs to, with its runs
    /// (`runs(first)`, newest first); `null` otherwise.
    async fn automation(&self, ctx: &Context<'_>, id: ID) -> Result<Option<crate::automations::Automation>> {
        let user = viewer(ctx)?;
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        crate::automations::one(ctx.data::<PgPool>()?, budget(ctx)?, id, user).await
    }

    /// An automation that is not saved yet, played over the household's
    /// recorded history from the log between `since` and `until` (at most 7
    /// days): when it would have fired and what each run would have done.
    /// Sends nothing. Owners and adults.
    async fn automation_dry_run(
        &self,
        ctx: &Context<'_>,
        household_id: ID,
        definition: Json<Value>,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<crate::dry_run::DryRun> {
        let user = viewer(ctx)?;
        let pool = ctx.data::<PgPool>()?;
        let h = parse_id(&household_id).ok_or_else(not_found)?;
        match budget(ctx)?.read_one(|| role_in(pool, h, user)).await? {
            None => return Err(not_found()),
            Some(r) if !r.allows(&Action::ManageDevices) => return Err(error(codes::FORBIDDEN, "only owners and adults try automations")),
            Some(_) => {}
        }
        crate::dry_run::run(ctx.data::<crate::dry_run::Log>()?, user, h, definition.0, since, until).await
    }

    /// A scene activation of a household the viewer belongs to, with its
    /// devices' progress; `null` otherwise.
    async fn scene_activation(&self, ctx: &Context<'_>, id: ID) -> Result<Option<crate::scenes::SceneActivation>> {
        let user = viewer(ctx)?;
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        crate::scenes::activation(ctx.data::<PgPool>()?, budget(ctx)?, id, user).await
    }

    /// The household's audit log, newest first (owners only).
    #[graphql(complexity = "page_cost(first, crate::audit::MAX_PAGE, child_complexity)")]
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
        let budget = budget(ctx)?;
        match budget.read_one(|| role_in(pool, h, user)).await? {
            None => return Err(not_found()),
            Some(r) if !r.allows(&Action::ReadAudit) => return Err(error(codes::FORBIDDEN, "only owners read the audit log")),
            Some(_) => {}
        }
        crate::audit::page(pool, budget, h, first, after, filter.unwrap_or_default()).await
    }
}

#[derive(SimpleObject)]
pub struct Me {
    pub user_id: ID,
    #[graphql(complexity = "list_cost(MEMBERSHIPS_COUNTED, child_complexity)")]
    pub memberships: Vec<Membership>,
}

#[derive(SimpleObject)]
pub struct Membership {
    /// `owner`, `adult` or `child`.
    pub role: String,
    pub household: Household,
}

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

    /// The household's automations, by name.
    async fn automations(&self, ctx: &Context<'_>) -> Result<Vec<crate::automations::Automation>> {
        crate::automations::of_household(ctx.data::<PgPool>()?, budget(ctx)?, self.uuid).await
    }

    /// The IANA time zone schedules and time conditions are read in (`UTC`
    /// until set).
    async fn time_zone(&self, ctx: &Context<'_>) -> Result<String> {
        crate::automations::time_zone(ctx.data::<PgPool>()?, budget(ctx)?, self.uuid).await
    }

    /// The household's scenes, by name (a child sees the `childAllowed` ones).
    async fn scenes(&self, ctx: &Context<'_>) -> Result<Vec<crate::scenes::Scene>> {
        crate::scenes::of_household(ctx.data::<PgPool>()?, budget(ctx)?, self.uuid, self.role).await
    }

    /// The household's devices the viewer may see, by name, a page at a time.
    #[graphql(complexity = "page_cost(first, MAX_DEVICE_PAGE, child_complexity)")]
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
        let (pool, budget, user) = (ctx.data::<PgPool>()?, budget(ctx)?, viewer(ctx)?);
        let has_previous = after.is_some();
        let args = DevicePage {
            role: self.role,
            first,
            filter: graph::DeviceFilter {
                room,
                unassigned: f.unassigned.unwrap_or(false),
                kind: f.kind,
                online: f.online,
                include_removed: f.include_removed.unwrap_or(false),
                after,
            },
        };
        let rows = loaders(ctx)?
            .device_pages
            .load(args, self.uuid, |g, households| async move {
                let per_household = i64::from(g.first) + 1;
                let kinds = visible_kinds(g.role);
                let want = per_household * households.len() as i64;
                let rows = budget
                    .read(Some(want), |limit| graph::device_pages(pool, &households, user, &kinds, &g.filter, per_household, limit))
                    .await?;
                Ok(by_parent(rows, |r| r.household_id))
            })
            .await?
            .unwrap_or_default();
        Ok(page(rows, first, has_previous, |r| {
            let d = Device::from(r);
            (device_cursor(&d.name, d.uuid), d)
        }))
    }

    /// The household's rooms, by name, each with the devices the viewer may see.
    #[graphql(complexity = "list_cost(ROOMS_COUNTED, child_complexity)")]
    async fn rooms(&self, ctx: &Context<'_>) -> Result<Vec<Room>> {
        let (pool, budget) = (ctx.data::<PgPool>()?, budget(ctx)?);
        let rows = loaders(ctx)?
            .rooms
            .load((), self.uuid, |(), households| async move {
                let rows = budget.read(None, |limit| graph::rooms(pool, &households, limit)).await?;
                Ok(by_parent(rows, |r| r.household_id))
            })
            .await?
            .unwrap_or_default();
        Ok(rows.into_iter().map(|r| Room { id: ID(r.room_id.to_string()), name: r.name, uuid: r.room_id, role: self.role }).collect())
    }

    /// The members and their roles.
    #[graphql(complexity = "list_cost(MEMBERS_COUNTED, child_complexity)")]
    async fn members(&self, ctx: &Context<'_>) -> Result<Vec<Member>> {
        if !self.role.allows(&Action::SeeMembers) {
            return Err(error(codes::FORBIDDEN, "not allowed"));
        }
        let (pool, budget) = (ctx.data::<PgPool>()?, budget(ctx)?);
        let rows = loaders(ctx)?
            .members
            .load((), self.uuid, |(), households| async move {
                let rows = budget.read(None, |limit| graph::members(pool, &households, limit)).await?;
                Ok(by_parent(rows, |r| r.household_id))
            })
            .await?
            .unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|r| Member {
                user_id: ID(r.user_id.to_string()),
                role: r.role,
                joined_at: r.joined_at,
                home: r.presence.as_deref().map(|p| p == "home"),
                presence_since: r.presence_since,
            })
            .collect())
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
    /// The room's devices the viewer may see (not removed), by name (at most 1,000).
    #[graphql(complexity = "list_cost(ROOM_DEVICES_COUNTED, child_complexity)")]
    async fn devices(&self, ctx: &Context<'_>) -> Result<Vec<Device>> {
        let (pool, budget, user) = (ctx.data::<PgPool>()?, budget(ctx)?, viewer(ctx)?);
        let rows = loaders(ctx)?
            .room_devices
            .load(self.role, self.uuid, |role, rooms| async move {
                let kinds = visible_kinds(role);
                let want = graph::MAX_ROOM_DEVICES * rooms.len() as i64;
                let rows = budget.read(Some(want), |limit| graph::room_devices(pool, &rooms, user, &kinds, limit)).await?;
                Ok(by_parent(rows, |r| r.room_id.unwrap_or_default()))
            })
            .await?
            .unwrap_or_default();
        Ok(rows.into_iter().map(Device::from).collect())
    }
}

#[derive(SimpleObject)]
pub struct Member {
    pub user_id: ID,
    pub role: String,
    pub joined_at: DateTime<Utc>,
    /// Whether the member is home, as their app last reported it
    /// (`PUT …/presence`); `null` when it never reported.
    pub home: Option<bool>,
    /// When `home` last changed.
    pub presence_since: Option<DateTime<Utc>>,
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

/// The household of a row with the viewer's role; `None` for a role this
/// build does not know.
fn household_of(r: HouseholdRow) -> Option<Household> {
    let role: Role = r.role.parse().ok()?;
    Some(Household { id: ID(r.household_id.to_string()), name: r.name, uuid: r.household_id, role })
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
            revoked_at: r.revoked_at,
            caused_by: r.caused_by.map(|c| ID(c.to_string())),
        }
    }
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
/// set every one of its capabilities before it was acked), or `rejected`
/// by the platform before it was sent (`revokedAt`, with the `reason`): its
/// sender lost the right to send it. Each step keeps its
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
    /// When the platform ended it because its sender may no longer send it
    /// (removed from the household, or a role that does not allow it).
    pub revoked_at: Option<DateTime<Utc>>,
    /// What sent it besides its sender's tap: the scene activation
    /// (`sceneActivation(id)`); `null` for a command sent on its own.
    pub caused_by: Option<ID>,
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
    /// The device's timeline from the log, oldest first: every report,
    /// command step (requested, delivered, acked, expired, revoked), status
    /// change and registry change, as recorded — not merged.
    #[graphql(complexity = "page_cost(first, crate::past::MAX_TIMELINE_PAGE, child_complexity)")]
    async fn history(
        &self,
        ctx: &Context<'_>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
    ) -> Result<Connection<String, crate::past::TimelineEntry>> {
        let h = parse_id(&self.household_id).ok_or_else(not_found)?;
        crate::past::timeline(ctx.data::<crate::dry_run::Log>()?, (h, self.uuid), since, until, first, after).await
    }

    /// The device's commands, newest first, a page at a time.
    #[graphql(complexity = "page_cost(first, MAX_COMMAND_PAGE, child_complexity)")]
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
        let (pool, budget, user) = (ctx.data::<PgPool>()?, budget(ctx)?, viewer(ctx)?);
        let rows = loaders(ctx)?
            .commands
            .load(CommandPage { first, after }, self.uuid, |g, devices| async move {
                let per_device = i64::from(g.first) + 1;
                let want = per_device * devices.len() as i64;
                let rows = budget.read(Some(want), |limit| graph::command_pages(pool, &devices, user, g.after, per_device, limit)).await?;
                Ok(by_parent(rows, |r| r.device_id))
            })
            .await?
            .unwrap_or_default();
        Ok(page(rows, first, after.is_some(), |r| {
            let c = Command::from(r);
            (command_cursor(c.requested_at, &c.id), c)
        }))
    }
}

/// The batches of nested lookups of one request ([`crate::reads::Batch`]):
/// each level of a query reads its parents' children with one query per
/// distinct set of arguments, not one per parent.
#[derive(Default)]
pub struct Loaders {
    /// `Household.devices`, by household.
    device_pages: Batch<DevicePage, Uuid, Vec<DeviceRow>>,
    /// `Room.devices`, by room, for the viewer's role.
    room_devices: Batch<Role, Uuid, Vec<DeviceRow>>,
    /// `Device.commands`, by device.
    commands: Batch<CommandPage, Uuid, Vec<CommandRow>>,
    /// `Household.rooms`, by household.
    rooms: Batch<(), Uuid, Vec<RoomRow>>,
    /// `Household.members`, by household.
    members: Batch<(), Uuid, Vec<MemberRow>>,
}

fn loaders<'a>(ctx: &Context<'a>) -> Result<&'a Loaders> {
    ctx.data::<Loaders>()
}

/// The arguments of a `Household.devices` page (and the role, which decides
/// the kinds the viewer sees).
#[derive(Clone, PartialEq, Eq, Hash)]
struct DevicePage {
    role: Role,
    first: i32,
    filter: graph::DeviceFilter,
}

/// The arguments of a `Device.commands` page.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct CommandPage {
    first: i32,
    after: Option<(DateTime<Utc>, Uuid)>,
}

/// The rows of a batch query by parent, each parent's in rank order.
fn by_parent<K: Hash + Eq, T>(rows: Vec<Ranked<T>>, parent: impl Fn(&T) -> K) -> HashMap<K, Vec<T>> {
    let mut ranked: HashMap<K, Vec<(i64, T)>> = HashMap::new();
    for r in rows {
        ranked.entry(parent(&r.row)).or_default().push((r.rn, r.row));
    }
    ranked
        .into_iter()
        .map(|(k, mut rows)| {
            rows.sort_by_key(|(rn, _)| *rn);
            (k, rows.into_iter().map(|(_, r)| r).collect())
        })
        .collect()
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
    /// `RoomRenamed`, `RoomDeleted`), and members' presence (`PresenceChanged`
    /// with `userId` and `home`). Ends like `deviceChanges` on removal.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The complexity of `query` under the default limits, or `None` when
    /// it is refused as too complex. Runs without a viewer: every resolver
    /// stops at `UNAUTHENTICATED`, nothing is read.
    async fn complexity(query: &str, variables: Value) -> Option<usize> {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:1/none").expect("lazy pool");
        let hub = Arc::new(Hub::new(Default::default(), &homelink_kit::metrics::ServiceMetrics::new("test")));
        let log = crate::dry_run::Log {
            bootstrap: "127.0.0.1:1".into(),
            topics: homelink_events::Topics::new("test."),
            snapshot_every: crate::dry_run::SNAPSHOT_EVERY,
        };
        let schema = builder(pool, hub, log, &Limits::default()).extension(async_graphql::extensions::Analyzer).finish();
        let request = async_graphql::Request::new(query).variables(async_graphql::Variables::from_json(variables));
        let r = serde_json::to_value(schema.execute(request).await).expect("json");
        if r["errors"].as_array().into_iter().flatten().any(|e| e["message"].as_str().is_some_and(|m| m.contains("too complex"))) {
            return None;
        }
        let c = r["extensions"]["analyzer"]["complexity"].as_u64().unwrap_or_else(|| panic!("{query}: {r}"));
        Some(c as usize)
    }

    /// The queries the app, the tools and the tests send, with their
    /// complexity: each fits the default limit of 10,000.
    #[tokio::test]
    async fn the_apps_queries_fit_the_complexity_limit() {
        let h = json!({"h": Uuid::nil(), "id": Uuid::nil()});
        let queries: &[(&str, usize)] = &[
            ("{ me { userId } }", 2),
            ("query($id: ID!) { device(id: $id) { id } }", 2),
            ("query($id: ID!) { command(id: $id) { id status ackStatus reason queued requestedAt expiresAt deliveredAt ackedAt confirmedAt expiredAt supersededAt supersededBy set } }", 15),
            ("query($id: ID!) { device(id: $id) { shadow { reported desired delta metadata version online } } }", 8),
            // tools/src/load: a page of 200 devices.
            ("query($h: ID!, $after: String) { household(id: $h) { devices(first: 200, after: $after) { edges { cursor node { id shadow { seq } } } } } }", 1202),
            ("query($h: ID!) { household(id: $h) { name devices { nodes { id kind shadow { reported online } } } } }", 303),
            ("query($h: ID!) { household(id: $h) { rooms { name devices { id } } devices(filter: { includeRemoved: true }) { nodes { id name serial removed room { name } shadow { reported } } } } }", 1493),
            ("query($h: ID!) { household(id: $h) { rooms { name } unassigned: devices(filter: { unassigned: true }) { nodes { name room { name } } }
                thermostats: devices(filter: { kind: \"thermostat\" }) { nodes { name } }
                page: devices(first: 1) { edges { cursor node { name } } pageInfo { hasNextPage endCursor } } } }", 332),
            ("query($h: ID!, $id: ID!) { me { userId memberships { role } } household(id: $h) { myRole devices { nodes { kind } } members { role } }
                cam: device(id: $id) { id } lamp: device(id: $id) { id } command(id: $id) { id } }", 143),
            ("query($h: ID!) { auditLog(householdId: $h, first: 100) { edges { node { action outcome actorKind detail } } } }", 601),
            ("query($h: ID!) { household(id: $h) { devices(first: 50) { nodes { id shadow { online seq } } } } }", 252),
            // README: the registry with a page of 200 devices.
            ("query($h: ID!) { household(id: $h) { rooms { name devices { name } } devices(first: 200) { edges { cursor
                node { id name kind room { name } removed online lastSeen shadow { reported } } } pageInfo { hasNextPage endCursor } } } }", 4243),
            ("query($id: ID!) { device(id: $id) { commands(first: 20) { edges { cursor node { id status ackStatus reason queued
                requestedAt deliveredAt ackedAt confirmedAt expiredAt supersededAt supersededBy expiresAt } } pageInfo { hasNextPage endCursor } } } }", 382),
            // One alias of the wide query in e2e/tests/api.rs: every household with its members and devices.
            ("{ me { userId memberships { role household { id name myRole members { userId role joinedAt }
                devices { nodes { id kind name room { name } shadow { reported seq version battery online lastSeen } } } } } } }", 7173),
        ];
        for (q, expected) in queries {
            assert_eq!(complexity(q, h.clone()).await, Some(*expected), "{q}");
        }
        // Variables count as their values.
        let q = "query($h: ID!, $first: Int!) { auditLog(householdId: $h, first: $first) { edges { cursor node { at actorId role client
            action target outcome status detail } } pageInfo { hasNextPage endCursor } } }";
        assert_eq!(complexity(q, json!({"h": Uuid::nil(), "first": 10})).await, Some(151));
        assert_eq!(complexity(q, json!({"h": Uuid::nil(), "first": 200})).await, Some(3001));
    }

    #[tokio::test]
    async fn lists_are_counted_by_their_size() {
        let h = json!({"h": Uuid::nil()});
        // Defect 10: a room's devices' commands, under one alias or 30.
        let nested = "household(id: $h) { rooms { devices { commands(first: 100) { nodes { id } } } } }";
        assert_eq!(complexity(&format!("query($h: ID!) {{ {nested} }}"), h.clone()).await, None);
        let aliased: String = (0..30).map(|i| format!("a{i}: {nested} ")).collect();
        assert_eq!(complexity(&format!("query($h: ID!) {{ {aliased} }}"), h.clone()).await, None);
        // `first` multiplies: 200 × (nodes + id) + 1, + household.
        assert_eq!(complexity("query($h: ID!) { household(id: $h) { devices(first: 200) { nodes { id } } } }", h.clone()).await, Some(402));
        assert_eq!(complexity("query($h: ID!) { household(id: $h) { devices(first: 2) { nodes { id } } } }", h.clone()).await, Some(6));
        // An out-of-range `first` counts as the page maximum (and the resolver refuses it).
        assert_eq!(
            complexity("query($h: ID!) { household(id: $h) { devices(first: 100000) { nodes { id } } } }", h.clone()).await,
            Some(402)
        );
        // 30 aliases of a full page are too many.
        let pages: String = (0..30).map(|i| format!("a{i}: household(id: $h) {{ devices(first: 200) {{ nodes {{ id }} }} }} ")).collect();
        assert_eq!(complexity(&format!("query($h: ID!) {{ {pages} }}"), h).await, None);
    }
}
