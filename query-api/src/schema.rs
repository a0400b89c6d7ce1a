//! The GraphQL schema: read models as objects, one subscription per household.
//!
//! GraphQL objects are their own types, converted from rows and from the
//! projector's notification; neither leaks into the other.

use crate::hub::Hub;
use async_graphql::futures_util::Stream;
use async_graphql::{ComplexObject, Context, ErrorExtensions, Json, Object, Result, Schema, SimpleObject, Subscription, ID};
use chrono::{DateTime, Utc};
use homelink_events::shadow::ShadowChanged;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use std::sync::Arc;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use uuid::Uuid;

pub type HomeLinkSchema = Schema<Query, async_graphql::EmptyMutation, SubscriptionRoot>;

/// Limits applied before any resolver runs.
pub struct Limits {
    pub depth: usize,
    pub complexity: usize,
    pub introspection: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self { depth: 10, complexity: 500, introspection: true }
    }
}

pub fn build(pool: PgPool, hub: Arc<Hub>, limits: &Limits) -> HomeLinkSchema {
    let mut b = Schema::build(Query, async_graphql::EmptyMutation, SubscriptionRoot)
        .data(pool)
        .data(hub)
        .limit_depth(limits.depth)
        .limit_complexity(limits.complexity);
    if !limits.introspection {
        b = b.disable_introspection();
    }
    b.finish()
}

fn parse_id(id: &ID) -> Option<Uuid> {
    Uuid::parse_str(id.as_str()).ok()
}

fn unavailable(e: sqlx::Error) -> async_graphql::Error {
    tracing::warn!(error = %e, "read model query failed");
    async_graphql::Error::new("the read models are unavailable").extend_with(|_, ext| ext.set("code", "UNAVAILABLE"))
}

pub struct Query;

#[Object]
impl Query {
    /// A household and its devices.
    async fn household(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Household>> {
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row = sqlx::query("SELECT household_id, name FROM households WHERE household_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Household { id: ID(r.get::<Uuid, _>(0).to_string()), name: r.get(1), uuid: r.get(0) }))
    }

    /// One device with its shadow.
    async fn device(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Device>> {
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row =
            sqlx::query(&format!("{DEVICE_SELECT} WHERE d.device_id = $1")).bind(id).fetch_optional(pool).await.map_err(unavailable)?;
        Ok(row.map(|r| Device::from_row(&r)))
    }

    /// A command's lifecycle.
    async fn command(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Command>> {
        let Some(id) = parse_id(&id) else {
            return Ok(None);
        };
        let pool = ctx.data::<PgPool>()?;
        let row = sqlx::query(
            "SELECT command_id, device_id, status, reason, set_values, requested_at, acked_at FROM device_commands WHERE command_id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
        Ok(row.map(|r| Command {
            id: ID(r.get::<Uuid, _>(0).to_string()),
            device_id: ID(r.get::<Uuid, _>(1).to_string()),
            status: r.get(2),
            reason: r.get(3),
            set: r.get::<Option<Value>, _>(4).map(Json),
            requested_at: r.get(5),
            acked_at: r.get(6),
        }))
    }
}

const DEVICE_SELECT: &str =
    "SELECT d.device_id, d.household_id, d.kind, d.name, d.room, s.reported, s.seq, s.version, s.battery, s.online, s.last_seen
     FROM devices d LEFT JOIN device_shadows s ON s.device_id = d.device_id";

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Household {
    pub id: ID,
    pub name: String,
    #[graphql(skip)]
    pub uuid: Uuid,
}

#[ComplexObject]
impl Household {
    /// The household's devices, by name.
    async fn devices(&self, ctx: &Context<'_>) -> Result<Vec<Device>> {
        let pool = ctx.data::<PgPool>()?;
        let rows = sqlx::query(&format!("{DEVICE_SELECT} WHERE d.household_id = $1 ORDER BY d.name, d.device_id LIMIT 1000"))
            .bind(self.uuid)
            .fetch_all(pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(Device::from_row).collect())
    }
}

#[derive(SimpleObject)]
pub struct Device {
    pub id: ID,
    pub household_id: ID,
    pub kind: String,
    pub name: String,
    pub room: Option<String>,
    /// Last known state; present once the device reported or changed status.
    pub shadow: Option<Shadow>,
}

impl Device {
    fn from_row(r: &PgRow) -> Self {
        let shadow = r.get::<Option<i64>, _>(7).map(|version| Shadow {
            reported: Json(r.get::<Option<Value>, _>(5).unwrap_or(Value::Null)),
            seq: r.get::<Option<i64>, _>(6).unwrap_or(0),
            version,
            battery: r.get::<Option<i16>, _>(8).map(i32::from),
            online: r.get::<Option<bool>, _>(9).unwrap_or(false),
            last_seen: r.get(10),
        });
        Self {
            id: ID(r.get::<Uuid, _>(0).to_string()),
            household_id: ID(r.get::<Uuid, _>(1).to_string()),
            kind: r.get(2),
            name: r.get(3),
            room: r.get(4),
            shadow,
        }
    }
}

/// A device's last known state.
#[derive(SimpleObject, Clone)]
pub struct Shadow {
    /// Reported capability values.
    pub reported: Json<Value>,
    /// Highest report sequence applied (the device's own counter).
    pub seq: i64,
    /// Bumped on every change of this shadow.
    pub version: i64,
    pub battery: Option<i32>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
}

#[derive(SimpleObject)]
pub struct Command {
    pub id: ID,
    pub device_id: ID,
    /// `requested`, `ok`, `rejected` or `failed`.
    pub status: String,
    pub reason: Option<String>,
    pub set: Option<Json<Value>>,
    pub requested_at: Option<DateTime<Utc>>,
    pub acked_at: Option<DateTime<Utc>>,
}

/// A committed change of one device's shadow.
#[derive(SimpleObject, Clone)]
pub struct DeviceChange {
    pub household_id: ID,
    pub device_id: ID,
    pub shadow: Shadow,
}

impl From<&ShadowChanged> for DeviceChange {
    fn from(c: &ShadowChanged) -> Self {
        Self {
            household_id: ID(c.household_id.to_string()),
            device_id: ID(c.device_id.to_string()),
            shadow: Shadow {
                reported: Json(Value::Object(c.reported.clone())),
                seq: i64::try_from(c.seq).unwrap_or(i64::MAX),
                version: i64::try_from(c.version).unwrap_or(i64::MAX),
                battery: c.battery.map(i32::from),
                online: c.online,
                last_seen: c.last_seen,
            },
        }
    }
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Every committed change of the household's devices, as it happens.
    async fn device_changes(&self, ctx: &Context<'_>, household_id: ID) -> Result<impl Stream<Item = DeviceChange>> {
        let hub = ctx.data::<Arc<Hub>>()?;
        let Some(h) = parse_id(&household_id) else {
            return Err(async_graphql::Error::new("unknown household").extend_with(|_, e| e.set("code", "NOT_FOUND")));
        };
        let rx = hub.subscribe(h);
        Ok(BroadcastStream::new(rx).filter_map(|r| r.ok().map(|c| DeviceChange::from(c.as_ref()))))
    }
}
