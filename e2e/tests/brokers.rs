//! Several MQTT brokers in one deployment (one Mosquitto process holds about
//! 20,000 devices here): each new device is assigned one broker at
//! registration, the bridge subscribes on every broker, and a command goes
//! out on the broker its device was assigned.

mod common;

use common::{eventually, spec, Stack};
use homelink_events::DeviceKind;
use homelink_kit::shutdown::CancellationToken;
use homelink_tools::sim::{self, Observed};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_spread_over_every_broker_report_and_get_their_commands() {
    let stack = Stack::start_on_all_brokers().await;
    let ports = stack.env.device_ports.clone();
    assert!(ports.len() >= 2, "the test stack runs several brokers ({ports:?})");
    // Assignment is by device id: enough lights that every broker has some
    // (the chance that 16 miss one of two brokers is 2^-15).
    let lights: Vec<(DeviceKind, &str, &str)> = (0..16).map(|_| (DeviceKind::Light, "Lamp", "Hall")).collect();
    let home = stack.seed(&lights).await;
    let assigned: Vec<u16> = home.devices.iter().map(|d| d.mqtt_port.expect("the registration names a broker")).collect();
    let used: BTreeSet<u16> = assigned.iter().copied().collect();
    assert_eq!(used, ports.iter().copied().collect::<BTreeSet<u16>>(), "every broker got devices, no other port was handed out");
    // The read model keeps the assignment (the bridge routes commands by it).
    for (d, port) in home.devices.iter().zip(&assigned) {
        let broker: i16 = sqlx::query_scalar("SELECT broker FROM devices WHERE device_id = $1")
            .bind(d.id)
            .fetch_one(&stack.pool)
            .await
            .expect("device row");
        assert_eq!(ports[broker as usize], *port, "device {} registered on broker {broker}", d.id);
    }

    // Every device connects to its broker and reports: all shadows fill in.
    let devices = CancellationToken::new();
    let _stop = devices.clone().drop_guard();
    let mut observers = Vec::new();
    for i in 0..home.devices.len() {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(sim::run(spec(&home, i, None), stack.env.target(), Some(tx), devices.clone()));
        observers.push(rx);
    }
    let token = home.accounts[0].access_token.clone();
    let q = "query($h: ID!) { household(id: $h) { devices(first: 50) { nodes { id shadow { online seq } } } } }";
    eventually(Duration::from_secs(60), "every device online with a report", || async {
        let v = stack.gql(&token, q, json!({"h": home.household_id})).await;
        let nodes = v["data"]["household"]["devices"]["nodes"].as_array()?.clone();
        (nodes.len() == home.devices.len() && nodes.iter().all(|n| n["shadow"]["online"] == true && n["shadow"]["seq"].as_i64() > Some(0)))
            .then_some(())
    })
    .await;

    // One command to a device of each broker: each arrives, on its device only.
    for port in &ports {
        let i = assigned.iter().position(|p| p == port).expect("a device on this broker");
        let device = home.devices[i].id;
        let r = stack.command(&home, device).json(&json!({"set": {"brightness": 42}})).send().await.expect("post command");
        assert_eq!(r.status(), 202);
        let accepted: Value = r.json().await.expect("json");
        let command_id: Uuid = accepted["commandId"].as_str().and_then(|s| s.parse().ok()).expect("commandId");
        let got = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(o) = observers[i].recv().await {
                if let Observed::Command { command_id: c, .. } = o {
                    return Some(c);
                }
            }
            None
        })
        .await
        .unwrap_or_else(|_| panic!("the device on broker port {port} received no command within 30 s"));
        assert_eq!(got, Some(command_id), "the device on broker port {port} received its command");
    }
}
