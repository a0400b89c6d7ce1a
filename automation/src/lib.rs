//! The automation engine (issue 17): reads the household stream (first up to
//! where it decided last, alone, so every household is known) and the
//! devices' telemetry from the log, decides which automations fire and what
//! their runs do, and appends those decisions and the runs' commands to the
//! log. Its waits (`for`, debounce, delays, waits, schedules, queued runs)
//! are rows written with the positions it decided up to, so a restart
//! neither resets nor skips nor repeats one.
//!
//! Layout: [`decide`] (`events::engine`) is pure (which triggers a fact fires, whether a trigger
//! still holds, derived ids); [`engine`] holds the state and the effects;
//! this file is the configuration and the wiring.

pub use homelink_events::engine as decide;
pub mod engine;

use homelink_events::Topics;
use homelink_kit::kafka::{Appender, ProducerConfig};
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::reader::{LogReader, ReaderConfig, Start};
use homelink_kit::shutdown::CancellationToken;
use sqlx::{PgPool, Row};
use std::time::Duration;

/// Why the engine could not start, or stopped (the services' shared error).
pub use homelink_kit::service::ServiceError as Error;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub kafka_bootstrap: String,
    pub topics: Topics,
    pub listen: String,
    /// A wait due longer ago than this when the engine gets to it (it was
    /// down) is recorded as missed instead of run.
    pub grace: Duration,
    /// How often due timers are looked for.
    pub tick: Duration,
    /// The breaker: an automation that starts more runs than this in the
    /// window is paused until it is saved again.
    pub breaker: (usize, Duration),
}

impl Config {
    pub fn new(database_url: impl Into<String>, kafka_bootstrap: impl Into<String>, topics: Topics) -> Self {
        Self {
            database_url: database_url.into(),
            kafka_bootstrap: kafka_bootstrap.into(),
            topics,
            listen: "127.0.0.1:0".into(),
            grace: Duration::from_secs(600),
            tick: Duration::from_millis(250),
            breaker: (engine::BREAKER_RUNS, engine::BREAKER_WINDOW),
        }
    }
}

/// The read models' schema (the engine reads shadows when it starts) and its own tables.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    homelink_read_model::migrate(pool).await?;
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m.run(pool).await?;
    Ok(())
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    metrics: ServiceMetrics,
    engine: engine::Engine,
    reader: LogReader,
    tick: Duration,
}

impl Application {
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let metrics = ServiceMetrics::new("automation");
        // The series the dashboards and alert rules read, at 0 from the start (kit::metrics).
        metrics.touch(
            &["trigger_run", "trigger_queued", "trigger_skipped", "trigger_conditions", "trigger_stopped", "trigger_paused", "timer_fired"],
            &["automation_effects"],
            &["kafka_produce", "automation_paused"],
            &["fact_to_decision", "decide", "append_effects", "apply_batch", "timer_lateness"],
        );
        let pool = homelink_kit::db::connect_with_retry(&cfg.database_url, 8, Duration::from_secs(30)).await?;
        migrate(&pool).await?;
        let appender = Appender::new(&ProducerConfig::new(&cfg.kafka_bootstrap))?;
        let stored: Vec<(String, i32, i64)> = sqlx::query(r#"SELECT topic, "partition", next_offset FROM engine_offsets"#)
            .fetch_all(&pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let mut engine = engine::Engine::new(pool.clone(), appender.clone(), cfg.topics.clone(), metrics.clone(), cfg.grace);
        engine.breaker = cfg.breaker;
        engine.load_waiting().await?;
        // The household stream is folded from its start at every start
        // (decisions only past the stored positions); telemetry is read from
        // the stored positions. A first start decides from the log's end.
        let topics = [cfg.topics.households(), cfg.topics.telemetry()];
        let mut start = Vec::new();
        for tp in homelink_kit::reader::partitions(&cfg.kafka_bootstrap, &topics).await? {
            let stored_at = stored.iter().find(|s| s.0 == tp.0 && s.1 == tp.1).map(|s| s.2);
            let decide_from = match stored_at {
                Some(o) => o,
                None => appender.high_watermark(&tp.0, tp.1, Duration::from_secs(10)).await?,
            };
            engine.decided.insert(tp.clone(), decide_from);
            if tp.0 == cfg.topics.households() && decide_from > 0 {
                engine.replaying.insert(tp.clone());
            }
            start.push((tp, Some(decide_from)));
        }
        let rc = ReaderConfig {
            bootstrap: cfg.kafka_bootstrap.clone(),
            group: "homelink-automation".into(),
            fetch_wait: Duration::from_millis(100),
            batch_max: 2_000,
            gather: Duration::ZERO,
        };
        // First the household stream up to where decisions start, alone:
        // every household is known before any report is looked at.
        let replay: Vec<_> = engine.replaying.iter().map(|tp| (tp.clone(), None)).collect();
        if !replay.is_empty() {
            let reader = LogReader::new(&rc, Start::Assigned(replay), metrics.clone())?;
            let never = CancellationToken::new();
            while !engine.replaying.is_empty() {
                let Some(read) = tokio::time::timeout(Duration::from_secs(60), reader.next(&never))
                    .await
                    .map_err(|_| Error::Service("replaying: the household stream did not arrive within 60 s".into()))?
                else {
                    break;
                };
                engine.handle(&read.events, &read.next_offsets).await?;
            }
        }
        let reader = LogReader::new(&rc, Start::Assigned(start), metrics.clone())?;
        let router = homelink_kit::ops::router(metrics.clone(), homelink_kit::ops::postgres_ready(pool));
        let listener = homelink_kit::ops::bind(&cfg.listen).await?;
        Ok(Self { listener, router, metrics, engine, reader, tick: cfg.tick })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn metrics(&self) -> ServiceMetrics {
        self.metrics.clone()
    }

    /// Decides until cancelled. A database error ends the engine (its state
    /// is rebuilt from the log and its tables when it starts again).
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), Error> {
        let Self { listener, router, metrics, mut engine, reader, tick } = self;
        engine.cancel = cancel.clone();
        let mut tasks = homelink_kit::service::Tasks::new(cancel.child_token());
        let (ops, served) = (tasks.token(), metrics.clone());
        tasks.spawn("ops", async move {
            if let Err(e) = homelink_kit::ops::serve(listener, router, &served, ops).await {
                tracing::error!(error = %e, "the ops listener failed");
            }
        });
        let lag = reader.report_lag(Duration::from_secs(5), tasks.token());
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                read = reader.next(&cancel) => {
                    let Some(read) = read else { break Ok(()) };
                    if read.is_empty() {
                        continue;
                    }
                    let started = std::time::Instant::now();
                    if let Err(e) = engine.handle(&read.events, &read.next_offsets).await {
                        tracing::error!(error = %e, "deciding a batch failed; stopping");
                        break Err(e.into());
                    }
                    metrics.latency.with_label_values(&["apply_batch"]).observe(started.elapsed().as_secs_f64());
                }
                _ = timer.tick() => {
                    if let Err(e) = engine.tick().await {
                        tracing::error!(error = %e, "firing timers failed; stopping");
                        break Err(e.into());
                    }
                }
            }
        };
        lag.abort();
        tasks.shutdown().await;
        result
    }
}
