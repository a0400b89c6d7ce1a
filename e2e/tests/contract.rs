//! The published contract holds (issue 9): schemathesis, driven by the
//! OpenAPI document the command API serves, runs every check against a live
//! test stack with an owner's token — a fixed seed and a bounded number of
//! examples — and finds nothing: no server error, no status, header, content
//! type or body the document does not describe, no request valid by the
//! document refused, none invalid accepted.

mod common;

use common::{light_and_sensor, Stack};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_command_api_keeps_its_published_contract() {
    let stack = Stack::start().await;
    let home = stack.seed(&light_and_sensor()).await;
    let owner = &home.accounts[0];
    let dir = std::env::temp_dir().join(format!("homelink-contract-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("report folder");
    let doc = stack.http.get(format!("{}/openapi.json", stack.api())).send().await.expect("openapi").text().await.expect("body");
    let schema = dir.join("openapi.json");
    std::fs::write(&schema, doc).expect("write the document");

    let program = std::env::var("HOMELINK_TEST_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contract/schemathesis.toml");
    let run = tokio::process::Command::new(&program)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&schema)
        .args(["--url", &stack.api(), "--checks", "all", "--seed", "20261126", "--max-examples", "30"])
        .args(["--header", &format!("Authorization: Bearer {}", owner.access_token)])
        .args(["--workers", "1", "--no-color", "--request-timeout", "10", "--generation-database", "none"])
        .current_dir(&dir)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis finished within 10 minutes")
        .unwrap_or_else(|e| panic!("run {program} (infra/dev test installs it): {e}"));
    let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found contract failures:\n{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
