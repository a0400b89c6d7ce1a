//! `homelink-automation`: the automation engine.

use clap::Parser;
use homelink_automation::{Application, Config};
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "HomeLink automation engine: triggers, conditions and runs, on the log")]
struct Args {
    #[command(flatten)]
    common: homelink_kit::config::CommonArgs,
    #[arg(long, env = "HOMELINK_AUTOMATION_LISTEN", default_value = "127.0.0.1:8085")]
    listen: String,
    /// A wait due longer ago than this when the engine gets to it is recorded as missed, in seconds.
    #[arg(long, env = "HOMELINK_AUTOMATION_GRACE_SECS", default_value_t = 600)]
    grace_secs: u64,
    /// The breaker: an automation that starts more runs than this within
    /// `--breaker-window-secs` is paused until it is saved again.
    #[arg(long, env = "HOMELINK_AUTOMATION_BREAKER_RUNS", default_value_t = homelink_automation::engine::BREAKER_RUNS as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    breaker_runs: u64,
    #[arg(long, env = "HOMELINK_AUTOMATION_BREAKER_WINDOW_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    breaker_window_secs: u64,
}

fn main() -> anyhow::Result<()> {
    homelink_kit::service::main(run)
}

async fn run(cancel: homelink_kit::shutdown::CancellationToken) -> Result<(), homelink_automation::Error> {
    let a = Args::parse();
    let mut cfg = Config::new(&a.common.database_url, &a.common.kafka_bootstrap, a.common.topics());
    cfg.listen = a.listen;
    cfg.grace = Duration::from_secs(a.grace_secs);
    cfg.breaker = (usize::try_from(a.breaker_runs).unwrap_or(usize::MAX), Duration::from_secs(a.breaker_window_secs));
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "automation engine listening");
    app.run_until_stopped(cancel).await
}
