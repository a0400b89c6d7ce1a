//! Shared plumbing of the HomeLink services: Kafka clients configured for the
//! delivery guarantees in quality.md, Prometheus metrics, the operational HTTP
//! routes (`/healthz`, `/readyz`, `/metrics`), Postgres pools, tracing set-up
//! and shutdown.
//!
//! Start at [`kafka`] (how events are appended) and [`ops`] (what every service
//! serves besides its own API).
//!
//! **Boundary**: nothing here knows a service's domain; domain types come from
//! `homelink-events`.

pub mod auth;
pub mod config;
pub mod consistency;
pub mod db;
pub mod history;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod pki;
pub mod reader;
pub mod service;
pub mod shutdown;
pub mod telemetry;

/// Errors of the shared plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Other(String),
}
