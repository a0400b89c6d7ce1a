//! Postgres connection pools.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// A pool that fails fast when Postgres is down instead of queueing callers.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, crate::Error> {
    let options = PgConnectOptions::from_str(url)?;
    let pool = PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(2)).connect_with(options).await?;
    Ok(pool)
}

/// Like [`connect`] but retries until `deadline` (services start before Postgres sometimes).
pub async fn connect_with_retry(url: &str, max_connections: u32, deadline: Duration) -> Result<PgPool, crate::Error> {
    let start = std::time::Instant::now();
    loop {
        match connect(url, max_connections).await {
            Ok(p) => return Ok(p),
            Err(e) if start.elapsed() < deadline => {
                tracing::warn!(error = %e, "postgres not ready, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
