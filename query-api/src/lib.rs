//! query-api: GraphQL over the read models, for the app.
//!
//! - `POST /graphql` runs queries; `GET /graphql` opens GraphiQL in a browser
//!   and, with a WebSocket upgrade (subprotocol `graphql-transport-ws`), runs
//!   subscriptions on the same path.
//! - [`schema`]: the GraphQL types and resolvers. [`hub`]: the fan-out of the
//!   projector's committed-change notifications to subscriptions.
//!
//! **Boundary**: only this crate knows GraphQL.

pub mod hub;
pub mod schema;

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQL, GraphQLSubscription};
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::shutdown::CancellationToken;
use hub::Hub;
use schema::{HomeLinkSchema, Limits};
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub listen: String,
    pub introspection: bool,
}

impl Config {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self { database_url: database_url.into(), listen: "127.0.0.1:0".into(), introspection: true }
    }
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    hub: Arc<Hub>,
    pool: PgPool,
    metrics: ServiceMetrics,
    listening: Arc<AtomicBool>,
}

impl Application {
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        let metrics = ServiceMetrics::new("query_api");
        let pool = homelink_kit::db::connect_with_retry(&cfg.database_url, 16, Duration::from_secs(30)).await?;
        let hub = Arc::new(Hub::default());
        let limits = Limits { introspection: cfg.introspection, ..Limits::default() };
        let schema = schema::build(pool.clone(), hub.clone(), &limits);
        let listening = Arc::new(AtomicBool::new(false));
        let (l, pg) = (listening.clone(), homelink_kit::ops::postgres_ready(pool.clone()));
        let ready: homelink_kit::ops::ReadyCheck = Arc::new(move || {
            let (l, pg) = (l.clone(), pg.clone());
            Box::pin(async move {
                if !l.load(Ordering::Relaxed) {
                    return Err("postgres: not listening for changes".into());
                }
                pg().await
            })
        });
        let router = Router::new()
            .route("/graphql", get(graphiql_or_subscription).post_service(GraphQL::new(schema.clone())))
            .with_state(schema)
            .merge(homelink_kit::ops::router(metrics.clone(), ready));
        let listener = homelink_kit::ops::bind(&cfg.listen).await?;
        Ok(Self { listener, router, hub, pool, metrics, listening })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn run_until_stopped(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let hub = tokio::spawn(self.hub.clone().run(self.pool.clone(), self.metrics.clone(), self.listening.clone(), cancel.clone()));
        homelink_kit::ops::serve(self.listener, self.router, cancel).await?;
        hub.abort();
        Ok(())
    }
}

/// `GET /graphql`: a WebSocket upgrade runs subscriptions; a browser gets GraphiQL.
async fn graphiql_or_subscription(State(schema): State<HomeLinkSchema>, req: Request) -> Response {
    let upgrade = req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if upgrade {
        return match GraphQLSubscription::new(schema).oneshot(req).await {
            Ok(r) => r.into_response(),
            Err(never) => match never {},
        };
    }
    Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish()).into_response()
}
