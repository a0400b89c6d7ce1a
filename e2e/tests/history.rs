//! A household's history exported from the log (issue 18, item 1): through
//! the command API (owner only, paged, audited) and `homelink history
//! export` as JSON lines, CSV and Parquet (read back with a Parquet
//! reader), as the owner and as an operator; the export equals what the
//! log holds for the household, in order, with the events the test caused.

mod common;

use common::raw::RawDevice;
use common::{eventually, Stack};
use homelink_events::DeviceKind;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use uuid::Uuid;

/// The history of `h` through the API, every page of `limit`, as JSON records.
async fn via_api(stack: &Stack, token: &str, h: Uuid, query: &[(&str, String)], limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q: Vec<(&str, String)> = query.to_vec();
        q.push(("limit", limit.to_string()));
        if let Some(a) = &after {
            q.push(("after", a.clone()));
        }
        let r = stack
            .http
            .get(format!("{}/v1/households/{h}/history", stack.api()))
            .bearer_auth(token)
            .query(&q)
            .send()
            .await
            .expect("history");
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.expect("json");
        let records = page["records"].as_array().expect("records");
        assert!(records.len() <= limit, "a page holds at most its limit");
        out.extend(records.iter().cloned());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return out,
        }
    }
}

fn cli(stack: &Stack, args: &[String]) -> String {
    let bin = stack.env.bin_dir.join("homelink");
    let out = Command::new(&bin).args(args).output().unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()));
    assert!(out.status.success(), "homelink {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("homelink-history-{}-{name}", Uuid::new_v4().simple()))
}

/// What identifies a record: its position and event.
fn key(r: &Value) -> (String, i64, String, String) {
    (
        r["topic"].as_str().expect("topic").to_owned(),
        r["offset"].as_i64().expect("offset"),
        r["eventId"].as_str().expect("eventId").to_owned(),
        r["type"].as_str().expect("type").to_owned(),
    )
}

fn read_parquet(path: &std::path::Path) -> Vec<Value> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType, UInt16Type};
    use arrow_array::Array;
    let file = std::fs::File::open(path).expect("parquet file");
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).expect("a parquet file").build().expect("reader");
    let mut out = Vec::new();
    for batch in reader {
        let b = batch.expect("a batch");
        let s = |name: &str| b.column_by_name(name).unwrap_or_else(|| panic!("column {name}")).as_string::<i32>().clone();
        let (topic, event_id, ty, actor_kind, actor_id, payload, device) =
            (s("topic"), s("event_id"), s("type"), s("actor_kind"), s("actor_id"), s("payload"), s("device_id"));
        let offset = b.column_by_name("offset").expect("offset").as_primitive::<Int64Type>().clone();
        let partition = b.column_by_name("partition").expect("partition").as_primitive::<Int32Type>().clone();
        let v = b.column_by_name("v").expect("v").as_primitive::<UInt16Type>().clone();
        let at = b.column_by_name("occurred_at").expect("occurred_at").as_primitive::<TimestampMicrosecondType>().clone();
        for i in 0..b.num_rows() {
            out.push(json!({
                "topic": topic.value(i), "partition": partition.value(i), "offset": offset.value(i), "eventId": event_id.value(i),
                "type": ty.value(i), "v": v.value(i), "actor": {"kind": actor_kind.value(i), "id": actor_id.value(i)},
                "occurredAtMicros": at.value(i),
                "deviceId": if device.is_null(i) { Value::Null } else { json!(device.value(i)) },
                "payload": serde_json::from_str::<Value>(payload.value(i)).expect("payload is JSON"),
            }));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_households_history_exports_from_the_log_in_every_format_owner_only_and_audited() {
    let stack = Stack::start().await;
    let mut home = stack.household_with(&["adult"], &[(DeviceKind::Light, "Lamp", "Hall"), (DeviceKind::Lock, "Door", "Hall")]).await;
    let h = home.household_id;
    let owner = home.accounts[0].access_token.clone();
    let adult = home.accounts[1].clone();
    let (lamp_id, door_id) = (home.devices[0].id, home.devices[1].id);

    // What the test does: reports, a command and its ack, a rename, a member removed.
    let mut lamp = RawDevice::connect(&stack, home.spec(0, None), Duration::from_secs(10)).await;
    for (seq, b) in [(1, 10), (2, 20), (3, 30)] {
        lamp.send("state", json!({"v": 1, "seq": seq, "state": {"on": true, "brightness": b}})).await;
    }
    common::reported(&stack, lamp_id, "brightness", json!(30)).await;
    let r = stack.command(&home, lamp_id).json(&json!({"set": {"brightness": 55}})).send().await.expect("command");
    assert_eq!(r.status(), 202);
    let command: Value = r.json().await.expect("json");
    let command_id = command["commandId"].as_str().expect("commandId").to_owned();
    let got = lamp.commands_within(Duration::from_secs(10)).await;
    assert!(got.iter().any(|c| c["commandId"] == json!(command_id)), "the lamp received its command: {got:?}");
    lamp.send("ack", json!({"v": 1, "commandId": command_id, "status": "ok"})).await;
    let (s, _) = stack
        .call(
            Some(&owner),
            reqwest::Method::PUT,
            &format!("/v1/households/{h}/devices/{door_id}/name"),
            Some(json!({"name": "Front door"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = stack.call(Some(&owner), reqwest::Method::DELETE, &format!("/v1/households/{h}/members/{}", adult.user_id), None).await;
    assert_eq!(s, 204);
    let pool = stack.pool.clone();
    let cid = Uuid::parse_str(&command_id).expect("uuid");
    eventually(Duration::from_secs(30), "the ack projected", || async {
        let s: Option<String> = sqlx::query_scalar("SELECT ack_status FROM device_commands WHERE command_id = $1")
            .bind(cid)
            .fetch_one(&pool)
            .await
            .ok()
            .flatten();
        (s.as_deref() == Some("ok")).then_some(())
    })
    .await;

    // The window ends now: what the stack appends later (an expiry, the
    // exports' own audit records) is outside it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let until = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let upto = [("until", until.to_rfc3339())];

    // The API: one page of everything equals many small pages.
    let all = via_api(&stack, &owner, h, &upto, 1000).await;
    let paged = via_api(&stack, &owner, h, &upto, 3).await;
    // Each page read is audited (on the audit topic), so later pages also
    // see the audit records of earlier ones: compared without them.
    let cut = |v: &[Value]| -> Vec<(String, i64, String, String)> {
        v.iter().filter(|r| r["topic"] != json!(stack.topics.audit())).map(key).collect()
    };
    assert_eq!(cut(&all), cut(&paged), "pages join up exactly");

    // It is the household's log: exactly the records keyed by it, each
    // topic's in log order, merged by time; and what the test caused is there.
    let types: Vec<&str> = all.iter().map(|r| r["type"].as_str().unwrap_or("")).collect();
    for t in [
        "HouseholdCreated",
        "DeviceRegistered",
        "MemberInvited",
        "MemberJoined",
        "DeviceCommandRequested",
        "DeviceCommandAcked",
        "DeviceRenamed",
        "MemberRemoved",
    ] {
        assert!(types.contains(&t), "{t} in the export: {types:?}");
    }
    assert!(all.iter().all(|r| r["payload"].is_object()), "every record has its payload");
    let seqs: Vec<i64> = all
        .iter()
        .filter(|r| r["type"] == "DeviceStateReported" && r["deviceId"] == json!(lamp_id))
        .map(|r| r["payload"]["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3], "the lamp's reports, in order");
    let times: Vec<String> = all.iter().map(|r| r["occurredAt"].as_str().expect("time").to_owned()).collect();
    let parsed: Vec<chrono::DateTime<chrono::Utc>> = times.iter().map(|t| t.parse().expect("RFC 3339")).collect();
    assert!(parsed.windows(2).all(|w| w[0] <= w[1]), "merged in time order");
    for topic in ["households", "commands", "telemetry", "audit"] {
        let offsets: Vec<i64> = all
            .iter()
            .filter(|r| r["topic"].as_str().is_some_and(|t| t.ends_with(topic)))
            .map(|r| r["offset"].as_i64().unwrap_or(-1))
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{topic} in log order: {offsets:?}");
    }
    let created = &all[0];
    assert_eq!(created["type"], "HouseholdCreated", "the history starts at the household's creation");
    assert_eq!(created["actor"]["kind"], "user");
    // The log itself, read independently of the export (every partition scanned).
    let now = chrono::Utc::now().timestamp_millis() + 60_000;
    let mut logged = 0;
    for topic in [stack.topics.households(), stack.topics.commands(), stack.topics.telemetry(), stack.topics.audit()] {
        let w = homelink_kit::reader::read_window(&stack.env.kafka, &topic, &h.to_string(), None, now, 1_000_000).await.expect("the log");
        let ids: Vec<String> = w.events.iter().filter(|e| e.occurred_at <= until).map(|e| e.event_id.to_string()).collect();
        let exported: Vec<String> =
            all.iter().filter(|r| r["topic"] == json!(topic)).map(|r| r["eventId"].as_str().unwrap_or("").to_owned()).collect();
        assert_eq!(ids, exported, "{topic}: the export holds exactly the household's records up to its end, in order");
        logged += exported.len();
    }
    assert_eq!(logged, all.len());

    // A window and a device filter.
    let since = parsed[parsed.len() / 2];
    let windowed = via_api(&stack, &owner, h, &[("since", since.to_rfc3339()), upto[0].clone()], 1000).await;
    assert!(!windowed.is_empty() && windowed.len() < all.len());
    assert!(windowed
        .iter()
        .all(|r| r["occurredAt"].as_str().and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok()).is_some_and(|t| t >= since)));
    let lamp_only = via_api(&stack, &owner, h, &[("device", lamp_id.to_string()), upto[0].clone()], 1000).await;
    assert!(lamp_only.len() >= 6 && lamp_only.iter().all(|r| r["deviceId"] == json!(lamp_id)), "{lamp_only:?}");

    // The CLI as the owner, in every format.
    let api = stack.api();
    let base = |format: &str, out: &PathBuf| {
        vec![
            "history".into(),
            "export".into(),
            "--household".into(),
            h.to_string(),
            "--format".into(),
            format.into(),
            "--out".into(),
            out.display().to_string(),
            "--api".into(),
            api.clone(),
            "--token".into(),
            owner.clone(),
            "--until".into(),
            until.to_rfc3339(),
        ]
    };
    let jsonl = tmp("export.jsonl");
    cli(&stack, &base("jsonl", &jsonl));
    let lines: Vec<Value> =
        std::fs::read_to_string(&jsonl).expect("jsonl").lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(cut(&lines), cut(&all), "JSON lines: the same records in the same order (audit records aside)");
    let from_api: std::collections::HashMap<String, &Value> =
        all.iter().map(|r| (r["eventId"].as_str().unwrap_or("").to_owned(), r)).collect();
    for l in &lines {
        if let Some(a) = from_api.get(l["eventId"].as_str().unwrap_or("")) {
            assert_eq!(&l["payload"], &a["payload"], "payloads equal");
            assert_eq!(&l["actor"], &a["actor"]);
        }
    }

    let csv_path = tmp("export.csv");
    cli(&stack, &base("csv", &csv_path));
    let mut rdr = csv::Reader::from_path(&csv_path).expect("csv");
    let header: Vec<String> = rdr.headers().expect("header").iter().map(str::to_owned).collect();
    assert_eq!(header[..6], ["topic", "partition", "offset", "event_id", "occurred_at", "type"]);
    let rows: Vec<Value> = rdr
        .records()
        .map(|r| {
            let r = r.expect("a CSV row");
            json!({"topic": &r[0], "offset": r[2].parse::<i64>().expect("offset"), "eventId": &r[3], "type": &r[5],
                   "payload": serde_json::from_str::<Value>(&r[14]).expect("payload JSON")})
        })
        .collect();
    assert_eq!(cut(&rows), cut(&all), "CSV: the same records in the same order");
    for r in &rows {
        if let Some(a) = from_api.get(r["eventId"].as_str().unwrap_or("")) {
            assert_eq!(&r["payload"], &a["payload"], "CSV payloads equal");
        }
    }

    let pq = tmp("export.parquet");
    cli(&stack, &base("parquet", &pq));
    let back = read_parquet(&pq);
    assert_eq!(cut(&back), cut(&all), "Parquet read back: the same records in the same order");
    for r in &back {
        if let Some(a) = from_api.get(r["eventId"].as_str().unwrap_or("")) {
            assert_eq!(&r["payload"], &a["payload"], "Parquet payloads equal");
            assert_eq!(&r["deviceId"], &a["deviceId"]);
            let t: chrono::DateTime<chrono::Utc> = a["occurredAt"].as_str().expect("t").parse().expect("t");
            assert_eq!(r["occurredAtMicros"], json!(t.timestamp_micros()), "typed UTC timestamps");
        }
    }

    // As an operator, straight from the log: the same records, and the
    // export is recorded in the household's audit log naming the operator.
    let op = tmp("operator.jsonl");
    cli(
        &stack,
        &[
            "history".into(),
            "export".into(),
            "--household".into(),
            h.to_string(),
            "--until".into(),
            until.to_rfc3339(),
            "--out".into(),
            op.display().to_string(),
            "--bootstrap".into(),
            stack.env.kafka.clone(),
            "--prefix".into(),
            stack.topics.prefix().to_owned(),
            "--operator".into(),
            "alice".into(),
        ],
    );
    let op_lines: Vec<Value> =
        std::fs::read_to_string(&op).expect("jsonl").lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(cut(&op_lines), cut(&all), "the operator's export is the owner's");

    // Who may: the adult (removed above) is told 403, a stranger 404, a
    // current adult 403; every attempt on the household is audited.
    let mut adult2 = stack.account("adult2").await;
    homelink_tools::api::add_member(&stack.http, &stack.api(), &home.accounts[0], h, &adult2, "adult").await.expect("add adult");
    adult2.role = Some("adult".into());
    home.accounts.push(adult2.clone());
    let mut removed = adult.clone();
    homelink_tools::api::sign_in(&stack.http, &stack.api(), &mut removed).await.expect("sign in");
    let stranger = stack.account("stranger").await;
    for (who, token, status) in
        [("removed member", &removed.access_token, 403), ("adult", &adult2.access_token, 403), ("stranger", &stranger.access_token, 404)]
    {
        let r = stack.http.get(format!("{}/v1/households/{h}/history", stack.api())).bearer_auth(token).send().await.expect("history");
        assert_eq!(r.status().as_u16(), status, "{who}");
        assert_eq!(r.headers()["content-type"], "application/problem+json", "{who}");
    }
    let r = stack.http.get(format!("{}/v1/households/{h}/history", stack.api())).send().await.expect("history");
    assert_eq!(r.status(), 401, "anonymous");
    for (bad, path) in [
        ("since=yesterday", "/since"),
        ("limit=0", "/limit"),
        ("limit=5001", "/limit"),
        ("after=1.2", "/after"),
        ("device=lamp", "/device"),
    ] {
        let r =
            stack.http.get(format!("{}/v1/households/{h}/history?{bad}", stack.api())).bearer_auth(&owner).send().await.expect("history");
        assert_eq!(r.status(), 400, "{bad}");
        let p: Value = r.json().await.expect("problem");
        assert!(p.to_string().contains(path), "{bad}: {p}");
    }
    let pool = stack.pool.clone();
    let (removed_id, adult2_id) = (removed.user_id.to_string(), adult2.user_id.to_string());
    eventually(Duration::from_secs(30), "exports and refusals in the audit log", || async {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT actor_id, outcome, status::text FROM audit_log WHERE household_id = $1 AND action = 'history.export' ORDER BY at",
        )
        .bind(h)
        .fetch_all(&pool)
        .await
        .ok()?;
        let has = |actor: &str, outcome: &str, status: &str| rows.iter().any(|r| r.0 == actor && r.1 == outcome && r.2 == status);
        let owner_reads = rows.iter().filter(|r| r.0 == home.accounts[0].user_id.to_string() && r.1 == "accepted").count();
        // Every page read is audited: the paged read alone took six.
        (owner_reads >= 8
            && has("operator:alice", "accepted", "200")
            && has(&removed_id, "denied", "403")
            && has(&adult2_id, "denied", "403"))
        .then_some(())
    })
    .await;
    for p in [jsonl, csv_path, pq, op] {
        let _ = std::fs::remove_file(p);
    }
}

const NOW: &str = "query($h: ID!) { household(id: $h) { name members { userId role } rooms { id name }
    devices { nodes { id name kind shadow { reported desired online } } } } }";
const AT: &str = "query($h: ID!, $at: DateTime!) { householdAt(id: $h, at: $at) { name version eventsFolded members { userId role }
    rooms { id name } devices { id name kind removed reported desired online lastSeen } } }";

/// What the app shows now, per device: name, reported, desired, online.
async fn shown(stack: &Stack, token: &str, h: Uuid) -> (Vec<(String, String)>, Vec<(String, String, Value, Value, bool)>) {
    let r = stack.gql(token, NOW, json!({"h": h})).await;
    let hh = &r["data"]["household"];
    let mut members: Vec<(String, String)> = hh["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["userId"].as_str().unwrap_or("").to_owned(), m["role"].as_str().unwrap_or("").to_lowercase()))
        .collect();
    members.sort();
    let mut devices: Vec<(String, String, Value, Value, bool)> = hh["devices"]["nodes"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            let s = &d["shadow"];
            let obj = |v: &Value| if v.is_object() { v.clone() } else { json!({}) };
            (
                d["id"].as_str().unwrap_or("").to_owned(),
                d["name"].as_str().unwrap_or("").to_owned(),
                obj(&s["reported"]),
                obj(&s["desired"]),
                s["online"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    (members, devices)
}

async fn past(
    stack: &Stack,
    token: &str,
    h: Uuid,
    at: chrono::DateTime<chrono::Utc>,
) -> (Vec<(String, String)>, Vec<(String, String, Value, Value, bool)>) {
    let r = stack.gql(token, AT, json!({"h": h, "at": at.to_rfc3339()})).await;
    let hh = &r["data"]["householdAt"];
    assert!(hh.is_object(), "{r}");
    let mut members: Vec<(String, String)> = hh["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["userId"].as_str().unwrap_or("").to_owned(), m["role"].as_str().unwrap_or("").to_lowercase()))
        .collect();
    members.sort();
    let mut devices: Vec<(String, String, Value, Value, bool)> = hh["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d["removed"] == false)
        .map(|d| {
            (
                d["id"].as_str().unwrap_or("").to_owned(),
                d["name"].as_str().unwrap_or("").to_owned(),
                d["reported"].clone(),
                d["desired"].clone(),
                d["online"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    (members, devices)
}

/// Now, to the microsecond (what Postgres and `householdAt` keep).
fn now_us() -> chrono::DateTime<chrono::Utc> {
    let now = chrono::Utc::now();
    chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_house_at_three_past_instants_is_what_it_showed_then_and_a_devices_timeline_lists_every_step() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Lamp", "Hall"), (DeviceKind::Lock, "Door", "Hall")]).await;
    let h = home.household_id;
    let owner = home.accounts[0].access_token.clone();
    let (lamp_id, door_id) = (home.devices[0].id, home.devices[1].id);
    let lamp = RawDevice::connect(&stack, home.spec(0, None), Duration::from_secs(10)).await;
    lamp.send("state", json!({"v": 1, "seq": 1, "state": {"on": true, "brightness": 10}})).await;
    common::reported(&stack, lamp_id, "brightness", json!(10)).await;
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    settle().await;
    let t1 = now_us();
    let at_t1 = shown(&stack, &owner, h).await;
    settle().await;

    // Then: the lamp renamed and brighter, a command waiting for the offline door, an adult joins.
    let (s, _) = stack
        .call(
            Some(&owner),
            reqwest::Method::PUT,
            &format!("/v1/households/{h}/devices/{lamp_id}/name"),
            Some(json!({"name": "Reading lamp"})),
        )
        .await;
    assert_eq!(s, 200);
    lamp.send("state", json!({"v": 1, "seq": 2, "state": {"brightness": 40}})).await;
    common::reported(&stack, lamp_id, "brightness", json!(40)).await;
    let r = stack.command(&home, door_id).json(&json!({"set": {"locked": true}, "ttlSeconds": 300})).send().await.expect("command");
    assert_eq!(r.status(), 202);
    let mut adult = stack.account("adult").await;
    homelink_tools::api::add_member(&stack.http, &stack.api(), &home.accounts[0], h, &adult, "adult").await.expect("adult");
    adult.role = Some("adult".into());
    eventually(Duration::from_secs(30), "the door's desired state and the adult shown", || async {
        let (m, d) = shown(&stack, &owner, h).await;
        (m.len() == 2 && d.iter().any(|x| x.0 == door_id.to_string() && x.3 == json!({"locked": true}))).then_some(())
    })
    .await;
    settle().await;
    let t2 = now_us();
    let at_t2 = shown(&stack, &owner, h).await;
    settle().await;

    // Then: the lamp reports once more and says it goes offline.
    lamp.send("state", json!({"v": 1, "seq": 3, "state": {"on": false}})).await;
    lamp.send("status", json!({"v": 1, "status": "offline"})).await;
    eventually(Duration::from_secs(30), "the lamp offline and off", || async {
        let (_, d) = shown(&stack, &owner, h).await;
        d.iter().any(|x| x.0 == lamp_id.to_string() && !x.4 && x.2["on"] == false).then_some(())
    })
    .await;
    settle().await;
    let t3 = now_us();
    let at_t3 = shown(&stack, &owner, h).await;

    assert_ne!(at_t1, at_t2);
    assert_ne!(at_t2, at_t3);
    // In time order: each fold starts from the snapshot the previous one
    // stored (the test stack stores every fold), and answers the same.
    let snap = "query($h: ID!, $at: DateTime!) { householdAt(id: $h, at: $at) { fromSnapshot eventsFolded } }";
    let from = |at: chrono::DateTime<chrono::Utc>| {
        let (stack, owner) = (&stack, &owner);
        async move {
            let r = stack.gql(owner, snap, json!({"h": h, "at": at.to_rfc3339()})).await;
            r["data"]["householdAt"]["fromSnapshot"].as_str().map(|t| t.parse::<chrono::DateTime<chrono::Utc>>().expect("time"))
        }
    };
    for (t, then) in [(t1, &at_t1), (t2, &at_t2), (t3, &at_t3)] {
        assert_eq!(&past(&stack, &owner, h, t).await, then, "the house at {t} is what the app showed then");
    }
    assert_eq!(from(t1).await, Some(t1), "the fold at t1 was stored");
    assert_eq!(from(t3).await, Some(t3), "the fold at t3 was stored");
    let between = t2 + (t3 - t2) / 2;
    assert_eq!(from(between).await, Some(t2), "an instant between starts from the snapshot before it");
    // Snapshots are derived: without them the answers are the same.
    sqlx::query("DELETE FROM household_snapshots WHERE household_id = $1").bind(h).execute(&stack.pool).await.expect("delete");
    for (t, then) in [(t3, &at_t3), (t1, &at_t1), (t2, &at_t2)] {
        assert_eq!(&past(&stack, &owner, h, t).await, then, "the house at {t} again, without snapshots");
    }
    // The adult sees it too; a stranger gets null; the future is refused.
    let r = stack.gql(&adult.access_token, AT, json!({"h": h, "at": t2.to_rfc3339()})).await;
    assert!(r["data"]["householdAt"]["devices"].as_array().is_some_and(|d| d.len() == 2), "{r}");
    let stranger = stack.account("stranger").await;
    let r = stack.gql(&stranger.access_token, AT, json!({"h": h, "at": t2.to_rfc3339()})).await;
    assert!(r["data"]["householdAt"].is_null(), "{r}");
    let r = stack.gql(&owner, AT, json!({"h": h, "at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{r}");

    // The lamp's timeline, a page of 2 at a time, every step in order.
    let q = "query($d: ID!, $after: String) { device(id: $d) { history(first: 2, after: $after) {
        edges { cursor node { type at position commandId payload } } pageInfo { hasNextPage } } } }";
    let mut types = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let r = stack.gql(&owner, q, json!({"d": lamp_id, "after": after})).await;
        let hist = &r["data"]["device"]["history"];
        let edges = hist["edges"].as_array().unwrap_or_else(|| panic!("{r}"));
        assert!(edges.len() <= 2);
        types.extend(edges.iter().map(|e| e["node"]["type"].as_str().unwrap_or("").to_owned()));
        if hist["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = edges.last().and_then(|e| e["cursor"].as_str()).map(str::to_owned);
    }
    let reports = types.iter().filter(|t| *t == "DeviceStateReported").count();
    assert_eq!(types.first().map(String::as_str), Some("DeviceRegistered"), "{types:?}");
    assert_eq!(reports, 3, "every report, not merged: {types:?}");
    assert!(types.contains(&"DeviceRenamed".to_owned()) && types.contains(&"DeviceStatusChanged".to_owned()), "{types:?}");
}
