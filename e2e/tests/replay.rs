//! `homelink replay` (issue 18, item 3): every read model rebuilt from the
//! log into a schema of its own while the live stack serves, a replay killed
//! (`kill -9`) halfway resumes where it stopped, the rebuilt tables equal the
//! live ones (rows and digests) and are switched in while the app reads on,
//! and a live table that does not match the log is found and nothing switched.

mod common;

use chrono::Utc;
use common::{eventually, spec, Stack};
use homelink_events::event::DeviceStateReported;
use homelink_events::{Actor, DeviceKind, Envelope, Event};
use homelink_kit::shutdown::CancellationToken;
use homelink_tools::seed::SeededHousehold;
use homelink_tools::sim;
use reqwest::Method;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

/// Reports appended the way the bridge appends them: with the taps, the
/// simulated devices and the household's own events, over 100,000 events.
const BULK: u64 = 100_000;

fn replay_args(stack: &Stack, schema: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "replay",
        "--database-url",
        &stack.db_url,
        "--bootstrap",
        &stack.env.kafka,
        "--prefix",
        stack.topics.prefix(),
        "--schema",
        schema,
        "--batch-max",
        "2000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn homelink(stack: &Stack) -> Command {
    let mut c = Command::new(stack.env.bin_dir.join("homelink"));
    c.env_remove("HOMELINK_DATABASE_URL").env_remove("HOMELINK_KAFKA_BOOTSTRAP").env_remove("HOMELINK_TOPIC_PREFIX");
    c
}

/// The sum of the committed positions in `schema`'s `projector_offsets` (0 when there is none yet).
async fn positions(stack: &Stack, schema: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(&format!("SELECT sum(next_offset)::bigint FROM {schema}.projector_offsets"))
        .fetch_one(&stack.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Waits until the live projector has applied every record in the log.
async fn live_at_log_end(stack: &Stack) -> i64 {
    let parts = homelink_kit::reader::partitions(&stack.env.kafka, &stack.topics.projected()).await.expect("partitions");
    let mut end = 0;
    for (t, p) in &parts {
        end += stack.appender.high_watermark(t, *p, Duration::from_secs(10)).await.expect("high watermark");
    }
    eventually(Duration::from_secs(240), "the live projector at the log's end", || async {
        (positions(stack, "public").await == end).then_some(())
    })
    .await;
    end
}

fn sensor_report(home: &SeededHousehold, device: Uuid, seq: u64, temperature: f64) -> Envelope {
    let mut state = sim::initial_state(DeviceKind::Sensor);
    state.insert("temperature".into(), json!(temperature));
    let ev = Event::DeviceStateReported(DeviceStateReported { device_id: device, seq, device_ts: None, state, battery: None });
    Envelope::new(home.household_id, Actor::Device(device), &ev, Utc::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_killed_halfway_resumes_rebuilds_equal_read_models_and_switches_over_while_the_app_reads_on() {
    let stack = Stack::start().await;
    let mut devices = vec![(DeviceKind::Light, "Lamp", "Hall"), (DeviceKind::Lock, "Front door", "Hall")];
    for i in 0..8 {
        devices.push((DeviceKind::Sensor, ["Kitchen", "Cellar", "Attic", "Porch", "Bath", "Study", "Garage", "Shed"][i], "Hall"));
    }
    let home = stack.household_with(&["adult", "child"], &devices).await;
    let owner = &home.accounts[0];
    let h = home.household_id;

    // Real devices answer taps: requests, deliveries, acks, confirmations, audit rows.
    let running = CancellationToken::new();
    for i in 0..2 {
        tokio::spawn(sim::run(spec(&home, i, None), stack.env.target(), None, running.clone()));
    }
    let connected = async {
        let q = "query($h: ID!) { household(id: $h) { devices { nodes { shadow { online } } } } }";
        eventually(Duration::from_secs(30), "lamp and lock online", || async {
            let r = stack.gql(&owner.access_token, q, json!({"h": h})).await;
            let nodes = r["data"]["household"]["devices"]["nodes"].as_array()?.clone();
            (nodes.iter().filter(|n| n["shadow"]["online"] == true).count() >= 2).then_some(())
        })
        .await
    };
    connected.await;
    for i in 0..20 {
        let (device, set) = if i % 2 == 0 {
            (home.devices[0].id, json!({"brightness": 10 + i}))
        } else {
            (home.devices[1].id, json!({"locked": i % 4 == 1}))
        };
        let r = stack.command(&home, device).json(&json!({ "set": set })).send().await.expect("command");
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Membership and registry changes: a room, a member removed.
    let (status, _) =
        stack.call(Some(&owner.access_token), Method::POST, &format!("/v1/households/{h}/rooms"), Some(json!({"name": "Loft"}))).await;
    assert_eq!(status, 201);
    let child = home.accounts[2].user_id;
    let (status, _) = stack.call(Some(&owner.access_token), Method::DELETE, &format!("/v1/households/{h}/members/{child}"), None).await;
    assert_eq!(status, 204);

    // The bulk: sensors' reports, as the bridge appends them.
    let telemetry = stack.topics.telemetry();
    let sensors: Vec<Uuid> = home.devices[2..].iter().map(|d| d.id).collect();
    let mut pending = Vec::new();
    for i in 0..BULK {
        let device = sensors[(i % sensors.len() as u64) as usize];
        let env = sensor_report(&home, device, i + 1, 15.0 + (i % 100) as f64 / 10.0);
        loop {
            match stack.appender.enqueue(&telemetry, &env) {
                Ok(wait) => {
                    pending.push(wait);
                    break;
                }
                Err(_) => {
                    for w in pending.drain(..) {
                        w.await.expect("appended");
                    }
                }
            }
        }
        if pending.len() >= 10_000 {
            for w in pending.drain(..) {
                w.await.expect("appended");
            }
        }
    }
    for w in pending.drain(..) {
        w.await.expect("appended");
    }
    // Let the taps finish, then quiet the log.
    eventually(Duration::from_secs(60), "every tap confirmed or superseded", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM device_commands WHERE household_id = $1 AND confirmed_at IS NULL AND expired_at IS NULL AND superseded_at IS NULL",
        )
        .bind(h)
        .fetch_one(&stack.pool)
        .await
        .ok()?;
        (open == 0).then_some(())
    })
    .await;
    running.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let total = live_at_log_end(&stack).await;
    assert!(total > BULK as i64, "the log holds {total} records");

    // A replay killed halfway (kill -9) leaves its positions with its rows.
    let schema = "replay_e2e";
    let mut child = homelink(&stack)
        .args(replay_args(&stack, schema, &["--fresh"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("homelink replay");
    eventually(Duration::from_secs(240), "the replay halfway", || async {
        let at = positions(&stack, schema).await;
        (at >= total / 3).then_some(at)
    })
    .await;
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    let left = positions(&stack, schema).await;
    assert!(left > 0 && left < total, "killed halfway: {left} of {total}");

    // Restarted, it resumes, compares and switches over.
    let out = homelink(&stack).args(replay_args(&stack, schema, &["--switch", "--json"])).output().expect("homelink replay");
    assert!(out.status.success(), "replay failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("the JSON report");
    assert_eq!(report["equal"], true, "{report:#}");
    let applied = report["applied"].as_i64().expect("applied");
    assert!(applied <= total - left + 10, "resumed at its positions: applied {applied} after {left} of {total}");
    let tables = report["tables"].as_array().expect("tables");
    let rows = |name: &str| -> i64 {
        let t = tables.iter().find(|t| t["table"] == name).unwrap_or_else(|| panic!("table {name} compared: {report:#}"));
        assert_eq!(t["live"], t["rebuilt"], "{name}");
        t["rebuilt"]["rows"].as_i64().expect("rows")
    };
    assert_eq!(rows("devices"), 10);
    assert_eq!(rows("device_shadows"), 10);
    assert_eq!(rows("device_commands"), 20);
    assert_eq!(rows("household_members"), 2);
    assert!(rows("audit_log") >= 22);
    assert!(rows("rooms") >= 2);
    for t in ["households", "household_event_counts", "projector_offsets", "automations", "scenes"] {
        rows(t);
    }
    let replaced = report["replaced"].as_str().expect("switched").to_owned();
    let gone: bool = sqlx::query_scalar("SELECT to_regnamespace($1) IS NULL").bind(schema).fetch_one(&stack.pool).await.expect("schema");
    assert!(gone, "the emptied replay schema is dropped");
    let kept: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {replaced}.device_shadows")).fetch_one(&stack.pool).await.expect("replaced");
    assert_eq!(kept, 10, "the replaced tables are kept aside");

    // The live projector writes on into the switched-in tables, and the app reads them.
    let kitchen = sensors[0];
    stack.appender.append(&telemetry, &sensor_report(&home, kitchen, BULK + 10, 33.3)).await.expect("append");
    let q = "query($h: ID!) { household(id: $h) { devices { nodes { id shadow { reported } } } } }";
    eventually(Duration::from_secs(30), "the report after the switch in the app", || async {
        let r = stack.gql(&owner.access_token, q, json!({"h": h})).await;
        let nodes = r["data"]["household"]["devices"]["nodes"].as_array()?.clone();
        nodes.iter().any(|n| n["id"] == json!(kitchen) && n["shadow"]["reported"]["temperature"] == json!(33.3)).then_some(())
    })
    .await;
    // Members still see the household: membership moved with the rest.
    let adult = &home.accounts[1];
    let r = stack.gql(&adult.access_token, "query($h: ID!) { household(id: $h) { myRole members { role } } }", json!({"h": h})).await;
    assert_eq!(r["data"]["household"]["myRole"], "adult", "{r}");
    assert_eq!(r["data"]["household"]["members"].as_array().map(Vec::len), Some(2), "{r}");

    // A live row that is not what the log says: found, and nothing switched.
    live_at_log_end(&stack).await;
    let cellar = sensors[1];
    sqlx::query("UPDATE device_shadows SET reported = '{}' WHERE device_id = $1").bind(cellar).execute(&stack.pool).await.expect("tamper");
    let out = homelink(&stack)
        .args(replay_args(&stack, "replay_e2e_check", &["--switch", "--json", "--fresh"]))
        .output()
        .expect("homelink replay");
    assert!(!out.status.success(), "a difference fails the replay");
    let report: Value = serde_json::from_slice(&out.stdout).expect("the JSON report");
    assert_eq!(report["equal"], false);
    assert!(report["replaced"].is_null(), "nothing switched: {report:#}");
    for t in report["tables"].as_array().expect("tables") {
        assert_eq!(t["equal"], t["table"] != "device_shadows", "{t}");
    }
    let still: Value = sqlx::query_scalar("SELECT reported FROM device_shadows WHERE device_id = $1")
        .bind(cellar)
        .fetch_one(&stack.pool)
        .await
        .expect("row");
    assert_eq!(still, json!({}), "the live table was left as it was");
}
