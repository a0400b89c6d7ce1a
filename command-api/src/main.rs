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
    /// Access-token lifetime in seconds.
    #[arg(long, env = "HOMELINK_ACCESS_TOKEN_TTL", default_value_t = 300)]
    access_token_ttl: u64,
    /// Seconds a new signing key is published before it signs (longer than
    /// every verifier's JWKS refresh interval).
    #[arg(long, env = "HOMELINK_KEY_PUBLISH_DELAY", default_value_t = 30)]
    key_publish_delay: u64,
    /// The device CA certificate and key (registration issues device certificates with them).
    #[arg(long, env = "HOMELINK_DEVICE_CA_CERT")]
    device_ca_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "HOMELINK_DEVICE_CA_KEY")]
    device_ca_key: Option<std::path::PathBuf>,
    /// The MQTT device listener told to registered devices.
    #[arg(long, env = "HOMELINK_MQTT_DEVICE_HOST", default_value = "127.0.0.1")]
    mqtt_device_host: String,
    /// The device (mTLS) port of each broker, comma-separated, in the
    /// deployment's broker order; a new device is assigned one of them.
    #[arg(long, env = "HOMELINK_MQTT_DEVICE_PORT", value_delimiter = ',', default_value = "8883")]
    mqtt_device_port: Vec<u16>,
    /// Where the brokers read the certificate revocation list (one file for all).
    #[arg(long, env = "HOMELINK_CRL_FILE")]
    crl_file: Option<std::path::PathBuf>,
    /// Each broker's pid file, comma-separated (SIGHUP after the CRL changed).
    #[arg(long, env = "HOMELINK_BROKER_PID_FILE", value_delimiter = ',')]
    broker_pid_file: Vec<std::path::PathBuf>,
    /// Each broker's port for an account with dynamic-security rights,
    /// comma-separated, to close revoked devices' connections.
    #[arg(long, env = "HOMELINK_BROKER_ADMIN_PORT", value_delimiter = ',')]
    broker_admin_port: Vec<u16>,
    #[arg(long, env = "HOMELINK_BROKER_ADMIN_USER", default_value = "homelink-admin")]
    broker_admin_user: String,
    /// A file holding the broker admin password; without it, the password
    /// comes from `HOMELINK_BROKER_ADMIN_PASSWORD`. Never a command-line value.
    #[arg(long, env = "HOMELINK_BROKER_ADMIN_PASSWORD_FILE")]
    broker_admin_password_file: Option<std::path::PathBuf>,
    /// Sign-ups allowed per client address per hour (then 429). Raise it
    /// only on an operator's own test stack (a load generator signing up
    /// installers from one address).
    #[arg(long, env = "HOMELINK_SIGN_UPS_PER_ADDRESS_PER_HOUR", default_value_t = homelink_command_api::auth::IdentityLimits::default().sign_ups_per_address_per_hour, value_parser = clap::value_parser!(i32).range(1..))]
    sign_ups_per_address_per_hour: i32,
    /// Rotate the token signing key and exit.
    #[arg(long)]
    rotate_signing_key: bool,
}

fn main() -> anyhow::Result<()> {
    homelink_kit::service::main(run)
}

async fn run(cancel: homelink_kit::shutdown::CancellationToken) -> anyhow::Result<()> {
    let a = Args::parse();
    if a.rotate_signing_key {
        let pool = homelink_kit::db::connect(&a.common.database_url, 2).await?;
        homelink_command_api::migrate(&pool).await?;
        let kid = homelink_command_api::auth::rotate(&pool, std::time::Duration::from_secs(a.key_publish_delay)).await?;
        println!("new signing key {kid}: published now, signs in {} s", a.key_publish_delay);
        return Ok(());
    }
    let mut cfg = Config::new(&a.common.database_url, &a.common.kafka_bootstrap, a.common.topics());
    cfg.tokens.access_ttl = std::time::Duration::from_secs(a.access_token_ttl.clamp(30, 3600));
    cfg.tokens.publish_delay = std::time::Duration::from_secs(a.key_publish_delay);
    cfg.identity.sign_ups_per_address_per_hour = a.sign_ups_per_address_per_hour;
    if let (Some(ca_cert), Some(ca_key)) = (a.device_ca_cert, a.device_ca_key) {
        cfg.devices = Some(homelink_command_api::devices::DeviceConfig {
            ca_cert,
            ca_key,
            mqtt_host: a.mqtt_device_host.clone(),
            mqtt_ports: a.mqtt_device_port,
        });
    }
    if let Some(crl_file) = a.crl_file {
        let password = homelink_kit::config::secret("HOMELINK_BROKER_ADMIN_PASSWORD", a.broker_admin_password_file.as_deref())?;
        let admins = a
            .broker_admin_port
            .into_iter()
            .map(|port| homelink_command_api::revocation::BrokerAdmin {
                host: a.mqtt_device_host.clone(),
                port,
                username: a.broker_admin_user.clone(),
                password: password.clone(),
            })
            .collect();
        cfg.revocation = Some(homelink_command_api::revocation::RevocationConfig::new(crl_file, a.broker_pid_file, admins));
    }
    cfg.listen = a.listen;
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "command API listening");
    Ok(app.run_until_stopped(cancel).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_up_limit_is_a_setting() {
        let base = ["homelink-command-api", "--database-url", "postgres://x"];
        if std::env::var_os("HOMELINK_SIGN_UPS_PER_ADDRESS_PER_HOUR").is_none() {
            assert_eq!(Args::try_parse_from(base).expect("defaults").sign_ups_per_address_per_hour, 20);
        }
        let a = Args::try_parse_from(base.iter().copied().chain(["--sign-ups-per-address-per-hour", "5000"])).expect("set");
        assert_eq!(a.sign_ups_per_address_per_hour, 5000);
        assert!(Args::try_parse_from(base.iter().copied().chain(["--sign-ups-per-address-per-hour", "0"])).is_err());
    }
}
