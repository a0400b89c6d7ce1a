//! `homelink backup` and `homelink restore` (issue 18, item 4): a stack is
//! backed up, wiped (services stopped, database dropped, topics deleted) and
//! restored into an empty stack; the restored read models equal the
//! original's (digests), nothing of the log is lost, the PKI and secrets
//! come back byte for byte, a token and a refresh token issued before the
//! backup still work, a retried write still replays its stored answer, and
//! a device connects with its pre-backup certificate and takes a tap.

mod common;

use common::{eventually, spec, Env, Stack};
use homelink_events::{DeviceKind, Topics};
use homelink_kit::shutdown::CancellationToken;
use homelink_tools::sim;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use uuid::Uuid;

fn homelink(env: &Env, args: &[String]) -> std::process::Output {
    let bin = env.bin_dir.join("homelink");
    let out = Command::new(&bin)
        .args(args)
        .env_remove("HOMELINK_DATABASE_URL")
        .env_remove("HOMELINK_KAFKA_BOOTSTRAP")
        .env_remove("HOMELINK_TOPIC_PREFIX")
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()));
    assert!(
        out.status.success(),
        "homelink {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Each read model's rows and digest, but the projector's positions (they name the topics, whose prefix a restore may change).
fn digests(env: &Env, db_url: &str) -> Vec<Value> {
    let out = homelink(env, &strings(&["digests", "--database-url", db_url, "--json"]));
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).expect("digests JSON");
    all.into_iter().filter(|d| d["table"] != "projector_offsets").collect()
}

/// The end of every partition of the deployment's topics.
async fn log_ends(env: &Env, topics: &Topics) -> Vec<((String, i32), i64)> {
    let parts = homelink_kit::reader::partitions(&env.kafka, &topics.all()).await.expect("partitions");
    let marks = homelink_projector::replay::watermarks(&env.kafka, parts).await.expect("watermarks");
    let mut out: Vec<((String, i32), i64)> =
        marks.into_iter().map(|((t, p), (_, high))| ((t.strip_prefix(topics.prefix()).expect("prefixed").to_owned(), p), high)).collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_wipe_restore_gives_equal_read_models_and_old_tokens_and_device_certificates_still_work() {
    let stack = Stack::start().await;
    stack.start_automation().await;
    let home = stack.household_with(&["adult"], &[(DeviceKind::Light, "Lamp", "Hall"), (DeviceKind::Sensor, "Hall sensor", "Hall")]).await;
    let owner = home.accounts[0].clone();
    let (h, lamp) = (home.household_id, home.devices[0].id);

    // A real device with its certificate answers a tap, sent with an idempotency key.
    let running = CancellationToken::new();
    tokio::spawn(sim::run(spec(&home, 0, None), stack.env.target(), None, running.clone()));
    let confirmed = |pool: sqlx::PgPool, command: String| async move {
        eventually(Duration::from_secs(30), "the tap confirmed", || async {
            let at: Option<chrono::DateTime<chrono::Utc>> =
                sqlx::query_scalar("SELECT confirmed_at FROM device_commands WHERE command_id = $1::uuid")
                    .bind(&command)
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten()
                    .flatten();
            at.map(|_| ())
        })
        .await
    };
    let tap = |stack: &Stack, key: &'static str, brightness: i64| {
        stack.command(&home, lamp).header("idempotency-key", key).json(&json!({"set": {"brightness": brightness}})).send()
    };
    let first = eventually(Duration::from_secs(30), "the lamp takes a tap", || async {
        let r = tap(&stack, "before-backup", 42).await.ok()?;
        (r.status() == 202).then_some(())?;
        r.json::<Value>().await.ok()
    })
    .await;
    confirmed(stack.pool.clone(), first["commandId"].as_str().expect("commandId").to_owned()).await;
    running.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Quiet: the projector at the log's end, then the digests and the log as they are.
    let ends = log_ends(&stack.env, &stack.topics).await;
    let projected: i64 = ends.iter().filter(|((t, _), _)| t != "dead-letter").map(|(_, n)| n).sum();
    eventually(Duration::from_secs(60), "the projector at the log's end", || async {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT sum(next_offset)::bigint FROM projector_offsets").fetch_one(&stack.pool).await.ok()?;
        (at == Some(projected)).then_some(())
    })
    .await;
    let before = digests(&stack.env, &stack.db_url);
    assert!(before.iter().any(|d| d["table"] == "device_commands" && d["rows"] == 1), "{before:?}");

    // Backed up.
    let dir = std::env::temp_dir().join(format!("homelink-backup-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let archive = dir.join("stack.tar");
    let secrets = dir.join("secrets-in");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    std::fs::write(secrets.join("bridge-password"), &stack.env.bridge_password).expect("secret");
    let pki = stack.env.pki.0.clone();
    homelink(
        &stack.env,
        &[
            "backup".into(),
            "--database-url".into(),
            stack.db_url.clone(),
            "--bootstrap".into(),
            stack.env.kafka.clone(),
            "--prefix".into(),
            stack.topics.prefix().into(),
            "--pki-dir".into(),
            pki.display().to_string(),
            "--secrets-dir".into(),
            secrets.display().to_string(),
            "--out".into(),
            archive.display().to_string(),
        ],
    );

    // Wiped: the services stopped, the database dropped, the topics deleted.
    let env = stack.env.clone();
    let (old_db, old_topics) = (stack.db_url.clone(), stack.topics.clone());
    stack.cancel.cancel();
    stack.pool.close().await;
    drop(stack);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let name = old_db.rsplit('/').next().expect("database name").to_owned();
    let admin = sqlx::PgPool::connect(&env.admin_db_url).await.expect("admin");
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)")).execute(&admin).await.expect("drop the database");
    let kafka_admin: AdminClient<DefaultClientContext> = homelink_kit::kafka::client_config(&env.kafka).create().expect("admin client");
    let names = old_topics.all();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    kafka_admin.delete_topics(&refs, &AdminOptions::new()).await.expect("delete topics");

    // Restored into an empty stack: a new database, a new prefix.
    let db = env.fresh_database().await;
    let topics = Topics::new(format!("r{}.", Uuid::new_v4().simple()));
    let pki_out = dir.join("pki-out");
    let secrets_out = dir.join("secrets-out");
    let out = homelink(
        &env,
        &[
            "restore".into(),
            "--archive".into(),
            archive.display().to_string(),
            "--database-url".into(),
            db.clone(),
            "--bootstrap".into(),
            env.kafka.clone(),
            "--prefix".into(),
            topics.prefix().into(),
            "--replication".into(),
            env.kafka_nodes.1.to_string(),
            "--pki-dir".into(),
            pki_out.display().to_string(),
            "--secrets-dir".into(),
            secrets_out.display().to_string(),
            "--json".into(),
        ],
    );
    let done: Value = serde_json::from_slice(&out.stdout).expect("restore JSON");
    assert_eq!(done["compared"], true, "{done:#}");
    assert_eq!(done["readModelsEqual"], true, "{done:#}");
    let records: i64 = ends.iter().map(|(_, n)| n).sum();
    assert_eq!(done["records"], json!(records), "every record restored");

    // Nothing lost: the same partitions hold the same number of records; equal digests; the same files.
    assert_eq!(log_ends(&env, &topics).await, ends);
    assert_eq!(digests(&env, &db), before, "the restored read models equal the original's");
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert_eq!(std::fs::read(pki_out.join(f)).expect("restored"), std::fs::read(pki.join(f)).expect("original"), "{f}");
    }
    assert_eq!(std::fs::read_to_string(secrets_out.join("bridge-password")).expect("secret"), env.bridge_password);

    // The services on the restored stack.
    let restored = Stack::start_existing(env.clone(), topics, db).await;
    let q = "query($h: ID!) { household(id: $h) { name devices { nodes { id shadow { reported } } } } }";
    let r = restored.gql(&owner.access_token, q, json!({"h": h})).await;
    let nodes =
        r["data"]["household"]["devices"]["nodes"].as_array().unwrap_or_else(|| panic!("the old token reads the household: {r}")).clone();
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().any(|n| n["id"] == json!(lamp) && n["shadow"]["reported"]["brightness"] == 42), "{r}");
    let refreshed = restored
        .http
        .post(format!("{}/v1/auth/refresh", restored.api()))
        .json(&json!({"refreshToken": owner.refresh_token}))
        .send()
        .await
        .expect("refresh");
    assert_eq!(refreshed.status(), 200, "the pre-backup refresh token works");
    let again = tap(&restored, "before-backup", 42).await.expect("retry");
    assert_eq!(again.headers()["idempotent-replayed"], "true", "the stored answer survives the restore");
    assert_eq!(again.json::<Value>().await.expect("json"), first);

    // The device's pre-backup certificate: it connects and takes a tap.
    let running = CancellationToken::new();
    tokio::spawn(sim::run(spec(&home, 0, None), restored.env.target(), None, running.clone()));
    let second = eventually(Duration::from_secs(30), "the lamp takes a tap on the restored stack", || async {
        let r = tap(&restored, "after-restore", 7).await.ok()?;
        (r.status() == 202).then_some(())?;
        r.json::<Value>().await.ok()
    })
    .await;
    confirmed(restored.pool.clone(), second["commandId"].as_str().expect("commandId").to_owned()).await;
    running.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
