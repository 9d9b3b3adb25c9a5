//! wschat's server library.
//!
//! Layout (see ARCHITECTURE.md for the invariants):
//! - `config`: typed settings (file, environment, flags); `config_doc`: their documentation.
//! - `store`: the store of record (sessions, rooms, the message log); the only SQL.
//! - `commit`: group commit; acks after commit.
//! - `broker`: fan-out between nodes (a doorbell); `local` for one node.
//! - `hub`: this node's rooms, subscribers, in-order fan-out, presence; outboxes.
//! - `sessions`: open connections by session; revoked or expired sessions are closed.
//! - `gateway`: WebSocket connections, legacy and v1.
//! - `http`: the router: health, metrics, the page, upgrades.
//! - `app`: start-up and graceful shutdown.
//! - `serve`: the accept loop (TLS, handshake limits); `tls`: certificates and reload.
//! - `limits`: handshake admission (Origin, connection counts, failed keys), the frame
//!   rate, the client address behind trusted proxies.
//! - `telemetry`: every metric, and the Prometheus recorder's set-up.

pub mod app;
pub mod broker;
pub mod commit;
pub mod config;
pub mod config_doc;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod limits;
pub mod serve;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use app::{Application, StartError};
pub use config::Settings;
