//! The dry run (issue 17, item 9) through the running services: an
//! automation that is not saved, played over the household's recorded
//! history read from the log, lists when it would have fired and what it
//! would have done, and sends nothing; the roles table and bad input.

mod common;

use common::{publish_as, spec, Stack};
use homelink_events::DeviceKind;
use serde_json::{json, Value};
use std::time::Duration;

const DRY_RUN: &str = "query($h: ID!, $d: JSON!, $since: DateTime!, $until: DateTime!) {
  automationDryRun(householdId: $h, definition: $d, since: $since, until: $until) {
    events truncated
    firings { at trigger what outcome reason conditions finishedAt actions { at step kind deviceId set sceneId detail } }
  }
}";

fn contact(seq: u64, closed: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": 1, "seq": seq, "state": {"contact": closed}})).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_over_the_recorded_history_lists_its_firings_and_sends_nothing() {
    let stack = Stack::start().await;
    let devices = [(DeviceKind::Light, "Porch", "Garden"), (DeviceKind::Sensor, "Gate", "Garden")];
    let home = stack.household_with(&["adult", "child"], &devices).await;
    let stranger = stack.seed(&devices).await.accounts[0].clone();
    let (owner, adult, child) = (&home.accounts[0], &home.accounts[1], &home.accounts[2]);
    let (light, gate) = (home.devices[0].id, home.devices[1].id);
    let h = home.household_id;

    // History: the gate opens twice (and closes), a second apart.
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    let gate_spec = spec(&home, 1, None);
    let topic = format!("home/{h}/device/{gate}/state");
    for (seq, closed) in [(1, true), (2, false), (3, true), (4, false), (5, true)] {
        publish_as(&stack, &gate_spec, topic.clone(), contact(seq, closed)).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    common::reported(&stack, gate, "contact", json!(true)).await;
    let until = chrono::Utc::now();

    // The gate left open for 1 s: the porch light on, 2 s later off.
    let definition = json!({
        "triggers": [{"type": "state", "deviceId": gate, "capability": "contact", "to": false, "forSecs": 1}],
        "actions": [{"type": "command", "deviceId": light, "set": {"on": true}}, {"type": "delay", "secs": 2},
                    {"type": "command", "deviceId": light, "set": {"on": false}}],
        "mode": "single"
    });
    let vars = |d: &Value| json!({"h": h, "d": d, "since": since.to_rfc3339(), "until": until.to_rfc3339()});
    let r = stack.gql(&adult.access_token, DRY_RUN, vars(&definition)).await;
    let run = &r["data"]["automationDryRun"];
    let firings = run["firings"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(firings.len(), 2, "the gate was left open twice: {r}");
    assert!(run["events"].as_i64().is_some_and(|n| n >= 5), "{r}");
    assert_eq!(run["truncated"], false);
    for f in firings {
        assert_eq!((f["outcome"].as_str(), f["trigger"].as_i64()), (Some("run"), Some(0)), "{f}");
        assert!(f["what"].as_str().is_some_and(|w| w.starts_with("contact: false")), "{f}");
        let at = chrono::DateTime::parse_from_rfc3339(f["at"].as_str().expect("at")).expect("time");
        assert!(at >= since && at <= until, "{f}");
        let actions: Vec<(&str, Value)> =
            f["actions"].as_array().into_iter().flatten().map(|a| (a["kind"].as_str().unwrap_or_default(), a["set"].clone())).collect();
        assert_eq!(actions[0], ("command", json!({"on": true})), "{f}");
        assert_eq!(actions[1].0, "delay");
        assert_eq!(f["actions"][0]["deviceId"], json!(light.to_string()));
    }
    // Each firing 1 s after the gate opened (the `for`), in recorded time;
    // the first run's delay ends inside the window: the light off 2 s later.
    let at = |f: &Value, k: &str| chrono::DateTime::parse_from_rfc3339(f[k].as_str().unwrap_or_default()).expect("time");
    assert!((at(&firings[1], "at") - at(&firings[0], "at")).num_milliseconds() >= 2000, "{r}");
    assert_eq!(firings[0]["actions"][2]["set"], json!({"on": false}), "{r}");
    assert_eq!((at(&firings[0]["actions"][2], "at") - at(&firings[0], "at")).num_seconds(), 2, "{r}");
    assert_eq!(firings[0]["finishedAt"], firings[0]["actions"][2]["at"], "{r}");

    // Nothing was sent, nothing stored.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands WHERE household_id = $1")
        .bind(h)
        .fetch_one(&stack.pool)
        .await
        .expect("count");
    assert_eq!(commands, 0, "a dry run sends no command");
    let automations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM automations WHERE household_id = $1").bind(h).fetch_one(&stack.pool).await.expect("count");
    assert_eq!(automations, 0, "a dry run saves nothing");

    // A condition that never held: the firings are listed, nothing planned.
    let mut guarded = definition.clone();
    guarded["conditions"] = json!([{"type": "state", "deviceId": gate, "capability": "contact", "equals": true}]);
    let r = stack.gql(&owner.access_token, DRY_RUN, vars(&guarded)).await;
    let firings = r["data"]["automationDryRun"]["firings"].as_array().cloned().unwrap_or_else(|| panic!("{r}"));
    assert!(!firings.is_empty() && firings.iter().all(|f| f["outcome"] == "conditions" && f["actions"] == json!([])), "{r}");
    assert_eq!(firings[0]["conditions"][0]["path"], "/conditions/0", "{r}");

    // The roles table: children and strangers may not; no token, no answer.
    let code = |r: &Value| r["errors"][0]["extensions"]["code"].as_str().map(str::to_owned);
    let r = stack.gql(&child.access_token, DRY_RUN, vars(&definition)).await;
    assert_eq!(code(&r).as_deref(), Some("FORBIDDEN"), "{r}");
    let r = stack.gql(&stranger.access_token, DRY_RUN, vars(&definition)).await;
    assert_eq!(code(&r).as_deref(), Some("NOT_FOUND"), "{r}");

    // Bad input: the path of the fault; an upside-down or too wide window.
    let foreign = json!({"triggers": [{"type": "state", "deviceId": uuid::Uuid::now_v7(), "capability": "contact"}],
                         "actions": [{"type": "command", "deviceId": light, "set": {"on": true}}]});
    let r = stack.gql(&owner.access_token, DRY_RUN, vars(&foreign)).await;
    assert_eq!(code(&r).as_deref(), Some("BAD_USER_INPUT"), "{r}");
    assert_eq!(r["errors"][0]["extensions"]["path"], "/definition/triggers/0/deviceId", "{r}");
    let r = stack.gql(&owner.access_token, DRY_RUN, vars(&json!({"triggers": [], "actions": "x\u{0}"}))).await;
    assert_eq!(code(&r).as_deref(), Some("BAD_USER_INPUT"), "{r}");
    let wide = json!({"h": h, "d": definition, "since": (until - chrono::Duration::days(8)).to_rfc3339(), "until": until.to_rfc3339()});
    let r = stack.gql(&owner.access_token, DRY_RUN, wide).await;
    assert_eq!(code(&r).as_deref(), Some("BAD_USER_INPUT"), "{r}");
    let upside = json!({"h": h, "d": definition, "since": until.to_rfc3339(), "until": since.to_rfc3339()});
    let r = stack.gql(&owner.access_token, DRY_RUN, upside).await;
    assert_eq!(code(&r).as_deref(), Some("BAD_USER_INPUT"), "{r}");
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let future = json!({"h": h, "d": definition, "since": later.to_rfc3339(), "until": (later + chrono::Duration::hours(1)).to_rfc3339()});
    let r = stack.gql(&owner.access_token, DRY_RUN, future).await;
    assert_eq!(code(&r).as_deref(), Some("BAD_USER_INPUT"), "nothing is recorded in the future: {r}");
}
