//! The projector: folds the Kafka log into the Postgres read models (registry,
//! device shadows, command lifecycle, per-household event counts).
//!
//! Layout:
//! - [`projections`]: one module per read model (shadows, commands, households
//!   with members and registry, audit, counts), listed in one table.
//! - the read models' schema and the reads other services share live in
//!   `homelink-read-model`; this crate is their one writer.
//! - [`apply`]: the single writer; one transaction per batch with offsets and
//!   dedup bookkeeping. Start reading here.
//! - [`consume`]: the input, every projected partition read continuously
//!   through `homelink_kit::reader` from the positions stored in Postgres
//!   (never Kafka's committed offsets).
//! - this file: configuration, the ops routes and wiring.
//!
//! The log is the only input: a Kafka fetch returns as soon as a record
//! arrives, so a report reaches the read model within milliseconds without
//! any side channel (ARCHITECTURE.md, "One path through the log"). Committed
//! shadow changes are announced with `pg_notify` on
//! [`apply::SHADOW_CHANGED_CHANNEL`] inside the same transaction, so a
//! listener hears only committed state.

pub mod apply;
pub mod consume;
pub mod projections;
pub mod replay;
pub mod stale;

use apply::Applier;
use axum::Router;
use homelink_events::Topics;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::shutdown::CancellationToken;
use sqlx::PgPool;
use std::time::Duration;

/// Projector settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub kafka_bootstrap: String,
    pub topics: Topics,
    /// Address of the HTTP listener (ops routes).
    pub listen: String,
    /// Longest an empty fetch waits at the broker (a record ends the wait at once).
    pub fetch_wait: Duration,
    /// Most records per batch (one transaction).
    pub batch_max: usize,
    /// How long a batch keeps taking records after its first one: fewer,
    /// larger transactions for that much latency.
    pub gather: Duration,
    /// How long the rows that grow with traffic are kept.
    pub retention: Retention,
    /// How often the stale sweep announces devices that went quiet.
    pub stale_every: Duration,
}

impl Config {
    pub fn new(database_url: impl Into<String>, kafka_bootstrap: impl Into<String>, topics: Topics) -> Self {
        Self {
            database_url: database_url.into(),
            kafka_bootstrap: kafka_bootstrap.into(),
            topics,
            listen: "127.0.0.1:0".into(),
            fetch_wait: Duration::from_millis(500),
            batch_max: 5_000,
            gather: Duration::ZERO,
            retention: Retention::default(),
            stale_every: Duration::from_secs(5),
        }
    }
}

/// A built projector, ready to run.
pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    pool: PgPool,
    metrics: ServiceMetrics,
    applier: Applier,
    consumer: consume::Input,
    retention: Retention,
    stale_every: Duration,
}

/// Applies the read-model migrations (`homelink-read-model`).
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    Ok(homelink_read_model::migrate(pool).await?)
}

/// Why the projector could not start, or stopped.
pub use homelink_kit::service::ServiceError as Error;

impl Application {
    /// Connects to Postgres (applying migrations) and Kafka and binds the listener.
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let metrics = ServiceMetrics::new("projector");
        // The series the dashboards and alert rules read, at 0 from the start (kit::metrics).
        metrics.touch(&[], &["applied"], &["apply", "dead_letter", "undecodable_event", "undecodable_record"], &["apply_batch"]);
        let pool = homelink_kit::db::connect_with_retry(&cfg.database_url, 8, Duration::from_secs(30)).await?;
        migrate(&pool).await?;
        let applier = Applier::load(pool.clone(), metrics.clone()).await?;
        let consumer = consume::Input::assign(&cfg, &applier, metrics.clone()).await?;
        let router = homelink_kit::ops::router(metrics.clone(), homelink_kit::ops::postgres_ready(pool.clone()));
        let listener = homelink_kit::ops::bind(&cfg.listen).await?;
        let retention = cfg.retention;
        Ok(Self { listener, router, pool, metrics, applier, consumer, retention, stale_every: cfg.stale_every })
    }

    /// The listener's port (ops routes).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn metrics(&self) -> ServiceMetrics {
        self.metrics.clone()
    }

    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// Runs until `cancel` fires; an in-flight batch is committed or rolled back, never half-applied.
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), Error> {
        let input = tokio::spawn(self.consumer.run(self.applier, self.metrics.clone(), cancel.clone()));
        let mut tasks = homelink_kit::service::Tasks::new(cancel.child_token());
        tasks.spawn("retention", expire_rows(self.pool.clone(), self.retention, self.metrics.clone(), tasks.token()));
        tasks.spawn("stale", stale::run(self.pool.clone(), self.stale_every, self.metrics.clone(), tasks.token()));
        let served = homelink_kit::ops::serve(self.listener, self.router, &self.metrics, cancel.clone()).await;
        let _ = input.await;
        tasks.shutdown().await;
        Ok(served?)
    }
}

/// How long the rows that grow with traffic are kept (ARCHITECTURE.md,
/// "Retention"): the tables would otherwise grow with every tap and report
/// forever. Everything deleted here stays in the log (`homelink history
/// export` reads it), and a rebuild from the log recreates old rows until the
/// next sweep.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `device_commands` and `scene_activations` rows, after their request.
    pub commands: Duration,
    /// `household_changes` (subscribers resuming further back get `RESUME_TOO_OLD`).
    pub changes: Duration,
    /// Automation runs: ordinary ones, and those worth keeping longer
    /// (failed, stopped, a step refused).
    pub runs: (Duration, Duration),
    /// `audit_log` rows and refused household commands, after they happened.
    pub audit: Duration,
    /// `household_snapshots`, after they were taken (derived: `householdAt`
    /// takes them again when it folds far).
    pub snapshots: Duration,
    /// `projector_dead_letters`, after they were recorded; used invitations
    /// and expired ones, after their expiry.
    pub leftovers: Duration,
    /// How often the live projector deletes what is past its retention.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            commands: Duration::from_secs(14 * DAY),
            changes: Duration::from_secs(15 * 60),
            runs: (Duration::from_secs(7 * DAY), Duration::from_secs(90 * DAY)),
            audit: Duration::from_secs(90 * DAY),
            snapshots: Duration::from_secs(30 * DAY),
            leftovers: Duration::from_secs(90 * DAY),
            every: Duration::from_secs(60),
        }
    }
}

/// The retention settings on the command line (projector and `homelink replay`: a replay compares with the same retention).
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionArgs {
    /// How long device commands and scene activations are kept, in days.
    #[arg(long, env = "HOMELINK_COMMAND_RETENTION_DAYS", default_value_t = 14)]
    pub command_retention_days: u64,
    /// How long household changes stay available to subscriptions resuming `after` them, in seconds.
    #[arg(long, env = "HOMELINK_CHANGE_RETENTION_SECS", default_value_t = 15 * 60)]
    pub change_retention_secs: u64,
    /// How long automation runs are kept, in days (failed, stopped or refused ones: `--kept-run-retention-days`).
    #[arg(long, env = "HOMELINK_RUN_RETENTION_DAYS", default_value_t = 7)]
    pub run_retention_days: u64,
    #[arg(long, env = "HOMELINK_KEPT_RUN_RETENTION_DAYS", default_value_t = 90)]
    pub kept_run_retention_days: u64,
    /// How long the audit log is kept, in days (the audit topic keeps it for ever).
    #[arg(long, env = "HOMELINK_AUDIT_RETENTION_DAYS", default_value_t = 90)]
    pub audit_retention_days: u64,
    /// How long householdAt snapshots are kept, in days.
    #[arg(long, env = "HOMELINK_SNAPSHOT_RETENTION_DAYS", default_value_t = 30)]
    pub snapshot_retention_days: u64,
    /// How long dead letters and expired invitations are kept, in days.
    #[arg(long, env = "HOMELINK_LEFTOVER_RETENTION_DAYS", default_value_t = 90)]
    pub leftover_retention_days: u64,
    /// How often rows past their retention are deleted, in seconds.
    #[arg(long, env = "HOMELINK_RETENTION_EVERY_SECS", default_value_t = 60)]
    pub retention_every_secs: u64,
}

impl From<&RetentionArgs> for Retention {
    fn from(a: &RetentionArgs) -> Self {
        let days = |d: u64| Duration::from_secs(d.max(1) * 24 * 3600);
        Self {
            commands: days(a.command_retention_days),
            changes: Duration::from_secs(a.change_retention_secs.max(1)),
            runs: (days(a.run_retention_days), days(a.kept_run_retention_days)),
            audit: days(a.audit_retention_days),
            snapshots: days(a.snapshot_retention_days),
            leftovers: days(a.leftover_retention_days),
            every: Duration::from_secs(a.retention_every_secs.max(1)),
        }
    }
}

/// Rows deleted per transaction: a sweep never holds locks for long.
const EXPIRE_BATCH: i64 = 10_000;

impl Retention {
    /// The tables this retention trims, each with the predicate that picks
    /// its rows past retention (`$1`: seconds kept) and that retention.
    fn rules(&self) -> [(&'static str, &'static str, &'static str, Duration); 9] {
        [
            ("commands_expired", "device_commands", "COALESCE(requested_at, acked_at) < now() - make_interval(secs => $1)", self.commands),
            ("activations_expired", "scene_activations", "at < now() - make_interval(secs => $1)", self.commands),
            ("changes_expired", "household_changes", "at < now() - make_interval(secs => $1)", self.changes),
            (
                "runs_expired",
                "automation_runs",
                "finished_at < now() - make_interval(secs => $1) AND outcome NOT IN ('failed', 'stopped') AND NOT steps @> '[{\"outcome\": \"refused\"}]'",
                self.runs.0,
            ),
            ("kept_runs_expired", "automation_runs", "finished_at < now() - make_interval(secs => $1)", self.runs.1),
            ("audit_expired", "audit_log", "at < now() - make_interval(secs => $1)", self.audit),
            ("refused_expired", "household_refused_events", "occurred_at < now() - make_interval(secs => $1)", self.audit),
            ("snapshots_expired", "household_snapshots", "taken_at < now() - make_interval(secs => $1)", self.snapshots),
            ("dead_letters_expired", "projector_dead_letters", "recorded_at < now() - make_interval(secs => $1)", self.leftovers),
        ]
    }

    /// Deletes what is past its retention, in transactions of at most
    /// [`EXPIRE_BATCH`] rows (each taking the projector's gate when `gate`);
    /// returns the rows deleted per kind.
    pub async fn expire(&self, pool: &PgPool, gate: bool) -> Result<Vec<(&'static str, u64)>, sqlx::Error> {
        let mut done = Vec::new();
        let invitations =
            ("invitations_expired", "household_invitations", "expires_at < now() - make_interval(secs => $1)", self.leftovers);
        for (what, table, predicate, keep) in self.rules().into_iter().chain([invitations]) {
            let sql = format!("DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE {predicate} LIMIT $2))");
            let mut total = 0;
            loop {
                let mut tx = pool.begin().await?;
                if gate {
                    apply::enter_gate(&mut tx).await?;
                }
                let n = sqlx::query(&sql).bind(keep.as_secs_f64()).bind(EXPIRE_BATCH).execute(&mut *tx).await?.rows_affected();
                tx.commit().await?;
                total += n;
                if n < EXPIRE_BATCH as u64 {
                    break;
                }
            }
            done.push((what, total));
        }
        Ok(done)
    }
}

/// Deletes rows past their retention every `r.every` until cancelled.
async fn expire_rows(pool: PgPool, r: Retention, metrics: ServiceMetrics, cancel: CancellationToken) {
    loop {
        match r.expire(&pool, true).await {
            Ok(done) => {
                for (what, n) in done {
                    metrics.messages_out.with_label_values(&[what]).inc_by(n);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "deleting rows past their retention failed");
                metrics.errors.with_label_values(&["retention"]).inc();
            }
        }
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(r.every) => {} }
    }
}
