//! Command-line and environment settings shared by the services.

/// Where a service finds the read models and the log.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL URL of the read-model database.
    #[arg(long, env = "HOMELINK_DATABASE_URL")]
    pub database_url: String,
    /// Kafka bootstrap servers (tansu locally, any Kafka-API broker in production).
    #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,
    /// Prefix of every topic name of this deployment.
    #[arg(long, env = "HOMELINK_TOPIC_PREFIX", default_value = "homelink.")]
    pub topic_prefix: String,
}

impl CommonArgs {
    pub fn topics(&self) -> homelink_events::Topics {
        homelink_events::Topics::new(&self.topic_prefix)
    }
}

/// A secret from `file` (a trailing newline trimmed) or, without one, from
/// the environment variable `var`; empty when neither is set. Secrets never
/// come from command-line values, which every local user can read in
/// `/proc/<pid>/cmdline`.
pub fn secret(var: &str, file: Option<&std::path::Path>) -> std::io::Result<secrecy::SecretString> {
    let value = match file {
        Some(f) => std::fs::read_to_string(f)?.trim_end_matches(['\n', '\r']).to_owned(),
        None => std::env::var(var).unwrap_or_default(),
    };
    Ok(secrecy::SecretString::from(value))
}
