//! Device → Kafka. Each MQTT publish is checked (topic, owner, payload),
//! appended to the telemetry topic, and only then acknowledged (PUBACK), in
//! the order received. A message that cannot be appended is retried, never
//! dropped: while Kafka is down the bridge stops acknowledging.

use crate::Shared;
use chrono::Utc;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use homelink_events::event::{DeviceCommandAcked, DeviceStateReported, DeviceStatusChanged};
use homelink_events::protocol::{
    decode_device_message, decode_device_value, parse_device_topic, Channel, DeviceMessage, Presence, MAX_PAYLOAD_BYTES,
};
use homelink_events::{Actor, Envelope, Event};
use homelink_kit::kafka::Backoff;
use homelink_kit::shutdown::CancellationToken;
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::AsyncClient;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What became of one device message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Appended,
    DeadLettered,
    Dropped,
}

/// One device's messages reach the log in the order they arrived, though
/// many are handled at once: each message waits, right before its append,
/// for the previous message of its device to be appended (or dropped). The
/// twin relies on it: a report the device sent after its ack must land
/// after the ack (`events::twin`).
///
/// The turns of devices whose last message is done are swept when the map
/// has doubled since the last sweep (at least [`DeviceOrder::SWEEP_FROM`]
/// entries): amortized O(1) per message however many devices report. (A
/// sweep on every message once 100,000 devices had reported took 86 % of
/// the bridge's CPU at 100,000 devices — a turn nobody awaited never looked
/// done.)
struct DeviceOrder {
    turns: std::collections::HashMap<uuid::Uuid, (Turn, Arc<AtomicBool>)>,
    sweep_at: usize,
}

type Turn = futures::future::Shared<tokio::sync::oneshot::Receiver<()>>;

impl Default for DeviceOrder {
    fn default() -> Self {
        Self { turns: std::collections::HashMap::new(), sweep_at: Self::SWEEP_FROM }
    }
}

impl DeviceOrder {
    const SWEEP_FROM: usize = 10_000;

    /// The turn of the previous message of `device` to wait for, and the
    /// signal this message gives when its append is done (on drop).
    fn next(&mut self, device: uuid::Uuid) -> (Option<Turn>, TurnDone) {
        use futures::FutureExt;
        if self.turns.len() >= self.sweep_at {
            self.turns.retain(|_, (_, done)| !done.load(Ordering::Acquire));
            self.sweep_at = (self.turns.len() * 2).max(Self::SWEEP_FROM);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = Arc::new(AtomicBool::new(false));
        let previous = self.turns.insert(device, (rx.shared(), done.clone())).map(|(t, _)| t);
        (previous, TurnDone(Some((tx, done))))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.turns.len()
    }
}

/// When an append last failed, to tell whether appends are failing lately.
pub struct Failing {
    started: Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Failing {
    fn default() -> Self {
        Self { started: Instant::now(), last_ms: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl Failing {
    /// Within this long of a failure, appends count as failing.
    const LATELY: Duration = Duration::from_secs(10);

    pub fn now(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn recently(&self) -> bool {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        last > 0 && self.started.elapsed().as_millis() as u64 + 1 - last < Self::LATELY.as_millis() as u64
    }
}

/// Gives the next message of the device its turn when dropped.
struct TurnDone(Option<(tokio::sync::oneshot::Sender<()>, Arc<AtomicBool>)>);

impl Drop for TurnDone {
    fn drop(&mut self) {
        if let Some((tx, done)) = self.0.take() {
            done.store(true, Ordering::Release);
            let _ = tx.send(());
        }
    }
}

/// Handles publishes in order of arrival, many at a time, and acknowledges
/// each one once its fate is durable.
pub(crate) async fn run(
    shared: Arc<Shared>,
    clients: Vec<AsyncClient>,
    mut rx: mpsc::UnboundedReceiver<(usize, Publish)>,
    cancel: CancellationToken,
) {
    let mut inflight = FuturesOrdered::new();
    let max_inflight = 4_096;
    let mut order = DeviceOrder::default();
    loop {
        tokio::select! {
            biased;
            Some((broker, publish, _fate)) = inflight.next(), if !inflight.is_empty() => {
                let (broker, publish): (usize, Publish) = (broker, publish);
                // A message abandoned at shutdown is not acknowledged: the broker redelivers it.
                if cancel.is_cancelled() {
                    break;
                }
                // Acknowledged on the connection it came from.
                if let Err(e) = clients[broker].ack(&publish).await {
                    tracing::warn!(error = %e, "puback failed");
                }
            }
            p = rx.recv(), if inflight.len() < max_inflight => match p {
                Some((broker, p)) => {
                    let s = shared.clone();
                    let c = cancel.clone();
                    let turn = parse_device_topic(&String::from_utf8_lossy(&p.topic)).map(|t| order.next(t.device_id));
                    inflight.push_back(async move {
                        let fate = handle(&s, &p, &c, turn).await;
                        (broker, p, fate)
                    });
                }
                None => break,
            },
            _ = cancel.cancelled() => break,
        }
    }
}

async fn handle(s: &Arc<Shared>, p: &Publish, cancel: &CancellationToken, turn: Option<(Option<Turn>, TurnDone)>) -> Fate {
    let (previous, done) = turn.unzip();
    let started = Instant::now();
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    let Some(t) = parse_device_topic(&topic) else {
        return dead_letter(s, &topic, "bad_topic", "not a device topic", &p.payload, cancel).await;
    };
    s.metrics.messages_in.with_label_values(&[t.channel.as_str()]).inc();
    let owner = loop {
        match s.registry.owner(t.device_id).await {
            Ok(o) => break o,
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup failed, retrying");
                s.metrics.errors.with_label_values(&["registry"]).inc();
                if sleep_or_cancel(cancel, Duration::from_millis(500)).await {
                    return Fate::Dropped;
                }
            }
        }
    };
    let Some(owner) = owner else {
        s.metrics.errors.with_label_values(&["unknown_device"]).inc();
        return Fate::Dropped;
    };
    if owner.household_id != t.household_id {
        tracing::warn!(device = %t.device_id, claimed = %t.household_id, "report names a household that does not own the device");
        s.metrics.errors.with_label_values(&["foreign_household"]).inc();
        return Fate::Dropped;
    }
    if s.device_rate.check_key(&t.device_id).is_err() {
        s.metrics.errors.with_label_values(&["device_rate_limited"]).inc();
        return Fate::Dropped;
    }
    // Parsed once: the published schema first (its reason is what device
    // makers see), then the typed decoder on the same parsed value (it
    // agrees with the schema; schema.rs tests that).
    let decoded = if t.channel == Channel::Cmd || p.payload.len() > MAX_PAYLOAD_BYTES {
        decode_device_message(owner.kind, t.channel, &p.payload).map_err(|e| (e.kind(), e.to_string()))
    } else {
        serde_json::from_slice::<serde_json::Value>(&p.payload)
            .map_err(|e| ("malformed", format!("malformed JSON body: {e}")))
            .and_then(|body| s.schemas.check(owner.kind, t.channel, &body).map(|()| body).map_err(|r| ("schema", r)))
            .and_then(|body| decode_device_value(owner.kind, t.channel, body).map_err(|e| (e.kind(), e.to_string())))
    };
    let msg = match decoded {
        Ok(m) => m,
        Err((kind, reason)) => return dead_letter(s, &topic, kind, &reason, &p.payload, cancel).await,
    };
    // An ack of a command this device was never sent is dropped: it would
    // only make rows and changes for nothing.
    if let DeviceMessage::Ack(a) = &msg {
        if !crate::deliver::knows_command(s, a.command_id, t.device_id).await {
            s.metrics.errors.with_label_values(&["unknown_command_ack"]).inc();
            return Fate::Dropped;
        }
    }
    let event = match msg {
        DeviceMessage::State(m) => Event::DeviceStateReported(DeviceStateReported {
            device_id: t.device_id,
            seq: m.seq,
            device_ts: m.ts,
            state: m.state,
            battery: m.battery,
        }),
        DeviceMessage::Ack(m) => Event::DeviceCommandAcked(DeviceCommandAcked {
            command_id: m.command_id,
            device_id: t.device_id,
            status: m.status,
            reason: m.reason,
        }),
        DeviceMessage::Status(m) => {
            Event::DeviceStatusChanged(DeviceStatusChanged { device_id: t.device_id, online: m.status == Presence::Online })
        }
    };
    let mut envelope = Envelope::new(t.household_id, Actor::Device(t.device_id), &event, Utc::now());
    if let Event::DeviceCommandAcked(a) = &event {
        envelope = envelope.with_correlation(a.command_id);
    }
    let telemetry = s.topics.telemetry();
    if let Some(Some(previous)) = previous {
        let _ = previous.await;
    }
    // An ack holds its device's next message until it is in the log, even
    // through retries: the report that follows an ack must land after it
    // (the twin confirms by that order). Other messages pass the turn on
    // once they are queued.
    // While appends are failing, every message holds it: retries must not
    // overtake one another.
    let hold = matches!(event, Event::DeviceCommandAcked(_)) || s.appends_failing.recently();
    if append_in_turn(s, &telemetry, &envelope, cancel, done, hold).await.is_none() {
        return Fate::Dropped;
    }
    s.metrics.messages_out.with_label_values(&["telemetry"]).inc();
    s.metrics.latency.with_label_values(&["report_appended"]).observe(started.elapsed().as_secs_f64());
    // Online again: what was sent while it was away goes out now.
    if matches!(event, Event::DeviceStatusChanged(DeviceStatusChanged { online: true, .. })) {
        crate::deliver::request_flush(s.clone(), t.household_id, t.device_id);
    }
    Fate::Appended
}

/// Appends, retrying with backoff while Kafka refuses, and gives the
/// device's next message its turn as soon as this one is queued in the
/// producer (which keeps the order): one device's messages keep their order
/// without waiting for each other's acknowledgements — or, with `hold`, only
/// once this one is in the log, so a failed and retried append cannot land
/// after the next. `None` only when shutting down (the message is not
/// acknowledged; the broker redelivers it).
async fn append_in_turn(
    s: &Shared,
    topic: &str,
    envelope: &Envelope,
    cancel: &CancellationToken,
    mut turn: Option<TurnDone>,
    hold: bool,
) -> Option<homelink_kit::kafka::Position> {
    let mut backoff = Backoff::default();
    loop {
        let outcome = match s.appender.enqueue(topic, envelope) {
            Ok(delivery) => {
                if !hold {
                    drop(turn.take());
                }
                delivery.await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(p) => return Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "append failed, retrying");
                s.metrics.errors.with_label_values(&["kafka_produce"]).inc();
                s.appends_failing.now();
                if !backoff.pause(cancel).await {
                    return None;
                }
            }
        }
    }
}

async fn dead_letter(s: &Shared, topic: &str, kind: &str, reason: &str, payload: &[u8], cancel: &CancellationToken) -> Fate {
    s.metrics.errors.with_label_values(&[&format!("invalid_{kind}")]).inc();
    let shown = String::from_utf8_lossy(&payload[..payload.len().min(4096)]).into_owned();
    let record = json!({
        "at": Utc::now(),
        "source": "mqtt",
        "mqttTopic": topic,
        "reason": kind,
        "detail": reason,
        "payloadBytes": payload.len(),
        "payload": shown,
    });
    let body = serde_json::to_vec(&record).unwrap_or_default();
    let mut backoff = Backoff::default();
    loop {
        match s.appender.append_raw(&s.topics.dead_letter(), "mqtt", &body).await {
            Ok(_) => {
                s.metrics.messages_out.with_label_values(&["dead_letter"]).inc();
                return Fate::DeadLettered;
            }
            Err(e) => {
                tracing::warn!(error = %e, "dead-letter append failed, retrying");
                if !backoff.pause(cancel).await {
                    return Fate::Dropped;
                }
            }
        }
    }
}

/// Sleeps; `true` when cancelled first.
pub(crate) async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_hundred_thousand_devices_keep_the_turn_map_small() {
        let mut order = DeviceOrder::default();
        for _ in 0..100_000 {
            let (previous, done) = order.next(uuid::Uuid::new_v4());
            assert!(previous.is_none());
            drop(done);
        }
        assert!(order.len() <= DeviceOrder::SWEEP_FROM, "{} turns kept", order.len());
    }

    #[test]
    fn a_pending_turn_survives_a_sweep_and_is_given_when_done() {
        let mut order = DeviceOrder::default();
        let lock = uuid::Uuid::new_v4();
        let (_, pending) = order.next(lock);
        for _ in 0..(3 * DeviceOrder::SWEEP_FROM) {
            drop(order.next(uuid::Uuid::new_v4()).1);
        }
        let (previous, _next) = order.next(lock);
        let previous = previous.expect("the lock's previous message still holds the turn");
        assert!(previous.clone().now_or_never().is_none(), "not given before it is done");
        drop(pending);
        assert!(previous.now_or_never().is_some(), "given once done");
    }
}
