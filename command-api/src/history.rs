//! `GET /v1/households/{h}/history`: the household's history from the log
//! (not the read models), paged, for owners only, every read audited
//! (`HistoryExported`). `homelink history export` pages through it.

use crate::audit::audit_denied;
use crate::caller::{path_id, Caller, Requester};
use crate::problem::{ApiError, Problem};
use crate::write_path::HouseholdCommand;
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use homelink_events::event::HistoryExported;
use homelink_events::household::Action;
use homelink_events::{Envelope, Event, Role};
use homelink_kit::history::{self, Cursor, Record, Scan};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// Most records in one page.
pub const MAX_PAGE: usize = 5000;
const DEFAULT_PAGE: usize = 200;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Events that occurred at or after this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    pub since: Option<String>,
    /// Events that occurred at or before this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    pub until: Option<String>,
    /// Only the events about this device.
    #[param(value_type = Option<Uuid>)]
    pub device: Option<String>,
    /// The `next` of the previous page.
    #[param(pattern = r"^[0-9]{1,18}(\.[0-9]{1,18}){3}$", example = "0.12.340.2")]
    pub after: Option<String>,
    /// Records per page, 1 to 5000 (default 200).
    #[param(minimum = 1, maximum = 5000)]
    pub limit: Option<i64>,
}

/// One event of the household's history.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryRecord {
    /// Where it is in the log: topic, partition, offset.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    /// The event type, e.g. `DeviceStateReported`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The payload's schema version.
    pub v: u16,
    /// `{"kind": "user" | "device" | "system", "id": …}`.
    #[schema(value_type = Object)]
    pub actor: serde_json::Value,
    pub stream: String,
    pub seq: Option<u64>,
    pub causation_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
    pub device_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

impl From<Record> for HistoryRecord {
    fn from(r: Record) -> Self {
        Self {
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            event_id: r.event_id,
            occurred_at: r.occurred_at,
            event_type: r.event_type,
            v: r.v,
            actor: serde_json::to_value(&r.actor).unwrap_or_default(),
            stream: r.stream,
            seq: r.seq,
            causation_id: r.causation_id,
            correlation_id: r.correlation_id,
            device_id: r.device_id,
            payload: r.payload,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    /// In order: each topic's records in log order, merged by `occurredAt`.
    pub records: Vec<HistoryRecord>,
    /// Pass as `after` for the next page; absent at the end of the window.
    pub next: Option<String>,
}

fn time(name: &str, v: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::InvalidAt(format!("/{name}"), "not an RFC 3339 time".into()))
    })
    .transpose()
}

/// The household's history as recorded in the log: every event (household
/// stream, commands, device telemetry, audit) with its position, time,
/// type, actor and payload, oldest first. Owners only; every read is
/// recorded in the audit log.
#[utoipa::path(get, path = "/v1/households/{householdId}/history", tag = "households", security(("bearer" = [])),
    params(("householdId" = Uuid, Path), HistoryQuery),
    responses((status = 200, body = HistoryPage),
        (status = 400, description = "a malformed parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an owner, or no longer a member", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the log is unavailable", body = Problem, content_type = "application/problem+json")))]
pub async fn export(
    State(s): State<Arc<AppState>>,
    Caller(who): Caller,
    Path(household): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let h = path_id(&household)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let since = time("since", q.since.as_deref())?;
    let until = time("until", q.until.as_deref())?;
    let device = q
        .device
        .as_deref()
        .map(|d| Uuid::parse_str(d).map_err(|_| ApiError::InvalidAt("/device".into(), "not a UUID".into())))
        .transpose()?;
    let topics = history::topics(&s.topics);
    let after = q
        .after
        .as_deref()
        .map(|a| Cursor::decode(a, topics.len()).ok_or_else(|| ApiError::InvalidAt("/after".into(), "not a cursor of this history".into())))
        .transpose()?;
    let limit = match q.limit {
        None => DEFAULT_PAGE,
        Some(n) if (1..=MAX_PAGE as i64).contains(&n) => n as usize,
        Some(_) => return Err(ApiError::InvalidAt("/limit".into(), format!("between 1 and {MAX_PAGE}"))),
    };
    authorize(&s, &who, h).await?;

    let scan = Scan { bootstrap: s.kafka_bootstrap.clone(), topics, household: h, since, until, device, after };
    let mut records = Vec::new();
    let done = history::scan(&scan, limit, |e, _| {
        records.push(HistoryRecord::from(Record::from(e)));
        true
    })
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "reading a household's history failed");
        ApiError::Unavailable("the log is unavailable; try again".into())
    })?;
    // Audited before it is answered: no history leaves unrecorded.
    let exported = HistoryExported { since, until, device, via: "api".into(), records: records.len() as u64 };
    let env = Envelope::new(h, who.actor(), &Event::HistoryExported(exported), Utc::now()).with_meta(who.meta(Some(Role::Owner)));
    s.appender.append(&s.topics.audit(), &env).await.map_err(|e| {
        tracing::warn!(error = %e, "could not audit a history export");
        ApiError::Unavailable("the export could not be audited; try again".into())
    })?;
    Ok(Json(HistoryPage { records, next: done.next.map(|c| c.encode()) }))
}

/// Owners only. A non-member gets 404 like an id that does not exist,
/// except a former member: they know the household, so they are told 403.
/// Every refusal on an existing household is audited.
async fn authorize(s: &AppState, who: &Requester, h: Uuid) -> Result<(), ApiError> {
    if homelink_read_model::audit::is_former_member(&s.pool, h, who.user).await.map_err(ApiError::db)? {
        let e = ApiError::Forbidden("you are no longer a member of this household".into());
        audit_denied(s, who, h, None, "history.export", None, &e);
        return Err(e);
    }
    let cmd = HouseholdCommand {
        household: h,
        action: "history.export",
        target: None,
        invitation: None,
        requires: Some(Action::ReadAudit),
        open_to_non_members: false,
    };
    s.authorize_household(who, &cmd).await
}
