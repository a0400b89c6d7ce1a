//! HomeLink developer tools, as a library (used by the `homelink` CLI, the
//! end-to-end tests and the benchmarks) and the `homelink` binary.
//!
//! - [`api`]: a client of the command API's identity and household routes.
//! - [`pki`]: the development device CA and certificates.
//! - [`seed`]: households and devices for the demo, tests and benchmarks.
//! - [`sim`]: simulated devices speaking the device protocol over mTLS MQTT.
//! - [`gql`]: a GraphQL client (queries, `graphql-transport-ws` subscriptions).
//! - [`bench`]: the command round-trip benchmark.
//! - [`endpoints`]: the `endpoints.json` a running stack publishes.

pub mod api;
pub mod bench;
pub mod endpoints;
pub mod gql;
pub mod pki;
pub mod seed;
pub mod sim;
