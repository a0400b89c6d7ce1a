//! The projections: what each read model does with the events of a batch,
//! inside the applier's transaction ([`crate::apply`] is the engine). They run
//! in this order for every batch:
//!
//! | projection | tables | events |
//! |---|---|---|
//! | [`households`] (members, invitations, rooms, registry) | `households`, `household_members`, `household_invitations`, `household_refused_events`, `rooms`, `devices` | the household stream, folded through `Household::apply` |
//! | [`shadows`] | `device_shadows` | `DeviceStateReported`, `DeviceStatusChanged` |
//! | [`commands`] | `device_commands` | `DeviceCommandRequested`, `DeviceCommandAcked` |
//! | [`audit`] | `audit_log` | household commands, device commands, `CommandDenied` |
//! | [`counts`] | `household_event_counts` | every event |
//!
//! Each returns the notifications to send on commit, if any.

pub mod audit;
pub mod commands;
pub mod counts;
pub mod households;
pub mod shadows;

use homelink_events::shadow::pack_notifications;
use homelink_events::topics::SHADOW_CHANGED_CHANNEL;
use homelink_events::Event;
use homelink_kit::push::Located;
use sqlx::{Postgres, Transaction};

/// Applies decoded events in log order; returns the notifications to send on
/// commit as `(channel, payload)`.
pub async fn apply(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)]) -> Result<Vec<(&'static str, String)>, sqlx::Error> {
    let folded = households::fold(tx, work).await?;
    let shadow_notes = shadows::apply(tx, work).await?;
    commands::apply(tx, work).await?;
    audit::apply(tx, work, &folded.refused).await?;
    counts::apply(tx, work).await?;
    // One notification per batch (a few when it is large), not one per change.
    let mut notes: Vec<(&'static str, String)> =
        pack_notifications(shadow_notes).into_iter().map(|n| (SHADOW_CHANGED_CHANNEL, n)).collect();
    notes.extend(folded.notifications);
    Ok(notes)
}
