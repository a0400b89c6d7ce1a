//! A device driven by a test: raw MQTT, it subscribes to its `cmd` topic,
//! says it is online, and hands every command it receives to the test.
#![allow(dead_code)]

use super::Stack;
use homelink_tools::sim::DeviceSpec;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A device driven by the test: it subscribes to its `cmd` topic, then says
/// it is online (retained), and hands every command it receives to the test.
pub struct RawDevice {
    pub client: AsyncClient,
    pub commands: mpsc::UnboundedReceiver<Value>,
    freeze: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    pub spec: DeviceSpec,
}

pub fn topic(spec: &DeviceSpec, channel: &str) -> String {
    format!("home/{}/device/{}/{channel}", spec.household_id, spec.device_id)
}

impl RawDevice {
    pub async fn connect(stack: &Stack, spec: DeviceSpec, keep_alive: Duration) -> Self {
        let target = homelink_tools::sim::Target { port: spec.port.unwrap_or(stack.env.target().port), ..stack.env.target() };
        let mut o =
            homelink_tools::sim::device_options(spec.household_id, spec.device_id, &spec.cert_pem, &spec.key_pem, &target, keep_alive);
        let offline = serde_json::to_vec(&json!({"v": 1, "status": "offline"})).expect("json");
        o.set_last_will(LastWill::new(topic(&spec, "status"), offline, QoS::AtLeastOnce, true, None));
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, commands) = mpsc::unbounded_channel();
        let (freeze_tx, mut freeze) = oneshot::channel::<()>();
        let (ready_tx, ready) = oneshot::channel::<()>();
        let (c, s) = (client.clone(), spec.clone());
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                tokio::select! {
                    _ = &mut freeze => {
                        // Stops talking without closing the socket: a stopped process, not a FIN.
                        let _kept_open = eventloop;
                        std::future::pending::<()>().await;
                        return;
                    }
                    ev = eventloop.poll() => match ev {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = c.subscribe(topic(&s, "cmd"), QoS::AtLeastOnce).await;
                            let online = serde_json::to_vec(&json!({"v": 1, "status": "online"})).expect("json");
                            let _ = c.publish(topic(&s, "status"), QoS::AtLeastOnce, true, online).await;
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready_tx.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                                let _ = tx.send(v);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready).await.expect("device connected").expect("device task");
        Self { client, commands, freeze: Some(freeze_tx), task, spec }
    }

    pub async fn send(&self, channel: &str, body: Value) {
        self.client
            .publish(topic(&self.spec, channel), QoS::AtLeastOnce, false, serde_json::to_vec(&body).expect("json"))
            .await
            .expect("publish");
    }

    /// Every command that arrives within `wait`.
    pub async fn commands_within(&mut self, wait: Duration) -> Vec<Value> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(c)) = tokio::time::timeout_at(deadline, self.commands.recv()).await {
            got.push(c);
        }
        got
    }

    pub fn freeze(&mut self) {
        if let Some(f) = self.freeze.take() {
            let _ = f.send(());
        }
    }
}

impl Drop for RawDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}
