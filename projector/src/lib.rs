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
//! - [`consume`]: the catch-up path, a Kafka consumer with partitions assigned
//!   from the offsets stored in Postgres (never Kafka's committed offsets).
//! - this file: configuration, the HTTP routes (push channel, ops) and wiring.
//!
//! Two inputs feed the applier: the catch-up consumer (bulk, long fetch wait)
//! and the push channel `POST /internal/v1/events`, on which the device bridge
//! hands over events right after Kafka acknowledged them. Committed shadow
//! changes are announced with `pg_notify` on [`apply::SHADOW_CHANGED_CHANNEL`] inside
//! the same transaction, so a listener hears only committed state.

pub mod apply;
pub mod consume;
pub mod projections;
pub mod stale;

use apply::{Applier, Batch, Outcome, Source};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use homelink_events::Topics;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::push::Located;
use homelink_kit::shutdown::CancellationToken;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Projector settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub kafka_bootstrap: String,
    pub topics: Topics,
    /// Address of the public HTTP listener (ops routes).
    pub listen: String,
    /// Address of the internal listener (the push channel), reachable only by services.
    pub internal_listen: String,
    /// Fetch wait of the catch-up consumer: long, it is the bulk path.
    pub fetch_wait: Duration,
    /// Most records per catch-up batch.
    pub batch_max: usize,
    /// How long a device command's row is kept after it was requested (its
    /// events stay in the log; the audit log keeps who did what).
    pub command_retention: Duration,
    /// How long a household change stays available to subscribers resuming
    /// `after` it (`household_changes`; older: `RESUME_TOO_OLD`).
    pub change_retention: Duration,
    /// How often rows past their retention are deleted.
    pub retention_every: Duration,
    /// How often the stale sweep announces devices that went quiet.
    pub stale_every: Duration,
    /// The service-to-service token pushes must carry; `None` refuses every push.
    pub internal_token: Option<secrecy::SecretString>,
}

impl Config {
    pub fn new(database_url: impl Into<String>, kafka_bootstrap: impl Into<String>, topics: Topics) -> Self {
        Self {
            database_url: database_url.into(),
            kafka_bootstrap: kafka_bootstrap.into(),
            topics,
            listen: "127.0.0.1:0".into(),
            internal_listen: "127.0.0.1:0".into(),
            fetch_wait: Duration::from_millis(500),
            batch_max: 5_000,
            command_retention: Duration::from_secs(30 * 24 * 3600),
            change_retention: Duration::from_secs(24 * 3600),
            retention_every: Duration::from_secs(600),
            stale_every: Duration::from_secs(5),
            internal_token: None,
        }
    }
}

/// A job for the single writer.
pub(crate) struct Job {
    pub batch: Batch,
    pub reply: Option<oneshot::Sender<Result<Outcome, String>>>,
}

/// Positions the applier has committed, shared with the lag reporter.
pub(crate) type Positions = Arc<Mutex<HashMap<(String, i32), i64>>>;

#[derive(Clone)]
struct AppState {
    jobs: mpsc::Sender<Job>,
    topics: Topics,
}

/// A built projector, ready to run.
pub struct Application {
    listeners: homelink_kit::ops::Listeners,
    pool: PgPool,
    metrics: ServiceMetrics,
    applier: Applier,
    jobs_rx: mpsc::Receiver<Job>,
    jobs_tx: mpsc::Sender<Job>,
    consumer: consume::CatchUp,
    retention: (Duration, Duration, Duration),
    stale_every: Duration,
}

/// Applies the read-model migrations (`homelink-read-model`).
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    Ok(homelink_read_model::migrate(pool).await?)
}

/// Why the projector could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    ReadModel(#[from] homelink_read_model::Error),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Kit(#[from] homelink_kit::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Application {
    /// Connects to Postgres (applying migrations) and Kafka and binds the listener.
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let metrics = ServiceMetrics::new("projector");
        let pool = homelink_kit::db::connect_with_retry(&cfg.database_url, 8, Duration::from_secs(30)).await?;
        migrate(&pool).await?;
        let applier = Applier::load(pool.clone(), metrics.clone()).await?;
        let consumer = consume::CatchUp::assign(&cfg, &applier, metrics.clone()).await?;
        let (jobs_tx, jobs_rx) = mpsc::channel(64);
        let token = cfg.internal_token.clone().map(Arc::new);
        if token.is_none() {
            tracing::warn!("no service token configured (HOMELINK_INTERNAL_TOKEN_FILE): every push is refused; the catch-up consumer applies everything");
        }
        let internal = Router::new()
            .route("/internal/v1/events", post(push_events))
            .route_layer(axum::middleware::from_fn_with_state(token, homelink_kit::push::require_token))
            .with_state(AppState { jobs: jobs_tx.clone(), topics: cfg.topics.clone() });
        let public = homelink_kit::ops::router(metrics.clone(), homelink_kit::ops::postgres_ready(pool.clone()));
        let listeners = homelink_kit::ops::Listeners::bind(&cfg.listen, public, &cfg.internal_listen, internal).await?;
        let retention = (cfg.command_retention, cfg.change_retention, cfg.retention_every);
        Ok(Self { listeners, pool, metrics, applier, jobs_rx, jobs_tx, consumer, retention, stale_every: cfg.stale_every })
    }

    /// The public listener's port (ops routes).
    pub fn port(&self) -> u16 {
        self.listeners.public_port()
    }

    /// The internal listener's port (the push channel).
    pub fn internal_port(&self) -> u16 {
        self.listeners.internal_port()
    }

    pub fn metrics(&self) -> ServiceMetrics {
        self.metrics.clone()
    }

    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// Runs until `cancel` fires; an in-flight batch is committed or rolled back, never half-applied.
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), Error> {
        let positions: Positions = Arc::new(Mutex::new(self.applier.offsets().clone()));
        let writer = tokio::spawn(run_applier(self.applier, self.jobs_rx, self.metrics.clone(), positions.clone(), cancel.clone()));
        let catch_up = tokio::spawn(self.consumer.run(self.jobs_tx, positions, cancel.clone()));
        tokio::spawn(expire_rows(self.pool.clone(), self.retention, self.metrics.clone(), cancel.clone()));
        tokio::spawn(stale::run(self.pool.clone(), self.stale_every, self.metrics.clone(), cancel.clone()));
        self.listeners.serve(cancel.clone()).await?;
        let _ = catch_up.await;
        let _ = writer.await;
        Ok(())
    }
}

/// Deletes `device_commands` rows requested longer than the command
/// retention ago and `household_changes` older than the change retention,
/// every `every`, until cancelled: the tables would otherwise grow with every
/// tap and report forever. A rebuild from the log recreates old rows until
/// the next sweep.
async fn expire_rows(
    pool: PgPool,
    (commands, changes, every): (Duration, Duration, Duration),
    metrics: ServiceMetrics,
    cancel: CancellationToken,
) {
    loop {
        for (sql, keep, what) in [
            (
                "DELETE FROM device_commands WHERE COALESCE(requested_at, acked_at) < now() - make_interval(secs => $1)",
                commands,
                "commands_expired",
            ),
            ("DELETE FROM household_changes WHERE at < now() - make_interval(secs => $1)", changes, "changes_expired"),
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

/// `POST /internal/v1/events`: events the bridge appended, applied ahead of
/// the catch-up consumer. Answers after the transaction committed.
async fn push_events(State(s): State<AppState>, Json(events): Json<Vec<Located>>) -> (StatusCode, Json<serde_json::Value>) {
    // Applied ahead of the log: only what that topic can hold, or nothing.
    let refused: Vec<String> = events.iter().filter_map(|l| admissible(&s.topics, l).err()).take(10).collect();
    if !refused.is_empty() {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({"error": "events refused", "reasons": refused})));
    }
    let (reply, rx) = oneshot::channel();
    let job = Job { batch: Batch::push(events), reply: Some(reply) };
    if s.jobs.send(job).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "shutting down"})));
    }
    match rx.await {
        Ok(Ok(o)) => (StatusCode::OK, Json(serde_json::json!({"applied": o.applied, "skipped": o.skipped}))),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": e}))),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "shutting down"}))),
    }
}

/// Whether a pushed event is one its topic can hold: device events on the
/// telemetry topic, household events on the household topic, device commands
/// on the commands topic, refused commands on the audit topic.
fn admissible(topics: &Topics, l: &Located) -> Result<(), String> {
    use homelink_events::Event;
    let ev = l.envelope.event().map_err(|e| format!("{}@{}: undecodable: {e}", l.topic, l.offset))?;
    let ok = if l.topic == topics.telemetry() {
        matches!(
            ev,
            Event::DeviceStateReported(_)
                | Event::DeviceCommandAcked(_)
                | Event::DeviceStatusChanged(_)
                | Event::DeviceCommandDelivered(_)
                | Event::DeviceCommandExpired(_)
        )
    } else if l.topic == topics.households() {
        ev.household_event().is_some()
    } else if l.topic == topics.commands() {
        matches!(ev, Event::DeviceCommandRequested(_) | Event::DeviceCommandRevoked(_))
    } else if l.topic == topics.audit() {
        matches!(ev, Event::CommandDenied(_))
    } else {
        false
    };
    if ok && l.partition >= 0 && l.offset >= 0 {
        Ok(())
    } else {
        Err(format!("{}/{}@{}: {} does not belong there", l.topic, l.partition, l.offset, l.envelope.event_type))
    }
}

/// The single writer's loop: takes every queued job, applies them in one
/// transaction. Log batches are retried until they commit (they must not be
/// lost); push batches fail fast, the catch-up path has them.
async fn run_applier(
    mut applier: Applier,
    mut rx: mpsc::Receiver<Job>,
    metrics: ServiceMetrics,
    positions: Positions,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            j = rx.recv() => match j { Some(j) => j, None => return },
        };
        let mut jobs = vec![first];
        while jobs.len() < 64 {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        loop {
            let started = std::time::Instant::now();
            let batches: Vec<&Batch> = jobs.iter().map(|j| &j.batch).collect();
            match applier.apply(&batches).await {
                Ok(outcome) => {
                    metrics.latency.with_label_values(&["apply_batch"]).observe(started.elapsed().as_secs_f64());
                    positions.lock().unwrap_or_else(|e| e.into_inner()).clone_from(applier.offsets());
                    for j in jobs.drain(..) {
                        if let Some(r) = j.reply {
                            let _ = r.send(Ok(outcome.clone()));
                        }
                    }
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "applying a batch failed");
                    metrics.errors.with_label_values(&["apply"]).inc();
                    let mut keep = Vec::new();
                    for j in jobs.drain(..) {
                        match j.reply {
                            Some(r) if j.batch.source == Source::Push => {
                                let _ = r.send(Err("read model store unavailable".into()));
                            }
                            reply => keep.push(Job { batch: j.batch, reply }),
                        }
                    }
                    jobs = keep;
                    if jobs.is_empty() {
                        break;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
