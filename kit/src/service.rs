//! The skeleton every HomeLink service shares, so a service's `main.rs` and
//! `lib.rs` hold only what is theirs:
//!
//! - [`main`]: the process's start — the configuration file layered beneath
//!   the environment before any thread starts ([`crate::config`]), the
//!   runtime, logging, and the service run until SIGINT / SIGTERM;
//! - [`ServiceError`]: why a service could not start, or stopped;
//! - [`Tasks`]: background tasks supervised together — shutdown cancels
//!   them and waits for each (bounded), and one that ends by itself is
//!   logged, not lost.

use crate::shutdown::CancellationToken;
use std::future::Future;
use std::time::Duration;

/// Why a service could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Kit(#[from] crate::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("device CA: {0}")]
    Pki(#[from] crate::pki::PkiError),
    /// A service's own reason (a read model, a replay, a broker).
    #[error("{0}")]
    Service(String),
}

/// A service's `main`: loads the configuration file beneath the
/// environment (before any thread starts, as `kit::config` requires),
/// starts the runtime and logging (`RUST_LOG`, default `info`), and runs
/// `run` with a token cancelled on SIGINT / SIGTERM.
pub fn main<Fut, E>(run: impl FnOnce(CancellationToken) -> Fut) -> anyhow::Result<()>
where
    Fut: Future<Output = Result<(), E>>,
    E: Into<anyhow::Error>,
{
    crate::config::load_file()?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        crate::telemetry::init("info");
        run(crate::shutdown::on_signal()).await.map_err(Into::into)
    })
}

/// How long shutdown waits for one background task.
pub const TASK_SHUTDOWN: Duration = Duration::from_secs(10);

/// Background tasks supervised together.
pub struct Tasks {
    cancel: CancellationToken,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Tasks {
    /// Tasks stopped by `cancel` (each task watches the token it is given).
    pub fn new(cancel: CancellationToken) -> Self {
        Self { cancel, tasks: Vec::new() }
    }

    /// The token the tasks stop on.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Starts `task`; one that ends before shutdown is logged with `name`.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        let handle = tokio::spawn(async move {
            task.await;
            if !cancel.is_cancelled() {
                tracing::warn!(task = name, "a background task ended before shutdown");
            }
        });
        self.tasks.push((name, handle));
    }

    /// Cancels every task and waits for each, at most [`TASK_SHUTDOWN`]
    /// (one that does not stop by then is aborted and named).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for (name, mut handle) in self.tasks {
            if tokio::time::timeout(TASK_SHUTDOWN, &mut handle).await.is_err() {
                tracing::warn!(task = name, "a background task did not stop in time; aborted");
                handle.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn shutdown_waits_for_every_task_to_finish_its_work() {
        let mut tasks = Tasks::new(CancellationToken::new());
        let finished = Arc::new(AtomicBool::new(false));
        let (f, token) = (finished.clone(), tasks.token());
        tasks.spawn("worker", async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            f.store(true, Ordering::SeqCst);
        });
        tasks.shutdown().await;
        assert!(finished.load(Ordering::SeqCst), "shutdown returned before the task finished");
    }
}
