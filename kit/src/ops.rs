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
/// every connection (small responses must not wait for a delayed ACK), the
/// peer's address as `ConnectInfo<SocketAddr>` (per-address limits) and every
/// request but the operational ones counted and timed in `metrics` by its
/// matched route (the golden signals of the dashboards).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    metrics: &ServiceMetrics,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let router = router.layer(axum::middleware::from_fn_with_state(metrics.clone(), track));
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// Counts one request in flight until dropped (also when the client goes
/// away and the handler's future is dropped unfinished).
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(g: &prometheus::IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The HTTP metrics of one request: count by route, method and status, the
/// time to the response head, and the requests in flight. The operational
/// routes are left out, so a scrape does not count as traffic.
async fn track(
    State(m): State<ServiceMetrics>,
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = matched.as_ref().map_or("unmatched", |p| p.as_str()).to_owned();
    if matches!(route.as_str(), "/metrics" | "/healthz" | "/readyz") {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_owned();
    let _in_flight = InFlight::enter(&m.http_in_flight);
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    m.http_latency.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    m.http_requests.with_label_values(&[&route, &method, res.status().as_str()]).inc();
    res
}
