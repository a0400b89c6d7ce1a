//! The device registry through the running services and the real broker:
//! registration with certificates (generated or from a CSR), rooms, removal
//! with revocation, isolation between devices at the broker, serial claims,
//! and a rebuild of the registry from the log alone.

mod common;

use common::{eventually, next_matching, Stack};
use homelink_events::DeviceKind;
use homelink_tools::api::{self, Account, Registered};
use homelink_tools::seed::SeededHousehold;
use homelink_tools::sim::{self, DeviceSpec};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

fn spec(home: Uuid, r: &Registered, kind: DeviceKind, key_pem: &str) -> DeviceSpec {
    DeviceSpec {
        household_id: home,
        device_id: r.device_id,
        kind,
        cert_pem: r.certificate_pem.clone(),
        key_pem: key_pem.to_owned(),
        interval: None,
        port: r.mqtt.as_ref().map(|m| m.port),
    }
}

/// Connects as the device; `Err` when the broker refuses (TLS or CONNACK).
async fn connect(stack: &Stack, spec: &DeviceSpec, client_id: Option<&str>) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = sim::mqtt_options(spec, &stack.env.target());
    if let Some(id) = client_id {
        o.set_client_id(id.to_owned());
    }
    o.set_clean_start(true);
    let (client, mut ev) = AsyncClient::new(o, 10);
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no CONNACK within 10 s".into()));
    r.map(|_| (client, ev))
}

/// Whether the broker closes this connection within `secs` seconds.
async fn closed_within(ev: &mut EventLoop, secs: u64) -> bool {
    tokio::time::timeout(Duration::from_secs(secs), async { while ev.poll().await.is_ok() {} }).await.is_ok()
}

/// Publishes QoS 1 and returns the PUBACK reason.
async fn publish(client: &AsyncClient, ev: &mut EventLoop, topic: String, body: Value) -> PubAckReason {
    client.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await.expect("publish");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(a))) = ev.poll().await {
                return a.reason;
            }
        }
    })
    .await
    .expect("puback")
}

async fn subscribe(client: &AsyncClient, ev: &mut EventLoop, filter: &str) -> Vec<SubscribeReasonCode> {
    client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(a))) = ev.poll().await {
                return a.return_codes;
            }
        }
    })
    .await
    .expect("suback")
}

/// A registry row: id, kind, name, room, serial, removed.
type DeviceRow = (Uuid, String, String, Option<Uuid>, Option<String>, bool);

fn state(seq: u64, v: Value) -> Value {
    json!({"v": 1, "seq": seq, "state": v})
}

async fn register(stack: &Stack, who: &Account, h: Uuid, kind: DeviceKind, serial: Option<&str>) -> reqwest::Response {
    stack
        .http
        .post(format!("{}/v1/households/{h}/devices", stack.api()))
        .bearer_auth(&who.access_token)
        .json(&json!({"kind": kind, "name": format!("A {kind}"), "serial": serial}))
        .send()
        .await
        .expect("register")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_connect_report_remove_and_reregister_through_the_broker() {
    let stack = Stack::start_revoking().await;
    let home = stack.household_with(&["adult", "child"], &[]).await;
    let (owner, adult, child) = (&home.accounts[0], &home.accounts[1], &home.accounts[2]);
    let h = home.household_id;
    let q = "subscription($h: ID!, $after: Int) { householdChanges(householdId: $h, after: $after) { change deviceId roomId shadow { reported } } }";
    let mut sub = stack.subscribe_from_now(&owner.access_token, q, json!({}), h).await;

    // A child may not register; an adult may, into a room.
    assert_eq!(register(&stack, child, h, DeviceKind::Lock, None).await.status(), 403);
    let hall = api::create_room(&stack.http, &stack.api(), adult, h, "Hall").await.expect("room");
    let reg =
        api::register_device(&stack.http, &stack.api(), adult, h, DeviceKind::Lock, "Front door", Some(hall), Some("sn-lock-1"), None)
            .await
            .expect("register");
    let key = reg.private_key_pem.clone().expect("a generated key comes back once");
    next_matching(&mut sub, "DeviceRegistered on the subscription", |v| {
        v["householdChanges"]["change"] == "DeviceRegistered" && v["householdChanges"]["deviceId"] == json!(reg.device_id)
    })
    .await;

    // The device connects with the returned certificate and reports.
    let lock = spec(h, &reg, DeviceKind::Lock, &key);
    let (client, mut ev) = connect(&stack, &lock, None).await.expect("the registered device connects");
    let topic = format!("home/{h}/device/{}/state", reg.device_id);
    assert_eq!(publish(&client, &mut ev, topic.clone(), state(1, json!({"locked": true, "jammed": false}))).await, PubAckReason::Success);
    next_matching(&mut sub, "the report on the subscription", |v| {
        v["householdChanges"]["change"] == "shadow" && v["householdChanges"]["shadow"]["reported"]["locked"] == true
    })
    .await;
    let dq = "query($h: ID!) { household(id: $h) { rooms { name devices { id } }
        devices(filter: { includeRemoved: true }) { nodes { id name serial removed room { name } shadow { reported } } } } }";
    let v = stack.gql(&owner.access_token, dq, json!({"h": h})).await;
    let d = &v["data"]["household"]["devices"]["nodes"][0];
    assert_eq!(d["id"], json!(reg.device_id), "{v}");
    assert_eq!(d["serial"], "SN-LOCK-1");
    assert_eq!(d["room"]["name"], "Hall");
    assert_eq!(d["shadow"]["reported"]["locked"], true);
    assert_eq!(v["data"]["household"]["rooms"][0]["devices"][0]["id"], json!(reg.device_id));

    // Only the owner removes.
    let remove = |who: &Account, d: Uuid| {
        stack.http.delete(format!("{}/v1/households/{h}/devices/{d}", stack.api())).bearer_auth(&who.access_token).send()
    };
    assert_eq!(remove(adult, reg.device_id).await.expect("remove").status(), 403);
    assert_eq!(remove(owner, reg.device_id).await.expect("remove").status(), 204);

    // The open connection is closed and the certificate refused from now on.
    assert!(closed_within(&mut ev, 15).await, "the removed device's connection was closed");
    let refused = connect(&stack, &lock, None).await;
    assert!(refused.is_err(), "a revoked certificate cannot connect");
    // Still readable, marked removed; commands to it are refused.
    let v = stack.gql(&owner.access_token, dq, json!({"h": h})).await;
    let d = &v["data"]["household"]["devices"]["nodes"][0];
    assert_eq!(d["removed"], true, "{v}");
    assert_eq!(d["shadow"]["reported"]["locked"], true);
    let cmd = stack.command(&home, reg.device_id).json(&json!({"set": {"locked": false}})).send().await.expect("command");
    assert_eq!(cmd.status(), 409);
    let visible =
        stack.gql(&owner.access_token, "query($h: ID!) { household(id: $h) { devices { nodes { id } } } }", json!({"h": h})).await;
    assert_eq!(visible["data"]["household"]["devices"]["nodes"], json!([]), "removed devices are left out by default");

    // The same serial registers again, and the new certificate works.
    let again = api::register_device(&stack.http, &stack.api(), owner, h, DeviceKind::Lock, "Front door", None, Some("SN-LOCK-1"), None)
        .await
        .expect("re-register");
    let lock2 = spec(h, &again, DeviceKind::Lock, again.private_key_pem.as_deref().expect("key"));
    let (c2, mut ev2) = connect(&stack, &lock2, None).await.expect("the new certificate connects");
    let topic2 = format!("home/{h}/device/{}/state", again.device_id);
    assert_eq!(publish(&c2, &mut ev2, topic2, state(1, json!({"locked": false}))).await, PubAckReason::Success);

    // A removal whose request died right after the append (the event is in
    // the log, nothing else happened): the reconcile loop revokes and kicks.
    let cert_serial: Option<String> = sqlx::query_scalar("SELECT cert_serial FROM devices WHERE device_id = $1")
        .bind(again.device_id)
        .fetch_one(&stack.pool)
        .await
        .expect("cert serial");
    let removed = homelink_events::Event::DeviceRemoved(homelink_events::event::DeviceRemoved {
        device_id: again.device_id,
        cert_serial,
        serial: Some("SN-LOCK-1".into()),
    });
    let env = homelink_events::Envelope::new(h, homelink_events::Actor::User(owner.user_id.to_string()), &removed, chrono::Utc::now());
    stack.appender.append(&stack.topics.households(), &env).await.expect("append");
    assert!(closed_within(&mut ev2, 30).await, "the loop closed the connection of a device removed behind the request's back");
    assert!(connect(&stack, &lock2, None).await.is_err(), "and its certificate is refused");
    let _ = c2.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_csr_the_device_key_never_leaves_the_device() {
    let stack = Stack::start().await;
    let home = stack.seed(&[]).await;
    let owner = &home.accounts[0];
    // The device makes its key and a request; only the request travels.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "whatever-the-device-says");
    let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
    let reg =
        api::register_device(&stack.http, &stack.api(), owner, home.household_id, DeviceKind::Sensor, "Climate", None, None, Some(&csr))
            .await
            .expect("register with a CSR");
    assert!(reg.private_key_pem.is_none(), "no key in the answer");
    let der = rustls_pemfile_first_cert(&reg.certificate_pem);
    let cert = x509_parser::parse_x509_certificate(&der).expect("x509").1;
    let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).expect("CN").to_owned();
    assert_eq!(cn, reg.device_id.to_string(), "CN = device id, whatever the request said");
    assert_eq!(
        cert.public_key().raw,
        &rcgen::PublicKeyData::subject_public_key_info(&key)[..],
        "the certificate holds the device's own public key"
    );

    let spec = spec(home.household_id, &reg, DeviceKind::Sensor, &key.serialize_pem());
    let (c, mut ev) = connect(&stack, &spec, None).await.expect("connects with its own key");
    let topic = format!("home/{}/device/{}/state", home.household_id, reg.device_id);
    assert_eq!(publish(&c, &mut ev, topic, state(1, json!({"temperature": 21.5}))).await, PubAckReason::Success);
    let _ = c.disconnect().await;

    // A request that is not PEM-armoured breaks the document (400); armour
    // around DER that is no valid request is 422. Neither registers anything.
    for (csr, status) in [("not a csr", 400), ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----", 422)] {
        let r = stack
            .http
            .post(format!("{}/v1/households/{}/devices", stack.api(), home.household_id))
            .bearer_auth(&owner.access_token)
            .json(&json!({"kind": "sensor", "name": "Bad", "csr": csr}))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), status, "{csr}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM devices WHERE name = 'Bad'").fetch_one(&stack.pool).await.expect("count");
    assert_eq!(n, 0);
}

fn rustls_pemfile_first_cert(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    p.contents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_can_touch_only_its_own_topics_at_the_broker() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "A", "Hall"), (DeviceKind::Light, "B", "Hall")]).await;
    let h = home.household_id;
    let (a, b) = (common::spec(&home, 0, None), common::spec(&home, 1, None));
    let (ca, mut eva) = connect(&stack, &a, None).await.expect("A connects");

    // Publishing on B's topic: not authorized (135), and no event.
    let reason = publish(&ca, &mut eva, format!("home/{h}/device/{}/state", b.device_id), state(1, json!({"brightness": 1}))).await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    // Subscribing to B's commands, to everything, or to another household:
    // Mosquitto 2.0 grants the SUBACK but delivers only what the ACL lets A
    // read, so A receives nothing of B's while B gets its command.
    for filter in [format!("home/{h}/device/{}/cmd", b.device_id), "#".to_owned(), format!("home/{}/device/+/cmd", Uuid::new_v4())] {
        subscribe(&ca, &mut eva, &filter).await;
    }
    let (cb0, mut evb0) = connect(&stack, &b, None).await.expect("B connects");
    let own_cmd = subscribe(&cb0, &mut evb0, &format!("home/{h}/device/{}/cmd", b.device_id)).await;
    assert!(matches!(own_cmd[..], [SubscribeReasonCode::Success(_)]), "{own_cmd:?}");
    let r = stack.command(&home, b.device_id).json(&json!({"set": {"on": true}})).send().await.expect("command to B");
    assert_eq!(r.status(), 202);
    let b_got = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = evb0.poll().await {
                return String::from_utf8_lossy(&p.topic).into_owned();
            }
        }
    })
    .await
    .expect("B receives its command");
    assert!(b_got.ends_with("/cmd"), "{b_got}");
    let a_got = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eva.poll().await {
                return String::from_utf8_lossy(&p.topic).into_owned();
            }
        }
    })
    .await;
    assert!(a_got.is_err(), "A received {a_got:?}");
    let _ = cb0.disconnect().await;
    // Its own topic works.
    let own = publish(&ca, &mut eva, format!("home/{h}/device/{}/state", a.device_id), state(1, json!({"brightness": 7}))).await;
    assert_eq!(own, PubAckReason::Success);
    stack.wait_applied("DeviceStateReported", 1, Duration::from_secs(20)).await;
    // B's shadow holds the command's desired state, but nothing reported.
    let b_reported: Option<(i64, serde_json::Value)> = sqlx::query_as("SELECT seq, reported FROM device_shadows WHERE device_id = $1")
        .bind(b.device_id)
        .fetch_optional(&stack.pool)
        .await
        .expect("q");
    assert!(b_reported.as_ref().is_none_or(|(seq, r)| *seq == 0 && r == &json!({})), "nothing was reported for B: {b_reported:?}");

    // B connected; A claiming B's client id gets its own id forced: B stays connected.
    let (cb, mut evb) = connect(&stack, &b, None).await.expect("B connects");
    let (ca2, mut eva2) = connect(&stack, &a, Some(&b.device_id.to_string())).await.expect("A connects again");
    let still = publish(&cb, &mut evb, format!("home/{h}/device/{}/state", b.device_id), state(2, json!({"brightness": 2}))).await;
    assert_eq!(still, PubAckReason::Success, "B's session was not taken over");
    let mine = publish(&ca2, &mut eva2, format!("home/{h}/device/{}/state", a.device_id), state(3, json!({"brightness": 3}))).await;
    assert_eq!(mine, PubAckReason::Success);
    for c in [ca, cb, ca2] {
        let _ = c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_serial_belongs_to_one_household_at_a_time() {
    let stack = Stack::start().await;
    let (one, two) = (stack.seed(&[]).await, stack.seed(&[]).await);
    for round in 0..5 {
        let serial = format!("SN-RACE-{round}");
        let (a, b) = tokio::join!(
            register(&stack, &one.accounts[0], one.household_id, DeviceKind::Plug, Some(&serial)),
            register(&stack, &two.accounts[0], two.household_id, DeviceKind::Plug, Some(&serial))
        );
        let mut s = [a.status().as_u16(), b.status().as_u16()];
        s.sort();
        assert_eq!(s, [201, 409], "round {round}");
    }
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM devices WHERE serial LIKE 'SN-RACE-%'").fetch_one(&stack.pool).await.expect("count");
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_serial_is_claimed_only_after_the_caller_is_authorized() {
    let stack = Stack::start().await;
    let home = stack.household_with(&["child"], &[]).await;
    let (owner, child) = (&home.accounts[0], &home.accounts[1]);
    let stranger = stack.account("stranger").await;
    let h = home.household_id;

    // A child (403) and a stranger (404) are refused before any claim…
    let r = register(&stack, child, h, DeviceKind::Plug, Some("SN-OWNERS-1")).await;
    assert_eq!(r.status(), 403);
    let r = register(&stack, &stranger, h, DeviceKind::Plug, Some("SN-OWNERS-1")).await;
    assert_eq!(r.status(), 404);
    // …so the serial is not held and the owner registers it.
    let r = register(&stack, owner, h, DeviceKind::Plug, Some("SN-OWNERS-1")).await;
    assert_eq!(r.status(), 201);
    // Now claimed: the stranger still learns nothing from a household not theirs.
    let r = register(&stack, &stranger, h, DeviceKind::Plug, Some("SN-OWNERS-1")).await;
    assert_eq!(r.status(), 404);
    let claims: i64 = sqlx::query_scalar("SELECT count(*) FROM device_serial_claims").fetch_one(&stack.pool).await.expect("claims");
    assert_eq!(claims, 1);

    // A household id that does not exist is a 404 and leaves no audit row,
    // whatever the serial.
    let ghost = Uuid::new_v4();
    let r = register(&stack, &stranger, ghost, DeviceKind::Plug, Some("SN-OWNERS-1")).await;
    assert_eq!(r.status(), 404);
    // The refusals on the real household are audited (child, stranger twice).
    let pool = stack.pool.clone();
    eventually(Duration::from_secs(30), "the three refusals audited", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE outcome = 'denied'").fetch_one(&pool).await.ok()?;
        (n == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ghosts: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE household_id = $1")
        .bind(ghost)
        .fetch_one(&stack.pool)
        .await
        .expect("audit");
    assert_eq!(ghosts, 0, "no audit rows for a household that does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generated_private_key_is_shown_once_and_stored_nowhere() {
    let stack = Stack::start().await;
    let home = stack.seed(&[]).await;
    let owner = &home.accounts[0];
    let send = || {
        stack
            .http
            .post(format!("{}/v1/households/{}/devices", stack.api(), home.household_id))
            .bearer_auth(&owner.access_token)
            .header("idempotency-key", "register-lamp-1")
            .json(&json!({"kind": "light", "name": "Lamp"}))
            .send()
    };
    let first = send().await.expect("register");
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");
    assert!(first["privateKeyPem"].as_str().is_some_and(|k| k.contains("PRIVATE KEY")), "the key is shown once");

    let again = send().await.expect("replay");
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["deviceId"], first["deviceId"], "the same device");
    assert_eq!(again["certificatePem"], first["certificatePem"], "the same certificate");
    assert!(again.get("privateKeyPem").is_none(), "the replay carries no key: {again}");

    // Nowhere in the database.
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE convert_from(body, 'UTF8') LIKE '%PRIVATE KEY%'")
        .fetch_one(&stack.pool)
        .await
        .expect("idempotency records");
    assert_eq!(found, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_renames_moves_validation_and_a_rebuild_from_the_log_alone() {
    let stack = Stack::start().await;
    let home: SeededHousehold =
        stack.household_with(&["child"], &[(DeviceKind::Light, "Lamp", "Living room"), (DeviceKind::Thermostat, "Heat", "Hall")]).await;
    let (owner, child) = (&home.accounts[0], &home.accounts[1]);
    let h = home.household_id;
    let (lamp, heat) = (home.devices[0].id, home.devices[1].id);
    let call = |who: &Account, m: reqwest::Method, path: String, body: Option<Value>| {
        let mut r = stack.http.request(m, format!("{}{path}", stack.api())).bearer_auth(&who.access_token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let r = r.send().await.expect("call");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    use reqwest::Method;
    let (s, room) = call(owner, Method::POST, format!("/v1/households/{h}/rooms"), Some(json!({"name": "Kitchen"}))).await;
    assert_eq!(s, 201);
    let kitchen = room["roomId"].as_str().expect("roomId").to_owned();
    assert_eq!(call(owner, Method::POST, format!("/v1/households/{h}/rooms"), Some(json!({"name": "kitchen"}))).await.0, 409);
    // Names are taken as given: whitespace at either end is refused, not trimmed.
    assert_eq!(call(owner, Method::POST, format!("/v1/households/{h}/rooms"), Some(json!({"name": " Den "}))).await.0, 400);
    assert_eq!(call(child, Method::POST, format!("/v1/households/{h}/rooms"), Some(json!({"name": "Den"}))).await.0, 403);
    assert_eq!(
        call(owner, Method::PUT, format!("/v1/households/{h}/rooms/{kitchen}"), Some(json!({"name": "Kitchen & dining"}))).await.0,
        200
    );
    assert_eq!(call(owner, Method::PUT, format!("/v1/households/{h}/devices/{lamp}/room"), Some(json!({"roomId": kitchen}))).await.0, 200);
    assert_eq!(
        call(owner, Method::PUT, format!("/v1/households/{h}/devices/{lamp}/name"), Some(json!({"name": "Reading lamp"}))).await.0,
        200
    );
    assert_eq!(call(child, Method::PUT, format!("/v1/households/{h}/devices/{lamp}/name"), Some(json!({"name": "Mine"}))).await.0, 403);
    let nowhere = Uuid::new_v4();
    assert_eq!(call(owner, Method::PUT, format!("/v1/households/{h}/devices/{lamp}/room"), Some(json!({"roomId": nowhere}))).await.0, 404);
    assert_eq!(call(owner, Method::PUT, format!("/v1/households/{h}/devices/{nowhere}/name"), Some(json!({"name": "x"}))).await.0, 404);
    // Deleting a room unassigns its devices.
    assert_eq!(call(owner, Method::DELETE, format!("/v1/households/{h}/rooms/{kitchen}"), None).await.0, 204);
    let q = "query($h: ID!) { household(id: $h) { rooms { name }
        unassigned: devices(filter: { unassigned: true }) { nodes { name room { name } } }
        thermostats: devices(filter: { kind: \"thermostat\" }) { nodes { name } }
        page: devices(first: 1) { edges { cursor node { name } } pageInfo { hasNextPage endCursor } } } }";
    let v = stack.gql(&owner.access_token, q, json!({"h": h})).await;
    let hh = &v["data"]["household"];
    assert_eq!(hh["rooms"], json!([{"name": "Hall"}, {"name": "Living room"}]), "{v}");
    assert_eq!(hh["unassigned"]["nodes"], json!([{"name": "Reading lamp", "room": null}]));
    assert_eq!(hh["thermostats"]["nodes"], json!([{"name": "Heat"}]));
    assert_eq!(hh["page"]["pageInfo"]["hasNextPage"], true);
    let after = hh["page"]["pageInfo"]["endCursor"].as_str().expect("cursor");
    let next = stack
        .gql(
            &owner.access_token,
            "query($h: ID!, $a: String) { household(id: $h) { devices(first: 1, after: $a) { nodes { name } pageInfo { hasNextPage } } } }",
            json!({"h": h, "a": after}),
        )
        .await;
    assert_eq!(next["data"]["household"]["devices"]["nodes"], json!([{"name": "Reading lamp"}]), "{next}");
    assert_eq!(next["data"]["household"]["devices"]["pageInfo"]["hasNextPage"], false);
    // Registration input is validated at the edge.
    for body in [
        json!({"kind": "toaster", "name": "x"}),
        json!({"kind": "light", "name": ""}),
        json!({"kind": "light", "name": "x", "serial": "has spaces"}),
        json!({"kind": "light", "name": "x", "householdId": Uuid::new_v4()}),
    ] {
        assert_eq!(call(owner, Method::POST, format!("/v1/households/{h}/devices"), Some(body.clone())).await.0, 400, "{body}");
    }
    assert_eq!(
        call(owner, Method::POST, format!("/v1/households/{h}/devices"), Some(json!({"kind": "light", "name": "x", "roomId": nowhere})))
            .await
            .0,
        404
    );
    // Commands are checked against the kind's capabilities: nothing appended.
    for set in [json!({"targetTemp": 80}), json!({"targetTemp": 20.3}), json!({"explode": true}), json!({"mode": "turbo"})] {
        let r = stack.command(&home, heat).json(&json!({"set": set})).send().await.expect("command");
        assert_eq!(r.status(), 400, "{set}");
    }

    // Rebuild: a projector on an empty database replays the log alone.
    let snapshot = |pool: sqlx::PgPool| async move {
        let devices: Vec<DeviceRow> = sqlx::query_as(
            "SELECT device_id, kind, name, room_id, serial, removed_at IS NOT NULL FROM devices WHERE household_id = $1 ORDER BY device_id",
        )
        .bind(h)
        .fetch_all(&pool)
        .await
        .expect("devices");
        let rooms: Vec<(Uuid, String)> = sqlx::query_as("SELECT room_id, name FROM rooms WHERE household_id = $1 ORDER BY room_id")
            .bind(h)
            .fetch_all(&pool)
            .await
            .expect("rooms");
        let members: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT user_id, role FROM household_members WHERE household_id = $1 ORDER BY user_id")
                .bind(h)
                .fetch_all(&pool)
                .await
                .expect("members");
        let version: i64 =
            sqlx::query_scalar("SELECT version FROM households WHERE household_id = $1").bind(h).fetch_one(&pool).await.expect("version");
        (devices, rooms, members, version)
    };
    let original = snapshot(stack.pool.clone()).await;
    let fresh = stack.env.fresh_database().await;
    let rebuilt = homelink_projector::Application::build(homelink_projector::Config::new(&fresh, &stack.env.kafka, stack.topics.clone()))
        .await
        .expect("projector");
    tokio::spawn(rebuilt.run_until_stopped(stack.cancel.clone()));
    let pool = sqlx::PgPool::connect(&fresh).await.expect("pool");
    let want = original.3;
    eventually(Duration::from_secs(60), "the rebuild caught up", || {
        let pool = pool.clone();
        async move {
            let v: Option<i64> =
                sqlx::query_scalar("SELECT version FROM households WHERE household_id = $1").bind(h).fetch_optional(&pool).await.ok()?;
            (v == Some(want)).then_some(())
        }
    })
    .await;
    assert_eq!(snapshot(pool).await, original);
}
