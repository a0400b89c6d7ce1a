//! Kafka clients configured for HomeLink's delivery guarantees (quality.md):
//! producers with `acks=all`, idempotence and bounded retries; consumers that
//! never auto-commit. Locally and in CI the broker is Apache Kafka (KRaft);
//! a managed cluster (MSK, Confluent, Redpanda) differs only by configuration:
//! the bootstrap address and the librdkafka properties of [`client_config`].

use homelink_events::topics::household_key;
use homelink_events::{Envelope, Topics};
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
    /// How long records wait to be batched (librdkafka `linger.ms`). None by
    /// default: taps and the engine's decisions are latency-bound, and what
    /// queues while a request is in flight is batched anyway. The bridge's
    /// reports linger (`--produce-linger-ms`).
    pub linger: Duration,
    /// How long an append may take before the caller gets an error
    /// (APIs answer 503 instead of hanging when the broker is down).
    pub delivery_timeout: Duration,
}

impl ProducerConfig {
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self { bootstrap: bootstrap.into(), linger: Duration::ZERO, delivery_timeout: Duration::from_secs(30) }
    }
}

/// The one retry policy of appends that must land (the bridge's facts, the
/// engine's decisions, dead letters): pauses of 100 ms doubling up to 5 s,
/// for as long as it takes, until the service stops. The command API does not
/// retry: it answers "in doubt" and the client retries with its
/// `Idempotency-Key` (quality.md).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    /// Sleeps the next pause; `false` when `cancel` fired first.
    pub async fn pause(&mut self, cancel: &crate::shutdown::CancellationToken) -> bool {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
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
        let producer = client_config(&cfg.bootstrap)
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
    /// that leaves an idempotent producer's sequence out of step for good
    /// (a restarted broker that lost the producer's state answers every later
    /// record with an unknown-producer or out-of-order error; seen after
    /// `kill -9` of a single broker under load: every append of the bridge
    /// failed until it was replaced).
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

    /// Appends `envelopes` to `topic` in this order and waits for every
    /// acknowledgement, retrying them all with [`Backoff`] until the log takes
    /// them (their ids make a repeat harmless: consumers deduplicate).
    /// `failed` sees each failure (for logs and metrics). `None` when `cancel`
    /// fired first: then some may be in the log and some not.
    pub async fn append_all_landed(
        &self,
        topic: &str,
        envelopes: &[Envelope],
        cancel: &crate::shutdown::CancellationToken,
        mut failed: impl FnMut(&crate::Error),
    ) -> Option<Vec<Position>> {
        let mut backoff = Backoff::default();
        loop {
            let queued: Result<Vec<_>, _> = envelopes.iter().map(|e| self.enqueue(topic, e)).collect();
            let landed = match queued {
                Ok(acks) => futures::future::join_all(acks).await.into_iter().collect::<Result<Vec<_>, _>>(),
                Err(e) => Err(e),
            };
            match landed {
                Ok(positions) => return Some(positions),
                Err(e) => failed(&e),
            }
            if !backoff.pause(cancel).await {
                return None;
            }
        }
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
    let mut config = client_config(bootstrap);
    if let Some(id) = instance {
        config.set("group.instance.id", id);
    }
    let c: StreamConsumer = config
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

/// How a deployment's topics are created: the one place for their
/// partitions, replication and retention (`homelink topics` and the tests
/// call it; the broker itself never creates a topic).
#[derive(Debug, Clone)]
pub struct TopicPlan {
    pub partitions: i32,
    /// Copies of every partition: 1 on a single broker, 3 in a cluster.
    pub replication: i32,
    /// How long telemetry is kept (`None`: for ever). The household stream,
    /// the commands and the audit are always kept for ever: a rebuild reads them.
    pub telemetry_retention: Option<Duration>,
    /// How long dead letters are kept for an operator to look at.
    pub dead_letter_retention: Duration,
}

/// Telemetry's default retention: a week of reports.
pub const TELEMETRY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl TopicPlan {
    pub fn new(partitions: i32, replication: i32) -> Self {
        Self {
            partitions,
            replication,
            telemetry_retention: Some(TELEMETRY_RETENTION),
            dead_letter_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }

    /// `min.insync.replicas`: with three copies an append needs two (one
    /// broker may fail without losing an acknowledged record or refusing writes).
    pub fn min_insync(&self) -> i32 {
        if self.replication >= 3 {
            2
        } else {
            1
        }
    }

    /// Every topic of `topics` with its topic-level settings.
    pub fn specs(&self, topics: &Topics) -> Vec<TopicSpec> {
        let ms = |d: Option<Duration>| d.map_or_else(|| "-1".to_owned(), |d| d.as_millis().max(1).to_string());
        let spec = |name: String, retention: Option<Duration>| TopicSpec {
            name,
            partitions: self.partitions,
            replication: self.replication,
            config: vec![
                ("retention.ms", ms(retention)),
                ("retention.bytes", "-1".to_owned()),
                ("min.insync.replicas", self.min_insync().to_string()),
                ("unclean.leader.election.enable", "false".to_owned()),
                ("cleanup.policy", "delete".to_owned()),
            ],
        };
        vec![
            spec(topics.households(), None),
            spec(topics.commands(), None),
            spec(topics.audit(), None),
            spec(topics.telemetry(), self.telemetry_retention),
            spec(topics.dead_letter(), Some(self.dead_letter_retention)),
        ]
    }
}

/// One topic as it is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
    pub config: Vec<(&'static str, String)>,
}

/// Creates the topics of `topics` that do not exist yet, as `plan` says
/// (existing topics are left as they are).
pub async fn ensure_topics(bootstrap: &str, topics: &Topics, plan: &TopicPlan) -> Result<(), crate::Error> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create()?;
    let specs = plan.specs(topics);
    let new: Vec<NewTopic> = specs
        .iter()
        .map(|t| {
            t.config.iter().fold(NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication)), |n, (k, v)| n.set(k, v))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(crate::Error::Other(format!("creating topic {topic}: {code}"))),
        }
    }
    Ok(())
}

/// Waits until the cluster answers metadata requests with at least `brokers`
/// brokers and a controller: the broker's health, asked in the Kafka protocol.
pub async fn wait_for_brokers(bootstrap: &str, brokers: usize, timeout: Duration) -> Result<usize, crate::Error> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create()?;
    let admin = std::sync::Arc::new(admin);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let a = admin.clone();
        let seen = tokio::task::spawn_blocking(move || a.inner().fetch_metadata(None, Duration::from_secs(2)).map(|m| m.brokers().len()))
            .await
            .map_err(|e| crate::Error::Other(e.to_string()))?;
        match seen {
            Ok(n) if n >= brokers => return Ok(n),
            Ok(n) if std::time::Instant::now() >= deadline => {
                return Err(crate::Error::Other(format!("{n} of {brokers} Kafka brokers answer at {bootstrap}")))
            }
            Err(e) if std::time::Instant::now() >= deadline => return Err(e.into()),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The base configuration of every Kafka client of a service: the bootstrap
/// servers, then every librdkafka property the deployment sets as
/// `HOMELINK_KAFKA_<PROPERTY>` (in the environment or the configuration
/// file; the property's dots written as underscores, e.g.
/// `HOMELINK_KAFKA_SECURITY_PROTOCOL=SASL_SSL`), or as
/// `HOMELINK_KAFKA_<PROPERTY>_FILE` naming a file that holds the value (a
/// SASL password). The properties that carry HomeLink's delivery guarantees
/// are not taken from there (see [`RESERVED`]).
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in deployment_properties().iter() {
        c.set(k, v);
    }
    c
}

/// Properties a deployment may not change: the delivery guarantees
/// (quality.md) and what the code sets itself.
pub const RESERVED: [&str; 7] =
    ["bootstrap.servers", "acks", "enable.idempotence", "enable.auto.commit", "enable.auto.offset.store", "group.id", "group.instance.id"];

/// The `HOMELINK_KAFKA_…` properties of this process, read once.
fn deployment_properties() -> &'static [(String, String)] {
    static PROPS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    PROPS.get_or_init(|| {
        let (props, ignored) = properties_from(std::env::vars(), |p| std::fs::read_to_string(p));
        for (var, why) in ignored {
            tracing::warn!(%var, %why, "Kafka property ignored");
        }
        props
    })
}

/// Settings that are HomeLink's own, not librdkafka properties.
const NOT_PROPERTIES: [&str; 2] = ["HOMELINK_KAFKA_BOOTSTRAP", "HOMELINK_KAFKA_BROKERS"];

/// A property and its value, or a variable and why it was ignored.
type Pair = (String, String);

/// The librdkafka properties among `vars`, and the variables ignored with why.
fn properties_from(vars: impl Iterator<Item = (String, String)>, read: impl Fn(&str) -> std::io::Result<String>) -> (Vec<Pair>, Vec<Pair>) {
    let (mut props, mut ignored) = (Vec::new(), Vec::new());
    for (var, value) in vars {
        let Some(rest) = var.strip_prefix("HOMELINK_KAFKA_") else { continue };
        if NOT_PROPERTIES.contains(&var.as_str()) || rest.is_empty() {
            continue;
        }
        let (rest, value) = match rest.strip_suffix("_FILE") {
            Some(r) => match read(&value) {
                Ok(v) => (r, v.trim_end_matches(['\n', '\r']).to_owned()),
                Err(e) => {
                    ignored.push((var.clone(), format!("reading {value}: {e}")));
                    continue;
                }
            },
            None => (rest, value),
        };
        let property = rest.to_ascii_lowercase().replace('_', ".");
        if RESERVED.contains(&property.as_str()) {
            ignored.push((var.clone(), format!("{property} is set by HomeLink (delivery guarantees)")));
            continue;
        }
        props.push((property, value));
    }
    props.sort();
    (props, ignored)
}

/// The partitions of `topic` as the broker reports them.
pub fn partitions_of(consumer: &StreamConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>, crate::Error> {
    // A topic created a moment ago may not be in every broker's metadata
    // yet: ask again until `timeout`.
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(100));
        let md = consumer.fetch_metadata(Some(topic), left)?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !parts.is_empty() {
            return Ok(parts);
        }
        if std::time::Instant::now() >= deadline {
            return Err(crate::Error::Other(format!("topic {topic} has no partitions (not created?)")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_properties_come_from_homelink_kafka_variables() {
        let vars = [
            ("HOMELINK_KAFKA_BOOTSTRAP", "b:9092"),
            ("HOMELINK_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("HOMELINK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("HOMELINK_KAFKA_SASL_PASSWORD_FILE", "/run/secrets/kafka"),
            ("HOMELINK_KAFKA_ACKS", "1"),
            ("HOMELINK_KAFKA_SSL_CA_LOCATION_FILE", "/missing"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let read = |p: &str| if p == "/run/secrets/kafka" { Ok("s3cret\n".to_owned()) } else { Err(std::io::ErrorKind::NotFound.into()) };
        let (props, ignored) = properties_from(vars.into_iter(), read);
        assert_eq!(
            props,
            [("sasl.mechanism", "SCRAM-SHA-512"), ("sasl.password", "s3cret"), ("security.protocol", "SASL_SSL")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        let ignored: Vec<&str> = ignored.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(ignored, ["HOMELINK_KAFKA_ACKS", "HOMELINK_KAFKA_SSL_CA_LOCATION_FILE"]);
    }

    #[test]
    fn the_log_is_kept_for_ever_and_telemetry_for_its_time() {
        let plan = TopicPlan::new(6, 3);
        let specs = plan.specs(&Topics::new("t."));
        let get = |name: &str, key: &str| {
            let s = specs.iter().find(|s| s.name == name).expect("topic");
            s.config.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()).expect("setting")
        };
        for t in ["t.households", "t.commands", "t.audit"] {
            assert_eq!(get(t, "retention.ms"), "-1");
        }
        assert_eq!(get("t.telemetry", "retention.ms"), TELEMETRY_RETENTION.as_millis().to_string());
        assert_eq!(get("t.telemetry", "min.insync.replicas"), "2");
        assert_eq!(TopicPlan::new(2, 1).min_insync(), 1);
        assert_eq!(specs.len(), Topics::new("t.").all().len());
        assert!(specs.iter().all(|s| s.partitions == 6 && s.replication == 3));
    }
}
