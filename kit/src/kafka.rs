//! Kafka clients configured for HomeLink's delivery guarantees (quality.md):
//! producers with `acks=all`, idempotence and bounded retries; consumers that
//! never auto-commit. Only the bootstrap address differs between the local
//! broker (tansu) and Apache Kafka / Redpanda in production.

use homelink_events::topics::household_key;
use homelink_events::Envelope;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::time::Duration;

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub bootstrap: String,
    /// How long records wait to be batched; small, since taps are latency-bound.
    pub linger: Duration,
    /// How long an append may take before the caller gets an error
    /// (APIs answer 503 instead of hanging when the broker is down).
    pub delivery_timeout: Duration,
}

impl ProducerConfig {
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self { bootstrap: bootstrap.into(), linger: Duration::from_millis(1), delivery_timeout: Duration::from_secs(30) }
    }
}

/// Appends envelopes to topics, keyed by household.
///
/// When librdkafka declares the idempotent producer fatally failed, it is
/// replaced by a new one (at most every few seconds) instead of failing every
/// later append. A new producer id can duplicate a record that a caller
/// retries; consumers deduplicate.
#[derive(Clone)]
pub struct Appender {
    cfg: ProducerConfig,
    producer: std::sync::Arc<std::sync::RwLock<FutureProducer>>,
    last_reset: std::sync::Arc<std::sync::Mutex<std::time::Instant>>,
}

const RESET_AT_MOST_EVERY: Duration = Duration::from_secs(3);

impl Appender {
    pub fn new(cfg: &ProducerConfig) -> Result<Self, crate::Error> {
        Ok(Self {
            producer: std::sync::Arc::new(std::sync::RwLock::new(Self::create(cfg)?)),
            cfg: cfg.clone(),
            last_reset: std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
        })
    }

    fn create(cfg: &ProducerConfig) -> Result<FutureProducer, crate::Error> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", cfg.linger.as_millis().to_string())
            .set("message.timeout.ms", cfg.delivery_timeout.as_millis().max(1).to_string())
            .set("retry.backoff.ms", "100")
            .set("retry.backoff.max.ms", "1000")
            .set("socket.nagle.disable", "true")
            .create()?;
        Ok(producer)
    }

    fn current(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the producer after a fatal error, or after a broker error
    /// that leaves an idempotent producer's sequence out of step for good:
    /// a restarted tansu that lost the producer's state answers every later
    /// record with "Unknown broker error" (seen after `kill -9` of tansu
    /// under load: every append of the bridge failed until it was replaced).
    fn recover(&self, failed: &FutureProducer, error: &rdkafka::error::KafkaError) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let stuck = matches!(
            error,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::Unknown | RDKafkaErrorCode::UnknownProducerId | RDKafkaErrorCode::OutOfOrderSequenceNumber
            )
        );
        if failed.client().fatal_error().is_none() && !stuck {
            return;
        }
        let mut last = self.last_reset.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < RESET_AT_MOST_EVERY {
            return;
        }
        match Self::create(&self.cfg) {
            Ok(p) => {
                tracing::warn!(%error, "replacing the Kafka producer after a broker-side error");
                *self.producer.write().unwrap_or_else(|e| e.into_inner()) = p;
                *last = std::time::Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "could not create a new Kafka producer"),
        }
    }

    /// Appends one envelope and waits for the broker's acknowledgement.
    pub async fn append(&self, topic: &str, envelope: &Envelope) -> Result<Position, crate::Error> {
        let key = household_key(envelope.household_id);
        self.append_raw(topic, &key, &envelope.to_json()).await
    }

    /// Queues one envelope in the producer now (librdkafka keeps the order of
    /// what is queued for a partition) and returns the wait for the broker's
    /// acknowledgement. `Err` when it could not be queued (a full queue).
    pub fn enqueue(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<impl std::future::Future<Output = Result<Position, crate::Error>> + Send + 'static, crate::Error> {
        let key = household_key(envelope.household_id);
        let payload = envelope.to_json();
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        let producer = self.current();
        let delivery = producer.send_result(record).map_err(|(e, _)| {
            self.recover(&producer, &e);
            crate::Error::from(e)
        })?;
        let me = self.clone();
        Ok(async move {
            match delivery.await {
                Ok(Ok(d)) => Ok(Position { partition: d.partition, offset: d.offset }),
                Ok(Err((e, _))) => {
                    me.recover(&producer, &e);
                    Err(e.into())
                }
                Err(_) => Err(crate::Error::Other("the producer dropped the record".into())),
            }
        })
    }

    /// Appends raw bytes under `key` (dead-letter records).
    pub async fn append_raw(&self, topic: &str, key: &str, payload: &[u8]) -> Result<Position, crate::Error> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        let producer = self.current();
        match producer.send(record, Duration::from_secs(0)).await {
            Ok(d) => Ok(Position { partition: d.partition, offset: d.offset }),
            Err((e, _)) => {
                self.recover(&producer, &e);
                Err(e.into())
            }
        }
    }

    /// The next offset to be written on a partition (its high watermark): every
    /// acknowledged record is below it.
    pub async fn high_watermark(&self, topic: &str, partition: i32, timeout: Duration) -> Result<i64, crate::Error> {
        let producer = self.current();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || producer.client().fetch_watermarks(&topic, partition, timeout))
            .await
            .map_err(|e| crate::Error::Other(e.to_string()))?
            .map(|(_, high)| high)
            .map_err(Into::into)
    }

    /// Waits for queued records (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.current().flush(timeout);
    }
}

/// A consumer that never commits on its own. `group` is used for group
/// membership when `subscribe` is called; read-model builders `assign` instead
/// and keep their offsets in Postgres.
pub fn consumer(bootstrap: &str, group: &str, fetch_wait: Duration) -> Result<StreamConsumer, crate::Error> {
    group_member(bootstrap, group, None, fetch_wait)
}

/// Like [`consumer`], as the static group member `instance` (KIP-345) when
/// given: a member restarted under the same instance id (a crashed bridge
/// coming back) takes over its partitions at once instead of waiting for the
/// group to give up on the dead one.
pub fn group_member(bootstrap: &str, group: &str, instance: Option<&str>, fetch_wait: Duration) -> Result<StreamConsumer, crate::Error> {
    let mut config = ClientConfig::new();
    if let Some(id) = instance {
        config.set("group.instance.id", id);
    }
    let c: StreamConsumer = config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
        .set("fetch.min.bytes", "1")
        .set("socket.nagle.disable", "true")
        .set("session.timeout.ms", "10000")
        // A third of the session timeout: group members are noticed gone
        // within 10 s, and an idle member costs the broker one call per 3 s.
        .set("heartbeat.interval.ms", "3000")
        // Also the rebalance timeout a member announces: how long a rebalance
        // may wait for members to rejoin (librdkafka's default is 300 s; a
        // bridge restarted after kill -9 got its commands back only after
        // more than 2 minutes before this and static membership). A member
        // that does not poll for 20 s (its broker down) leaves the group and
        // rejoins when it polls again.
        .set("max.poll.interval.ms", "20000")
        .create()?;
    Ok(c)
}

/// Creates the topics that do not exist yet, each with `partitions` partitions.
pub async fn ensure_topics(bootstrap: &str, topics: &[String], partitions: i32) -> Result<(), crate::Error> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(crate::Error::Other(format!("creating topic {topic}: {code}"))),
        }
    }
    Ok(())
}

/// The partitions of `topic` as the broker reports them.
pub fn partitions_of(consumer: &StreamConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>, crate::Error> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Err(crate::Error::Other(format!("topic {topic} has no partitions (not created?)")));
    }
    Ok(parts)
}

/// Publishes `consumer_lag_records` every 5 s for each partition `consumer`
/// holds: the log end minus `position()[(topic, partition)]` (0 when unknown).
pub async fn report_lag<F>(
    consumer: std::sync::Arc<StreamConsumer>,
    position: F,
    metrics: crate::metrics::ServiceMetrics,
    cancel: tokio_util::sync::CancellationToken,
) where
    F: Fn() -> std::collections::HashMap<(String, i32), i64> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let c = consumer.clone();
        // librdkafka's metadata calls block: keep them off the async workers.
        let highs = tokio::task::spawn_blocking(move || {
            let Ok(assigned) = c.assignment() else { return Vec::new() };
            assigned
                .elements()
                .iter()
                .filter_map(|e| {
                    let (t, p) = (e.topic().to_owned(), e.partition());
                    c.fetch_watermarks(&t, p, Duration::from_secs(1)).ok().map(|(_, high)| (t, p, high))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let pos = position();
        for (t, p, high) in highs {
            let at = pos.get(&(t.clone(), p)).copied().unwrap_or(0);
            metrics.consumer_lag.with_label_values(&[&t, &p.to_string()]).set((high - at).max(0));
        }
    }
}

/// The next offset `consumer` will read per partition (for [`report_lag`]).
pub fn positions(consumer: &StreamConsumer) -> std::collections::HashMap<(String, i32), i64> {
    let Ok(tpl) = consumer.position() else { return Default::default() };
    tpl.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
            _ => None,
        })
        .collect()
}
