//! Scenes and their activations' progress, as GraphQL shows them.
//!
//! A child sees only the scenes marked `childAllowed`. An activation's
//! progress is counted from its commands' lifecycle (the same rows as
//! `command(id)`), so it is exactly as current as the commands.

use crate::reads::RowBudget;
use async_graphql::{Json, SimpleObject, ID};
use chrono::{DateTime, Utc};
use homelink_events::command::retry_id;
use homelink_events::Role;
use homelink_read_model::routines;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Most retries of one device's command followed (a command lives at most
/// 5 minutes and is retried at most every few seconds).
const MAX_RETRIES_SHOWN: usize = 100;

#[derive(SimpleObject)]
pub struct SceneDevice {
    pub device_id: ID,
    /// The values the device takes when the scene is activated.
    pub set: Json<Value>,
}

#[derive(SimpleObject)]
pub struct Scene {
    pub id: ID,
    pub name: String,
    /// Whether a child may activate it.
    pub child_allowed: bool,
    pub devices: Vec<SceneDevice>,
    pub updated_at: DateTime<Utc>,
}

/// One device's part of an activation.
#[derive(SimpleObject)]
pub struct ActivationDevice {
    pub device_id: ID,
    /// Its command (read its whole lifecycle with `command(id)`): the last
    /// one sent for its part — a device that acked `ok` but reported other
    /// values is sent the values again as a new command, which names the
    /// activation as its cause too. `null` when the device got none (see
    /// `reason`).
    pub command_id: Option<ID>,
    /// The command's status (`requested`, `queued`, `delivered`, `ok`,
    /// `confirmed`, `rejected`, `failed`, `expired`, `superseded`), or
    /// `skipped`, or `unconfirmed` (acked `ok`, but its reports never
    /// showed the values while the command lived; counted as failed).
    pub status: String,
    /// Why it failed, was rejected or skipped, or that it was sent again.
    pub reason: Option<String>,
}

/// A scene's activation and how far its devices got.
#[derive(SimpleObject)]
pub struct SceneActivation {
    pub id: ID,
    pub scene_id: ID,
    pub at: DateTime<Utc>,
    /// Who activated it (`user`) and their id.
    pub actor_kind: String,
    pub actor_id: String,
    pub total: i32,
    /// Devices that answered `ok` (or reported the values).
    pub acked: i32,
    /// Devices that answered `rejected` or `failed`, whose command was
    /// revoked, or that acked but never reported the values (`unconfirmed`).
    pub failed: i32,
    /// Devices that never answered within the command's life.
    pub expired: i32,
    /// Devices skipped (removed since the scene was made).
    pub skipped: i32,
    /// Commands still on their way.
    pub pending: i32,
    /// Nothing is pending any more.
    pub done: bool,
    /// Each device, in the scene's order: the ones that did not take their
    /// part are named here with their status and reason.
    pub devices: Vec<ActivationDevice>,
}

/// The household's scenes the viewer may see, by name.
pub async fn of_household(pool: &PgPool, budget: &RowBudget, household: Uuid, role: Role) -> async_graphql::Result<Vec<Scene>> {
    let rows = budget.read(None, |limit| routines::scenes(pool, household, role != Role::Child, limit)).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let devices = r
                .devices
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|d| SceneDevice {
                            device_id: ID(d["deviceId"].as_str().unwrap_or_default().to_owned()),
                            set: Json(d["set"].clone()),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Scene { id: ID(r.scene_id.to_string()), name: r.name, child_allowed: r.child_allowed, devices, updated_at: r.updated_at }
        })
        .collect())
}

/// An activation of a household the viewer belongs to (`None` otherwise,
/// exactly as for an id that does not exist).
pub async fn activation(pool: &PgPool, budget: &RowBudget, id: Uuid, viewer: Uuid) -> async_graphql::Result<Option<SceneActivation>> {
    let row = budget.read_one(|| routines::activation(pool, id, viewer)).await?;
    let Some(a) = row else {
        return Ok(None);
    };
    let statuses = budget.read(None, |limit| routines::caused_commands(pool, id, limit)).await?;
    let mut out = SceneActivation {
        id: ID(id.to_string()),
        scene_id: ID(a.scene_id.to_string()),
        at: a.at,
        actor_kind: a.actor["kind"].as_str().unwrap_or_default().to_owned(),
        actor_id: a.actor["id"].as_str().unwrap_or_default().to_owned(),
        total: 0,
        acked: 0,
        failed: 0,
        expired: 0,
        skipped: 0,
        pending: 0,
        done: false,
        devices: Vec::new(),
    };
    for c in a.commands.as_array().into_iter().flatten() {
        let mut command = c["commandId"].as_str().and_then(|s| Uuid::parse_str(s).ok());
        // Acked but not confirmed, and sent again as a new command: the last
        // of those tells how the device's part went.
        let mut retries = 0;
        while let Some(next) = command.map(retry_id).filter(|r| statuses.iter().any(|c| c.command_id == *r)) {
            command = Some(next);
            retries += 1;
            if retries > MAX_RETRIES_SHOWN {
                break;
            }
        }
        let found = statuses.iter().find(|c| Some(c.command_id) == command);
        // Not projected yet: the command is on its way.
        let (mut status, mut reason, delivered, expired) =
            found.map(|c| (c.status.clone(), c.reason.clone(), c.delivered, c.expired)).unwrap_or(("requested".into(), None, false, false));
        match status.as_str() {
            // Acked, but its reports never showed the values within the
            // command's life (or contradicted them): it did not take its part.
            "ok" if expired => {
                out.failed += 1;
                status = "unconfirmed".into();
                reason = Some(if retries > 0 {
                    format!("acknowledged, but its reports never showed the values within the command's life, though sent again {retries} time(s)")
                } else {
                    "acknowledged, but its reports never showed the values within the command's life".into()
                });
            }
            "ok" | "confirmed" => {
                out.acked += 1;
                if retries > 0 {
                    reason =
                        Some(format!("acknowledged but not confirmed by its reports at first; taken when sent again ({retries} time(s))"));
                }
            }
            "rejected" | "failed" => out.failed += 1,
            "expired" => {
                out.expired += 1;
                reason = Some(if delivered {
                    "delivered and published again while it lived, never answered".into()
                } else {
                    "never delivered: the device stayed offline".into()
                });
            }
            // Replaced by a newer command to the device: this scene's part is over.
            "superseded" => {}
            _ => out.pending += 1,
        }
        out.devices.push(ActivationDevice {
            device_id: ID(c["deviceId"].as_str().unwrap_or_default().to_owned()),
            command_id: command.map(|c| ID(c.to_string())),
            status,
            reason,
        });
    }
    for k in a.skipped.as_array().into_iter().flatten() {
        out.skipped += 1;
        out.devices.push(ActivationDevice {
            device_id: ID(k["deviceId"].as_str().unwrap_or_default().to_owned()),
            command_id: None,
            status: "skipped".into(),
            reason: k["reason"].as_str().map(str::to_owned),
        });
    }
    out.total = out.devices.len() as i32;
    out.done = out.pending == 0;
    Ok(Some(out))
}
