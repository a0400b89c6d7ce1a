//! The automation engine's guarantees through the running services (issue
//! 17): waits that span a `kill -9` of the engine fire exactly once, a loop
//! of automations that trigger each other is stopped and recorded, one that
//! fires too often is paused (the owner sees it) until it is saved again, an
//! automation does not act on its own commands' effects unless asked (also
//! right after a `kill -9` of the engine), and an
//! automation acts with its creator's rights at the moment it runs.

mod common;

use common::{eventually, publish_as, spec, BridgeProcess, Stack};
use homelink_events::DeviceKind;
use homelink_kit::shutdown::CancellationToken;
use homelink_tools::sim;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

const RUNS: &str = "query($id: ID!) { automation(id: $id) { runs(first: 50) { id what outcome reason steps } } }";

async fn runs(stack: &Stack, token: &str, id: &Value) -> Vec<Value> {
    let r = stack.gql(token, RUNS, json!({"id": id})).await;
    r["data"]["automation"]["runs"].as_array().cloned().unwrap_or_default()
}

fn contact(seq: u64, closed: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": 1, "seq": seq, "state": {"contact": closed}})).expect("json")
}

/// The engine as its own process, on the stack's database and topics.
fn engine_process(stack: &Stack) -> (BridgeProcess, u16) {
    engine_process_with(stack, &[])
}

/// The engine as its own process, with extra arguments.
fn engine_process_with(stack: &Stack, extra: &[(&str, &str)]) -> (BridgeProcess, u16) {
    let port = common::free_port();
    let args = [
        ("--database-url", stack.db_url.clone()),
        ("--kafka-bootstrap", stack.env.kafka.clone()),
        ("--topic-prefix", stack.topics.prefix().to_owned()),
        ("--listen", format!("127.0.0.1:{port}")),
    ];
    let extra = extra.iter().map(|(k, v)| (*k, (*v).to_owned()));
    let mut p = BridgeProcess::new(
        stack.env.bin_dir.join("homelink-automation"),
        args.into_iter().chain(extra).flat_map(|(k, v)| [k.to_owned(), v]).collect(),
        vec![],
    );
    p.restart();
    (p, port)
}

async fn ready(stack: &Stack, port: u16) {
    let url = format!("http://127.0.0.1:{port}/readyz");
    eventually(Duration::from_secs(60), "the engine ready", || async {
        stack.http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_for_and_a_delay_that_span_a_kill_of_the_engine_fire_exactly_once() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Porch", "Garden"), (DeviceKind::Sensor, "Gate", "Garden")]).await;
    let owner = home.accounts[0].access_token.clone();
    let (light, gate) = (home.devices[0].id, home.devices[1].id);
    let running = CancellationToken::new();
    tokio::spawn(sim::run(spec(&home, 0, None), stack.env.target(), None, running.clone()));
    // The gate open for 6 s: the porch light on for 6 s.
    let definition = json!({
        "triggers": [{"type": "state", "deviceId": gate, "capability": "contact", "to": false, "forSecs": 6}],
        "actions": [{"type": "command", "deviceId": light, "set": {"on": true}}, {"type": "delay", "secs": 6},
                    {"type": "command", "deviceId": light, "set": {"on": false}}]
    });
    let (status, body) = stack
        .call(
            Some(&owner),
            Method::POST,
            &format!("/v1/households/{}/automations", home.household_id),
            Some(json!({"name": "Gate light", "definition": definition})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["automationId"].clone();
    let (mut engine, port) = engine_process(&stack);
    ready(&stack, port).await;

    let gate_spec = spec(&home, 1, None);
    let topic = format!("home/{}/device/{gate}/state", home.household_id);
    publish_as(&stack, &gate_spec, topic.clone(), contact(1, true)).await;
    publish_as(&stack, &gate_spec, topic.clone(), contact(2, false)).await;
    // Killed while the `for` runs, and down past its end.
    tokio::time::sleep(Duration::from_secs(2)).await;
    engine.kill();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(runs(&stack, &owner, &id).await.is_empty(), "nothing ran while the engine was down");
    engine.restart();
    let run = eventually(Duration::from_secs(60), "the run delayed", || async {
        let r = runs(&stack, &owner, &id).await;
        r.first().filter(|run| run["steps"].as_array().is_some_and(|s| s.iter().any(|s| s["outcome"] == "delayed"))).cloned()
    })
    .await;
    assert!(run["what"].as_str().is_some_and(|w| w.starts_with("contact: false")), "{run}");
    // Killed again during the delay, and down past its end.
    engine.kill();
    tokio::time::sleep(Duration::from_secs(7)).await;
    engine.restart();
    let done = eventually(Duration::from_secs(60), "the run done", || async {
        runs(&stack, &owner, &id).await.first().filter(|run| run["outcome"] == "done").cloned()
    })
    .await;
    let outcomes: Vec<&str> = done["steps"].as_array().into_iter().flatten().filter_map(|s| s["outcome"].as_str()).collect();
    assert_eq!(outcomes, ["sent", "delayed", "sent"], "{done}");
    ready(&stack, port).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs(&stack, &owner, &id).await.len(), 1, "exactly one run");
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands WHERE device_id = $1 AND caused_by = $2")
        .bind(light)
        .bind(Uuid::parse_str(done["id"].as_str().unwrap_or_default()).expect("run id"))
        .fetch_one(&stack.pool)
        .await
        .expect("count");
    assert_eq!(commands, 2, "one command per command step, none repeated");
    eventually(Duration::from_secs(30), "the porch light off again", || async {
        let on: Option<Value> = sqlx::query_scalar("SELECT reported->'on' FROM device_shadows WHERE device_id = $1")
            .bind(light)
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (on == Some(json!(false))).then_some(())
    })
    .await;
    running.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loop_of_two_automations_is_stopped_and_recorded() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Ping", "Hall"), (DeviceKind::Light, "Pong", "Hall")]).await;
    let owner = home.accounts[0].access_token.clone();
    let (ping, pong) = (home.devices[0].id, home.devices[1].id);
    let running = CancellationToken::new();
    for i in 0..2 {
        tokio::spawn(sim::run(spec(&home, i, None), stack.env.target(), None, running.clone()));
    }
    let base = format!("/v1/households/{}/automations", home.household_id);
    let bounce = |from: Uuid, to: Uuid| {
        json!({
            "triggers": [{"type": "state", "deviceId": from, "capability": "on", "to": true}],
            "actions": [{"type": "command", "deviceId": from, "set": {"on": false}}, {"type": "command", "deviceId": to, "set": {"on": true}}],
            "mode": "parallel"
        })
    };
    let (s1, a) = stack.call(Some(&owner), Method::POST, &base, Some(json!({"name": "Ping", "definition": bounce(ping, pong)}))).await;
    let (s2, b) = stack.call(Some(&owner), Method::POST, &base, Some(json!({"name": "Pong", "definition": bounce(pong, ping)}))).await;
    assert_eq!((s1, s2), (201, 201), "{a} {b}");
    common::all_online(&stack, &owner, home.household_id).await;
    stack.start_automation().await;
    let r = stack.command(&home, ping).json(&json!({"set": {"on": true}})).send().await.expect("command");
    assert_eq!(r.status().as_u16(), 202);
    let stopped = eventually(Duration::from_secs(90), "a run stopped by the loop guard", || async {
        let all = [runs(&stack, &owner, &a["automationId"]).await, runs(&stack, &owner, &b["automationId"]).await].concat();
        all.into_iter().find(|r| r["outcome"] == "stopped")
    })
    .await;
    assert!(stopped["reason"].as_str().is_some_and(|r| r.starts_with("loop")), "{stopped}");
    // And it stays stopped: no run after it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let count = || async { runs(&stack, &owner, &a["automationId"]).await.len() + runs(&stack, &owner, &b["automationId"]).await.len() };
    let n = count().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(count().await, n, "the loop ended");
    assert!(n <= 8, "bounded: {n} runs");
    running.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_demoted_creators_automation_can_no_longer_unlock() {
    let stack = Stack::start().await;
    let home = stack.household_with(&["adult"], &[(DeviceKind::Lock, "Door", "Hall"), (DeviceKind::Sensor, "Doorbell", "Hall")]).await;
    let (owner, adult) = (home.accounts[0].clone(), home.accounts[1].clone());
    let (lock, bell) = (home.devices[0].id, home.devices[1].id);
    let running = CancellationToken::new();
    tokio::spawn(sim::run(spec(&home, 0, None), stack.env.target(), None, running.clone()));
    let definition = json!({
        "triggers": [{"type": "state", "deviceId": bell, "capability": "contact", "to": false}],
        "actions": [{"type": "command", "deviceId": lock, "set": {"locked": false}}]
    });
    let base = format!("/v1/households/{}", home.household_id);
    let (status, body) = stack
        .call(
            Some(&adult.access_token),
            Method::POST,
            &format!("{base}/automations"),
            Some(json!({"name": "Let in", "definition": definition})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["automationId"].clone();
    let (status, _) = stack
        .call(Some(&owner.access_token), Method::PUT, &format!("{base}/members/{}/role", adult.user_id), Some(json!({"role": "child"})))
        .await;
    assert_eq!(status, 200);
    stack.start_automation().await;
    let topic = format!("home/{}/device/{bell}/state", home.household_id);
    publish_as(&stack, &spec(&home, 1, None), topic.clone(), contact(1, true)).await;
    publish_as(&stack, &spec(&home, 1, None), topic, contact(2, false)).await;
    common::reported(&stack, bell, "contact", json!(false)).await;
    let run = eventually(Duration::from_secs(60), "the run done", || async {
        runs(&stack, &owner.access_token, &id).await.first().filter(|r| r["outcome"] == "done").cloned()
    })
    .await;
    assert_eq!(run["steps"][0]["outcome"], "refused", "{run}");
    assert!(run["steps"][0]["detail"].as_str().is_some_and(|d| d.contains("child")), "{run}");
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands WHERE device_id = $1 AND caused_by IS NOT NULL")
        .bind(lock)
        .fetch_one(&stack.pool)
        .await
        .expect("count");
    assert_eq!(sent, 0, "nothing went to the lock");
    let aq = "query($h: ID!) { auditLog(householdId: $h, first: 20, filter: {action: \"automation.action\"}) { edges { node { actorId outcome detail } } } }";
    let audit = eventually(Duration::from_secs(30), "the refusal audited", || async {
        let a = stack.gql(&owner.access_token, aq, json!({"h": home.household_id})).await;
        a["data"]["auditLog"]["edges"].as_array().filter(|e| !e.is_empty()).cloned()
    })
    .await;
    assert_eq!(audit[0]["node"]["actorId"], adult.user_id.to_string(), "{audit:?}");
    assert_eq!(audit[0]["node"]["outcome"], "denied");
    running.cancel();
}

const AUTOMATION: &str = "query($id: ID!) { automation(id: $id) { pausedAt pausedReason runs(first: 50) { id outcome reason } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_automation_that_fires_too_often_is_paused_until_it_is_saved_again() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Porch", "Garden"), (DeviceKind::Sensor, "Gate", "Garden")]).await;
    let owner = home.accounts[0].access_token.clone();
    let (light, gate) = (home.devices[0].id, home.devices[1].id);
    let running = CancellationToken::new();
    tokio::spawn(sim::run(spec(&home, 0, None), stack.env.target(), None, running.clone()));
    let saved = json!({"name": "Gate light", "definition": {
        "triggers": [{"type": "state", "deviceId": gate, "capability": "contact"}],
        "actions": [{"type": "command", "deviceId": light, "set": {"on": true}}],
        "mode": "parallel"
    }});
    let base = format!("/v1/households/{}/automations", home.household_id);
    let (status, body) = stack.call(Some(&owner), Method::POST, &base, Some(saved.clone())).await;
    assert_eq!(status, 201, "{body}");
    let id = body["automationId"].clone();
    let (_engine, port) = engine_process_with(&stack, &[("--breaker-runs", "3"), ("--breaker-window-secs", "60")]);
    ready(&stack, port).await;
    let gate_spec = spec(&home, 1, None);
    let topic = format!("home/{}/device/{gate}/state", home.household_id);
    let automation = || async { stack.gql(&owner, AUTOMATION, json!({"id": id})).await["data"]["automation"].clone() };

    // Six changes in a few seconds: three runs, the fourth trips the breaker.
    for seq in 1..=6 {
        publish_as(&stack, &gate_spec, topic.clone(), contact(seq, seq % 2 == 0)).await;
    }
    let paused = eventually(Duration::from_secs(60), "the automation paused", || async {
        let a = automation().await;
        (!a["pausedAt"].is_null()).then_some(a)
    })
    .await;
    assert!(paused["pausedReason"].as_str().is_some_and(|r| r.starts_with("breaker")), "{paused}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs_of = |a: &Value| a["runs"].as_array().cloned().unwrap_or_default();
    let before = runs_of(&automation().await);
    let outcomes: Vec<&str> = before.iter().filter_map(|r| r["outcome"].as_str()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "done").count(), 3, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == "stopped").count(), 1, "one run recorded as stopped, then nothing: {outcomes:?}");
    let stopped = before.iter().find(|r| r["outcome"] == "stopped").cloned().unwrap_or_default();
    assert!(stopped["reason"].as_str().is_some_and(|r| r.contains("paused")), "{stopped}");

    // Paused: a change starts nothing.
    publish_as(&stack, &gate_spec, topic.clone(), contact(7, false)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs_of(&automation().await).len(), before.len(), "nothing starts while paused");

    // Saved again by its owner: it runs again.
    let (status, body) = stack.call(Some(&owner), Method::PUT, &format!("{base}/{}", id.as_str().unwrap_or_default()), Some(saved)).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(30), "the pause lifted", || async { automation().await["pausedAt"].is_null().then_some(()) }).await;
    publish_as(&stack, &gate_spec, topic, contact(8, true)).await;
    eventually(Duration::from_secs(30), "a run after the pause", || async {
        (runs_of(&automation().await).len() == before.len() + 1).then_some(())
    })
    .await;
    running.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_automation_does_not_act_on_its_own_commands_effects_unless_asked() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Desk", "Study"), (DeviceKind::Light, "Shelf", "Study")]).await;
    let owner = home.accounts[0].access_token.clone();
    let running = CancellationToken::new();
    for i in 0..2 {
        tokio::spawn(sim::run(spec(&home, i, None), stack.env.target(), None, running.clone()));
    }
    common::all_online(&stack, &owner, home.household_id).await;
    // "Whenever its brightness changes, set it to 40": its own command
    // changes the brightness too.
    let base = format!("/v1/households/{}/automations", home.household_id);
    let mut ids = Vec::new();
    for (i, react) in [false, true].into_iter().enumerate() {
        let device = home.devices[i].id;
        let definition = json!({
            "triggers": [{"type": "state", "deviceId": device, "capability": "brightness"}],
            "actions": [{"type": "command", "deviceId": device, "set": {"brightness": 40}}],
            "mode": "parallel", "reactToOwn": react
        });
        let (status, body) =
            stack.call(Some(&owner), Method::POST, &base, Some(json!({"name": format!("Dim {i}"), "definition": definition}))).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["definition"].get("reactToOwn").is_some(), react, "{body}");
        ids.push(body["automationId"].clone());
    }
    stack.start_automation().await;
    for d in &home.devices {
        let r = stack.command(&home, d.id).json(&json!({"set": {"brightness": 90}})).send().await.expect("command");
        assert_eq!(r.status().as_u16(), 202);
    }
    let count = |id: Value| {
        let stack = &stack;
        let owner = owner.clone();
        async move { runs(stack, &owner, &id).await.iter().filter(|r| r["outcome"] == "done").count() }
    };
    // The one that was asked to reacts to its own command's report (90 → 40) once more.
    eventually(Duration::from_secs(60), "the reacting automation ran twice", || async { (count(ids[1].clone()).await == 2).then_some(()) })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(ids[0].clone()).await, 1, "the other ran once: its own command's report did not trigger it");
    assert_eq!(count(ids[1].clone()).await, 2, "and no more: 40 again changes nothing");
    running.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_own_commands_rule_holds_across_a_kill_of_the_engine() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Desk", "Study")]).await;
    let owner = home.accounts[0].access_token.clone();
    let desk = home.devices[0].id;
    let definition = json!({
        "triggers": [{"type": "state", "deviceId": desk, "capability": "brightness"}],
        "actions": [{"type": "command", "deviceId": desk, "set": {"brightness": 40}}]
    });
    let (status, body) = stack
        .call(
            Some(&owner),
            Method::POST,
            &format!("/v1/households/{}/automations", home.household_id),
            Some(json!({"name": "Dim", "definition": definition})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["automationId"].clone();
    let (mut engine, port) = engine_process(&stack);
    ready(&stack, port).await;

    // A report of the device's own: the automation runs and commands it.
    let desk_spec = spec(&home, 0, None);
    let topic = format!("home/{}/device/{desk}/state", home.household_id);
    let brightness = |seq: u64, b: i64| serde_json::to_vec(&json!({"v": 1, "seq": seq, "state": {"brightness": b}})).expect("json");
    publish_as(&stack, &desk_spec, topic.clone(), brightness(1, 90)).await;
    eventually(Duration::from_secs(30), "the first run done", || async {
        runs(&stack, &owner, &id).await.first().filter(|r| r["outcome"] == "done").map(|_| ())
    })
    .await;
    // Killed and back before the device reports the command's effect: the
    // restarted engine still knows that report is its own doing.
    engine.kill();
    engine.restart();
    ready(&stack, port).await;
    publish_as(&stack, &desk_spec, topic, brightness(2, 40)).await;
    eventually(Duration::from_secs(30), "the report applied", || async {
        let b: Option<Value> = sqlx::query_scalar("SELECT reported->'brightness' FROM device_shadows WHERE device_id = $1")
            .bind(desk)
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (b == Some(json!(40))).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs(&stack, &owner, &id).await.len(), 1, "its own command's effect did not run it again");
}
