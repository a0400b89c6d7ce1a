//! The projector's input: every partition of the projected topics, read
//! continuously through [`homelink_kit::reader`] from the positions committed
//! in Postgres with the read models (never Kafka's committed offsets). A
//! batch is applied in one transaction with its end positions by the single
//! writer ([`Applier`]), retried until it commits, and the next one is taken
//! only after that: the reader keeps fetching meanwhile, so batches grow with
//! the load and stay one record at rest.

use crate::apply::{Applier, Batch, DeadRecord};
use crate::Config;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::reader::{LogBatch, LogReader, ReaderConfig, Start};
use homelink_kit::shutdown::CancellationToken;
use std::time::Duration;

/// How often the lag metrics are published.
const LAG_EVERY: Duration = Duration::from_secs(5);

pub struct Input {
    reader: LogReader,
}

impl Input {
    /// Assigns every projected partition at the applier's committed position.
    pub async fn assign(cfg: &Config, applier: &Applier, metrics: ServiceMetrics) -> Result<Self, crate::Error> {
        let parts = homelink_kit::reader::partitions(&cfg.kafka_bootstrap, &cfg.topics.projected()).await?;
        let start = parts.into_iter().map(|tp| (tp.clone(), applier.next_offset(&tp.0, tp.1))).collect();
        let rc = ReaderConfig {
            bootstrap: cfg.kafka_bootstrap.clone(),
            group: "homelink-projector".into(),
            fetch_wait: cfg.fetch_wait,
            batch_max: cfg.batch_max,
            gather: cfg.gather,
        };
        Ok(Self { reader: LogReader::new(&rc, Start::Assigned(start), metrics)? })
    }

    /// Reads and applies batches until cancelled; a batch in flight is
    /// committed or rolled back, never half-applied.
    pub(crate) async fn run(self, mut applier: Applier, metrics: ServiceMetrics, cancel: CancellationToken) {
        let lag = self.reader.report_lag(LAG_EVERY, cancel.clone());
        let mut backoff = Duration::from_millis(100);
        while let Some(read) = self.reader.next(&cancel).await {
            if read.is_empty() {
                continue;
            }
            let batch = batch(&read);
            loop {
                let started = std::time::Instant::now();
                match applier.apply(&[&batch]).await {
                    Ok(_) => {
                        metrics.latency.with_label_values(&["apply_batch"]).observe(started.elapsed().as_secs_f64());
                        backoff = Duration::from_millis(100);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "applying a batch failed; retrying");
                        metrics.errors.with_label_values(&["apply"]).inc();
                        tokio::select! {
                            _ = cancel.cancelled() => return lag.abort(),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            self.reader.commit(&read);
        }
        lag.abort();
    }
}

/// A read batch as the applier takes it (undecodable records become dead letters).
fn batch(read: &LogBatch) -> Batch {
    let dead = read.undecodable.iter().map(|u| DeadRecord::undecodable(&u.topic, u.partition, u.offset, &u.payload, &u.reason)).collect();
    Batch::log(read.events.clone(), read.next_offsets.clone(), dead)
}
