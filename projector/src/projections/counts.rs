//! `household_event_counts`: how many events of each type were applied per
//! household — cheap statistics, and what makes a double application visible.

use homelink_events::Event;
use homelink_kit::reader::Located;
use sqlx::{Postgres, Transaction};
use std::collections::HashMap;
use uuid::Uuid;

/// Adds the batch's events to the per-household counts.
pub async fn apply(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)]) -> Result<(), sqlx::Error> {
    let mut n: HashMap<(Uuid, &'static str), i64> = HashMap::new();
    for (l, ev) in work {
        *n.entry((l.envelope.household_id, ev.type_name())).or_default() += 1;
    }
    let (mut h, mut t, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for ((hh, tt), cc) in n {
        h.push(hh);
        t.push(tt.to_owned());
        c.push(cc);
    }
    if h.is_empty() {
        return Ok(());
    }
    sqlx::query(
        r#"INSERT INTO household_event_counts (household_id, event_type, applied)
           SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[])
           ON CONFLICT (household_id, event_type) DO UPDATE SET applied = household_event_counts.applied + EXCLUDED.applied"#,
    )
    .bind(&h)
    .bind(&t)
    .bind(&c)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
