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
}

fn main() -> anyhow::Result<()> {
    homelink_kit::config::load_file()?;
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    homelink_kit::telemetry::init("info");
    let a = Args::parse();
    let mut cfg = Config::new(&a.common.database_url, &a.common.kafka_bootstrap, a.common.topics());
    cfg.listen = a.listen;
    cfg.grace = Duration::from_secs(a.grace_secs);
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "automation engine listening");
    Ok(app.run_until_stopped(homelink_kit::shutdown::on_signal()).await?)
}
