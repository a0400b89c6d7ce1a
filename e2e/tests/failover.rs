//! Failover on a real cluster: three Apache Kafka brokers (KRaft, every
//! topic with three copies, `min.insync.replicas` 2, unclean leader election
//! off). Under reports from MQTT devices and a stream of taps, the broker
//! leading the household's telemetry partition is killed with SIGKILL, then
//! (restarted and caught up) the one leading its commands partition: writes
//! answer 503 at most while the partition elects a new leader and recover by
//! themselves; every report the broker acknowledged to a device and every
//! command answered 202 is in the log and in the read models afterwards; the
//! killed broker restarts and catches up.

mod common;

use common::{counting_connection, eventually, light_and_sensor, Env, PrivateKafka, Stack};
use homelink_events::{Envelope, Event};
use homelink_tools::seed::SeededHousehold;
use homelink_tools::sim;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Every envelope of `topic`'s `partition`, read from the log's start to its end.
fn read_partition(bootstrap: &str, topic: &str, partition: i32) -> Vec<Envelope> {
    let c: BaseConsumer = homelink_kit::kafka::client_config(bootstrap)
        .set("group.id", format!("failover-check-{}", Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let (_, high) = c.fetch_watermarks(topic, partition, Duration::from_secs(10)).expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning).expect("partition");
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    while next < high {
        assert!(Instant::now() < deadline, "{topic}/{partition}: read {next} of {high} records");
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            let m = m.expect("record");
            next = m.offset() + 1;
            out.push(Envelope::from_json(m.payload().unwrap_or_default()).expect("envelope"));
        }
    }
    out
}

/// What the taps got: command ids answered 202, and when a tap got anything else.
#[derive(Default)]
struct Taps {
    accepted: Vec<Uuid>,
    refused: Vec<(Instant, u16)>,
}

/// Taps the light every 100 ms until `stop`; every answer is recorded.
fn tap_continuously(
    stack: &Stack,
    home: &SeededHousehold,
    light: Uuid,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Taps>>, tokio::task::JoinHandle<()>) {
    let taps = Arc::new(Mutex::new(Taps::default()));
    let (t, request) = (taps.clone(), stack.command(home, light));
    let task = tokio::spawn(async move {
        let mut on = false;
        while !stop.load(Ordering::SeqCst) {
            on = !on;
            let r = request.try_clone().expect("request").json(&json!({"set": {"on": on}})).timeout(Duration::from_secs(10)).send().await;
            let now = Instant::now();
            match r {
                Ok(r) if r.status() == 202 => {
                    let body: serde_json::Value = r.json().await.expect("accepted body");
                    let id = body["commandId"].as_str().and_then(|s| s.parse().ok()).expect("commandId");
                    t.lock().unwrap_or_else(|e| e.into_inner()).accepted.push(id);
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    if status == 503 {
                        assert_eq!(r.headers()["content-type"], "application/problem+json");
                    }
                    t.lock().unwrap_or_else(|e| e.into_inner()).refused.push((now, status));
                }
                Err(e) => panic!("a tap got no answer while a broker was away: {e}"),
            }
            // Four taps a second: under the per-device limit (5/s), so every
            // answer is the write path's, never the limiter's 429.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    (taps, task)
}

/// Kills the broker leading `topic`'s `partition` under load, waits until
/// writes are accepted again, restarts it and waits until it is back in
/// sync. Returns the node killed.
async fn kill_leader_and_recover(kafka: &mut PrivateKafka, topic: &str, partition: i32, taps: &Mutex<Taps>) -> usize {
    let leader = kafka.leader_of(topic, partition).expect("a leader");
    let killed_at = Instant::now();
    kafka.kill_node(leader);
    eprintln!("failover: killed node {leader} leading {topic}/{partition}");
    // A new leader takes over without any restart of ours.
    eventually(Duration::from_secs(60), "another broker leads the partition", || async {
        kafka.leader_of(topic, partition).filter(|l| *l != leader).map(|_| ())
    })
    .await;
    let accepted = taps.lock().unwrap_or_else(|e| e.into_inner()).accepted.len();
    eventually(Duration::from_secs(60), "taps accepted again", || async {
        (taps.lock().unwrap_or_else(|e| e.into_inner()).accepted.len() > accepted + 3).then_some(())
    })
    .await;
    eprintln!("failover: taps accepted again {:?} after the kill", killed_at.elapsed());
    kafka.restart_node(leader);
    eventually(Duration::from_secs(120), "the restarted broker back in sync", || async {
        (kafka.in_sync(topic, partition) == Some(3)).then_some(())
    })
    .await;
    eprintln!("failover: node {leader} in sync again {:?} after the kill", killed_at.elapsed());
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leading_broker_loses_no_acknowledged_report_and_no_accepted_command() {
    let mut kafka = PrivateKafka::cluster(3);
    let stack = Stack::start_on(Env::from_env().on_kafka(&kafka)).await;
    let home = stack.seed(&light_and_sensor()).await;
    let (light, sensor) = (common::spec(&home, 0, None), common::spec(&home, 1, None));
    // The same partition number in every topic: one key, one partition count.
    let partition: i32 = sqlx::query_scalar("SELECT log_partition FROM households WHERE household_id = $1")
        .bind(home.household_id)
        .fetch_one(&stack.pool)
        .await
        .expect("the household's partition");
    let (telemetry, commands) = (stack.topics.telemetry(), stack.topics.commands());

    // Load: both devices report every 20 ms, counting the PUBACKs their broker sends.
    let stop = Arc::new(AtomicBool::new(false));
    let mut reporters = Vec::new();
    for (spec, body) in [
        (&light, (|seq: u64| json!({"v": 1, "seq": seq, "state": {"brightness": seq % 101}})) as fn(u64) -> serde_json::Value),
        (&sensor, |seq: u64| json!({"v": 1, "seq": seq, "state": {"temperature": (seq % 50) as f64 / 2.0}})),
    ] {
        let (client, acked) = counting_connection(sim::mqtt_options(spec, &stack.env.target()), 1024).await;
        let topic = format!("home/{}/device/{}/state", home.household_id, spec.device_id);
        let (stop, sent) = (stop.clone(), Arc::new(AtomicU64::new(0)));
        let s = sent.clone();
        reporters.push((
            spec.device_id,
            acked,
            sent,
            tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::SeqCst) {
                    seq += 1;
                    client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, serde_json::to_vec(&body(seq)).expect("json"))
                        .await
                        .expect("publish");
                    s.store(seq, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                client
            }),
        ));
    }
    let (taps, tapping) = tap_continuously(&stack, &home, light.device_id, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let first = kill_leader_and_recover(&mut kafka, &telemetry, partition, &taps).await;
    // The commands partition's leader now (the first kill may have moved it).
    let second = kill_leader_and_recover(&mut kafka, &commands, partition, &taps).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let _ = tapping.await;
    let mut devices = Vec::new();
    for (device, acked, sent, task) in reporters {
        let client = task.await.expect("reporter");
        let n = sent.load(Ordering::SeqCst);
        eventually(Duration::from_secs(30), "the broker acknowledged every report", || async {
            (acked.load(Ordering::SeqCst) == n).then_some(())
        })
        .await;
        let _ = client.disconnect().await;
        devices.push((device, n));
    }

    let taps = std::mem::take(&mut *taps.lock().unwrap_or_else(|e| e.into_inner()));
    let statuses: HashSet<u16> = taps.refused.iter().map(|(_, s)| *s).collect();
    assert!(statuses.is_subset(&HashSet::from([503])), "a write during failover answers 202 or 503, got {statuses:?}");
    let window = match (taps.refused.first(), taps.refused.last()) {
        (Some((a, _)), Some((b, _))) => b.duration_since(*a),
        _ => Duration::ZERO,
    };
    eprintln!(
        "failover: nodes {first} and {second} killed; {} taps accepted, {} answered 503 over {window:?}",
        taps.accepted.len(),
        taps.refused.len()
    );
    assert!(taps.accepted.len() > 20, "taps were accepted throughout: {}", taps.accepted.len());

    // Every acknowledged report is in the log, and the shadows hold the last ones.
    let bootstrap = kafka.bootstrap();
    let (t, b) = (telemetry.clone(), bootstrap.clone());
    let logged = tokio::task::spawn_blocking(move || read_partition(&b, &t, partition)).await.expect("read telemetry");
    for (device, n) in &devices {
        let seqs: HashSet<u64> = logged
            .iter()
            .filter_map(|e| match e.event() {
                Ok(Event::DeviceStateReported(r)) if r.device_id == *device => Some(r.seq),
                _ => None,
            })
            .collect();
        let missing: Vec<u64> = (1..=*n).filter(|s| !seqs.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "device {device}: {} of {n} reports not in the log, first {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        eventually(Duration::from_secs(60), "the shadow holds the last report", || async {
            let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM device_shadows WHERE device_id = $1")
                .bind(device)
                .fetch_optional(&stack.pool)
                .await
                .ok()?;
            (seq == Some(*n as i64)).then_some(())
        })
        .await;
    }
    // Every accepted command is in the log and in the read model.
    let (t, b) = (commands.clone(), bootstrap.clone());
    let logged = tokio::task::spawn_blocking(move || read_partition(&b, &t, partition)).await.expect("read commands");
    let in_log: HashSet<Uuid> = logged
        .iter()
        .filter_map(|e| match e.event() {
            Ok(Event::DeviceCommandRequested(c)) => Some(c.command_id),
            _ => None,
        })
        .collect();
    let lost: Vec<&Uuid> = taps.accepted.iter().filter(|id| !in_log.contains(id)).collect();
    assert!(lost.is_empty(), "{} accepted commands are not in the log: {lost:?}", lost.len());
    let accepted = taps.accepted.clone();
    eventually(Duration::from_secs(60), "every accepted command in the read model", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands WHERE command_id = ANY($1)")
            .bind(&accepted)
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (n == accepted.len() as i64).then_some(())
    })
    .await;
    // Both restarted brokers hold every partition of the household again.
    for topic in [&telemetry, &commands] {
        assert_eq!(kafka.in_sync(topic, partition), Some(3), "{topic}/{partition} has three replicas in sync");
    }
}
