//! One GraphQL request reads a bounded number of rows (issue 15, defect 10):
//! lists count by their size in the complexity (`first` × their selection,
//! a counted size for lists without `first`), nested lookups are read one
//! query per level, and a request that would read more rows than its budget
//! fails as a whole with `QUERY_TOO_EXPENSIVE` instead of reading on.

mod common;

use common::{eventually, Stack};
use homelink_events::DeviceKind;
use serde_json::{json, Value};
use std::time::Duration;

fn code(r: &Value) -> &str {
    r["errors"][0]["extensions"]["code"].as_str().unwrap_or("none")
}

/// Defect 10's query: every room's devices with 100 commands each.
const NESTED: &str = "household(id: $h) { rooms { name devices { name commands(first: 100) { nodes { id } } } } }";

/// What the app shows of a household: its rooms with their devices and the
/// last command of each, and a page of devices with their recent commands.
const APP: &str = "query($h: ID!) { household(id: $h) {
    rooms { name devices { name commands(first: 1) { nodes { id } } } }
    devices(first: 50) { edges { cursor node { id name room { name } commands(first: 5) { nodes { id status } } } } pageInfo { hasNextPage } } } }";

/// 12 rows on the seeded household: the household, 4 devices, 2 rooms, 4
/// devices again (by room), 1 member.
const TWELVE_ROWS: &str =
    "query($h: ID!) { household(id: $h) { devices(first: 10) { nodes { id } } rooms { name devices { name } } members { role } } }";

/// 7 rows: the household, 2 rooms, 4 devices.
const SEVEN_ROWS: &str = "query($h: ID!) { household(id: $h) { rooms { name devices { name } } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_graphql_request_reads_a_bounded_number_of_rows() {
    let stack = Stack::start().await;
    let home = stack
        .seed(&[
            (DeviceKind::Light, "Lamp 1", "Hall"),
            (DeviceKind::Light, "Lamp 2", "Hall"),
            (DeviceKind::Sensor, "Door", "Hall"),
            (DeviceKind::Plug, "Kettle", "Kitchen"),
        ])
        .await;
    let token = &home.accounts[0].access_token;
    let h = json!({"h": home.household_id});
    // Two commands to the (offline) lamp: its history has rows.
    let lamp = home.devices.iter().find(|d| d.name == "Lamp 1").expect("lamp").id;
    for brightness in [10, 20] {
        let r = stack.command(&home, lamp).json(&json!({"set": {"brightness": brightness}})).send().await.expect("command");
        assert_eq!(r.status(), 202);
    }
    let lamp_commands = "query($id: ID!) { device(id: $id) { commands { nodes { id } } } }";
    let commands: Vec<Value> = eventually(Duration::from_secs(20), "both commands readable", || async {
        let r = stack.gql(token, lamp_commands, json!({"id": lamp})).await;
        let nodes = r["data"]["device"]["commands"]["nodes"].as_array()?.clone();
        (nodes.len() == 2).then_some(nodes)
    })
    .await;

    // Defect 10's query under 30 aliases is refused before anything runs,
    // and so is it once: 20 rooms × 50 devices × 100 commands as counted.
    let aliased: String = (0..30).map(|i| format!("a{i}: {NESTED} ")).collect();
    let r = stack.gql(token, &format!("query($h: ID!) {{ {aliased} }}"), h.clone()).await;
    assert_eq!(code(&r), "QUERY_TOO_COMPLEX", "{r}");
    assert!(r["data"].is_null(), "nothing ran: {r}");
    let r = stack.gql(token, &format!("query($h: ID!) {{ {NESTED} }}"), h.clone()).await;
    assert_eq!(code(&r), "QUERY_TOO_COMPLEX", "{r}");
    // A full page of devices under 30 aliases too.
    let pages: String = (0..30).map(|i| format!("a{i}: household(id: $h) {{ devices(first: 200) {{ nodes {{ id }} }} }} ")).collect();
    let r = stack.gql(token, &format!("query($h: ID!) {{ {pages} }}"), h.clone()).await;
    assert_eq!(code(&r), "QUERY_TOO_COMPLEX", "{r}");

    // The app's query runs, its nested levels batched: every room's devices
    // and every device's commands, each where it belongs.
    let r = stack.gql(token, APP, h.clone()).await;
    assert!(r["errors"].is_null(), "{r}");
    let household = &r["data"]["household"];
    let rooms: Vec<(String, Vec<String>)> = household["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|room| {
            let names = room["devices"].as_array().expect("devices").iter().map(|d| d["name"].as_str().expect("name").to_owned());
            (room["name"].as_str().expect("name").to_owned(), names.collect())
        })
        .collect();
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(rooms, [("Hall".to_owned(), names(&["Door", "Lamp 1", "Lamp 2"])), ("Kitchen".to_owned(), names(&["Kettle"]))]);
    for d in household["rooms"][0]["devices"].as_array().expect("devices") {
        let n = d["commands"]["nodes"].as_array().expect("commands").len();
        assert_eq!(n, if d["name"] == "Lamp 1" { 1 } else { 0 }, "{d}");
    }
    let edges = household["devices"]["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 4);
    for e in edges {
        let got = e["node"]["commands"]["nodes"].as_array().expect("commands");
        if e["node"]["name"] == "Lamp 1" {
            assert_eq!(got.iter().map(|c| &c["id"]).collect::<Vec<_>>(), commands.iter().map(|c| &c["id"]).collect::<Vec<_>>());
        } else {
            assert!(got.is_empty(), "{e}");
        }
    }
    // Within the default budget (5,000 rows) the 12-row query runs.
    let r = stack.gql(token, TWELVE_ROWS, h.clone()).await;
    assert!(r["errors"].is_null(), "{r}");

    // A query-api on the same read models whose requests may read 10 rows.
    let mut qc = homelink_query_api::Config::new(&stack.db_url, format!("{}/.well-known/jwks.json", stack.api()));
    qc.max_rows = 10;
    qc.jwks_refresh = Duration::from_millis(200);
    let small = homelink_query_api::Application::build(qc).await.expect("query-api");
    let port = small.port();
    tokio::spawn(small.run_until_stopped(stack.cancel.clone()));
    common::eventually(Duration::from_secs(20), "the second query-api ready", || async {
        let r = stack.http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let url = format!("http://127.0.0.1:{port}/graphql");
    let gql = |q: &'static str| homelink_tools::gql::query(&stack.http, &url, token, q, h.clone());

    // Well within the complexity limit, but 12 rows: refused as a whole.
    let r = gql(TWELVE_ROWS).await.expect("query");
    assert_eq!(code(&r), "QUERY_TOO_EXPENSIVE", "{r}");
    assert!(r["data"].is_null(), "no partial answer: {r}");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(1), "one error: {r}");
    // The budget is per request: 7 rows fit, before and after.
    for _ in 0..2 {
        let r = gql(SEVEN_ROWS).await.expect("query");
        assert!(r["errors"].is_null(), "{r}");
        assert_eq!(r["data"]["household"]["rooms"].as_array().map(Vec::len), Some(2), "{r}");
    }
}
