//! Replay: every read model rebuilt from the log into a schema of its own
//! while the live one keeps serving, compared table by table, and switched
//! in when equal (`homelink replay`; ARCHITECTURE.md, "Replay and
//! switch-over").
//!
//! 1. **Rebuild.** The read-model migrations run in the replay schema (a
//!    pool whose `search_path` is that schema), and an [`Applier`] in
//!    [`Mode::Rebuild`] applies the log from its start in rounds: each round
//!    reads up to the positions the live projector has committed when it
//!    begins, never past them. Its positions are committed with its rows, so
//!    a replay killed at any point resumes where it stopped.
//! 2. **Gate.** Once a round starts close to the live positions, the replay
//!    takes the projector's gate ([`crate::apply::GATE`]) exclusively: the
//!    live projector's next transaction waits (readers go on reading), and
//!    the replay applies exactly up to the live positions.
//! 3. **Compare.** The columns that record when the projector ran rather
//!    than what the log says are carried over from the live tables, both
//!    sides are trimmed by the same retention at the same instant, and each
//!    table's row count and content digest (an order-free sum of row hashes)
//!    are compared.
//! 4. **Switch.** Only when every table matches (and the caller asked for
//!    it): one transaction moves the live tables into a schema named
//!    `<schema>_replaced_<time>` and the rebuilt ones into `public`; the live
//!    projector resumes on them at the same positions. Otherwise nothing
//!    changes and the replay schema stays for inspection.
//!
//! The change feed (`household_changes`, `household_change_seqs`) and the
//! `householdAt` snapshots are not rebuilt: change numbers are promises to
//! connected subscribers, and snapshots are taken on demand.

use crate::apply::{Applier, Batch, DeadRecord, Mode, GATE};
use crate::Retention;
use homelink_events::Topics;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::reader::{LogReader, ReaderConfig, Start, Tp};
use homelink_kit::shutdown::CancellationToken;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The read models the projector derives from the log: what a replay
/// rebuilds, compares and switches (the read-model schema's tables but
/// [`KEPT`]; a test holds the two lists to the schema).
pub const READ_MODELS: [&str; 16] = [
    "audit_log",
    "automation_runs",
    "automations",
    "device_commands",
    "device_shadows",
    "devices",
    "household_event_counts",
    "household_invitations",
    "household_members",
    "household_refused_events",
    "households",
    "projector_dead_letters",
    "projector_offsets",
    "rooms",
    "scene_activations",
    "scenes",
];

/// Tables of the read-model schema a replay leaves to the live side.
pub const KEPT: [&str; 3] = ["household_changes", "household_change_seqs", "household_snapshots"];

/// Columns that record when the projector (or its sweeps) ran, not what the
/// log says: carried over from the live rows before comparing, and left
/// out of digests. `status_offset` is the position of the latest presence
/// evidence *written*: a status that changes nothing shown is not written,
/// so where it ends depends on how the log was cut into batches.
const CARRIED: [(&str, &str, &[&str]); 2] = [
    ("device_shadows", "device_id", &["updated_at", "stale_announced", "status_offset"]),
    ("projector_dead_letters", "topic, partition, \"offset\"", &["recorded_at"]),
];

/// What a replay does.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub database_url: String,
    pub kafka_bootstrap: String,
    pub topics: Topics,
    /// The schema the read models are rebuilt in.
    pub schema: String,
    /// Switch over when every table matches.
    pub switch: bool,
    /// Drop what an earlier replay left in `schema` and start from the log's start.
    pub fresh: bool,
    /// Most records per transaction.
    pub batch_max: usize,
    /// The live projector's retention: both sides are trimmed by it before comparing.
    pub retention: Retention,
    /// A catch-up round that starts at most this many records behind the
    /// live projector is the last one: the gate closes for it.
    pub close_within: i64,
}

impl ReplayConfig {
    pub fn new(database_url: impl Into<String>, kafka_bootstrap: impl Into<String>, topics: Topics) -> Self {
        Self {
            database_url: database_url.into(),
            kafka_bootstrap: kafka_bootstrap.into(),
            topics,
            schema: "homelink_replay".into(),
            switch: false,
            fresh: false,
            batch_max: 20_000,
            retention: Retention::default(),
            close_within: 20_000,
        }
    }
}

/// Where a replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Applying the log, the live projector running.
    Rebuilding,
    /// The gate is closed: applying the last records, comparing, switching.
    Gated,
}

/// A progress report (about once a second while applying).
#[derive(Debug, Clone)]
pub struct Progress {
    pub phase: Phase,
    /// Events applied by this run.
    pub applied: u64,
    /// Records between the replay's positions and the live projector's.
    pub behind: i64,
    /// Events per second over the last report's interval.
    pub rate: f64,
    pub elapsed: Duration,
}

/// One table's row count and content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub rows: i64,
    pub hash: String,
}

/// One table on both sides.
#[derive(Debug, Clone)]
pub struct TableReport {
    pub table: String,
    pub live: Digest,
    pub rebuilt: Digest,
}

impl TableReport {
    pub fn equal(&self) -> bool {
        self.live == self.rebuilt
    }
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Report {
    pub applied: u64,
    pub elapsed: Duration,
    /// How long the live projector was held at the gate.
    pub gated: Duration,
    pub tables: Vec<TableReport>,
    /// Where the replaced live tables went, when it switched over.
    pub replaced: Option<String>,
}

impl Report {
    pub fn equal(&self) -> bool {
        self.tables.iter().all(TableReport::equal)
    }
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the replay schema must be a lower-case name that is not public or a system schema, got {0:?}")]
    Schema(String),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the replay schema: {0}")]
    Migrate(#[from] homelink_read_model::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] homelink_kit::Error),
    #[error("the live read models have no table {0} (are the live services migrated?)")]
    Missing(String),
    #[error("the read-model schema has a table {0} that replay::READ_MODELS and replay::KEPT do not list")]
    Unlisted(String),
    #[error("cancelled")]
    Cancelled,
}

fn valid_schema(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 40
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s != "public"
        && s != "information_schema"
        && !s.starts_with("pg_")
}

/// Runs a replay; see the module documentation.
pub async fn run(cfg: &ReplayConfig, mut progress: impl FnMut(&Progress), cancel: &CancellationToken) -> Result<Report, ReplayError> {
    if !valid_schema(&cfg.schema) {
        return Err(ReplayError::Schema(cfg.schema.clone()));
    }
    let started = Instant::now();
    let schema = cfg.schema.as_str();
    let mut admin = PgConnection::connect(&cfg.database_url).await?;
    prepare_schema(&mut admin, schema, cfg.fresh).await?;
    let base = PgConnectOptions::from_str(&cfg.database_url)?;
    // Rebuilt rows are re-derivable from the log and committed with their
    // positions: a commit lost in a crash is applied again, so it need not
    // wait for the disk.
    let rebuilt_opts = base.clone().options([("search_path", schema), ("synchronous_commit", "off")]);
    let rebuilt = PgPoolOptions::new().max_connections(2).connect_with(rebuilt_opts).await?;
    homelink_read_model::migrate(&rebuilt).await?;
    let live = PgPoolOptions::new().max_connections(2).connect_with(base).await?;

    let metrics = ServiceMetrics::new("replay");
    let mut applier = Applier::load_as(rebuilt.clone(), metrics.clone(), Mode::Rebuild).await?;
    let parts = homelink_kit::reader::partitions(&cfg.kafka_bootstrap, &cfg.topics.projected()).await?;
    let mut meter = Meter::new(started);

    // Rounds, each up to the live positions as they were when it began.
    loop {
        let targets = live_positions(&mut admin, &parts).await?;
        if behind(&applier, &targets) <= cfg.close_within {
            break;
        }
        catch_up(cfg, &mut applier, &targets, Phase::Rebuilding, &mut meter, &mut progress, cancel).await?;
    }

    // The gate: the live projector waits from here until it is opened.
    sqlx::query("SELECT pg_advisory_lock($1)").bind(GATE).execute(&mut admin).await?;
    let gated = Instant::now();
    let outcome = gated_compare(cfg, &mut admin, &live, &rebuilt, &mut applier, &parts, &mut meter, &mut progress, cancel).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)").bind(GATE).execute(&mut admin).await;
    let gated = gated.elapsed();
    let (tables, replaced) = outcome?;
    unlocked?;
    if replaced.is_some() {
        // What is left there: the migrations' bookkeeping and the kept tables' copies.
        rebuilt.close().await;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut admin).await?;
    }
    Ok(Report { applied: meter.applied, elapsed: started.elapsed(), gated, tables, replaced })
}

/// Applies the log onto the read models in `pool`'s schema from their
/// committed positions up to `targets` (the log's end when called, for
/// `None`), time-ordered as a replay does: a restore rebuilds this way
/// before the services start. Returns the events applied.
pub async fn rebuild_to(
    pool: PgPool,
    kafka_bootstrap: &str,
    topics: &Topics,
    targets: Option<HashMap<Tp, i64>>,
    progress: impl FnMut(&Progress),
    cancel: &CancellationToken,
) -> Result<u64, ReplayError> {
    let mut progress = progress;
    let cfg = ReplayConfig::new("", kafka_bootstrap, topics.clone());
    let mut applier = Applier::load_as(pool, ServiceMetrics::new("rebuild"), Mode::Rebuild).await?;
    let parts = homelink_kit::reader::partitions(kafka_bootstrap, &topics.projected()).await?;
    let targets = match targets {
        Some(t) => parts.into_iter().map(|tp| (tp.clone(), t.get(&tp).copied().unwrap_or(0))).collect(),
        None => log_ends(kafka_bootstrap, parts).await?,
    };
    let mut meter = Meter::new(Instant::now());
    catch_up(&cfg, &mut applier, &targets, Phase::Rebuilding, &mut meter, &mut progress, cancel).await?;
    Ok(meter.applied)
}

/// Creates the replay schema, or drops and recreates it when asked to or
/// when it is not a resumable replay (a switch-over emptied it).
async fn prepare_schema(admin: &mut PgConnection, schema: &str, fresh: bool) -> Result<(), ReplayError> {
    let resumable: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'projector_offsets')",
    )
    .bind(schema)
    .fetch_one(&mut *admin)
    .await?;
    if fresh || !resumable {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&mut *admin).await?;
    }
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).execute(&mut *admin).await?;
    Ok(())
}

/// The live projector's committed positions (0 where it has none).
async fn live_positions(admin: &mut PgConnection, parts: &[Tp]) -> Result<HashMap<Tp, i64>, sqlx::Error> {
    let rows = sqlx::query("SELECT topic, partition, next_offset FROM public.projector_offsets").fetch_all(&mut *admin).await?;
    let live: HashMap<Tp, i64> = rows.into_iter().map(|r| ((r.get::<String, _>(0), r.get::<i32, _>(1)), r.get::<i64, _>(2))).collect();
    Ok(parts.iter().map(|tp| (tp.clone(), live.get(tp).copied().unwrap_or(0))).collect())
}

fn position(applier: &Applier, tp: &Tp) -> i64 {
    applier.next_offset(&tp.0, tp.1).unwrap_or(0)
}

fn behind(applier: &Applier, targets: &HashMap<Tp, i64>) -> i64 {
    targets.iter().map(|(tp, t)| (t - position(applier, tp)).max(0)).sum()
}

/// Events applied and the rate, for progress reports.
struct Meter {
    started: Instant,
    applied: u64,
    last: (Instant, u64),
}

impl Meter {
    fn new(started: Instant) -> Self {
        Self { started, applied: 0, last: (started, 0) }
    }

    fn report(&mut self, phase: Phase, behind: i64, force: bool, progress: &mut impl FnMut(&Progress)) {
        let now = Instant::now();
        let dt = now.duration_since(self.last.0);
        if !force && dt < Duration::from_secs(1) {
            return;
        }
        let rate = (self.applied - self.last.1) as f64 / dt.as_secs_f64().max(1e-3);
        self.last = (now, self.applied);
        progress(&Progress { phase, applied: self.applied, behind, rate, elapsed: now.duration_since(self.started) });
    }
}

/// Applies the log up to exactly `targets` (never past them).
async fn catch_up(
    cfg: &ReplayConfig,
    applier: &mut Applier,
    targets: &HashMap<Tp, i64>,
    phase: Phase,
    meter: &mut Meter,
    progress: &mut impl FnMut(&Progress),
    cancel: &CancellationToken,
) -> Result<(), ReplayError> {
    // Partitions whose records below the target are gone (the telemetry
    // topic's retention) have nothing left to read there.
    let starts = log_starts(&cfg.kafka_bootstrap, targets.keys().cloned().collect()).await?;
    let skipped: Vec<(String, i32, i64)> = targets
        .iter()
        .filter(|(tp, t)| position(applier, tp) < **t && starts.get(*tp).is_some_and(|s| s >= *t))
        .map(|(tp, t)| (tp.0.clone(), tp.1, *t))
        .collect();
    if !skipped.is_empty() {
        apply_retrying(applier, &Batch::log(Vec::new(), skipped, Vec::new()), cancel).await?;
    }
    let todo: Vec<(Tp, Option<i64>)> = targets
        .iter()
        .filter(|(tp, t)| position(applier, tp) < **t)
        .map(|(tp, _)| (tp.clone(), applier.next_offset(&tp.0, tp.1)))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let rc = ReaderConfig {
        bootstrap: cfg.kafka_bootstrap.clone(),
        group: "homelink-replay".into(),
        fetch_wait: Duration::from_millis(100),
        batch_max: cfg.batch_max,
        gather: Duration::ZERO,
    };
    let reader = LogReader::new(&rc, Start::Assigned(todo), ServiceMetrics::new("replay_reader"))?;
    // Reading, decoding and ordering overlap applying: a reader task hands
    // batches over, each the next slice of the log in time order.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(2);
    let stop = cancel.child_token();
    let reached: HashMap<Tp, i64> = targets.keys().map(|tp| (tp.clone(), position(applier, tp))).collect();
    let mut merge = Merge::new(targets.clone(), reached, cfg.batch_max);
    let reading = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                while let Some(batch) = merge.ready() {
                    if tx.send(batch).await.is_err() {
                        return;
                    }
                }
                if merge.finished() {
                    return;
                }
                let Some(read) = reader.next(&stop).await else { return };
                merge.push(read);
            }
        })
    };
    while let Some(batch) = rx.recv().await {
        let n = batch.events.len() as u64;
        apply_retrying(applier, &batch, cancel).await?;
        meter.applied += n;
        meter.report(phase, behind(applier, targets), false, progress);
    }
    stop.cancel();
    let _ = reading.await;
    if cancel.is_cancelled() {
        return Err(ReplayError::Cancelled);
    }
    meter.report(phase, behind(applier, targets), true, progress);
    Ok(())
}

/// Records read but not applied yet, at most this many: past it, the merge
/// releases them without waiting for the slowest partition (a record with
/// an absurd time must not make the replay hold the whole log in memory).
const MERGE_MAX: usize = 500_000;

/// One read record waiting in [`Merge`].
enum Item {
    Event(homelink_kit::reader::Located),
    Dead(DeadRecord),
}

impl Item {
    fn offset(&self) -> i64 {
        match self {
            Item::Event(l) => l.offset,
            Item::Dead(d) => d.offset,
        }
    }
}

/// Orders what the reader fetched into slices of the log in time order.
///
/// The live projector applies records about as they are appended; a replay
/// reading from the start gets each partition as fast as the broker sends
/// it, and the telemetry topic would run far ahead of the commands topic.
/// The twin's fold tolerates a bounded skew between the two (acks and
/// reports arriving before their request: `homelink_events::twin`), so the
/// merge keeps every partition's records in offset order and releases a
/// record only when no partition still being read can bring an earlier one:
/// its time (`occurredAt`, set by the platform's services) is at most the
/// newest time read from every such partition. A rebuilding applier applies
/// each slice in this order ([`crate::apply::Mode::Rebuild`]), not topic by
/// topic. Records at or past the targets are dropped.
struct Merge {
    targets: HashMap<Tp, i64>,
    queues: BTreeMap<Tp, std::collections::VecDeque<(i64, Item)>>,
    /// The next offset the reader reached, per partition.
    reached: HashMap<Tp, i64>,
    /// The newest record time read, per partition.
    newest: HashMap<Tp, i64>,
    /// The next offset handed over, per partition.
    sent: HashMap<Tp, i64>,
    buffered: usize,
    batch_max: usize,
}

impl Merge {
    fn new(targets: HashMap<Tp, i64>, reached: HashMap<Tp, i64>, batch_max: usize) -> Self {
        let sent = reached.clone();
        Self { targets, queues: BTreeMap::new(), reached, newest: HashMap::new(), sent, buffered: 0, batch_max: batch_max.max(1) }
    }

    fn below(&self, tp: &Tp, offset: i64) -> bool {
        self.targets.get(tp).is_some_and(|end| offset < *end)
    }

    /// Every partition read up to its target.
    fn read_all(&self) -> bool {
        self.targets.iter().all(|(tp, t)| self.reached.get(tp).copied().unwrap_or(0) >= *t)
    }

    /// Read and handed over up to the targets.
    fn finished(&self) -> bool {
        self.read_all() && self.buffered == 0 && self.targets.iter().all(|(tp, t)| self.sent.get(tp).copied().unwrap_or(0) >= *t)
    }

    fn push(&mut self, read: homelink_kit::reader::LogBatch) {
        for e in read.events {
            let tp = (e.topic.clone(), e.partition);
            if !self.below(&tp, e.offset) {
                continue;
            }
            let ts = e.envelope.occurred_at.timestamp_micros();
            let newest = self.newest.entry(tp.clone()).or_insert(ts);
            *newest = (*newest).max(ts);
            self.queues.entry(tp).or_default().push_back((ts, Item::Event(e)));
            self.buffered += 1;
        }
        for u in read.undecodable {
            let tp = (u.topic.clone(), u.partition);
            if !self.below(&tp, u.offset) {
                continue;
            }
            // No time of its own: it goes with the partition's newest record.
            let ts = self.newest.get(&tp).copied().unwrap_or(i64::MIN);
            let dead = DeadRecord::undecodable(&u.topic, u.partition, u.offset, &u.payload, &u.reason);
            let q = self.queues.entry(tp).or_default();
            // Events and undecodable records of one read come separately: keep offset order.
            let at = q.partition_point(|(_, i)| i.offset() < u.offset);
            q.insert(at, (ts, Item::Dead(dead)));
            self.buffered += 1;
        }
        for (t, p, n) in read.next_offsets {
            let tp = (t, p);
            if let Some(end) = self.targets.get(&tp) {
                let r = self.reached.entry(tp).or_insert(0);
                *r = (*r).max(n.min(*end));
            }
        }
    }

    /// The time up to which records can be released: the least newest time
    /// of the partitions still being read (none read yet: nothing).
    fn horizon(&self) -> Option<i64> {
        if self.read_all() || self.buffered > MERGE_MAX {
            return Some(i64::MAX);
        }
        let mut h = i64::MAX;
        for (tp, t) in &self.targets {
            if self.reached.get(tp).copied().unwrap_or(0) >= *t {
                continue;
            }
            h = h.min(*self.newest.get(tp)?);
        }
        Some(h)
    }

    /// The next slice of at most `batch_max` records, oldest first, with the
    /// positions it completes; `None` when nothing can be released yet.
    fn ready(&mut self) -> Option<Batch> {
        let horizon = self.horizon()?;
        let (mut events, mut dead) = (Vec::new(), Vec::new());
        while events.len() + dead.len() < self.batch_max {
            let next = self.queues.iter().filter_map(|(tp, q)| q.front().map(|(ts, _)| (*ts, tp))).filter(|(ts, _)| *ts <= horizon).min();
            let Some((_, tp)) = next else { break };
            let tp = tp.clone();
            let Some((_, item)) = self.queues.get_mut(&tp).and_then(|q| q.pop_front()) else { break };
            self.buffered -= 1;
            match item {
                Item::Event(e) => events.push(e),
                Item::Dead(d) => dead.push(d),
            }
        }
        // Each partition is complete up to its first record still waiting,
        // or up to where the reader is when none waits.
        let mut next_offsets = Vec::new();
        for (tp, reached) in &self.reached {
            let upto = self.queues.get(tp).and_then(|q| q.front()).map_or(*reached, |(_, i)| i.offset());
            let sent = self.sent.entry(tp.clone()).or_insert(0);
            if upto > *sent {
                *sent = upto;
                next_offsets.push((tp.0.clone(), tp.1, upto));
            }
        }
        if events.is_empty() && dead.is_empty() && next_offsets.is_empty() {
            return None;
        }
        next_offsets.sort();
        Some(Batch::log(events, next_offsets, dead))
    }
}

/// Applies one batch, retrying the store's errors until it commits or the replay is cancelled.
async fn apply_retrying(applier: &mut Applier, batch: &Batch, cancel: &CancellationToken) -> Result<(), ReplayError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match applier.apply(&[batch]).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "applying a replayed batch failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Err(ReplayError::Cancelled),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The first offset still in the log of each partition.
async fn log_starts(bootstrap: &str, parts: Vec<Tp>) -> Result<HashMap<Tp, i64>, ReplayError> {
    Ok(watermarks(bootstrap, parts).await?.into_iter().map(|(tp, (low, _))| (tp, low)).collect())
}

/// The end (next offset) of each partition's log.
async fn log_ends(bootstrap: &str, parts: Vec<Tp>) -> Result<HashMap<Tp, i64>, ReplayError> {
    Ok(watermarks(bootstrap, parts).await?.into_iter().map(|(tp, (_, high))| (tp, high)).collect())
}

/// Each partition's first offset and end; fails when one does not answer.
pub async fn watermarks(bootstrap: &str, parts: Vec<Tp>) -> Result<HashMap<Tp, (i64, i64)>, homelink_kit::Error> {
    let consumer: BaseConsumer = homelink_kit::kafka::client_config(bootstrap).create()?;
    tokio::task::spawn_blocking(move || {
        parts
            .into_iter()
            .map(|tp| consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(10)).map(|w| (tp, w)))
            .collect::<Result<HashMap<_, _>, _>>()
    })
    .await
    .map_err(|e| homelink_kit::Error::Other(e.to_string()))?
    .map_err(Into::into)
}

/// With the gate closed: the last records, the carried columns, retention on
/// both sides, the digests and, when equal and asked for, the switch.
#[allow(clippy::too_many_arguments)]
async fn gated_compare(
    cfg: &ReplayConfig,
    admin: &mut PgConnection,
    live: &PgPool,
    rebuilt: &PgPool,
    applier: &mut Applier,
    parts: &[Tp],
    meter: &mut Meter,
    progress: &mut impl FnMut(&Progress),
    cancel: &CancellationToken,
) -> Result<(Vec<TableReport>, Option<String>), ReplayError> {
    let schema = cfg.schema.as_str();
    let targets = live_positions(admin, parts).await?;
    catch_up(cfg, applier, &targets, Phase::Gated, meter, progress, cancel).await?;
    for (table, key, cols) in CARRIED {
        let set: Vec<String> = cols.iter().map(|c| format!("{c} = l.{c}")).collect();
        let join: Vec<String> = key.split(", ").map(|k| format!("r.{k} = l.{k}")).collect();
        let sql = format!("UPDATE {schema}.{table} r SET {} FROM public.{table} l WHERE {}", set.join(", "), join.join(" AND "));
        sqlx::query(&sql).execute(&mut *admin).await?;
    }
    cfg.retention.expire(live, false).await?;
    cfg.retention.expire(rebuilt, false).await?;
    let tables = compare(admin, schema).await?;
    let equal = tables.iter().all(TableReport::equal);
    if !(equal && cfg.switch) {
        return Ok((tables, None));
    }
    let replaced = format!("{schema}_replaced_{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    let mut tx = admin.begin().await?;
    // Readers hold the tables briefly; a switch that cannot get them in time changes nothing.
    sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut *tx).await?;
    sqlx::query(&format!("CREATE SCHEMA {replaced}")).execute(&mut *tx).await?;
    for t in &tables {
        sqlx::query(&format!("ALTER TABLE public.{0} SET SCHEMA {replaced}", t.table)).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE {schema}.{0} SET SCHEMA public", t.table)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok((tables, Some(replaced)))
}

/// Every rebuilt table's count and digest beside the live one's.
async fn compare(admin: &mut PgConnection, schema: &str) -> Result<Vec<TableReport>, ReplayError> {
    let all: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 AND table_type = 'BASE TABLE' AND table_name <> '_sqlx_migrations'",
    )
    .bind(schema)
    .fetch_all(&mut *admin)
    .await?;
    if let Some(t) = all.into_iter().find(|t| !READ_MODELS.contains(&t.as_str()) && !KEPT.contains(&t.as_str())) {
        return Err(ReplayError::Unlisted(t));
    }
    let rebuilt = digests(admin, schema).await?;
    let mut out = Vec::new();
    for (table, rebuilt) in rebuilt {
        let present: bool =
            sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(format!("public.{table}")).fetch_one(&mut *admin).await?;
        if !present {
            return Err(ReplayError::Missing(table));
        }
        let cols = compared_columns(admin, schema, &table).await?;
        let live = digest(admin, "public", &table, &cols).await?;
        out.push(TableReport { table, live, rebuilt });
    }
    Ok(out)
}

/// The columns of `schema.table` a digest covers: all but those that record
/// when the projector ran ([`CARRIED`]).
async fn compared_columns(admin: &mut PgConnection, schema: &str, table: &str) -> Result<Vec<String>, sqlx::Error> {
    let skip: &[&str] = CARRIED.iter().find(|(t, _, _)| *t == table).map_or(&[], |(_, _, c)| *c);
    let cols: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *admin)
    .await?;
    Ok(cols.into_iter().filter(|c| !skip.contains(&c.as_str())).collect())
}

/// The row count and content digest of every read model in `schema` (the
/// change feed and snapshots left out, and the columns that record when the
/// projector ran): what a replay compares, and what a backup records for
/// its restore to be checked against.
pub async fn digests(admin: &mut PgConnection, schema: &str) -> Result<Vec<(String, Digest)>, sqlx::Error> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = $1 AND table_type = 'BASE TABLE' AND table_name <> '_sqlx_migrations' AND table_name = ANY($2)
          ORDER BY table_name",
    )
    .bind(schema)
    .bind(READ_MODELS.iter().map(|t| t.to_string()).collect::<Vec<_>>())
    .fetch_all(&mut *admin)
    .await?;
    let mut out = Vec::new();
    for table in tables {
        let cols = compared_columns(admin, schema, &table).await?;
        out.push((table.clone(), digest(admin, schema, &table, &cols).await?));
    }
    Ok(out)
}

/// A table's row count and an order-free digest of its rows: the sum of the
/// first 60 bits of each row's MD5 (named columns, in this order).
async fn digest(admin: &mut PgConnection, schema: &str, table: &str, cols: &[String]) -> Result<Digest, sqlx::Error> {
    let row: Vec<String> = cols.iter().map(|c| format!("t.\"{}\"", c.replace('"', "\"\""))).collect();
    let sql = format!(
        "SELECT count(*)::bigint, COALESCE(sum(('x' || substr(md5(ROW({})::text), 1, 15))::bit(60)::bigint), 0)::text FROM {schema}.{table} t",
        row.join(", ")
    );
    let r = sqlx::query(&sql).fetch_one(&mut *admin).await?;
    Ok(Digest { rows: r.get(0), hash: r.get(1) })
}

#[cfg(test)]
mod tests {
    use super::valid_schema;

    #[test]
    fn only_plain_schemas_of_its_own_are_replay_targets() {
        for ok in ["homelink_replay", "r2", "_x"] {
            assert!(valid_schema(ok), "{ok}");
        }
        for bad in ["public", "pg_catalog", "information_schema", "", "Replay", "a;drop", "a b", "1abc", &"x".repeat(41)] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }
}
