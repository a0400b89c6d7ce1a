//! The projector under restarts: killed (SIGKILL) several times in the middle
//! of a stream, it loses nothing and applies nothing twice — its read models
//! equal those of an uninterrupted rebuild. And events that arrive by both the
//! push channel and the catch-up consumer are applied once.

mod common;

use chrono::Utc;
use common::{eventually, isolated};
use homelink_events::event::{DeviceRegistered, DeviceStateReported, DeviceStatusChanged, HouseholdCreated};
use homelink_events::{Actor, DeviceKind, Envelope, Event, Topics};
use homelink_kit::kafka::{Appender, Position, ProducerConfig};
use homelink_kit::push::Located;
use serde_json::json;
use sqlx::PgPool;
use std::process::{Child, Command};
use std::time::Duration;
use uuid::Uuid;

const DEVICES: usize = 4;
const REPORTS: u64 = 250;

/// Appends a household's history: registrations, reports, and a status flip every 25 reports.
async fn append_history(appender: &Appender, topics: &Topics) -> (Vec<(String, Position, Envelope)>, usize) {
    let h = Uuid::new_v4();
    let sys = Actor::System("test".into());
    let mut out = Vec::new();
    let mut push = |topic: String, e: Envelope| out.push((topic, e));
    push(
        topics.households(),
        Envelope::new(h, sys.clone(), &Event::HouseholdCreated(HouseholdCreated { name: "H".into(), created_by: None }), Utc::now()),
    );
    let devices: Vec<Uuid> = (0..DEVICES).map(|_| Uuid::new_v4()).collect();
    for d in &devices {
        let ev = Event::DeviceRegistered(DeviceRegistered {
            device_id: *d,
            kind: DeviceKind::Light,
            name: "L".into(),
            room: None,
            room_id: None,
            serial: None,
            cert_serial: None,
            broker: None,
            report_interval_secs: None,
        });
        push(topics.households(), Envelope::new(h, sys.clone(), &ev, Utc::now()));
    }
    for seq in 1..=REPORTS {
        for d in &devices {
            let state = json!({"brightness": (seq % 100), "on": seq % 2 == 0}).as_object().cloned().unwrap_or_default();
            let ev = Event::DeviceStateReported(DeviceStateReported { device_id: *d, seq, device_ts: None, state, battery: None });
            push(topics.telemetry(), Envelope::new(h, Actor::Device(*d), &ev, Utc::now()));
            if seq % 25 == 0 {
                let ev = Event::DeviceStatusChanged(DeviceStatusChanged { device_id: *d, online: seq % 50 != 0 });
                push(topics.telemetry(), Envelope::new(h, Actor::Device(*d), &ev, Utc::now()));
            }
        }
    }
    let total = out.len();
    let mut located = Vec::with_capacity(total);
    for chunk in out.chunks(200) {
        let results = futures::future::join_all(chunk.iter().map(|(t, e)| appender.append(t, e))).await;
        for ((t, e), r) in chunk.iter().zip(results) {
            located.push((t.clone(), r.expect("append"), e.clone()));
        }
    }
    (located, total)
}

fn spawn_projector(env: &common::Env, db_url: &str, topics: &Topics, batch_max: usize) -> Child {
    Command::new(env.bin_dir.join("homelink-projector"))
        .args(["--database-url", db_url, "--kafka-bootstrap", &env.kafka, "--topic-prefix", topics.prefix()])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
            "--fetch-wait-ms",
            "100",
            "--batch-max",
            &batch_max.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start the projector binary (built by `cargo build --workspace`)")
}

async fn applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(sum(applied), 0)::bigint FROM household_event_counts").fetch_one(pool).await.unwrap_or(0)
}

/// The read models as comparable text.
async fn snapshot(pool: &PgPool) -> (Vec<String>, Vec<String>, Vec<String>) {
    let shadows = sqlx::query_scalar("SELECT concat_ws('|', device_id, household_id, reported::text, seq, version, online, battery) FROM device_shadows ORDER BY device_id")
        .fetch_all(pool)
        .await
        .expect("shadows");
    let counts = sqlx::query_scalar("SELECT concat_ws('|', household_id, event_type, applied) FROM household_event_counts ORDER BY 1")
        .fetch_all(pool)
        .await
        .expect("counts");
    let devices = sqlx::query_scalar("SELECT concat_ws('|', device_id, household_id, kind, name) FROM devices ORDER BY 1")
        .fetch_all(pool)
        .await
        .expect("devices");
    (shadows, counts, devices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_stream_the_projector_loses_nothing_and_applies_nothing_twice() {
    let (env, topics, db_url) = isolated().await;
    let appender = Appender::new(&ProducerConfig::new(&env.kafka)).expect("producer");
    let (_, total) = append_history(&appender, &topics).await;
    let total = total as i64;

    // Tiny batches so every kill lands in the middle of the stream.
    let mut kills = 0;
    let mut child = spawn_projector(&env, &db_url, &topics, 5);
    let pool = PgPool::connect(&db_url).await.expect("pool");
    let mut last = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while kills < 5 && std::time::Instant::now() < deadline {
        let now = applied(&pool).await;
        if now >= total {
            break;
        }
        if now > last {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
            kills += 1;
            last = now;
            child = spawn_projector(&env, &db_url, &topics, 5);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(kills >= 2, "the stream ended before the projector could be killed twice ({kills})");
    eventually(Duration::from_secs(120), "every event applied", || async { (applied(&pool).await >= total).then_some(()) }).await;
    // Give a duplicate application every chance to show up before comparing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert_eq!(applied(&pool).await, total, "each event applied exactly once");

    // An uninterrupted rebuild from the same log gives the same read models.
    let fresh_url = env.fresh_database().await;
    let mut fresh = spawn_projector(&env, &fresh_url, &topics, 5000);
    let fresh_pool = PgPool::connect(&fresh_url).await.expect("pool");
    eventually(Duration::from_secs(120), "fresh rebuild complete", || async { (applied(&fresh_pool).await >= total).then_some(()) }).await;
    fresh.kill().expect("SIGKILL");
    let _ = fresh.wait();
    let (a, b) = (snapshot(&pool).await, snapshot(&fresh_pool).await);
    assert_eq!(a.0.len(), DEVICES);
    assert_eq!(a, b);
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM device_shadows").fetch_all(&pool).await.expect("seqs");
    assert!(seqs.iter().all(|s| *s == REPORTS as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_arriving_by_push_and_by_the_log_are_applied_once() {
    let (env, topics, db_url) = isolated().await;
    let appender = Appender::new(&ProducerConfig::new(&env.kafka)).expect("producer");
    let (located, total) = append_history(&appender, &topics).await;

    let mut cfg = homelink_projector::Config::new(&db_url, &env.kafka, topics.clone());
    cfg.internal_token = Some(common::INTERNAL_TOKEN.into());
    let app = homelink_projector::Application::build(cfg).await.expect("projector");
    let (public_port, port) = (app.port(), app.internal_port());
    let pool = app.pool();
    let cancel = homelink_kit::shutdown::CancellationToken::new();
    tokio::spawn(app.run_until_stopped(cancel.clone()));

    // Push every event (twice for a third of them) while the consumer catches up.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/internal/v1/events");
    // The push channel is on the internal listener only.
    let public = format!("http://127.0.0.1:{public_port}/internal/v1/events");
    let r = http.post(&public).bearer_auth(common::INTERNAL_TOKEN).json(&json!([])).send().await.expect("push");
    assert_eq!(r.status(), 404, "the public listener has no push channel");
    let pushed: Vec<Located> = located
        .iter()
        .map(|(t, p, e)| Located { topic: t.clone(), partition: p.partition, offset: p.offset, envelope: e.clone() })
        .collect();
    // Only a holder of the deployment's token may push, and only what the topic can hold.
    for token in [None, Some("not-the-token")] {
        let mut req = http.post(&url).json(&pushed[..1]);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.expect("push").status(), 401, "a push with token {token:?}");
    }
    let household_event = pushed.iter().find(|l| l.topic == topics.households()).expect("a household event").clone();
    let forged = Located { topic: topics.telemetry(), ..household_event };
    let r = http.post(&url).bearer_auth(common::INTERNAL_TOKEN).json(&[forged]).send().await.expect("push");
    assert_eq!(r.status(), 422, "a household event pushed as telemetry");

    for chunk in pushed.chunks(100).chain(pushed.chunks(300).step_by(3)) {
        let r = http.post(&url).bearer_auth(common::INTERNAL_TOKEN).json(chunk).send().await.expect("push");
        assert!(r.status().is_success(), "push refused: {}", r.status());
    }
    eventually(Duration::from_secs(120), "every event applied", || async { (applied(&pool).await >= total as i64).then_some(()) }).await;
    // Wait until the consumer has passed every pushed event, then nothing is left to skip.
    eventually(Duration::from_secs(120), "consumer caught up", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM projector_pushed").fetch_one(&pool).await.ok()?;
        (left == 0).then_some(())
    })
    .await;
    assert_eq!(applied(&pool).await, total as i64, "each event applied exactly once");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_commands_past_their_retention_are_deleted() {
    use homelink_events::event::DeviceCommandRequested;
    let (env, topics, db_url) = isolated().await;
    let appender = Appender::new(&ProducerConfig::new(&env.kafka)).expect("producer");
    let (h, d) = (Uuid::new_v4(), Uuid::new_v4());
    let (old, fresh) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, age_days) in [(old, 40), (fresh, 1)] {
        let at = Utc::now() - chrono::Duration::days(age_days);
        let ev = Event::DeviceCommandRequested(DeviceCommandRequested {
            command_id: id,
            device_id: d,
            set: json!({"on": true}).as_object().cloned().unwrap_or_default(),
            expires_at: at + chrono::Duration::seconds(10),
            queued: false,
        });
        appender.append(&topics.commands(), &Envelope::new(h, Actor::System("test".into()), &ev, at)).await.expect("append");
    }
    let mut cfg = homelink_projector::Config::new(&db_url, &env.kafka, topics.clone());
    cfg.fetch_wait = Duration::from_millis(100);
    cfg.retention_every = Duration::from_millis(200);
    let app = homelink_projector::Application::build(cfg).await.expect("projector");
    let pool = app.pool();
    let cancel = homelink_kit::shutdown::CancellationToken::new();
    tokio::spawn(app.run_until_stopped(cancel.clone()));
    eventually(Duration::from_secs(60), "both applied, the old one expired", || async {
        let applied = applied(&pool).await;
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT command_id FROM device_commands").fetch_all(&pool).await.ok()?;
        (applied == 2 && ids == vec![fresh]).then_some(())
    })
    .await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_takes_its_settings_from_a_configuration_file_beneath_the_environment() {
    let (env, topics, db_url) = isolated().await;
    let appender = Appender::new(&ProducerConfig::new(&env.kafka)).expect("producer");
    let (_, total) = append_history(&appender, &topics).await;
    // The file holds every setting but a wrong topic prefix; the environment
    // corrects that one (environment beats file).
    let dir = std::env::temp_dir().join(format!("homelink-config-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("homelink.toml");
    let toml = format!(
        "HOMELINK_DATABASE_URL = \"{db_url}\"\nHOMELINK_KAFKA_BOOTSTRAP = \"{}\"\nHOMELINK_TOPIC_PREFIX = \"wrong.\"\nHOMELINK_PROJECTOR_LISTEN = \"127.0.0.1:0\"\nHOMELINK_PROJECTOR_INTERNAL_LISTEN = \"127.0.0.1:0\"\nHOMELINK_PROJECTOR_FETCH_WAIT_MS = 100\n",
        env.kafka
    );
    std::fs::write(&file, toml).expect("write config");
    let mut child = Command::new(env.bin_dir.join("homelink-projector"))
        .env_clear()
        .env("HOMELINK_CONFIG", &file)
        .env("HOMELINK_TOPIC_PREFIX", topics.prefix())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start the projector binary");
    let pool = PgPool::connect(&db_url).await.expect("pool");
    eventually(Duration::from_secs(120), "every event applied", || async { (applied(&pool).await >= total as i64).then_some(()) }).await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();

    // A key that is not a HOMELINK_ setting is refused at start.
    std::fs::write(&file, "PATH = \"/tmp\"\n").expect("write config");
    let out = Command::new(env.bin_dir.join("homelink-projector")).env_clear().env("HOMELINK_CONFIG", &file).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a HOMELINK_"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
