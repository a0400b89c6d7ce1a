//! The load generator's fleet: H households × D devices, provisioned through
//! the public API as an installer would (one account owning every household),
//! and cached in the stack's state folder so a rerun reuses it. The installer
//! is a new account, or an existing one (`homelink load --email
//! --password-file`). The cache holds the installer's password and every
//! device's private key: it is written readable by its owner only (0600).

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

/// An existing installer account to provision with: signed in, never signed
/// up (an address may sign up only so many accounts an hour).
#[derive(Clone)]
pub struct Installer {
    pub email: String,
    pub password: String,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer").field("email", &self.email).field("password", &"<redacted>").finish()
    }
}

impl Installer {
    /// The account `email` with the password held in `file` (a trailing
    /// newline trimmed; never a command-line value).
    pub fn with_password_file(email: &str, file: &Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        let password = text.trim_end_matches(['\n', '\r']).to_owned();
        if password.is_empty() {
            return Err(crate::Error::Protocol(format!("{}: the password file is empty", file.display())));
        }
        Ok(Self { email: email.trim().to_owned(), password })
    }

    async fn sign_in(&self, http: &reqwest::Client, api_base: &str) -> crate::Result<Account> {
        let mut account = Account {
            user_id: Uuid::nil(),
            email: self.email.clone(),
            password: self.password.clone(),
            role: None,
            access_token: String::new(),
            refresh_token: String::new(),
        };
        api::sign_in(http, api_base, &mut account).await?;
        Ok(account)
    }
}

/// Writes `bytes` to `path` readable by its owner only (0600: a fleet holds
/// the installer's password and every device's private key), atomically: a
/// new file beside it, then renamed over it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", Uuid::new_v4().simple()));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let written = (|| {
        let mut f = o.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Where the fleet of a given shape is cached.
pub fn cache_path(state_dir: &Path, households: usize, per_household: usize) -> PathBuf {
    state_dir.join("load").join(format!("fleet-{households}x{per_household}.json"))
}

/// The cached fleet when it exists and its account still signs in; a new
/// one otherwise (written to the cache, 0600). With `installer`, the fleet is
/// that account's: a cached fleet of another account is not reused, and a
/// new one is provisioned by signing in, not up.
#[allow(clippy::too_many_arguments)]
pub async fn load_or_provision(
    http: &reqwest::Client,
    api_base: &str,
    cache: Option<&Path>,
    installer: Option<&Installer>,
    households: usize,
    per_household: usize,
    concurrency: usize,
    progress: bool,
) -> crate::Result<(Fleet, bool)> {
    if let Some(path) = cache {
        if let Some(mut fleet) = std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Fleet>(&b).ok()) {
            let mut same_account = true;
            if let Some(i) = installer {
                same_account = fleet.account.email.eq_ignore_ascii_case(&i.email);
                fleet.account.password = i.password.clone();
            }
            if same_account
                && fleet.households.len() == households
                && fleet.households.iter().all(|h| h.devices.len() == per_household)
                && api::sign_in(http, api_base, &mut fleet.account).await.is_ok()
            {
                return Ok((fleet, true));
            }
        }
    }
    let account = match installer {
        Some(i) => i.sign_in(http, api_base).await?,
        None => {
            let email = format!("load-{}@homelink.dev", Uuid::new_v4().simple());
            api::sign_up(http, api_base, &email, &api::dev_password(), "Load installer").await?
        }
    };
    let fleet = provision(http, api_base, account, households, per_household, concurrency, progress).await?;
    if let Some(path) = cache {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_private(path, &serde_json::to_vec(&fleet)?)?;
    }
    Ok((fleet, false))
}

async fn provision(
    http: &reqwest::Client,
    api_base: &str,
    account: Account,
    households: usize,
    per_household: usize,
    concurrency: usize,
    progress: bool,
) -> crate::Result<Fleet> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("homelink-fleet-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// Issue 15, defect 11: `std::fs::write` created the cache with the
    /// process umask (0644 here: world-readable), and an existing one kept
    /// its mode.
    #[cfg(unix)]
    #[test]
    fn the_fleet_cache_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch();
        let path = cache_path(&dir, 2, 3);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        // An older cache, world-readable, is replaced by a private one.
        std::fs::write(&path, b"old").expect("old cache");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, b"{\"secret\":true}").expect("write");
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"secret\":true}");
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("parent")).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn an_installer_password_comes_from_its_file() {
        let dir = scratch();
        let file = dir.join("password");
        std::fs::write(&file, "correct horse battery\n").expect("password file");
        let i = Installer::with_password_file(" ops@example.com ", &file).expect("installer");
        assert_eq!((i.email.as_str(), i.password.as_str()), ("ops@example.com", "correct horse battery"));
        assert!(!format!("{i:?}").contains("horse"), "Debug redacts the password");
        std::fs::write(&file, "\n").expect("empty password file");
        assert!(Installer::with_password_file("ops@example.com", &file).is_err());
        assert!(Installer::with_password_file("ops@example.com", &dir.join("missing")).is_err());
        std::fs::remove_dir_all(dir).expect("clean up");
    }
}
