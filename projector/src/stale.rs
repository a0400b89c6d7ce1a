//! The stale sweep: staleness is computed from time at read time (two
//! missed report intervals, `events::shadow::staleness`), so it shows even
//! when nothing arrives; this sweep *pushes* the transition to subscribers.
//! Every few seconds it finds online devices not seen for two intervals
//! whose current sighting it has not announced yet (`stale_announced`), and
//! announces each once as a change of its household — with a `changeSeq`,
//! like every other change, so a resuming subscriber sees it too.
//!
//! It writes only `stale_announced` (never a column the applier writes), and
//! takes its change numbers through the same row lock as the applier
//! (`household_change_seqs`), so the two never lose each other's updates
//! and numbers stay gap-free and in commit order.

use crate::projections::changes;
use crate::projections::shadows::shadow_of;
use homelink_events::shadow::{notification_line, pack_notifications, ShadowChanged};
use homelink_events::topics::SHADOW_CHANGED_CHANNEL;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::shutdown::CancellationToken;
use sqlx::{PgPool, Row};
use std::time::Duration;
use uuid::Uuid;

/// Most devices announced per sweep.
const PER_SWEEP: i64 = 5_000;

pub async fn run(pool: PgPool, every: Duration, metrics: ServiceMetrics, cancel: CancellationToken) {
    loop {
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(every) => {} }
        match sweep(&pool).await {
            Ok(n) => metrics.messages_out.with_label_values(&["stale_announced"]).inc_by(n as u64),
            Err(e) => {
                tracing::warn!(error = %e, "the stale sweep failed");
                metrics.errors.with_label_values(&["stale_sweep"]).inc();
            }
        }
    }
}

/// One sweep; returns how many devices it announced.
pub async fn sweep(pool: &PgPool) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    crate::apply::enter_gate(&mut tx).await?;
    // The shortest interval is 5 s: nothing seen in the last 10 s is stale,
    // which lets the partial index bound the scan.
    let rows = sqlx::query(
        "WITH due AS (
             SELECT s.device_id FROM device_shadows s JOIN devices d ON d.device_id = s.device_id
              WHERE s.online AND s.last_seen < now() - interval '10 seconds'
                AND s.last_seen < now() - make_interval(secs => 2 * d.report_interval_secs)
                AND s.stale_announced IS DISTINCT FROM s.last_seen
              ORDER BY s.last_seen LIMIT $1
              FOR UPDATE OF s SKIP LOCKED)
         UPDATE device_shadows s SET stale_announced = s.last_seen FROM due, devices d
          WHERE s.device_id = due.device_id AND d.device_id = s.device_id
         RETURNING s.device_id, s.reported, s.seq, s.version, s.battery, s.online, s.last_seen, s.status_offset, s.property_seq,
                   s.battery_seq, s.desired, s.metadata, s.household_id, d.report_interval_secs",
    )
    .bind(PER_SWEEP)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut changes: Vec<ShadowChanged> = rows
        .iter()
        .map(|r| {
            let mut c = ShadowChanged::new(r.get::<Uuid, _>(12), r.get::<Uuid, _>(0), &shadow_of(r));
            c.report_interval_secs = r.get::<i32, _>(13).max(1) as u32;
            c
        })
        .collect();
    changes::sequence(&mut tx, &mut changes, &mut [], &mut []).await?;
    let payloads = pack_notifications(changes.iter().map(notification_line).collect());
    sqlx::query("SELECT pg_notify($1, n) FROM UNNEST($2::text[]) AS u(n)")
        .bind(SHADOW_CHANGED_CHANNEL)
        .bind(&payloads)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(changes.len())
}
