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
        "stockd_checkpoint_feed_errors_total",
        "failures of the connection that hears other instances' flushes (reconnected)"
    );
    describe_counter!(
        "stockd_loads_on_miss_total",
        "items loaded from Postgres because a request missed them"
    );
    describe_gauge!(
        "stockd_requests_in_flight",
        "gRPC requests being served (streams until they end)"
    );
    describe_histogram!(
        "stockd_redis_duration_seconds",
        Unit::Seconds,
        "Redis round trips by kind (command, pipeline) and outcome; blocking reads excluded"
    );
    describe_histogram!(
        "stockd_postgres_duration_seconds",
        Unit::Seconds,
        "Postgres calls by call (write_batch, stock_rows_of, request_outcomes, ...) and outcome (ok, error, timeout)"
    );
    describe_counter!(
        "stockd_flush_copy_fallbacks_total",
        "flushes whose binary COPY met a row that existed (a replay, a fork) and were written by the idempotent statements instead, by table"
    );
    describe_counter!(
        "stockd_postgres_timeouts_total",
        "Postgres calls without an answer within the call timeout; their connection was closed"
    );
    describe_gauge!(
        "stockd_postgres_pool_connections",
        "Postgres connections of this instance by state (in_use, idle)"
    );
    describe_gauge!(
        "stockd_postgres_pool_max_connections",
        "the Postgres pool's limit (--database-max-connections)"
    );
    describe_gauge!(
        "stockd_build_info",
        "always 1; the labels say which build runs (version)"
    );
    metrics::gauge!("stockd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!("stockd_requests_in_flight").set(0.0);
    // A request for a path stockd does not serve lands in this one series,
    // there from the start: unknown paths add none.
    metrics::counter!(
        "stockd_requests_total",
        "rpc" => crate::grpc::UNKNOWN_RPC,
        "code" => format!("{:?}", tonic::Code::Unimplemented)
    )
    .absolute(0);
    process_collector().describe();
    for name in [
        "stockd_flushed_events_total",
        "stockd_flush_batches_total",
        "stockd_flush_retries_total",
        "stockd_dead_letters_total",
        "stockd_reservations_expired_total",
        "stockd_redis_epoch_changes_total",
        "stockd_loads_on_miss_total",
        "stockd_checkpoint_feed_errors_total",
        "stockd_postgres_timeouts_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
}

/// The process metrics (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, ...), under the
/// names Prometheus's own clients use.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Samples what no event updates: process metrics and the Postgres pool.
pub struct Sampler {
    pool: sqlx::PgPool,
    max_connections: u32,
    interval: std::time::Duration,
}

impl Sampler {
    pub fn new(pool: sqlx::PgPool, max_connections: u32, interval: std::time::Duration) -> Self {
        Self {
            pool,
            max_connections,
            interval,
        }
    }

    pub fn sample_once(&self) {
        process_collector().collect();
        let size = self.pool.size();
        let idle = self.pool.num_idle() as u32;
        metrics::gauge!("stockd_postgres_pool_connections", "state" => "in_use")
            .set(f64::from(size.saturating_sub(idle)));
        metrics::gauge!("stockd_postgres_pool_connections", "state" => "idle").set(f64::from(idle));
        metrics::gauge!("stockd_postgres_pool_max_connections")
            .set(f64::from(self.max_connections));
    }

    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            self.sample_once();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
