//! The OpenAPI 3.1 document. Routes are registered here together with their
//! documentation (`utoipa-axum`), so a route cannot exist undocumented; a test
//! compares the served document with the committed `openapi.json`.

use crate::{auth, commands, households, AppState};
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
    tags((name = "identity"), (name = "households"), (name = "devices"))
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
}

/// The document as JSON, pretty-printed (what `openapi.json` in the repo holds).
pub fn document() -> String {
    routes().split_for_parts().1.to_pretty_json().unwrap_or_default()
}
