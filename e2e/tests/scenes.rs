//! Scenes (issue 17) through the running services: create / change / delete
//! and the roles table for them, bad definitions answered with the path of
//! the fault, and an activation that sends one command per device through
//! the ordinary command path, counts the devices' answers and names the
//! device that never took its part, or sends a device that acked but
//! reported other values the values again as a new command.

mod common;

use common::{eventually, next_matching, spec, Stack};
use homelink_events::DeviceKind;
use homelink_kit::shutdown::CancellationToken;
use homelink_tools::sim;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

fn devices() -> Vec<(DeviceKind, &'static str, &'static str)> {
    vec![(DeviceKind::Light, "Lamp", "Hall"), (DeviceKind::Lock, "Front door", "Hall"), (DeviceKind::Light, "Porch", "Garden")]
}

const SCENES: &str = "query($h: ID!) { household(id: $h) { scenes { id name childAllowed devices { deviceId set } } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenes_follow_the_roles_table_and_bad_definitions_name_their_fault() {
    use reqwest::Method;
    let stack = Stack::start().await;
    let home = stack.household_with(&["adult", "child"], &devices()).await;
    let stranger = stack.seed(&devices()).await.accounts[0].clone();
    let (owner, adult, child) = (&home.accounts[0].access_token, &home.accounts[1].access_token, &home.accounts[2].access_token);
    let (lamp, lock) = (home.devices[0].id, home.devices[1].id);
    let base = format!("/v1/households/{}/scenes", home.household_id);
    let night =
        json!({"name": "Good night", "devices": [{"deviceId": lamp, "set": {"on": false}}, {"deviceId": lock, "set": {"locked": true}}]});

    // Who may make one: owners and adults.
    let (status, body) = stack.call(Some(owner), Method::POST, &base, Some(night.clone())).await;
    assert_eq!(status, 201, "{body}");
    let scene = body["sceneId"].as_str().expect("scene id").to_owned();
    assert_eq!(body["childAllowed"], false);
    let movie = json!({"name": "Movie", "devices": [{"deviceId": lamp, "set": {"brightness": 20.0}}]});
    let (status, body) = stack.call(Some(adult), Method::POST, &base, Some(movie)).await;
    assert_eq!(status, 201, "{body}");
    assert!(body["devices"][0]["set"]["brightness"].is_i64(), "integers stored as integers: {body}");
    let other = json!({"name": "Other", "devices": [{"deviceId": lamp, "set": {"on": true}}]});
    assert_eq!(stack.call(Some(child), Method::POST, &base, Some(other.clone())).await.0, 403);
    assert_eq!(stack.call(Some(&stranger.access_token), Method::POST, &base, Some(other.clone())).await.0, 404);
    assert_eq!(stack.call(None, Method::POST, &base, Some(other.clone())).await.0, 401);
    let (status, body) =
        stack.call(Some(owner), Method::POST, &base, Some(json!({"name": " good NIGHT", "devices": night["devices"]}))).await;
    assert_eq!(status, 400, "leading space: {body}");
    let (status, body) =
        stack.call(Some(owner), Method::POST, &base, Some(json!({"name": "good NIGHT", "devices": night["devices"]}))).await;
    assert_eq!((status, body["type"].as_str()), (409, Some("https://homelink.dev/problems/scene-name-taken")), "{body}");

    // Bad definitions name the field at fault: 400 for what the schema rules
    // out, 422 for what this household cannot take (a device it does not
    // have, one named twice, a capability the kind lacks).
    let foreign = stack.seed(&devices()).await.devices[0].id;
    for (devices, want, path) in [
        (json!([{"deviceId": Uuid::new_v4(), "set": {"on": true}}]), 422, "/devices/0/deviceId"),
        (json!([{"deviceId": lamp, "set": {"on": true}}, {"deviceId": foreign, "set": {"on": true}}]), 422, "/devices/1/deviceId"),
        (json!([{"deviceId": lamp, "set": {"on": true}}, {"deviceId": lamp, "set": {"on": false}}]), 422, "/devices/1/deviceId"),
        (json!([{"deviceId": lamp, "set": {"brightness": 101}}]), 400, "/devices/0/set"),
        (json!([{"deviceId": lamp, "set": {}}]), 400, "/devices/0/set"),
        (json!([{"deviceId": lamp, "set": {"locked": true}}]), 422, "/devices/0/set"),
        (json!([]), 400, "/devices"),
    ] {
        let (status, body) = stack.call(Some(owner), Method::POST, &base, Some(json!({"name": "Bad", "devices": devices}))).await;
        assert_eq!((status, body["path"].as_str()), (want, Some(path)), "{devices}: {body}");
    }
    for (body, why) in [
        (json!({"name": "Bad\u{0}", "devices": night["devices"]}), "NUL"),
        (json!({"name": "Bad", "devices": night["devices"], "householdId": Uuid::nil()}), "a field it does not own"),
        (json!({"name": "Bad"}), "no devices"),
        (json!({"name": "Bad", "devices": [{"deviceId": "nope", "set": {"on": true}}]}), "not an id"),
        (
            json!({"name": "Bad", "devices": (0..101).map(|_| json!({"deviceId": lamp, "set": {"on": true}})).collect::<Vec<_>>()}),
            "too many",
        ),
    ] {
        assert_eq!(stack.call(Some(owner), Method::POST, &base, Some(body)).await.0, 400, "{why}");
    }

    // Change: owners and adults; the fields given replace the scene's.
    let one = format!("{base}/{scene}");
    let (status, body) = stack.call(Some(adult), Method::PATCH, &one, Some(json!({"childAllowed": true}))).await;
    assert_eq!((status, body["name"].as_str(), body["childAllowed"].as_bool()), (200, Some("Good night"), Some(true)), "{body}");
    assert_eq!(body["devices"].as_array().map(Vec::len), Some(2));
    assert_eq!(stack.call(Some(child), Method::PATCH, &one, Some(json!({"name": "Mine"}))).await.0, 403);
    for nothing in [json!({}), json!({"name": null})] {
        let (status, same) = stack.call(Some(owner), Method::PATCH, &one, Some(nothing)).await;
        assert_eq!((status, same["childAllowed"].as_bool()), (200, Some(true)), "no field given: unchanged {same}");
    }
    assert_eq!(stack.call(Some(child), Method::PATCH, &one, Some(json!({}))).await.0, 403, "even a no-op is for owners and adults");
    let (status, body) =
        stack.call(Some(owner), Method::PATCH, &one, Some(json!({"devices": [{"deviceId": lock, "set": {"on": true}}]}))).await;
    assert_eq!((status, body["path"].as_str()), (422, Some("/devices/0/set")), "{body}");
    assert_eq!(stack.call(Some(owner), Method::PATCH, &format!("{base}/{}", Uuid::new_v4()), Some(json!({"name": "X"}))).await.0, 404);

    // GraphQL: a child sees only the childAllowed scenes.
    let h = json!({"h": home.household_id});
    let all = stack.gql(owner, SCENES, h.clone()).await;
    assert_eq!(all["data"]["household"]["scenes"].as_array().map(Vec::len), Some(2), "{all}");
    let mine = stack.gql(child, SCENES, h.clone()).await;
    let mine = mine["data"]["household"]["scenes"].as_array().cloned().unwrap_or_default();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0]["name"], "Good night");
    assert_eq!(mine[0]["devices"][1]["set"], json!({"locked": true}));

    // Delete: owners and adults.
    assert_eq!(stack.call(Some(child), Method::DELETE, &one, None).await.0, 403);
    assert_eq!(stack.call(Some(&stranger.access_token), Method::DELETE, &one, None).await.0, 404);
    assert_eq!(stack.call(Some(adult), Method::DELETE, &one, None).await.0, 204);
    assert_eq!(stack.call(Some(adult), Method::DELETE, &one, None).await.0, 404);
    let left = stack.gql(owner, SCENES, h).await;
    assert_eq!(left["data"]["household"]["scenes"].as_array().map(Vec::len), Some(1), "{left}");

    // Every change is in the audit log.
    let aq = "query($h: ID!) { auditLog(householdId: $h, first: 50) { edges { node { action outcome } } } }";
    let audit = stack.gql(owner, aq, json!({"h": home.household_id})).await;
    let actions: Vec<String> = audit["data"]["auditLog"]["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{} {}", e["node"]["action"].as_str().unwrap_or(""), e["node"]["outcome"].as_str().unwrap_or("")))
        .collect();
    for want in ["scene.create accepted", "scene.change accepted", "scene.delete accepted", "scene.create denied"] {
        assert!(actions.iter().any(|a| a == want), "{want} in {actions:?}");
    }
}

const ACTIVATION: &str = "query($id: ID!) { sceneActivation(id: $id) { sceneId actorId total acked failed expired skipped pending done
    devices { deviceId commandId status reason } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_activation_sends_one_command_per_device_and_names_the_device_that_never_answered() {
    use reqwest::Method;
    let stack = Stack::start().await;
    let mut all = devices();
    all.push((DeviceKind::Light, "Desk", "Study"));
    let home = stack.household_with(&["child"], &all).await;
    let (owner, child) = (&home.accounts[0], &home.accounts[1]);
    let (lamp, lock, porch, desk) = (home.devices[0].id, home.devices[1].id, home.devices[2].id, home.devices[3].id);
    let base = format!("/v1/households/{}/scenes", home.household_id);
    let body = json!({"name": "Away", "devices": [
        {"deviceId": lamp, "set": {"on": false}}, {"deviceId": lock, "set": {"locked": true}}, {"deviceId": porch, "set": {"on": false}},
        {"deviceId": desk, "set": {"on": false}}]});
    let (status, created) = stack.call(Some(&owner.access_token), Method::POST, &base, Some(body)).await;
    assert_eq!(status, 201, "{created}");
    let activate = format!("{base}/{}/activate", created["sceneId"].as_str().unwrap_or_default());

    // The lamp and the lock are connected and answer; the porch light never
    // connects; the desk light is connected, takes its commands and never answers.
    let running = CancellationToken::new();
    for i in 0..2 {
        tokio::spawn(sim::run(spec(&home, i, None), stack.env.target(), None, running.clone()));
    }
    let desk_got = silent_device(&stack, &spec(&home, 3, None)).await;
    let q = "query($h: ID!) { household(id: $h) { devices { nodes { id shadow { online } } } } }";
    eventually(Duration::from_secs(30), "lamp and lock online", || async {
        let r = stack.gql(&owner.access_token, q, json!({"h": home.household_id})).await;
        let nodes = r["data"]["household"]["devices"]["nodes"].as_array()?.clone();
        (nodes.iter().filter(|n| n["shadow"]["online"] == true).count() == 2).then_some(())
    })
    .await;

    // Not childAllowed: a child may not; a stranger does not see it.
    assert_eq!(stack.call(Some(&child.access_token), Method::POST, &activate, None).await.0, 403);
    let stranger = stack.account("stranger").await;
    assert_eq!(stack.call(Some(&stranger.access_token), Method::POST, &activate, None).await.0, 404);

    let mut sub = stack
        .subscribe_from_now(
            &owner.access_token,
            "subscription($h: ID!, $after: Int) { householdChanges(householdId: $h, after: $after) { change deviceId commandId status causedBy } }",
            json!({}),
            home.household_id,
        )
        .await;
    let (status, accepted) = stack.call(Some(&owner.access_token), Method::POST, &activate, None).await;
    assert_eq!(status, 202, "{accepted}");
    let activation = accepted["activationId"].as_str().expect("activation id").to_owned();
    let commands = accepted["commands"].as_array().cloned().unwrap_or_default();
    let status_of = |d: Uuid| commands.iter().find(|c| c["deviceId"] == d.to_string()).map(|c| c["status"].clone());
    assert_eq!(commands.len(), 4, "{accepted}");
    assert_eq!(status_of(lamp), Some(json!("requested")));
    assert_eq!(status_of(porch), Some(json!("queued")), "offline: queued like a single command");

    // Each command's steps are pushed naming the activation.
    let acked = next_matching(&mut sub, "the lamp's ack", |v| {
        v["householdChanges"]["deviceId"] == lamp.to_string()
            && (v["householdChanges"]["status"] == "ok" || v["householdChanges"]["status"] == "confirmed")
    })
    .await;
    assert_eq!(acked["householdChanges"]["causedBy"], activation.as_str(), "{acked}");

    // Progress: two acked at once; the porch light and the silent desk light
    // expire within their 30 s life and are named; the desk light's command
    // was published to it again (same id) while it lived.
    let vars = json!({"id": activation});
    let progress = eventually(Duration::from_secs(90), "the activation done", || async {
        let r = stack.gql(&owner.access_token, ACTIVATION, vars.clone()).await;
        (r["data"]["sceneActivation"]["done"] == true).then(|| r["data"]["sceneActivation"].clone())
    })
    .await;
    assert_eq!(
        (progress["total"].as_i64(), progress["acked"].as_i64(), progress["expired"].as_i64()),
        (Some(4), Some(2), Some(2)),
        "{progress}"
    );
    let part = |d: Uuid| progress["devices"].as_array().and_then(|p| p.iter().find(|p| p["deviceId"] == d.to_string()).cloned());
    let porch_part = part(porch).unwrap_or_default();
    assert_eq!(porch_part["status"], "expired", "{progress}");
    assert!(porch_part["reason"].as_str().is_some_and(|r| r.contains("offline")), "{progress}");
    let desk_part = part(desk).unwrap_or_default();
    assert_eq!(desk_part["status"], "expired", "{progress}");
    assert!(desk_part["reason"].as_str().is_some_and(|r| r.contains("never answered")), "{progress}");
    let desk_command = desk_part["commandId"].as_str().unwrap_or_default().to_owned();
    let got = desk_got.lock().map(|g| g.clone()).unwrap_or_default();
    assert!(got.len() >= 3, "published to the silent device again while it lived: {got:?}");
    assert!(got.iter().all(|c| *c == desk_command), "always the same command id: {got:?} vs {desk_command}");
    assert_eq!(progress["actorId"], owner.user_id.to_string());

    // A command names its cause.
    let lamp_command = commands.iter().find(|c| c["deviceId"] == lamp.to_string()).map(|c| c["commandId"].clone()).unwrap_or_default();
    let c = stack.gql(&owner.access_token, "query($id: ID!) { command(id: $id) { status causedBy } }", json!({"id": lamp_command})).await;
    assert_eq!(c["data"]["command"]["causedBy"], activation.as_str(), "{c}");

    // A device removed since the scene was made is named as skipped.
    for d in [porch, desk] {
        let r =
            stack.call(Some(&owner.access_token), Method::DELETE, &format!("/v1/households/{}/devices/{d}", home.household_id), None).await;
        assert_eq!(r.0, 204, "{}", r.1);
    }
    let (status, again) = stack.call(Some(&owner.access_token), Method::POST, &activate, None).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["commands"].as_array().map(Vec::len), Some(2));
    assert_eq!(again["skipped"].as_array().map(Vec::len), Some(2), "{again}");
    let id = again["activationId"].clone();
    let progress = eventually(Duration::from_secs(60), "the second activation done", || async {
        let r = stack.gql(&owner.access_token, ACTIVATION, json!({"id": id})).await;
        (r["data"]["sceneActivation"]["done"] == true).then(|| r["data"]["sceneActivation"].clone())
    })
    .await;
    assert_eq!(
        (progress["acked"].as_i64(), progress["skipped"].as_i64(), progress["total"].as_i64()),
        (Some(2), Some(2), Some(4)),
        "{progress}"
    );

    // Someone else's activation id reads as nothing.
    let r = stack.gql(&stranger.access_token, ACTIVATION, json!({"id": activation})).await;
    assert!(r["data"]["sceneActivation"].is_null(), "{r}");
    running.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_that_acks_but_reports_other_values_is_sent_them_again_as_a_new_command() {
    use reqwest::Method;
    let stack = Stack::start().await;
    let home = stack.household_with(&[], &[(DeviceKind::Light, "Lamp", "Hall")]).await;
    let owner = &home.accounts[0];
    let lamp = home.devices[0].id;
    let base = format!("/v1/households/{}/scenes", home.household_id);
    let body = json!({"name": "Bright", "devices": [{"deviceId": lamp, "set": {"on": true}}]});
    let (status, created) = stack.call(Some(&owner.access_token), Method::POST, &base, Some(body)).await;
    assert_eq!(status, 201, "{created}");
    let activate = format!("{base}/{}/activate", created["sceneId"].as_str().unwrap_or_default());

    // The lamp acks every command `ok`, but after the first it reports
    // itself still off; after the next it does as asked.
    let got = contrary_light(&stack, &spec(&home, 0, None)).await;
    let q = "query($h: ID!) { household(id: $h) { devices { nodes { shadow { online } } } } }";
    eventually(Duration::from_secs(30), "lamp online", || async {
        let r = stack.gql(&owner.access_token, q, json!({"h": home.household_id})).await;
        (r["data"]["household"]["devices"]["nodes"][0]["shadow"]["online"] == true).then_some(())
    })
    .await;

    let (status, accepted) = stack.call(Some(&owner.access_token), Method::POST, &activate, None).await;
    assert_eq!(status, 202, "{accepted}");
    let activation = accepted["activationId"].as_str().expect("activation id").to_owned();
    let first: Uuid = accepted["commands"][0]["commandId"].as_str().and_then(|c| c.parse().ok()).expect("command id");
    let retry = homelink_events::command::retry_id(first);

    let part = eventually(Duration::from_secs(60), "the lamp confirmed on the retry", || async {
        let r = stack.gql(&owner.access_token, ACTIVATION, json!({"id": activation})).await;
        let part = r["data"]["sceneActivation"]["devices"][0].clone();
        (part["status"] == "confirmed").then_some(part)
    })
    .await;
    assert_eq!(part["commandId"], retry.to_string(), "the part names the command that took: {part}");
    assert!(part["reason"].as_str().is_some_and(|r| r.contains("sent again")), "{part}");
    let received = got.lock().map(|g| g.clone()).unwrap_or_default();
    assert_eq!(received, vec![first.to_string(), retry.to_string()], "the values again, under a new id, once");

    // The new command names the activation as its cause; the first was
    // acked and stays unconfirmed, replaced by the new one.
    let c = stack.gql(&owner.access_token, "query($id: ID!) { command(id: $id) { status causedBy } }", json!({"id": retry})).await;
    assert_eq!(c["data"]["command"]["causedBy"], activation.as_str(), "{c}");
    let shadow = "query($id: ID!) { device(id: $id) { shadow { reported } } }";
    let r = stack.gql(&owner.access_token, shadow, json!({"id": lamp})).await;
    assert_eq!(r["data"]["device"]["shadow"]["reported"]["on"], true, "{r}");
    let r = stack.gql(&owner.access_token, ACTIVATION, json!({"id": activation})).await;
    let a = &r["data"]["sceneActivation"];
    assert_eq!((a["acked"].as_i64(), a["failed"].as_i64(), a["total"].as_i64()), (Some(1), Some(0), Some(1)), "{r}");
}

/// A light that acks every command `ok` but, after the first, reports the
/// opposite of the `on` it was asked for (later ones it takes as asked):
/// the command ids it received, in order.
async fn contrary_light(stack: &Stack, spec: &sim::DeviceSpec) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use homelink_events::protocol::{device_topic, AckMsg, AckStatus, Channel, CmdMsg, Presence, StateMsg, StatusMsg, PROTOCOL_VERSION};
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event};
    let (client, mut ev) = AsyncClient::new(sim::mqtt_options(spec, &stack.env.target()), 10);
    let (h, d) = (spec.household_id, spec.device_id);
    client.subscribe(device_topic(h, d, Channel::Cmd), QoS::AtLeastOnce).await.expect("subscribe");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (g, subscribed) = (got.clone(), std::sync::Arc::new(tokio::sync::Notify::new()));
    let s = subscribed.clone();
    tokio::spawn(async move {
        let mut state = sim::initial_state(DeviceKind::Light);
        let mut seq = 0;
        let mut report = |client: &AsyncClient, state: &serde_json::Map<String, serde_json::Value>| {
            seq += 1;
            let msg = StateMsg { v: PROTOCOL_VERSION, seq, ts: Some(chrono::Utc::now()), state: state.clone(), battery: None };
            let (client, body) = (client.clone(), serde_json::to_vec(&msg).unwrap_or_default());
            async move { client.publish(device_topic(h, d, Channel::State), QoS::AtLeastOnce, false, body).await }
        };
        while let Ok(e) = ev.poll().await {
            match e {
                Event::Incoming(Packet::SubAck(_)) => {
                    let online = serde_json::to_vec(&StatusMsg { v: PROTOCOL_VERSION, status: Presence::Online }).unwrap_or_default();
                    let _ = client.publish(device_topic(h, d, Channel::Status), QoS::AtLeastOnce, true, online).await;
                    let _ = report(&client, &state).await;
                    s.notify_one();
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let Ok(cmd) = serde_json::from_slice::<CmdMsg>(&p.payload) else { continue };
                    let first = {
                        let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
                        g.push(cmd.command_id.to_string());
                        g.len() == 1
                    };
                    let ack = AckMsg { v: PROTOCOL_VERSION, command_id: cmd.command_id, status: AckStatus::Ok, reason: None };
                    let _ = client
                        .publish(device_topic(h, d, Channel::Ack), QoS::AtLeastOnce, false, serde_json::to_vec(&ack).unwrap_or_default())
                        .await;
                    for (k, v) in cmd.set {
                        let v = match (first, v) {
                            (true, serde_json::Value::Bool(b)) => serde_json::Value::Bool(!b),
                            (_, v) => v,
                        };
                        state.insert(k, v);
                    }
                    let _ = report(&client, &state).await;
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), subscribed.notified()).await.expect("the contrary device subscribed");
    got
}

/// A device that is connected and subscribed to its commands but never
/// answers one: the command ids it received, in order.
async fn silent_device(stack: &Stack, spec: &sim::DeviceSpec) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event};
    let (client, mut ev) = AsyncClient::new(sim::mqtt_options(spec, &stack.env.target()), 10);
    let topic = format!("home/{}/device/{}/cmd", spec.household_id, spec.device_id);
    client.subscribe(topic, QoS::AtLeastOnce).await.expect("subscribe");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (g, subscribed) = (got.clone(), std::sync::Arc::new(tokio::sync::Notify::new()));
    let s = subscribed.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(e) = ev.poll().await {
            match e {
                Event::Incoming(Packet::SubAck(_)) => s.notify_one(),
                Event::Incoming(Packet::Publish(p)) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    if let (Some(id), Ok(mut g)) = (v["commandId"].as_str(), g.lock()) {
                        g.push(id.to_owned());
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), subscribed.notified()).await.expect("the silent device subscribed");
    got
}
