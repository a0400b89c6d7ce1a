//! Households, members and roles through the running services: the roles
//! table of product.md cell by cell, the last-owner race, idempotency keys,
//! the audit log and subscriptions that follow membership changes.

mod common;

use chrono::Utc;
use common::{eventually, next_matching, Stack};
use homelink_events::event::DeviceStateReported;
use homelink_events::{Actor, DeviceKind, Envelope, Event};
use homelink_tools::api::Account;
use homelink_tools::gql::Subscription;
use homelink_tools::seed::SeededHousehold;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

fn every_kind() -> Vec<(DeviceKind, &'static str, &'static str)> {
    vec![
        (DeviceKind::Light, "Lamp", "Living room"),
        (DeviceKind::Plug, "Kettle", "Kitchen"),
        (DeviceKind::Thermostat, "Heating", "Hall"),
        (DeviceKind::Lock, "Front door", "Hall"),
        (DeviceKind::Camera, "Garden cam", "Garden"),
        (DeviceKind::Sensor, "Climate", "Bedroom"),
    ]
}

fn device(home: &SeededHousehold, kind: DeviceKind) -> Uuid {
    home.devices.iter().find(|d| d.kind == kind).expect("device of kind").id
}

/// A route of the matrix: what, method, path, body, and whether owner,
/// adult and child may.
type Row = (&'static str, reqwest::Method, String, Option<Value>, [bool; 3]);

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Owner,
    Adult,
    Child,
    Stranger,
    Anonymous,
}

const EVERYONE: [Who; 5] = [Who::Owner, Who::Adult, Who::Child, Who::Stranger, Who::Anonymous];

struct World {
    stack: Stack,
    home: SeededHousehold,
    stranger: Account,
}

impl World {
    /// home.accounts: owner, adult, child, spare adult.
    async fn new() -> Self {
        let stack = Stack::start().await;
        let home = stack.household_with(&["adult", "child", "adult"], &every_kind()).await;
        let stranger = stack.seed(&[(DeviceKind::Light, "Their lamp", "Their room")]).await.accounts[0].clone();
        Self { stack, home, stranger }
    }

    fn token(&self, who: Who) -> Option<&str> {
        match who {
            Who::Owner => Some(&self.home.accounts[0].access_token),
            Who::Adult => Some(&self.home.accounts[1].access_token),
            Who::Child => Some(&self.home.accounts[2].access_token),
            Who::Stranger => Some(&self.stranger.access_token),
            Who::Anonymous => None,
        }
    }

    async fn call(&self, who: Who, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.stack.http.request(method, format!("{}{path}", self.stack.api()));
        if let Some(t) = self.token(who) {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn gql(&self, who: Who, query: &str, variables: Value) -> (u16, Value) {
        let mut r = self.stack.http.post(self.stack.graphql_url());
        if let Some(t) = self.token(who) {
            r = r.bearer_auth(t);
        }
        let r = r.json(&json!({"query": query, "variables": variables})).send().await.expect("graphql");
        (r.status().as_u16(), r.json().await.expect("json"))
    }
}

/// The product.md roles table for device control, literally: (what, kind,
/// values, owner, adult, child). `Hidden` = the child may not even see it.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Cell {
    Yes,
    No,
    Hidden,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_gets_exactly_what_the_roles_table_says() {
    use Cell::*;
    let w = World::new().await;
    let h = w.home.household_id;
    let control = [
        ("switch a light", DeviceKind::Light, json!({"on": true}), [Yes, Yes, Yes]),
        ("switch a plug", DeviceKind::Plug, json!({"on": false}), [Yes, Yes, Yes]),
        ("set the thermostat", DeviceKind::Thermostat, json!({"targetTemp": 20.5}), [Yes, Yes, No]),
        ("lock", DeviceKind::Lock, json!({"locked": true}), [Yes, Yes, Yes]),
        ("unlock", DeviceKind::Lock, json!({"locked": false}), [Yes, Yes, No]),
        ("camera control", DeviceKind::Camera, json!({"recording": true}), [Yes, Yes, Hidden]),
    ];
    for (what, kind, set, cells) in &control {
        let path = format!("/v1/households/{h}/devices/{}/commands", device(&w.home, *kind));
        for who in EVERYONE {
            let want = match who {
                Who::Anonymous => 401,
                Who::Stranger => 404,
                Who::Owner | Who::Adult | Who::Child => match cells[who as usize] {
                    Yes => 202,
                    No => 403,
                    Hidden => 404,
                },
            };
            let (got, body) = w.call(who, reqwest::Method::POST, &path, Some(json!({"set": set}))).await;
            assert_eq!(got, want, "{what} as {who:?}: {body}");
        }
    }

    // Member management (owner only), and creating a household (anyone signed in).
    let spare = w.home.accounts[3].user_id;
    let manage: [(&str, reqwest::Method, String, Option<Value>, u16); 4] = [
        ("invite", reqwest::Method::POST, format!("/v1/households/{h}/invitations"), Some(json!({"role": "child"})), 201),
        ("change a role", reqwest::Method::PUT, format!("/v1/households/{h}/members/{spare}/role"), Some(json!({"role": "child"})), 200),
        ("remove a member", reqwest::Method::DELETE, format!("/v1/households/{h}/members/{spare}"), None, 204),
        ("create a household", reqwest::Method::POST, "/v1/households".into(), Some(json!({"name": "Second home"})), 201),
    ];
    for (what, method, path, body, owner_gets) in &manage {
        let anyone = *what == "create a household";
        // The owner goes last: their call changes the state the others are refused on.
        for who in [Who::Anonymous, Who::Stranger, Who::Child, Who::Adult, Who::Owner] {
            let want = match who {
                Who::Anonymous => 401,
                _ if anyone => 201,
                Who::Stranger => 404,
                Who::Adult | Who::Child => 403,
                Who::Owner => *owner_gets,
            };
            let (got, b) = w.call(who, method.clone(), path, body.clone()).await;
            assert_eq!(got, want, "{what} as {who:?}: {b}");
            if got >= 400 {
                assert!(b["type"].as_str().is_some_and(|t| t.starts_with("https://homelink.dev/problems/")), "{b}");
            }
        }
    }

    // GraphQL: every field and the subscription.
    let camera = device(&w.home, DeviceKind::Camera);
    let light = device(&w.home, DeviceKind::Light);
    let camera_cmd = {
        let (s, b) = w
            .call(
                Who::Owner,
                reqwest::Method::POST,
                &format!("/v1/households/{h}/devices/{camera}/commands"),
                Some(json!({"set": {"recording": false}})),
            )
            .await;
        assert_eq!(s, 202);
        b["commandId"].as_str().expect("commandId").to_owned()
    };
    let camera_cmd_visible = eventually(Duration::from_secs(20), "the camera command projected", || async {
        let (_, v) = w.gql(Who::Owner, "query($id: ID!) { command(id: $id) { id } }", json!({"id": camera_cmd})).await;
        (!v["data"]["command"].is_null()).then_some(())
    });
    camera_cmd_visible.await;
    let vars = json!({"h": h, "camera": camera, "light": light, "cmd": camera_cmd});
    let q = "query($h: ID!, $camera: ID!, $light: ID!, $cmd: ID!) {
        me { userId memberships { role } }
        household(id: $h) { myRole devices { nodes { kind } } members { role } }
        cam: device(id: $camera) { id }
        lamp: device(id: $light) { id }
        command(id: $cmd) { id }
    }";
    for who in EVERYONE {
        let (status, v) = w.gql(who, q, vars.clone()).await;
        if who == Who::Anonymous {
            assert_eq!(status, 401);
            assert_eq!(v["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
            continue;
        }
        assert_eq!(status, 200);
        assert!(v["errors"].is_null(), "{who:?}: {v}");
        let d = &v["data"];
        let member = who != Who::Stranger;
        let sees_cameras = matches!(who, Who::Owner | Who::Adult);
        assert_eq!(d["household"].is_null(), !member, "{who:?} household");
        assert_eq!(d["lamp"].is_null(), !member, "{who:?} light");
        assert_eq!(d["cam"].is_null(), !sees_cameras, "{who:?} camera");
        assert_eq!(d["command"].is_null(), !sees_cameras, "{who:?} camera command");
        if member {
            let kinds: Vec<&str> =
                d["household"]["devices"]["nodes"].as_array().expect("devices").iter().filter_map(|x| x["kind"].as_str()).collect();
            assert_eq!(kinds.len(), if sees_cameras { 6 } else { 5 }, "{who:?}: {kinds:?}");
            assert_eq!(kinds.contains(&"camera"), sees_cameras);
            // The spare adult was removed above: owner, adult, child remain.
            assert_eq!(d["household"]["members"].as_array().expect("members").len(), 3);
        }
    }
    // The audit log: owners only; a stranger is told the household does not exist.
    let aq = "query($h: ID!) { auditLog(householdId: $h, first: 5) { edges { node { action } } } }";
    for (who, code) in
        [(Who::Owner, None), (Who::Adult, Some("FORBIDDEN")), (Who::Child, Some("FORBIDDEN")), (Who::Stranger, Some("NOT_FOUND"))]
    {
        let (_, v) = w.gql(who, aq, json!({"h": h})).await;
        match code {
            None => assert!(v["data"]["auditLog"]["edges"].is_array(), "{v}"),
            Some(c) => {
                assert!(v["data"].is_null() || v["data"]["auditLog"].is_null(), "{who:?}: {v}");
                assert_eq!(v["errors"][0]["extensions"]["code"], c, "{who:?}: {v}");
            }
        }
    }
    // The subscription: members may subscribe; a stranger gets the same error as for
    // a household that does not exist; without a token the connection is refused.
    let sq = "subscription($h: ID!, $after: Int) { deviceChanges(householdId: $h, after: $after) { deviceId } }";
    for who in [Who::Owner, Who::Adult, Who::Child] {
        let mut sub = w.stack.subscribe_from_now(w.token(who).expect("token"), sq, json!({}), h).await;
        let light_report = report(&w.home, light, 1_000 + who as u64);
        w.stack.appender.append(&w.stack.topics.telemetry(), &light_report).await.expect("append");
        next_matching(&mut sub, "a light change", |v| v["deviceChanges"]["deviceId"] == json!(light)).await;
    }
    let mut foreign = Subscription::start(&w.stack.graphql_ws(), &w.stranger.access_token, sq, json!({"h": h})).await.expect("connect");
    let mut missing =
        Subscription::start(&w.stack.graphql_ws(), &w.stranger.access_token, sq, json!({"h": Uuid::new_v4()})).await.expect("connect");
    let (a, b) = (foreign.next().await.expect_err("refused").to_string(), missing.next().await.expect_err("refused").to_string());
    assert_eq!(a, b);
    assert!(a.contains("NOT_FOUND"), "{a}");
    assert!(Subscription::start(&w.stack.graphql_ws(), "not-a-token", sq, json!({"h": h})).await.is_err(), "anonymous refused");

    // The registry (product.md: add / rename / move devices and manage rooms:
    // owner and adult; remove devices: owner only). Written out per role:
    // (what, method, path, body, [owner, adult, child]).
    let lamp = device(&w.home, DeviceKind::Light);
    let sensor = device(&w.home, DeviceKind::Sensor);
    let (_, room) =
        w.call(Who::Owner, reqwest::Method::POST, &format!("/v1/households/{h}/rooms"), Some(json!({"name": "Matrix room"}))).await;
    let room = room["roomId"].as_str().expect("roomId").to_owned();
    let registry: [Row; 7] = [
        (
            "register a device",
            reqwest::Method::POST,
            format!("/v1/households/{h}/devices"),
            Some(json!({"kind": "plug", "name": "New plug"})),
            [true, true, false],
        ),
        (
            "rename a device",
            reqwest::Method::PUT,
            format!("/v1/households/{h}/devices/{lamp}/name"),
            Some(json!({"name": "Lamp"})),
            [true, true, false],
        ),
        (
            "move a device",
            reqwest::Method::PUT,
            format!("/v1/households/{h}/devices/{lamp}/room"),
            Some(json!({"roomId": room})),
            [true, true, false],
        ),
        ("rename a room", reqwest::Method::PUT, format!("/v1/households/{h}/rooms/{room}"), None, [true, true, false]),
        ("create a room", reqwest::Method::POST, format!("/v1/households/{h}/rooms"), None, [true, true, false]),
        ("delete a room", reqwest::Method::DELETE, format!("/v1/households/{h}/rooms/{room}"), None, [true, true, false]),
        ("remove a device", reqwest::Method::DELETE, format!("/v1/households/{h}/devices/{sensor}"), None, [true, false, false]),
    ];
    for (what, method, path, body, cells) in &registry {
        for who in [Who::Anonymous, Who::Stranger, Who::Child, Who::Adult, Who::Owner] {
            // Room names are unique: each caller brings its own.
            let body = match *what {
                "create a room" | "rename a room" => Some(json!({"name": format!("{what} by {who:?}")})),
                _ => body.clone(),
            };
            let ok = match *what {
                "register a device" | "create a room" => 201,
                "delete a room" | "remove a device" => 204,
                _ => 200,
            };
            let want = match who {
                Who::Anonymous => 401,
                Who::Stranger => 404,
                Who::Owner | Who::Adult | Who::Child => {
                    if cells[who as usize] {
                        ok
                    } else {
                        403
                    }
                }
            };
            // An adult deletes the room; the owner then finds it gone.
            let want = if *what == "delete a room" && who == Who::Owner { 404 } else { want };
            let (got, b) = w.call(who, method.clone(), path, body).await;
            assert_eq!(got, want, "{what} as {who:?}: {b}");
        }
    }
    // Anyone, signed in or not, may read the device-message schemas.
    for who in EVERYONE {
        let mut r = w.stack.http.get(format!("{}/v1/schemas", w.stack.api()));
        if let Some(t) = w.token(who) {
            r = r.bearer_auth(t);
        }
        assert_eq!(r.send().await.expect("schemas").status(), 200, "schemas as {who:?}");
    }

    // Accepting an invitation: anyone signed in who is not a member yet.
    let (_, inv) =
        w.call(Who::Owner, reqwest::Method::POST, &format!("/v1/households/{h}/invitations"), Some(json!({"role": "child"}))).await;
    let code = json!({"code": inv["code"]});
    for (who, want) in [(Who::Anonymous, 401), (Who::Adult, 409), (Who::Stranger, 200)] {
        let (got, b) = w.call(who, reqwest::Method::POST, "/v1/invitations/accept", Some(code.clone())).await;
        assert_eq!(got, want, "accept as {who:?}: {b}");
    }
    // Leaving: any member, but not the last owner.
    let leave = format!("/v1/households/{h}/leave");
    for (who, want) in [(Who::Anonymous, 401), (Who::Owner, 409), (Who::Child, 204), (Who::Adult, 204)] {
        let (got, b) = w.call(who, reqwest::Method::POST, &leave, None).await;
        assert_eq!(got, want, "leave as {who:?}: {b}");
    }
}

fn report(home: &SeededHousehold, device: Uuid, seq: u64) -> Envelope {
    let kind = home.devices.iter().find(|d| d.id == device).expect("device").kind;
    let state = homelink_tools::sim::initial_state(kind);
    let ev = Event::DeviceStateReported(DeviceStateReported { device_id: device, seq, device_ts: None, state, battery: None });
    Envelope::new(home.household_id, Actor::Device(device), &ev, Utc::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_households_ids_answer_byte_for_byte_like_ids_that_do_not_exist() {
    let w = World::new().await;
    let theirs = w.home.household_id;
    let nowhere = Uuid::new_v4();
    let spare = w.home.accounts[3].user_id;
    for (method, tail, body) in [
        (reqwest::Method::POST, "/invitations".to_owned(), Some(json!({"role": "adult"}))),
        (reqwest::Method::PUT, format!("/members/{spare}/role"), Some(json!({"role": "child"}))),
        (reqwest::Method::DELETE, format!("/members/{spare}"), None),
        (reqwest::Method::POST, "/leave".to_owned(), None),
        (reqwest::Method::POST, format!("/devices/{}/commands", w.home.devices[0].id), Some(json!({"set": {"on": true}}))),
    ] {
        let a = w.call(Who::Stranger, method.clone(), &format!("/v1/households/{theirs}{tail}"), body.clone()).await;
        let b = w.call(Who::Stranger, method.clone(), &format!("/v1/households/{nowhere}{tail}"), body.clone()).await;
        assert_eq!(a, b, "{method} {tail}");
        assert_eq!(a.0, 404);
    }
    let q = "query($h: ID!) { household(id: $h) { name } }";
    assert_eq!(w.gql(Who::Stranger, q, json!({"h": theirs})).await, w.gql(Who::Stranger, q, json!({"h": nowhere})).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_demotions_and_removals_never_leave_a_household_without_an_owner() {
    let stack = Stack::start().await;
    // Two owners demoting each other at once: exactly one wins, the other gets 409.
    for _ in 0..3 {
        let home = stack.household_with(&["owner"], &[]).await;
        let (a, b) = (&home.accounts[0], &home.accounts[1]);
        let demote = |by: &Account, whom: Uuid| {
            stack
                .http
                .put(format!("{}/v1/households/{}/members/{whom}/role", stack.api(), home.household_id))
                .bearer_auth(&by.access_token)
                .json(&json!({"role": "adult"}))
                .send()
        };
        let (ra, rb) = tokio::join!(demote(a, b.user_id), demote(b, a.user_id));
        let mut statuses = [ra.expect("a").status().as_u16(), rb.expect("b").status().as_u16()];
        statuses.sort();
        // The loser gets 409 when the winner's change landed while its request
        // was in flight (the usual case), 403 if it had landed before.
        assert!(statuses == [200, 409] || statuses == [200, 403], "{statuses:?}");
        assert_eq!(owners(&stack, home.household_id).await, 1);
    }

    // Four owners each removing the three others and leaving, all at once.
    let home = stack.household_with(&["owner", "owner", "owner"], &[]).await;
    let mut calls = Vec::new();
    for by in &home.accounts {
        for whom in &home.accounts {
            let url = if by.user_id == whom.user_id {
                stack.http.post(format!("{}/v1/households/{}/leave", stack.api(), home.household_id))
            } else {
                stack.http.delete(format!("{}/v1/households/{}/members/{}", stack.api(), home.household_id, whom.user_id))
            };
            calls.push(url.bearer_auth(&by.access_token).send());
        }
    }
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.as_ref().is_ok_and(|r| r.status() == 204)).count();
    // Losers: 409 (conflict with a change made meanwhile) or 404 (the caller
    // had already been removed, so the household no longer exists for them).
    let statuses: Vec<u16> = results.iter().map(|r| r.as_ref().map_or(0, |r| r.status().as_u16())).collect();
    assert!(statuses.iter().all(|s| [204, 404, 409].contains(s)), "{statuses:?}");
    assert_eq!(ok, 3, "three of the four owners go, one stays");
    assert_eq!(owners(&stack, home.household_id).await, 1);
    // Every event was decided on the version before it: the fold refused none.
    let refused: i64 = sqlx::query_scalar("SELECT count(*) FROM household_refused_events").fetch_one(&stack.pool).await.expect("count");
    assert_eq!(refused, 0);
}

async fn owners(stack: &Stack, h: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM household_members WHERE household_id = $1 AND role = 'owner'")
        .bind(h)
        .fetch_one(&stack.pool)
        .await
        .expect("owners")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_gives_one_effect_and_the_same_response() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Lamp", "Hall")]).await;
    let owner = &home.accounts[0];
    let light = home.devices[0].id;
    let send = |key: &'static str, body: Value| stack.command(&home, light).header("idempotency-key", key).json(&body).send();

    let first = send("tap-1", json!({"set": {"on": true}})).await.expect("first");
    assert_eq!(first.status(), 202);
    assert_eq!(first.headers()["idempotent-replayed"], "false");
    let first: Value = first.json().await.expect("json");
    // A retry with the same key and body gets the stored answer.
    let again = send("tap-1", json!({"set": {"on": true}})).await.expect("retry");
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.expect("json"), first);
    // The same key with another body is refused.
    let other = send("tap-1", json!({"set": {"on": false}})).await.expect("other body");
    assert_eq!(other.status(), 422);
    assert_eq!(other.json::<Value>().await.expect("problem")["type"], "https://homelink.dev/problems/idempotency-key-reused");
    // One command was appended and applied.
    stack.wait_applied("DeviceCommandRequested", 1, Duration::from_secs(20)).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM device_commands").fetch_one(&stack.pool).await.expect("count");
    assert_eq!(n, 1);

    // Household writes too: a retried create makes one household.
    let create = || {
        stack
            .http
            .post(format!("{}/v1/households", stack.api()))
            .bearer_auth(&owner.access_token)
            .header("idempotency-key", "new-home")
            .json(&json!({"name": "Cabin"}))
            .send()
    };
    let a: Value = create().await.expect("create").json().await.expect("json");
    let b: Value = create().await.expect("retry").json().await.expect("json");
    assert_eq!(a, b);
    stack.wait_applied("HouseholdCreated", 2, Duration::from_secs(20)).await;
    // Keys are per caller: another user's identical key is independent.
    let stranger = stack.account("other").await;
    let theirs = stack
        .http
        .post(format!("{}/v1/households", stack.api()))
        .bearer_auth(&stranger.access_token)
        .header("idempotency-key", "new-home")
        .json(&json!({"name": "Cabin"}))
        .send()
        .await
        .expect("create");
    assert_eq!(theirs.status(), 201);
    assert_ne!(theirs.json::<Value>().await.expect("json")["householdId"], a["householdId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_reads_every_command_accepted_or_denied_in_the_audit_log() {
    let stack = Stack::start().await;
    let home = stack.household_with(&["adult", "child"], &every_kind()).await;
    let h = home.household_id;
    let (owner, adult, child) = (&home.accounts[0], &home.accounts[1], &home.accounts[2]);
    let lock = device(&home, DeviceKind::Lock);
    let post = |who: &Account, path: String, body: Value| {
        stack
            .http
            .post(format!("{}{path}", stack.api()))
            .bearer_auth(&who.access_token)
            .header("user-agent", "HomeLinkTest/1.0")
            .json(&body)
            .send()
    };
    let unlock =
        post(child, format!("/v1/households/{h}/devices/{lock}/commands"), json!({"set": {"locked": false}})).await.expect("unlock");
    assert_eq!(unlock.status(), 403);
    let invite = post(adult, format!("/v1/households/{h}/invitations"), json!({"role": "owner"})).await.expect("invite");
    assert_eq!(invite.status(), 403);
    let ok = post(owner, format!("/v1/households/{h}/devices/{lock}/commands"), json!({"set": {"locked": true}})).await.expect("lock");
    assert_eq!(ok.status(), 202);

    let q = "query($h: ID!, $first: Int!, $after: String, $f: AuditFilter) {
        auditLog(householdId: $h, first: $first, after: $after, filter: $f) {
            edges { cursor node { at actorId role client action target outcome status detail } }
            pageInfo { hasNextPage endCursor } } }";
    let denied = eventually(Duration::from_secs(20), "both denials in the audit log", || async {
        let r = stack.gql(&owner.access_token, q, json!({"h": h, "first": 10, "f": {"outcome": "denied"}})).await;
        let edges = r["data"]["auditLog"]["edges"].as_array()?.clone();
        (edges.len() == 2).then_some(edges)
    })
    .await;
    // The accepted lock is on the commands topic, the denials on the
    // household stream: the projector may apply them in either order.
    eventually(Duration::from_secs(20), "the accepted lock in the audit log", || async {
        let r = stack.gql(&owner.access_token, q, json!({"h": h, "first": 10, "f": {"outcome": "accepted"}})).await;
        r["data"]["auditLog"]["edges"].as_array()?.iter().any(|e| e["node"]["action"] == "device.command").then_some(())
    })
    .await;
    let unlock = denied.iter().map(|e| &e["node"]).find(|n| n["action"] == "device.command").expect("the unlock");
    assert_eq!(unlock["actorId"], json!(child.user_id.to_string()));
    assert_eq!(unlock["role"], "child");
    assert_eq!(unlock["client"], "HomeLinkTest/1.0");
    assert_eq!(unlock["target"], format!("device/{lock}"));
    assert_eq!(unlock["status"], 403);
    let invite = denied.iter().map(|e| &e["node"]).find(|n| n["action"] == "member.invite").expect("the invite");
    assert_eq!(invite["role"], "adult");

    // Everything, newest first, one page at a time: the lock, then the
    // denials, the members joining, the invitations, the creation.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let r = stack.gql(&owner.access_token, q, json!({"h": h, "first": 2, "after": after})).await;
        let page = &r["data"]["auditLog"];
        for e in page["edges"].as_array().expect("edges") {
            seen.push((e["node"]["at"].as_str().expect("at").to_owned(), e["node"]["action"].as_str().expect("action").to_owned()));
        }
        if page["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = page["pageInfo"]["endCursor"].as_str().map(str::to_owned);
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.0.cmp(&a.0));
    assert_eq!(seen, sorted, "newest first");
    let actions: Vec<&str> = seen.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(actions.first(), Some(&"device.command"), "{actions:?}");
    for a in ["member.invite", "invitation.accept", "device.command"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    assert_eq!(actions.last(), Some(&"household.create"), "{actions:?}");
    // A bad cursor is a clear error, not a crash.
    let r = stack.gql(&owner.access_token, q, json!({"h": h, "first": 2, "after": "garbage"})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_narrows_on_demotion_and_ends_on_removal() {
    let stack = Stack::start().await;
    let home = stack.household_with(&["adult"], &[(DeviceKind::Camera, "Cam", "Garden"), (DeviceKind::Light, "Lamp", "Hall")]).await;
    let (owner, adult) = (&home.accounts[0], &home.accounts[1]);
    let (camera, light) = (home.devices[0].id, home.devices[1].id);
    let q = "subscription($h: ID!, $after: Int) { deviceChanges(householdId: $h, after: $after) { deviceId shadow { seq } } }";
    let mut sub = stack.subscribe_from_now(&adult.access_token, q, json!({}), home.household_id).await;
    let telemetry = stack.topics.telemetry();

    // As an adult: camera changes arrive.
    stack.appender.append(&telemetry, &report(&home, camera, 1)).await.expect("append");
    next_matching(&mut sub, "the camera as an adult", |v| v["deviceChanges"]["deviceId"] == json!(camera)).await;

    // Demoted to child: the camera's next change is not delivered, the light's is.
    let url = format!("{}/v1/households/{}/members/{}/role", stack.api(), home.household_id, adult.user_id);
    let r = stack.http.put(url).bearer_auth(&owner.access_token).json(&json!({"role": "child"})).send().await.expect("demote");
    assert_eq!(r.status(), 200);
    stack.appender.append(&telemetry, &report(&home, camera, 2)).await.expect("append");
    stack.appender.append(&telemetry, &report(&home, light, 3)).await.expect("append");
    let first = next_matching(&mut sub, "the next change as a child", |_| true).await;
    assert_eq!(first["deviceChanges"]["deviceId"], json!(light), "the camera's change was not delivered: {first}");

    // Removed: the subscription ends with an error.
    let url = format!("{}/v1/households/{}/members/{}", stack.api(), home.household_id, adult.user_id);
    let r = stack.http.delete(url).bearer_auth(&owner.access_token).send().await.expect("remove");
    assert_eq!(r.status(), 204);
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Err(e) = sub.next().await {
                return e.to_string();
            }
        }
    })
    .await
    .expect("the subscription ends");
    assert!(end.contains("FORBIDDEN"), "{end}");
}
