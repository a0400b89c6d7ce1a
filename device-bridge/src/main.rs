//! `homelink-device-bridge`: MQTT ⇄ Kafka.

use clap::Parser;
use homelink_device_bridge::{Application, Config};

#[derive(Parser)]
#[command(version, about = "HomeLink device bridge: MQTT <-> Kafka")]
struct Args {
    #[command(flatten)]
    common: homelink_kit::config::CommonArgs,
    #[arg(long, env = "HOMELINK_MQTT_HOST", default_value = "127.0.0.1")]
    mqtt_host: String,
    /// The bridge listener of each broker, comma-separated, in the
    /// deployment's broker order (the same order command-api assigns from).
    #[arg(long, env = "HOMELINK_MQTT_BRIDGE_PORT", value_delimiter = ',', default_value = "1884")]
    mqtt_port: Vec<u16>,
    #[arg(long, env = "HOMELINK_MQTT_BRIDGE_USERNAME", default_value = "homelink-bridge")]
    mqtt_username: String,
    /// A file holding the bridge's MQTT password. Without it, the password
    /// comes from `HOMELINK_MQTT_BRIDGE_PASSWORD`. Never a command-line value:
    /// every local user can read a process's arguments.
    #[arg(long, env = "HOMELINK_MQTT_BRIDGE_PASSWORD_FILE")]
    mqtt_password_file: Option<std::path::PathBuf>,
    #[arg(long, env = "HOMELINK_BRIDGE_CLIENT_ID", default_value = "homelink-bridge-0")]
    client_id: String,
    /// The shared-subscription and consumer group of the deployment's bridges.
    #[arg(long, env = "HOMELINK_BRIDGE_SHARE_GROUP", default_value = "homelink-bridge")]
    share_group: String,
    #[arg(long, env = "HOMELINK_BRIDGE_LISTEN", default_value = "127.0.0.1:8082")]
    listen: String,
    /// How long reports wait to be appended together (librdkafka `linger.ms`):
    /// the broker pays per produce request, so a few milliseconds buy large batches.
    #[arg(long, env = "HOMELINK_BRIDGE_PRODUCE_LINGER_MS", default_value_t = 5)]
    produce_linger_ms: u64,
    /// Longest an empty fetch of the commands topic waits at the broker; a
    /// command ends the wait at once, so this only sets how often an idle
    /// bridge asks (Apache Kafka answers a fetch as soon as a record arrives).
    #[arg(long, env = "HOMELINK_BRIDGE_COMMAND_FETCH_WAIT_MS", default_value_t = 500)]
    command_fetch_wait_ms: u64,
    /// Messages one device may send a second; beyond it (and its burst) they
    /// are acknowledged and dropped, counted as `device_rate_limited`.
    #[arg(long, env = "HOMELINK_BRIDGE_DEVICE_RATE", default_value_t = 50)]
    device_rate: u32,
    #[arg(long, env = "HOMELINK_BRIDGE_DEVICE_BURST", default_value_t = 500)]
    device_burst: u32,
    /// Requests each MQTT client queues while its broker is away.
    #[arg(long, env = "HOMELINK_BRIDGE_MQTT_QUEUE", default_value_t = 8192)]
    mqtt_queue: usize,
}

fn main() -> anyhow::Result<()> {
    homelink_kit::service::main(run)
}

async fn run(cancel: homelink_kit::shutdown::CancellationToken) -> anyhow::Result<()> {
    let a = Args::parse();
    let mut cfg = Config::new(&a.common.database_url, &a.common.kafka_bootstrap, a.common.topics(), a.mqtt_host, 0);
    cfg.mqtt_ports = a.mqtt_port;
    cfg.mqtt_username = a.mqtt_username;
    cfg.mqtt_password = homelink_kit::config::secret("HOMELINK_MQTT_BRIDGE_PASSWORD", a.mqtt_password_file.as_deref())?;
    cfg.client_id = a.client_id;
    cfg.share_group = a.share_group;
    cfg.listen = a.listen;
    cfg.produce_linger = std::time::Duration::from_millis(a.produce_linger_ms);
    cfg.command_fetch_wait = std::time::Duration::from_millis(a.command_fetch_wait_ms.max(1));
    cfg.device_rate = (a.device_rate, a.device_burst);
    cfg.mqtt_queue = a.mqtt_queue;
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "device bridge listening");
    Ok(app.run_until_stopped(cancel).await?)
}
