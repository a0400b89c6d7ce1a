//! The load generator's fleet: H households × D devices, provisioned through
//! the public API as an installer would (one account owning every household),
//! and cached in the stack's state folder so a rerun reuses it.

use crate::api::{self, Account};
use futures::{StreamExt, TryStreamExt};
use homelink_events::DeviceKind;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Device kinds in the order a fleet cycles through them.
const KINDS: [DeviceKind; 6] =
    [DeviceKind::Sensor, DeviceKind::Light, DeviceKind::Plug, DeviceKind::Thermostat, DeviceKind::Camera, DeviceKind::Lock];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fleet {
    /// The installer account that owns every household (development only:
    /// the password is kept so a rerun can sign in).
    pub account: Account,
    pub households: Vec<FleetHousehold>,
    /// A household with one light that answers commands (the command probe).
    pub command_probe: FleetHousehold,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetHousehold {
    pub id: Uuid,
    pub devices: Vec<FleetDevice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetDevice {
    pub id: Uuid,
    pub kind: DeviceKind,
    pub cert_pem: String,
    pub key_pem: String,
    /// The port of the broker its registration assigned (`None`: the stack's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Fleet {
    pub fn devices(&self) -> usize {
        self.households.iter().map(|h| h.devices.len()).sum()
    }
}

/// Where the fleet of a given shape is cached.
pub fn cache_path(state_dir: &Path, households: usize, per_household: usize) -> PathBuf {
    state_dir.join("load").join(format!("fleet-{households}x{per_household}.json"))
}

/// The cached fleet when it exists and its account still signs in; a new
/// one otherwise (written to the cache).
pub async fn load_or_provision(
    http: &reqwest::Client,
    api_base: &str,
    cache: Option<&Path>,
    households: usize,
    per_household: usize,
    concurrency: usize,
    progress: bool,
) -> crate::Result<(Fleet, bool)> {
    if let Some(path) = cache {
        if let Some(mut fleet) = std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Fleet>(&b).ok()) {
            if fleet.households.len() == households
                && fleet.households.iter().all(|h| h.devices.len() == per_household)
                && api::sign_in(http, api_base, &mut fleet.account).await.is_ok()
            {
                return Ok((fleet, true));
            }
        }
    }
    let fleet = provision(http, api_base, households, per_household, concurrency, progress).await?;
    if let Some(path) = cache {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec(&fleet)?)?;
    }
    Ok((fleet, false))
}

async fn provision(
    http: &reqwest::Client,
    api_base: &str,
    households: usize,
    per_household: usize,
    concurrency: usize,
    progress: bool,
) -> crate::Result<Fleet> {
    let email = format!("load-{}@homelink.dev", Uuid::new_v4().simple());
    let account = api::sign_up(http, api_base, &email, &api::dev_password(), "Load installer").await?;
    // Provisioning a large fleet outlasts an access token (5 minutes): signed in again every 2.
    let cancel = homelink_kit::shutdown::CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let token = super::Token::keep(http.clone(), api_base.to_owned(), account.clone(), cancel);
    let current = || api::Account { access_token: token.get(), ..account.clone() };
    let bar = if progress { ProgressBar::new((households * per_household) as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("provisioning {bar:40} {pos}/{len} devices ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let homes: Vec<FleetHousehold> = futures::stream::iter(0..households)
        .map(|i| {
            let (current, bar) = (&current, &bar);
            async move {
                let id = api::create_household(http, api_base, &current(), &format!("Load home {i}")).await?;
                let mut devices = Vec::with_capacity(per_household);
                for j in 0..per_household {
                    let kind = KINDS[j % KINDS.len()];
                    let d = register(http, api_base, &current(), id, kind, &format!("Load {kind} {j}")).await?;
                    devices.push(d);
                    bar.inc(1);
                }
                Ok::<_, crate::Error>(FleetHousehold { id, devices })
            }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await?;
    bar.finish_and_clear();
    let account = current();
    let probe_home = api::create_household(http, api_base, &account, "Load command probe").await?;
    let light = register(http, api_base, &account, probe_home, DeviceKind::Light, "Probe light").await?;
    Ok(Fleet { account, households: homes, command_probe: FleetHousehold { id: probe_home, devices: vec![light] } })
}

async fn register(
    http: &reqwest::Client,
    api_base: &str,
    who: &Account,
    h: Uuid,
    kind: DeviceKind,
    name: &str,
) -> crate::Result<FleetDevice> {
    let d = api::register_device(http, api_base, who, h, kind, name, None, None, None).await?;
    Ok(FleetDevice {
        id: d.device_id,
        kind,
        cert_pem: d.certificate_pem,
        key_pem: d.private_key_pem.ok_or_else(|| crate::missing("privateKeyPem"))?,
        port: d.mqtt.map(|m| m.port),
    })
}
