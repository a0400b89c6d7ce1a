//! `homelink-query-api`: GraphQL queries and subscriptions for the app.

use clap::Parser;
use homelink_query_api::{Application, Config};

#[derive(Parser)]
#[command(version, about = "HomeLink query API (GraphQL)")]
struct Args {
    #[command(flatten)]
    common: homelink_kit::config::CommonArgs,
    /// command-api's JWKS document, which verifies access tokens.
    #[arg(long, env = "HOMELINK_JWKS_URL", default_value = "http://127.0.0.1:8080/.well-known/jwks.json")]
    jwks_url: String,
    #[arg(long, env = "HOMELINK_QUERY_API_LISTEN", default_value = "127.0.0.1:8081")]
    listen: String,
    /// Serve the schema to introspection queries (turn off in production if wanted).
    #[arg(long, env = "HOMELINK_GRAPHQL_INTROSPECTION", default_value_t = true, action = clap::ArgAction::Set)]
    introspection: bool,
    /// Rows one GraphQL request may read from the read models, over all its
    /// fields; a request that needs more fails with `QUERY_TOO_EXPENSIVE`.
    #[arg(long, env = "HOMELINK_GRAPHQL_MAX_ROWS", default_value_t = homelink_query_api::reads::DEFAULT_MAX_ROWS,
          value_parser = clap::value_parser!(i64).range(1..))]
    max_rows: i64,
}

fn main() -> anyhow::Result<()> {
    homelink_kit::service::main(run)
}

async fn run(cancel: homelink_kit::shutdown::CancellationToken) -> anyhow::Result<()> {
    let a = Args::parse();
    let mut cfg = Config::new(&a.common.database_url, a.jwks_url);
    cfg.log = homelink_query_api::dry_run::Log {
        bootstrap: a.common.kafka_bootstrap.clone(),
        topics: a.common.topics(),
        snapshot_every: homelink_query_api::dry_run::SNAPSHOT_EVERY,
    };
    cfg.listen = a.listen;
    cfg.introspection = a.introspection;
    cfg.max_rows = a.max_rows;
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "query API listening");
    Ok(app.run_until_stopped(cancel).await?)
}
