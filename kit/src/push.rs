//! The push channel: after an append is acknowledged by Kafka, a service hands
//! the event straight to the next service over HTTP, so the latency-critical
//! paths do not wait on a polling Kafka consumer (product.md). Delivery here is
//! best effort: the next service's Kafka consumer is the catch-up path and
//! deduplicates, so a push that fails is counted and dropped, never retried.

use crate::metrics::ServiceMetrics;
use serde::Serialize;
use std::time::Duration;
use tokio::sync::mpsc;

/// Items queued beyond this are dropped (counted); the catch-up path has them.
const QUEUE: usize = 16_384;
/// Largest batch in one request.
const BATCH: usize = 512;

/// Sends items in JSON-array batches to one URL.
#[derive(Clone)]
pub struct Pusher<T> {
    tx: mpsc::Sender<T>,
    metrics: ServiceMetrics,
    label: &'static str,
}

impl<T: Serialize + Send + 'static> Pusher<T> {
    /// Starts the sending task. With `url == None` pushes are disabled and
    /// every item is left to the catch-up path.
    pub fn spawn(url: Option<String>, label: &'static str, metrics: ServiceMetrics) -> Self {
        let (tx, mut rx) = mpsc::channel::<T>(QUEUE);
        let m = metrics.clone();
        tokio::spawn(async move {
            let Some(url) = url else {
                while rx.recv().await.is_some() {}
                return;
            };
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .pool_max_idle_per_host(4)
                .build()
                .expect("static client config");
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let n = batch.len() as u64;
                match client.post(&url).json(&batch).send().await {
                    Ok(r) if r.status().is_success() => m.messages_out.with_label_values(&[label]).inc_by(n),
                    Ok(r) => {
                        tracing::debug!(status = %r.status(), label, "push refused");
                        m.errors.with_label_values(&[&format!("{label}_push")]).inc_by(n);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, label, "push failed");
                        m.errors.with_label_values(&[&format!("{label}_push")]).inc_by(n);
                    }
                }
                batch.clear();
            }
        });
        Self { tx, metrics, label }
    }

    /// Queues an item without waiting; a full queue drops it (counted).
    pub fn push(&self, item: T) {
        if self.tx.try_send(item).is_err() {
            self.metrics.errors.with_label_values(&[&format!("{}_push_dropped", self.label)]).inc();
        }
    }
}

/// An event with its place in the log, as the push channel carries it: the
/// receiver deduplicates against its catch-up consumer by `(topic, partition,
/// offset)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Located {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub envelope: homelink_events::Envelope,
}
