//! The push channel: after an append is acknowledged by Kafka, a service hands
//! the event straight to the next service over HTTP, so the latency-critical
//! paths do not wait on a polling Kafka consumer (product.md). Delivery here is
//! best effort: the next service's Kafka consumer is the catch-up path and
//! deduplicates, so a push that fails is counted and dropped, never retried.
//!
//! Every push carries the deployment's service-to-service token
//! (`Authorization: Bearer …`, [`require_token`] on the receiving routes):
//! a pushed event is applied ahead of the log, so only the services that
//! appended it may push it. Without a configured token nothing is pushed and
//! every push is refused.

use crate::metrics::ServiceMetrics;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use std::sync::Arc;
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
    pub fn spawn(url: Option<String>, token: Option<SecretString>, label: &'static str, metrics: ServiceMetrics) -> Self {
        let (tx, mut rx) = mpsc::channel::<T>(QUEUE);
        let m = metrics.clone();
        tokio::spawn(async move {
            let (Some(url), Some(token)) = (url, token) else {
                while rx.recv().await.is_some() {}
                return;
            };
            let bearer = format!("Bearer {}", token.expose_secret());
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .pool_max_idle_per_host(4)
                .build()
                .expect("static client config");
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let n = batch.len() as u64;
                match client.post(&url).header(reqwest::header::AUTHORIZATION, &bearer).json(&batch).send().await {
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

/// Route layer of the receiving side: `401` unless the request carries
/// `Authorization: Bearer <token>` with the deployment's token (compared as
/// SHA-256 digests, so the time taken says nothing about the token).
pub async fn require_token(
    axum::extract::State(token): axum::extract::State<Option<Arc<SecretString>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use sha2::{Digest, Sha256};
    let given = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (&token, given) {
        (Some(t), Some(g)) => Sha256::digest(t.expose_secret().as_bytes()) == Sha256::digest(g.as_bytes()),
        _ => false,
    };
    if !ok {
        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({"error": "service token required"}))).into_response();
    }
    next.run(req).await
}

pub use crate::reader::Located;
