//! The OpenAPI 3.1 document. Routes are registered here together with their
//! documentation (`utoipa-axum`), so a route cannot exist undocumented; a test
//! compares the served document with the committed `openapi.json`.

use crate::{auth, commands, devices, households, schemas, AppState};
use std::sync::Arc;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "HomeLink command API", version = "1.0.0",
        description = "Every write of HomeLink. Errors are application/problem+json with a stable `type`. Writes accept an `Idempotency-Key` header."),
    modifiers(&Bearer),
    tags((name = "identity"), (name = "households"), (name = "devices"), (name = "device protocol"))
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

/// Every API route with its documentation.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(auth::sign_up))
        .routes(routes!(auth::sign_in))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::sign_out))
        .routes(routes!(auth::jwks))
        .routes(routes!(households::create))
        .routes(routes!(households::invite))
        .routes(routes!(households::accept))
        .routes(routes!(households::change_role))
        .routes(routes!(households::remove))
        .routes(routes!(households::leave))
        .routes(routes!(commands::request))
        .routes(routes!(devices::register))
        .routes(routes!(devices::remove))
        .routes(routes!(devices::rename))
        .routes(routes!(devices::move_device))
        .routes(routes!(devices::create_room))
        .routes(routes!(devices::rename_room))
        .routes(routes!(devices::delete_room))
        .routes(routes!(schemas::list))
        .routes(routes!(schemas::one))
}

/// The document as JSON, pretty-printed (what `openapi.json` in the repo holds).
pub fn document() -> String {
    routes().split_for_parts().1.to_pretty_json().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

    /// The document in the repo is the one the code serves. After changing a
    /// route, regenerate it: `UPDATE_OPENAPI=1 cargo test -p homelink-command-api openapi`.
    #[test]
    fn the_committed_openapi_document_matches_the_code() {
        let doc = document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, &doc).expect("write openapi.json");
        }
        let committed = std::fs::read_to_string(COMMITTED).expect("command-api/openapi.json exists");
        assert!(committed == doc, "command-api/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test -p homelink-command-api openapi`");
    }

    #[test]
    fn it_is_openapi_3_1_and_every_authenticated_operation_documents_401_and_problem_bodies() {
        let v: serde_json::Value = serde_json::from_str(&document()).expect("json");
        assert!(v["openapi"].as_str().is_some_and(|s| s.starts_with("3.1")), "{}", v["openapi"]);
        let mut operations = 0;
        for (path, item) in v["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                operations += 1;
                let responses = op["responses"].as_object().expect("responses");
                if op.get("security").is_some() {
                    assert!(responses.contains_key("401"), "{method} {path} documents 401");
                }
                for (status, r) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert!(
                            r["content"]["application/problem+json"]["schema"]["$ref"] == "#/components/schemas/Problem",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        assert_eq!(operations, 21);
    }
}
