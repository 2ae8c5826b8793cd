//! Logging through `tracing`, filtered by `STOCKD_LOG`, as text or JSON;
//! metrics through `metrics`, exported for Prometheus.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, from a binary.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|err| {
        eprintln!("invalid STOCKD_LOG filter {filter:?} ({err}); using `info`");
        EnvFilter::new("info")
    });
    // Colours only for a person at a terminal, never into files or collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Buckets of the latency histograms, in seconds: from 100 µs (a reserve
/// is one Redis round trip) to 10 s (a preload or reconcile page).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the global metrics recorder and serves Prometheus text at
/// `http://<addr>/metrics` (nothing when `addr` is empty). Call once, from a
/// binary.
pub fn install_metrics(addr: &str) -> Result<(), String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    if addr.is_empty() {
        return Ok(());
    }
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{e}"))?;
    let build = || -> Result<(), metrics_exporter_prometheus::BuildError> {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
            .set_buckets_for_metric(
                Matcher::Full("stockd_flush_batch_size".into()),
                &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
            )?
            .install()
    };
    build().map_err(|e| e.to_string())?;
    describe_metrics();
    Ok(())
}

/// Describes every metric stockd exports and registers the counters at zero,
/// so that dashboards and alerts see a series before its first event.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    crate::export::describe_metrics();
    describe_counter!(
        "stockd_requests_total",
        "gRPC requests by rpc and status code"
    );
    describe_histogram!(
        "stockd_request_duration_seconds",
        Unit::Seconds,
        "gRPC request latency by rpc"
    );
    describe_gauge!(
        "stockd_unflushed_events",
        "stream entries not yet written to Postgres, per partition"
    );
    describe_gauge!(
        "stockd_oldest_unflushed_age_seconds",
        Unit::Seconds,
        "age of the oldest entry not yet written to Postgres, per partition (the flush lag)"
    );
    describe_counter!("stockd_flushed_events_total", "events written to Postgres");
    describe_counter!(
        "stockd_flush_batches_total",
        "batches (transactions) written to Postgres"
    );
    describe_histogram!(
        "stockd_flush_batch_duration_seconds",
        Unit::Seconds,
        "time to write one batch"
    );
    describe_histogram!("stockd_flush_batch_size", "entries per batch");
    describe_counter!(
        "stockd_flush_retries_total",
        "batch writes that failed and were retried"
    );
    describe_counter!(
        "stockd_dead_letters_total",
        "stream entries moved to a dead-letter stream"
    );
    describe_counter!(
        "stockd_reservations_expired_total",
        "holds released by the reaper"
    );
    describe_gauge!(
        "stockd_reconcile_items",
        "items per class in the last full reconcile"
    );
    describe_histogram!(
        "stockd_reconcile_duration_seconds",
        Unit::Seconds,
        "duration of a reconcile"
    );
    describe_counter!(
        "stockd_redis_epoch_changes_total",
        "Redis data losses noticed (re-warms)"
    );
    describe_counter!(
        "stockd_loads_on_miss_total",
        "items loaded from Postgres because a request missed them"
    );
    for name in [
        "stockd_flushed_events_total",
        "stockd_flush_batches_total",
        "stockd_flush_retries_total",
        "stockd_dead_letters_total",
        "stockd_reservations_expired_total",
        "stockd_redis_epoch_changes_total",
        "stockd_loads_on_miss_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
}
