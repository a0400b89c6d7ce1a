//! Writes under a slow broker and a slow projector (issue 9, defects 4 and 8):
//! an `Idempotency-Key` yields one effect however long Kafka takes to
//! acknowledge, and a role change is in effect for authorization once it is
//! acknowledged.

mod common;

use common::{eventually, Env, PrivateKafka, Stack};
use homelink_events::DeviceKind;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_yields_one_effect_when_the_broker_acknowledges_late() {
    let kafka = PrivateKafka::start();
    let mut env = Env::from_env();
    env.kafka = kafka.bootstrap();
    let stack = Stack::start_on(env).await;
    let home = stack.seed(&[(DeviceKind::Light, "Lamp", "Hall")]).await;
    let light = home.devices[0].id;
    let send = || {
        stack
            .command(&home, light)
            .header("idempotency-key", "tap-1")
            .json(&json!({"set": {"on": true}}))
            .timeout(Duration::from_secs(20))
            .send()
    };

    // The broker stalls: the client's answer comes at the deadline, the
    // outcome is not known yet.
    kafka.pause();
    let first = send().await.expect("an answer while the broker stalls");
    assert_eq!(first.status(), 503);
    // A retry while the append's fate is open does not run a second time.
    let retry = send().await.expect("retry");
    assert_eq!(retry.status(), 409, "the claim is held while the first append is pending");
    tokio::time::sleep(Duration::from_millis(500)).await;
    kafka.resume();

    // Once Kafka acknowledged the late record, the retry gets the original answer.
    let (accepted, replayed): (Value, String) = eventually(Duration::from_secs(60), "the original answer", || async {
        let r = send().await.ok()?;
        match r.status().as_u16() {
            202 => {
                let replayed = r.headers().get("idempotent-replayed")?.to_str().ok()?.to_owned();
                Some((r.json().await.ok()?, replayed))
            }
            409 => None,
            other => panic!("a retry answered {other}"),
        }
    })
    .await;
    assert_eq!(replayed, "true");
    assert!(accepted["commandId"].is_string());
    stack.wait_applied("DeviceCommandRequested", 1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands").fetch_one(&stack.pool).await.expect("count");
    assert_eq!(commands, 1, "one key, one effect");
    let id: uuid::Uuid = sqlx::query_scalar("SELECT command_id FROM device_commands").fetch_one(&stack.pool).await.expect("id");
    assert_eq!(accepted["commandId"], json!(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_demotion_is_in_effect_for_device_commands_once_acknowledged() {
    let stack = Stack::start().await;
    let home = stack.household_with(&["adult"], &[(DeviceKind::Lock, "Front door", "Hall")]).await;
    let (owner, member) = (&home.accounts[0], &home.accounts[1]);
    let lock = home.devices[0].id;
    let h = home.household_id;

    // The projector is slow: the household's row stays locked for 3 s, so
    // the demotion's event waits in the projector.
    let pool = stack.pool.clone();
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn(async move {
        let mut tx = pool.begin().await.expect("tx");
        sqlx::query("SELECT 1 FROM households WHERE household_id = $1 FOR UPDATE").bind(h).execute(&mut *tx).await.expect("lock");
        let _ = locked_tx.send(());
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.rollback().await.expect("release");
    });
    locked_rx.await.expect("row locked");

    let demote = || {
        stack
            .http
            .put(format!("{}/v1/households/{h}/members/{}/role", stack.api(), member.user_id))
            .bearer_auth(&owner.access_token)
            .header("idempotency-key", "demote-1")
            .json(&json!({"role": "child"}))
            .timeout(Duration::from_secs(20))
            .send()
    };
    let unlock =
        || stack.http.post(stack.command_url(h, lock)).bearer_auth(&member.access_token).json(&json!({"set": {"locked": false}})).send();

    let mut answered = demote().await.expect("demote").status().as_u16();
    while answered != 200 {
        assert!(answered == 503 || answered == 409, "the demotion answered {answered}");
        // Not acknowledged yet: the member is still an adult and may unlock.
        tokio::time::sleep(Duration::from_millis(200)).await;
        answered = demote().await.expect("demote").status().as_u16();
    }
    // Acknowledged: the very next command of the member is refused.
    let r = unlock().await.expect("unlock");
    assert_eq!(r.status(), 403, "a child may not unlock once the demotion is acknowledged");
    holder.await.expect("holder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_records_and_rate_limit_windows_expire_after_a_day() {
    let stack = Stack::start().await;
    let pool = stack.pool.clone();
    for (key, age) in [("old", "2 days"), ("new", "1 hour")] {
        sqlx::query(&format!(
            "INSERT INTO idempotency_keys (scope, key, request_hash, created_at) VALUES ('test', $1, 'h', now() - interval '{age}')"
        ))
        .bind(key)
        .execute(&pool)
        .await
        .expect("idempotency row");
        sqlx::query(&format!("INSERT INTO identity_rate_limits (key, window_start, count) VALUES ($1, now() - interval '{age}', 1)"))
            .bind(format!("test/{key}"))
            .execute(&pool)
            .await
            .expect("rate-limit row");
    }
    let cancel = homelink_kit::shutdown::CancellationToken::new();
    tokio::spawn(homelink_command_api::idempotency::expire(pool.clone(), cancel.clone()));
    eventually(Duration::from_secs(30), "the day-old rows gone, the fresh ones kept", || async {
        let keys: Vec<String> =
            sqlx::query_scalar("SELECT key FROM idempotency_keys WHERE scope = 'test' ORDER BY key").fetch_all(&pool).await.ok()?;
        let windows: Vec<String> =
            sqlx::query_scalar("SELECT key FROM identity_rate_limits WHERE key LIKE 'test/%' ORDER BY key").fetch_all(&pool).await.ok()?;
        (keys == ["new"] && windows == ["test/new"]).then_some(())
    })
    .await;
    cancel.cancel();
}
