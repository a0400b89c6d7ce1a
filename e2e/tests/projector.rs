//! The projector under restarts: killed (SIGKILL) several times in the middle
//! of a stream, it loses nothing and applies nothing twice — its read models
//! equal those of an uninterrupted rebuild. And a log holding duplicate
//! records (producer retries), read by a projector stopped part-way and
//! started again, gives the read models of a single reading of the log
//! without them.

mod common;

use chrono::Utc;
use common::{eventually, isolated, isolated_on};
use homelink_events::event::{DeviceRegistered, DeviceStateReported, DeviceStatusChanged, HouseholdCreated};
use homelink_events::{Actor, DeviceKind, Envelope, Event, Topics};
use homelink_kit::kafka::{Appender, Position, ProducerConfig};
use homelink_kit::shutdown::CancellationToken;
use serde_json::json;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command};
use std::time::Duration;
use uuid::Uuid;

const DEVICES: usize = 4;
const REPORTS: u64 = 250;

/// Which topic of a deployment an event goes to.
type TopicOf = fn(&Topics) -> String;

/// A household's history: registrations, reports, and a status flip every 25 reports.
fn history() -> Vec<(TopicOf, Envelope)> {
    let h = Uuid::new_v4();
    let sys = Actor::System("test".into());
    let households: TopicOf = Topics::households;
    let telemetry: TopicOf = Topics::telemetry;
    let mut out = Vec::new();
    let mut push = |topic: TopicOf, e: Envelope| out.push((topic, e));
    push(
        households,
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
        push(households, Envelope::new(h, sys.clone(), &ev, Utc::now()));
    }
    for seq in 1..=REPORTS {
        for d in &devices {
            let state = json!({"brightness": (seq % 100), "on": seq % 2 == 0}).as_object().cloned().unwrap_or_default();
            let ev = Event::DeviceStateReported(DeviceStateReported { device_id: *d, seq, device_ts: None, state, battery: None });
            push(telemetry, Envelope::new(h, Actor::Device(*d), &ev, Utc::now()));
            if seq % 25 == 0 {
                let ev = Event::DeviceStatusChanged(DeviceStatusChanged { device_id: *d, online: seq % 50 != 0 });
                push(telemetry, Envelope::new(h, Actor::Device(*d), &ev, Utc::now()));
            }
        }
    }
    out
}

/// Appends `events` to the topics of `topics`, in order (the producer keeps
/// the order of what is queued for a partition); returns where each landed.
async fn append_all(appender: &Appender, topics: &Topics, events: &[(TopicOf, Envelope)]) -> Vec<(String, Position, Envelope)> {
    let mut located = Vec::with_capacity(events.len());
    for chunk in events.chunks(200) {
        let waits: Vec<_> = chunk.iter().map(|(t, e)| appender.enqueue(&t(topics), e).expect("queue the append")).collect();
        let results = futures::future::join_all(waits).await;
        for ((t, e), r) in chunk.iter().zip(results) {
            located.push((t(topics), r.expect("append"), e.clone()));
        }
    }
    located
}

/// Appends a household's [`history`].
async fn append_history(appender: &Appender, topics: &Topics) -> (Vec<(String, Position, Envelope)>, usize) {
    let located = append_all(appender, topics, &history()).await;
    let total = located.len();
    (located, total)
}

fn spawn_projector(env: &common::Env, db_url: &str, topics: &Topics, batch_max: usize) -> Child {
    Command::new(env.bin_dir.join("homelink-projector"))
        .args(["--database-url", db_url, "--kafka-bootstrap", &env.kafka, "--topic-prefix", topics.prefix()])
        .args(["--listen", "127.0.0.1:0", "--fetch-wait-ms", "100", "--batch-max", &batch_max.to_string()])
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

/// The per-household event counts, by household and event type.
async fn counts(pool: &PgPool) -> BTreeMap<(Uuid, String), i64> {
    let rows: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT household_id, event_type, applied FROM household_event_counts").fetch_all(pool).await.expect("counts");
    rows.into_iter().map(|(h, t, n)| ((h, t), n)).collect()
}

/// An in-process projector reading `topics` into `db_url`, in batches of at most `batch_max`.
async fn start_projector(
    env: &common::Env,
    db_url: &str,
    topics: &Topics,
    batch_max: usize,
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), homelink_projector::Error>>) {
    let mut cfg = homelink_projector::Config::new(db_url, &env.kafka, topics.clone());
    cfg.fetch_wait = Duration::from_millis(100);
    cfg.batch_max = batch_max;
    let app = homelink_projector::Application::build(cfg).await.expect("projector");
    let cancel = CancellationToken::new();
    (cancel.clone(), tokio::spawn(app.run_until_stopped(cancel)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_records_and_a_restart_give_the_read_models_of_a_single_reading() {
    let (env, topics, db_url) = isolated().await;
    let (_, clean_topics, clean_url) = isolated_on(env.clone()).await;
    let appender = Appender::new(&ProducerConfig::new(&env.kafka)).expect("producer");

    // One history, appended twice: as it is to one log, and to another with a
    // third of its records appended again right after themselves — the same
    // envelope, event id included, at a new offset, as a producer retry
    // leaves it.
    let events = history();
    let mut with_duplicates: Vec<(TopicOf, Envelope)> = Vec::with_capacity(events.len() + events.len() / 3 + 1);
    let mut duplicated: HashMap<String, i64> = HashMap::new();
    for (i, (t, e)) in events.iter().enumerate() {
        with_duplicates.push((*t, e.clone()));
        if i % 3 == 0 {
            with_duplicates.push((*t, e.clone()));
            *duplicated.entry(e.event_type.clone()).or_default() += 1;
        }
    }
    let (total, records) = (events.len() as i64, with_duplicates.len() as i64);
    append_all(&appender, &clean_topics, &events).await;
    let located = append_all(&appender, &topics, &with_duplicates).await;
    let positions: HashSet<(&str, i32, i64)> = located.iter().map(|(t, p, _)| (t.as_str(), p.partition, p.offset)).collect();
    assert_eq!(positions.len() as i64, records, "every duplicate is a record of its own, at a new offset");

    // The log with duplicates, read by a projector stopped part-way (tiny
    // batches so a stop lands in the middle of the stream) and started again
    // over the same database.
    let pool = PgPool::connect(&db_url).await.expect("pool");
    let mut stops = 0;
    let mut running = start_projector(&env, &db_url, &topics, 5).await;
    let mut last = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while stops < 3 && std::time::Instant::now() < deadline {
        let now = applied(&pool).await;
        if now >= records {
            break;
        }
        if now > last {
            running.0.cancel();
            running.1.await.expect("projector task").expect("projector stopped cleanly");
            stops += 1;
            last = now;
            running = start_projector(&env, &db_url, &topics, 5).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(stops >= 1, "the stream ended before the projector could be stopped part-way");
    eventually(Duration::from_secs(120), "every record applied", || async { (applied(&pool).await >= records).then_some(()) }).await;
    // Give a second application every chance to show up before comparing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.0.cancel();
    let _ = running.1.await;
    assert_eq!(applied(&pool).await, records, "each record applied exactly once across the restarts");

    // A projector that reads the log without duplicates once.
    let (clean_cancel, clean_task) = start_projector(&env, &clean_url, &clean_topics, 5000).await;
    let clean_pool = PgPool::connect(&clean_url).await.expect("pool");
    eventually(Duration::from_secs(120), "the single reading complete", || async { (applied(&clean_pool).await >= total).then_some(()) })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    clean_cancel.cancel();
    let _ = clean_task.await;
    assert_eq!(applied(&clean_pool).await, total, "each event applied exactly once");

    // The same shadows and registry; the per-household counts differ by the
    // duplicate records only (each record counts once).
    let (a, b) = (snapshot(&pool).await, snapshot(&clean_pool).await);
    assert_eq!(a.0.len(), DEVICES);
    assert_eq!(a.0, b.0, "device shadows");
    assert_eq!(a.2, b.2, "devices");
    let mut expected = counts(&clean_pool).await;
    for ((_, event_type), n) in expected.iter_mut() {
        *n += duplicated.get(event_type).copied().unwrap_or(0);
    }
    assert_eq!(counts(&pool).await, expected, "event counts: the single reading's plus the duplicates");
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM device_shadows").fetch_all(&pool).await.expect("seqs");
    assert!(seqs.iter().all(|s| *s == REPORTS as i64));
}

/// Every table that grows with traffic is trimmed to its retention (the
/// projector's defaults), in batches: old rows go, fresh ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_past_their_retention_are_deleted_from_every_growing_table() {
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
    // The rows the other growing tables hold, each past its retention
    // (`old`) or within it (`fresh`); the audit log with more than one
    // deleting batch of old rows.
    homelink_projector::migrate(&PgPool::connect(&db_url).await.expect("pool")).await.expect("migrate");
    let pool = PgPool::connect(&db_url).await.expect("pool");
    let ago = |days: i64| Utc::now() - chrono::Duration::days(days);
    const OLD_AUDIT: i64 = 25_000;
    sqlx::query(
        "INSERT INTO audit_log (event_id, household_id, at, actor_kind, actor_id, action, outcome, status)
         SELECT gen_random_uuid(), $1, $2, 'user', 'u', 'device.command', 'accepted', 202 FROM generate_series(1, $3)",
    )
    .bind(h)
    .bind(ago(100))
    .bind(OLD_AUDIT)
    .execute(&pool)
    .await
    .expect("old audit rows");
    for (age, tag) in [(100, "old"), (10, "fresh")] {
        let at = ago(age);
        sqlx::query("INSERT INTO audit_log (event_id, household_id, at, actor_kind, actor_id, action, outcome, status, detail) VALUES (gen_random_uuid(), $1, $2, 'user', 'u', 'device.command', 'accepted', 202, $3)")
            .bind(h).bind(at).bind(tag).execute(&pool).await.expect("audit");
        sqlx::query("INSERT INTO household_refused_events (event_id, household_id, event_type, reason, occurred_at) VALUES (gen_random_uuid(), $1, 'MemberRemoved', $2, $3)")
            .bind(h).bind(tag).bind(at).execute(&pool).await.expect("refused");
        sqlx::query("INSERT INTO projector_dead_letters (topic, partition, \"offset\", source, reason, payload, recorded_at) VALUES ($1, 0, $2, 'log', $3, '', $4)")
            .bind(topics.telemetry()).bind(age).bind(tag).bind(at).execute(&pool).await.expect("dead letter");
        sqlx::query("INSERT INTO household_invitations (invitation_id, household_id, role, code_hash, expires_at, created_at) VALUES (gen_random_uuid(), $1, $2, $3, $4, $4)")
            .bind(h).bind(tag).bind(format!("hash-{tag}")).bind(at).execute(&pool).await.expect("invitation");
    }
    for (age, tag) in [(40, "old"), (5, "fresh")] {
        let at = ago(age);
        sqlx::query(
            "INSERT INTO household_snapshots (household_id, at, \"cursor\", events, state, taken_at) VALUES ($1, $2, $3, 0, '{}', $2)",
        )
        .bind(h)
        .bind(at)
        .bind(tag)
        .execute(&pool)
        .await
        .expect("snapshot");
        sqlx::query("INSERT INTO scene_activations (activation_id, household_id, scene_id, actor, at, commands) VALUES (gen_random_uuid(), $1, $1, '{}', $2, $3)")
            .bind(h).bind(if age == 40 { ago(20) } else { at }).bind(json!([tag])).execute(&pool).await.expect("activation");
    }
    for (age, outcome, tag) in [(10, "done", "old"), (3, "done", "fresh"), (100, "failed", "old"), (30, "failed", "fresh")] {
        sqlx::query("INSERT INTO automation_runs (run_id, automation_id, household_id, started_at, trigger, what, outcome, finished_at, reason) VALUES (gen_random_uuid(), $1, $1, $2, 0, 'test', $3, $2, $4)")
            .bind(h).bind(ago(age)).bind(outcome).bind(tag).execute(&pool).await.expect("run");
    }

    let mut cfg = homelink_projector::Config::new(&db_url, &env.kafka, topics.clone());
    cfg.fetch_wait = Duration::from_millis(100);
    cfg.retention.every = Duration::from_millis(200);
    let app = homelink_projector::Application::build(cfg).await.expect("projector");
    let cancel = homelink_kit::shutdown::CancellationToken::new();
    tokio::spawn(app.run_until_stopped(cancel.clone()));
    eventually(Duration::from_secs(60), "both commands applied, the old one expired", || async {
        let applied = applied(&pool).await;
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT command_id FROM device_commands").fetch_all(&pool).await.ok()?;
        (applied == 2 && ids == vec![fresh]).then_some(())
    })
    .await;
    let kept = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, String>(sql).fetch_all(&pool).await.expect(sql) }
    };
    eventually(Duration::from_secs(60), "every old audit row deleted", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE at < now() - interval '90 days'").fetch_one(&pool).await.ok()?;
        (n == 0).then_some(())
    })
    .await;
    // (The commands' own audit rows, 40 days and 1 day old, stay.)
    assert_eq!(kept("SELECT detail FROM audit_log WHERE detail IN ('old', 'fresh')").await, ["fresh"]);
    assert_eq!(kept("SELECT reason FROM household_refused_events").await, ["fresh"]);
    assert_eq!(kept("SELECT reason FROM projector_dead_letters").await, ["fresh"]);
    assert_eq!(kept("SELECT role FROM household_invitations").await, ["fresh"]);
    assert_eq!(kept("SELECT \"cursor\" FROM household_snapshots").await, ["fresh"]);
    assert_eq!(kept("SELECT commands->>0 FROM scene_activations").await, ["fresh"]);
    let mut runs = kept("SELECT reason FROM automation_runs").await;
    runs.sort();
    assert_eq!(runs, ["fresh", "fresh"], "an ordinary run kept 7 days, a failed one 90");
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
        "HOMELINK_DATABASE_URL = \"{db_url}\"\nHOMELINK_KAFKA_BOOTSTRAP = \"{}\"\nHOMELINK_TOPIC_PREFIX = \"wrong.\"\nHOMELINK_PROJECTOR_LISTEN = \"127.0.0.1:0\"\nHOMELINK_PROJECTOR_FETCH_WAIT_MS = 100\n",
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
