//! The command round-trip benchmark: HTTP accepted → device receives → new
//! state visible on the GraphQL subscription, over many commands, against a
//! running stack (`endpoints.json`). It seeds a household of its own with one
//! simulated light, so it never disturbs the demo devices.

use crate::endpoints::Endpoints;
use crate::gql::Subscription;
use crate::seed;
use crate::sim::{self, Observed, Target};
use homelink_events::DeviceKind;
use homelink_kit::shutdown::CancellationToken;
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1000.0
        };
        Self { p50_ms: at(0.50), p95_ms: at(0.95), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub commands: usize,
    /// POST sent → 202 received (the append is acknowledged by Kafka).
    pub http_accepted: Percentiles,
    /// POST sent → the device received the `cmd` message.
    pub device_received: Percentiles,
    /// POST sent → the new state arrived on the GraphQL subscription.
    pub state_on_subscription: Percentiles,
}

/// Runs `count` commands one after the other and measures each stage.
pub async fn run(endpoints: &Endpoints, count: usize, progress: bool) -> crate::Result<Summary> {
    if count == 0 {
        return Err(crate::Error::Protocol("count must be positive".into()));
    }
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let (user, home) = household(&http, endpoints, &[(DeviceKind::Light, "Bench light", "Lab")]).await?;
    let token = user.access_token.clone();
    let device = home.devices[0].clone();

    let cancel = CancellationToken::new();
    let (obs_tx, mut obs) = mpsc::unbounded_channel();
    let target = target(endpoints)?;
    tokio::spawn(sim::run(home.spec(0, None), target, Some(obs_tx), cancel.clone()));
    connected(&mut obs).await?;
    let mut sub = Subscription::start(
        &endpoints.graphql_ws,
        &token,
        "subscription($h: ID!) { deviceChanges(householdId: $h) { deviceId shadow { reported seq } } }",
        json!({"h": home.household_id}),
    )
    .await?;
    // Let the initial report land so it does not count as a command's result.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let url = format!("{}/v1/households/{}/devices/{}/commands", endpoints.command_api, home.household_id, device.id);
    let (mut accepted, mut received, mut visible) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        // Alternate so every command changes the state.
        let brightness = if i % 2 == 0 { 10 + (i % 80) as i64 } else { 95 };
        let t0 = Instant::now();
        let r = http.post(&url).bearer_auth(&token).json(&json!({"set": {"brightness": brightness}})).send().await?;
        if r.status().as_u16() != 202 {
            return Err(crate::Error::Protocol(format!("command refused: {} {}", r.status(), r.text().await.unwrap_or_default())));
        }
        accepted.push(t0.elapsed());
        let body: serde_json::Value = r.json().await?;
        let command_id = body["commandId"].as_str().unwrap_or_default().to_owned();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(o) = obs.recv().await {
                if let Observed::Command { command_id: c, at, .. } = o {
                    if c.to_string() == command_id {
                        return Some(at);
                    }
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| crate::Error::Protocol(format!("command {i} did not reach the device within 10 s")))?;
        received.push(got.duration_since(t0));
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let d = sub.next().await?;
                if d["deviceChanges"]["shadow"]["reported"]["brightness"] == json!(brightness) {
                    return Ok::<(), crate::Error>(());
                }
            }
        })
        .await
        .map_err(|_| crate::Error::Protocol(format!("state of command {i} not seen on the subscription within 10 s")))??;
        visible.push(t0.elapsed());
        if progress && (i + 1) % 50 == 0 {
            eprint!("\r{}/{count} commands", i + 1);
            let _ = std::io::stderr().flush();
        }
    }
    if progress {
        eprintln!();
    }
    cancel.cancel();
    Ok(Summary {
        commands: count,
        http_accepted: Percentiles::of(&mut accepted),
        device_received: Percentiles::of(&mut received),
        state_on_subscription: Percentiles::of(&mut visible),
    })
}

/// A benchmark's own household (so it never disturbs the demo devices),
/// owned by a new account, once the read models know its devices.
async fn household(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    devices: &[(DeviceKind, &str, &str)],
) -> crate::Result<(crate::api::Account, seed::SeededHousehold)> {
    let user = crate::api::sign_up(
        http,
        &endpoints.command_api,
        &format!("bench-{}@homelink.dev", uuid::Uuid::new_v4().simple()),
        &crate::api::dev_password(),
        "Benchmark",
    )
    .await?;
    let home = seed::household(http, &endpoints.command_api, &user, "Benchmark home", devices).await?;
    let q = "query($id: ID!) { device(id: $id) { id } }";
    let deadline = Instant::now() + Duration::from_secs(30);
    for d in &home.devices {
        while crate::gql::query(http, &endpoints.graphql, &user.access_token, q, json!({"id": d.id})).await?["data"]["device"].is_null() {
            if Instant::now() >= deadline {
                return Err(crate::Error::Protocol("the benchmark devices were not registered within 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((user, home))
}

fn target(endpoints: &Endpoints) -> crate::Result<Target> {
    Ok(Target {
        host: endpoints.mqtt_device.host.clone(),
        port: endpoints.mqtt_device.port,
        ca_pem: std::fs::read_to_string(&endpoints.mqtt_device.ca_cert)?,
    })
}

async fn connected(obs: &mut mpsc::UnboundedReceiver<Observed>) -> crate::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), obs.recv()).await {
            Ok(Some(Observed::Connected { .. })) => return Ok(()),
            Ok(Some(_)) => {}
            _ => return Err(crate::Error::Protocol("the benchmark device did not connect within 20 s".into())),
        }
    }
}

/// What the automation benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct AutomationSummary {
    pub triggers: usize,
    /// Report published by the trigger device → the automation's command
    /// received by the other device (log → engine → log → bridge → MQTT).
    pub trigger_to_command: Percentiles,
}

/// Triggers that share one automation: each automation starts at most this
/// many runs in a benchmark, under the engine's breaker (30 a minute).
const RUNS_PER_AUTOMATION: usize = 25;

/// The automation round trip: a sensor publishes a report, an automation
/// ("when the contact changes, turn the light on") sends a command, the
/// light receives it; `count` times, one after the other. The triggers are
/// spread over several sensors and automations so no breaker trips.
pub async fn automation(endpoints: &Endpoints, count: usize, progress: bool) -> crate::Result<AutomationSummary> {
    if count == 0 {
        return Err(crate::Error::Protocol("count must be positive".into()));
    }
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let sensors = count.div_ceil(RUNS_PER_AUTOMATION);
    let names: Vec<String> = (0..sensors).map(|i| format!("Bench sensor {i}")).collect();
    let mut devices = vec![(DeviceKind::Light, "Bench light", "Lab")];
    devices.extend(names.iter().map(|n| (DeviceKind::Sensor, n.as_str(), "Lab")));
    let (user, home) = household(&http, endpoints, &devices).await?;
    let light = home.devices[0].id;
    for (i, sensor) in home.devices[1..].iter().enumerate() {
        let definition = json!({
            "triggers": [{"type": "state", "deviceId": sensor.id, "capability": "contact"}],
            "actions": [{"type": "command", "deviceId": light, "set": {"on": true}}],
            "mode": "parallel"
        });
        crate::api::create_automation(&http, &endpoints.command_api, &user, home.household_id, &format!("Bench {i}"), definition).await?;
    }
    let cancel = CancellationToken::new();
    let (obs_tx, mut obs) = mpsc::unbounded_channel();
    let target = target(endpoints)?;
    tokio::spawn(sim::run(home.spec(0, None), target.clone(), Some(obs_tx), cancel.clone()));
    connected(&mut obs).await?;
    // The sensors: plain connections that publish what the benchmark says.
    let mut clients = Vec::new();
    for i in 1..home.devices.len() {
        let (client, mut ev) = rumqttc::v5::AsyncClient::new(sim::mqtt_options(&home.spec(i, None), &target), 64);
        let (up_tx, up) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut up_tx = Some(up_tx);
            while let Ok(e) = ev.poll().await {
                if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_)) = e {
                    if let Some(t) = up_tx.take() {
                        let _ = t.send(());
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), up)
            .await
            .map_err(|_| crate::Error::Protocol("a benchmark sensor did not connect within 20 s".into()))?
            .map_err(|_| crate::Error::Protocol("a benchmark sensor's connection ended".into()))?;
        clients.push(client);
    }
    // The engine decides from the log's end when it first sees a household:
    // let the automations and the connections settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let sensor = i % clients.len();
        let seq = (i / clients.len()) as u64 + 1;
        let topic = format!("home/{}/device/{}/state", home.household_id, home.devices[sensor + 1].id);
        let body = serde_json::to_vec(&json!({"v": 1, "seq": seq, "state": {"contact": seq.is_multiple_of(2)}}))?;
        while obs.try_recv().is_ok() {}
        let t0 = Instant::now();
        clients[sensor]
            .publish(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| crate::Error::Protocol(format!("publishing a trigger: {e}")))?;
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(o) = obs.recv().await {
                if let Observed::Command { at, .. } = o {
                    return Some(at);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| crate::Error::Protocol(format!("trigger {i}: no command reached the light within 10 s")))?;
        samples.push(got.duration_since(t0));
        // Let the light's report of the command go by before the next trigger.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if progress && (i + 1) % 25 == 0 {
            eprint!("\r{}/{count} triggers", i + 1);
            let _ = std::io::stderr().flush();
        }
    }
    if progress {
        eprintln!();
    }
    cancel.cancel();
    Ok(AutomationSummary { triggers: count, trigger_to_command: Percentiles::of(&mut samples) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms), (50.0, 95.0, 99.0, 100.0));
    }
}
