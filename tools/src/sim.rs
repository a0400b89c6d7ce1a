//! A simulated device that speaks the device protocol over MQTT 5 with its own
//! client certificate: `status` online (retained) on connect and offline as
//! its last will, a `state` report every interval, and on a `cmd` it applies
//! the values, answers `ack` and reports its new state at once.

use chrono::Utc;
use homelink_events::protocol::{device_topic, AckMsg, AckStatus, Channel, CmdMsg, Presence, StateMsg, StatusMsg, PROTOCOL_VERSION};
use homelink_events::DeviceKind;
use homelink_kit::shutdown::CancellationToken;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Where and how a simulated device connects.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
}

/// One simulated device.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub household_id: Uuid,
    pub device_id: Uuid,
    pub kind: DeviceKind,
    pub cert_pem: String,
    pub key_pem: String,
    /// Time between periodic reports; `None` reports only on connect and after commands.
    pub interval: Option<Duration>,
    /// The port of the broker its registration assigned (`None`: the target's).
    pub port: Option<u16>,
}

/// What a simulated device observed, for tests and benchmarks.
#[derive(Debug, Clone)]
pub enum Observed {
    Connected { device_id: Uuid },
    Command { device_id: Uuid, command_id: Uuid, at: Instant },
}

/// The initial state of a device of `kind`.
pub fn initial_state(kind: DeviceKind) -> Map<String, Value> {
    let v = match kind {
        DeviceKind::Light => json!({"on": false, "brightness": 50, "colorTemp": 3000}),
        DeviceKind::Plug => json!({"on": false, "power": 0.0}),
        DeviceKind::Thermostat => json!({"currentTemp": 20.5, "targetTemp": 21.0, "mode": "heat"}),
        DeviceKind::Lock => json!({"locked": true, "jammed": false}),
        DeviceKind::Camera => json!({"recording": false, "motion": false}),
        DeviceKind::Sensor => {
            json!({"temperature": 21.0, "humidity": 45.0, "motion": false, "contact": true})
        }
    };
    v.as_object().cloned().unwrap_or_default()
}

/// Small changes of the reported-only values, so the demo looks alive.
fn wander(kind: DeviceKind, state: &mut Map<String, Value>, tick: u64) {
    let wobble = ((tick % 7) as f64 - 3.0) / 10.0;
    match kind {
        DeviceKind::Thermostat => {
            state.insert("currentTemp".into(), json!((20.5 + wobble * 2.0).clamp(-50.0, 100.0)));
        }
        DeviceKind::Plug => {
            let on = state.get("on").and_then(Value::as_bool).unwrap_or(false);
            state.insert("power".into(), json!(if on { 850.0 + wobble * 50.0 } else { 0.0 }));
        }
        DeviceKind::Sensor => {
            state.insert("temperature".into(), json!(21.0 + wobble));
            state.insert("humidity".into(), json!(45.0 + wobble * 10.0));
            state.insert("motion".into(), json!(tick.is_multiple_of(5)));
        }
        DeviceKind::Camera => {
            state.insert("motion".into(), json!(tick.is_multiple_of(4)));
        }
        _ => {}
    }
}

/// The client options of a device: mTLS with its certificate, its id as client id.
pub fn mqtt_options(spec: &DeviceSpec, target: &Target) -> MqttOptions {
    let target = Target { port: spec.port.unwrap_or(target.port), ..target.clone() };
    device_options(spec.household_id, spec.device_id, &spec.cert_pem, &spec.key_pem, &target, Duration::from_secs(30))
}

/// A device's client options from its parts: mTLS with its certificate, its
/// id as client id, `offline` (retained) as its last will.
pub fn device_options(household: Uuid, device: Uuid, cert_pem: &str, key_pem: &str, target: &Target, keep_alive: Duration) -> MqttOptions {
    let mut o = MqttOptions::new(device.to_string(), &target.host, target.port);
    o.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: target.ca_pem.clone().into_bytes(),
        alpn: None,
        client_auth: Some((cert_pem.as_bytes().to_vec(), key_pem.as_bytes().to_vec())),
    }));
    o.set_keep_alive(keep_alive).set_clean_start(true);
    // rumqttc sizes its in-flight table by this limit (u16::MAX by default: megabytes per client).
    o.set_outgoing_inflight_upper_limit(32);
    // Small request/response messages: no Nagle delay.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    // Connect + TLS handshake + CONNACK may take long when a whole fleet
    // comes back at once: giving up after rumqttc's default 5 s throws away
    // the broker's half-done handshake and makes the storm feed itself
    // (seen: 100,000 devices thrashing after a broker restart).
    net.set_connection_timeout(30);
    o.set_network_options(net);
    let offline = serde_json::to_vec(&StatusMsg { v: PROTOCOL_VERSION, status: Presence::Offline }).unwrap_or_default();
    o.set_last_will(LastWill::new(device_topic(household, device, Channel::Status), offline, QoS::AtLeastOnce, true, None));
    o
}

/// Runs one device until cancelled.
pub async fn run(spec: DeviceSpec, target: Target, observed: Option<mpsc::UnboundedSender<Observed>>, cancel: CancellationToken) {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&spec, &target), 64);
    let topic = |c| device_topic(spec.household_id, spec.device_id, c);
    let mut state = initial_state(spec.kind);
    // Strictly increasing across restarts without storage: microseconds since the epoch.
    let mut seq = 0u64;
    let mut next_seq = move || {
        seq = (seq + 1).max(Utc::now().timestamp_micros().max(1) as u64);
        seq
    };
    let mut handled: HashSet<Uuid> = HashSet::new();
    let mut tick = 0u64;
    let mut timer = tokio::time::interval(spec.interval.unwrap_or(Duration::from_secs(3600)));
    timer.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                // A device that shuts down says so, then disconnects cleanly (no last will).
                let offline = serde_json::to_vec(&StatusMsg { v: PROTOCOL_VERSION, status: Presence::Offline }).unwrap_or_default();
                let _ = client.publish(topic(Channel::Status), QoS::AtLeastOnce, true, offline).await;
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while eventloop.poll().await.is_ok() {}
                })
                .await;
                return;
            }
            _ = timer.tick(), if spec.interval.is_some() => {
                tick += 1;
                wander(spec.kind, &mut state, tick);
                let _ = publish_state(&client, topic(Channel::State), spec.kind, &state, next_seq()).await;
            }
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // Subscribed before it says it is online: the broker handles
                    // both in order, so the commands queued while it was away
                    // (sent when the bridge sees `online`) find the subscription.
                    let _ = client.subscribe(topic(Channel::Cmd), QoS::AtLeastOnce).await;
                    let online = serde_json::to_vec(&StatusMsg { v: PROTOCOL_VERSION, status: Presence::Online }).unwrap_or_default();
                    let _ = client.publish(topic(Channel::Status), QoS::AtLeastOnce, true, online).await;
                    let _ = publish_state(&client, topic(Channel::State), spec.kind, &state, next_seq()).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(o) = &observed {
                        let _ = o.send(Observed::Connected { device_id: spec.device_id });
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    let Ok(cmd) = serde_json::from_slice::<CmdMsg>(&p.payload) else { continue };
                    if !handled.insert(cmd.command_id) || cmd.expires_at < Utc::now() {
                        continue;
                    }
                    if let Some(o) = &observed {
                        let _ = o.send(Observed::Command { device_id: spec.device_id, command_id: cmd.command_id, at });
                    }
                    let (status, reason) = match spec.kind.validate_set(&cmd.set) {
                        Ok(()) => {
                            for (k, v) in &cmd.set {
                                state.insert(k.clone(), v.clone());
                            }
                            (AckStatus::Ok, None)
                        }
                        Err(e) => (AckStatus::Rejected, Some(e.to_string())),
                    };
                    let ack = AckMsg { v: PROTOCOL_VERSION, command_id: cmd.command_id, status, reason };
                    let _ = client.publish(topic(Channel::Ack), QoS::AtLeastOnce, false, serde_json::to_vec(&ack).unwrap_or_default()).await;
                    if status == AckStatus::Ok {
                        let _ = publish_state(&client, topic(Channel::State), spec.kind, &state, next_seq()).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, device = %spec.device_id, "device connection error");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
}

async fn publish_state(
    client: &AsyncClient,
    topic: String,
    kind: DeviceKind,
    state: &Map<String, Value>,
    seq: u64,
) -> Result<(), rumqttc::v5::ClientError> {
    let msg =
        StateMsg { v: PROTOCOL_VERSION, seq, ts: Some(Utc::now()), state: state.clone(), battery: kind.battery_powered().then_some(87) };
    client.publish(topic, QoS::AtLeastOnce, false, serde_json::to_vec(&msg).unwrap_or_default()).await
}
