//! command-api: the HTTP JSON API for every write. It validates, appends
//! events to Kafka (keyed by household) and answers once the append is
//! acknowledged; the device bridge and the projector read it from the log
//! (Apache Kafka answers their fetches as soon as it is appended).
//!
//! Layout:
//! - [`auth`]: sign-up, sign-in, refresh, sign-out, signing keys and JWKS, the
//!   `Authenticated` extractor;
//! - [`caller`]: the authenticated caller extractor and path ids;
//! - [`write_path`]: the serialized write path every household command takes
//!   (the consistency decision lives there); [`audit`]: refused commands;
//! - [`households`]: households and members (routes);
//! - [`devices`]: the registry (routes); [`revocation`]: shutting removed
//!   devices out at the broker; [`validate`]: the text rules;
//! - [`automations`]: automations and the household's time zone (routes);
//! - [`scenes`]: scenes (routes) and their activation;
//! - [`commands`]: device commands (authorization by role, then validation);
//! - [`idempotency`]: the `Idempotency-Key` middleware;
//! - [`problem`]: the error type and its problem+json form, the body extractor;
//! - [`openapi`]: the OpenAPI 3.1 document, built from the same route table;
//! - this file: configuration and the router.

pub mod audit;
pub mod auth;
pub mod automations;
pub mod caller;
pub mod commands;
pub mod devices;
pub mod history;
pub mod households;
pub mod idempotency;
pub mod limits;
pub mod openapi;
pub mod problem;
pub mod revocation;
pub mod scenes;
pub mod schemas;
pub mod validate;
pub mod write_path;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{Json, Router};
use homelink_events::Topics;
use homelink_kit::kafka::{Appender, ProducerConfig};
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::shutdown::CancellationToken;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

/// Why the command API could not start, or stopped.
pub use homelink_kit::service::ServiceError as Error;

/// Largest request body accepted; larger ones get 413 before any parsing.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub kafka_bootstrap: String,
    pub topics: Topics,
    pub listen: String,
    /// Longest wait for the read model and Kafka's watermark on the household
    /// write path.
    pub append_timeout: Duration,
    /// Longest a write keeps its client waiting: then 503 ("outcome not
    /// known yet") while the handler runs on to a known outcome, which an
    /// `Idempotency-Key` retry then gets.
    pub answer_within: Duration,
    /// Longest a household write waits for the read model to apply its
    /// event once Kafka acknowledged it; then it answers its result anyway
    /// (the event is in the log and applies when the projector catches up).
    pub apply_wait: Duration,
    /// Command rates per member and per device (429 over them).
    pub command_limits: limits::CommandLimits,
    pub tokens: auth::TokenConfig,
    pub identity: auth::IdentityLimits,
    /// The device CA and the broker address given to registered devices;
    /// without it, registration answers 503.
    pub devices: Option<devices::DeviceConfig>,
    /// How removed devices are shut out at the broker; without it, removal
    /// only records the event.
    pub revocation: Option<revocation::RevocationConfig>,
}

impl Config {
    pub fn new(database_url: impl Into<String>, kafka_bootstrap: impl Into<String>, topics: Topics) -> Self {
        Self {
            database_url: database_url.into(),
            kafka_bootstrap: kafka_bootstrap.into(),
            topics,
            listen: "127.0.0.1:0".into(),
            append_timeout: Duration::from_secs(2),
            answer_within: Duration::from_secs(2),
            apply_wait: Duration::from_secs(30),
            command_limits: limits::CommandLimits::default(),
            tokens: auth::TokenConfig::default(),
            identity: auth::IdentityLimits::default(),
            devices: None,
            revocation: None,
        }
    }
}

/// What handlers share.
pub struct AppState {
    pub pool: PgPool,
    pub appender: Appender,
    pub topics: Topics,
    /// Where the log is: the history endpoint reads it.
    pub kafka_bootstrap: String,
    pub metrics: ServiceMetrics,
    pub append_timeout: Duration,
    pub answer_within: Duration,
    pub apply_wait: Duration,
    pub limiters: limits::Limiters,
    /// A small pool of its own for the device locks of versioned `PUT
    /// …/desired`: writers waiting for a device's lock never take the
    /// connections sign-in and every other write need.
    pub version_pool: PgPool,
    /// In-process lock stripes of versioned `PUT …/desired` (commands.rs).
    pub device_stripes: Vec<Arc<tokio::sync::Mutex<()>>>,
    pub keys: auth::Keys,
    pub tokens: auth::TokenConfig,
    pub identity: auth::IdentityLimits,
    /// Permits for password hashing (`identity.hashing_permits`), held by
    /// the hashing itself, and its gauges.
    pub hashing: auth::Hashing,
    /// In-process lock stripes that queue household writes (see [`write_path`]).
    pub household_stripes: Vec<tokio::sync::Mutex<()>>,
    pub device_ca: Option<Arc<homelink_kit::pki::DeviceCa>>,
    pub devices: Option<devices::DeviceConfig>,
    pub revoker: Option<Arc<revocation::Revoker>>,
    /// Every routed `(method, path template)`, from the OpenAPI document.
    pub operations: std::collections::HashSet<(String, String)>,
}

impl AppState {
    /// Whether the request's method is routed on its (matched) path.
    pub fn routed(&self, req: &axum::extract::Request) -> bool {
        let Some(path) = req.extensions().get::<axum::extract::MatchedPath>() else {
            return false;
        };
        self.operations.contains(&(req.method().as_str().to_ascii_lowercase(), path.as_str().to_owned()))
    }
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    metrics: ServiceMetrics,
    state: Arc<AppState>,
}

/// Applies command-api's own migrations (identity, idempotency) and the
/// read-model schema it reads from (`homelink-read-model`). Versions of the other set are
/// not an error.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    homelink_read_model::migrate(pool).await?;
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m.run(pool).await?;
    Ok(())
}

impl Application {
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let metrics = ServiceMetrics::new("command_api");
        // The series the dashboards and alert rules read, at 0 from the start (kit::metrics).
        metrics.touch(
            &["command"],
            &["command", "scene_activated"],
            &["kafka_produce", "rate_limited", "sign_in_throttled", "command_denied", "read_model_behind"],
            &["command_accepted"],
        );
        let pool = homelink_kit::db::connect_with_retry(&cfg.database_url, 16, Duration::from_secs(30)).await?;
        // The HTTP answer is bounded by `answer_within`: then 503, whose body
        // says the outcome is unknown and to retry with the same
        // Idempotency-Key, while the handler runs on until Kafka's delivery
        // report (idempotency.rs). The record keeps librdkafka's longer
        // delivery timeout: expiring records after 2 s left tansu 0.6 refusing
        // the producer after a broker restart ("Unknown broker error"), and
        // even a replacement producer's appends never completed
        // (tests/faults.rs).
        migrate(&pool).await?;
        auth::ensure_key(&pool).await.map_err(|e| Error::Service(format!("signing keys: {e}")))?;
        let keys = auth::Keys::new();
        keys.reload(&pool, cfg.tokens.access_ttl).await?;
        let device_ca = match &cfg.devices {
            Some(d) => Some(Arc::new(homelink_kit::pki::DeviceCa::load(&d.ca_cert, &d.ca_key)?)),
            None => None,
        };
        let revoker = match (&device_ca, &cfg.revocation) {
            (Some(ca), Some(r)) => Some(Arc::new(revocation::Revoker::new(ca.clone(), r.clone(), pool.clone()))),
            _ => None,
        };
        let version_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(&cfg.database_url)?;
        let pc = ProducerConfig::new(&cfg.kafka_bootstrap);
        let state = Arc::new(AppState {
            device_ca,
            devices: cfg.devices.clone(),
            revoker,
            keys,
            tokens: cfg.tokens.clone(),
            identity: cfg.identity.clone(),
            hashing: auth::Hashing::new(cfg.identity.hashing_permits, &metrics),
            household_stripes: (0..write_path::HOUSEHOLD_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            appender: Appender::new(&pc)?,
            topics: cfg.topics.clone(),
            kafka_bootstrap: cfg.kafka_bootstrap.clone(),
            metrics: metrics.clone(),
            operations: openapi::operations(),
            append_timeout: cfg.append_timeout,
            answer_within: cfg.answer_within,
            apply_wait: cfg.apply_wait,
            limiters: limits::Limiters::new(&cfg.command_limits),
            version_pool,
            device_stripes: (0..commands::DEVICE_STRIPES).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
            pool: pool.clone(),
        });
        let (api, doc) = openapi::routes().split_for_parts();
        let doc = Arc::new(openapi::finish(doc));
        // `route_layer`: a method a path does not have answers 405 (with
        // `Allow`) before the write layer looks at the request.
        let router = api
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::layer))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .route("/openapi.json", get(move || async move { Json(doc.as_ref().clone()) }))
            .with_state(state.clone())
            .merge(homelink_kit::ops::router(metrics.clone(), homelink_kit::ops::postgres_ready(pool)));
        let listener = homelink_kit::ops::bind(&cfg.listen).await?;
        Ok(Self { listener, router, metrics, state })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn metrics(&self) -> ServiceMetrics {
        self.metrics.clone()
    }

    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), Error> {
        let s = &self.state;
        tokio::spawn(s.keys.clone().keep_fresh(s.pool.clone(), s.tokens.clone(), cancel.clone()));
        tokio::spawn(idempotency::expire(s.pool.clone(), cancel.clone()));
        let (st, c) = (s.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = c.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(60)) => st.limiters.prune() }
            }
        });
        if let Some(r) = &s.revoker {
            tokio::spawn(r.clone().run(cancel.clone()));
        }
        homelink_kit::ops::serve(self.listener, self.router, &self.metrics, cancel).await?;
        Ok(())
    }
}
