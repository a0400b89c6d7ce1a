//! `endpoints.json`: where a running stack's services are (product.md,
//! "Where clients find things").

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    pub command_api: String,
    pub graphql: String,
    pub graphql_ws: String,
    pub metrics: Vec<String>,
    pub prometheus: Option<String>,
    pub mqtt_device: MqttListener,
    pub kafka_bootstrap: String,
    pub topic_prefix: String,
    /// Development only: where the device CA (and its key) live.
    pub pki_dir: String,
    pub demo: Demo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MqttListener {
    pub host: String,
    pub port: u16,
    pub ca_cert: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Demo {
    pub household_id: Uuid,
    /// Device ids, kinds and the paths of their certificates.
    pub devices_file: String,
    /// The demo household's owner, adult and child (development only:
    /// passwords included; the run command generates them).
    pub accounts: Vec<crate::api::Account>,
}

impl Endpoints {
    pub fn load(path: &std::path::Path) -> crate::Result<Self> {
        Ok(serde_json::from_slice(&std::fs::read(path)?)?)
    }
}
