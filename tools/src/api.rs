//! A small client of the command API's identity and household routes, as the
//! app uses them: for the demo seeding, the benchmark and the tests.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// A signed-in account.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub user_id: Uuid,
    pub email: String,
    /// Development and test accounts only.
    pub password: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(skip)]
    pub access_token: String,
    #[serde(skip)]
    pub refresh_token: String,
}

impl Account {
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.access_token)
    }
}

/// Checks the status; returns the JSON body (or `null` for an empty one).
async fn expect(r: reqwest::Response, want: u16, what: &str) -> crate::Result<Value> {
    let status = r.status().as_u16();
    let text = r.text().await?;
    if status != want {
        return Err(crate::Error::Status { what: what.to_owned(), want, status, body: text });
    }
    Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? })
}

fn tokens_into(a: &mut Account, v: &Value) -> crate::Result<()> {
    a.access_token = v["accessToken"].as_str().ok_or_else(|| crate::missing("accessToken"))?.to_owned();
    a.refresh_token = v["refreshToken"].as_str().ok_or_else(|| crate::missing("refreshToken"))?.to_owned();
    a.user_id = v["userId"].as_str().ok_or_else(|| crate::missing("userId"))?.parse()?;
    Ok(())
}

pub async fn sign_up(http: &reqwest::Client, base: &str, email: &str, password: &str, name: &str) -> crate::Result<Account> {
    let r = http
        .post(format!("{base}/v1/auth/sign-up"))
        .json(&json!({"email": email, "password": password, "displayName": name}))
        .send()
        .await?;
    let v = expect(r, 201, "sign-up").await?;
    let mut a = Account {
        user_id: Uuid::nil(),
        email: email.into(),
        password: password.into(),
        role: None,
        access_token: String::new(),
        refresh_token: String::new(),
    };
    tokens_into(&mut a, &v)?;
    Ok(a)
}

pub async fn sign_in(http: &reqwest::Client, base: &str, account: &mut Account) -> crate::Result<()> {
    let r =
        http.post(format!("{base}/v1/auth/sign-in")).json(&json!({"email": account.email, "password": account.password})).send().await?;
    let v = expect(r, 200, "sign-in").await?;
    tokens_into(account, &v)
}

pub async fn create_household(http: &reqwest::Client, base: &str, owner: &Account, name: &str) -> crate::Result<Uuid> {
    let r = http.post(format!("{base}/v1/households")).header("authorization", owner.bearer()).json(&json!({"name": name})).send().await?;
    let v = expect(r, 201, "create household").await?;
    Ok(v["householdId"].as_str().ok_or_else(|| crate::missing("householdId"))?.parse()?)
}

/// Invites `member` with `role` and has them accept.
pub async fn add_member(
    http: &reqwest::Client,
    base: &str,
    owner: &Account,
    household: Uuid,
    member: &Account,
    role: &str,
) -> crate::Result<()> {
    let r = http
        .post(format!("{base}/v1/households/{household}/invitations"))
        .header("authorization", owner.bearer())
        .json(&json!({"role": role}))
        .send()
        .await?;
    let inv = expect(r, 201, "invite").await?;
    let r = http
        .post(format!("{base}/v1/invitations/accept"))
        .header("authorization", member.bearer())
        .json(&json!({"code": inv["code"]}))
        .send()
        .await?;
    expect(r, 200, "accept").await?;
    Ok(())
}

/// A random password for development and test accounts.
pub fn dev_password() -> String {
    format!("dev-{}", Uuid::new_v4().simple())
}

/// What registration answers (the fields the tools use).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    pub device_id: Uuid,
    pub certificate_pem: String,
    #[serde(default)]
    pub private_key_pem: Option<String>,
    pub ca_certificate_pem: String,
    /// Where the device connects (its assigned broker).
    #[serde(default)]
    pub mqtt: Option<RegisteredMqtt>,
}

/// The broker a registration assigned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisteredMqtt {
    pub host: String,
    pub port: u16,
}

pub async fn create_room(http: &reqwest::Client, base: &str, who: &Account, household: Uuid, name: &str) -> crate::Result<Uuid> {
    let r = http
        .post(format!("{base}/v1/households/{household}/rooms"))
        .header("authorization", who.bearer())
        .json(&json!({"name": name}))
        .send()
        .await?;
    let v = expect(r, 201, "create room").await?;
    Ok(v["roomId"].as_str().ok_or_else(|| crate::missing("roomId"))?.parse()?)
}

/// Makes a scene of `devices` (`[{deviceId, set}]`); answers its id.
pub async fn create_scene(
    http: &reqwest::Client,
    base: &str,
    who: &Account,
    household: Uuid,
    name: &str,
    devices: serde_json::Value,
    child_allowed: bool,
) -> crate::Result<Uuid> {
    let body = json!({"name": name, "devices": devices, "childAllowed": child_allowed});
    let r = http.post(format!("{base}/v1/households/{household}/scenes")).header("authorization", who.bearer()).json(&body).send().await?;
    let v = expect(r, 201, "create scene").await?;
    Ok(v["sceneId"].as_str().ok_or_else(|| crate::missing("sceneId"))?.parse()?)
}

/// Makes an automation; answers its id.
pub async fn create_automation(
    http: &reqwest::Client,
    base: &str,
    who: &Account,
    household: Uuid,
    name: &str,
    definition: serde_json::Value,
) -> crate::Result<Uuid> {
    let body = json!({"name": name, "definition": definition});
    let r =
        http.post(format!("{base}/v1/households/{household}/automations")).header("authorization", who.bearer()).json(&body).send().await?;
    let v = expect(r, 201, "create automation").await?;
    Ok(v["automationId"].as_str().ok_or_else(|| crate::missing("automationId"))?.parse()?)
}

/// Registers a device; with `csr` the device keeps its key.
#[allow(clippy::too_many_arguments)]
pub async fn register_device(
    http: &reqwest::Client,
    base: &str,
    who: &Account,
    household: Uuid,
    kind: homelink_events::DeviceKind,
    name: &str,
    room_id: Option<Uuid>,
    serial: Option<&str>,
    csr: Option<&str>,
) -> crate::Result<Registered> {
    let body = json!({"kind": kind, "name": name, "roomId": room_id, "serial": serial, "csr": csr});
    let r = http.post(format!("{base}/v1/households/{household}/devices")).header("authorization", who.bearer()).json(&body).send().await?;
    let v = expect(r, 201, "register device").await?;
    Ok(serde_json::from_value(v)?)
}
