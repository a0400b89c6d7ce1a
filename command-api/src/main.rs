//! `homelink-command-api`: the HTTP API for every write.

use clap::Parser;
use homelink_command_api::{Application, Config};

#[derive(Parser)]
#[command(version, about = "HomeLink command API")]
struct Args {
    #[command(flatten)]
    common: homelink_kit::config::CommonArgs,
    #[arg(long, env = "HOMELINK_COMMAND_API_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, env = "HOMELINK_BRIDGE_PUSH_URL")]
    bridge_push_url: Option<String>,
    #[arg(long, env = "HOMELINK_PROJECTOR_PUSH_URL")]
    projector_push_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    homelink_kit::telemetry::init("info");
    let a = Args::parse();
    let mut cfg = Config::new(&a.common.database_url, &a.common.kafka_bootstrap, a.common.topics());
    cfg.listen = a.listen;
    cfg.bridge_push_url = a.bridge_push_url;
    cfg.projector_push_url = a.projector_push_url;
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "command API listening");
    app.run_until_stopped(homelink_kit::shutdown::on_signal()).await
}
