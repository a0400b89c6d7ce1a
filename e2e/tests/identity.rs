//! User identity through the running services: token attacks, refresh-token
//! rotation and reuse, signing-key rotation, sign-in failures.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{eventually, light_and_sensor, Stack};
use homelink_kit::auth::{Claims, AUDIENCE, ISSUER};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

/// The active signing key, read the way only the platform itself can.
async fn signing_key(stack: &Stack) -> (String, String, String) {
    let row: (String, String, String) = sqlx::query_as(
        "SELECT kid, private_pem, public_x FROM identity_signing_keys WHERE activates_at <= now() ORDER BY activates_at DESC LIMIT 1",
    )
    .fetch_one(&stack.pool)
    .await
    .expect("signing key");
    row
}

fn claims(sub: Uuid, exp_in: i64) -> Claims {
    let now = chrono::Utc::now().timestamp();
    Claims { iss: ISSUER.into(), aud: AUDIENCE.into(), sub: sub.to_string(), iat: now, exp: now + exp_in, jti: Uuid::new_v4().to_string() }
}

fn sign(kid: &str, pem: &str, c: &Claims) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, c, &EncodingKey::from_ed_pem(pem.as_bytes()).expect("key")).expect("sign")
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_token_attack_gets_401_and_reveals_nothing() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let owner = &home.accounts[0];
    let (kid, pem, public_x) = signing_key(&stack).await;
    let user = owner.user_id;

    // The genuine token works, and so does one forged here with the real key (the control).
    let good = sign(&kid, &pem, &claims(user, 300));
    let parts: Vec<&str> = good.split('.').collect();

    let mut attacks: Vec<(&str, String)> = Vec::new();
    // alg: none, no signature.
    attacks.push(("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": kid})), parts[1])));
    // HS256 "signed" with the public key as the HMAC secret.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some(kid.clone());
    let hs_token = jsonwebtoken::encode(&hs, &claims(user, 300), &EncodingKey::from_secret(public_x.as_bytes())).expect("hs256");
    attacks.push(("HS256 with the public key", hs_token));
    let mut wrong_aud = claims(user, 300);
    wrong_aud.aud = "someone-else".into();
    attacks.push(("wrong aud", sign(&kid, &pem, &wrong_aud)));
    let mut wrong_iss = claims(user, 300);
    wrong_iss.iss = "https://evil.example".into();
    attacks.push(("wrong iss", sign(&kid, &pem, &wrong_iss)));
    attacks.push(("expired", sign(&kid, &pem, &claims(user, -120))));
    // Edited claims: another subject with the original signature.
    let mut edited: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("payload")).expect("claims");
    edited["sub"] = json!(Uuid::new_v4());
    attacks.push(("edited claims", format!("{}.{}.{}", parts[0], b64(&edited), parts[2])));
    for hostile in ["../../dev/null", "' OR 1=1 --", "http://127.0.0.1:1/jwks.json"] {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(hostile.into());
        let t = jsonwebtoken::encode(&h, &claims(user, 300), &EncodingKey::from_ed_pem(pem.as_bytes()).expect("key")).expect("sign");
        attacks.push(("hostile kid", t));
    }
    attacks.push(("garbage", "not.a.token".into()));
    attacks.push(("empty", String::new()));

    let light = home.devices[0].id;
    let ok =
        stack.http.post(stack.command_url(home.household_id, light)).bearer_auth(&good).json(&json!({"set": {"on": true}})).send().await;
    assert_eq!(ok.expect("post").status(), 202, "the control token is accepted");
    let q = json!({"query": "{ me { userId } }"});
    let ok = stack.http.post(stack.graphql_url()).bearer_auth(&good).json(&q).send().await.expect("graphql");
    assert_eq!(ok.status(), 200);

    let mut bodies = std::collections::HashSet::new();
    for (name, token) in &attacks {
        let r = stack
            .http
            .post(stack.command_url(home.household_id, light))
            .header("authorization", format!("Bearer {token}"))
            .json(&json!({"set": {"on": true}}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 401, "command-api: {name}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        bodies.insert(r.text().await.expect("body"));
        let r = stack.http.post(stack.graphql_url()).header("authorization", format!("Bearer {token}")).json(&q).send().await.expect("gql");
        assert_eq!(r.status(), 401, "query-api: {name}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["errors"][0]["extensions"]["code"], "UNAUTHENTICATED", "{name}");
        assert_eq!(v["errors"][0]["message"], "a valid access token is required", "{name}: reveals nothing");
    }
    // Every refusal has the same body: no attack learns why it failed.
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let body: Value = serde_json::from_str(bodies.iter().next().expect("body")).expect("json");
    assert_eq!(body["type"], "https://homelink.dev/problems/unauthorized");
    // Nothing reached the log: only the control command was appended.
    assert_eq!(stack.metric(stack.command_port, "homelink_command_api_messages_out_total{kind=\"command\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reused_refresh_token_revokes_its_whole_family() {
    let stack = Stack::start().await;
    let a = stack.account("refresher").await;
    let refresh = |t: String| {
        let (http, url) = (stack.http.clone(), format!("{}/v1/auth/refresh", stack.api()));
        async move { http.post(url).json(&json!({"refreshToken": t})).send().await.expect("refresh") }
    };
    let r1 = refresh(a.refresh_token.clone()).await;
    assert_eq!(r1.status(), 200);
    let t1: Value = r1.json().await.expect("tokens");
    let second = t1["refreshToken"].as_str().expect("rotated").to_owned();
    assert_ne!(second, a.refresh_token, "rotated on use");

    // The spent token again: refused, and the family is revoked...
    let reuse = refresh(a.refresh_token.clone()).await;
    assert_eq!(reuse.status(), 401);
    // ...so the legitimate successor is dead too.
    let after = refresh(second).await;
    assert_eq!(after.status(), 401);
    let p: Value = after.json().await.expect("problem");
    assert_eq!(p["type"], "https://homelink.dev/problems/invalid-refresh-token");

    // Another session of the same user is unaffected.
    let mut again = a.clone();
    homelink_tools::api::sign_in(&stack.http, &stack.api(), &mut again).await.expect("sign in");
    assert_eq!(refresh(again.refresh_token.clone()).await.status(), 200);

    // Sign-out ends a session's family.
    let mut s2 = a.clone();
    homelink_tools::api::sign_in(&stack.http, &stack.api(), &mut s2).await.expect("sign in");
    let out = stack.http.post(format!("{}/v1/auth/sign-out", stack.api())).json(&json!({"refreshToken": s2.refresh_token})).send().await;
    assert_eq!(out.expect("sign-out").status(), 204);
    assert_eq!(refresh(s2.refresh_token.clone()).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_in_failures_do_not_tell_a_wrong_password_from_an_unknown_account() {
    let stack = Stack::start().await;
    let a = stack.account("someone").await;
    let attempt = |email: String, password: &'static str| {
        let (http, url) = (stack.http.clone(), format!("{}/v1/auth/sign-in", stack.api()));
        async move { http.post(url).json(&json!({"email": email, "password": password})).send().await.expect("sign-in") }
    };
    let wrong = attempt(a.email.clone(), "wrong password!").await;
    let unknown = attempt("nobody@test.homelink.dev".into(), "wrong password!").await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(unknown.status(), 401);
    assert_eq!(wrong.bytes().await.expect("body"), unknown.bytes().await.expect("body"));
    // Case and spacing of the e-mail do not matter.
    assert_eq!(attempt(format!("  {}", a.email.to_uppercase()), "correct horse battery").await.status(), 200);
    // Sign-up validates at the edge and refuses fields it does not own.
    for body in [
        json!({"email": "not-an-email", "password": "long enough pw", "displayName": "x"}),
        json!({"email": "x@y.dev", "password": "short", "displayName": "x"}),
        json!({"email": "x@y.dev", "password": "long enough pw", "displayName": "x", "role": "owner"}),
    ] {
        let r = stack.http.post(format!("{}/v1/auth/sign-up", stack.api())).json(&body).send().await.expect("sign-up");
        assert_eq!(r.status(), 400, "{body}");
    }
    // Password guessing is throttled per e-mail: after 10 failures even the
    // right password waits; an unknown e-mail is treated the same.
    for _ in 0..10 {
        assert_eq!(attempt(a.email.clone(), "wrong password!").await.status(), 401);
    }
    let throttled = attempt(a.email.clone(), "correct horse battery").await;
    assert_eq!(throttled.status(), 429);
    assert!(throttled.headers().contains_key("retry-after"));
    assert_eq!(throttled.json::<Value>().await.expect("problem")["type"], "https://homelink.dev/problems/too-many-attempts");
    for _ in 0..9 {
        assert_eq!(attempt("nobody@test.homelink.dev".into(), "wrong password!").await.status(), 401);
    }
    assert_eq!(attempt("nobody@test.homelink.dev".into(), "wrong password!").await.status(), 429);

    let dup = stack
        .http
        .post(format!("{}/v1/auth/sign-up", stack.api()))
        .json(&json!({"email": a.email, "password": "another long pw", "displayName": "x"}))
        .send()
        .await
        .expect("sign-up");
    assert_eq!(dup.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_signing_key_keeps_old_tokens_valid_and_new_tokens_carry_the_new_kid() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let mut owner = home.accounts[0].clone();
    let old_kid = jsonwebtoken::decode_header(&owner.access_token).expect("header").kid.expect("kid");

    let new_kid = homelink_command_api::auth::rotate(&stack.pool, Duration::from_secs(1)).await.expect("rotate");
    assert_ne!(new_kid, old_kid);

    // The JWKS publishes both keys.
    let jwks_url = format!("{}/.well-known/jwks.json", stack.api());
    eventually(Duration::from_secs(10), "both keys published", || async {
        let v: Value = stack.http.get(&jwks_url).send().await.ok()?.json().await.ok()?;
        let kids: Vec<&str> = v["keys"].as_array()?.iter().filter_map(|k| k["kid"].as_str()).collect();
        (kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str())).then_some(())
    })
    .await;

    // New sign-ins get the new key once it is active.
    let fresh = eventually(Duration::from_secs(10), "tokens signed with the new key", || {
        let mut fresh = owner.clone();
        let (http, api, new_kid) = (stack.http.clone(), stack.api(), new_kid.clone());
        async move {
            homelink_tools::api::sign_in(&http, &api, &mut fresh).await.ok()?;
            let kid = jsonwebtoken::decode_header(&fresh.access_token).ok()?.kid?;
            (kid == new_kid).then_some(fresh)
        }
    })
    .await;

    // Both tokens work on both services.
    let q = "{ me { userId } }";
    for token in [&owner.access_token, &fresh.access_token] {
        let r = stack.gql(token, q, json!({})).await;
        assert_eq!(r["data"]["me"]["userId"], json!(owner.user_id), "{r}");
        let r = stack
            .http
            .post(stack.command_url(home.household_id, home.devices[0].id))
            .bearer_auth(token)
            .json(&json!({"set": {"on": false}}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 202);
    }
    // The refresh token issued before the rotation still refreshes.
    let r = stack.http.post(format!("{}/v1/auth/refresh", stack.api())).json(&json!({"refreshToken": owner.refresh_token})).send().await;
    assert_eq!(r.expect("refresh").status(), 200);
    owner.refresh_token.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_cannot_slip_past_the_sign_in_throttle() {
    let stack = Stack::start().await;
    let a = stack.account("target").await;
    let url = format!("{}/v1/auth/sign-in", stack.api());
    let guesses = (0..100).map(|i| {
        let (http, url, email) = (stack.http.clone(), url.clone(), a.email.clone());
        async move {
            let body = json!({"email": email, "password": format!("guess number {i}")});
            http.post(url).json(&body).timeout(Duration::from_secs(60)).send().await.expect("sign-in").status().as_u16()
        }
    });
    let statuses = futures::future::join_all(guesses).await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert!(checked <= 10, "at most 10 passwords checked, got {checked}: {statuses:?}");
    assert!(statuses.iter().all(|s| [401, 429, 503].contains(s)), "{statuses:?}");
    assert!(statuses.contains(&429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_hashing_is_bounded_and_addresses_are_budgeted() {
    // A deployment with one hashing permit and no queueing, and small budgets.
    let identity = homelink_command_api::auth::IdentityLimits {
        hashing_permits: 1,
        hashing_wait: Duration::from_millis(1),
        failures_per_address: 15,
        sign_ups_per_address_per_hour: 30,
        ..Default::default()
    };
    let stack = Stack::start_with_identity(identity).await;
    let url = format!("{}/v1/auth/sign-up", stack.api());

    // 20 sign-ups at once: beyond the one running hash, 503 (busy) — none waits long.
    let sign_ups = (0..20).map(|i| {
        let (http, url) = (stack.http.clone(), url.clone());
        async move {
            let body = json!({"email": format!("p{i}-{}@test.homelink.dev", uuid::Uuid::new_v4().simple()), "password": "correct horse battery", "displayName": "P"});
            let r = http.post(url).json(&body).timeout(Duration::from_secs(30)).send().await.expect("sign-up");
            let status = r.status().as_u16();
            let kind = r.json::<Value>().await.ok().and_then(|v| v["type"].as_str().map(str::to_owned));
            (status, kind)
        }
    });
    let answers = futures::future::join_all(sign_ups).await;
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    let busy = answers.iter().filter(|(s, k)| *s == 503 && k.as_deref() == Some("https://homelink.dev/problems/busy")).count();
    assert!(created >= 1 && busy >= 1 && created + busy == 20, "{answers:?}");

    // Sign-ups per address: 30 per hour, the busy ones included; the rest is 429.
    let mut statuses = Vec::new();
    for i in 0..20 {
        let body = json!({"email": format!("q{i}-{}@test.homelink.dev", uuid::Uuid::new_v4().simple()), "password": "correct horse battery", "displayName": "Q"});
        statuses.push(stack.http.post(&url).json(&body).send().await.expect("sign-up").status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10, "{statuses:?}");

    // Failed sign-ins per address: 15 across different e-mails, then 429.
    let sign_in = format!("{}/v1/auth/sign-in", stack.api());
    let mut statuses = Vec::new();
    for i in 0..16 {
        let body = json!({"email": format!("nobody{i}@test.homelink.dev"), "password": "wrong password!"});
        statuses.push(stack.http.post(&sign_in).json(&body).send().await.expect("sign-in").status().as_u16());
    }
    assert_eq!(&statuses[..15], &[401; 15]);
    assert_eq!(statuses[15], 429);
}

/// Issue 15, defect 9: a client that closes its socket drops its handler;
/// the permit must stay with the hash it started, which runs on. The old
/// code held the permit in the handler's future: each client that gave up
/// after 50 ms let the next queued sign-in start a hash beside the one still
/// running on the blocking pool, and FIFO permits go to the oldest waiter —
/// the one closest to its own deadline — so nearly every hash outlived its
/// client, and tens ran at once with 2 permits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_ins_that_hang_up_cannot_run_more_hashes_than_the_permits() {
    let permits = 2;
    let identity = homelink_command_api::auth::IdentityLimits {
        hashing_permits: permits,
        hashing_wait: Duration::from_secs(5),
        // Every attempt here is a failure from one address: no 429 may end the test early.
        failures_per_address: 100_000,
        ..Default::default()
    };
    let stack = Stack::start_with_identity(identity).await;
    let (running, peak) = ("homelink_command_api_password_hashes_running", "homelink_command_api_password_hashes_running_peak");
    let url = format!("{}/v1/auth/sign-in", stack.api());

    // The gauge, sampled while the sign-ins arrive and for a while after.
    let sampler = {
        let stack_http = stack.http.clone();
        let metrics = format!("http://127.0.0.1:{}/metrics", stack.command_port);
        tokio::spawn(async move {
            let mut most = 0.0f64;
            let until = tokio::time::Instant::now() + Duration::from_secs(4);
            while tokio::time::Instant::now() < until {
                if let Ok(r) = stack_http.get(&metrics).send().await {
                    let text = r.text().await.unwrap_or_default();
                    let now = text.lines().find_map(|l| l.strip_prefix(running).and_then(|v| v.trim().parse::<f64>().ok()));
                    most = most.max(now.unwrap_or(0.0));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };

    // 40 sign-ins (unknown e-mails: each costs a full hash), one every 3 ms,
    // each hanging up after 50 ms.
    let mut clients = Vec::new();
    for i in 0..40 {
        let (http, url) = (stack.http.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let body =
                json!({"email": format!("hangs-up-{i}-{}@test.homelink.dev", Uuid::new_v4().simple()), "password": "wrong password!"});
            let _ = http.post(url).json(&body).timeout(Duration::from_millis(50)).send().await;
        }));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for c in clients {
        c.await.expect("client");
    }
    let sampled = sampler.await.expect("sampler");
    // Every hash that started has ended.
    eventually(Duration::from_secs(30), "no hash running", || async {
        (stack.metric(stack.command_port, running).await == 0.0).then_some(())
    })
    .await;
    let most = stack.metric(stack.command_port, peak).await;
    assert!(most >= 1.0, "the sign-ins hashed (peak {most})");
    assert!(most <= permits as f64, "at most {permits} hashes at once, the process saw {most}");
    assert!(sampled <= permits as f64, "at most {permits} hashes at once, sampled {sampled}");
}
