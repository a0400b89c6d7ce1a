//! Faults: the Kafka broker goes down under the running services.

mod common;

use common::{counting_connection, eventually, light_and_sensor, Env, PrivateKafka, Stack};
use homelink_tools::sim;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_kafka_down_writes_get_503_reports_are_held_and_everything_resumes_without_loss() {
    let mut kafka = PrivateKafka::start();
    let mut env = Env::from_env();
    env.kafka = kafka.bootstrap();
    let stack = Stack::start_on(env).await;
    let home = stack.seed(&light_and_sensor()).await;
    let spec = common::spec(&home, 0, None);
    let topic = format!("home/{}/device/{}/state", home.household_id, spec.device_id);

    let (client, acked) = counting_connection(sim::mqtt_options(&spec, &stack.env.target()), 64).await;

    kafka.kill();

    // A write answers 503 with a problem document instead of hanging.
    let r = stack
        .command(&home, spec.device_id)
        .json(&json!({"set": {"on": true}}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer while Kafka is down");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // Reports published meanwhile: the broker acknowledges them to the device
    // and keeps them for the bridge, which does not acknowledge what Kafka has not taken.
    const N: u64 = 20;
    for seq in 1..=N {
        let body = serde_json::to_vec(&json!({"v": 1, "seq": seq, "state": {"brightness": seq}})).expect("json");
        client.publish(topic.clone(), QoS::AtLeastOnce, false, body).await.expect("publish");
    }
    eventually(Duration::from_secs(30), "the broker acknowledged every report", || async {
        (acked.load(Ordering::SeqCst) == N).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let telemetry = "homelink_bridge_messages_out_total{kind=\"telemetry\"}";
    assert_eq!(stack.metric(stack.bridge_port, telemetry).await, 0.0, "nothing appended while Kafka is down");

    kafka.restart();

    let pool = stack.pool.clone();
    stack.wait_applied("DeviceStateReported", N as i64, Duration::from_secs(60)).await;
    let seq: i64 =
        sqlx::query_scalar("SELECT seq FROM device_shadows WHERE device_id = $1").bind(spec.device_id).fetch_one(&pool).await.expect("seq");
    assert_eq!(seq, N as i64);

    // Writes are accepted again without restarting anything.
    eventually(Duration::from_secs(60), "a write accepted after the broker is back", || async {
        let r = stack.command(&home, spec.device_id).json(&json!({"set": {"on": true}})).send().await.ok()?;
        (r.status() == 202).then_some(())
    })
    .await;
}

/// A backlog larger than every queue inside the bridge (a stalled broker
/// while a fleet keeps reporting) drains once Kafka answers again: the
/// bridge keeps serving its MQTT connection, so its acknowledgements still
/// leave while reports wait for Kafka. Before, the connection's reader
/// blocked on the full hand-off queue, the acknowledgements behind it could
/// not be sent, and the bridge stopped for good (seen at 15,000 reports/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_larger_than_the_bridge_queues_drains_without_loss() {
    let kafka = PrivateKafka::start();
    // One device sends the whole backlog: far beyond a device's rate limit,
    // which is not what this test is about.
    let mut env = Env::from_env().device_rate(1_000_000, 1_000_000);
    env.kafka = kafka.bootstrap();
    let stack = Stack::start_on(env).await;
    let home = stack.seed(&light_and_sensor()).await;
    let spec = common::spec(&home, 0, None);
    let topic = format!("home/{}/device/{}/state", home.household_id, spec.device_id);
    let mut opts = sim::mqtt_options(&spec, &stack.env.target());
    opts.set_outgoing_inflight_upper_limit(256);
    let (client, acked) = counting_connection(opts, 1024).await;

    // Kafka stalls (no answer, no error) while 20,000 reports arrive: more
    // than the bridge holds in flight (4,096), in its hand-off queue (4,096)
    // and in its MQTT client's request queue (8,192) together.
    kafka.pause();
    const N: u64 = 20_000;
    for seq in 1..=N {
        let body = serde_json::to_vec(&json!({"v": 1, "seq": seq, "state": {"brightness": 1 + seq % 100}})).expect("json");
        client.publish(topic.clone(), QoS::AtLeastOnce, false, body).await.expect("publish");
    }
    eventually(Duration::from_secs(60), "the broker acknowledged every report", || async {
        (acked.load(Ordering::SeqCst) >= N).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    kafka.resume();

    // Every report reaches the log and the read model, each once.
    stack.wait_applied("DeviceStateReported", N as i64, Duration::from_secs(120)).await;
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM device_shadows WHERE device_id = $1")
        .bind(spec.device_id)
        .fetch_one(&stack.pool)
        .await
        .expect("seq");
    assert_eq!(seq, N as i64);
    let _ = client.disconnect().await;
}

/// A command the broker never acknowledged is not lost with the bridge: with
/// Mosquitto stopped, the bridge has the command (read from the log) but no
/// PUBACK; it is killed; once Mosquitto and a new bridge are
/// back, the device receives the command. (Before, the catch-up consumer
/// committed past a command as soon as it was queued for publishing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_the_broker_never_acknowledged_survives_a_bridge_crash() {
    use homelink_kit::shutdown::CancellationToken;
    use homelink_tools::sim::Observed;

    let mut broker = common::PrivateBroker::start();
    let mut env = Env::from_env();
    (env.device_port, env.bridge_port) = (broker.device_port, broker.bridge_port);
    let mut stack = Stack::start_on(env.bridge_as_process()).await;
    let home = stack.seed(&light_and_sensor()).await;
    let light = home.devices[0].id;
    let (tx, mut observed) = tokio::sync::mpsc::unbounded_channel();
    let devices = CancellationToken::new();
    let _stop = devices.clone().drop_guard();
    tokio::spawn(sim::run(common::spec(&home, 0, None), stack.env.target(), Some(tx), devices.clone()));
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(o) = observed.recv().await {
            if matches!(o, Observed::Connected { .. }) {
                return;
            }
        }
    })
    .await
    .expect("the light connected");

    broker.stop();
    let r = stack.command(&home, light).json(&json!({"set": {"brightness": 33}, "ttlSeconds": 300})).send().await.expect("post command");
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.expect("json");
    let command_id: uuid::Uuid = v["commandId"].as_str().and_then(|s| s.parse().ok()).expect("commandId");
    // Both paths reach the bridge: the push at once, then the catch-up
    // consumer reads the record. Neither can publish.
    let series = "homelink_bridge_messages_in_total{kind=\"command_log\"}";
    eventually(Duration::from_secs(60), "the catch-up consumer read the command", || async {
        (stack.metric(stack.bridge_port, series).await >= 1.0).then_some(())
    })
    .await;
    let bridge = stack.bridge_process.as_mut().expect("the bridge runs as a process");
    bridge.kill();
    broker.restart();
    bridge.restart();

    // The new bridge's consumer gets the commands partition once the group
    // has given up on the killed member (its session timeout).
    let got = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(o) = observed.recv().await {
            if let Observed::Command { command_id: c, .. } = o {
                if c == command_id {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(got, Ok(true), "the device received the command after the bridge crash");
}

/// With Kafka down, a device acks a command and reports its values: both
/// appends fail and are retried, and the report still lands after the ack,
/// so the command is confirmed once Kafka is back (an ack holds its device's
/// next message until it is in the log, issue 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ack_and_the_report_after_it_keep_their_order_through_a_kafka_outage() {
    let mut kafka = PrivateKafka::start();
    let mut env = Env::from_env();
    env.kafka = kafka.bootstrap();
    let stack = Stack::start_on(env).await;
    let home = stack.seed(&light_and_sensor()).await;
    let light = home.devices[0].id;
    let mut device = common::raw::RawDevice::connect(&stack, common::spec(&home, 0, None), Duration::from_secs(30)).await;
    let r = stack.command(&home, light).json(&json!({"set": {"brightness": 42}, "ttlSeconds": 300})).send().await.expect("command");
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.expect("json")["commandId"].as_str().expect("id").to_owned();
    let got = device.commands_within(Duration::from_secs(10)).await;
    assert!(got.iter().any(|c| c["commandId"] == id.as_str()), "{got:?}");
    // Wait until the delivery is recorded, so the only open steps are the device's.
    eventually(Duration::from_secs(20), "delivered", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands WHERE command_id = $1::uuid AND delivered_at IS NOT NULL")
            .bind(&id)
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;

    kafka.kill();
    device.send("ack", json!({"v": 1, "commandId": id, "status": "ok"})).await;
    device.send("state", json!({"v": 1, "seq": 1, "state": {"on": true, "brightness": 42}})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.restart();

    let status = eventually(Duration::from_secs(90), "confirmed after the outage", || async {
        let s: String = sqlx::query_scalar("SELECT status FROM device_commands WHERE command_id = $1::uuid")
            .bind(&id)
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (s == "confirmed").then_some(s)
    })
    .await;
    assert_eq!(status, "confirmed");
}
