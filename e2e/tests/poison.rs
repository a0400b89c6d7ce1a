//! Poison records and ambiguous commits (issue 9, defects 1 and 7).
//!
//! - A NUL character is refused at every edge (HTTP, MQTT, GraphQL) with a
//!   clear error.
//! - A record the projector cannot apply — written to the log behind the
//!   edges' backs, or not even an envelope — is recorded in
//!   `projector_dead_letters` with its position and reason, counted, and the
//!   projection moves on: later records of the same partitions apply.
//! - A COMMIT that reaches disk while the projector sees the connection drop
//!   is not applied a second time on retry.

mod common;

use chrono::Utc;
use common::{eventually, isolated, light_and_sensor, publish_as, state, Stack};
use homelink_events::event::{DeviceCommandAcked, DeviceStateReported, HouseholdCreated};
use homelink_events::protocol::AckStatus;
use homelink_events::{Actor, Envelope, Event};
use homelink_kit::kafka::{Appender, ProducerConfig};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

async fn dead_letters(pool: &sqlx::PgPool) -> Vec<(String, i32, i64, String)> {
    sqlx::query_as("SELECT topic, partition, \"offset\", reason FROM projector_dead_letters ORDER BY topic, partition, \"offset\"")
        .fetch_all(pool)
        .await
        .expect("dead letters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_record_is_dead_lettered_and_the_projection_moves_on() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let light = home.devices[0].id;
    let sys = Actor::System("attacker".into());

    // Behind the edges' backs: a household name and an ack reason with a NUL,
    // and a record that is not an envelope at all.
    let poisoned_home = Uuid::new_v4();
    let created = |name: &str| {
        Envelope::new(
            poisoned_home,
            sys.clone(),
            &Event::HouseholdCreated(HouseholdCreated { name: name.into(), created_by: None }),
            Utc::now(),
        )
    };
    let bad_name = stack.appender.append(&stack.topics.households(), &created("a\u{0}b")).await.expect("append");
    let ack = Event::DeviceCommandAcked(DeviceCommandAcked {
        command_id: Uuid::new_v4(),
        device_id: light,
        status: AckStatus::Rejected,
        reason: Some("x\u{0}y".into()),
    });
    let ack_env = Envelope::new(home.household_id, Actor::Device(light), &ack, Utc::now());
    let bad_ack = stack.appender.append(&stack.topics.telemetry(), &ack_env).await.expect("append");
    let key = homelink_events::topics::household_key(home.household_id);
    let garbage = stack.appender.append_raw(&stack.topics.telemetry(), &key, b"\x00not an envelope").await.expect("append");
    // A report whose seq does not fit Postgres's bigint (the MQTT edge refuses it).
    let huge = Event::DeviceStateReported(DeviceStateReported {
        device_id: light,
        seq: u64::MAX,
        device_ts: None,
        state: json!({"brightness": 99}).as_object().cloned().unwrap_or_default(),
        battery: None,
    });
    let bad_seq = stack
        .appender
        .append(&stack.topics.telemetry(), &Envelope::new(home.household_id, Actor::Device(light), &huge, Utc::now()))
        .await
        .expect("append");

    // After them, on the same partitions: a valid creation of that household
    // and a report of the light, appended to the log.
    stack.appender.append(&stack.topics.households(), &created("Fine name")).await.expect("append");
    let report = Event::DeviceStateReported(DeviceStateReported {
        device_id: light,
        seq: 5,
        device_ts: None,
        state: json!({"brightness": 21}).as_object().cloned().unwrap_or_default(),
        battery: None,
    });
    stack
        .appender
        .append(&stack.topics.telemetry(), &Envelope::new(home.household_id, Actor::Device(light), &report, Utc::now()))
        .await
        .expect("append");
    // And a report through the real device path.
    let spec = common::spec(&home, 0, None);
    publish_as(&stack, &spec, format!("home/{}/device/{light}/state", home.household_id), state(9, 42)).await;

    let pool = stack.pool.clone();
    eventually(Duration::from_secs(60), "the household after the poison applied", || async {
        let name: Option<String> = sqlx::query_scalar("SELECT name FROM households WHERE household_id = $1")
            .bind(poisoned_home)
            .fetch_optional(&pool)
            .await
            .ok()?;
        (name.as_deref() == Some("Fine name")).then_some(())
    })
    .await;
    eventually(Duration::from_secs(60), "the device report after the poison applied", || async {
        let (seq, reported): (i64, Value) = sqlx::query_as("SELECT seq, reported FROM device_shadows WHERE device_id = $1")
            .bind(light)
            .fetch_optional(&pool)
            .await
            .ok()??;
        (seq == 9 && reported["brightness"] == 42).then_some(())
    })
    .await;
    let dead = eventually(Duration::from_secs(60), "four dead letters", || async {
        let d = dead_letters(&pool).await;
        (d.len() == 4).then_some(d)
    })
    .await;
    let at = |p: &homelink_kit::kafka::Position, topic: &str| {
        dead.iter()
            .find(|d| d.0 == topic && d.1 == p.partition && d.2 == p.offset)
            .cloned()
            .unwrap_or_else(|| panic!("no dead letter at {topic} {p:?}: {dead:?}"))
    };
    assert!(at(&bad_name, &stack.topics.households()).3.contains("0x00"), "the reason names the byte: {dead:?}");
    at(&bad_ack, &stack.topics.telemetry());
    assert!(!at(&garbage, &stack.topics.telemetry()).3.is_empty(), "the undecodable record has a reason");
    assert!(at(&bad_seq, &stack.topics.telemetry()).3.contains("seq"));
    let n = stack.metric(stack.projector_port, "homelink_projector_errors_total{kind=\"dead_letter\"}").await;
    assert_eq!(n, 4.0, "each dead letter counted once");
    // The poisoned ack left no command row behind.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands").fetch_one(&pool).await.expect("count");
    assert_eq!(rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_character_is_refused_at_every_edge() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let owner = &home.accounts[0].access_token;

    // HTTP: a household name, and a room name, with a NUL.
    for (path, body) in [
        ("/v1/households".to_owned(), json!({"name": "a\u{0}b"})),
        (format!("/v1/households/{}/rooms", home.household_id), json!({"name": "x\u{0}"})),
    ] {
        let r = stack.http.post(format!("{}{path}", stack.api())).bearer_auth(owner).json(&body).send().await.expect("post");
        assert_eq!(r.status(), 400, "{path}");
        let p: Value = r.json().await.expect("problem");
        assert_eq!(p["type"], "https://homelink.dev/problems/invalid-request");
        assert!(p["detail"].as_str().is_some_and(|d| d.contains("NUL")), "{p}");
    }

    // GraphQL: in a variable, and as an escape in the document.
    let r = stack.gql(owner, "query($h: ID!) { household(id: $h) { name } }", json!({"h": "a\u{0}b"})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{r}");
    let r = stack.gql(owner, r#"{ household(id: "a\u0000b") { name } }"#, json!({})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{r}");

    // MQTT: an ack whose reason holds a NUL goes to the dead-letter topic.
    let spec = common::spec(&home, 0, None);
    let ack = json!({"v": 1, "commandId": Uuid::new_v4(), "status": "rejected", "reason": "a\u{0}b"});
    let topic = format!("home/{}/device/{}/ack", home.household_id, spec.device_id);
    publish_as(&stack, &spec, topic, serde_json::to_vec(&ack).expect("json")).await;
    eventually(Duration::from_secs(30), "the NUL ack dead-lettered by the bridge", || async {
        (stack.metric(stack.bridge_port, "homelink_bridge_errors_total{kind=\"invalid_nul\"}").await == 1.0).then_some(())
    })
    .await;
    assert!(dead_letters(&stack.pool).await.is_empty(), "nothing reached the projector");
    let households: i64 = sqlx::query_scalar("SELECT count(*) FROM households").fetch_one(&stack.pool).await.expect("count");
    assert_eq!(households, 1);
}

/// A TCP proxy in front of Postgres that, once armed, forwards the next
/// COMMIT to the server and then cuts the client off before the answer comes
/// back: the transaction commits, the client sees an I/O error.
struct CommitCutter {
    port: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
}

impl CommitCutter {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (a, c) = (a.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let cut = Arc::new(tokio::sync::Notify::new());
                    let cut2 = cut.clone();
                    let down = tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            tokio::select! {
                                _ = cut2.notified() => return,
                                n = sr.read(&mut buf) => match n {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => if cw.write_all(&buf[..n]).await.is_err() { return },
                                },
                            }
                        }
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let commit = buf[..n].windows(6).any(|w| w.eq_ignore_ascii_case(b"COMMIT"));
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if commit && a.swap(false, Ordering::SeqCst) {
                            // The server has the COMMIT; the client never hears back.
                            cut.notify_one();
                            c.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            break;
                        }
                    }
                    down.abort();
                });
            }
        });
        Self { port, armed, cuts }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_that_landed_although_the_connection_dropped_is_not_applied_twice() {
    let (env, topics, db_url) = isolated().await;
    let url = url_parts(&db_url);
    let cutter = CommitCutter::start(url.0).await;
    let proxied = format!("postgres://{}@127.0.0.1:{}/{}", url.1, cutter.port, url.2);

    let mut cfg = homelink_projector::Config::new(&proxied, &env.kafka, topics.clone());
    cfg.fetch_wait = Duration::from_millis(100);
    let app = homelink_projector::Application::build(cfg).await.expect("projector");
    let cancel = homelink_kit::shutdown::CancellationToken::new();
    tokio::spawn(app.run_until_stopped(cancel.clone()));
    let pool = sqlx::PgPool::connect(&db_url).await.expect("pool");

    let appender = Appender::new(&ProducerConfig::new(&env.kafka)).expect("producer");
    let (h, d) = (Uuid::new_v4(), Uuid::new_v4());
    let total = 40u64;
    cutter.armed.store(true, Ordering::SeqCst);
    for seq in 1..=total {
        let ev = Event::DeviceStateReported(DeviceStateReported {
            device_id: d,
            seq,
            device_ts: None,
            state: json!({"brightness": seq}).as_object().cloned().unwrap_or_default(),
            battery: None,
        });
        appender.append(&topics.telemetry(), &Envelope::new(h, Actor::Device(d), &ev, Utc::now())).await.expect("append");
    }
    eventually(Duration::from_secs(60), "every report applied", || async {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT sum(applied)::bigint FROM household_event_counts").fetch_one(&pool).await.ok().flatten();
        (n.unwrap_or(0) >= total as i64).then_some(())
    })
    .await;
    assert_eq!(cutter.cuts.load(Ordering::SeqCst), 1, "one COMMIT was cut off");
    // Give a second application every chance to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n: i64 = sqlx::query_scalar("SELECT sum(applied)::bigint FROM household_event_counts").fetch_one(&pool).await.expect("sum");
    assert_eq!(n, total as i64, "each report applied once");
    cancel.cancel();
}

/// `(server address, user, database)` of a `postgres://user@host:port/db` URL.
fn url_parts(url: &str) -> (std::net::SocketAddr, String, String) {
    let rest = url.strip_prefix("postgres://").expect("postgres url");
    let (user, rest) = rest.split_once('@').expect("user");
    let (addr, db) = rest.split_once('/').expect("database");
    (addr.parse().expect("host:port"), user.to_owned(), db.to_owned())
}
