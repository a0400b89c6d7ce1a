//! HomeLink's event and message types: pure data and pure logic, no I/O.
//!
//! Layout:
//! - [`automation`]: automations' definitions, their validation, conditions
//!   judged against a snapshot, schedules that daylight saving does not break.
//! - [`engine`]: the automation engine's decisions (which triggers a fact
//!   fires, whether a held trigger still holds, derived ids), shared by the
//!   engine and the dry run; [`dry_run`]: an unsaved automation simulated
//!   over recorded events, sending nothing.
//! - [`envelope`]: the stored event envelope (`Envelope`) and its JSON encoding;
//!   every record on a HomeLink Kafka topic is one envelope.
//! - [`event`]: the typed events (`Event`) and the one place that maps a stored
//!   `(type, v, payload)` back to a typed event (upcasting lives there).
//! - [`protocol`]: the MQTT device protocol (topics and message bodies) and its
//!   validation, so the bridge and the simulator agree byte for byte.
//! - [`device`]: device kinds and their capabilities.
//! - [`household`]: the household aggregate (members, invitations, the
//!   last-owner invariant) and the roles table (`Role::allows`).
//! - [`schemas`]: the JSON Schemas of the device messages, generated from the
//!   capability table (and committed under `schemas/device/`).
//! - [`scene`]: scenes' targets checked like commands, and what activating
//!   one decides (one command per device, or why not).
//! - [`shadow`]: how a device shadow evolves from events (`Shadow::apply`).
//! - [`text`]: what text every store can hold (no NUL characters).
//! - [`topics`]: topic names (with a deployment prefix) and the household key.
//!
//! **Invariant**: this crate does no I/O and knows nothing of tokio, Kafka,
//! Postgres or MQTT clients.

pub mod automation;
pub mod command;
pub mod device;
pub mod dry_run;
pub mod engine;
pub mod envelope;
pub mod event;
pub mod household;
pub mod past;
pub mod protocol;
pub mod scene;
pub mod schemas;
pub mod shadow;
pub mod text;
pub mod topics;
pub mod twin;

pub use device::DeviceKind;
pub use envelope::{Actor, Envelope, RequestMeta};
pub use event::Event;
pub use household::Role;
pub use topics::Topics;
