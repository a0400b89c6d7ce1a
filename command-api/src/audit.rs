//! Refused commands into the audit log. (Accepted ones are their own events,
//! with the caller's role and client in the envelope's `meta`.)

use crate::caller::Requester;
use crate::problem::ApiError;
use crate::AppState;
use chrono::Utc;
use homelink_events::event::CommandDenied;
use homelink_events::{Envelope, Event, Role};
use uuid::Uuid;

/// Records a refused command in the audit log (best effort: appended in the
/// background so a refusal is answered at once).
pub fn audit_denied(
    s: &AppState,
    who: &Requester,
    household: Uuid,
    role: Option<Role>,
    action: &str,
    target: Option<String>,
    err: &ApiError,
) {
    let status = err.parts().0.as_u16();
    let denied = CommandDenied { action: action.to_owned(), target, status, reason: err.to_string() };
    let env = Envelope::new(household, who.actor(), &Event::CommandDenied(denied), Utc::now()).with_meta(who.meta(role));
    let (appender, topic, metrics) = (s.appender.clone(), s.topics.audit(), s.metrics.clone());
    metrics.errors.with_label_values(&["command_denied"]).inc();
    tokio::spawn(async move {
        if let Err(e) = appender.append(&topic, &env).await {
            tracing::warn!(error = %e, "could not record a denied command");
            metrics.errors.with_label_values(&["audit_append"]).inc();
        }
    });
}
