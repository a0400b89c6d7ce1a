//! The OpenAPI 3.1 document. Routes are registered here together with their
//! documentation (`utoipa-axum`), so a route cannot exist undocumented; a test
//! compares the served document with the committed `openapi.json`.

use crate::{auth, automations, commands, devices, history, households, scenes, schemas, AppState};
use std::sync::Arc;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "HomeLink command API", version = "1.0.0",
        description = "Every write of HomeLink. Errors are application/problem+json with a stable `type`. Writes accept an `Idempotency-Key` header. No string may contain the NUL character (U+0000): it is refused with 400."),
    modifiers(&Bearer),
    tags((name = "identity"), (name = "households"), (name = "scenes"), (name = "automations"), (name = "devices"), (name = "device protocol"))
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
        .routes(routes!(households::report_presence))
        .routes(routes!(history::export))
        .routes(routes!(scenes::create))
        .routes(routes!(scenes::change, scenes::delete))
        .routes(routes!(scenes::activate))
        .routes(routes!(automations::create))
        .routes(routes!(automations::replace, automations::delete))
        .routes(routes!(automations::set_time_zone))
        .routes(routes!(commands::request))
        .routes(routes!(commands::put_desired))
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

/// The conventions every write shares, added to each operation so the
/// document lists exactly the answers the server gives: the write layer's
/// (400 malformed `Idempotency-Key`, 409 claim in progress, 422 key reused, 503
/// outcome not known within the answer deadline) and the body extractor's
/// (400 malformed or invalid body, 413 too large), and the key's format.
pub fn finish(doc: utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut v = serde_json::to_value(&doc).unwrap_or_default();
    let problem = |description: &str| {
        serde_json::json!({"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
    };
    // The definition's tagged unions refuse fields they do not own, like
    // every body (utoipa closes structs but not an enum's variants).
    for union in ["Trigger", "Condition", "Step"] {
        if let Some(variants) = v.pointer_mut(&format!("/components/schemas/{union}/oneOf")).and_then(|o| o.as_array_mut()) {
            for variant in variants.iter_mut().filter_map(|x| x.as_object_mut()) {
                variant.insert("additionalProperties".into(), serde_json::Value::Bool(false));
            }
        }
    }
    let Some(paths) = v.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return v;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for (method, op) in item.iter_mut() {
            let write = matches!(method.as_str(), "post" | "put" | "patch" | "delete")
                && path.starts_with("/v1/")
                && !path.starts_with("/v1/auth/");
            let has_body = op.get("requestBody").is_some();
            let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) else { continue };
            let mut add = |status: &str, description: &str| {
                responses.entry(status.to_owned()).or_insert_with(|| problem(description));
            };
            if has_body {
                add("400", "the body is not valid JSON of the documented shape");
                add("413", "the body is larger than 16 KiB");
            }
            if write {
                add("400", "a malformed Idempotency-Key");
                add("409", "a request with this Idempotency-Key is still being decided; retry after Retry-After");
                add("422", "this Idempotency-Key was used with another request");
                add("503", "the outcome is not known yet (a dependency is slow); retry with the same Idempotency-Key");
            }
            if let Some(params) = op.get_mut("parameters").and_then(|p| p.as_array_mut()) {
                for p in params.iter_mut().filter(|p| p["name"] == "Idempotency-Key") {
                    p["schema"] =
                        serde_json::json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": crate::validate::KEY_PATTERN});
                }
            }
        }
    }
    v
}

/// Every routed `(method, path template)` (lower-case method).
pub fn operations() -> std::collections::HashSet<(String, String)> {
    let doc = routes().split_for_parts().1;
    let v = serde_json::to_value(&doc).unwrap_or_default();
    let mut out = std::collections::HashSet::new();
    for (path, item) in v["paths"].as_object().into_iter().flatten() {
        for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
            out.insert((method.clone(), path.clone()));
        }
    }
    out
}

/// The document as JSON, pretty-printed (what `openapi.json` in the repo holds).
pub fn document() -> String {
    serde_json::to_string_pretty(&finish(routes().split_for_parts().1)).unwrap_or_default()
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
        assert_eq!(operations, 32);
    }

    /// The patterns the document publishes are the ones the handlers check
    /// (`validate.rs` tests that those agree with the checks).
    #[test]
    fn the_published_patterns_are_the_checked_ones() {
        let v: serde_json::Value = serde_json::from_str(&document()).expect("json");
        let schemas = &v["components"]["schemas"];
        for (schema, field) in [
            ("CreateHousehold", "name"),
            ("RegisterDevice", "name"),
            ("Rename", "name"),
            ("SignUp", "displayName"),
            ("CreateScene", "name"),
            ("ChangeScene", "name"),
        ] {
            assert_eq!(schemas[schema]["properties"][field]["pattern"], crate::validate::NAME_PATTERN, "{schema}.{field}");
            assert_eq!(schemas[schema]["properties"][field]["maxLength"], crate::validate::NAME_MAX, "{schema}.{field}");
        }
        assert_eq!(schemas["SignUp"]["properties"]["email"]["pattern"], crate::validate::EMAIL_PATTERN);
        assert_eq!(schemas["RegisterDevice"]["properties"]["serial"]["pattern"], crate::validate::SERIAL_PATTERN);
        assert_eq!(schemas["RegisterDevice"]["properties"]["csr"]["pattern"], crate::validate::CSR_PATTERN);
        assert_eq!(schemas["RegisterDevice"]["properties"]["csr"]["maxLength"], crate::validate::CSR_MAX);
        let mut ids: Vec<&str> = Vec::new();
        for item in v["paths"].as_object().expect("paths").values() {
            for op in item.as_object().expect("item").values() {
                ids.push(op["operationId"].as_str().expect("operationId"));
            }
        }
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "operation ids are unique");
    }
}
