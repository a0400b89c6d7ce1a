//! Command-line and environment settings shared by the services, and the
//! configuration file layer beneath them.
//!
//! Every setting of every service has a `HOMELINK_…` environment variable
//! (and a flag). A deployment may also write them into one TOML file of
//! `HOMELINK_… = value` pairs and point `HOMELINK_CONFIG` at it; a service
//! reads it at start ([`load_file`]). Precedence: flag, then environment,
//! then file, then the built-in default. Secrets belong in their own files
//! (`…_PASSWORD_FILE`), not in this one.

/// Where a service finds the read models and the log.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL URL of the read-model database.
    #[arg(long, env = "HOMELINK_DATABASE_URL")]
    pub database_url: String,
    /// Kafka bootstrap servers (Apache Kafka locally; any Kafka-API cluster in production, with its
    /// client properties as `HOMELINK_KAFKA_<PROPERTY>`, see `kafka::client_config`).
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

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("the configuration file {0} is not TOML: {1}")]
    Parse(String, toml::de::Error),
    #[error("the configuration file {0}: `{1}` is not a HOMELINK_… setting")]
    UnknownKey(String, String),
    #[error("the configuration file {0}: `{1}` must be a string, a number or a boolean")]
    BadValue(String, String),
}

/// Applies the file named by `HOMELINK_CONFIG` (if set) beneath the
/// environment: each `HOMELINK_…` key becomes the environment variable of
/// that name unless the environment already sets it. Call it first thing in
/// `main`, before any thread starts; returns the file's path when there was one.
pub fn load_file() -> Result<Option<std::path::PathBuf>, ConfigError> {
    let Some(path) = std::env::var_os("HOMELINK_CONFIG").map(std::path::PathBuf::from) else {
        return Ok(None);
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read(shown.clone(), e))?;
    for (key, value) in settings(&text).map_err(|e| match e {
        FileError::Parse(p) => ConfigError::Parse(shown.clone(), p),
        FileError::UnknownKey(k) => ConfigError::UnknownKey(shown.clone(), k),
        FileError::BadValue(k) => ConfigError::BadValue(shown.clone(), k),
    })? {
        if std::env::var_os(&key).is_none() {
            std::env::set_var(&key, value);
        }
    }
    Ok(Some(path))
}

enum FileError {
    Parse(toml::de::Error),
    UnknownKey(String),
    BadValue(String),
}

/// The `(variable, value)` pairs of a configuration file.
fn settings(text: &str) -> Result<Vec<(String, String)>, FileError> {
    let table: toml::Table = text.parse().map_err(FileError::Parse)?;
    let mut out = Vec::with_capacity(table.len());
    for (key, value) in table {
        if !key.starts_with("HOMELINK_") || key == "HOMELINK_CONFIG" || key.contains('=') {
            return Err(FileError::UnknownKey(key));
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => return Err(FileError::BadValue(key)),
        };
        out.push((key, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_holds_homelink_settings_only() {
        let ok =
            settings("HOMELINK_TOPIC_PREFIX = \"demo.\"\nHOMELINK_PROJECTOR_BATCH_MAX = 100\nHOMELINK_X = true\n").ok().unwrap_or_default();
        assert_eq!(ok.len(), 3);
        assert!(ok.contains(&("HOMELINK_PROJECTOR_BATCH_MAX".into(), "100".into())));
        assert!(matches!(settings("PATH = \"/tmp\""), Err(FileError::UnknownKey(_))));
        assert!(matches!(settings("HOMELINK_CONFIG = \"x\""), Err(FileError::UnknownKey(_))));
        assert!(matches!(settings("HOMELINK_A = [1]"), Err(FileError::BadValue(_))));
        assert!(matches!(settings("not toml"), Err(FileError::Parse(_))));
    }
}
