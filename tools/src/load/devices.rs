//! The fleet's MQTT connections: one client per device over mutual TLS with
//! its own certificate, and the publisher that spreads a total report rate
//! over them.

use super::fleet::FleetDevice;
use crate::sim::Target;
use chrono::Utc;
use homelink_events::protocol::{device_topic, Channel, Presence, StatusMsg, PROTOCOL_VERSION};
use homelink_events::DeviceKind;
use homelink_kit::shutdown::CancellationToken;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// One device's shared state: what it sent and what the broker acknowledged.
pub struct Device {
    pub household_id: Uuid,
    pub id: Uuid,
    pub kind: DeviceKind,
    pub state_topic: String,
    pub client: AsyncClient,
    pub connected: AtomicBool,
    /// Last sequence number used.
    pub seq: AtomicU64,
    /// Highest sequence number the broker acknowledged (PUBACK).
    pub acked_seq: AtomicU64,
    /// Published, not yet acknowledged: `(seq, sent at)`, in order (QoS 1
    /// acknowledgements come back in publish order on one connection).
    pub inflight: Mutex<VecDeque<(u64, Instant)>>,
    /// For probe devices: when each seq was published.
    pub probe_sent: Option<Mutex<HashMap<u64, Instant>>>,
}

/// PUBACK latencies in microseconds, gathered by every connection.
#[derive(Default)]
pub struct Acks {
    pub count: AtomicU64,
    /// PUBACKs with a reason other than Success.
    pub refused: AtomicU64,
    pub samples_us: Mutex<Vec<u32>>,
}

/// Starts a device's connection task; it connects (at most `handshakes` at
/// once), announces itself online and then counts acknowledgements until cancelled.
pub fn spawn(
    d: &FleetDevice,
    household: Uuid,
    probe: bool,
    target: &Target,
    acks: Arc<Acks>,
    handshakes: Arc<Semaphore>,
    cancel: CancellationToken,
) -> Arc<Device> {
    let target = crate::sim::Target { port: d.port.unwrap_or(target.port), ..target.clone() };
    let options = crate::sim::device_options(household, d.id, &d.cert_pem, &d.key_pem, &target, Duration::from_secs(60));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let dev = Arc::new(Device {
        household_id: household,
        id: d.id,
        kind: d.kind,
        state_topic: device_topic(household, d.id, Channel::State),
        client: client.clone(),
        connected: AtomicBool::new(false),
        seq: AtomicU64::new(0),
        acked_seq: AtomicU64::new(0),
        inflight: Mutex::new(VecDeque::new()),
        probe_sent: probe.then(|| Mutex::new(HashMap::new())),
    });
    let me = dev.clone();
    tokio::spawn(async move {
        let mut permit = handshakes.clone().acquire_owned().await.ok();
        let mut samples = Vec::new();
        let mut failures = 0u32;
        // One cancellation future for the connection's whole life, not one per event.
        let serve = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        permit.take();
                        failures = 0;
                        // Reports sent before a reconnect will never be acknowledged.
                        let online = serde_json::to_vec(&StatusMsg { v: PROTOCOL_VERSION, status: Presence::Online }).unwrap_or_default();
                        {
                            let mut q = me.inflight.lock().unwrap_or_else(|e| e.into_inner());
                            q.clear();
                            // Its PUBACK comes first: seq 0 marks it as no report.
                            if client.try_publish(device_topic(household, me.id, Channel::Status), QoS::AtLeastOnce, true, online).is_ok() {
                                q.push_back((0, Instant::now()));
                            }
                        }
                        me.connected.store(true, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let front = me.inflight.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                        match front {
                            Some((0, _)) | None => {}
                            // Taken by the broker only when it answers Success (a
                            // refusal, or "no matching subscribers": nobody will get it).
                            Some(_) if ack.reason != PubAckReason::Success => {
                                acks.refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Some((seq, sent)) => {
                                me.acked_seq.fetch_max(seq, Ordering::Relaxed);
                                samples.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                                acks.count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        me.connected.store(false, Ordering::Relaxed);
                        tracing::debug!(error = %e, device = %me.id, "load device connection error");
                        // As a well-behaved device: exponential backoff with
                        // jitter, so a fleet that lost its broker does not
                        // come back in one synchronized wave.
                        drop(permit.take());
                        tokio::time::sleep(reconnect_delay(failures, rand::random::<f64>())).await;
                        failures = failures.saturating_add(1);
                        // A reconnect takes a handshake slot like the first
                        // connect: this models the connection-rate limit a
                        // production broker cluster applies (EMQX
                        // `max_conn_rate`; Mosquitto has none), without
                        // which every handshake of a fleet-wide reconnect
                        // progresses at once and times out (BENCHMARKS.md).
                        permit = handshakes.clone().acquire_owned().await.ok();
                    }
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            () = serve => {}
        }
        acks.samples_us.lock().unwrap_or_else(|e| e.into_inner()).extend(samples);
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async { while eventloop.poll().await.is_ok() {} }).await;
    });
    dev
}

/// The wait before reconnect attempt `failures + 1`: 1 s doubling per failed
/// attempt up to 32 s, times a jitter factor from `unit` in [0, 1) (×0.5 to ×1.5).
pub fn reconnect_delay(failures: u32, unit: f64) -> Duration {
    let base = Duration::from_secs(1 << failures.min(5));
    base.mul_f64(0.5 + unit.clamp(0.0, 1.0))
}

/// The state report of `kind` for `seq`: values move with `seq` so every
/// report changes the shadow.
pub fn report(kind: DeviceKind, seq: u64) -> Vec<u8> {
    let ts = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let w = (seq % 20) as f64 / 10.0;
    let state = match kind {
        DeviceKind::Light => format!(r#"{{"on":{},"brightness":{},"colorTemp":3000}}"#, seq.is_multiple_of(2), 1 + seq % 100),
        DeviceKind::Plug => format!(r#"{{"on":true,"power":{:.1}}}"#, 800.0 + w * 10.0),
        DeviceKind::Thermostat => format!(r#"{{"currentTemp":{:.1},"targetTemp":21.0,"mode":"heat"}}"#, 19.0 + w),
        DeviceKind::Lock => format!(r#"{{"locked":{},"jammed":false}}"#, seq.is_multiple_of(2)),
        DeviceKind::Camera => format!(r#"{{"recording":false,"motion":{}}}"#, seq.is_multiple_of(2)),
        DeviceKind::Sensor => {
            format!(r#"{{"temperature":{:.1},"humidity":{:.1},"motion":{},"contact":true}}"#, 20.0 + w, 40.0 + w, seq.is_multiple_of(2))
        }
    };
    let battery = if kind.battery_powered() { r#","battery":87"# } else { "" };
    format!(r#"{{"v":{PROTOCOL_VERSION},"seq":{seq},"ts":"{ts}","state":{state}{battery}}}"#).into_bytes()
}

impl Device {
    /// Publishes the next report without waiting; `false` when the
    /// connection is down or its queue is full (not counted as sent).
    pub fn publish_next(&self) -> bool {
        if !self.connected.load(Ordering::Relaxed) {
            return false;
        }
        // Strictly increasing across runs without storage: at least microseconds since the epoch.
        let now_us = Utc::now().timestamp_micros().max(1) as u64;
        let prev = self.seq.load(Ordering::Relaxed);
        let seq = (prev + 1).max(now_us);
        let sent = Instant::now();
        let mut q = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if self.client.try_publish(&self.state_topic, QoS::AtLeastOnce, false, report(self.kind, seq)).is_err() {
            return false;
        }
        q.push_back((seq, sent));
        drop(q);
        self.seq.store(seq, Ordering::Relaxed);
        if let Some(p) = &self.probe_sent {
            p.lock().unwrap_or_else(|e| e.into_inner()).insert(seq, sent);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_with_jitter() {
        assert_eq!(reconnect_delay(0, 0.0), Duration::from_millis(500));
        assert_eq!(reconnect_delay(0, 1.0), Duration::from_millis(1500));
        assert_eq!(reconnect_delay(3, 0.5), Duration::from_secs(8));
        assert_eq!(reconnect_delay(40, 1.0), Duration::from_secs(48), "capped at 32 s ×1.5");
    }

    #[test]
    fn every_kind_reports_what_its_schema_accepts() {
        for kind in DeviceKind::ALL {
            for seq in [1, 2, 17, 1_790_000_000_000_000] {
                let body = report(kind, seq);
                let decoded = homelink_events::protocol::decode_device_message(kind, Channel::State, &body);
                assert!(decoded.is_ok(), "{kind}: {} → {decoded:?}", String::from_utf8_lossy(&body));
            }
        }
    }
}
