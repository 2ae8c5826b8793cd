//! Typed configuration: every setting is a flag and an environment variable
//! (DESIGN.md, "Running it").

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// stockd: real-time inventory server (gRPC, Redis, write-behind to Postgres).
#[derive(Clone, Parser)]
#[command(name = "stockd", version, about, args_override_self = true)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "STOCKD_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the Prometheus endpoint (`/metrics`); empty = none.
    #[arg(long, env = "STOCKD_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "STOCKD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "STOCKD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "STOCKD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Largest request accepted, in bytes; larger ones are refused.
    #[arg(long, env = "STOCKD_MAX_REQUEST_BYTES", default_value_t = 256 * 1024)]
    pub max_request_bytes: usize,

    /// Requests served at once; past it requests are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing.
    #[arg(long, env = "STOCKD_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Redis URL (may carry a password; it is never logged).
    #[arg(
        long,
        env = "STOCKD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Postgres URL; the database is created when missing.
    #[arg(
        long,
        env = "STOCKD_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/stockd",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Postgres connections of this instance.
    #[arg(long, env = "STOCKD_DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,

    /// Most stream entries the flusher writes in one Postgres transaction.
    #[arg(long, env = "STOCKD_FLUSH_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub flush_batch: u32,

    /// How long the flusher waits for new entries before it looks again, in
    /// milliseconds.
    #[arg(long, env = "STOCKD_FLUSH_INTERVAL_MS", default_value_t = 50)]
    pub flush_interval_ms: u64,

    /// Unflushed entries per partition past which new demand on that
    /// partition is refused with UNAVAILABLE until the flusher catches up.
    #[arg(long, env = "STOCKD_MAX_UNFLUSHED", default_value_t = 1_000_000)]
    pub max_unflushed: u64,

    /// Entries pending this long with another flusher (a dead instance) are
    /// taken over, in milliseconds.
    #[arg(long, env = "STOCKD_FLUSH_CLAIM_IDLE_MS", default_value_t = 30_000)]
    pub flush_claim_idle_ms: u64,

    /// How long flushed events stay in the streams for Watch resumption, in
    /// seconds.
    #[arg(long, env = "STOCKD_STREAM_RETENTION_SECS", default_value_t = 300)]
    pub stream_retention_secs: u64,

    /// This instance's name among the flusher's consumers; keep it stable
    /// across restarts (default: `<hostname>:<grpc port>`).
    #[arg(long, env = "STOCKD_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Prefix of every Redis key of this deployment.
    #[arg(long, env = "STOCKD_NAMESPACE", default_value = "stockd")]
    pub namespace: String,

    /// Partition count; fixed for the life of a deployment (stored in Redis at
    /// first start, a different value later refuses to start).
    #[arg(long, env = "STOCKD_PARTITIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub partitions: u32,

    /// When set, every Admin rpc needs `authorization: Bearer <token>`.
    #[arg(long, env = "STOCKD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// When set, every Inventory rpc needs `authorization: Bearer <token>`.
    #[arg(long, env = "STOCKD_CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<String>,

    /// How long finished reservations and request outcomes are kept for
    /// replays, in seconds.
    #[arg(long, env = "STOCKD_IDEMPOTENCY_WINDOW_SECS", default_value_t = 86_400)]
    pub idempotency_window_secs: u64,

    /// How often the reaper looks for lapsed reservations, in milliseconds.
    #[arg(long, env = "STOCKD_REAPER_INTERVAL_MS", default_value_t = 250)]
    pub reaper_interval_ms: u64,

    /// How often each instance checks that Redis still holds its data (the
    /// epoch id in NS:{meta}), in milliseconds.
    #[arg(long, env = "STOCKD_EPOCH_CHECK_MS", default_value_t = 1_000)]
    pub epoch_check_ms: u64,

    /// Timeout of one Redis command, in milliseconds: past it the request
    /// fails with UNAVAILABLE instead of hanging.
    #[arg(long, env = "STOCKD_REDIS_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_timeout_ms: u64,

    /// Log filter, e.g. `info` or `stockd=debug,tower=warn`.
    #[arg(long, env = "STOCKD_LOG", default_value = "info")]
    pub log: String,

    #[arg(long, env = "STOCKD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Events a Watch client may have waiting before it is cut off as too
    /// slow (RESOURCE_EXHAUSTED, with the id to resume from).
    #[arg(long, env = "STOCKD_WATCH_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_buffer: u32,

    /// Signs webhook deliveries of subscriptions added without a secret of
    /// their own (unset: such subscriptions get a generated secret).
    #[arg(long, env = "STOCKD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Attempts of a webhook delivery before it is parked in dead letters.
    #[arg(long, env = "STOCKD_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub webhook_max_attempts: u32,

    /// Delay before the first webhook retry, in milliseconds; doubles per
    /// attempt up to --webhook-backoff-max-ms.
    #[arg(long, env = "STOCKD_WEBHOOK_BACKOFF_MS", default_value_t = 1_000)]
    pub webhook_backoff_ms: u64,

    #[arg(long, env = "STOCKD_WEBHOOK_BACKOFF_MAX_MS", default_value_t = 300_000)]
    pub webhook_backoff_max_ms: u64,

    /// Timeout of one webhook POST, in milliseconds.
    #[arg(long, env = "STOCKD_WEBHOOK_TIMEOUT_MS", default_value_t = 5_000)]
    pub webhook_timeout_ms: u64,

    /// Webhook POSTs in flight at once from this instance.
    #[arg(long, env = "STOCKD_WEBHOOK_CONCURRENCY", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub webhook_concurrency: u32,
}

impl Config {
    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window_secs)
    }

    pub fn reaper_interval(&self) -> Duration {
        Duration::from_millis(self.reaper_interval_ms)
    }

    pub fn epoch_check_interval(&self) -> Duration {
        Duration::from_millis(self.epoch_check_ms)
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// The flusher's consumer name: `--instance-id`, else
    /// `<hostname>:<port>`, stable across restarts of the same instance.
    pub fn consumer_name(&self, port: u16) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "stockd".to_owned());
            format!("{host}:{port}")
        })
    }
}

impl std::fmt::Debug for Config {
    /// Secrets (the Redis URL may hold a password, the token) stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("namespace", &self.namespace)
            .field("database_max_connections", &self.database_max_connections)
            .field("flush_batch", &self.flush_batch)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field("max_unflushed", &self.max_unflushed)
            .field("flush_claim_idle_ms", &self.flush_claim_idle_ms)
            .field("stream_retention_secs", &self.stream_retention_secs)
            .field("instance_id", &self.instance_id)
            .field("partitions", &self.partitions)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("client_token", &self.client_token.as_ref().map(|_| "<set>"))
            .field("metrics_addr", &self.metrics_addr)
            .field("tls_cert", &self.tls_cert)
            .field("tls_client_ca", &self.tls_client_ca)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("idempotency_window_secs", &self.idempotency_window_secs)
            .field("reaper_interval_ms", &self.reaper_interval_ms)
            .field("epoch_check_ms", &self.epoch_check_ms)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .field("watch_buffer", &self.watch_buffer)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<set>"),
            )
            .field("webhook_max_attempts", &self.webhook_max_attempts)
            .field("webhook_backoff_ms", &self.webhook_backoff_ms)
            .field("webhook_backoff_max_ms", &self.webhook_backoff_max_ms)
            .field("webhook_timeout_ms", &self.webhook_timeout_ms)
            .field("webhook_concurrency", &self.webhook_concurrency)
            .finish_non_exhaustive()
    }
}
