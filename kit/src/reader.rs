//! Reading the log: the one consumer loop every service uses (the projector,
//! the device bridge, next the automation engine). A consumer is a function
//! from a [`LogBatch`] to its effect; this module does the rest:
//!
//! - **where to start**: either partitions *assigned* at positions the
//!   caller keeps with its effect (the projector's offsets live in the same
//!   Postgres transaction as the read models it writes), or a consumer
//!   *group* whose offsets are committed to Kafka once the caller says a
//!   batch's effect is done ([`LogReader::commit`]; the effect must be
//!   idempotent, since a crash before the commit repeats it);
//! - **fetching**: a fetch returns as soon as a record arrives
//!   (`fetch.min.bytes` 1; `fetch_wait` bounds an empty fetch), then every
//!   record already fetched is taken into the same batch, up to `batch_max`:
//!   batches grow with load and stay one record at rest. A reader with a
//!   `gather` window keeps taking records for that long after the first one
//!   (a few milliseconds of latency for fewer, larger batches: the
//!   projector's transactions);
//! - **decoding**: records that are not envelopes come in
//!   [`LogBatch::undecodable`], with the batch's positions already past
//!   them, for the caller to dead-letter in the same effect;
//! - **rebalances**: a group member's partitions may move to another member
//!   at any poll; records of a partition it lost may still be in hand, and
//!   their effects must be idempotent anyway (the new owner starts at the
//!   last commit);
//! - **metrics**, the same everywhere: records and seconds behind per
//!   partition (`consumer_lag_records`, `consumer_lag_seconds`), records per
//!   batch (`consumer_batch_records`); callers time their effect as
//!   `processing_seconds{stage="apply_batch"}`.

use crate::metrics::ServiceMetrics;
use futures::FutureExt;
use homelink_events::Envelope;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A topic and one of its partitions.
pub type Tp = (String, i32);

/// An event and where it sits in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Located {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub envelope: Envelope,
}

/// A record whose bytes are not an envelope.
#[derive(Debug, Clone)]
pub struct Undecodable {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub reason: String,
}

/// Records read together, in log order per partition.
#[derive(Debug, Default)]
pub struct LogBatch {
    pub events: Vec<Located>,
    pub undecodable: Vec<Undecodable>,
    /// The next offset of every partition the batch touched, once it is
    /// handled (past its undecodable records too).
    pub next_offsets: Vec<(String, i32, i64)>,
    /// The newest record timestamp per partition (ms since the epoch).
    newest: HashMap<Tp, i64>,
}

impl LogBatch {
    pub fn len(&self) -> usize {
        self.events.len() + self.undecodable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a reader reads.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub bootstrap: String,
    /// The consumer group (also the client's name in the broker's logs).
    pub group: String,
    /// Longest an empty fetch waits at the broker; a record ends the wait at once.
    pub fetch_wait: Duration,
    /// Most records in one batch.
    pub batch_max: usize,
    /// How long a batch keeps taking records after its first one (zero:
    /// only what is already fetched).
    pub gather: Duration,
}

/// Where the reader's positions live.
#[derive(Debug, Clone)]
pub enum Start {
    /// Exactly these partitions, each from the given next offset (`None`:
    /// from the beginning); the caller stores positions with its effect.
    Assigned(Vec<(Tp, Option<i64>)>),
    /// The topics through the consumer group, from its committed offsets;
    /// `instance` makes it a static member (KIP-345): a member restarted
    /// under the same id gets its partitions back without a rebalance.
    Group { topics: Vec<String>, instance: Option<String> },
}

/// A consumer of the log; see the module documentation.
pub struct LogReader {
    consumer: Arc<StreamConsumer>,
    batch_max: usize,
    gather: Duration,
    metrics: ServiceMetrics,
    /// What the caller handled: the next offset and the newest record time per partition.
    handled: Arc<Mutex<HashMap<Tp, (i64, i64)>>>,
    group: bool,
}

impl LogReader {
    pub fn new(cfg: &ReaderConfig, start: Start, metrics: ServiceMetrics) -> Result<Self, crate::Error> {
        let (instance, group) = match &start {
            Start::Group { instance, .. } => (instance.as_deref(), true),
            Start::Assigned(_) => (None, false),
        };
        let consumer = crate::kafka::group_member(&cfg.bootstrap, &cfg.group, instance, cfg.fetch_wait)?;
        let mut handled = HashMap::new();
        match start {
            Start::Assigned(parts) => {
                let mut tpl = TopicPartitionList::new();
                for ((t, p), at) in parts {
                    tpl.add_partition_offset(&t, p, at.map_or(Offset::Beginning, Offset::Offset))?;
                    if let Some(n) = at {
                        handled.insert((t, p), (n, 0));
                    }
                }
                consumer.assign(&tpl)?;
            }
            Start::Group { topics, .. } => {
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                consumer.subscribe(&names)?;
            }
        }
        Ok(Self {
            consumer: Arc::new(consumer),
            batch_max: cfg.batch_max.max(1),
            gather: cfg.gather,
            metrics,
            handled: Arc::new(Mutex::new(handled)),
            group,
        })
    }

    /// The next batch: waits for one record, then takes what else has been
    /// fetched already, or arrives within the `gather` window. `None` when
    /// `cancel` fired.
    pub async fn next(&self, cancel: &crate::shutdown::CancellationToken) -> Option<LogBatch> {
        let mut batch = LogBatch::default();
        let mut next: HashMap<Tp, i64> = HashMap::new();
        let first = tokio::select! {
            _ = cancel.cancelled() => return None,
            m = self.consumer.recv() => m,
        };
        self.take(first, &mut batch, &mut next);
        let until = tokio::time::Instant::now() + self.gather;
        while batch.len() < self.batch_max {
            match self.consumer.recv().now_or_never() {
                Some(m) => self.take(m, &mut batch, &mut next),
                None if self.gather.is_zero() => break,
                None => match tokio::time::timeout_at(until, self.consumer.recv()).await {
                    Ok(m) => self.take(m, &mut batch, &mut next),
                    Err(_) => break,
                },
            }
        }
        batch.next_offsets = next.into_iter().map(|((t, p), n)| (t, p, n)).collect();
        batch.next_offsets.sort();
        if !batch.is_empty() {
            self.metrics.consumer_batch_records.observe(batch.len() as f64);
        }
        Some(batch)
    }

    fn take(
        &self,
        m: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
        batch: &mut LogBatch,
        next: &mut HashMap<Tp, i64>,
    ) {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error");
                self.metrics.errors.with_label_values(&["kafka_consume"]).inc();
                return;
            }
        };
        let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
        let n = next.entry((topic.clone(), partition)).or_insert(offset + 1);
        *n = (*n).max(offset + 1);
        if let Some(ts) = m.timestamp().to_millis() {
            let newest = batch.newest.entry((topic.clone(), partition)).or_insert(ts);
            *newest = (*newest).max(ts);
        }
        self.metrics.messages_in.with_label_values(&["log"]).inc();
        let payload = m.payload().unwrap_or_default();
        match Envelope::from_json(payload) {
            Ok(envelope) => batch.events.push(Located { topic, partition, offset, envelope }),
            Err(e) => {
                tracing::warn!(error = %e, %topic, partition, offset, "undecodable record");
                self.metrics.errors.with_label_values(&["undecodable_record"]).inc();
                batch.undecodable.push(Undecodable { topic, partition, offset, payload: payload.to_vec(), reason: e.to_string() });
            }
        }
    }

    /// The caller handled `batch` (its effect is durable): its positions
    /// count for the lag metrics, and a group member commits them to Kafka.
    pub fn commit(&self, batch: &LogBatch) {
        self.mark(&batch.next_offsets, &batch.newest);
    }

    /// Like [`Self::commit`] for positions handled piecemeal (a consumer
    /// whose effects complete out of order commits what is complete).
    pub fn commit_offsets(&self, next_offsets: &[(String, i32, i64)]) {
        self.mark(next_offsets, &HashMap::new());
    }

    fn mark(&self, next_offsets: &[(String, i32, i64)], newest: &HashMap<Tp, i64>) {
        if next_offsets.is_empty() {
            return;
        }
        {
            let mut h = self.handled.lock().unwrap_or_else(|e| e.into_inner());
            for (t, p, n) in next_offsets {
                let tp = (t.clone(), *p);
                let ts = newest.get(&tp).copied();
                let e = h.entry(tp).or_insert((*n, 0));
                e.0 = e.0.max(*n);
                if let Some(ts) = ts {
                    e.1 = e.1.max(ts);
                }
            }
        }
        if self.group {
            let mut tpl = TopicPartitionList::new();
            for (t, p, n) in next_offsets {
                if tpl.add_partition_offset(t, *p, Offset::Offset(*n)).is_err() {
                    return;
                }
            }
            // A partition this member lost meanwhile refuses the commit: its
            // new owner starts at the last one and repeats (idempotent) effects.
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "offset commit failed");
                self.metrics.errors.with_label_values(&["kafka_commit"]).inc();
            }
        }
    }

    /// Publishes the lag metrics every `every` until `cancel` fires: per
    /// partition held, the log end minus the handled position, and the age
    /// of the newest handled record while records are behind.
    pub fn report_lag(&self, every: Duration, cancel: crate::shutdown::CancellationToken) -> tokio::task::JoinHandle<()> {
        let (c, handled, metrics) = (self.consumer.clone(), self.handled.clone(), self.metrics.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let c = c.clone();
                // librdkafka's offset queries block: keep them off the async workers.
                let ends = tokio::task::spawn_blocking(move || log_ends(&c)).await.unwrap_or_default();
                let now = chrono::Utc::now().timestamp_millis();
                let h = handled.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for (tp, end) in ends {
                    let (at, ts) = h.get(&tp).copied().unwrap_or((0, 0));
                    let behind = (end - at).max(0);
                    let part = tp.1.to_string();
                    metrics.consumer_lag.with_label_values(&[&tp.0, &part]).set(behind);
                    let secs = if behind > 0 && ts > 0 { (now - ts).max(0) as f64 / 1000.0 } else { 0.0 };
                    metrics.consumer_lag_seconds.with_label_values(&[&tp.0, &part]).set(secs);
                }
            }
        })
    }

    /// The partitions this reader holds now.
    pub fn assignment(&self) -> Vec<Tp> {
        self.consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect())
            .unwrap_or_default()
    }
}

/// The log end of every partition `c` holds: one ListOffsets request per broker.
fn log_ends(c: &StreamConsumer) -> HashMap<Tp, i64> {
    let Ok(assigned) = c.assignment() else { return HashMap::new() };
    let mut tpl = TopicPartitionList::new();
    for e in assigned.elements() {
        if tpl.add_partition_offset(e.topic(), e.partition(), Offset::End).is_err() {
            return HashMap::new();
        }
    }
    if tpl.count() == 0 {
        return HashMap::new();
    }
    match c.offsets_for_times(tpl, Duration::from_secs(2)) {
        Ok(ends) => ends
            .elements()
            .iter()
            .filter_map(|e| match (e.error(), e.offset()) {
                (Ok(()), Offset::Offset(end)) => Some(((e.topic().to_owned(), e.partition()), end)),
                _ => None,
            })
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// The partitions of `topics` as the broker reports them.
pub async fn partitions(bootstrap: &str, topics: &[String]) -> Result<Vec<Tp>, crate::Error> {
    let consumer: StreamConsumer = crate::kafka::client_config(bootstrap).create()?;
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || -> Result<Vec<Tp>, crate::Error> {
        let mut all = Vec::new();
        for t in topics {
            for p in crate::kafka::partitions_of(&consumer, &t, Duration::from_secs(10))? {
                all.push((t.clone(), p));
            }
        }
        Ok(all)
    })
    .await
    .map_err(|e| crate::Error::Other(e.to_string()))?
}

/// Records of one key read from a time window of a topic.
#[derive(Debug, Default)]
pub struct Window {
    /// The key's records, in log order.
    pub events: Vec<Envelope>,
    /// Records read to find them (every key of the partitions).
    pub scanned: usize,
    /// The scan stopped at its limit before the window's end.
    pub exceeded: bool,
}

/// Every record of `topic` under `key` written from `from_ms` (from the
/// start when `None`) to `until_ms` (ms since the epoch, record time), in
/// log order, reading at most `limit` records in all. A one-off reader with
/// no group and no commits: what analysts and the dry run read the history
/// with. Every partition is scanned (the key's partition depends on the
/// producer's partitioner, which a deployment may set).
pub async fn read_window(
    bootstrap: &str,
    topic: &str,
    key: &str,
    from_ms: Option<i64>,
    until_ms: i64,
    limit: usize,
) -> Result<Window, crate::Error> {
    let wait = Duration::from_secs(10);
    let consumer: StreamConsumer = crate::kafka::client_config(bootstrap)
        .set("group.id", "homelink-window")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let topic_owned = topic.to_owned();
    let (consumer, mut ends) = tokio::task::spawn_blocking(move || -> Result<_, crate::Error> {
        let topic = topic_owned.as_str();
        let mut ends: HashMap<i32, i64> = HashMap::new();
        let mut assign = TopicPartitionList::new();
        let mut starts = TopicPartitionList::new();
        for p in crate::kafka::partitions_of(&consumer, topic, wait)? {
            starts.add_partition_offset(topic, p, Offset::Offset(from_ms.unwrap_or(0)))?;
        }
        let starts = if from_ms.is_some() { consumer.offsets_for_times(starts, wait)? } else { starts };
        for e in starts.elements() {
            let (low, high) = consumer.fetch_watermarks(topic, e.partition(), wait)?;
            let start = match (from_ms, e.offset()) {
                (None, _) => low,
                (Some(_), Offset::Offset(o)) => o.max(low),
                // No record at or after the time: nothing to read there.
                _ => continue,
            };
            if start < high {
                ends.insert(e.partition(), high);
                assign.add_partition_offset(topic, e.partition(), Offset::Offset(start))?;
            }
        }
        consumer.assign(&assign)?;
        Ok((consumer, ends))
    })
    .await
    .map_err(|e| crate::Error::Other(e.to_string()))??;
    let mut out = Window::default();
    while !ends.is_empty() {
        let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Err(_) => return Err(crate::Error::Other(format!("reading {topic}: no record within 30 s"))),
            Ok(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
                continue;
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(m)) => m,
        };
        let (p, offset) = (m.partition(), m.offset());
        let Some(&end) = ends.get(&p) else { continue };
        out.scanned += 1;
        if out.scanned > limit {
            out.exceeded = true;
            break;
        }
        if m.timestamp().to_millis().is_some_and(|ts| ts > until_ms) || offset + 1 >= end {
            ends.remove(&p);
        }
        if offset >= end || m.timestamp().to_millis().is_some_and(|ts| ts > until_ms) || m.key() != Some(key.as_bytes()) {
            continue;
        }
        if let Ok(envelope) = Envelope::from_json(m.payload().unwrap_or_default()) {
            out.events.push(envelope);
        }
    }
    Ok(out)
}
