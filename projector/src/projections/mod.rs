//! The projections: what each read model does with the events of a batch,
//! inside the applier's transaction ([`crate::apply`] is the engine). They run
//! in this order for every batch:
//!
//! | projection | tables | events |
//! |---|---|---|
//! | [`households`] (members, invitations, rooms, registry, presence, scenes, automations) | `households`, `household_members`, `household_invitations`, `household_refused_events`, `rooms`, `devices`, `scenes`, `automations` | the household stream, folded through `Household::apply` |
//! | [`commands`] | `device_commands`, `scene_activations` | `DeviceCommandRequested`, `…Delivered`, `…Acked`, `…Expired`, `SceneActivated` |
//! | [`shadows`] | `device_shadows` (and `device_commands`: confirmations) | `DeviceStateReported`, `DeviceStatusChanged`, `DeviceCommandRequested`, `DeviceCommandExpired` |
//! | [`changes`] | `household_change_seqs`, `household_changes` | every shadow, registry and command change: its `changeSeq` |
//! | [`audit`] | `audit_log` | household commands, device commands, `CommandDenied` |
//! | [`runs`] | `automation_runs`, `automations.paused_*` | `AutomationTriggered`, `AutomationRunStepped`, `AutomationRunFinished`, `AutomationPaused`, `AutomationResumed` |
//! | [`counts`] | `household_event_counts` | every event |
//!
//! Each returns the notifications to send on commit, if any. The counts are
//! written by the applier's closing statement, with the batch's positions
//! and its notifications: a batch of reports is three statements between
//! `BEGIN` and `COMMIT` (shadows, change numbers with the retained changes,
//! and that closing one).

pub mod audit;
pub mod changes;
pub mod commands;
pub mod counts;
pub mod households;
pub mod runs;
pub mod shadows;

use homelink_events::shadow::{notification_line, pack_notifications};
use homelink_events::topics::{COMMAND_CHANGED_CHANNEL, REGISTRY_CHANGED_CHANNEL, SHADOW_CHANGED_CHANNEL};
use homelink_events::Event;
use homelink_kit::reader::Located;
use sqlx::{Postgres, Transaction};

/// What a batch's projections leave for after its COMMIT.
pub struct Applied {
    /// The notifications to send on commit, as `(channel, payload)`.
    pub notifications: Vec<(&'static str, String)>,
    /// The touched shadows, for the single writer's cache.
    pub shadows: shadows::Staged,
    /// Cached shadows found to differ from their rows (debug builds).
    pub diverged: u64,
    /// The events counted per household and type.
    pub counts: counts::Counts,
}

/// Applies decoded events in log order; `feed`: number the changes into the
/// change feed (`household_changes`), which a rebuild leaves alone.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    work: &[(&Located, Event)],
    cache: &shadows::ShadowCache,
    feed: bool,
) -> Result<Applied, sqlx::Error> {
    let mut folded = households::fold(tx, work).await?;
    // Commands first: a report in this batch may confirm one requested in it.
    let mut touched = commands::apply(tx, work).await?;
    let shadows = shadows::apply(tx, work, cache).await?;
    commands::confirm(tx, &shadows.confirmed).await?;
    touched.extend(shadows.confirmed.iter().map(|(c, _)| *c));
    touched.sort_unstable();
    touched.dedup();
    let mut command_changes = commands::changed(tx, &touched).await?;
    let mut shadow_changes = shadows.notes;
    let mut registry = std::mem::take(&mut folded.registry);
    if feed {
        changes::sequence(tx, &mut shadow_changes, &mut registry, &mut command_changes).await?;
    }
    let shadow_notes: Vec<String> = shadow_changes.iter().map(notification_line).collect();
    audit::apply(tx, work, &folded.refused).await?;
    runs::apply(tx, work).await?;
    // One notification per batch (a few when it is large), not one per change.
    // Membership changes first, so a subscriber demoted or removed in this
    // batch loses what it may no longer see before this batch's changes
    // reach it; then registry changes: they took the lower change numbers.
    let mut notes: Vec<(&'static str, String)> = std::mem::take(&mut folded.notifications);
    notes.extend(registry.iter().map(|r| (REGISTRY_CHANGED_CHANNEL, serde_json::to_string(r).unwrap_or_default())));
    notes.extend(pack_notifications(shadow_notes).into_iter().map(|n| (SHADOW_CHANGED_CHANNEL, n)));
    notes.extend(command_changes.iter().map(|c| (COMMAND_CHANGED_CHANNEL, serde_json::to_string(c).unwrap_or_default())));
    Ok(Applied { notifications: notes, shadows: shadows.staged, diverged: shadows.diverged, counts: counts::of(work) })
}
