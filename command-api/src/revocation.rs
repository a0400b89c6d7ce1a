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
//!    loop — also a removal whose request died after the append. Each
//!    broker is kicked independently: one that is down or refuses delays
//!    no kick on the others (its devices stay unconfirmed and are retried).
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
        let removed = homelink_read_model::registry::removed_devices(&self.pool).await.map_err(|e| format!("registry: {e}"))?;
        let mut revoked: Vec<String> = removed.iter().filter_map(|r| r.cert_serial.clone()).collect();
        revoked.sort();
        // Brokers not to kick on this round (their list is not in force), with why.
        let mut unavailable: Vec<Option<String>> = vec![None; self.cfg.admins.len()];
        let mut errors = Vec::new();
        let current = written.as_ref().is_some_and(|(set, at)| *set == revoked && at.elapsed() < CRL_REFRESH);
        if !current {
            let number = chrono::Utc::now().timestamp_millis().max(1) as u64;
            let pem = self.ca.crl(&revoked, number).map_err(|e| e.to_string())?;
            write_atomically(&self.cfg.crl_file, pem.as_bytes()).map_err(|e| format!("writing {}: {e}", self.cfg.crl_file.display()))?;
            // Every broker is reloaded, whichever fails.
            let mut failed = Vec::new();
            for (i, pid_file) in self.cfg.broker_pid_files.iter().enumerate() {
                if let Err(e) = reload_broker(pid_file).await {
                    tracing::warn!(broker = i, error = %e, "reloading the revocation list failed");
                    failed.push((i, e));
                }
            }
            if failed.is_empty() {
                tracing::info!(revoked = revoked.len(), file = %self.cfg.crl_file.display(), "certificate revocation list written");
                *written = Some((revoked, Instant::now()));
            } else if self.cfg.broker_pid_files.len() == self.cfg.admins.len() {
                // One pid file per broker, in the same order: kick on the others.
                for (i, e) in failed {
                    errors.push(format!("broker {i}: reloading the revocation list: {e}"));
                    unavailable[i] = Some(format!("its revocation list is not reloaded: {e}"));
                }
            } else {
                let failed: Vec<String> = failed.into_iter().map(|(i, e)| format!("broker {i}: {e}")).collect();
                return Err(format!("reloading the revocation list: {}", failed.join("; ")));
            }
        }
        drop(written);
        if self.cfg.admins.is_empty() {
            return if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) };
        }
        // Removed devices not confirmed closed, and those the caller names (if the snapshot has them).
        let pending: Vec<Uuid> = removed.iter().filter(|r| !r.kick_confirmed || kick.contains(&r.device_id)).map(|r| r.device_id).collect();
        let admins = &self.cfg.admins;
        let kicks = kick_everywhere(unavailable, &pending, |b, d| kick_client(&admins[b], d)).await;
        for d in &kicks.closed {
            let recorded = sqlx::query("INSERT INTO device_kicks_confirmed (device_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(d)
                .execute(&self.pool)
                .await;
            match recorded {
                Ok(_) => tracing::info!(device = %d, "removed device disconnected at the broker"),
                Err(e) => errors.push(format!("recording the kick of {d}: {e}")),
            }
        }
        // A device not closed on every broker stays unconfirmed: the next round kicks it again.
        for f in &kicks.failed {
            tracing::warn!(broker = f.broker, port = admins[f.broker].port, device = %f.device, error = %f.error, "kicking a removed device failed");
        }
        if !kicks.failed.is_empty() {
            let mut brokers: Vec<usize> = kicks.failed.iter().map(|f| f.broker).collect();
            brokers.dedup();
            errors.push(format!(
                "{} of {} kicks failed (brokers {brokers:?}; first: {})",
                kicks.failed.len(),
                pending.len() * admins.len(),
                kicks.failed[0].error
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
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

/// Closes the connection of the client named by `device`'s id through the
/// dynamic-security plugin: create a dynsec client of that name, delete it.
async fn kick_client(admin: &BrokerAdmin, device: Uuid) -> Result<(), KickError> {
    let username = device.to_string();
    let mut o = MqttOptions::new(format!("homelink-revoker-{}", Uuid::new_v4().simple()), &admin.host, admin.port);
    o.set_credentials(&admin.username, secrecy::ExposeSecret::expose_secret(&admin.password));
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(o, 10);
    let commands = serde_json::json!({"commands": [
        {"command": "createClient", "username": username, "password": crate::auth::secret()},
        {"command": "deleteClient", "username": username},
    ]});
    use KickError::{Refused, Unreachable};
    let run = async {
        let mut subscribed = false;
        loop {
            match events.poll().await.map_err(|e| Unreachable(format!("broker admin connection: {e}")))? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .subscribe("$CONTROL/dynamic-security/v1/response", QoS::AtLeastOnce)
                        .await
                        .map_err(|e| Unreachable(format!("subscribe: {e}")))?;
                }
                Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                    subscribed = true;
                    client
                        .publish("$CONTROL/dynamic-security/v1", QoS::AtLeastOnce, false, commands.to_string())
                        .await
                        .map_err(|e| Unreachable(format!("publish: {e}")))?;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    let failed: Vec<&serde_json::Value> =
                        v["responses"].as_array().map(|r| r.iter().filter(|x| x.get("error").is_some()).collect()).unwrap_or_default();
                    return if failed.is_empty() { Ok(()) } else { Err(Refused(format!("dynamic security refused: {failed:?}"))) };
                }
                _ => {}
            }
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or_else(|_| Err(Unreachable("broker admin: no answer within 5 s".into())));
    let _ = client.disconnect().await;
    r
}

/// Why a kick failed.
#[derive(Debug)]
enum KickError {
    /// The broker did not answer (refused the connection, timed out): its
    /// other kicks this round are not tried.
    Unreachable(String),
    /// The broker answered and refused this kick.
    Refused(String),
}

/// One kick that did not happen.
#[derive(Debug, PartialEq)]
struct FailedKick {
    broker: usize,
    device: Uuid,
    error: String,
}

/// What a round of kicks did.
#[derive(Debug, Default)]
struct Kicks {
    /// Devices closed on every broker (then recorded as confirmed), in `devices` order.
    closed: Vec<Uuid>,
    failed: Vec<FailedKick>,
}

/// Kicks every device on every broker (`unavailable` has one entry per
/// broker: `Some(why)` for a broker not to kick on). The brokers are kicked
/// concurrently and independently: one broker that fails (or is
/// unreachable, after which its remaining kicks this round are not tried)
/// stops no kick on another. A device is closed once every broker closed it.
async fn kick_everywhere<F, Fut>(unavailable: Vec<Option<String>>, devices: &[Uuid], kick: F) -> Kicks
where
    F: Fn(usize, Uuid) -> Fut,
    Fut: std::future::Future<Output = Result<(), KickError>>,
{
    let brokers = unavailable.len();
    let per_broker = futures::future::join_all(unavailable.into_iter().enumerate().map(|(b, mut down)| {
        let kick = &kick;
        async move {
            let mut results = Vec::with_capacity(devices.len());
            for &d in devices {
                let r = match &down {
                    Some(why) => Err(format!("not tried: {why}")),
                    None => match kick(b, d).await {
                        Ok(()) => Ok(()),
                        Err(KickError::Refused(e)) => Err(e),
                        Err(KickError::Unreachable(e)) => {
                            down = Some(e.clone());
                            Err(e)
                        }
                    },
                };
                results.push(r);
            }
            results
        }
    }))
    .await;
    let mut kicks = Kicks::default();
    for (i, &d) in devices.iter().enumerate() {
        let mut everywhere = true;
        for (b, results) in per_broker.iter().enumerate() {
            if let Err(e) = &results[i] {
                everywhere = false;
                kicks.failed.push(FailedKick { broker: b, device: d, error: e.clone() });
            }
        }
        if everywhere && brokers > 0 {
            kicks.closed.push(d);
        }
    }
    kicks.failed.sort_by_key(|f| f.broker);
    kicks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn devices(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::new_v4()).collect()
    }

    /// Issue 15, defect 11: with the first broker unreachable, the old loop
    /// (`kick_client(admin, d).await?` for each device, each broker) returned
    /// at the first kick, so no other broker closed any connection.
    #[tokio::test]
    async fn an_unreachable_broker_stops_no_kick_on_the_others() {
        let ds = devices(3);
        let calls = Mutex::new(Vec::new());
        let kicks = kick_everywhere(vec![None; 3], &ds, |b, d| {
            calls.lock().unwrap().push((b, d));
            async move {
                if b == 0 {
                    Err(KickError::Unreachable("connection refused".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        let calls = calls.into_inner().unwrap();
        for b in [1, 2] {
            for d in &ds {
                assert!(calls.contains(&(b, *d)), "broker {b} kicks {d}: {calls:?}");
            }
        }
        // The unreachable broker is tried once this round, not once per device.
        assert_eq!(calls.iter().filter(|(b, _)| *b == 0).count(), 1);
        // No device is closed everywhere, so none is confirmed: all are retried.
        assert!(kicks.closed.is_empty());
        assert_eq!(kicks.failed.len(), 3);
        assert!(kicks.failed.iter().all(|f| f.broker == 0));
        assert_eq!(kicks.failed[0].error, "connection refused");
        assert!(kicks.failed[1].error.starts_with("not tried: connection refused"));
    }

    #[tokio::test]
    async fn a_refused_kick_leaves_only_its_device_unconfirmed() {
        let ds = devices(4);
        let refused = ds[1];
        let kicks = kick_everywhere(vec![None; 2], &ds, |b, d| async move {
            if b == 1 && d == refused {
                Err(KickError::Refused("dynamic security refused".into()))
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(kicks.closed, vec![ds[0], ds[2], ds[3]]);
        assert_eq!(kicks.failed, vec![FailedKick { broker: 1, device: refused, error: "dynamic security refused".into() }]);
    }

    #[tokio::test]
    async fn a_broker_without_its_revocation_list_is_not_kicked_and_confirms_nothing() {
        let ds = devices(2);
        let calls = Mutex::new(Vec::new());
        let kicks = kick_everywhere(vec![Some("no reload".into()), None], &ds, |b, d| {
            calls.lock().unwrap().push((b, d));
            async { Ok(()) }
        })
        .await;
        assert_eq!(calls.into_inner().unwrap(), vec![(1, ds[0]), (1, ds[1])]);
        assert!(kicks.closed.is_empty());
        assert_eq!(kicks.failed.len(), 2);
    }

    #[tokio::test]
    async fn every_broker_closing_confirms_every_device() {
        let ds = devices(3);
        let kicks = kick_everywhere(vec![None; 2], &ds, |_, _| async { Ok(()) }).await;
        assert_eq!(kicks.closed, ds);
        assert!(kicks.failed.is_empty());
    }
}
