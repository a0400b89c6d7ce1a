//! The catch-up path: a Kafka consumer whose partitions are assigned from the
//! offsets in `projector_offsets`, read in large batches with a long fetch
//! wait (the bulk path; the push channel carries the latency).

use crate::apply::{Applier, Batch, DeadRecord};
use crate::{Config, Job, Positions};
use futures::{FutureExt, StreamExt};
use homelink_events::Envelope;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::push::Located;
use homelink_kit::shutdown::CancellationToken;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub struct CatchUp {
    consumer: Arc<StreamConsumer>,
    batch_max: usize,
    metrics: ServiceMetrics,
}

impl CatchUp {
    /// Assigns every partition of the projected topics at the stored offsets.
    pub async fn assign(cfg: &Config, applier: &Applier, metrics: ServiceMetrics) -> Result<Self, crate::Error> {
        let consumer = Arc::new(homelink_kit::kafka::consumer(&cfg.kafka_bootstrap, "homelink-projector", cfg.fetch_wait)?);
        let topics = cfg.topics.projected().to_vec();
        let c = consumer.clone();
        let parts = tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32)>, homelink_kit::Error> {
            let mut all = Vec::new();
            for t in topics {
                for p in homelink_kit::kafka::partitions_of(&c, &t, Duration::from_secs(10))? {
                    all.push((t.clone(), p));
                }
            }
            Ok(all)
        })
        .await??;
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &parts {
            let offset = match applier.next_offset(t, *p) {
                Some(n) => Offset::Offset(n),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(t, *p, offset)?;
        }
        consumer.assign(&tpl)?;
        Ok(Self { consumer, batch_max: cfg.batch_max, metrics })
    }

    /// Reads until cancelled, handing batches to the applier.
    pub(crate) async fn run(self, jobs: mpsc::Sender<Job>, positions: Positions, cancel: CancellationToken) {
        // Lag counts from what the applier committed, not from what was fetched.
        let committed = move || positions.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lag = tokio::spawn(homelink_kit::kafka::report_lag(self.consumer.clone(), committed, self.metrics.clone(), cancel.clone()));
        let mut stream = self.consumer.stream();
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => break,
                m = stream.next() => m,
            };
            let mut msgs = vec![first];
            while msgs.len() < self.batch_max {
                match stream.next().now_or_never() {
                    Some(m) => msgs.push(m),
                    None => break,
                }
            }
            let mut events = Vec::with_capacity(msgs.len());
            let mut dead = Vec::new();
            let mut next: HashMap<(String, i32), i64> = HashMap::new();
            for m in msgs.into_iter().flatten() {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka consumer error");
                        self.metrics.errors.with_label_values(&["kafka_consume"]).inc();
                        continue;
                    }
                };
                let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
                next.insert((topic.clone(), partition), offset + 1);
                self.metrics.messages_in.with_label_values(&["log"]).inc();
                match Envelope::from_json(m.payload().unwrap_or_default()) {
                    Ok(envelope) => events.push(Located { topic, partition, offset, envelope }),
                    Err(e) => {
                        // Dead-lettered with the batch; its offset advances so one bad record cannot stall the projection.
                        tracing::warn!(error = %e, %topic, offset, "undecodable record dead-lettered");
                        self.metrics.errors.with_label_values(&["undecodable_record"]).inc();
                        dead.push(DeadRecord::undecodable(&topic, partition, offset, m.payload().unwrap_or_default(), &e.to_string()));
                    }
                }
            }
            if next.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let batch = Batch::log(events, next.into_iter().map(|((t, p), n)| (t, p, n)).collect(), dead);
            if jobs.send(Job { batch, reply: None }).await.is_err() {
                break;
            }
        }
        lag.abort();
    }
}
