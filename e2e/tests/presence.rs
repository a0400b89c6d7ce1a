//! Presence (issue 17): a member's app reports home / away; the household
//! stream records it, GraphQL shows who is home and the household
//! subscription pushes each report; bad input and foreign callers change nothing.

mod common;

use common::{light_and_sensor, next_matching, Stack};
use serde_json::{json, Value};
use uuid::Uuid;

async fn put_presence(stack: &Stack, token: Option<&str>, household: &str, body: Value) -> (u16, Value) {
    let mut r = stack.http.put(format!("{}/v1/households/{household}/presence", stack.api())).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_report_presence_and_everyone_sees_who_is_home() {
    let stack = Stack::start().await;
    let home = stack.household_with(&["adult", "child"], &light_and_sensor()).await;
    let (owner, adult, child) = (&home.accounts[0], &home.accounts[1], &home.accounts[2]);
    let h = home.household_id.to_string();
    let mut sub = stack
        .subscribe_from_now(
            &child.access_token,
            "subscription($h: ID!, $after: Int) { householdChanges(householdId: $h, after: $after) { change userId home changeSeq } }",
            json!({}),
            home.household_id,
        )
        .await;

    let (status, body) = put_presence(&stack, Some(&owner.access_token), &h, json!({"state": "home"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["membersHome"], 1, "{body}");
    let (status, body) = put_presence(&stack, Some(&child.access_token), &h, json!({"state": "home"})).await;
    assert_eq!((status, body["membersHome"].as_u64()), (200, Some(2)), "{body}");
    let (status, body) = put_presence(&stack, Some(&adult.access_token), &h, json!({"state": "away"})).await;
    assert_eq!((status, body["membersHome"].as_u64(), body["state"].as_str()), (200, Some(2), Some("away")), "{body}");

    // Pushed in order, each naming its member.
    for (who, is_home) in [(owner, true), (child, true), (adult, false)] {
        let m = next_matching(&mut sub, "a presence change", |m| m["householdChanges"]["change"] == "PresenceChanged").await;
        let c = &m["householdChanges"];
        assert_eq!((c["userId"].as_str(), c["home"].as_bool()), (Some(who.user_id.to_string().as_str()), Some(is_home)), "{c}");
    }

    // Every member sees who is home (read-your-writes: the write answered once applied).
    let q = "query($h: ID!) { household(id: $h) { members { userId home presenceSince } } }";
    let members = stack.gql(&child.access_token, q, json!({"h": h})).await;
    let members = members["data"]["household"]["members"].as_array().cloned().unwrap_or_default();
    let of = |u: Uuid| members.iter().find(|m| m["userId"] == u.to_string()).cloned().unwrap_or(Value::Null);
    assert_eq!(of(owner.user_id)["home"], true, "{members:?}");
    assert_eq!(of(child.user_id)["home"], true);
    assert_eq!(of(adult.user_id)["home"], false);
    assert!(of(adult.user_id)["presenceSince"].is_string());

    // A repeat is recorded but does not move `presenceSince`.
    let since = of(owner.user_id)["presenceSince"].clone();
    assert_eq!(put_presence(&stack, Some(&owner.access_token), &h, json!({"state": "home"})).await.0, 200);
    let again = stack.gql(&owner.access_token, q, json!({"h": h})).await;
    let again = again["data"]["household"]["members"].as_array().cloned().unwrap_or_default();
    let o = again.iter().find(|m| m["userId"] == owner.user_id.to_string()).cloned().unwrap_or(Value::Null);
    assert_eq!(o["presenceSince"], since, "{o}");

    // A member who is removed takes their presence along.
    let r = stack
        .http
        .delete(format!("{}/v1/households/{h}/members/{}", stack.api(), child.user_id))
        .bearer_auth(&owner.access_token)
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status().as_u16(), 204);
    let (status, body) = put_presence(&stack, Some(&adult.access_token), &h, json!({"state": "away"})).await;
    assert_eq!((status, body["membersHome"].as_u64()), (200, Some(1)), "only the owner is home now: {body}");

    // Audited for the owner.
    let aq = "query($h: ID!) { auditLog(householdId: $h, first: 20, filter: {action: \"member.presence\"}) { edges { node { actorId detail } } } }";
    let audit = stack.gql(&owner.access_token, aq, json!({"h": h})).await;
    let entries = audit["data"]["auditLog"]["edges"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 5, "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_presence_reports_and_foreign_callers_change_nothing() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let stranger = stack.seed(&light_and_sensor()).await.accounts[0].clone();
    let (owner, h) = (&home.accounts[0], home.household_id.to_string());
    let version = |stack: &Stack| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT version FROM households WHERE household_id = $1")
                .bind(home.household_id)
                .fetch_one(&pool)
                .await
                .expect("version")
        }
    };
    let before = version(&stack).await;
    for (body, why) in [
        (json!({"state": "office"}), "unknown state"),
        (json!({"state": "HOME"}), "case matters"),
        (json!({"state": "home", "extra": 1}), "unknown field"),
        (json!({"state": "home\u{0}"}), "NUL"),
        (json!({}), "no state"),
        (json!({"state": ["home"]}), "not a string"),
    ] {
        let (status, problem) = put_presence(&stack, Some(&owner.access_token), &h, body).await;
        assert_eq!(status, 400, "{why}: {problem}");
        assert!(problem["type"].is_string(), "{why}: problem+json {problem}");
    }
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let r = stack
        .http
        .put(format!("{}/v1/households/{h}/presence", stack.api()))
        .bearer_auth(&owner.access_token)
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .expect("deep");
    assert_eq!(r.status().as_u16(), 400);
    let huge = json!({"state": "x".repeat(100_000)});
    assert_eq!(put_presence(&stack, Some(&owner.access_token), &h, huge).await.0, 413);
    assert_eq!(put_presence(&stack, Some(&stranger.access_token), &h, json!({"state": "home"})).await.0, 404, "not a member");
    assert_eq!(put_presence(&stack, None, &h, json!({"state": "home"})).await.0, 401);
    assert_eq!(put_presence(&stack, Some(&owner.access_token), &Uuid::new_v4().to_string(), json!({"state": "home"})).await.0, 404);
    assert_eq!(put_presence(&stack, Some(&owner.access_token), "not-an-id", json!({"state": "home"})).await.0, 404);
    assert_eq!(version(&stack).await, before, "nothing was appended");
}
