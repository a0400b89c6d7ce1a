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
    /// How long a device command's row is kept after it was requested (its
    /// events stay in the log; the audit log keeps who did what).
    pub command_retention: Duration,
    /// How long a household change stays available to subscribers resuming
    /// `after` it (`household_changes`; older: `RESUME_TOO_OLD`).
    pub change_retention: Duration,
    /// How long an automation run's trace is kept after it finished, and
    /// (longer) a run that failed, was stopped or had a step refused: a
    /// chatty schedule never pushes out the traces worth reading.
    pub run_retention: (Duration, Duration),
    /// How often rows past their retention are deleted.
    pub retention_every: Duration,
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
            command_retention: Duration::from_secs(30 * 24 * 3600),
            change_retention: Duration::from_secs(24 * 3600),
            run_retention: (Duration::from_secs(7 * 24 * 3600), Duration::from_secs(90 * 24 * 3600)),
            retention_every: Duration::from_secs(600),
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
        let retention = Retention {
            commands: cfg.command_retention,
            changes: cfg.change_retention,
            runs: cfg.run_retention,
            every: cfg.retention_every,
        };
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

/// Deletes `device_commands` rows requested longer than the command
/// retention ago, `household_changes` older than the change retention and
/// automation runs past theirs,
/// every `every`, until cancelled: the tables would otherwise grow with every
/// tap and report forever. A rebuild from the log recreates old rows until
/// the next sweep.
/// How long rows that grow with traffic are kept.
#[derive(Debug, Clone, Copy)]
struct Retention {
    commands: Duration,
    changes: Duration,
    /// Ordinary runs, and those worth keeping longer.
    runs: (Duration, Duration),
    every: Duration,
}

async fn expire_rows(pool: PgPool, r: Retention, metrics: ServiceMetrics, cancel: CancellationToken) {
    let Retention { commands, changes, runs: (runs, kept_runs), every } = r;
    loop {
        for (sql, keep, what) in [
            (
                "DELETE FROM device_commands WHERE COALESCE(requested_at, acked_at) < now() - make_interval(secs => $1)",
                commands,
                "commands_expired",
            ),
            ("DELETE FROM household_changes WHERE at < now() - make_interval(secs => $1)", changes, "changes_expired"),
            (
                "DELETE FROM automation_runs WHERE finished_at < now() - make_interval(secs => $1)
                   AND outcome NOT IN ('failed', 'stopped') AND NOT steps @> '[{\"outcome\": \"refused\"}]'",
                runs,
                "runs_expired",
            ),
            ("DELETE FROM automation_runs WHERE finished_at < now() - make_interval(secs => $1)", kept_runs, "kept_runs_expired"),
        ] {
            match sqlx::query(sql).bind(keep.as_secs_f64()).execute(&pool).await {
                Ok(done) => metrics.messages_out.with_label_values(&[what]).inc_by(done.rows_affected()),
                Err(e) => {
                    tracing::warn!(error = %e, what, "deleting rows past their retention failed");
                    metrics.errors.with_label_values(&["retention"]).inc();
                }
            }
        }
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(every) => {} }
    }
}
