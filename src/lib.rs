//! stockd: a real-time inventory server.
//!
//! Checkout services reserve, commit, release and decrement stock over gRPC.
//! Every change is one atomic Lua script in Redis that, in the same script,
//! appends a change event to its partition's stream (DESIGN.md is the
//! contract). The pieces, in the order a request meets them:
//!
//! - [`grpc`]: the `Inventory` and `Admin` services; parsing a request into
//!   [`domain`] types is where input is validated, and [`error::Error`] is
//!   mapped to a gRPC status in one place.
//! - [`engine`]: runs each operation as one script call on a multiplexed
//!   Redis connection; [`keys`] spells every key and computes partitions;
//!   [`scripts`] holds the Lua, one file per operation.
//! - [`reaper`]: releases lapsed reservations with op `expire`, exactly once
//!   across instances.
//! - [`flusher`]: reads the partition streams through a consumer group and
//!   writes them behind to Postgres ([`store`]) in one transaction per batch,
//!   acknowledging only after the commit; [`events`] parses stream entries.
//! - [`warmer`]: Preload, load on miss, and re-warming Redis from Postgres
//!   after a data loss (noticed by the epoch in [`meta`], the deployment
//!   record: partition count, schema, epoch); [`lock`] keeps such jobs to
//!   one instance at a time.
//! - [`reconcile`]: compares Redis and Postgres item by item, classifies
//!   the differences and repairs them on request.
//! - [`watch`]: live events, one stream reader per instance fanned out to
//!   every watcher (gRPC `Watch`, SSE, GraphQL subscriptions); [`http`]:
//!   the HTTP API for storefronts (JSON, SSE, GraphQL, a demo page); [`webhooks`]: stock transitions detected from
//!   the streams (a consumer group of their own) and POSTed, signed, to
//!   subscribed URLs from a Postgres outbox.
//! - [`app`]: wires config, Redis, the server and the background tasks
//!   together: `run(config, listener, shutdown)`.
//! - [`config`], [`telemetry`]: flags/environment and logging.
//! - [`pb`]: the generated protocol types, which the `stockctl` binary
//!   (`src/bin/stockctl/`, its own module tree) also uses.

pub mod app;
pub mod backlog;
pub mod config;
pub mod consumer;
pub mod domain;
pub mod engine;
pub mod error;
pub mod events;
mod failpoint;
pub mod flusher;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod lock;
pub mod markers;
pub mod meta;
pub mod reaper;
pub mod reconcile;
pub mod redis_conn;
pub mod scripts;
pub mod store;
pub mod telemetry;
pub mod warmer;
pub mod watch;
pub mod watchdog;
pub mod webhooks;

/// Code generated from `proto/stockd/v1/stockd.proto`.
pub mod pb {
    tonic::include_proto!("stockd.v1");

    /// For the reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stockd_descriptor");

    mod names;
    pub use names::{ShortName, short_name_of};
}
