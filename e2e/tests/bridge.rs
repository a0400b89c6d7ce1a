//! The bridge's checks, through the real broker: a report whose topic names a
//! household that does not own the device is dropped and counted; an invalid
//! payload goes to the dead-letter topic with its reason.

mod common;

use common::{eventually, light_and_sensor, publish_as, state, Stack};
use homelink_tools::sim;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_naming_a_household_that_does_not_own_the_device_is_dropped_and_counted() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let other = stack.seed(&light_and_sensor()).await;
    let spec = common::spec(&home, 0, None);
    let light = spec.device_id;

    // The broker's ACL lets the device write under its own id in any household tree; the bridge must refuse.
    publish_as(&stack, &spec, format!("home/{}/device/{light}/state", other.household_id), state(5, 11)).await;
    // Then a valid report on its own topic, which must be applied.
    publish_as(&stack, &spec, format!("home/{}/device/{light}/state", home.household_id), state(6, 66)).await;

    let pool = stack.pool.clone();
    let reported: Value = eventually(Duration::from_secs(30), "the valid report applied", || async {
        sqlx::query_scalar("SELECT reported FROM device_shadows WHERE device_id = $1")
            .bind(light)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(reported["brightness"], 66);
    let seq: i64 =
        sqlx::query_scalar("SELECT seq FROM device_shadows WHERE device_id = $1").bind(light).fetch_one(&pool).await.expect("seq");
    assert_eq!(seq, 6);
    let households: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT household_id FROM device_shadows").fetch_all(&pool).await.expect("rows");
    assert_eq!(households, vec![home.household_id], "nothing was written for the other household");
    assert_eq!(stack.metric(stack.bridge_port, "homelink_bridge_errors_total{kind=\"foreign_household\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_payloads_go_to_the_dead_letter_topic_with_a_reason_and_the_bridge_keeps_running() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let spec = common::spec(&home, 0, None);
    let topic = format!("home/{}/device/{}/state", home.household_id, spec.device_id);

    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "malformed"),
        (serde_json::to_vec(&json!({"v": 1, "seq": u64::MAX, "state": {}})).expect("json"), "schema"),
        (state(1, 900), "schema"),
        (deep.into_bytes(), "malformed"),
        (vec![b' '; 20_000], "too_large"),
    ];
    for (payload, _) in &bad {
        publish_as(&stack, &spec, topic.clone(), payload.clone()).await;
    }
    publish_as(&stack, &spec, topic.clone(), state(7, 70)).await;

    let pool = stack.pool.clone();
    let seq: i64 = eventually(Duration::from_secs(30), "the valid report applied after the bad ones", || async {
        sqlx::query_scalar("SELECT seq FROM device_shadows WHERE device_id = $1")
            .bind(spec.device_id)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(seq, 7);
    assert_eq!(stack.metric(stack.bridge_port, "homelink_bridge_messages_out_total{kind=\"dead_letter\"}").await, bad.len() as f64);

    let consumer: StreamConsumer =
        homelink_kit::kafka::consumer(&stack.env.kafka, &format!("dlq-{}", uuid::Uuid::new_v4()), Duration::from_millis(100))
            .expect("consumer");
    consumer.subscribe(&[&stack.topics.dead_letter()]).expect("subscribe");
    let mut reasons = Vec::new();
    while reasons.len() < bad.len() {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("dead-letter record").expect("kafka");
        let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).expect("dead-letter json");
        assert_eq!(v["mqttTopic"], topic);
        if v["reason"] == "schema" {
            // The reason names the published schema and where the body breaks it.
            assert!(v["detail"].as_str().is_some_and(|d| d.starts_with("state.light.v1: at /")), "{v}");
        }
        reasons.push(v["reason"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(stack.metric(stack.bridge_port, "homelink_bridge_errors_total{kind=\"invalid_schema\"}").await, 2.0);
    let mut expected: Vec<String> = bad.iter().map(|(_, r)| (*r).to_owned()).collect();
    expected.sort();
    reasons.sort();
    assert_eq!(reasons, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bridges_in_one_shared_subscription_split_the_reports_and_each_is_appended_once() {
    let stack = Stack::start().await;
    let second = common::spawn_bridge(&stack.env, &stack.topics, &stack.db_url, &stack.share_group, &stack.cancel).await;
    let http = stack.http.clone();
    eventually(Duration::from_secs(30), "second bridge ready", || {
        let http = http.clone();
        async move { http.get(format!("http://127.0.0.1:{second}/readyz")).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    let home = stack.seed(&light_and_sensor()).await;
    let spec = common::spec(&home, 0, None);
    let topic = format!("home/{}/device/{}/state", home.household_id, spec.device_id);

    // One connection, 40 reports, every PUBACK awaited, then a clean DISCONNECT (no last will).
    const N: u64 = 40;
    let (client, mut ev) = AsyncClient::new(sim::mqtt_options(&spec, &stack.env.target()), 64);
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ev.poll().await.expect("device connection") {
                Event::Incoming(Packet::ConnAck(_)) => {
                    for seq in 1..=N {
                        client.publish(topic.clone(), QoS::AtLeastOnce, false, state(seq, (seq % 100) as i64)).await.expect("publish");
                    }
                }
                Event::Incoming(Packet::PubAck(_)) => {
                    acked += 1;
                    if acked == N {
                        return;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("all reports acknowledged");
    client.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while ev.poll().await.is_ok() {} }).await;

    let pool = stack.pool.clone();
    stack.wait_applied("DeviceStateReported", N as i64, Duration::from_secs(30)).await;
    let series = "homelink_bridge_messages_out_total{kind=\"telemetry\"}";
    let (a, b) = (stack.metric(stack.bridge_port, series).await, stack.metric(second, series).await);
    assert_eq!(a + b, N as f64, "each report appended exactly once across the two bridges");
    assert!(a > 0.0 && b > 0.0, "both bridges took a share ({a} / {b})");
    let seq: i64 =
        sqlx::query_scalar("SELECT seq FROM device_shadows WHERE device_id = $1").bind(spec.device_id).fetch_one(&pool).await.expect("seq");
    assert_eq!(seq, N as i64);
}
