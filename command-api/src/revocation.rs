//! Shutting removed devices out at the MQTT broker.
//!
//! Two steps, both derived from the registry read model — the log's truth
//! once projected; a removal request answers only after its event is applied
//! — so they can be redone at any time and are redone by a loop every few
//! seconds:
//! 1. the certificate revocation list — every removed device's certificate
//!    serial, signed by the device CA — is written where the broker reads it
//!    and the broker is told to reload (SIGHUP for Mosquitto): new connections
//!    with a revoked certificate fail the TLS handshake;
//! 2. open connections are closed: Mosquitto has no kick command, but its
//!    dynamic-security plugin disconnects a client when a dynsec client of the
//!    same name is deleted, so the revoker creates and deletes one
//!    (components.md). Every removed device is kicked until the broker
//!    confirms it (`device_kicks_confirmed`), by the request and else by the
//!    loop — also a removal whose request died after the append.
//!
//! A clustered production broker has a REST call for both.

use homelink_kit::pki::DeviceCa;
use homelink_kit::shutdown::CancellationToken;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sqlx::PgPool;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A broker account allowed to use `$CONTROL/dynamic-security/v1`.
#[derive(Debug, Clone)]
pub struct BrokerAdmin {
    pub host: String,
    pub port: u16,
    pub username: String,
    /// Never logged or printed (`Debug` redacts it).
    pub password: secrecy::SecretString,
}

#[derive(Debug, Clone)]
pub struct RevocationConfig {
    /// Where the broker reads the CRL (`crlfile` of its device listener).
    pub crl_file: PathBuf,
    /// Every broker's pid file: each is sent SIGHUP to re-read the CRL.
    pub broker_pid_files: Vec<PathBuf>,
    /// Every broker, for closing open connections (a removed device is
    /// closed on each: it may have connected anywhere with its certificate).
    pub admins: Vec<BrokerAdmin>,
    /// How often the loop reconciles the broker with the registry.
    pub every: Duration,
}

impl RevocationConfig {
    pub fn new(crl_file: PathBuf, broker_pid_files: Vec<PathBuf>, admins: Vec<BrokerAdmin>) -> Self {
        Self { crl_file, broker_pid_files, admins, every: Duration::from_secs(5) }
    }
}

/// A CRL is rewritten at least this often (its `nextUpdate` is days ahead).
const CRL_REFRESH: Duration = Duration::from_secs(24 * 3600);

pub struct Revoker {
    ca: Arc<DeviceCa>,
    cfg: RevocationConfig,
    pool: PgPool,
    written: tokio::sync::Mutex<Option<(Vec<String>, Instant)>>,
}

impl Revoker {
    pub fn new(ca: Arc<DeviceCa>, cfg: RevocationConfig, pool: PgPool) -> Self {
        Self { ca, cfg, pool, written: tokio::sync::Mutex::new(None) }
    }

    /// Brings the CRL up to date with the registry (rewriting and reloading
    /// only when the revoked set changed), then closes the connections of
    /// `kick` and of every removed device the broker has not confirmed
    /// closed yet. The CRL comes first, so a kicked device cannot come back.
    pub async fn sync(&self, kick: &[Uuid]) -> Result<(), String> {
        let mut written = self.written.lock().await;
        // One snapshot decides both the list and the kicks: a device is
        // kicked only once the list that refuses its certificate is in force
        // (reading the kicks later could find a removal the list lacks, and
        // the kicked device would reconnect).
        let removed: Vec<(Uuid, Option<String>, bool)> = sqlx::query_as(
            "SELECT d.device_id, d.cert_serial, EXISTS (SELECT 1 FROM device_kicks_confirmed k WHERE k.device_id = d.device_id)
             FROM devices d WHERE d.removed_at IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| format!("registry: {e}"))?;
        let mut revoked: Vec<String> = removed.iter().filter_map(|(_, serial, _)| serial.clone()).collect();
        revoked.sort();
        let current = written.as_ref().is_some_and(|(set, at)| *set == revoked && at.elapsed() < CRL_REFRESH);
        if !current {
            let number = chrono::Utc::now().timestamp_millis().max(1) as u64;
            let pem = self.ca.crl(&revoked, number).map_err(|e| e.to_string())?;
            write_atomically(&self.cfg.crl_file, pem.as_bytes()).map_err(|e| format!("writing {}: {e}", self.cfg.crl_file.display()))?;
            for pid_file in &self.cfg.broker_pid_files {
                reload_broker(pid_file).await?;
            }
            tracing::info!(revoked = revoked.len(), file = %self.cfg.crl_file.display(), "certificate revocation list written");
            *written = Some((revoked, Instant::now()));
        }
        drop(written);
        if self.cfg.admins.is_empty() {
            return Ok(());
        }
        // Removed devices not confirmed closed, and those the caller names (if the snapshot has them).
        let pending: Vec<Uuid> = removed.iter().filter(|(d, _, confirmed)| !confirmed || kick.contains(d)).map(|(d, _, _)| *d).collect();
        for d in pending {
            for admin in &self.cfg.admins {
                kick_client(admin, &d.to_string()).await?;
            }
            sqlx::query("INSERT INTO device_kicks_confirmed (device_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(d)
                .execute(&self.pool)
                .await
                .map_err(|e| format!("recording the kick: {e}"))?;
            tracing::info!(device = %d, "removed device disconnected at the broker");
        }
        Ok(())
    }

    /// Reconciles until cancelled.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.sync(&[]).await {
                tracing::warn!(error = %e, "revocation sync failed");
            }
            tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(self.cfg.every) => {} }
        }
    }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(&tmp, path)
}

/// SIGHUP to the broker, then a moment for it to re-read its files.
async fn reload_broker(pid_file: &std::path::Path) -> Result<(), String> {
    let pid = std::fs::read_to_string(pid_file).map_err(|e| format!("{}: {e}", pid_file.display()))?;
    let pid = pid.trim();
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{}: not a pid", pid_file.display()));
    }
    let status = tokio::process::Command::new("kill").args(["-HUP", pid]).status().await.map_err(|e| format!("kill: {e}"))?;
    if !status.success() {
        return Err(format!("kill -HUP {pid}: {status}"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Closes the connection of the client named `username` through the
/// dynamic-security plugin: create a dynsec client of that name, delete it.
async fn kick_client(admin: &BrokerAdmin, username: &str) -> Result<(), String> {
    let mut o = MqttOptions::new(format!("homelink-revoker-{}", Uuid::new_v4().simple()), &admin.host, admin.port);
    o.set_credentials(&admin.username, secrecy::ExposeSecret::expose_secret(&admin.password));
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(o, 10);
    let commands = serde_json::json!({"commands": [
        {"command": "createClient", "username": username, "password": crate::auth::secret()},
        {"command": "deleteClient", "username": username},
    ]});
    let run = async {
        let mut subscribed = false;
        loop {
            match events.poll().await.map_err(|e| format!("broker admin connection: {e}"))? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .subscribe("$CONTROL/dynamic-security/v1/response", QoS::AtLeastOnce)
                        .await
                        .map_err(|e| format!("subscribe: {e}"))?;
                }
                Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                    subscribed = true;
                    client
                        .publish("$CONTROL/dynamic-security/v1", QoS::AtLeastOnce, false, commands.to_string())
                        .await
                        .map_err(|e| format!("publish: {e}"))?;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    let failed: Vec<&serde_json::Value> =
                        v["responses"].as_array().map(|r| r.iter().filter(|x| x.get("error").is_some()).collect()).unwrap_or_default();
                    return if failed.is_empty() { Ok(()) } else { Err(format!("dynamic security refused: {failed:?}")) };
                }
                _ => {}
            }
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(5), run).await.unwrap_or_else(|_| Err("broker admin: no answer within 5 s".into()));
    let _ = client.disconnect().await;
    r
}
