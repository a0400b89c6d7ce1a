//! Automations' definitions (issue 17) through the running services: the
//! roles table for them, the household's time zone, and bad definitions
//! answered with the JSON pointer of the fault and nothing stored.

mod common;

use common::Stack;
use homelink_events::DeviceKind;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const AUTOMATIONS: &str = "query($h: ID!) { household(id: $h) { timeZone automations { id name enabled createdBy definition } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn automations_follow_the_roles_table_and_bad_definitions_name_their_fault() {
    let stack = Stack::start().await;
    let devices =
        [(DeviceKind::Light, "Hall light", "Hall"), (DeviceKind::Sensor, "Hall motion", "Hall"), (DeviceKind::Lock, "Door", "Hall")];
    let home = stack.household_with(&["adult", "child"], &devices).await;
    let stranger = stack.seed(&devices).await.accounts[0].clone();
    let (owner, adult, child) = (&home.accounts[0], &home.accounts[1], &home.accounts[2]);
    let (light, motion, lock) = (home.devices[0].id, home.devices[1].id, home.devices[2].id);
    let h = home.household_id;
    let base = format!("/v1/households/{h}/automations");
    let night_light = json!({
        "triggers": [{"type": "state", "deviceId": motion, "capability": "motion", "to": true}],
        "conditions": [{"type": "time", "after": "20:00", "before": "06:00"}],
        "actions": [{"type": "command", "deviceId": light, "set": {"on": true}}, {"type": "delay", "secs": 300},
                    {"type": "command", "deviceId": light, "set": {"on": false}}],
        "mode": "restart"
    });
    let leaving = json!({
        "triggers": [{"type": "presence", "who": "last", "movement": "leave"}],
        "actions": [{"type": "command", "deviceId": lock, "set": {"locked": true}}]
    });

    // Owners and adults make them; they act with their creator's rights.
    let (status, body) =
        stack.call(Some(&owner.access_token), Method::POST, &base, Some(json!({"name": "Night light", "definition": night_light}))).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!((body["enabled"].as_bool(), body["createdBy"].as_str()), (Some(true), Some(owner.user_id.to_string().as_str())));
    let id = body["automationId"].as_str().expect("id").to_owned();
    let (status, body) =
        stack.call(Some(&adult.access_token), Method::POST, &base, Some(json!({"name": "Leaving", "definition": leaving}))).await;
    assert_eq!(status, 201, "{body}");
    let other = json!({"name": "Other", "definition": leaving});
    assert_eq!(stack.call(Some(&child.access_token), Method::POST, &base, Some(other.clone())).await.0, 403);
    assert_eq!(stack.call(Some(&stranger.access_token), Method::POST, &base, Some(other.clone())).await.0, 404);
    assert_eq!(stack.call(None, Method::POST, &base, Some(other.clone())).await.0, 401);
    let (status, body) =
        stack.call(Some(&owner.access_token), Method::POST, &base, Some(json!({"name": "leaving", "definition": leaving}))).await;
    assert_eq!((status, body["type"].as_str()), (409, Some("https://homelink.dev/problems/automation-name-taken")), "{body}");

    // Bad definitions: the path of the fault, nothing stored.
    let version = || async {
        sqlx::query_scalar::<_, i64>("SELECT version FROM households WHERE household_id = $1")
            .bind(h)
            .fetch_one(&stack.pool)
            .await
            .expect("v")
    };
    let before = version().await;
    let with = |patch: &dyn Fn(&mut Value)| {
        let mut d = night_light.clone();
        patch(&mut d);
        json!({"name": "Bad", "definition": d})
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (with(&|d| d["triggers"][0]["deviceId"] = json!(Uuid::new_v4())), 422, "/definition/triggers/0/deviceId"),
        (with(&|d| d["triggers"][0]["capability"] = json!("warp")), 422, "/definition/triggers/0/capability"),
        (with(&|d| d["triggers"][0]["to"] = json!(17)), 422, "/definition/triggers/0/to"),
        (with(&|d| d["actions"][0]["set"] = json!({"brightness": 101})), 400, "/definition/actions/0/set"),
        (with(&|d| d["actions"][0]["set"] = json!({"locked": false})), 422, "/definition/actions/0/set"),
        (with(&|d| d["actions"][0]["deviceId"] = json!(Uuid::new_v4())), 422, "/definition/actions/0/deviceId"),
        (with(&|d| d["actions"][1]["secs"] = json!(0)), 400, "/definition/actions/1/secs"),
        (with(&|d| d["conditions"][0]["before"] = json!("24:00")), 400, "/definition/conditions/0/before"),
        (with(&|d| d["actions"][0] = json!({"type": "scene", "sceneId": Uuid::new_v4()})), 422, "/definition/actions/0/sceneId"),
        (with(&|d| d["triggers"] = json!((0..11).map(|_| d["triggers"][0].clone()).collect::<Vec<_>>())), 400, "/definition/triggers"),
        (with(&|d| d["actions"] = json!([])), 400, "/definition/actions"),
        (
            with(&|d| d["triggers"][0] = json!({"type": "presence", "who": "member", "movement": "arrive", "userId": Uuid::new_v4()})),
            422,
            "/definition/triggers/0/userId",
        ),
    ];
    for (body, want, path) in cases {
        let (status, problem) = stack.call(Some(&owner.access_token), Method::POST, &base, Some(body.clone())).await;
        assert_eq!((status, problem["path"].as_str()), (want, Some(path)), "{body}: {problem}");
    }
    for (body, why) in [
        (with(&|d| d["triggers"][0]["type"] = json!("telepathy")), "an unknown trigger"),
        (with(&|d| d["triggers"][0]["extra"] = json!(1)), "a field a trigger does not own"),
        (with(&|d| d["mode"] = json!("sometimes")), "an unknown mode"),
        (json!({"name": "Bad\u{0}", "definition": night_light}), "NUL"),
        (json!({"name": "Bad"}), "no definition"),
    ] {
        assert_eq!(stack.call(Some(&owner.access_token), Method::POST, &base, Some(body)).await.0, 400, "{why}");
    }
    let deep = (0..200).fold(json!({"type": "weekday", "days": ["mon"]}), |c, _| json!({"type": "not", "condition": c}));
    let (status, _) = stack.call(Some(&owner.access_token), Method::POST, &base, Some(with(&|d| d["conditions"][0] = deep.clone()))).await;
    assert!(status == 400 || status == 422, "deep nesting refused: {status}");
    assert_eq!(version().await, before, "nothing stored");

    // Replace and delete: owners and adults.
    let one = format!("{base}/{id}");
    let (status, body) = stack
        .call(
            Some(&adult.access_token),
            Method::PUT,
            &one,
            Some(json!({"name": "Night light", "enabled": false, "definition": night_light})),
        )
        .await;
    assert_eq!(
        (status, body["enabled"].as_bool(), body["createdBy"].as_str()),
        (200, Some(false), Some(owner.user_id.to_string().as_str())),
        "{body}"
    );
    assert_eq!(stack.call(Some(&child.access_token), Method::PUT, &one, Some(json!({"name": "X", "definition": leaving}))).await.0, 403);
    assert_eq!(
        stack
            .call(
                Some(&owner.access_token),
                Method::PUT,
                &format!("{base}/{}", Uuid::new_v4()),
                Some(json!({"name": "X", "definition": leaving}))
            )
            .await
            .0,
        404
    );

    // The time zone: an IANA name.
    let tz = format!("/v1/households/{h}/time-zone");
    assert_eq!(stack.call(Some(&owner.access_token), Method::PUT, &tz, Some(json!({"timeZone": "Mars/Olympus"}))).await.0, 400);
    assert_eq!(stack.call(Some(&child.access_token), Method::PUT, &tz, Some(json!({"timeZone": "Europe/Berlin"}))).await.0, 403);
    let (status, body) = stack.call(Some(&adult.access_token), Method::PUT, &tz, Some(json!({"timeZone": "Europe/Berlin"}))).await;
    assert_eq!((status, body["timeZone"].as_str()), (200, Some("Europe/Berlin")), "{body}");

    // GraphQL: every member reads them.
    let read = stack.gql(&child.access_token, AUTOMATIONS, json!({"h": h})).await;
    let hh = &read["data"]["household"];
    assert_eq!(hh["timeZone"], "Europe/Berlin", "{read}");
    let list = hh["automations"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.iter().map(|a| a["name"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["Leaving", "Night light"]);
    assert_eq!(list[1]["enabled"], false);
    assert_eq!(list[1]["definition"]["mode"], "restart");
    assert_eq!(list[0]["createdBy"], adult.user_id.to_string());

    assert_eq!(stack.call(Some(&child.access_token), Method::DELETE, &one, None).await.0, 403);
    assert_eq!(stack.call(Some(&adult.access_token), Method::DELETE, &one, None).await.0, 204);
    assert_eq!(stack.call(Some(&adult.access_token), Method::DELETE, &one, None).await.0, 404);
    let read = stack.gql(&owner.access_token, AUTOMATIONS, json!({"h": h})).await;
    assert_eq!(read["data"]["household"]["automations"].as_array().map(Vec::len), Some(1), "{read}");
}

const RUNS: &str = "query($id: ID!) { automation(id: $id) { runs(first: 10) { id what outcome reason conditions steps finishedAt } } }";

/// The seed's example end to end: two members home, both leave (the
/// presence API); after the debounce the automation activates "Away": every
/// light gets `on: false` and the lock `locked: true`, the devices ack, and
/// the run's trace shows it. A flap shorter than the debounce does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_member_leaving_turns_every_light_off_and_locks_the_door() {
    use common::{eventually, spec};
    use homelink_kit::shutdown::CancellationToken;
    use homelink_tools::sim;
    use std::time::Duration;

    let stack = Stack::start().await;
    let devices =
        [(DeviceKind::Light, "Hall light", "Hall"), (DeviceKind::Light, "Lamp", "Living room"), (DeviceKind::Lock, "Door", "Hall")];
    let home = stack.household_with(&["adult"], &devices).await;
    let (owner, adult) = (&home.accounts[0], &home.accounts[1]);
    let h = home.household_id;
    let running = CancellationToken::new();
    for i in 0..3 {
        tokio::spawn(sim::run(spec(&home, i, None), stack.env.target(), None, running.clone()));
    }
    let shadows = || async {
        let rows: Vec<(Uuid, Option<Value>, bool)> = sqlx::query_as(
            "SELECT s.device_id, s.reported, s.online FROM device_shadows s JOIN devices d USING (device_id) WHERE d.household_id = $1",
        )
        .bind(h)
        .fetch_all(&stack.pool)
        .await
        .expect("shadows");
        rows
    };
    eventually(Duration::from_secs(30), "three devices online", || async {
        (shadows().await.iter().filter(|r| r.2).count() == 3).then_some(())
    })
    .await;
    // The lights on and the door unlocked, to begin with.
    let (lights, lock) = ([home.devices[0].id, home.devices[1].id], home.devices[2].id);
    for (d, set) in [(lights[0], json!({"on": true})), (lights[1], json!({"on": true})), (lock, json!({"locked": false}))] {
        let r = stack.command(&home, d).json(&json!({"set": set})).send().await.expect("command");
        assert_eq!(r.status().as_u16(), 202);
    }
    let state_is = |want: [(Uuid, &'static str, Value); 3]| {
        let want = want.clone();
        async move {
            let rows = shadows().await;
            want.iter().all(|(d, k, v)| rows.iter().any(|r| r.0 == *d && r.1.as_ref().and_then(|s| s.get(*k)) == Some(v)))
        }
    };
    eventually(Duration::from_secs(30), "lights on, door unlocked", || async {
        state_is([(lights[0], "on", json!(true)), (lights[1], "on", json!(true)), (lock, "locked", json!(false))]).await.then_some(())
    })
    .await;

    let base = format!("/v1/households/{h}");
    let away = json!({"name": "Away", "devices": [
        {"deviceId": lights[0], "set": {"on": false}}, {"deviceId": lights[1], "set": {"on": false}}, {"deviceId": lock, "set": {"locked": true}}]});
    let (status, scene) = stack.call(Some(&owner.access_token), Method::POST, &format!("{base}/scenes"), Some(away)).await;
    assert_eq!(status, 201, "{scene}");
    let leaving = json!({"name": "Leaving home", "definition": {
        "triggers": [{"type": "presence", "who": "last", "movement": "leave", "debounceSecs": 3}],
        "actions": [{"type": "scene", "sceneId": scene["sceneId"]}]}});
    let (status, automation) = stack.call(Some(&owner.access_token), Method::POST, &format!("{base}/automations"), Some(leaving)).await;
    assert_eq!(status, 201, "{automation}");
    let id = automation["automationId"].clone();
    stack.start_automation().await;

    let presence = |who: &homelink_tools::api::Account, state: &'static str| {
        let (token, url) = (who.access_token.clone(), format!("{base}/presence"));
        let stack = &stack;
        async move {
            let (status, body) = stack.call(Some(&token), Method::PUT, &url, Some(json!({"state": state}))).await;
            assert_eq!(status, 200, "{body}");
        }
    };
    presence(owner, "home").await;
    presence(adult, "home").await;
    presence(owner, "away").await;
    // A flap: the adult "leaves" and is back within the debounce.
    presence(adult, "away").await;
    presence(adult, "home").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let runs = stack.gql(&owner.access_token, RUNS, json!({"id": id})).await;
    assert_eq!(runs["data"]["automation"]["runs"].as_array().map(Vec::len), Some(0), "a flap shorter than the debounce: {runs}");
    assert!(state_is([(lights[0], "on", json!(true)), (lights[1], "on", json!(true)), (lock, "locked", json!(false))]).await);

    // Both away for real.
    presence(adult, "away").await;
    let run = eventually(Duration::from_secs(60), "the run done", || async {
        let r = stack.gql(&owner.access_token, RUNS, json!({"id": id})).await;
        let runs = r["data"]["automation"]["runs"].as_array()?.clone();
        runs.first().filter(|run| run["outcome"] == "done").cloned()
    })
    .await;
    assert_eq!(run["what"], "the last member left (held 3 s)", "{run}");
    assert_eq!(run["steps"][0]["outcome"], "sent", "{run}");
    let commands: Vec<String> =
        run["steps"][0]["commands"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_owned)).collect();
    assert_eq!(commands.len(), 3, "{run}");
    eventually(Duration::from_secs(30), "lights off, door locked", || async {
        state_is([(lights[0], "on", json!(false)), (lights[1], "on", json!(false)), (lock, "locked", json!(true))]).await.then_some(())
    })
    .await;
    for c in &commands {
        let q = stack.gql(&owner.access_token, "query($id: ID!) { command(id: $id) { status causedBy } }", json!({"id": c})).await;
        let status = q["data"]["command"]["status"].as_str().unwrap_or("").to_owned();
        assert!(status == "ok" || status == "confirmed", "{q}");
    }
    let runs = stack.gql(&owner.access_token, RUNS, json!({"id": id})).await;
    assert_eq!(runs["data"]["automation"]["runs"].as_array().map(Vec::len), Some(1), "exactly one run: {runs}");
    running.cancel();
}
