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
