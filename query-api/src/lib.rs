//! query-api: GraphQL over the read models, for the app.
//!
//! - `POST /graphql` runs queries; `GET /graphql` opens GraphiQL in a browser
//!   and, with a WebSocket upgrade (subprotocol `graphql-transport-ws`), runs
//!   subscriptions on the same path.
//! - [`schema`]: the GraphQL queries, subscriptions and their resolvers;
//!   [`types`]: the plain GraphQL types the fan-out and the audit log produce
//!   too; [`errors`]: every error code in one place. [`hub`]: the fan-out of
//!   the projector's committed-change notifications to subscriptions;
//!   [`audit`]: the audit-log connection; [`automations`]: automations and
//!   the time zone; [`dry_run`]: an unsaved automation played over the
//!   log (the one read of the log here); [`scenes`]: scenes and their
//!   activations' progress; [`reads`]: the rows one request may
//!   read and the batching of nested lookups. Imports go one way: schema →
//!   hub, audit, reads → types, errors.
//!
//! **Boundary**: only this crate knows GraphQL.

pub mod audit;
pub mod automations;
pub mod consistency;
pub mod dry_run;
pub mod errors;
pub mod hub;
pub mod limits;
pub mod past;
pub mod reads;
pub mod scenes;
pub mod schema;
pub mod types;

use async_graphql::http::{GraphiQLSource, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::{Data, ErrorExtensionValues};
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use consistency::{consistency_error, NotConsistent};
use errors::codes;
use homelink_kit::auth::Verifier;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::shutdown::CancellationToken;
use hub::Hub;
use schema::{HomeLinkSchema, Limits, Viewer};
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub listen: String,
    pub introspection: bool,
    /// command-api's `/.well-known/jwks.json`: the keys access tokens are checked with.
    pub jwks_url: String,
    pub jwks_refresh: Duration,
    pub subscriptions: hub::SubscriptionLimits,
    /// Rows one GraphQL request may read ([`reads::RowBudget`]).
    pub max_rows: i64,
    /// The log (Kafka bootstrap and topic names), which the dry run reads.
    pub log: dry_run::Log,
}

impl Config {
    pub fn new(database_url: impl Into<String>, jwks_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            listen: "127.0.0.1:0".into(),
            introspection: true,
            jwks_url: jwks_url.into(),
            jwks_refresh: Duration::from_secs(10),
            subscriptions: hub::SubscriptionLimits::default(),
            max_rows: reads::DEFAULT_MAX_ROWS,
            log: dry_run::Log {
                bootstrap: "127.0.0.1:9092".into(),
                topics: homelink_events::Topics::new("homelink."),
                snapshot_every: dry_run::SNAPSHOT_EVERY,
            },
        }
    }
}

/// Why the query API could not start, or stopped (the services' shared error).
pub use homelink_kit::service::ServiceError as Error;

/// Largest GraphQL request body.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    schema: HomeLinkSchema,
    verifier: Verifier,
    consistency: consistency::Consistency,
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    hub: Arc<Hub>,
    pool: PgPool,
    metrics: ServiceMetrics,
    listening: Arc<AtomicBool>,
    verifier: Verifier,
    jwks: (String, Duration),
}

impl Application {
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let metrics = ServiceMetrics::new("query_api");
        // The series the dashboards and alert rules read, at 0 from the start (kit::metrics).
        metrics.touch(&["shadow_changed", "command_changed"], &[], &["listen", "undecodable_notification"], &["report_to_fanout"]);
        let pool = homelink_kit::db::connect_with_retry(&cfg.database_url, 16, Duration::from_secs(30)).await?;
        let hub = Arc::new(Hub::new(cfg.subscriptions, &metrics));
        let limits = Limits { introspection: cfg.introspection, rows: cfg.max_rows, ..Limits::default() };
        let schema = schema::build(pool.clone(), hub.clone(), cfg.log.clone(), &limits);
        let listening = Arc::new(AtomicBool::new(false));
        let verifier = Verifier::default();
        let (l, pg, v) = (listening.clone(), homelink_kit::ops::postgres_ready(pool.clone()), verifier.clone());
        let ready: homelink_kit::ops::ReadyCheck = Arc::new(move || {
            let (l, pg, v) = (l.clone(), pg.clone(), v.clone());
            Box::pin(async move {
                if !l.load(Ordering::Relaxed) {
                    return Err("postgres: not listening for changes".into());
                }
                if v.key_count() == 0 {
                    return Err("jwks: no token keys loaded yet".into());
                }
                pg().await
            })
        });
        let router = Router::new()
            .route("/graphql", get(graphiql_or_subscription).post(graphql))
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .with_state(AppState {
                schema,
                verifier: verifier.clone(),
                consistency: consistency::Consistency {
                    pool: pool.clone(),
                    verifier: verifier.clone(),
                    waits: Arc::default(),
                    applied: hub.applied.clone(),
                },
            })
            .merge(homelink_kit::ops::router(metrics.clone(), ready));
        let listener = homelink_kit::ops::bind(&cfg.listen).await?;
        Ok(Self { listener, router, hub, pool, metrics, listening, verifier, jwks: (cfg.jwks_url, cfg.jwks_refresh) })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), Error> {
        let hub = tokio::spawn(self.hub.clone().run(self.pool.clone(), self.metrics.clone(), self.listening.clone(), cancel.clone()));
        let (url, every) = self.jwks.clone();
        tokio::spawn(self.verifier.clone().refresh_from(reqwest::Client::new(), url, every, cancel.clone()));
        homelink_kit::ops::serve(self.listener, self.router, &self.metrics, cancel).await?;
        hub.abort();
        Ok(())
    }
}

/// The viewer named by a bearer token, or why not.
fn viewer_of(verifier: &Verifier, authorization: Option<&str>) -> Option<Viewer> {
    let token = homelink_kit::auth::bearer(authorization?)?;
    match verifier.verify(token) {
        Ok(c) => Some(Viewer { user_id: c.user_id }),
        Err(e) => {
            tracing::info!(reason = %e, "access token refused");
            None
        }
    }
}

/// A GraphQL error body with a code, for answers given before execution.
fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"data": null, "errors": [{"message": message, "extensions": {"code": code}}]});
    let mut r = (status, Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    r
}

/// `POST /graphql`: one operation per request (batches are refused), run for
/// the viewer of a valid access token; without one, 401 and nothing runs.
async fn graphql(State(s): State<AppState>, headers: HeaderMap, req: Request) -> Response {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(viewer) = viewer_of(&s.verifier, auth) else {
        return refusal(StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED, "a valid access token is required");
    };
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), MAX_REQUEST_BYTES).await else {
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            &format!("the request is larger than {MAX_REQUEST_BYTES} bytes"),
        );
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return refusal(StatusCode::BAD_REQUEST, codes::BATCH_NOT_SUPPORTED, "send one operation per request");
    }
    let gql: async_graphql::Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return refusal(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, &format!("not a GraphQL request: {e}")),
    };
    // Read your writes: wait until the read models cover the token.
    if let Some(token) = headers.get(homelink_kit::consistency::HEADER) {
        let waited = match token.to_str() {
            Ok(t) => s.consistency.wait(viewer.user_id, t).await,
            Err(_) => Err(NotConsistent::Invalid),
        };
        if let Err(e) = waited {
            let (status, code, message) = consistency_error(&e);
            return refusal(status, code, &message);
        }
    }
    let mut resp = s.schema.execute(gql.data(viewer)).await;
    let before_execution = resp.data == async_graphql::Value::Null;
    for e in &mut resp.errors {
        if e.extensions.as_ref().is_some_and(|x| x.get("code").is_some()) {
            continue;
        }
        let code = if e.message.contains("nested too deep") {
            codes::QUERY_TOO_DEEP
        } else if e.message.contains("too complex") {
            codes::QUERY_TOO_COMPLEX
        } else if before_execution {
            codes::GRAPHQL_VALIDATION_FAILED
        } else {
            codes::INTERNAL
        };
        e.extensions.get_or_insert_with(ErrorExtensionValues::default).set("code", code);
    }
    Json(resp).into_response()
}

/// `GET /graphql`: a WebSocket upgrade runs subscriptions (the token comes in
/// `connection_init`'s payload as `authorization: "Bearer …"`; without a
/// valid one the connection is refused); a browser gets GraphiQL.
async fn graphiql_or_subscription(State(s): State<AppState>, req: Request) -> Response {
    let upgrade = req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !upgrade {
        return Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish()).into_response();
    }
    let (mut parts, _) = req.into_parts();
    let protocol = match GraphQLProtocol::from_request_parts(&mut parts, &()).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let (schema, verifier, consistency) = (s.schema.clone(), s.verifier.clone(), s.consistency.clone());
    // A message is one GraphQL request: the same 64 KiB bound as over HTTP
    // (the WebSocket default would be 64 MiB).
    ws.protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(MAX_REQUEST_BYTES)
        .max_frame_size(MAX_REQUEST_BYTES)
        .on_upgrade(move |stream| {
            GraphQLWebSocket::new(stream, schema, protocol)
                .on_connection_init(move |payload| async move {
                    let auth = payload.get("authorization").or_else(|| payload.get("Authorization")).and_then(|v| v.as_str());
                    let viewer = viewer_of(&verifier, auth)
                        .ok_or_else(|| errors::error(codes::UNAUTHENTICATED, "a valid access token is required in connection_init"))?;
                    // Read your writes: subscriptions start once the read models cover the token.
                    if let Some(token) = payload.get("consistencyToken") {
                        let waited = match token.as_str() {
                            Some(t) => consistency.wait(viewer.user_id, t).await,
                            None => Err(NotConsistent::Invalid),
                        };
                        if let Err(e) = waited {
                            let (_, code, message) = consistency_error(&e);
                            return Err(errors::error(code, message));
                        }
                    }
                    let mut data = Data::default();
                    data.insert(viewer);
                    data.insert(Arc::new(hub::ConnectionSubscriptions::default()));
                    Ok(data)
                })
                .serve()
        })
        .into_response()
}
