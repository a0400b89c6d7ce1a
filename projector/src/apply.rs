//! The applier: the projector's single writer, the transaction engine. What
//! each read model does with an event is in [`crate::projections`]. Every
//! batch read from the log is applied in one Postgres transaction together
//! with its partitions' next offsets, so a crash at any point leaves either
//! all of a batch or none of it.
//!
//! Deduplication is by log position `(topic, partition, offset)`: an event
//! below the committed `next_offset` of its partition was applied.
//!
//! A record the applier cannot apply because of its content (Postgres refuses
//! a value, the envelope does not decode) is isolated by bisecting the batch
//! and recorded in `projector_dead_letters` with its position and the reason,
//! and the projection moves on: a poison record never stops a partition.
//! Errors of the store itself (connection lost, shutdown, serialization) are
//! retried instead, and before a retry the committed offsets are re-read, so
//! a COMMIT that reached disk although the client saw an error is not applied
//! a second time.
//!
//! Semantic guards come on top: a device report applies only if its `seq` is
//! higher than the shadow's, a status only if its offset is, and a command's
//! status only moves forward. So a duplicate record (a producer retry at a
//! new offset) changes nothing either.

use crate::projections::shadows::{ShadowCache, SHADOW_CACHE_MAX};
use homelink_events::Event;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::reader::Located;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

pub use homelink_events::topics::{MEMBERSHIP_CHANGED_CHANNEL, REGISTRY_CHANGED_CHANNEL, SHADOW_CHANGED_CHANNEL};

/// A batch of located events read from the log.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Located>,
    /// The next offset per `(topic, partition)` once this batch is applied
    /// (it also covers undecodable records that were skipped).
    pub next_offsets: Vec<(String, i32, i64)>,
    /// Records that could not even be decoded, recorded as dead letters in
    /// the same transaction.
    pub dead: Vec<DeadRecord>,
}

impl Batch {
    pub fn log(events: Vec<Located>, next_offsets: Vec<(String, i32, i64)>, dead: Vec<DeadRecord>) -> Self {
        Self { events, next_offsets, dead }
    }
}

/// A record the projector cannot apply, as it goes into `projector_dead_letters`.
#[derive(Debug, Clone)]
pub struct DeadRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<Uuid>,
    pub household_id: Option<Uuid>,
    pub event_type: Option<String>,
    pub reason: String,
    pub payload: String,
}

/// Longest payload text kept in a dead-letter row.
const DEAD_PAYLOAD_MAX: usize = 64 * 1024;

impl DeadRecord {
    /// A record whose bytes did not decode into an envelope.
    pub fn undecodable(topic: &str, partition: i32, offset: i64, raw: &[u8], reason: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            offset,
            event_id: None,
            household_id: None,
            event_type: None,
            reason: storable(reason),
            payload: storable(&String::from_utf8_lossy(raw)),
        }
    }

    /// A decoded envelope that could not be applied.
    pub fn of(l: &Located, reason: &str) -> Self {
        Self {
            topic: l.topic.clone(),
            partition: l.partition,
            offset: l.offset,
            event_id: Some(l.envelope.event_id),
            household_id: Some(l.envelope.household_id),
            event_type: Some(storable(&l.envelope.event_type)),
            reason: storable(reason),
            // serde_json escapes control characters, NUL included.
            payload: storable(&serde_json::to_string(&l.envelope).unwrap_or_default()),
        }
    }
}

/// Text Postgres can hold: NULs escaped, at most [`DEAD_PAYLOAD_MAX`] bytes.
fn storable(s: &str) -> String {
    let mut s = s.replace('\0', "\\u0000");
    if s.len() > DEAD_PAYLOAD_MAX {
        let mut end = DEAD_PAYLOAD_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Whether an error is the store's (retry the batch) rather than the
/// content's (isolate and dead-letter the record). SQLSTATE classes 08
/// (connection), 40 (rollback: serialization, deadlock), 53 (resources), 55
/// (object state, lock not available), 57 (operator intervention, shutdown),
/// 58 (system) and XX (internal) are the store's; so is every error that is
/// not an answer from the server (I/O, TLS, pool, protocol).
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => match d.code() {
            Some(code) => matches!(code.get(..2), Some("08" | "40" | "53" | "55" | "57" | "58" | "XX")),
            None => true,
        },
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::TypeNotFound { .. } => false,
        _ => true,
    }
}

/// What a batch did, for the caller and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub applied: usize,
    pub skipped: usize,
}

/// The single writer of the read models.
pub struct Applier {
    pool: PgPool,
    metrics: ServiceMetrics,
    /// Mirror of `projector_offsets`, valid because this is the only writer
    /// and re-read after any failed transaction (its COMMIT may have landed).
    next_offsets: HashMap<(String, i32), i64>,
    /// A transaction failed since the mirror was last read.
    stale: bool,
    /// The committed shadows of recently seen devices (emptied with `stale`).
    shadows: ShadowCache,
    /// Serving the live read models, or rebuilding them elsewhere.
    mode: Mode,
}

/// What an applier's transactions do besides writing the read models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The live projector: every transaction first takes the [`GATE`] shared
    /// (a replay switching over holds it exclusively), feeds the change feed
    /// and notifies the services on commit.
    Live,
    /// A replay into a schema of its own (`crate::replay`): no gate, no
    /// change feed (the live one is kept at a switch-over), no notifications
    /// (nobody reads this schema yet).
    Rebuild,
}

/// The advisory lock key of the projector's gate: every live write to the
/// read models holds it shared for its transaction; a replay takes it
/// exclusively to freeze them while it compares and switches schemas.
pub const GATE: i64 = 0x486f_6d65_4c69_6e6b; // "HomeLink"

/// Takes the gate shared for the rest of the transaction (waits while a replay switches over).
pub async fn enter_gate(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(GATE).execute(&mut **tx).await?;
    Ok(())
}

type Key = (String, i32, i64);

impl Applier {
    /// The live projector's applier.
    pub async fn load(pool: PgPool, metrics: ServiceMetrics) -> Result<Self, sqlx::Error> {
        Self::load_as(pool, metrics, Mode::Live).await
    }

    /// An applier in `mode`, at the positions committed in `pool`'s `projector_offsets`.
    pub async fn load_as(pool: PgPool, metrics: ServiceMetrics, mode: Mode) -> Result<Self, sqlx::Error> {
        let rows = sqlx::query("SELECT topic, partition, next_offset FROM projector_offsets").fetch_all(&pool).await?;
        let next_offsets = rows.into_iter().map(|r| ((r.get::<String, _>(0), r.get::<i32, _>(1)), r.get::<i64, _>(2))).collect();
        Ok(Self { pool, metrics, next_offsets, stale: false, shadows: ShadowCache::new(SHADOW_CACHE_MAX), mode })
    }

    /// Every partition's committed next offset (as of the last commit).
    pub fn offsets(&self) -> &HashMap<(String, i32), i64> {
        &self.next_offsets
    }

    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.next_offsets.get(&(topic.to_owned(), partition)).copied()
    }

    /// Applies several batches in one transaction, all or nothing; a record
    /// that fails on its content is isolated and dead-lettered, the rest
    /// applied. An `Err` is the store's: retry the same batches.
    pub async fn apply(&mut self, batches: &[&Batch]) -> Result<Outcome, sqlx::Error> {
        match self.apply_once(batches).await {
            Err(e) if !is_transient(&e) => {
                tracing::warn!(error = %e, "a batch failed on its content; isolating the records that cannot be applied");
                self.isolate(batches).await
            }
            r => r,
        }
    }

    /// Bisects the batches' events (in log position order) until every
    /// record either applied or, alone, failed on its content and was
    /// dead-lettered; then commits the batches' own end positions.
    async fn isolate(&mut self, batches: &[&Batch]) -> Result<Outcome, sqlx::Error> {
        let mut units: BTreeMap<Key, &Located> = BTreeMap::new();
        for b in batches {
            for e in &b.events {
                units.entry((e.topic.clone(), e.partition, e.offset)).or_insert(e);
            }
        }
        let units: Vec<&Located> = units.into_values().collect();
        let mut out = Outcome::default();
        // The batches' undecodable records first: the sub-batches below move
        // offsets past them, and a crash in between must not lose their rows.
        let dead: Vec<DeadRecord> = batches.iter().flat_map(|b| b.dead.iter().cloned()).collect();
        if !dead.is_empty() {
            let only_dead = Batch { events: Vec::new(), next_offsets: Vec::new(), dead };
            self.apply_once(&[&only_dead]).await?;
        }
        // Ranges to try, the next one on top: halves are pushed right first.
        let mut todo = vec![(0, units.len())];
        while let Some((lo, hi)) = todo.pop() {
            if lo >= hi {
                continue;
            }
            let part = sub_batch(&units[lo..hi]);
            match self.apply_once(&[&part]).await {
                Ok(o) => {
                    out.applied += o.applied;
                    out.skipped += o.skipped;
                }
                Err(e) if is_transient(&e) => return Err(e),
                Err(e) if hi - lo == 1 => {
                    self.dead_letter(&DeadRecord::of(units[lo], &e.to_string())).await?;
                    out.skipped += 1;
                }
                Err(_) => {
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            }
        }
        let ends: Vec<Batch> = batches
            .iter()
            .filter(|b| !b.next_offsets.is_empty() || !b.dead.is_empty())
            .map(|b| Batch { events: Vec::new(), next_offsets: b.next_offsets.clone(), dead: b.dead.clone() })
            .collect();
        if !ends.is_empty() {
            let refs: Vec<&Batch> = ends.iter().collect();
            self.apply_once(&refs).await?;
        }
        Ok(out)
    }

    /// Records one record the projector cannot apply and moves past it (its
    /// partition's offset advances in the same transaction).
    async fn dead_letter(&mut self, d: &DeadRecord) -> Result<(), sqlx::Error> {
        tracing::error!(topic = %d.topic, partition = d.partition, offset = d.offset, reason = %d.reason, "record dead-lettered");
        let mut tx = self.pool.begin().await?;
        if self.mode == Mode::Live {
            enter_gate(&mut tx).await?;
        }
        let recorded = insert_dead(&mut tx, std::slice::from_ref(d)).await?;
        sqlx::query(
            r#"INSERT INTO projector_offsets (topic, partition, next_offset) VALUES ($1, $2, $3)
               ON CONFLICT (topic, partition) DO UPDATE SET next_offset = GREATEST(projector_offsets.next_offset, EXCLUDED.next_offset)"#,
        )
        .bind(&d.topic)
        .bind(d.partition)
        .bind(d.offset + 1)
        .execute(&mut *tx)
        .await?;
        if let Err(e) = tx.commit().await {
            self.stale = true;
            return Err(e);
        }
        let cur = self.next_offsets.entry((d.topic.clone(), d.partition)).or_insert(d.offset + 1);
        *cur = (*cur).max(d.offset + 1);
        self.metrics.errors.with_label_values(&["dead_letter"]).inc_by(recorded);
        Ok(())
    }

    /// One transaction; marks the offset mirror stale when it fails.
    async fn apply_once(&mut self, batches: &[&Batch]) -> Result<Outcome, sqlx::Error> {
        let r = self.apply_tx(batches).await;
        if r.is_err() {
            self.stale = true;
            self.shadows.clear();
        }
        r
    }

    async fn apply_tx(&mut self, batches: &[&Batch]) -> Result<Outcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if self.mode == Mode::Live {
            enter_gate(&mut tx).await?;
        }
        if self.stale {
            // The last COMMIT may have reached disk although we saw an error:
            // what is committed is the truth, not the mirror.
            let rows = sqlx::query("SELECT topic, partition, next_offset FROM projector_offsets").fetch_all(&mut *tx).await?;
            self.next_offsets = rows.into_iter().map(|r| ((r.get::<String, _>(0), r.get::<i32, _>(1)), r.get::<i64, _>(2))).collect();
            self.stale = false;
        }

        // Collect events by position, past what is committed.
        let mut by_pos: BTreeMap<Key, &Located> = BTreeMap::new();
        let mut new_offsets: HashMap<(String, i32), i64> = HashMap::new();
        for b in batches {
            for e in &b.events {
                if self.next_offset(&e.topic, e.partition).is_some_and(|n| e.offset < n) {
                    continue;
                }
                by_pos.entry((e.topic.clone(), e.partition, e.offset)).or_insert(e);
            }
            for (t, p, n) in &b.next_offsets {
                let cur = new_offsets.entry((t.clone(), *p)).or_insert(*n);
                *cur = (*cur).max(*n);
            }
        }
        let total: usize = batches.iter().map(|b| b.events.len()).sum();

        // The live projector applies a batch in log position order; a
        // rebuild's batch is a time-ordered slice of every partition
        // (`replay::Merge`) and is applied in that order, each position once.
        let ordered: Vec<&Located> = match self.mode {
            Mode::Live => by_pos.values().copied().collect(),
            Mode::Rebuild => {
                let mut once = std::collections::HashSet::new();
                batches
                    .iter()
                    .flat_map(|b| b.events.iter())
                    .filter(|e| {
                        let k = (e.topic.clone(), e.partition, e.offset);
                        by_pos.contains_key(&k) && once.insert(k)
                    })
                    .collect()
            }
        };
        let mut work = Vec::new();
        let mut dead: Vec<DeadRecord> = batches.iter().flat_map(|b| b.dead.iter().cloned()).collect();
        for located in ordered {
            let k = (&located.topic, located.partition, located.offset);
            match located.envelope.event() {
                Ok(ev) => match unstorable(&located.envelope, &ev) {
                    None => work.push((located, ev)),
                    Some(why) => {
                        tracing::warn!(topic = %k.0, offset = k.2, %why, "unstorable event dead-lettered");
                        dead.push(DeadRecord::of(located, &why));
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, topic = %k.0, offset = k.2, "undecodable event dead-lettered");
                    self.metrics.errors.with_label_values(&["undecodable_event"]).inc();
                    dead.push(DeadRecord::of(located, &format!("undecodable event: {e}")));
                }
            }
        }
        let recorded = insert_dead(&mut tx, &dead).await?;

        let crate::projections::Applied { mut notifications, shadows, diverged, counts } =
            crate::projections::apply(&mut tx, &work, &self.shadows, self.mode == Mode::Live).await?;
        self.metrics.errors.with_label_values(&["shadow_cache_diverged"]).inc_by(diverged);
        // Reads waiting for a consistency token look again after this batch.
        if !work.is_empty() || !new_offsets.is_empty() {
            notifications.push((homelink_events::topics::APPLIED_CHANNEL, String::new()));
        }
        if self.mode == Mode::Rebuild {
            notifications.clear();
        }

        // The batch's closing statement: its event counts, its positions and
        // its notifications (sent on commit), one round trip.
        if !counts.households.is_empty() || !new_offsets.is_empty() || !notifications.is_empty() {
            let (t, p, n) = unzip3(new_offsets.iter().map(|((t, p), n)| (t.clone(), *p, *n)));
            let (channels, payloads): (Vec<&str>, Vec<String>) = notifications.into_iter().unzip();
            sqlx::query(
                r#"WITH counted AS (
                     INSERT INTO household_event_counts (household_id, event_type, applied)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[])
                     ON CONFLICT (household_id, event_type) DO UPDATE SET applied = household_event_counts.applied + EXCLUDED.applied),
                   positions AS (
                     INSERT INTO projector_offsets (topic, partition, next_offset)
                     SELECT * FROM UNNEST($4::text[], $5::int[], $6::bigint[])
                     ON CONFLICT (topic, partition) DO UPDATE SET next_offset = GREATEST(projector_offsets.next_offset, EXCLUDED.next_offset))
                   SELECT pg_notify(c, n) FROM UNNEST($7::text[], $8::text[]) AS u(c, n)"#,
            )
            .bind(&counts.households)
            .bind(&counts.types)
            .bind(&counts.applied)
            .bind(&t)
            .bind(&p)
            .bind(&n)
            .bind(&channels)
            .bind(&payloads)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.shadows.commit(shadows);

        for ((t, p), n) in new_offsets {
            let cur = self.next_offsets.entry((t, p)).or_insert(n);
            *cur = (*cur).max(n);
        }
        let applied = work.len();
        self.metrics.messages_out.with_label_values(&["applied"]).inc_by(applied as u64);
        // Counted once: a dead letter recorded before (ON CONFLICT) is not counted again.
        self.metrics.errors.with_label_values(&["dead_letter"]).inc_by(recorded);
        Ok(Outcome { applied, skipped: total - applied })
    }
}

/// Why an event cannot be stored although it decodes: a sequence number
/// beyond Postgres's `bigint` (the MQTT edge refuses them; a record written
/// behind its back must not wrap to a negative number).
fn unstorable(env: &homelink_events::Envelope, ev: &Event) -> Option<String> {
    use homelink_events::protocol::MAX_SEQ;
    if env.seq.is_some_and(|s| s > MAX_SEQ) {
        return Some(format!("stream seq {} exceeds {MAX_SEQ}", env.seq.unwrap_or_default()));
    }
    match ev {
        Event::DeviceStateReported(r) if r.seq > MAX_SEQ => Some(format!("report seq {} exceeds {MAX_SEQ}", r.seq)),
        _ => None,
    }
}

/// The events of `units` (in log position order) as one batch, whose end
/// positions follow from their offsets.
fn sub_batch(units: &[&Located]) -> Batch {
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for l in units {
        let end = ends.entry((l.topic.clone(), l.partition)).or_insert(l.offset + 1);
        *end = (*end).max(l.offset + 1);
    }
    let next_offsets = ends.into_iter().map(|((t, p), n)| (t, p, n)).collect();
    Batch::log(units.iter().map(|l| (*l).clone()).collect(), next_offsets, Vec::new())
}

/// Records dead letters (each position once); returns how many are new.
async fn insert_dead(tx: &mut Transaction<'_, Postgres>, dead: &[DeadRecord]) -> Result<u64, sqlx::Error> {
    if dead.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&DeadRecord) -> Option<String>| dead.iter().map(f).collect::<Vec<_>>();
    let topics = col(|d| Some(d.topic.clone()));
    let sources = col(|_| Some("log".to_owned()));
    let types = col(|d| d.event_type.clone());
    let reasons = col(|d| Some(d.reason.clone()));
    let payloads = col(|d| Some(d.payload.clone()));
    let partitions: Vec<i32> = dead.iter().map(|d| d.partition).collect();
    let offsets: Vec<i64> = dead.iter().map(|d| d.offset).collect();
    let events: Vec<Option<Uuid>> = dead.iter().map(|d| d.event_id).collect();
    let households: Vec<Option<Uuid>> = dead.iter().map(|d| d.household_id).collect();
    let done = sqlx::query(
        r#"INSERT INTO projector_dead_letters (topic, partition, "offset", source, event_id, household_id, event_type, reason, payload)
           SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::text[], $5::uuid[], $6::uuid[], $7::text[], $8::text[], $9::text[])
           ON CONFLICT DO NOTHING"#,
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&sources)
    .bind(&events)
    .bind(&households)
    .bind(&types)
    .bind(&reasons)
    .bind(&payloads)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

fn unzip3<A, B, C>(it: impl Iterator<Item = (A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for (x, y, z) in it {
        a.push(x);
        b.push(y);
        c.push(z);
    }
    (a, b, c)
}
