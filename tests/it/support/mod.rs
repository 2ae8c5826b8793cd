//! What the integration tests share, one file per concern. The everyday
//! part is re-exported here, so that a test file starts with
//! `use crate::support::*;`:
//!
//! - [`app`]: `spawn_app()`, a real stockd in process on port 0 with a
//!   namespace and database of the test's own, cleaned up when it stops;
//! - [`rpc`]: typed calls of the gRPC services (`app.reserve(...)`) and the
//!   request builders;
//! - [`namespace`] and [`postgres`]: the shared test Redis and Postgres, a
//!   namespace and database of the test's own, and what a test reads from
//!   them directly (snapshots, levels, convergence);
//! - [`leftovers`]: `Leftovers`, a test's namespace and database removed
//!   at its end and also when it fails;
//! - [`poll`]: `eventually`, waiting for a state under a deadline;
//! - [`ports`]: `free_port`, for the servers a test starts itself;
//! - [`status`]: reading a refusal (code, reason, retry delay, ambiguity).
//!
//! The rest serves a few tests each and is named by path:
//! [`own_redis`] and [`own_cluster`] (servers a test may break),
//! [`proxy`] (a TCP proxy that cuts connections), [`process`] (the real
//! binaries as child processes), [`load`] (random traffic), [`metrics`]
//! (the Prometheus page), [`brokers`] (NATS and RabbitMQ) and [`http_api`]
//! (clients of the HTTP API).

pub mod app;
pub mod brokers;
pub mod http_api;
pub mod leftovers;
pub mod load;
pub mod metrics;
pub mod namespace;
pub mod own_cluster;
pub mod own_redis;
pub mod poll;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod rpc;
pub mod status;

pub use app::*;
pub use leftovers::Leftovers;
pub use namespace::*;
pub use poll::*;
pub use ports::*;
pub use postgres::*;
pub use rpc::*;
pub use status::*;
