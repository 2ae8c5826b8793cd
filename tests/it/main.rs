//! Integration tests: a real stockd (in-process, port 0) against the real
//! Redis, one namespace per test so that tests run in parallel. One test
//! binary for all of them keeps link time down. What the tests share (the
//! test server, typed rpc calls, polling, servers a test may break) is in
//! `support/`, described in support/mod.rs.

mod auth;
mod chaos;
mod cli;
mod cluster;
mod concurrency;
mod crash;
mod definite;
mod demo_browser;
mod deploy_kit;
mod events;
mod expiry;
mod export;
mod faults;
mod flush;
mod graphql;
mod http;
mod idempotency;
mod lifecycle;
mod model;
mod operability;
mod reasons;
mod reconcile;
mod redis_loss;
mod redis_settings;
mod shutdown;
mod support;
mod validation;
mod warming;
mod watch;
mod webhooks;
mod wire;
mod zombie;
