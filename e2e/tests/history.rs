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
        ("limit=1001", "/limit"),
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
