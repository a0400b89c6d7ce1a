//! API conventions through the running services: the OpenAPI document,
//! invitations, body limits and the GraphQL limits and error codes.

mod common;

use common::Stack;
use homelink_events::DeviceKind;
use serde_json::{json, Value};
use std::time::Duration;

/// An oversized body is refused with 413. The server may answer and close the
/// connection before the client has sent everything, which the client sees
/// as a send error instead of the 413; either way the service keeps serving.
async fn assert_too_large(stack: &Stack, r: Result<reqwest::Response, reqwest::Error>, what: &str) {
    match r {
        Ok(r) => assert_eq!(r.status(), 413, "{what}"),
        Err(e) => assert!(e.is_request() || e.is_body(), "{what}: {e}"),
    }
    let health = stack.http.get(format!("{}/healthz", stack.api())).send().await.expect("still serving");
    assert!(health.status().is_success(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_served_openapi_document_is_the_committed_one_and_every_operation_is_routed() {
    let stack = Stack::start().await;
    let r = stack.http.get(format!("{}/openapi.json", stack.api())).send().await.expect("openapi");
    assert_eq!(r.status(), 200);
    let served: Value = r.json().await.expect("json");
    let committed: Value = serde_json::from_str(include_str!("../../command-api/openapi.json")).expect("committed document");
    assert_eq!(served, committed);
    assert_eq!(served["openapi"], "3.1.0");

    let id = uuid::Uuid::new_v4();
    for (path, item) in served["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            let concrete =
                path.replace("{householdId}", &id.to_string()).replace("{deviceId}", &id.to_string()).replace("{userId}", &id.to_string());
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let r = stack.http.request(m, format!("{}{concrete}", stack.api())).json(&json!({})).send().await.expect("call");
            let status = r.status().as_u16();
            let body = r.text().await.expect("body");
            // An unrouted path is axum's bare 404 (empty body); a wrong method 405.
            assert!(status != 405 && !(status == 404 && body.is_empty()), "{method} {path} is documented but not routed ({status})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invitation_is_used_once_and_bodies_are_validated_at_the_edge() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Lamp", "Hall")]).await;
    let owner = &home.accounts[0];
    let h = home.household_id;
    let inv: Value = stack
        .http
        .post(format!("{}/v1/households/{h}/invitations", stack.api()))
        .bearer_auth(&owner.access_token)
        .json(&json!({"role": "adult", "ttlHours": 1}))
        .send()
        .await
        .expect("invite")
        .json()
        .await
        .expect("json");
    let (a, b) = (stack.account("a").await, stack.account("b").await);
    let accept = |who: &homelink_tools::api::Account, code: Value| {
        stack.http.post(format!("{}/v1/invitations/accept", stack.api())).bearer_auth(&who.access_token).json(&json!({"code": code})).send()
    };
    let first = accept(&a, inv["code"].clone()).await.expect("accept");
    assert_eq!(first.status(), 200);
    assert_eq!(first.json::<Value>().await.expect("json")["role"], "adult");
    let second = accept(&b, inv["code"].clone()).await.expect("accept again");
    assert_eq!(second.status(), 409);
    assert_eq!(second.json::<Value>().await.expect("json")["type"], "https://homelink.dev/problems/invitation-used");
    assert_eq!(accept(&b, json!("no-such-code")).await.expect("accept").status(), 404);

    // Mass assignment and sizes: refused before anything is stored.
    let post =
        |path: String, body: Value| stack.http.post(format!("{}{path}", stack.api())).bearer_auth(&owner.access_token).json(&body).send();
    let cases = [
        (format!("/v1/households/{h}/invitations"), json!({"role": "owner", "householdId": uuid::Uuid::new_v4()})),
        (format!("/v1/households/{h}/invitations"), json!({"role": "admin"})),
        (format!("/v1/households/{h}/invitations"), json!({"role": "child", "ttlHours": 100000})),
        ("/v1/households".into(), json!({"name": ""})),
    ];
    for (path, body) in cases {
        let r = post(path.clone(), body).await.expect("post");
        assert_eq!(r.status().as_u16(), 400, "{path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert_too_large(&stack, post("/v1/households".into(), json!({"name": "x".repeat(1_000_000)})).await, "1 MB string").await;
    assert_too_large(&stack, post("/v1/households".into(), json!({"name": (0..100_000).collect::<Vec<u32>>()})).await, "100k array").await;
    let big = stack
        .http
        .post(format!("{}/v1/households", stack.api()))
        .bearer_auth(&owner.access_token)
        .header("content-type", "application/json")
        .body(vec![b' '; 10 * 1024 * 1024])
        .send()
        .await;
    assert_too_large(&stack, big, "10 MB body").await;
    stack.wait_applied("MemberInvited", 1, Duration::from_secs(10)).await;
    stack.wait_applied("MemberJoined", 1, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graphql_limits_refuse_hostile_documents_with_stable_codes_before_any_resolver_runs() {
    let stack = Stack::start().await;
    let home = stack.seed(&[(DeviceKind::Light, "Lamp", "Hall")]).await;
    let token = &home.accounts[0].access_token;
    let code = |v: &Value| v["errors"][0]["extensions"]["code"].as_str().unwrap_or_default().to_owned();

    let r = stack.gql(token, "{ me { userId } }", json!({})).await;
    assert!(r["errors"].is_null(), "a small query runs: {r}");

    // Depth: introspection nesting is the deepest thing the schema allows.
    let nested = format!("{{ __schema {{ types {} }} }}", "{ fields { type { ofType ".repeat(4) + "{ name }" + &" } } }".repeat(4));
    let r = stack.gql(token, &nested, json!({})).await;
    assert_eq!(code(&r), "QUERY_TOO_DEEP", "{r}");
    // Aliases: one cheap field multiplied.
    let aliases: String = (0..31).map(|i| format!("a{i}: me {{ userId }} ")).collect();
    let r = stack.gql(token, &format!("{{ {aliases} }}"), json!({})).await;
    assert_eq!(code(&r), "TOO_MANY_ALIASES", "{r}");
    // Complexity: many fields under the alias limit.
    let wide: String = (0..30)
        .map(|i| {
            format!(
                "a{i}: me {{ userId memberships {{ role household {{ id name myRole members {{ userId role joinedAt }} \
                 devices {{ nodes {{ id kind name room {{ name }} shadow {{ reported seq version battery online lastSeen }} }} }} }} }} }} "
            )
        })
        .collect();
    let r = stack.gql(token, &format!("{{ {wide} }}"), json!({})).await;
    assert_eq!(code(&r), "QUERY_TOO_COMPLEX", "{r}");
    // Validation errors and parse errors carry codes too.
    let r = stack.gql(token, "{ nope }", json!({})).await;
    assert_eq!(code(&r), "GRAPHQL_VALIDATION_FAILED", "{r}");
    let r = stack.gql(token, "{ me { ", json!({})).await;
    assert_eq!(code(&r), "GRAPHQL_VALIDATION_FAILED", "{r}");
    // Batches are refused; an oversized document is refused before parsing.
    let batch = json!([{"query": "{ me { userId } }"}, {"query": "{ me { userId } }"}]);
    let r = stack.http.post(stack.graphql_url()).bearer_auth(token).json(&batch).send().await.expect("batch");
    assert_eq!(r.status(), 400);
    let huge = json!({"query": format!("{{ me {{ userId }} }} #{}", "x".repeat(1_000_000))});
    assert_too_large(&stack, stack.http.post(stack.graphql_url()).bearer_auth(token).json(&huge).send().await, "1 MB document").await;

    // Introspection can be turned off by configuration.
    let mut qc = homelink_query_api::Config::new(&stack.db_url, format!("{}/.well-known/jwks.json", stack.api()));
    qc.introspection = false;
    qc.jwks_refresh = Duration::from_millis(200);
    let closed = homelink_query_api::Application::build(qc).await.expect("query-api");
    let port = closed.port();
    tokio::spawn(closed.run_until_stopped(stack.cancel.clone()));
    let url = format!("http://127.0.0.1:{port}/graphql");
    // Ready means it holds the token keys too.
    common::eventually(Duration::from_secs(20), "the second query-api ready", || async {
        let r = stack.http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let r = homelink_tools::gql::query(&stack.http, &url, token, "{ __schema { types { name } } }", json!({})).await.expect("query");
    // async-graphql answers a disabled introspection with `__schema: null`.
    assert!(r["data"].is_null() || r["data"]["__schema"].is_null(), "introspection is off: {r}");
    let r = homelink_tools::gql::query(&stack.http, &url, token, "{ me { userId } }", json!({})).await.expect("query");
    assert_eq!(r["data"]["me"]["userId"], json!(home.accounts[0].user_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_device_message_schemas_are_served_as_committed() {
    let stack = Stack::start().await;
    let list: Value = stack.http.get(format!("{}/v1/schemas", stack.api())).send().await.expect("list").json().await.expect("json");
    let entries = list["schemas"].as_array().expect("schemas");
    assert_eq!(entries.len(), 9, "{list}");
    for e in entries {
        let name = e["name"].as_str().expect("name");
        let r = stack.http.get(format!("{}{}", stack.api(), e["url"].as_str().expect("url"))).send().await.expect("schema");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/schema+json");
        let served: Value = r.json().await.expect("json");
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../schemas/device/{name}.json"));
        let committed: Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("schema file")).expect("json");
        assert_eq!(served, committed, "{name}");
        assert_eq!(served["$id"], e["id"]);
    }
    let kinds: Vec<&str> = entries.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["light", "plug", "thermostat", "lock", "camera", "sensor"]);
    let missing = stack.http.get(format!("{}/v1/schemas/state.toaster.v1", stack.api())).send().await.expect("missing");
    assert_eq!(missing.status(), 404);
}
