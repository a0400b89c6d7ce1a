//! Fan-out of committed shadow changes to subscribers, per household.
//!
//! One Postgres `LISTEN` per query-api process receives every change the
//! projector committed; each household has its own broadcast channel, so an
//! event of household B is never even offered to a subscription of household A.

use homelink_events::shadow::ShadowChanged;
use homelink_events::topics::SHADOW_CHANGED_CHANNEL;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::shutdown::CancellationToken;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use uuid::Uuid;

/// Changes a slow subscriber may fall behind by before it misses some.
const PER_HOUSEHOLD_BUFFER: usize = 256;

#[derive(Default)]
pub struct Hub {
    households: Mutex<HashMap<Uuid, broadcast::Sender<Arc<ShadowChanged>>>>,
}

impl Hub {
    pub fn subscribe(&self, household: Uuid) -> broadcast::Receiver<Arc<ShadowChanged>> {
        let mut h = self.households.lock().unwrap_or_else(|e| e.into_inner());
        h.entry(household).or_insert_with(|| broadcast::channel(PER_HOUSEHOLD_BUFFER).0).subscribe()
    }

    /// Delivers to the household's subscribers; forgets households nobody watches.
    pub fn publish(&self, change: ShadowChanged) {
        let mut h = self.households.lock().unwrap_or_else(|e| e.into_inner());
        let household = change.household_id;
        if let Some(tx) = h.get(&household) {
            if tx.send(Arc::new(change)).is_err() {
                h.remove(&household);
            }
        }
    }

    /// Listens for the projector's notifications until cancelled, reconnecting on errors.
    pub async fn run(
        self: Arc<Self>,
        pool: PgPool,
        metrics: ServiceMetrics,
        ready: Arc<std::sync::atomic::AtomicBool>,
        cancel: CancellationToken,
    ) {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed");
                    metrics.errors.with_label_values(&["listen"]).inc();
                    tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_millis(500)) => continue }
                }
            };
            if let Err(e) = listener.listen(SHADOW_CHANGED_CHANNEL).await {
                tracing::warn!(error = %e, "LISTEN failed");
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_millis(500)) => continue }
            }
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
            loop {
                let n = tokio::select! {
                    _ = cancel.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match n {
                    Ok(Some(n)) => match serde_json::from_str::<ShadowChanged>(n.payload()) {
                        Ok(change) => {
                            metrics.messages_in.with_label_values(&["shadow_changed"]).inc();
                            // Bridge receipt (last_seen) to fan-out: the state-push latency operators watch.
                            if let Some(seen) = change.last_seen {
                                let age = (chrono::Utc::now() - seen).num_microseconds().unwrap_or(0).max(0);
                                metrics.latency.with_label_values(&["report_to_fanout"]).observe(age as f64 / 1e6);
                            }
                            self.publish(change);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable notification");
                            metrics.errors.with_label_values(&["undecodable_notification"]).inc();
                        }
                    },
                    // The connection was lost and re-established: notifications in between are gone.
                    Ok(None) => metrics.errors.with_label_values(&["listen_reconnect"]).inc(),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost");
                        ready.store(false, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}
