//! stockd: a real-time inventory server.
//!
//! Checkout services reserve, commit, release and decrement stock over gRPC.
//! Every change is one atomic Lua script in Redis that, in the same script,
//! appends a change event to its partition's stream (DESIGN.md is the
//! contract; docs/design.md maps it onto these modules). The pieces, in the
//! order a request meets them:
//!
//! - [`grpc`] and [`http`]: the edges. Parsing a request into [`domain`]
//!   types is where input is validated; [`error::Error`] is mapped to a
//!   gRPC status in one place (and to HTTP in `http`). Protocol types
//!   ([`pb`]) stay at the edges.
//! - [`engine`]: runs each operation as one script call on the multiplexed
//!   connection of [`redis_conn`] (standalone Redis or Redis Cluster; on a
//!   cluster, a request spanning partitions becomes coordinated
//!   per-partition steps); [`keys`] spells every key and computes
//!   partitions; [`scripts`] holds the Lua, one file per operation, and
//!   decodes every reply once.
//! - [`markers`] and [`watchdog`]: every script first checks its
//!   partitions' markers, so nothing is answered from a Redis that lost or
//!   rolled back its data; the watchdog restores such a partition from
//!   Postgres, and [`checkpoint_feed`] tells every instance each flush at
//!   its commit. [`meta`] is the deployment record; [`lock`] keeps jobs to
//!   one instance at a time.
//! - [`consumer`]: the one loop of every consumer group on the partition
//!   streams; the [`flusher`] is its handler that writes batches behind to
//!   Postgres ([`store`]) in one transaction, acknowledging after the
//!   commit; [`backlog`] gauges, gates and trims the streams; [`events`]
//!   parses stream entries. [`export`]: the same events published to NATS
//!   JetStream and RabbitMQ, each exporter a consumer group of its own on
//!   that loop.
//! - [`reaper`]: expires lapsed reservations exactly once across instances.
//! - [`warmer`]: Preload and load on miss. [`reconcile`]: compares Redis
//!   and Postgres item by item and repairs on request.
//! - [`watch`]: live events, one stream reader per instance fanned out to
//!   every watcher (gRPC `Watch`, SSE, GraphQL subscriptions);
//!   [`webhooks`]: stock transitions queued in the flusher's transaction
//!   and POSTed, signed, to subscribed URLs.
//! - [`app`]: wires config, Redis, Postgres, the servers and the
//!   background tasks together; [`config`], [`telemetry`]: settings,
//!   logging and metrics.
//! - [`pb`]: the generated protocol types, which the `stockctl` binary
//!   (`src/bin/stockctl/`, its own module tree) also uses.

pub mod app;
pub(crate) mod backlog;
pub(crate) mod checkpoint_feed;
pub mod config;
pub(crate) mod consumer;
pub mod domain;
pub mod engine;
pub mod error;
pub(crate) mod events;
pub mod export;
mod failpoint;
pub(crate) mod flusher;
pub(crate) mod grpc;
pub(crate) mod http;
pub mod keys;
pub(crate) mod lock;
pub mod markers;
pub mod meta;
pub(crate) mod reaper;
pub(crate) mod reconcile;
pub mod redis_conn;
pub(crate) mod scripts;
pub mod store;
pub mod telemetry;
pub mod warmer;
pub(crate) mod watch;
pub(crate) mod watchdog;
pub mod webhooks;

/// Code generated from `proto/stockd/v1/stockd.proto`.
pub mod pb {
    tonic::include_proto!("stockd.v1");

    /// For the reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stockd_descriptor");

    mod names;
    pub use names::{ShortName, short_name_of};
}
