//! Both data paths end to end, through the real broker, Postgres and Mosquitto:
//! a device's report reaching the app, and a tap reaching the device.

mod common;

use common::{eventually, light_and_sensor, next_matching, spec, Stack};
use homelink_kit::shutdown::CancellationToken;
use homelink_tools::sim::{self, Observed};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;

const CHANGES: &str = "subscription($h: ID!, $after: Int) { deviceChanges(householdId: $h, after: $after) { deviceId shadow { reported seq version online } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_report_reaches_the_shadow_the_query_and_the_subscription() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let light = home.devices[0].id;
    let mut sub = stack.subscribe_from_now(&home.accounts[0].access_token, CHANGES, json!({}), home.household_id).await;

    let devices = CancellationToken::new();
    for i in 0..home.devices.len() {
        tokio::spawn(sim::run(spec(&home, i, None), stack.env.target(), None, devices.clone()));
    }

    // The light reports its initial state on connect; the subscription shows it.
    let change = next_matching(&mut sub, "the light's first report", |v| {
        v["deviceChanges"]["deviceId"] == json!(light) && v["deviceChanges"]["shadow"]["reported"]["brightness"].is_number()
    })
    .await;
    assert_eq!(change["deviceChanges"]["shadow"]["reported"]["brightness"], 50);
    assert_eq!(change["deviceChanges"]["shadow"]["online"], true);

    // The query shows both devices' shadows.
    let q = "query($h: ID!) { household(id: $h) { name devices { nodes { id kind shadow { reported online } } } } }";
    let data = eventually(Duration::from_secs(30), "both shadows in the query", || async {
        let r = stack.gql(&home.accounts[0].access_token, q, json!({"h": home.household_id})).await;
        let devices = r["data"]["household"]["devices"]["nodes"].as_array()?.clone();
        // A device says `online` before its first report: wait for both.
        devices
            .iter()
            .all(|d| d["shadow"]["online"] == true && d["shadow"]["reported"].as_object().is_some_and(|m| !m.is_empty()))
            .then_some(devices)
    })
    .await;
    assert_eq!(data.len(), 2);
    let sensor = data.iter().find(|d| d["kind"] == "sensor").expect("sensor listed");
    assert_eq!(sensor["shadow"]["reported"]["contact"], true);

    // A device that goes away publishes `offline`; the subscription shows it.
    devices.cancel();
    next_matching(&mut sub, "the light offline", |v| {
        v["deviceChanges"]["deviceId"] == json!(light) && v["deviceChanges"]["shadow"]["online"] == false
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_reaches_the_device_and_its_new_state_comes_back_on_the_subscription() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let light = home.devices[0].id;
    let mut sub = stack.subscribe_from_now(&home.accounts[0].access_token, CHANGES, json!({}), home.household_id).await;

    let (tx, mut observed) = mpsc::unbounded_channel();
    let devices = CancellationToken::new();
    tokio::spawn(sim::run(spec(&home, 0, None), stack.env.target(), Some(tx), devices.clone()));
    next_matching(&mut sub, "the light online", |v| v["deviceChanges"]["deviceId"] == json!(light)).await;

    let r = stack.command(&home, light).json(&json!({"set": {"brightness": 77, "on": true}})).send().await.expect("post command");
    assert_eq!(r.status(), 202);
    let accepted: Value = r.json().await.expect("json");
    let command_id = accepted["commandId"].as_str().expect("commandId").to_owned();
    assert_eq!(accepted["status"], "requested");

    let got = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(o) = observed.recv().await {
            if let Observed::Command { command_id: c, .. } = o {
                return Some(c.to_string());
            }
        }
        None
    })
    .await
    .expect("the device received a command");
    assert_eq!(got.as_deref(), Some(command_id.as_str()));

    let change = next_matching(&mut sub, "the new state", |v| v["deviceChanges"]["shadow"]["reported"]["brightness"] == 77).await;
    assert_eq!(change["deviceChanges"]["shadow"]["reported"]["on"], true);

    // The device's ack (`ok`) and then its report of the values move the
    // command's lifecycle to `confirmed`.
    let q = "query($id: ID!) { command(id: $id) { status ackStatus deviceId set } }";
    let cmd = eventually(Duration::from_secs(30), "command acknowledged and confirmed", || async {
        let r = stack.gql(&home.accounts[0].access_token, q, json!({"id": command_id})).await;
        let c = &r["data"]["command"];
        // The ack and the request may be applied in either order; both end up in the row.
        (c["status"] == "confirmed" && c["ackStatus"] == "ok" && c["set"].is_object()).then(|| c.clone())
    })
    .await;
    assert_eq!(cmd["deviceId"], json!(light));
    assert_eq!(cmd["set"]["brightness"], 77);
    devices.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_commands_are_refused_with_problem_json_and_append_nothing() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let (light, sensor) = (home.devices[0].id, home.devices[1].id);
    let cases = [
        (light, json!({"set": {"brightness": 101}}), 400),
        (light, json!({"set": {"explode": true}}), 400),
        (light, json!({"set": {}}), 400),
        (light, json!({"set": {"on": true}, "householdId": uuid::Uuid::new_v4()}), 400),
        (sensor, json!({"set": {"temperature": 20}}), 400),
        (uuid::Uuid::new_v4(), json!({"set": {"on": true}}), 404),
    ];
    for (device, body, status) in cases {
        let r = stack.command(&home, device).json(&body).send().await.expect("post");
        assert_eq!(r.status(), status, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: Value = r.json().await.expect("problem body");
        assert!(p["type"].as_str().is_some_and(|t| t.starts_with("https://homelink.dev/problems/")), "{p}");
    }
    // A device of another household answers exactly like one that does not exist.
    let other = stack.seed(&light_and_sensor()).await;
    let foreign = stack.command(&home, other.devices[0].id).json(&json!({"set": {"on": true}})).send().await.expect("post");
    let missing = stack.command(&home, uuid::Uuid::new_v4()).json(&json!({"set": {"on": true}})).send().await.expect("post");
    assert_eq!(foreign.status(), missing.status());
    assert_eq!(foreign.bytes().await.expect("body"), missing.bytes().await.expect("body"));
    // A 20 KB body is refused before parsing.
    let big = json!({"set": {"on": true}, "pad": "x".repeat(20_000)});
    let r = stack.command(&home, light).json(&big).send().await.expect("post");
    assert_eq!(r.status(), 413);

    assert_eq!(stack.metric(stack.command_port, "homelink_command_api_messages_out_total{kind=\"command\"}").await, 0.0);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands").fetch_one(&stack.pool).await.expect("count");
    assert_eq!(n, 0);
}
