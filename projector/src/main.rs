//! `homelink-projector`: builds the read models from the log.

use clap::Parser;
use homelink_projector::{Application, Config};
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "HomeLink projector: Kafka log -> Postgres read models")]
struct Args {
    #[command(flatten)]
    common: homelink_kit::config::CommonArgs,
    #[arg(long, env = "HOMELINK_PROJECTOR_LISTEN", default_value = "127.0.0.1:8083")]
    listen: String,
    /// Longest an empty fetch waits at the broker, in milliseconds (a record ends the wait at once).
    #[arg(long, env = "HOMELINK_PROJECTOR_FETCH_WAIT_MS", default_value_t = 500)]
    fetch_wait_ms: u64,
    /// Most records per transaction.
    #[arg(long, env = "HOMELINK_PROJECTOR_BATCH_MAX", default_value_t = 5000)]
    batch_max: usize,
    /// How long a batch keeps taking records after its first one, in
    /// milliseconds: fewer, larger transactions for that much latency.
    #[arg(long, env = "HOMELINK_PROJECTOR_GATHER_MS", default_value_t = 0)]
    gather_ms: u64,
    #[command(flatten)]
    retention: homelink_projector::RetentionArgs,
}

fn main() -> anyhow::Result<()> {
    homelink_kit::service::main(run)
}

async fn run(cancel: homelink_kit::shutdown::CancellationToken) -> Result<(), homelink_projector::Error> {
    let a = Args::parse();
    let mut cfg = Config::new(&a.common.database_url, &a.common.kafka_bootstrap, a.common.topics());
    cfg.listen = a.listen;
    cfg.fetch_wait = Duration::from_millis(a.fetch_wait_ms);
    cfg.batch_max = a.batch_max.max(1);
    cfg.gather = Duration::from_millis(a.gather_ms.min(1_000));
    cfg.retention = (&a.retention).into();
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "projector listening");
    app.run_until_stopped(cancel).await
}
