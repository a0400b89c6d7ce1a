//! A household's history read straight from the log (issue 18): every
//! record of the household on the household stream, the commands, the
//! telemetry and the audit topic, merged into one sequence, with each
//! record's position. What `homelink history export` and the command API's
//! `GET /v1/households/{h}/history` read; never the read models.
//!
//! Only the household's own partition of each topic is read: records are
//! keyed by household and placed by librdkafka's default partitioner
//! (`consistent_random`: CRC-32 of the key modulo the partition count),
//! which [`partition_of`] computes. The window's start is found by record
//! time (`offsets_for_times`), so an export of the last day does not read
//! the month before it.
//!
//! Order: each topic's records stay in log order; across topics the merge
//! takes the earliest `occurredAt` (ties by topic, in [`Topics::history`]
//! order). The merge is deterministic, so a page's [`Cursor`] (the next
//! offset of each topic) resumes exactly where the page stopped.

use crate::kafka::client_config;
use chrono::{DateTime, Utc};
use homelink_events::topics::household_key;
use homelink_events::{Actor, Envelope, Topics};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

/// How far a record's log time may precede its `occurredAt` window edge
/// (clocks of the services that append it): the scan starts this much
/// earlier and filters by `occurredAt`.
const CLOCK_SLACK_MS: i64 = 60_000;

/// The topics of a household's history, in tie-break order.
pub fn topics(t: &Topics) -> Vec<String> {
    vec![t.households(), t.commands(), t.telemetry(), t.audit()]
}

/// librdkafka's default partitioner (`consistent_random`) for a non-empty
/// key: CRC-32 (IEEE) of the key modulo the partition count.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (crc32fast::hash(key) % partitions.max(1) as u32) as i32
}

/// One record of the history and where it is in the log.
#[derive(Debug, Clone)]
pub struct Entry {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub envelope: Envelope,
}

/// One event of an export: its position in the log, its time, type,
/// actor and payload (what `history export` writes and the API answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The payload's schema version.
    pub v: u16,
    pub actor: Actor,
    pub stream: String,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub causation_id: Option<Uuid>,
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    /// The device the event is about, if any.
    #[serde(default)]
    pub device_id: Option<Uuid>,
    pub payload: serde_json::Value,
}

impl From<Entry> for Record {
    fn from(e: Entry) -> Self {
        let env = e.envelope;
        let device_id = env.event().ok().and_then(|ev| ev.device_id());
        Self {
            topic: e.topic,
            partition: e.partition,
            offset: e.offset,
            event_id: env.event_id,
            occurred_at: env.occurred_at,
            event_type: env.event_type,
            v: env.v,
            actor: env.actor,
            stream: env.stream,
            seq: env.seq,
            causation_id: env.causation_id,
            correlation_id: env.correlation_id,
            device_id,
            payload: env.payload,
        }
    }
}

/// Where a page stopped: the next offset to read in each history topic's
/// partition, in [`topics`] order. Opaque to clients (`o1.o2.o3.o4`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub Vec<i64>);

impl Cursor {
    pub fn encode(&self) -> String {
        self.0.iter().map(i64::to_string).collect::<Vec<_>>().join(".")
    }

    /// `None` for anything that is not a cursor of `n` topics.
    pub fn decode(s: &str, n: usize) -> Option<Self> {
        let v: Vec<i64> = s.split('.').map(|p| p.parse::<i64>().ok().filter(|o| *o >= 0)).collect::<Option<_>>()?;
        (v.len() == n).then_some(Self(v))
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct Scan {
    pub bootstrap: String,
    pub topics: Vec<String>,
    pub household: Uuid,
    /// `occurredAt` from (inclusive); from the start when `None`.
    pub since: Option<DateTime<Utc>>,
    /// `occurredAt` up to (inclusive); up to the log's end when `None`.
    pub until: Option<DateTime<Utc>>,
    /// Only the records about this device.
    pub device: Option<Uuid>,
    /// Resume after a page ([`Cursor`]); `since` then only filters.
    pub after: Option<Cursor>,
}

/// How a scan ended.
#[derive(Debug, Clone, Default)]
pub struct Scanned {
    /// `Some` when it stopped at the limit: where the next page starts.
    pub next: Option<Cursor>,
    /// Records of the partitions read (every household sharing them).
    pub read: u64,
    /// Records of the household that could not be decoded (left out, counted).
    pub undecodable: u64,
    /// When the scan read to the window's end: the position right after it
    /// (every record before it was emitted or is not the household's in the
    /// window), where a fold stored as a snapshot resumes.
    pub end: Option<Cursor>,
}

enum Msg {
    Entry(Box<Entry>),
    /// Everything up to this offset was read and left out (another key,
    /// outside the window or the device filter).
    Skipped(i64),
    Undecodable(i64),
}

struct Lane {
    rx: mpsc::Receiver<Msg>,
    head: Option<Entry>,
    closed: bool,
    /// The offset after the last record this merge has seen from the lane.
    next: i64,
}

/// Reads the history, calling `emit` for each record in order, with the
/// cursor that resumes right after it, until `limit` records were emitted
/// (or `emit` returns `false`). An empty window (`until` before `since`, or
/// before anything was recorded) reads nothing.
pub async fn scan(s: &Scan, limit: usize, mut emit: impl FnMut(Entry, Cursor) -> bool) -> Result<Scanned, crate::Error> {
    if s.since.zip(s.until).is_some_and(|(a, b)| b < a) || s.until.is_some_and(|u| u.timestamp_millis() < 0) {
        return Ok(Scanned::default());
    }
    let key = household_key(s.household).into_bytes();
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut lanes = Vec::new();
    let readers: Vec<PartitionRead> = s
        .topics
        .iter()
        .enumerate()
        .map(|(i, topic)| PartitionRead {
            bootstrap: s.bootstrap.clone(),
            topic: topic.clone(),
            key: key.clone(),
            start: s.after.as_ref().map(|c| c.0[i]),
            since: s.since,
            until: s.until,
            device: s.device,
            read: read.clone(),
        })
        .collect();
    // The topics' partitions are opened together (metadata, watermarks,
    // the start by time): one round of broker latency, not one per topic.
    let opened = futures::future::try_join_all(readers.iter().map(PartitionRead::open)).await?;
    for (reader, (first, high)) in readers.into_iter().zip(opened) {
        let (tx, rx) = mpsc::channel(1024);
        match first {
            Some((consumer, partition, from)) => {
                tokio::spawn(reader.run(consumer, partition, from, high, tx));
                lanes.push(Lane { rx, head: None, closed: false, next: from });
            }
            // Nothing to read: a later page starts at the partition's end now.
            None => lanes.push(Lane { rx, head: None, closed: true, next: high }),
        }
    }
    let mut out = Scanned::default();
    let mut emitted = 0usize;
    loop {
        // Every open lane needs its head before the earliest can go.
        for lane in lanes.iter_mut().filter(|l| l.head.is_none() && !l.closed) {
            loop {
                match lane.rx.recv().await {
                    None => {
                        lane.closed = true;
                        break;
                    }
                    Some(Msg::Skipped(o)) => lane.next = lane.next.max(o + 1),
                    Some(Msg::Undecodable(o)) => {
                        lane.next = lane.next.max(o + 1);
                        out.undecodable += 1;
                    }
                    Some(Msg::Entry(e)) => {
                        lane.head = Some(*e);
                        break;
                    }
                }
            }
        }
        let earliest =
            lanes.iter().enumerate().filter_map(|(i, l)| l.head.as_ref().map(|e| (e.envelope.occurred_at, i))).min().map(|(_, i)| i);
        let Some(i) = earliest else {
            out.end = Some(Cursor(lanes.iter().map(|l| l.next).collect()));
            break;
        };
        if emitted == limit {
            out.next = Some(Cursor(lanes.iter().map(|l| l.head.as_ref().map_or(l.next, |e| e.offset)).collect()));
            break;
        }
        let e = lanes[i].head.take().expect("the earliest head");
        lanes[i].next = e.offset + 1;
        emitted += 1;
        let after = Cursor(lanes.iter().map(|l| l.head.as_ref().map_or(l.next, |e| e.offset)).collect());
        if !emit(e, after) {
            out.next = Some(Cursor(lanes.iter().map(|l| l.head.as_ref().map_or(l.next, |e| e.offset)).collect()));
            break;
        }
    }
    out.read = read.load(std::sync::atomic::Ordering::Relaxed);
    Ok(out)
}

struct PartitionRead {
    bootstrap: String,
    topic: String,
    key: Vec<u8>,
    start: Option<i64>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    device: Option<Uuid>,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl PartitionRead {
    fn consumer(&self) -> Result<StreamConsumer, crate::Error> {
        Ok(client_config(&self.bootstrap)
            .set("group.id", "homelink-history")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "100")
            .set("fetch.min.bytes", "1")
            .set("max.partition.fetch.bytes", "4194304")
            .create()?)
    }

    /// The consumer on the household's partition from the window's start
    /// (with the partition and the start; `None` when there is nothing to
    /// read) and the partition's end now (its high watermark).
    async fn open(&self) -> Result<(Option<(StreamConsumer, i32, i64)>, i64), crate::Error> {
        let consumer = self.consumer()?;
        let (topic, key, start, since) = (self.topic.clone(), self.key.clone(), self.start, self.since);
        tokio::task::spawn_blocking(move || -> Result<_, crate::Error> {
            let wait = Duration::from_secs(10);
            let parts = crate::kafka::partitions_of(&consumer, &topic, wait)?;
            let partition = partition_of(&key, parts.len() as i32);
            let (low, high) = consumer.fetch_watermarks(&topic, partition, wait)?;
            let from = match (start, since) {
                (Some(o), _) => o.max(low),
                (None, None) => low,
                // Before the epoch: from the start.
                (None, Some(t)) if t.timestamp_millis() - CLOCK_SLACK_MS <= 0 => low,
                (None, Some(t)) => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&topic, partition, Offset::Offset(t.timestamp_millis() - CLOCK_SLACK_MS))?;
                    match consumer.offsets_for_times(tpl, wait)?.find_partition(&topic, partition).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o.max(low),
                        // No record at or after that time.
                        _ => high,
                    }
                }
            };
            if from >= high {
                return Ok((None, high));
            }
            let mut assign = TopicPartitionList::new();
            assign.add_partition_offset(&topic, partition, Offset::Offset(from))?;
            consumer.assign(&assign)?;
            Ok((Some((consumer, partition, from)), high))
        })
        .await
        .map_err(|e| crate::Error::Other(e.to_string()))?
    }

    async fn run(self, consumer: StreamConsumer, partition: i32, from: i64, end: i64, tx: mpsc::Sender<Msg>) {
        let until_ms = self.until.map(|u| u.timestamp_millis() + CLOCK_SLACK_MS);
        let mut skipped: Option<i64> = None;
        let mut last = from - 1;
        loop {
            let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
                Err(_) => {
                    tracing::warn!(topic = %self.topic, partition, offset = last + 1, "history: no record within 30 s; ending this topic early");
                    break;
                }
                Ok(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                Ok(Err(e)) => {
                    tracing::warn!(topic = %self.topic, error = %e, "history: reading failed; ending this topic early");
                    break;
                }
                Ok(Ok(m)) => m,
            };
            let offset = m.offset();
            if offset >= end {
                break;
            }
            last = offset;
            self.read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if until_ms.is_some_and(|u| m.timestamp().to_millis().is_some_and(|ts| ts > u)) {
                break;
            }
            let msg = if m.key() != Some(self.key.as_slice()) {
                None
            } else {
                match Envelope::from_json(m.payload().unwrap_or_default()) {
                    Err(_) => Some(Msg::Undecodable(offset)),
                    // The household's first record past the window ends
                    // the topic: a cursor never passes a record of it that
                    // was not emitted (a snapshot resumes there).
                    Ok(env) if self.until.is_some_and(|u| env.occurred_at > u) => break,
                    Ok(env) => {
                        let inside = self.since.is_none_or(|s| env.occurred_at >= s);
                        let about = self.device.is_none_or(|d| env.event().ok().and_then(|e| e.device_id()) == Some(d));
                        (inside && about)
                            .then(|| Msg::Entry(Box::new(Entry { topic: self.topic.clone(), partition, offset, envelope: env })))
                    }
                }
            };
            match msg {
                None => {
                    skipped = Some(offset);
                    // Now and then, so a page's cursor does not re-read a long run of other households.
                    if offset % 4096 == 0 && tx.send(Msg::Skipped(offset)).await.is_err() {
                        return;
                    }
                }
                Some(msg) => {
                    if let Some(o) = skipped.take() {
                        if tx.send(Msg::Skipped(o)).await.is_err() {
                            return;
                        }
                    }
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
            if offset + 1 >= end {
                break;
            }
        }
        if let Some(o) = skipped {
            let _ = tx.send(Msg::Skipped(o)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_refuses_anything_else() {
        let c = Cursor(vec![0, 17, 4096, 3]);
        assert_eq!(Cursor::decode(&c.encode(), 4), Some(c));
        for bad in ["", "1.2.3", "1.2.3.4.5", "a.b.c.d", "-1.0.0.0", "1..2.3", "1.2.3.4\0"] {
            assert_eq!(Cursor::decode(bad, 4), None, "{bad:?}");
        }
    }

    #[test]
    fn the_partition_is_librdkafkas_crc32_of_the_key() {
        // CRC-32 (IEEE) of "123456789" is 0xCBF43926, the standard check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(partition_of(b"123456789", 7), (0xCBF4_3926u32 % 7) as i32);
        assert_eq!(partition_of(b"anything", 1), 0);
        assert_eq!(partition_of(b"anything", 0), 0);
    }
}
