//! HomeLink developer tools, as a library (used by the `homelink` CLI, the
//! end-to-end tests and the benchmarks) and the `homelink` binary.
//!
//! - [`api`]: a client of the command API's identity and household routes.
//! - [`pki`]: the development device CA and certificates.
//! - [`seed`]: households and devices for the demo, tests and benchmarks.
//! - [`sim`]: simulated devices speaking the device protocol over mTLS MQTT.
//! - [`gql`]: a GraphQL client (queries, `graphql-transport-ws` subscriptions).
//! - [`bench`]: the command round-trip benchmark.
//! - [`load`]: the load generator (`homelink load`).
//! - [`endpoints`]: the `endpoints.json` a running stack publishes.

pub mod api;
pub mod backup;
pub mod bench;
pub mod endpoints;
pub mod gql;
pub mod history;
pub mod load;
pub mod pki;
pub mod replay;
pub mod seed;
pub mod sim;

/// What can go wrong in the tools' library; the `homelink` binary wraps it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("id: {0}")]
    Id(#[from] uuid::Error),
    #[error("certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("device CA: {0}")]
    Ca(#[from] homelink_kit::pki::PkiError),
    #[error("{what}: expected {want}, got {status}: {body}")]
    Status { what: String, want: u16, status: u16, body: String },
    /// The other side did not do what the protocol says.
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A field the other side's answer lacks.
pub(crate) fn missing(what: &str) -> Error {
    Error::Protocol(format!("the answer has no `{what}`"))
}
