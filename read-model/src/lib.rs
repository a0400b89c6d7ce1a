//! The read models' one home: their schema (`migrations/`, applied by
//! [`migrate`]) and the typed reads the services share. The projector is the
//! only writer; command-api, query-api and the device bridge read through
//! here, so no service imports another.
//!
//! - [`household`]: the household aggregate as the read models hold it
//!   (command-api decides household commands against it).
//! - [`commands`]: device commands as the bridge reads them back (known,
//!   a device's open ones, the sweeps' picks), and a sender's open ones for
//!   command-api.
//! - [`routines`]: scenes, activations, automations and their runs as the
//!   query API reads them.
//! - [`graph`]: households, memberships, devices with their shadows,
//!   commands, rooms and members as the query API's GraphQL schema reads
//!   them (one query per batch of parents).
//! - [`changes`]: the household change feed as the query API's
//!   subscriptions read it back (resume checks, replays).
//! - [`audit`]: the audit log, a page at a time, for the query API.
//! - [`registry`]: small lookups of devices and invitations (a device's
//!   kind and serials, the removed devices the revoker shuts out, an
//!   invitation by its code).
//! - [`locks`]: every advisory lock the services take, with its key.
//! - [`lifecycle`]: a device command's rank (`device_commands.status_rank`).
//! - this file: small lookups — a member's role, a device's owner and kind,
//!   a household's version, a shadow's version, how far the projection has
//!   applied a partition, whether it shows a consistency token's write.

pub mod audit;
pub mod changes;
pub mod commands;
pub mod graph;
pub mod household;
pub mod lifecycle;
pub mod locks;
pub mod registry;
pub mod routines;
pub mod snapshots;

use homelink_events::{DeviceKind, Role};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

pub use household::load_household;

/// Errors of the read-model store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read-model store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("read-model schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<Error> for homelink_kit::service::ServiceError {
    fn from(e: Error) -> Self {
        match e {
            Error::Db(e) => Self::Db(e),
            Error::Migrate(e) => Self::Migrate(e),
        }
    }
}

/// Applies the read-model migrations. Services keep their own tables in the
/// same database with their own migrations, so versions not found here are
/// not an error.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m.run(pool).await?;
    Ok(())
}

/// `user`'s role in `household`, if a member.
pub async fn role_in(pool: &PgPool, household: Uuid, user: Uuid) -> Result<Option<Role>, sqlx::Error> {
    let r: Option<String> = sqlx::query_scalar("SELECT role FROM household_members WHERE household_id = $1 AND user_id = $2")
        .bind(household)
        .bind(user)
        .fetch_optional(pool)
        .await?;
    Ok(r.and_then(|r| r.parse().ok()))
}

/// A registered (not removed) device: who owns it and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOwner {
    pub household_id: Uuid,
    pub kind: DeviceKind,
    /// The MQTT broker it was assigned (index into the deployment's list).
    pub broker: u16,
}

/// The owner of a device that is registered and not removed.
pub async fn device_owner(pool: &PgPool, device: Uuid) -> Result<Option<DeviceOwner>, sqlx::Error> {
    let row = sqlx::query("SELECT household_id, kind, broker FROM devices WHERE device_id = $1 AND removed_at IS NULL")
        .bind(device)
        .fetch_optional(pool)
        .await?;
    Ok(row.and_then(|r| {
        r.get::<String, _>(1).parse().ok().map(|kind| DeviceOwner {
            household_id: r.get(0),
            kind,
            broker: r.get::<i16, _>(2).max(0) as u16,
        })
    }))
}

/// Every registered device with its owner, and how far the projection had
/// applied each partition of `households_topic` when they were read (one
/// snapshot): a reader that continues the household stream from those
/// positions keeps the registry current without reading it again.
pub async fn registry_snapshot(pool: &PgPool, households_topic: &str) -> Result<RegistrySnapshot, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let positions = sqlx::query_as::<_, (i32, i64)>("SELECT partition, next_offset FROM projector_offsets WHERE topic = $1")
        .bind(households_topic)
        .fetch_all(&mut *tx)
        .await?;
    let rows =
        sqlx::query("SELECT device_id, household_id, kind, broker FROM devices WHERE removed_at IS NULL").fetch_all(&mut *tx).await?;
    tx.commit().await?;
    let devices = rows
        .iter()
        .filter_map(|r| {
            let kind = r.get::<String, _>(2).parse().ok()?;
            Some((r.get(0), DeviceOwner { household_id: r.get(1), kind, broker: r.get::<i16, _>(3).max(0) as u16 }))
        })
        .collect();
    Ok(RegistrySnapshot { devices, positions })
}

/// See [`registry_snapshot`].
#[derive(Debug, Default)]
pub struct RegistrySnapshot {
    pub devices: Vec<(Uuid, DeviceOwner)>,
    /// Next offset per partition of the household stream (partitions not
    /// listed: nothing applied yet).
    pub positions: Vec<(i32, i64)>,
}

/// A device of a household as a member sees it for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAccess {
    pub kind: DeviceKind,
    /// `None` when the user is not a member.
    pub role: Option<Role>,
    pub removed: bool,
    /// Online as of the shadow (offline when it never said so).
    pub online: bool,
}

/// The device `device` of `household` (removed ones included) with `user`'s
/// role there; `None` when the household has no such device.
pub async fn device_access(pool: &PgPool, household: Uuid, device: Uuid, user: Uuid) -> Result<Option<DeviceAccess>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT d.kind, m.role, d.removed_at IS NOT NULL, COALESCE(s.online, false) FROM devices d
           LEFT JOIN household_members m ON m.household_id = d.household_id AND m.user_id = $3
           LEFT JOIN device_shadows s ON s.device_id = d.device_id
         WHERE d.device_id = $1 AND d.household_id = $2",
    )
    .bind(device)
    .bind(household)
    .bind(user)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|r| {
        let kind: DeviceKind = r.get::<String, _>(0).parse().ok()?;
        let role = r.get::<Option<String>, _>(1).and_then(|x| x.parse().ok());
        Some(DeviceAccess { kind, role, removed: r.get(2), online: r.get(3) })
    }))
}

/// Which of `devices` are connected now (their shadow says online).
pub async fn devices_online(pool: &PgPool, devices: &[Uuid]) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    if devices.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<Uuid> = sqlx::query_scalar("SELECT device_id FROM device_shadows WHERE device_id = ANY($1) AND online")
        .bind(devices)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The household's version as projected (`None` before it exists).
pub async fn household_version(db: &mut PgConnection, household: Uuid) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM households WHERE household_id = $1").bind(household).fetch_optional(db).await
}

/// The version of the device's shadow as projected (0 before it has one).
/// Read on `db`: command-api checks it under the device's lock.
pub async fn shadow_version(db: &mut PgConnection, device: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE((SELECT version FROM device_shadows WHERE device_id = $1), 0)").bind(device).fetch_one(db).await
}

/// The households-topic partition of a household, once projected.
pub async fn household_partition(db: &mut PgConnection, household: Uuid) -> Result<Option<i32>, sqlx::Error> {
    Ok(sqlx::query_scalar("SELECT log_partition FROM households WHERE household_id = $1")
        .bind(household)
        .fetch_optional(db)
        .await?
        .flatten())
}

/// Whether the projection has applied every record of `(topic, partition)`
/// below `end` (its committed position, stored with the read models).
pub async fn applied_through(db: &mut PgConnection, topic: &str, partition: i32, end: i64) -> Result<bool, sqlx::Error> {
    let next: i64 =
        sqlx::query_scalar("SELECT COALESCE((SELECT next_offset FROM projector_offsets WHERE topic = $1 AND partition = $2), 0)")
            .bind(topic)
            .bind(partition)
            .fetch_one(db)
            .await?;
    Ok(next >= end)
}

/// How many of the positions `(topic, partition, offset)` the projection
/// has not applied yet (read your writes: a consistency token's positions),
/// in one query.
pub async fn positions_pending(pool: &PgPool, positions: &[(String, i32, i64)]) -> Result<i64, sqlx::Error> {
    let topics: Vec<&str> = positions.iter().map(|p| p.0.as_str()).collect();
    let partitions: Vec<i32> = positions.iter().map(|p| p.1).collect();
    let offsets: Vec<i64> = positions.iter().map(|p| p.2).collect();
    sqlx::query_scalar(
        r#"SELECT count(*) FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS u(t, p, o)
            WHERE COALESCE((SELECT next_offset FROM projector_offsets WHERE topic = u.t AND partition = u.p), 0) <= u.o"#,
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_one(pool)
    .await
}

/// Whether the read models show a write of `household` (read your writes: a
/// consistency token's claims): the household at `version` or later (`None`:
/// any), and every one of `commands` requested there.
pub async fn write_shown(pool: &PgPool, household: Uuid, version: Option<i64>, commands: &[Uuid]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT version FROM households WHERE household_id = $1), 0) >= COALESCE($2, 0)
                AND (SELECT count(*) FROM device_commands WHERE command_id = ANY($3) AND household_id = $1 AND set_values IS NOT NULL)
                    = cardinality($3)",
    )
    .bind(household)
    .bind(version)
    .bind(commands)
    .fetch_one(pool)
    .await
}
