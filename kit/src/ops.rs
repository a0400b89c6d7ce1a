//! The operational routes every service serves: `/healthz` (alive), `/readyz`
//! (its dependencies answer) and `/metrics` (Prometheus text format).

use crate::metrics::ServiceMetrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use std::sync::Arc;

/// Checks a service's dependencies; `Err` names the one that does not answer.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Clone)]
struct OpsState {
    metrics: ServiceMetrics,
    ready: ReadyCheck,
}

/// Routes for `/healthz`, `/readyz` and `/metrics`, to merge into a service's router.
pub fn router<S: Clone + Send + Sync + 'static>(metrics: ServiceMetrics, ready: ReadyCheck) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(OpsState { metrics, ready })
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    match tokio::time::timeout(std::time::Duration::from_secs(2), (s.ready)()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready".to_owned()),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, why),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "readiness check timed out".to_owned()),
    }
}

async fn render(State(s): State<OpsState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

/// A readiness check that pings Postgres.
pub fn postgres_ready(pool: sqlx::PgPool) -> ReadyCheck {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move { sqlx::query("SELECT 1").execute(&pool).await.map(|_| ()).map_err(|e| format!("postgres: {e}")) })
    })
}

/// Binds a listener on `addr` (port 0 picks a free port).
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `router` on `listener` until `cancel` fires, with TCP_NODELAY on
/// every connection (small responses must not wait for a delayed ACK) and the
/// peer's address as `ConnectInfo<SocketAddr>` (per-address limits).
pub async fn serve(listener: tokio::net::TcpListener, router: Router, cancel: tokio_util::sync::CancellationToken) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
