//! The audit log, read with cursor pagination (newest first). Owners only;
//! the check is in the resolver, next to the household it is about.

use crate::errors::{codes, error};
use crate::reads::RowBudget;
use crate::types::{AuditEntry, AuditFilter};
use async_graphql::connection::{Connection, Edge};
use async_graphql::{Result, ID};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use homelink_read_model::audit;
use sqlx::PgPool;
use uuid::Uuid;

/// Most entries per page.
pub const MAX_PAGE: i32 = 200;

fn cursor(at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{id}", at.timestamp_micros()))
}

fn parse_cursor(c: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let (micros, id) = raw.split_once(':')?;
    Some((DateTime::from_timestamp_micros(micros.parse().ok()?)?, Uuid::parse_str(id).ok()?))
}

pub async fn page(
    pool: &PgPool,
    budget: &RowBudget,
    household: Uuid,
    first: i32,
    after: Option<String>,
    f: AuditFilter,
) -> Result<Connection<String, AuditEntry>> {
    if !(1..=MAX_PAGE).contains(&first) {
        return Err(error(codes::BAD_USER_INPUT, format!("first must be between 1 and {MAX_PAGE}")));
    }
    let after = match after {
        Some(c) => Some(parse_cursor(&c).ok_or_else(|| error(codes::BAD_USER_INPUT, "invalid cursor"))?),
        None => None,
    };
    let filter = audit::AuditFilter { actor_id: f.actor_id, action: f.action, outcome: f.outcome, since: f.since, until: f.until, after };
    let rows = budget.read(Some(i64::from(first) + 1), |limit| audit::page(pool, household, &filter, limit)).await?;
    let has_next = rows.len() > first as usize;
    let mut conn = Connection::new(after.is_some(), has_next);
    for r in rows.into_iter().take(first as usize) {
        conn.edges.push(Edge::new(
            cursor(r.at, r.event_id),
            AuditEntry {
                id: ID(r.event_id.to_string()),
                at: r.at,
                actor_kind: r.actor_kind,
                actor_id: r.actor_id,
                role: r.role,
                client: r.client,
                action: r.action,
                target: r.target,
                outcome: r.outcome,
                status: r.status,
                detail: r.detail,
            },
        ));
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap();
        let id = Uuid::from_u128(42);
        assert_eq!(parse_cursor(&cursor(at, id)), Some((at, id)));
        assert_eq!(parse_cursor("not-a-cursor"), None);
        assert_eq!(parse_cursor(&URL_SAFE_NO_PAD.encode("1:x")), None);
    }
}
