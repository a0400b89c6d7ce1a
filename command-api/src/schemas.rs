//! The device-message JSON Schemas, for device makers: `GET /v1/schemas`
//! lists them, `GET /v1/schemas/{name}` returns one. Public (firmware
//! builders have no account); the same documents are in `schemas/device/`.

use crate::problem::{ApiError, Problem};
use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use homelink_events::schemas;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaEntry {
    /// e.g. `state.light.v1`, `cmd.v1`.
    pub name: String,
    /// `state`, `cmd`, `ack` or `status`.
    pub message: String,
    /// For `state`: the device kind.
    pub kind: Option<String>,
    pub version: u16,
    /// Where to fetch it.
    pub url: String,
    /// Its `$id`.
    pub id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SchemaList {
    pub schemas: Vec<SchemaEntry>,
}

/// Lists the JSON Schema of every device message, per message and version.
#[utoipa::path(get, path = "/v1/schemas", tag = "device protocol", responses((status = 200, body = SchemaList)))]
pub async fn list() -> Json<SchemaList> {
    Json(SchemaList {
        schemas: schemas::all()
            .into_iter()
            .map(|s| SchemaEntry {
                url: format!("/v1/schemas/{}", s.name),
                id: s.schema["$id"].as_str().unwrap_or_default().to_owned(),
                name: s.name,
                message: s.message.to_owned(),
                kind: s.kind.map(|k| k.as_str().to_owned()),
                version: s.version,
            })
            .collect(),
    })
}

/// One JSON Schema (draft 2020-12), as `application/schema+json`.
#[utoipa::path(get, path = "/v1/schemas/{name}", tag = "device protocol", params(("name" = String, Path, example = "state.light.v1")),
    responses((status = 200, description = "the schema", content_type = "application/schema+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn one(Path(name): Path<String>) -> Result<Response, ApiError> {
    let name = name.strip_suffix(".json").unwrap_or(&name);
    let s = schemas::by_name(name).ok_or(ApiError::NotFound)?;
    Ok(([(header::CONTENT_TYPE, "application/schema+json"), (header::CACHE_CONTROL, "public, max-age=3600")], s.schema.to_string())
        .into_response())
}
