//! Kafka → device. Requested commands arrive by two paths: pushed by
//! command-api right after its append was acknowledged (fast), and from the
//! commands topic through a consumer group (catch-up after a restart or a
//! failed push). Both end in [`Deliverer::deliver`], which skips expired and
//! already-delivered commands and publishes the `cmd` message (QoS 1).
//! Devices also ignore a `commandId` they have handled, so the two paths
//! together deliver at least once and act once.

use crate::Shared;
use chrono::Utc;
use futures::StreamExt;
use homelink_events::event::DeviceCommandRequested;
use homelink_events::protocol::{device_topic, Channel, CmdMsg, PROTOCOL_VERSION};
use homelink_events::{Envelope, Event};
use homelink_kit::shutdown::CancellationToken;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

const REMEMBERED: usize = 100_000;

/// Publishes commands to devices, each at most once per bridge.
pub struct Deliverer {
    /// One per broker, in the deployment's broker order.
    clients: Vec<AsyncClient>,
    seen: Mutex<(HashSet<Uuid>, VecDeque<Uuid>)>,
}

/// What became of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Published,
    Duplicate,
    Expired,
    NotACommand,
}

impl Deliverer {
    pub fn new(clients: Vec<AsyncClient>) -> Self {
        Self { clients, seen: Mutex::new((HashSet::new(), VecDeque::new())) }
    }

    fn first_time(&self, id: Uuid) -> bool {
        let mut g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *g;
        if !set.insert(id) {
            return false;
        }
        order.push_back(id);
        if order.len() > REMEMBERED {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
    }

    /// Publishes the command in `envelope` on the device's broker (`None`,
    /// or a broker this bridge does not know: on every broker; a broker
    /// where the device is not connected drops it) unless it expired or
    /// went out already.
    pub async fn deliver(&self, envelope: &Envelope, broker: Option<u16>) -> Result<Delivery, rumqttc::v5::ClientError> {
        let Ok(Event::DeviceCommandRequested(DeviceCommandRequested { command_id, device_id, set, expires_at })) = envelope.event() else {
            return Ok(Delivery::NotACommand);
        };
        if expires_at <= Utc::now() {
            return Ok(Delivery::Expired);
        }
        if !self.first_time(command_id) {
            return Ok(Delivery::Duplicate);
        }
        let msg = CmdMsg { v: PROTOCOL_VERSION, command_id, set, expires_at };
        let body = serde_json::to_vec(&msg).unwrap_or_default();
        let topic = device_topic(envelope.household_id, device_id, Channel::Cmd);
        match broker.and_then(|b| self.clients.get(b as usize)) {
            Some(client) => client.publish(topic, QoS::AtLeastOnce, false, body).await?,
            None => {
                for client in &self.clients {
                    client.publish(topic.clone(), QoS::AtLeastOnce, false, body.clone()).await?;
                }
            }
        }
        Ok(Delivery::Published)
    }
}

/// Delivers one envelope and counts the outcome under `path`.
pub(crate) async fn deliver_counted(s: &Shared, envelope: &Envelope, path: &str) {
    s.metrics.messages_in.with_label_values(&[path]).inc();
    let started = std::time::Instant::now();
    let broker = match envelope.event() {
        Ok(Event::DeviceCommandRequested(c)) => match s.registry.owner(c.device_id).await {
            Ok(Some(owner)) => Some(owner.broker),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup for a command failed; publishing on every broker");
                None
            }
        },
        _ => None,
    };
    match s.deliverer.deliver(envelope, broker).await {
        Ok(Delivery::Published) => {
            s.metrics.messages_out.with_label_values(&["cmd"]).inc();
            s.metrics.latency.with_label_values(&["command_publish"]).observe(started.elapsed().as_secs_f64());
        }
        Ok(Delivery::Duplicate) => s.metrics.errors.with_label_values(&["command_duplicate"]).inc(),
        Ok(Delivery::Expired) => s.metrics.errors.with_label_values(&["command_expired"]).inc(),
        Ok(Delivery::NotACommand) => s.metrics.errors.with_label_values(&["not_a_command"]).inc(),
        Err(e) => {
            tracing::warn!(error = %e, "publishing a command failed");
            s.metrics.errors.with_label_values(&["command_publish"]).inc();
        }
    }
}

/// The catch-up path: the commands topic through a consumer group, offsets
/// committed to Kafka after the commands were handed to the MQTT client.
pub(crate) async fn catch_up(s: std::sync::Arc<Shared>, consumer: StreamConsumer, cancel: CancellationToken) {
    let consumer = std::sync::Arc::new(consumer);
    let c = consumer.clone();
    let lag = tokio::spawn(homelink_kit::kafka::report_lag(
        consumer.clone(),
        move || homelink_kit::kafka::positions(&c),
        s.metrics.clone(),
        cancel.clone(),
    ));
    let mut stream = consumer.stream();
    loop {
        let m = tokio::select! {
            _ = cancel.cancelled() => break,
            m = stream.next() => m,
        };
        let Some(m) = m else { break };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "commands consumer error");
                s.metrics.errors.with_label_values(&["kafka_consume"]).inc();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match Envelope::from_json(m.payload().unwrap_or_default()) {
            Ok(env) => deliver_counted(&s, &env, "command_log").await,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable command record skipped");
                s.metrics.errors.with_label_values(&["undecodable_record"]).inc();
            }
        }
        if let Err(e) = consumer.commit_message(&m, CommitMode::Async) {
            tracing::debug!(error = %e, "commit failed");
        }
    }
    lag.abort();
}
