//! The catch-up path: a Kafka consumer that reads only the partitions the
//! push channel has not covered.
//!
//! Every pushed event that continues its partition's position advances that
//! position in the applier's transaction (see [`crate::apply`]), so while the
//! push channel keeps up there is nothing to fetch: reading every record again
//! cost the broker as much as writing it. A monitor compares each partition's
//! committed position with the log end (its high watermark) every
//! [`CHECK_EVERY`]; a partition still behind after [`GRACE`] — a record that
//! was appended but never pushed (a producer crashed in between, a push was
//! dropped, the projector restarts and rebuilds) — is assigned to the consumer
//! at its committed position and read in large batches until it has caught
//! up, then unassigned again. At rest the consumer fetches nothing.

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
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the log end is compared with the committed positions.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a partition may stay behind before the consumer reads it: the
/// push channel normally closes a gap within milliseconds.
pub const GRACE: Duration = Duration::from_millis(500);

type Tp = (String, i32);

pub struct CatchUp {
    consumer: Arc<StreamConsumer>,
    partitions: Vec<Tp>,
    batch_max: usize,
    metrics: ServiceMetrics,
}

/// Where a partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    UpToDate,
    /// Behind the log end seen at `since`; `end` is that log end.
    Behind {
        since: Instant,
        end: i64,
    },
    /// Assigned to the consumer until the committed position reaches `end`.
    Reading {
        end: i64,
    },
}

/// What the monitor decides for one partition, given its committed position
/// (`None`: nothing applied yet) and the log end.
fn step(state: State, committed: Option<i64>, end: i64, now: Instant) -> State {
    let at = committed.unwrap_or(0);
    match state {
        _ if at >= end => State::UpToDate,
        State::UpToDate => State::Behind { since: now, end },
        State::Behind { end: was, .. } if at >= was => State::Behind { since: now, end },
        State::Behind { since, .. } if now.duration_since(since) >= GRACE => State::Reading { end },
        State::Behind { .. } => state,
        State::Reading { .. } => State::Reading { end },
    }
}

impl CatchUp {
    /// Finds the partitions of the projected topics; reads none of them yet.
    pub async fn assign(cfg: &Config, _applier: &Applier, metrics: ServiceMetrics) -> Result<Self, crate::Error> {
        let consumer = Arc::new(homelink_kit::kafka::consumer(&cfg.kafka_bootstrap, "homelink-projector", cfg.fetch_wait)?);
        let topics = cfg.topics.projected().to_vec();
        let c = consumer.clone();
        let partitions = tokio::task::spawn_blocking(move || -> Result<Vec<Tp>, homelink_kit::Error> {
            let mut all = Vec::new();
            for t in topics {
                for p in homelink_kit::kafka::partitions_of(&c, &t, Duration::from_secs(10))? {
                    all.push((t.clone(), p));
                }
            }
            Ok(all)
        })
        .await??;
        Ok(Self { consumer, partitions, batch_max: cfg.batch_max, metrics })
    }

    /// Watches the partitions and reads those behind, until cancelled.
    pub(crate) async fn run(self, jobs: mpsc::Sender<Job>, positions: Positions, cancel: CancellationToken) {
        let mut states: BTreeMap<Tp, State> = self.partitions.iter().map(|tp| (tp.clone(), State::UpToDate)).collect();
        let mut reading: Vec<Tp> = Vec::new();
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream = self.consumer.stream();
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = check.tick() => {
                    // Ends first: a position read before them would look behind.
                    let ends = self.log_ends().await;
                    let committed = positions.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let now = Instant::now();
                    for (tp, state) in states.iter_mut() {
                        let Some(end) = ends.get(tp).copied() else { continue };
                        let at = committed.get(tp).copied();
                        *state = step(*state, at, end, now);
                        self.metrics.consumer_lag.with_label_values(&[&tp.0, &tp.1.to_string()]).set((end - at.unwrap_or(0)).max(0));
                    }
                    let want: Vec<Tp> = states.iter().filter(|(_, s)| matches!(s, State::Reading { .. })).map(|(tp, _)| tp.clone()).collect();
                    if want != reading {
                        if let Err(e) = self.read_from(&want, &committed) {
                            tracing::warn!(error = %e, "assigning partitions to the catch-up consumer failed");
                            self.metrics.errors.with_label_values(&["kafka_assign"]).inc();
                            continue;
                        }
                        if !want.is_empty() {
                            tracing::info!(partitions = want.len(), "catching up partitions the push channel did not cover");
                        }
                        reading = want;
                    }
                    continue;
                }
                m = stream.next(), if !reading.is_empty() => m,
            };
            let mut msgs = vec![first];
            while msgs.len() < self.batch_max {
                match stream.next().now_or_never() {
                    Some(m) => msgs.push(m),
                    None => break,
                }
            }
            if let Some(batch) = self.batch(msgs) {
                if jobs.send(Job { batch, reply: None }).await.is_err() {
                    break;
                }
            }
        }
    }

    /// Assigns exactly `tps`, each at its committed position.
    fn read_from(&self, tps: &[Tp], committed: &HashMap<Tp, i64>) -> Result<(), rdkafka::error::KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for tp in tps {
            let offset = committed.get(tp).map_or(Offset::Beginning, |n| Offset::Offset(*n));
            tpl.add_partition_offset(&tp.0, tp.1, offset)?;
        }
        self.consumer.assign(&tpl)
    }

    /// The log end of every partition: one ListOffsets request for all of
    /// them (per broker), asking for the latest offset of each.
    async fn log_ends(&self) -> HashMap<Tp, i64> {
        let c = self.consumer.clone();
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &self.partitions {
            if tpl.add_partition_offset(t, *p, Offset::End).is_err() {
                return HashMap::new();
            }
        }
        // librdkafka's offset queries block: keep them off the async workers.
        let answer = tokio::task::spawn_blocking(move || c.offsets_for_times(tpl, Duration::from_secs(2))).await;
        match answer {
            Ok(Ok(ends)) => ends
                .elements()
                .iter()
                .filter_map(|e| match (e.error(), e.offset()) {
                    (Ok(()), Offset::Offset(end)) => Some(((e.topic().to_owned(), e.partition()), end)),
                    _ => None,
                })
                .collect(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "log ends unknown");
                self.metrics.errors.with_label_values(&["kafka_log_end"]).inc();
                HashMap::new()
            }
            Err(_) => HashMap::new(),
        }
    }

    /// Decodes fetched records into a log batch (undecodable ones become dead letters).
    fn batch(&self, msgs: Vec<Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>>>) -> Option<Batch> {
        let mut events = Vec::with_capacity(msgs.len());
        let mut dead = Vec::new();
        let mut next: HashMap<Tp, i64> = HashMap::new();
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
            let n = next.entry((topic.clone(), partition)).or_insert(offset + 1);
            *n = (*n).max(offset + 1);
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
        (!next.is_empty()).then(|| Batch::log(events, next.into_iter().map(|((t, p), n)| (t, p, n)).collect(), dead))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_read_only_when_the_push_does_not_close_its_gap_in_time() {
        let t0 = Instant::now();
        let later = t0 + GRACE;
        // Up to date stays so.
        assert_eq!(step(State::UpToDate, Some(10), 10, t0), State::UpToDate);
        // A new record: behind, not read yet.
        let s = step(State::UpToDate, Some(10), 11, t0);
        assert_eq!(s, State::Behind { since: t0, end: 11 });
        // The push covered it: up to date, never fetched.
        assert_eq!(step(s, Some(11), 11, later), State::UpToDate);
        // Steady traffic the push keeps up with: the gap seen before is
        // closed, a newer one opens; still never read.
        assert_eq!(step(s, Some(11), 20, later), State::Behind { since: later, end: 20 });
        // The same gap still open after the grace: read it.
        let r = step(s, Some(10), 11, later);
        assert_eq!(r, State::Reading { end: 11 });
        // Reading until the committed position reaches the log end.
        assert_eq!(step(r, Some(10), 12, later), State::Reading { end: 12 });
        assert_eq!(step(r, Some(12), 12, later), State::UpToDate);
        // Nothing applied yet, and a log with records: behind.
        assert!(matches!(step(State::UpToDate, None, 1, t0), State::Behind { .. }));
        // An empty log with nothing applied is up to date.
        assert_eq!(step(State::UpToDate, None, 0, t0), State::UpToDate);
    }
}
