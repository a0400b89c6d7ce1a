//! The command round-trip benchmark: HTTP accepted → device receives → new
//! state visible on the GraphQL subscription, over many commands, against a
//! running stack (`endpoints.json`). It seeds a household of its own with one
//! simulated light, so it never disturbs the demo devices.

use crate::endpoints::Endpoints;
use crate::gql::Subscription;
use crate::seed;
use crate::sim::{self, DeviceSpec, Observed, Target};
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
    let user = crate::api::sign_up(
        &http,
        &endpoints.command_api,
        &format!("bench-{}@homelink.dev", uuid::Uuid::new_v4().simple()),
        &crate::api::dev_password(),
        "Benchmark",
    )
    .await?;
    let token = user.access_token.clone();
    let home =
        seed::household(&http, &endpoints.command_api, &user, "Benchmark home", &[(DeviceKind::Light, "Bench light", "Lab")]).await?;
    let device = home.devices[0].clone();

    // Wait until the registry knows the device (the projector applied the registration).
    let q = "query($id: ID!) { device(id: $id) { id } }";
    let deadline = Instant::now() + Duration::from_secs(30);
    while crate::gql::query(&http, &endpoints.graphql, &token, q, json!({"id": device.id})).await?["data"]["device"].is_null() {
        if Instant::now() >= deadline {
            return Err(crate::Error::Protocol("the benchmark device was not registered within 30 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let cancel = CancellationToken::new();
    let (obs_tx, mut obs) = mpsc::unbounded_channel();
    let target = Target {
        host: endpoints.mqtt_device.host.clone(),
        port: endpoints.mqtt_device.port,
        ca_pem: std::fs::read_to_string(&endpoints.mqtt_device.ca_cert)?,
    };
    let spec = DeviceSpec {
        household_id: home.household_id,
        device_id: device.id,
        kind: DeviceKind::Light,
        cert_pem: device.cert_pem.clone(),
        key_pem: device.key_pem.clone(),
        interval: None,
        port: device.mqtt_port,
    };
    tokio::spawn(sim::run(spec, target, Some(obs_tx), cancel.clone()));
    loop {
        match tokio::time::timeout(Duration::from_secs(20), obs.recv()).await {
            Ok(Some(Observed::Connected { .. })) => break,
            Ok(Some(_)) => {}
            _ => return Err(crate::Error::Protocol("the benchmark device did not connect within 20 s".into())),
        }
    }
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
